"""BatchRampTrainer overhead and memory, measured side by side in one run.

1. Throughput at a constant batch: train samples/s of ``BatchRampTrainer`` / plain ``Trainer`` (same model, data,
   batch; ``--repeats`` interleaved pairs after a warm-up run, median of the per-pair ratios), both per wall-clock
   second and per CPU second of the process (the latter is robust to other jobs on a shared machine). Target >= 0.98.
2. Peak memory: a run ramping the global batch 8 -> 256 with ``max_micro_batch_size=8`` vs a constant-8 run, a plain
   ``Trainer`` accumulating 32 micro-batches of 8 and a ``BatchRampTrainer`` at constant 256 in chunks of 8 (the
   same accumulation the ramp does at its peak; what the ramp's excess is compared with), and (for contrast) a
   constant-256 run in one chunk. Each run is a fresh subprocess.
   On CUDA the figure is ``torch.cuda.max_memory_allocated`` during ``train()``; on CPU it is the growth of the
   process's resident set (RSS, sampled every 2 ms by a thread) over its value just before ``train()`` -- the CPU
   allocator has no peak counter, and RSS growth captures activations, gradients and optimizer state. Target
   (ramp / constant-8) <= 1.10.

Usage::

    python benchmarks/bench_trainer.py [--samples 512] [--seq-len 64] [--hidden 64] [--repeats 3] [--memory-only]

Writes ``benchmarks/results/trainer.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def build(kind: str, args, output_dir: str, schedule=None, micro: int = 8, accumulation: int = 1):
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from hf_batchsched.assets import synthetic_lm_dataset, tiny_llama
    from hf_batchsched.trainer import BatchRampTrainer

    use_cpu = not torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=micro,
        num_train_epochs=args.epochs,
        learning_rate=1e-3,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        use_cpu=use_cpu,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        gradient_accumulation_steps=accumulation,
        seed=0,
    )
    model = tiny_llama(seed=0, hidden_size=args.hidden, intermediate_size=4 * args.hidden, vocab_size=args.vocab,
                       max_position_embeddings=args.seq_len)  # fmt: skip
    dataset = synthetic_lm_dataset(args.samples, seq_len=args.seq_len, vocab_size=args.vocab)
    if kind == "plain":
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    else:
        trainer = BatchRampTrainer(
            model=model, args=training_args, train_dataset=dataset, batch_schedule=schedule,
            max_micro_batch_size=micro, batch_size_multiple=getattr(args, "batch_size_multiple", None),
        )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    return trainer


def throughput(kind: str, args) -> tuple[float, float]:
    """(samples per wall-clock second, samples per CPU second of this process) of one ``train()``."""
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build(kind, args, output_dir, micro=args.batch)
        cpu_start = time.process_time()
        metrics = trainer.train().metrics
        cpu_seconds = time.process_time() - cpu_start
    samples = args.samples * args.epochs
    return metrics["train_samples_per_second"], samples / cpu_seconds


def linear_ramp(consumed: float) -> int:
    """8 -> 256 linearly over the first 60% of the samples of the run, then 256."""
    fraction = min(1.0, consumed / RAMP_SAMPLES)
    return int(8 + fraction * (256 - 8))


RAMP_SAMPLES = 1
MODES = ("const8", "ramp", "const256_micro8", "plain_accum32", "const256")

# glibc's malloc raises its mmap threshold each time a large block is freed, so later large blocks come from the heap,
# which it rarely gives back: the RSS then depends on the order of allocations rather than on the memory in use (runs
# of the same configuration differed by up to 20 MiB). A fixed threshold keeps large blocks on mmap, returned to the
# system when freed, so RSS growth tracks live memory. Ignored by other allocators.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def child_memory(mode: str, args) -> dict:
    """Run one configuration and return its peak memory (runs in a fresh process)."""
    global RAMP_SAMPLES
    RAMP_SAMPLES = int(0.6 * args.mem_samples * args.epochs)
    mem_args = argparse.Namespace(**{**vars(args), "samples": args.mem_samples})
    with tempfile.TemporaryDirectory() as output_dir:
        if mode == "plain_accum32":  # a plain Trainer accumulating 32 micro-batches of 8: batch 256
            trainer = build("plain", mem_args, output_dir, micro=8, accumulation=32)
        else:
            schedule, micro = {"ramp": (linear_ramp, 8), "const8": (8, 8), "const256": (256, 256),
                               "const256_micro8": (256, 8)}[mode]  # fmt: skip
            trainer = build("ramp", mem_args, output_dir, schedule=schedule, micro=micro)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            trainer.train()
            peak = torch.cuda.max_memory_allocated() - base
            source = "cuda max_memory_allocated"
        else:
            page = os.sysconf("SC_PAGE_SIZE")

            def rss() -> int:
                with open("/proc/self/statm") as file:
                    return int(file.read().split()[1]) * page

            base, samples, done = rss(), [], threading.Event()

            def poll():
                while not done.is_set():
                    samples.append(rss())
                    time.sleep(0.002)

            thread = threading.Thread(target=poll, daemon=True)
            thread.start()
            trainer.train()
            done.set()
            thread.join()
            peak = max(samples + [rss()]) - base
            source = "cpu rss growth"
    max_batch = (
        max(trainer.ramp_plan) if hasattr(trainer, "ramp_plan") else 8 * trainer.args.gradient_accumulation_steps
    )
    return {"mode": mode, "peak_bytes": peak, "steps": trainer.state.global_step, "source": source,
            "max_batch": max_batch}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--mem-samples", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mem-repeats", type=int, default=3, help="fresh processes per memory configuration")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size-multiple", type=int, default=None, help="BatchRampTrainer batch_size_multiple")
    parser.add_argument("--child", choices=MODES)
    parser.add_argument("--memory-only", action="store_true", help="skip the throughput pairs")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "trainer.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.child:
        print(json.dumps(child_memory(args.child, args)))
        return 0

    if not args.memory_only:
        throughput("plain", args)  # warm-up: first-call imports and allocator growth
    plain, ours, plain_cpu, ours_cpu = [], [], [], []
    for repeat in range(0 if args.memory_only else args.repeats):  # interleaved, so machine load hits both alike
        order = ("plain", "ramp") if repeat % 2 == 0 else ("ramp", "plain")
        measured = {kind: throughput(kind, args) for kind in order}
        plain.append(measured["plain"][0])
        ours.append(measured["ramp"][0])
        plain_cpu.append(measured["plain"][1])
        ours_cpu.append(measured["ramp"][1])
    pair_ratios = [o / p for o, p in zip(ours, plain)]
    speed_ratio = statistics.median(pair_ratios) if pair_ratios else None
    cpu_ratios = [o / p for o, p in zip(ours_cpu, plain_cpu)]
    cpu_ratio = statistics.median(cpu_ratios) if cpu_ratios else None

    # Peak memory: each configuration in a fresh process, interleaved and repeated (RSS growth on a CPU moves by
    # a MiB or two between runs); the ratios are medians over the repeats' side-by-side pairs.
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for repeat in range(args.mem_repeats):
        for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
            command = [sys.executable, __file__, "--child", mode] + [
                f"--{key.replace('_', '-')}={value}"
                for key, value in vars(args).items()
                if key not in ("child", "output", "memory_only") and value is not None
            ]
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=CHILD_ENV)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    memory = {}
    for mode, rows in runs.items():  # the median run of each configuration, with every run's peak
        median_run = sorted(rows, key=lambda row: row["peak_bytes"])[len(rows) // 2]
        memory[mode] = {**median_run, "peak_bytes_per_run": [row["peak_bytes"] for row in rows]}
    memory_ratios = [r["peak_bytes"] / c["peak_bytes"] for r, c in zip(runs["ramp"], runs["const8"])]
    naive_ratios = [r["peak_bytes"] / c["peak_bytes"] for r, c in zip(runs["const256"], runs["const8"])]
    accumulation_ratios = [a["peak_bytes"] / c["peak_bytes"] for a, c in zip(runs["plain_accum32"], runs["const8"])]
    chunked_ratios = [a["peak_bytes"] / c["peak_bytes"] for a, c in zip(runs["const256_micro8"], runs["const8"])]
    chunked_ratio = statistics.median(chunked_ratios)
    memory_ratio = statistics.median(memory_ratios)
    naive_ratio = statistics.median(naive_ratios)
    accumulation_ratio = statistics.median(accumulation_ratios)

    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("child", "output")},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "samples_per_second": {"plain_trainer": plain, "batch_ramp_trainer": ours},
        "samples_per_cpu_second": {"plain_trainer": plain_cpu, "batch_ramp_trainer": ours_cpu},
        "throughput_ratio_per_pair": [round(r, 4) for r in pair_ratios],
        "throughput_ratio_ramp_over_plain": None if speed_ratio is None else round(speed_ratio, 4),
        "cpu_throughput_ratio_per_pair": [round(r, 4) for r in cpu_ratios],
        "cpu_throughput_ratio_ramp_over_plain": None if cpu_ratio is None else round(cpu_ratio, 4),
        "peak_memory": memory,
        "memory_ratio_per_repeat": [round(r, 4) for r in memory_ratios],
        "memory_ratio_ramp8to256_over_const8": round(memory_ratio, 4),
        "memory_ratio_const256_one_chunk_over_const8": round(naive_ratio, 4),
        "memory_ratio_plain_trainer_accum32_over_const8": round(accumulation_ratio, 4),
        "memory_ratio_const256_micro8_over_const8": round(chunked_ratio, 4),
        "targets": {"throughput_ratio": ">= 0.98", "memory_ratio": "<= 1.10"},
    }
    for name, a, b, ratio, ratios in (
        ("samples/wall-s", plain, ours, speed_ratio, pair_ratios),
        ("samples/CPU-s ", plain_cpu, ours_cpu, cpu_ratio, cpu_ratios),
    ):
        if ratio is None:
            continue
        print(f"{name} plain Trainer {statistics.median(a):8.1f}  BatchRampTrainer {statistics.median(b):8.1f}  "
              f"median pair ratio {ratio:.3f} (target >= 0.98; pairs {[round(r, 3) for r in ratios]})")  # fmt: skip
    for mode in MODES:
        print(f"peak memory {mode:9s} {memory[mode]['peak_bytes'] / 2**20:8.2f} MiB ({memory[mode]['source']}, "
              f"{memory[mode]['steps']} steps, max batch {memory[mode]['max_batch']})")  # fmt: skip
    print(f"memory ratio ramp 8->256 (micro 8) / const 8: {memory_ratio:.3f} (target <= 1.10; median of "
          f"{[round(r, 3) for r in memory_ratios]}); "
          f"const 256 in one chunk / const 8: {naive_ratio:.3f}; plain Trainer accumulating 32 x 8 / const 8: "
          f"{accumulation_ratio:.3f} (median of {[round(r, 3) for r in accumulation_ratios]}); BatchRampTrainer "
          f"constant 256 in chunks of 8 / const 8: {chunked_ratio:.3f} (median of "
          f"{[round(r, 3) for r in chunked_ratios]})")  # fmt: skip
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(result, file, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
