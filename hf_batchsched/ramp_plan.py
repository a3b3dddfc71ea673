"""The batch plan of a run and what a resume checks against it: a stable identity of the batch schedule for the
plan fingerprint saved with checkpoints (``hf_batchsched.checkpoint.PLAN_KEYS``), the global batch size of each
planned step, and the differences between a checkpoint's plan and this run's.

>>> resumed_plan_changes({"seed": 0}, {"seed": 0}, taken=[8, 8], from_start=[8, 16, 16], online=False, keys=["seed"])
['step 2, already taken, had batch size 8; this run plans 16']
"""

from __future__ import annotations

import contextlib
import functools
import json
import types
from collections.abc import Mapping, Sequence

from .checkpoint import PLAN_KEYS, plan_differences
from .errors import ConfigError

__all__ = [
    "check_resumed_plan",
    "check_training_left",
    "describe_schedule",
    "plan_fingerprint",
    "plan_summary",
    "resumed_plan_changes",
    "step_sizes",
]


def describe_schedule(schedule) -> object:
    """A JSON-ready identity of a batch schedule for the plan fingerprint: its config, else a stable name."""
    to_config = getattr(schedule, "to_config", None)
    if callable(to_config):
        with contextlib.suppress(NotImplementedError):
            return to_config()
    if isinstance(schedule, (types.FunctionType, types.MethodType, functools.partial)):
        function = schedule.func if isinstance(schedule, functools.partial) else schedule
        return f"{function.__module__}.{function.__qualname__}"
    text = repr(schedule)
    if " at 0x" in text:  # the default repr names an address, which differs between runs
        return f"{type(schedule).__module__}.{type(schedule).__qualname__}"
    return text


def step_sizes(sampler, steps: Sequence[tuple[int, int]]) -> list[int]:
    """The global batch size (samples) of each ``(first row, last row)`` step of a ``RampBatchSampler`` plan."""
    return [sampler.samples_before(last) - sampler.samples_before(first) for first, last in steps]


def resumed_plan_changes(
    saved: Mapping,
    current: Mapping,
    taken: list[int],
    from_start: list[int],
    *,
    online: bool,
    keys: Sequence[str] = PLAN_KEYS,
) -> list[str]:
    """What differs between a checkpoint's plan fingerprint (``saved``) and this run's (``current``); when nothing
    does and the schedule is a pure function of the clock (not ``online``), the first step already ``taken`` whose
    batch size this run's plan from the start (``from_start``) does not repeat."""
    changes = plan_differences(saved, current, keys)
    if not changes and not online and from_start[: len(taken)] != taken:
        step = next(i for i, size in enumerate(taken) if i >= len(from_start) or from_start[i] != size)
        planned = from_start[step] if step < len(from_start) else "no step"
        changes = [f"step {step + 1}, already taken, had batch size {taken[step]}; this run plans {planned}"]
    return changes


def plan_fingerprint(
    args,
    *,
    dataset_size: int,
    seed: int,
    batch_schedule,
    max_micro_batch_size: int,
    batch_size_multiple: int,
    rounding: str,
    sampling_strategy: str,
    couple,
) -> dict:
    """What a run's batch plan depends on, as it reads back from JSON (saved with every checkpoint). ``args``: the
    ``TrainingArguments``; ``couple``: ``None`` when the schedule itself says it, else its text."""
    cap = args.max_steps if args.max_steps > 0 else None
    fingerprint = {
        "dataset_size": dataset_size,
        "seed": seed,
        "batch_schedule": describe_schedule(batch_schedule),
        "world_size": args.world_size,
        "max_micro_batch_size": max_micro_batch_size,
        "batch_size_multiple": batch_size_multiple,
        "rounding": rounding,
        "num_train_epochs": None if cap else float(args.num_train_epochs),
        "max_steps": cap,
        "train_sampling_strategy": sampling_strategy,
        "dataloader_drop_last": bool(args.dataloader_drop_last),
        "couple": couple,
    }
    return json.loads(json.dumps(fingerprint, default=str))


def check_resumed_plan(changes: list[str], *, allow_change: bool, source: str) -> None:
    """Refuse a resume whose plan ``changes`` (``resumed_plan_changes``) were not allowed on purpose."""
    if changes and not allow_change:
        raise ConfigError(
            f"{source} does not match this run's batch plan ({'; '.join(changes)}): resuming would cut training "
            "short or train samples twice. Resume with the settings it was saved with, or pass "
            "allow_schedule_change_on_resume=True to continue from its clock with the new settings on purpose"
        )


def check_training_left(remaining: list[int], taken: list[int], consumed_samples: int, source: str) -> None:
    """Refuse a resume from a checkpoint that already covers the whole plan (``remaining`` is empty)."""
    if not remaining:
        raise ConfigError(
            f"{source} is at the end of training: its {len(taken)} steps and {consumed_samples} "
            "samples already cover this run's plan, so there is nothing left to train. To train further, raise "
            "num_train_epochs or max_steps and pass allow_schedule_change_on_resume=True"
        )


def plan_summary(plan: list[int], passes: float, num_rows: int, max_micro_batch_size: int, world_size: int) -> str:
    """The one line ``train()`` logs about its plan (``plan``: the global batch size of every step).

    >>> plan_summary([8, 8, 16], 1.0, 32, 4, 1).split(" (smallest")[0]
    'BatchRampTrainer: 3 optimizer steps, 32 samples (1 passes over 32 rows), global batch 8 -> 16'
    """
    text = (
        "BatchRampTrainer: %d optimizer steps, %d samples (%.4g passes over %d rows), global batch %d -> %d "
        "(smallest %d, largest %d), at most %d sequences per forward on each of %d rank(s)"
    )
    sizes = (len(plan), sum(plan), passes, num_rows, plan[0], plan[-1], min(plan), max(plan))
    return text % (*sizes, max_micro_batch_size, world_size)  # noqa: UP031 - the logger's %-style line, as before
