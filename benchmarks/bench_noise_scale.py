"""Gradient-noise-scale benchmark: estimator overhead, and what the adaptive batch schedule buys.

Run: ``.venv/bin/python benchmarks/bench_noise_scale.py [--quick]``; writes ``benchmarks/results/noise_scale.json``.

1. **Overhead** of ``NoiseScaleCallback`` (every step) in a ``BatchRampTrainer`` (global batch 32 in 4 micro-chunks
   of 8, tiny Llama, CPU, one thread): (a) time inside the callback's micro-chunk events (two in-place gradient norms)
   as % of the step time, measured in the same runs; (b) side by side, median step time with vs without the
   callback over interleaved repeats (target: <= 1 %; (b) is noisier than the overhead itself on a shared CPU);
   (c) the hooks' work timed in isolation on the same model's gradients.
2. **Optimizer updates to the baseline's loss** on the demo-like task (tiny Llama on ``synthetic_lm_dataset``,
   AdamW, constant LR, same number of epochs): a fixed batch of ``min_size`` (the baseline) vs
   ``AdaptiveBatchSchedule(min_size -> max_size)``; eval loss on held-out sequences every few steps. Reported:
   updates (and samples) the adaptive run needs to first reach the baseline's final eval loss, as ratios, and the
   final eval losses (a fixed batch of ``max_size`` for the same epochs is shown for reference).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import statistics
import tempfile
import time

import torch
from transformers import PrinterCallback, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from hf_batchsched.assets import synthetic_lm_dataset, tiny_llama
from hf_batchsched.callbacks.noise_scale import NoiseScaleCallback
from hf_batchsched.probes.noise_scale import GradientNoiseScale, grad_sq_norm
from hf_batchsched.schedules.adaptive import AdaptiveBatchSchedule
from hf_batchsched.trainer import BatchRampTrainer

RESULTS = pathlib.Path(__file__).parent / "results" / "noise_scale.json"
WARMUP_STEPS = 2


def make_args(output_dir: str, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (on_step_begin -> on_step_end)."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def timed_hooks(callback: NoiseScaleCallback, trainer) -> dict[int, float]:
    """Wrap the callback's micro-chunk events; returns {optimizer step: seconds spent inside them during it}."""
    spent: dict[int, float] = {}
    for name in ("on_micro_chunk_end", "on_step_batch_end"):
        method = getattr(callback, name)

        def wrapper(*args, _method=method, **kwargs):
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                step = trainer.state.global_step
                spent[step] = spent.get(step, 0.0) + time.perf_counter() - start

        setattr(callback, name, wrapper)
    return spent


def isolated_hook_ms(model_config: dict, seq_len: int, repeats: int = 200) -> float:
    """Median time of the work the hooks do per measured step (two in-place gradient norms, the host read, the
    estimator update) on the real gradients of the benchmark model; immune to preemption of a single long run."""
    model = tiny_llama(seed=0, **model_config)
    batch = {k: torch.tensor(v) for k, v in synthetic_lm_dataset(8, seq_len, model_config["vocab_size"])[:8].items()}
    model(**batch).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    estimator = GradientNoiseScale(beta=0.95)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        small = grad_sq_norm(params)
        big = grad_sq_norm(params)
        sq_small, sq_big = torch.stack([small * 4.0, big]).tolist()
        estimator.update(sq_small, sq_big, 8, 32)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def overhead(steps: int, repeats: int, model_config: dict, seq_len: int) -> dict:
    dataset = synthetic_lm_dataset(num_samples=32 * steps, seq_len=seq_len, vocab_size=model_config["vocab_size"])
    per_step = {"without": [], "with": []}
    hook_fraction = []
    for repeat in range(repeats):
        for variant in ("without", "with") if repeat % 2 == 0 else ("with", "without"):  # ABBA against drift
            with tempfile.TemporaryDirectory() as output_dir:
                trainer = BatchRampTrainer(
                    model=tiny_llama(seed=0, **model_config),
                    args=make_args(output_dir),
                    train_dataset=dataset,
                    batch_schedule=32,
                    max_micro_batch_size=8,
                )
                trainer.remove_callback(PrinterCallback)
                timer = StepTimer()
                trainer.add_callback(timer)
                if variant == "with":
                    callback = NoiseScaleCallback(trainer, beta=0.95)
                    trainer.add_callback(callback)
                    spent = timed_hooks(callback, trainer)
                trainer.train()
                measured = timer.times[WARMUP_STEPS:]  # first steps pay one-off costs (allocator, kernel dispatch)
                per_step[variant].append(statistics.median(measured))
                if variant == "with":  # medians: a preempted step (shared CPU) must not count as hook time
                    hooks = [seconds for step, seconds in spent.items() if step >= WARMUP_STEPS]
                    hook_fraction.append(statistics.median(hooks) / statistics.median(measured))
    without, with_ = statistics.median(per_step["without"]), statistics.median(per_step["with"])
    hook_ms = isolated_hook_ms(model_config, seq_len)
    return {
        "isolated_hook_ms_per_step": round(hook_ms, 4),
        "isolated_hook_pct_of_step": round(100 * hook_ms / (1000 * without), 3),
        "setup": {
            "global_batch": 32,
            "micro_batch": 8,
            "chunks": 4,
            "seq_len": seq_len,
            "steps": steps,
            "repeats": repeats,
            "model": model_config,
            "parameters": sum(p.numel() for p in tiny_llama(seed=0, **model_config).parameters()),
        },
        "hook_time_pct_of_step": round(100 * statistics.median(hook_fraction), 3),
        "step_ms_without": round(1000 * without, 3),
        "step_ms_with": round(1000 * with_, 3),
        "side_by_side_overhead_pct": round(100 * (with_ - without) / without, 2),
        "per_repeat_step_ms": {k: [round(1000 * v, 3) for v in vs] for k, vs in per_step.items()},
    }


