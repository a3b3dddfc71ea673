"""``hf-batchsched demo``: the offline demo, a small Llama trained on Python's language reference (cached), then
LoRA fine-tuned on Python's docstrings (see ``hf_batchsched.demo``)."""

from __future__ import annotations

import argparse
import os

__all__ = ["HELP", "add_arguments", "run"]

HELP = (
    "Offline demo: pretrain a small Llama on Python's language reference (cached), then LoRA fine-tune it on "
    "Python's docstrings with a batch ramp, plots and summary."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="outputs/demo", help="where events, plots and the adapter go")
    parser.add_argument("--fast", action="store_true", help="reduced budget for CI: 60 base and 40 fine-tuning steps")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be a positive number of optimizer steps, got {args.max_steps}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    from ..demo import format_summary, run_demo

    hf_logging.set_verbosity_error()
    if args.no_progress:
        hf_logging.disable_progress_bar()  # also the weight save/load bars around the base model
    result = run_demo(
        output_dir=args.output_dir, max_steps=args.max_steps, fast=args.fast, show_progress=not args.no_progress
    )
    print(format_summary(result))
    return 0
