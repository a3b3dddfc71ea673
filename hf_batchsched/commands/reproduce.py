"""``hf-batchsched reproduce``: rerun the seed papers' experiments and the overhead table (``bench.reproduce_*``).

Usage::

    hf-batchsched reproduce {smith,keskar,bjorck,overheads,seesaw,critical-batch,all} [--output-dir DIR] [--quick]
        [--rerun] [--seed S]

Each experiment writes ``DIR/<name>.json`` (``bjorck``: ``bjorck_summary.json`` beside the benchmark's own
``bjorck.json``) and its PNG figures, and prints a one-line headline. ``--seed S`` shifts every seed of the
experiment by ``S`` (smith averages over seeds ``S..S+2``, keskar over ``S..S+4``). ``seesaw`` and ``critical-batch``
are the language-model experiments of ``bench.reproduce_seesaw`` and ``bench.reproduce_critical_batch`` on
``bench.lm_task`` (``seesaw`` measures the critical batch size too).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

__all__ = ["HELP", "NAMES", "add_arguments", "run"]

HELP = (
    "Reproduce Smith 2018 (batch ramp), Keskar 2017 (sharpness), Bjorck 2018 (BN), Seesaw 2025 and the critical "
    "batch size (Merrill 2025) on CPU; gather overheads."
)

NAMES = ("smith", "keskar", "bjorck", "overheads", "seesaw", "critical-batch", "all")

DEFAULT_OUTPUT_DIR = "benchmarks/results/reproduce"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help=f"one of {', '.join(NAMES)}")
    parser.add_argument(
        "--output-dir", default=DEFAULT_OUTPUT_DIR, help=f"where the JSON and PNGs go (default {DEFAULT_OUTPUT_DIR})"
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings that run in seconds (for tests/CI)")
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="overheads: rerun the checkout's benchmarks/bench_*.py first (rewrites benchmarks/results/*.json)",
    )
    parser.add_argument(
        "--reuse-bjorck",
        action="store_true",
        help="bjorck: summarise the committed benchmarks/results/bjorck.json instead of rerunning the benchmark",
    )
    parser.add_argument("--seed", type=int, default=0, help="offset added to the experiments' seeds (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machines)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    parser.add_argument(
        "--task",
        choices=("pretrain", "lora"),
        help="seesaw / critical-batch: only this task (files get a -TASK suffix); default both",
    )


def _headline(name: str, result: dict) -> str:
    if name == "smith":
        runs, s = result["runs"], result["summary"]
        cells = ", ".join(
            f"{k}: eval {v['eval_loss']:.4f}+-{v['eval_loss_std']:.4f} in {v['optimizer_steps']} updates"
            for k, v in runs.items()
        )
        return (
            f"smith: {cells}; increasing vs decay {100 * s['eval_loss_rel_diff_increasing_vs_decay']:+.2f}% eval "
            f"loss, {s['update_ratio_decay_over_increasing']:.2f}x fewer updates (target met: {s['target_met']})"
        )
    if name == "keskar":
        sb, lb = result["runs"]["small_batch"], result["runs"]["large_batch"]
        return (
            f"keskar: SB(B={sb['batch_size']}) acc gap {sb['generalization_gap_accuracy']:.3f} lambda_max "
            f"{sb['sharpness']['lambda_max']:.4g} keskar {sb['sharpness']['keskar']:.4g}; LB(B={lb['batch_size']}) "
            f"acc gap {lb['generalization_gap_accuracy']:.3f} lambda_max {lb['sharpness']['lambda_max']:.4g} keskar "
            f"{lb['sharpness']['keskar']:.4g}; {result['summary']['verdict']}"
        )
    if name == "bjorck":
        s = result["summary"]
        return (
            f"bjorck: trainable LR range no BN {s['no_bn']['trainable_range']}, with BN {s['bn']['trainable_range']}; "
            f"diverged without BN at {s['no_bn']['diverged_lrs']}"
        )
    return "overheads:\n" + result["markdown"]


def _with_seed_offset(config, offset: int):
    return dataclasses.replace(config, seeds=tuple(seed + offset for seed in config.seeds))


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..errors import check_choice, check_positive

    check_choice("experiment", args.experiment, NAMES)
    check_positive("threads", args.threads)
    import torch
    from transformers.utils import logging as hf_logging

    from ..bench import (
        lm_report,
        lm_task,
        overheads,
        reproduce_bjorck,
        reproduce_critical_batch,
        reproduce_keskar,
        reproduce_seesaw,
        reproduce_smith,
    )

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    # "all" skips critical-batch: seesaw measures the same critical batch sizes
    names = [n for n in NAMES if n not in ("all", "critical-batch")] if args.experiment == "all" else [args.experiment]
    plot = not args.no_plots
    for name in names:
        start, cpu_start = time.perf_counter(), time.process_time()
        if name == "smith":
            config = reproduce_smith.SmithConfig.quick() if args.quick else reproduce_smith.SmithConfig()
            result = reproduce_smith.reproduce_smith(args.output_dir, _with_seed_offset(config, args.seed), plot=plot)
        elif name == "keskar":
            config = reproduce_keskar.KeskarConfig.quick() if args.quick else reproduce_keskar.KeskarConfig()
            config = _with_seed_offset(config, args.seed)
            result = reproduce_keskar.reproduce_keskar(args.output_dir, config, plot=plot)
        elif name == "bjorck":
            result = reproduce_bjorck.reproduce_bjorck(args.output_dir, quick=args.quick, rerun=not args.reuse_bjorck)
        elif name in ("seesaw", "critical-batch"):
            config = lm_task.LMConfig.quick() if args.quick else lm_task.LMConfig()
            config = _with_seed_offset(config, args.seed)
            if args.task:
                config = dataclasses.replace(config, tasks=(args.task,))
            if name == "seesaw":
                result = reproduce_seesaw.reproduce_seesaw(args.output_dir, config, plot=plot)
            else:
                result = reproduce_critical_batch.reproduce_critical_batch(args.output_dir, config, plot=plot)
            print(lm_report.headline(name, result), flush=True)
        else:
            result = overheads.gather_overheads(args.output_dir, rerun=args.rerun)
        if name not in ("seesaw", "critical-batch"):
            print(_headline(name, result), flush=True)
        print(
            f"  ({name}: {time.perf_counter() - start:.1f} s wall, {time.process_time() - cpu_start:.1f} s CPU "
            "in this process; the benchmark scripts of overheads --rerun are not counted)",
            flush=True,
        )
    return 0