class EvalLoss(TrainerCallback):
    """Mean token loss on a fixed held-out batch every ``every`` steps (and at the end); model left as found."""

    def __init__(self, trainer, eval_batch: dict, every: int):
        self.trainer, self.batch, self.every = trainer, eval_batch, every
        self.curve: list[dict] = []

    def _record(self, state):
        model = self.trainer.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            loss = float(model(**self.batch).loss)
        model.train(was_training)
        self.curve.append({"step": state.global_step, "samples": self.trainer.clock.consumed_samples, "loss": loss})

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self._record(state)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.curve or self.curve[-1]["step"] != state.global_step:
            self._record(state)


def train_curve(schedule, dataset, eval_batch, *, epochs: float, lr: float, every: int, noise: bool) -> dict:
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = BatchRampTrainer(
            model=tiny_llama(seed=0),
            args=make_args(output_dir, num_train_epochs=epochs, learning_rate=lr),
            train_dataset=dataset,
            batch_schedule=schedule,
            max_micro_batch_size=8,
        )
        trainer.remove_callback(PrinterCallback)
        evaluator = EvalLoss(trainer, eval_batch, every)
        callback = None
        if noise:
            callback = NoiseScaleCallback(trainer)
            trainer.add_callback(callback)
        trainer.add_callback(evaluator)
        trainer.train()
        result = {
            "updates": trainer.clock.optimizer_steps,
            "samples": trainer.clock.consumed_samples,
            "final_eval_loss": evaluator.curve[-1]["loss"],
            "curve": evaluator.curve,
        }
        if isinstance(schedule, AdaptiveBatchSchedule):
            result["events"] = schedule.events
        if callback is not None:
            result["final_noise_scale"] = callback.estimator.noise_scale
        return result


def first_reaching(curve: list[dict], target: float) -> dict | None:
    for point in curve:
        if point["loss"] <= target:
            return point
    return None


def lm_dataset(num_samples: int, seed: int, token_noise: float, seq_len: int = 32, vocab_size: int = 128):
    """``synthetic_lm_dataset`` (sequences counting upward), each token replaced by a uniformly random one with
    probability ``token_noise``: a loss floor above 0, so the gradient noise scale grows as training approaches it."""
    from datasets import Dataset

    base = synthetic_lm_dataset(num_samples=num_samples, seq_len=seq_len, vocab_size=vocab_size, seed=seed)
    if not token_noise:
        return base
    generator = torch.Generator().manual_seed(seed + 1000)
    ids = torch.tensor(base["input_ids"])
    replace = torch.rand(ids.shape, generator=generator) < token_noise
    ids = torch.where(replace, torch.randint(3, vocab_size, ids.shape, generator=generator), ids)
    rows = {"input_ids": ids.tolist(), "attention_mask": base["attention_mask"], "labels": ids.tolist()}
    return Dataset.from_dict(rows)


