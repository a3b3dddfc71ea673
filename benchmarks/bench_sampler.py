"""RampBatchSampler planning and length counting, timed side by side with the per-step algorithm they replace.

1. ``plan()`` of a token-clocked ramp (global batch 64 -> 128 rows by consumed tokens) over ``--rows`` rows
   (default 1M, lengths 16..512 tokens), for one and for three passes; plus ``len()`` and one full iteration.
   Goal: ``plan()`` at 1M rows < 2 s.
2. Scaling: ``plan()`` at N, 2N, 4N rows (default N = 10k) next to the previous algorithm, which re-drew the pass
   permutation for every step (``torch.randperm(N)`` per step, quadratic); the ratio of times for doubled N shows
   linear (~2x) vs quadratic (~4x) growth.
3. ``sample_lengths`` on a ``datasets.Dataset`` of ``--tokens`` (default 10M) attention-mask tokens: the vectorised
   Arrow pass vs the previous ``[int(sum(mask)) for mask in dataset["attention_mask"]]``.

Usage::

    python benchmarks/bench_sampler.py [--rows 1000000] [--scaling-rows 10000] [--tokens 10000000]

Writes ``benchmarks/results/sampler.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from hf_batchsched.data import RampBatchSampler, sample_lengths  # noqa: E402
from hf_batchsched.schedules.batch import PiecewiseBatch  # noqa: E402


def token_ramp(lengths: np.ndarray) -> PiecewiseBatch:
    """Global batch 64 rows, then 128 from half of one pass's tokens on (the issue's B=64 measurement)."""
    return PiecewiseBatch.parse(f"0:64 {int(lengths.sum()) // 2}:128", unit="tokens")


def timed(function, repeats: int = 1) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def per_step_plan(num_rows: int, schedule, lengths: torch.Tensor, seed: int = 0) -> list[int]:
    """The previous planner: every step re-drew its pass's permutation to sum the tokens of its rows."""
    sizes, samples, tokens = [], 0, 0
    while samples < num_rows:
        size = min(int(schedule(tokens)), num_rows - samples)
        pieces, position = [], samples
        while position < samples + size:
            pass_index, offset = divmod(position, num_rows)
            order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + pass_index))
            take = min(samples + size - position, num_rows - offset)
            pieces.append(order[offset : offset + take])
            position += take
        tokens += int(lengths[torch.cat(pieces)].sum())
        samples += size
        sizes.append(size)
    return sizes


def mask_dataset(num_tokens: int, seed: int = 0):
    """A ``datasets.Dataset`` whose ``attention_mask`` column holds ``num_tokens`` values in rows of 16..512."""
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    generator = np.random.default_rng(seed)
    lengths = generator.integers(16, 513, size=num_tokens // 264 + 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), num_tokens) + 1]
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    values = (generator.random(int(offsets[-1])) < 0.9).astype(np.int8)
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    return Dataset(InMemoryTable(pa.table({"attention_mask": column}))), lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--scaling-rows", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=10_000_000)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "sampler.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict = {"config": vars(args)}

    lengths = np.random.default_rng(0).integers(16, 513, size=args.rows)
    schedule = token_ramp(lengths)
    plans = {}
    for passes in (1, 3):
        sampler = RampBatchSampler(args.rows, schedule, lengths=lengths, total_rows=passes * args.rows)
        seconds, plan = timed(sampler.plan)
        length_seconds, _ = timed(lambda sampler=sampler: len(sampler))
        plans[f"{passes}_pass"] = {"plan_s": round(seconds, 3), "len_s": round(length_seconds, 3), "steps": len(plan)}
        print(f"plan() of {passes} pass(es) over {args.rows:,} rows: {seconds:.3f} s ({len(plan):,} steps), "
              f"len() {length_seconds:.3f} s")  # fmt: skip
    sampler = RampBatchSampler(args.rows, schedule, lengths=lengths, total_rows=args.rows)
    iterate_seconds, count = timed(lambda: sum(1 for _ in sampler))
    plans["1_pass"]["iterate_s"] = round(iterate_seconds, 3)
    print(f"one full iteration ({count:,} index lists): {iterate_seconds:.3f} s")
    results["plan_at_rows"] = plans
    results["plan_goal_met"] = plans["1_pass"]["plan_s"] < 2.0

    scaling = []
    for factor in (1, 2, 4):
        rows = factor * args.scaling_rows
        small = np.random.default_rng(1).integers(16, 513, size=rows)
        small_schedule = token_ramp(small)
        ours, plan = timed(RampBatchSampler(rows, small_schedule, lengths=small).plan, repeats=3)
        as_tensor = torch.as_tensor(small)
        before, reference = timed(functools.partial(per_step_plan, rows, small_schedule, as_tensor))
        assert plan == reference, "the linear planner must lay out the steps of the per-step one"
        scaling.append({"rows": rows, "steps": len(plan), "plan_s": round(ours, 6),
                        "per_step_plan_s": round(before, 4), "speedup": round(before / ours, 1)})  # fmt: skip
        print(f"N={rows:,}: plan() {ours:.4f} s, per-step randperm planner {before:.3f} s ({before / ours:.0f}x)")
    for previous, current in zip(scaling, scaling[1:]):
        current["growth_plan"] = round(current["plan_s"] / previous["plan_s"], 2)
        current["growth_per_step_plan"] = round(current["per_step_plan_s"] / previous["per_step_plan_s"], 2)
        print(f"N x2 -> {current['rows']:,}: plan() x{current['growth_plan']}, per-step x"
              f"{current['growth_per_step_plan']}")  # fmt: skip
    results["scaling"] = scaling

    dataset, expected = mask_dataset(args.tokens)
    vectorised, counted = timed(lambda: sample_lengths(dataset), repeats=3)
    python_lists, reference = timed(lambda: [int(sum(mask)) for mask in dataset["attention_mask"]])
    assert counted.tolist() == reference
    results["sample_lengths"] = {
        "rows": len(dataset), "tokens": int(expected.sum()), "vectorised_s": round(vectorised, 3),
        "python_lists_s": round(python_lists, 3), "speedup": round(python_lists / vectorised, 1),
    }  # fmt: skip
    print(f"sample_lengths over {int(expected.sum()):,} tokens ({len(dataset):,} rows): {vectorised:.3f} s "
          f"vectorised, {python_lists:.3f} s as Python lists ({python_lists / vectorised:.0f}x)")  # fmt: skip

    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(results, file, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
