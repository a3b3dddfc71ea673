"""Tokens processed per step by the ramp's micro-chunks / by a plain Trainer with gradient accumulation.

A plain ``Trainer`` at ``gradient_accumulation_steps=k`` collates each micro-batch of ``m`` rows on its own, so each
forward is as wide as its own longest row. The ramp collates the whole step batch (``k * m`` rows, padded to the
step's longest row) and ``split_micro_chunks`` cuts it into chunks of ``m`` rows, trimming each chunk's padding.
Both see the same rows in the same order; the figure is the sum over forwards of ``rows x columns``.

Measured for right and left padding, with leading padding trimmed (what the trainer does when its one-time check
finds the model's outputs unchanged, e.g. sdpa attention) and kept (eager attention; and the behaviour before
leading trimming existed), at ``k`` = 4 and 32, on long-tailed lengths (log-normal, median 64, clipped to
8..1024 tokens). Goal: 1.00 for both paddings.

Usage::

    python benchmarks/bench_padding.py [--steps 200] [--micro 4]

Writes ``benchmarks/results/padding.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from hf_batchsched.batching import split_micro_chunks  # noqa: E402


def collate(lengths: list[int], side: str) -> dict:
    """A padded LM batch (pad 0, label -100) of rows with these lengths, padded on ``side``."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        columns = slice(0, length) if side == "right" else slice(width - length, width)
        ids[row, columns] = torch.arange(3, 3 + length) % 120 + 3
    mask = (ids != 0).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def tokens_processed(chunks: list[dict]) -> int:
    return sum(chunk["input_ids"].numel() for chunk in chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "padding.json"))
    args = parser.parse_args()
    generator = np.random.default_rng(args.seed)
    results: dict = {"config": vars(args), "ratios": {}}
    for accumulation in (4, 32):
        rows = accumulation * args.micro
        lengths = np.clip(generator.lognormal(np.log(64), 1.0, size=(args.steps, rows)), 8, 1024).astype(int)
        for side in ("right", "left"):
            plain = ours = kept = 0
            for step in lengths.tolist():
                plain += sum(
                    tokens_processed([collate(step[start : start + args.micro], side)])
                    for start in range(0, rows, args.micro)
                )
                batch = collate(step, side)
                ours += tokens_processed(split_micro_chunks(batch, args.micro, trim_leading=True))
                kept += tokens_processed(split_micro_chunks(batch, args.micro, trim_leading=False))
            entry = {"leading_trimmed": round(ours / plain, 4), "leading_kept": round(kept / plain, 4)}
            results["ratios"][f"k{accumulation}_{side}"] = entry
            print(f"k={accumulation:2d} ({rows} rows per step), {side:5s} padding: ramp / plain Trainer tokens "
                  f"{entry['leading_trimmed']:.4f} (leading padding kept: {entry['leading_kept']:.4f})")  # fmt: skip
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(results, file, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