def adaptive_vs_fixed(
    num_samples: int,
    epochs: float,
    adaptive_epochs: float,
    min_size: int,
    max_size: int,
    lr: float,
    every: int,
    token_noise: float,
    variants: tuple[tuple[str, str | None], ...],
) -> dict:
    """Baseline: a fixed batch of ``min_size`` for ``epochs``. Adaptive runs get up to ``adaptive_epochs`` (a larger
    batch needs more samples for the same loss) and report the first update at which they reach the baseline's final
    eval loss."""
    dataset = lm_dataset(num_samples, seed=0, token_noise=token_noise)
    held_out = lm_dataset(128, seed=1, token_noise=token_noise)
    eval_batch = {key: torch.tensor(held_out[key]) for key in held_out.column_names}
    runs = {
        "fixed_min": train_curve(min_size, dataset, eval_batch, epochs=epochs, lr=lr, every=every, noise=True),
        "fixed_max": train_curve(max_size, dataset, eval_batch, epochs=epochs, lr=lr, every=1, noise=False),
    }
    for name, scaling in variants:
        schedule = AdaptiveBatchSchedule(min_size, max_size, patience=3, warmup_updates=10, beta=0.95,
                                         lr_scaling=scaling)  # fmt: skip
        runs[name] = train_curve(schedule, dataset, eval_batch, epochs=adaptive_epochs, lr=lr, every=every, noise=True)
    baseline = runs["fixed_min"]
    target = baseline["final_eval_loss"]
    summary = {"target_eval_loss": target, "baseline_updates": baseline["updates"],
               "baseline_samples": baseline["samples"]}  # fmt: skip
    for name in [name for name, _ in variants] + ["fixed_max"]:
        reached = first_reaching(runs[name]["curve"], target)
        summary[name] = {
            "final_eval_loss": runs[name]["final_eval_loss"],
            "total_updates": runs[name]["updates"],
            "total_samples": runs[name]["samples"],
            "reached_target_at_update": None if reached is None else reached["step"],
            "updates_ratio_vs_baseline": None if reached is None else round(reached["step"] / baseline["updates"], 3),
            "samples_ratio_vs_baseline": (
                None if reached is None else round(reached["samples"] / baseline["samples"], 3)
            ),
            "batch_sizes": [max_size] if name == "fixed_max" else [min_size] + [e["to"] for e in runs[name]["events"]],
            "grew_at_update": [e["step"] for e in runs[name].get("events", [])],
        }
    return {
        "setup": {
            "num_samples": num_samples,
            "baseline_epochs": epochs,
            "adaptive_max_epochs": adaptive_epochs,
            "min_size": min_size,
            "max_size": max_size,
            "micro_batch": 8,
            "lr": lr,
            "optimizer": "adamw_torch, constant LR",
            "eval_every": every,
            "adaptive": "patience=3, warmup_updates=10, beta=0.95, growth_threshold=1.05, growth_factor=2",
            "model": "tiny_llama() (hidden 32, 2 layers, vocab 128)",
            "seq_len": 32,
            "token_noise": token_noise,
        },
        "summary": summary,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()
    logging.getLogger("hf_batchsched").setLevel(logging.ERROR)

    model_config = dict(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=256)  # fmt: skip
    started = time.perf_counter()
    result = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
        "overhead": overhead(
            steps=8 if args.quick else 20, repeats=1 if args.quick else 3, model_config=model_config, seq_len=64
        ),  # fmt: skip
    }
    both = (("adaptive", None), ("adaptive_sqrt_lr", "sqrt"))
    for task, token_noise, variants in (("noisy_tokens", 0.3, both), ("clean", 0.0, both[:1])):
        result[f"adaptive_{task}"] = adaptive_vs_fixed(
            num_samples=512 if args.quick else 2048, epochs=2, adaptive_epochs=4, min_size=16, max_size=256,
            lr=3e-3, every=4, token_noise=token_noise, variants=variants,
        )  # fmt: skip
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, default=float) + "\n")

    over = result["overhead"]
    print(
        f"overhead: isolated hook work {over['isolated_hook_ms_per_step']} ms = {over['isolated_hook_pct_of_step']}% "
        f"of a {over['step_ms_without']} ms step; in-run hook time {over['hook_time_pct_of_step']}% of step time; "
        f"side by side {over['step_ms_without']} ms without vs {over['step_ms_with']} ms with "
        f"({over['side_by_side_overhead_pct']:+}%)"
    )
    for task in ("noisy_tokens", "clean"):
        summary = result[f"adaptive_{task}"]["summary"]
        print(f"[{task}] baseline fixed batch 16: {summary['baseline_updates']} updates, final eval loss "
              f"{summary['target_eval_loss']:.4f}")  # fmt: skip
        for name in [key for key in summary if isinstance(summary[key], dict)]:
            row = summary[name]
            print(f"{name:>17}: final eval loss {row['final_eval_loss']:.4f}, reached baseline at update "
                  f"{row['reached_target_at_update']} (updates ratio {row['updates_ratio_vs_baseline']}, samples "
                  f"ratio {row['samples_ratio_vs_baseline']}), sizes {row['batch_sizes']}")  # fmt: skip
    print(f"wrote {RESULTS} in {result['wall_seconds']} s")


if __name__ == "__main__":
    main()
