"""``hf-batchsched reproduce``: rerun the seed papers' experiments and the overhead table (see ``bench.reproduce``).

Usage::

    hf-batchsched reproduce {smith,keskar,bjorck,overheads,all} [--output-dir DIR] [--quick] [--rerun]
"""

from __future__ import annotations

import argparse
import json
import os

__all__ = ["HELP", "NAMES", "add_arguments", "run"]

HELP = "Reproduce Smith 2018 (batch ramp), Keskar 2017 (sharpness), Bjorck 2018 (BN) on CPU; gather overheads."

NAMES = ("smith", "keskar", "bjorck", "overheads", "all")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help=f"one of {', '.join(NAMES)}")
    parser.add_argument("--output-dir", default="benchmarks/results", help="where <experiment>.json and the PNGs go")
    parser.add_argument("--quick", action="store_true", help="tiny settings that run in seconds (for tests/CI)")
    parser.add_argument(
        "--rerun", action="store_true", help="overheads/all: rerun benchmarks/bench_*.py before gathering"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and data order")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machines)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")


def _headline(name: str, result: dict) -> str:
    if name == "smith":
        runs = result["runs"]
        cells = ", ".join(f"{k}: eval {v['eval_loss']:.4f} in {v['optimizer_steps']} updates" for k, v in runs.items())
        s = result["summary"]
        return (
            f"smith: {cells}; increasing vs decay {100 * s['eval_loss_rel_diff_increasing_vs_decay']:+.2f}% eval loss, "
            f"{s['update_ratio_decay_over_increasing']:.2f}x fewer updates (target met: {s['target_met']})"
        )
    if name == "keskar":
        sb, lb = result["runs"]["small_batch"], result["runs"]["large_batch"]
        return (
            f"keskar: SB(B={sb['batch_size']}) gap {sb['generalization_gap_loss']:.4f} lambda_max "
            f"{sb['sharpness']['lambda_max']:.4g} keskar {sb['sharpness']['keskar']:.4g}; LB(B={lb['batch_size']}) gap "
            f"{lb['generalization_gap_loss']:.4f} lambda_max {lb['sharpness']['lambda_max']:.4g} keskar "
            f"{lb['sharpness']['keskar']:.4g}; paper direction holds: {result['summary']['paper_direction_holds']}"
        )
    if name == "overheads":
        return "overheads:\n" + result["markdown"]
    return f"{name}: " + json.dumps(result.get("summary", {}))[:400]


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..errors import check_choice

    check_choice("experiment", args.experiment, NAMES)
    import torch
    from transformers.utils import logging as hf_logging

    from ..bench import reproduce

    hf_logging.set_verbosity_error()
    torch.set_num_threads(max(1, args.threads))
    names = [n for n in NAMES if n != "all"] if args.experiment == "all" else [args.experiment]
    plot = not args.no_plots
    for name in names:
        if name == "smith":
            config = reproduce.SmithConfig.quick() if args.quick else reproduce.SmithConfig()
            result = reproduce.reproduce_smith(
                args.output_dir, config.__class__(**{**config.__dict__, "seed": args.seed}), plot=plot
            )
        elif name == "keskar":
            config = reproduce.KeskarConfig.quick() if args.quick else reproduce.KeskarConfig()
            result = reproduce.reproduce_keskar(
                args.output_dir, config.__class__(**{**config.__dict__, "seed": args.seed}), plot=plot
            )
        elif name == "bjorck":
            result = reproduce.reproduce_bjorck(args.output_dir, quick=args.quick, rerun=args.rerun or args.quick)
        else:
            result = reproduce.gather_overheads(args.output_dir, rerun=args.rerun)
        print(_headline(name, result), flush=True)
    return 0
