"""The batch plan of a run and what a resume checks against it: a stable identity of the batch schedule for the
plan fingerprint saved with checkpoints (``hf_batchsched.checkpoint.PLAN_KEYS``), the global batch size of each
planned step, and the differences between a checkpoint's plan and this run's.

>>> resumed_plan_changes({"seed": 0}, {"seed": 0}, taken=[8, 8], from_start=[8, 16, 16], online=False, keys=["seed"])
['step 2, already taken, had batch size 8; this run plans 16']
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Mapping, Sequence

from .checkpoint import PLAN_KEYS, plan_differences

__all__ = ["describe_schedule", "resumed_plan_changes", "step_sizes"]


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
