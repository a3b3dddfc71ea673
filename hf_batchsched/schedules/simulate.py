"""``simulate``: lay out the optimizer steps of a run under a batch schedule (the Trainer's horizon, the plots).

>>> from hf_batchsched.schedules.batch import PiecewiseBatch
>>> run = simulate(PiecewiseBatch.parse("0:32 2K:64 8K:128"), total_samples=10_000)
>>> run.num_steps, run.step_sizes[:3], run.step_sizes[-2:]
(173, [32, 32, 32], [128, 48])
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from ..errors import ConfigError
from .batch_base import BatchSchedule, RoundedBatch, _is_number, _positive_number
from .batch_config import batch_schedule_from_config

__all__ = ["SimulatedRun", "simulate"]


@dataclass(frozen=True)
class SimulatedRun:
    """The optimizer steps of a run under a batch schedule (see ``simulate``).

    Attributes:
        step_sizes (`list[int]`): the global batch size (samples) of each optimizer step.
        consumed (`list[int]`): samples consumed **after** each step (cumulative; ``consumed[-1]`` is the total).
        total_samples (`int`): the samples the run was asked to cover.
        dropped_samples (`int`): samples of the tail left out (``drop_last=True``) or not reached (``max_steps``).
        tokens_per_sample (`float`, *optional*): for a ``tokens`` clock, the tokens per sample used.
        last_step_scheduled (`int`, *optional*): the scheduled size of the last step when it was cut short to the
            remaining samples (``None`` when every step is full).
    """

    step_sizes: list[int]
    consumed: list[int]
    total_samples: int
    dropped_samples: int = 0
    tokens_per_sample: float | None = None
    last_step_scheduled: int | None = None

    @property
    def num_steps(self) -> int:
        return len(self.step_sizes)

    @property
    def samples_consumed(self) -> int:
        return self.consumed[-1] if self.consumed else 0

    def steps_done_at(self, samples: float) -> int:
        """Optimizer steps completed once ``samples`` samples have been consumed."""
        return bisect.bisect_right(self.consumed, samples)

    def step_index_at(self, samples: float) -> int:
        """Index of the step during which sample number ``samples`` (0-based) is consumed; the last step's index at
        or past the end."""
        return min(bisect.bisect_right(self.consumed, samples), max(self.num_steps - 1, 0))

    def step_start(self, index: int) -> int:
        """Samples consumed before step ``index`` (its clock reading)."""
        return self.consumed[index - 1] if index > 0 else 0

    def batch_size_at(self, samples: float) -> int | None:
        """The size of the step during which sample number ``samples`` (0-based) is consumed, or ``None`` past
        the end."""
        index = bisect.bisect_right(self.consumed, samples)
        return self.step_sizes[index] if index < len(self.step_sizes) else None


def simulate(
    schedule: BatchSchedule,
    total_samples: int,
    *,
    multiple: int = 1,
    max_steps: int | None = None,
    tokens_per_sample: float | None = None,
    drop_last: bool = False,
) -> SimulatedRun:
    """Lay out the optimizer steps that cover ``total_samples`` samples under ``schedule``.

    Step ``i`` starts at the clock reading ``c_i`` (consumed samples, or ``c_i * tokens_per_sample`` tokens
    for a ``tokens`` schedule) and takes ``schedule(c_i)`` samples (rounded down to a multiple of
    ``multiple`` when it is > 1). The last step is **partial** by default: it takes the ``total_samples - c``
    samples that remain, which may be fewer than the schedule's size and not a multiple of ``multiple``;
    with ``drop_last=True`` that tail is dropped instead (``dropped_samples`` counts it). ``max_steps`` stops
    the run early (the rest counts as dropped), as the Trainer's ``max_steps`` caps ``num_train_epochs``.

    Args:
        schedule (`BatchSchedule`): the batch schedule.
        total_samples (`int`): samples to cover (e.g. ``num_train_epochs * len(dataset)``).
        multiple (`int`, *optional*, defaults to `1`): round sizes down to multiples of it.
        max_steps (`int`, *optional*): stop after this many optimizer steps.
        tokens_per_sample (`float`, *optional*): tokens per sample; required for a ``tokens`` schedule.
        drop_last (`bool`, *optional*, defaults to `False`): drop a final partial step instead of keeping it.

    >>> from hf_batchsched.schedules.batch import ConstantBatch, LinearRampBatch
    >>> run = simulate(LinearRampBatch(16, 16, 96, 48), total_samples=200)
    >>> run.step_sizes, run.consumed, run.num_steps
    ([16, 16, 16, 32, 32, 48, 40], [16, 32, 48, 80, 112, 160, 200], 7)
    >>> simulate(ConstantBatch(64), 200, drop_last=True).dropped_samples
    8
    """
    if not isinstance(schedule, BatchSchedule):
        schedule = batch_schedule_from_config(schedule)
    if schedule.online:
        raise ConfigError(
            f"{type(schedule).__name__} grows the batch from the gradient noise scale measured during training, so "
            f"its sizes cannot be simulated or plotted ahead of time; plot a fixed schedule instead (its starting "
            f"size is {schedule.min_size}) and read batchsched/batch_size from the run's logs"
        )
    if not _is_number(total_samples) or total_samples < 0 or total_samples != int(total_samples):
        raise ConfigError(f"total_samples must be an integer >= 0, got {total_samples!r}")
    total_samples = int(total_samples)
    if multiple != 1:
        schedule = RoundedBatch(schedule, multiple, mode="down")
    if max_steps is not None and (not _is_number(max_steps) or max_steps < 0 or max_steps != int(max_steps)):
        raise ConfigError(f"max_steps must be an integer >= 0 or None, got {max_steps!r}")
    scale = 1.0
    if schedule.unit == "tokens":
        if tokens_per_sample is None:
            raise ConfigError(
                "this batch schedule counts tokens; pass tokens_per_sample (e.g. the sequence length) to simulate it"
            )
        scale = _positive_number("tokens_per_sample", tokens_per_sample)
    sizes: list[int] = []
    consumed: list[int] = []
    done = 0
    cut_short = None
    limit = math.inf if max_steps is None else int(max_steps)
    while done < total_samples and len(sizes) < limit:
        size = schedule(done * scale)
        if done + size > total_samples:
            if drop_last:
                break
            cut_short, size = size, total_samples - done
        done += size
        sizes.append(size)
        consumed.append(done)
    return SimulatedRun(sizes, consumed, total_samples, total_samples - done, tokens_per_sample, cut_short)
