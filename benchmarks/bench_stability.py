"""Overhead of ``StabilityMonitorCallback`` at its default interval, as % of training time.

Side by side in one process: the same ``Trainer`` run (tiny ResNet on digits; tiny Llama on synthetic tokens)
with and without the monitor, interleaved ``--repeats`` times. Two measures: the time spent inside the monitor
(all its events and forward hooks, timed in-run: the precise number) as % of ``train_runtime``, and the
wall-clock difference of the medians (noisy on a shared CPU). Target: <= 2%.

Run: ``.venv/bin/python benchmarks/bench_stability.py`` (writes benchmarks/results/stability.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from hf_batchsched.assets import digits_image_dataset, synthetic_lm_dataset, tiny_llama, tiny_resnet
from hf_batchsched.callbacks.stability import StabilityMonitorCallback

RESULTS = Path(__file__).resolve().parent / "results"


def make_case(name: str):
    if name == "resnet":
        return (lambda: tiny_resnet(seed=0)), digits_image_dataset(num_samples=1024), 32, 3e-3
    if name == "resnet-wide":  # 3 stages x 2 blocks, 32-128 channels, 32x32 inputs: ~0.7M parameters
        build = lambda: tiny_resnet(seed=0, hidden_sizes=[32, 64, 128], depths=[2, 2, 2], embedding_size=32)  # noqa: E731
        return build, digits_image_dataset(num_samples=1024, image_size=32), 32, 3e-3
    llama = (lambda: tiny_llama(seed=0, num_hidden_layers=4)), synthetic_lm_dataset(num_samples=512, seq_len=32)
    return (*llama, 16, 1e-3)


class Stopwatch:
    """Accumulates the time spent inside wrapped functions (the monitor's events and hooks)."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def train_once(case: str, steps: int, monitor: bool) -> tuple[float, float]:
    """Returns (train_runtime, seconds spent inside the monitor's events and forward hooks)."""
    build, dataset, batch_size, lr = make_case(case)
    stopwatch = Stopwatch()
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=batch_size,
            max_steps=steps,
            learning_rate=lr,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(model=build(), args=args, train_dataset=dataset)
        if monitor:
            callback = StabilityMonitorCallback(trainer)  # defaults: every_n_steps=25
            for event in ("on_train_begin", "on_step_begin", "on_pre_optimizer_step", "on_step_end", "on_train_end"):
                setattr(callback, event, stopwatch.wrap(getattr(callback, event)))
            callback.record_loss = stopwatch.wrap(callback.record_loss)  # the per-step loss hook
            make_hook = callback.recorder.make_hook  # the sampled-step activation hooks
            callback.recorder.make_hook = lambda index: stopwatch.wrap(make_hook(index))
            trainer.add_callback(callback)
        output = trainer.train()
        return output.metrics["train_runtime"], stopwatch.seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "stability.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for case in ("resnet", "resnet-wide", "llama"):
        train_once(case, 10, True)  # warm-up (imports, allocator)
        plain, monitored, inside = [], [], []
        for _ in range(args.repeats):  # interleaved, so machine load drifts hit both alike
            plain.append(train_once(case, args.steps, False)[0])
            runtime, seconds = train_once(case, args.steps, True)
            monitored.append(runtime)
            inside.append(seconds)
        plain_median, monitored_median = statistics.median(plain), statistics.median(monitored)
        wallclock = 100 * (monitored_median / plain_median - 1)
        accounted = statistics.median(100 * s / r for s, r in zip(inside, monitored))
        results[case] = {
            "steps": args.steps,
            "every_n_steps": 25,
            "plain_runtime_s": plain,
            "monitored_runtime_s": monitored,
            "seconds_inside_monitor": inside,
            "overhead_percent_accounted": round(accounted, 3),
            "overhead_percent_wallclock": round(wallclock, 2),
        }
        print(
            f"{case:>11}: plain {plain_median:.2f} s | monitored {monitored_median:.2f} s | "
            f"time inside the monitor {accounted:.2f}% of training | wall-clock difference {wallclock:+.2f}% "
            f"(median of {args.repeats}, shared CPU: noise of several %)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
