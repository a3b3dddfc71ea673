"""A small Bjorck et al. (2018) experiment: a deep plain MLP on digits, with and without BatchNorm, across LRs.

"Understanding Batch Normalization" (https://arxiv.org/abs/1806.02375) finds that BN's benefit is the larger
learning rate it allows. The experiment lives in the package (``hf_batchsched.bench.reproduce_bjorck``, whose
docstring describes the model, data, grid and per-run measurements; ``hf-batchsched reproduce bjorck`` runs it
too); this script is its command line.

Run: ``.venv/bin/python benchmarks/bench_bjorck.py`` (writes benchmarks/results/bjorck.json and bjorck.png);
``--steps 20 --depth 4`` is the quick setting.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hf_batchsched.bench.reproduce_bjorck import write_bjorck_sweep

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS / "bjorck.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    write_bjorck_sweep(args.out, depth=args.depth, width=args.width, steps=args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
