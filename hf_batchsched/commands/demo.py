"""``hf-batchsched demo``: the offline demo, a small Llama trained on Python's language reference (cached), then
LoRA fine-tuned on the source code of Python's standard library (see ``hf_batchsched.demo``)."""

from __future__ import annotations

import argparse
import os

__all__ = ["HELP", "add_arguments", "run"]

HELP = (
    "Offline demo: pretrain a small Llama on Python's language reference (cached), then LoRA fine-tune it on "
    "standard-library source code with a batch ramp, plots and summary."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="outputs/demo", help="where events, plots and the adapter go")
    parser.add_argument("--fast", action="store_true", help="reduced budget for CI: 60 base and 40 fine-tuning steps")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the model is tiny, and on a busy machine two threads stall each other)",
    )


def run(args: argparse.Namespace) -> int:
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be a positive number of optimizer steps, got {args.max_steps}")
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers.utils import logging as hf_logging

    from ..demo import format_summary, run_demo

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    if args.no_progress:
        hf_logging.disable_progress_bar()  # also the weight save/load bars around the base model
    result = run_demo(
        output_dir=args.output_dir, max_steps=args.max_steps, fast=args.fast, show_progress=not args.no_progress
    )
    print(format_summary(result))
    return 0
