"""The batch-size leaves: constant, piecewise (Megatron), linear ramp (Megatron) and geometric (Smith et al.).

A ``BatchSchedule`` maps a clock reading ``consumed`` (samples, or tokens, seen before a step) to the
**global** batch size of the optimizer step that starts there, always counted in samples (sequences), as
Megatron-LM's ``--rampup-batch-size`` and ``--step-batch-size-schedule`` do. ``unit`` says what
``consumed`` and every threshold count: ``"samples"`` or ``"tokens"``.

The schedules registered in ``BATCH_SCHEDULES`` (``schedules.batch_config``); the first four are this module's:

==============  =======================================  ============================================
name            class                                    shape
==============  =======================================  ============================================
``constant``    ``ConstantBatch(size)``                  one size
``piecewise``   ``PiecewiseBatch.parse("0:32 2M:64")``   Megatron's ``--step-batch-size-schedule``
``linear_ramp`` ``LinearRampBatch(start, increment,      Megatron's ``--rampup-batch-size``: a
                ramp_samples, final)``                   staircase from ``start`` to ``final``
``geometric``   ``GeometricBatch(start, factor,          Smith et al. 2018: ``x factor`` at each
                milestones, max_size)``                  milestone, capped at ``max_size``
``equivalent_`` ``equivalent_to_lr(lr_policy, ...)[0]``  Smith et al. 2018: the batch growth that
``to_lr``       (``schedules.smith.LRMatchedBatch``)     replaces an LR policy's decay
``adaptive``    ``AdaptiveBatchSchedule(min_size,        McCandlish et al. 2018: grows while the
                max_size, ...)`` (``schedules.adaptive``) measured noise scale exceeds the batch
``seesaw``      ``seesaw(lr_policy, ...)[0]``            Meterez et al. 2025: LR x sqrt(a) and batch
                (``schedules.seesaw_pair.SeesawBatch``)  x 1/a where the LR policy decays by a
==============  =======================================  ============================================

``adaptive`` is *online* (``schedule.online``): its sizes depend on gradient noise measured during training, so
``simulate`` (and ``hf-batchsched plot``) refuse it; every other schedule is a pure function of the clock.

The contract (``BatchSchedule``) and the one rounding (``RoundedBatch``, ``schedule.rounded(multiple)``) are in
``schedules.batch_base``; the registry and configs in ``schedules.batch_config``; ``simulate`` (the optimizer steps
of a run) in ``schedules.simulate``; ``equivalent_to_lr`` (Smith et al.) in ``schedules.smith``.

Example:

>>> schedule = PiecewiseBatch.parse("0:32 2K:64 8K:128")
>>> [schedule(c) for c in (0, 1999, 2000, 8000, 10**6)]
[32, 32, 64, 128, 128]
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from .batch_base import _SUFFIXES, BatchSchedule, _check_batch_unit, _positive_int, _positive_number, parse_quantity

__all__ = ["ConstantBatch", "GeometricBatch", "LinearRampBatch", "PiecewiseBatch"]


@dataclass(frozen=True)
class ConstantBatch(BatchSchedule):
    """One batch size for the whole run.

    Args:
        size (`int`): the global batch size in samples.
        unit (`str`, *optional*, defaults to `"samples"`): the clock's unit (``"samples"`` or ``"tokens"``).

    >>> ConstantBatch(64)(0), ConstantBatch(64)(1e9)
    (64, 64)
    """

    size: int
    unit: str = "samples"

    def __post_init__(self):
        object.__setattr__(self, "size", _positive_int("constant batch size", self.size))
        _check_batch_unit(self.unit)

    def __call__(self, consumed: float) -> int:
        self._check_consumed(consumed)
        return self.size

    @property
    def min_size(self) -> int:
        return self.size

    @property
    def max_size(self) -> int:
        return self.size

    def to_config(self) -> dict:
        return {"name": "constant", "unit": self.unit, "size": self.size}


@dataclass(frozen=True)
class PiecewiseBatch(BatchSchedule):
    """Piecewise-constant batch size: ``sizes[i]`` from ``thresholds[i]`` (inclusive) to ``thresholds[i + 1]``.

    The string form is Megatron-LM's ``--step-batch-size-schedule``: space- (or comma-) separated
    ``threshold:size`` pairs, thresholds with optional K/M/B/T suffixes (1e3/1e6/1e9/1e12) in ``unit``,
    starting at 0 and strictly increasing.

    Args:
        thresholds (`Sequence[float]`): where each size starts, in ``unit``; ``thresholds[0]`` must be 0.
        sizes (`Sequence[int]`): the global batch sizes (samples); need not increase.
        unit (`str`, *optional*, defaults to `"samples"`): ``"samples"`` or ``"tokens"``.

    >>> schedule = PiecewiseBatch.parse("0:768 250B:1536 500B:3072", unit="tokens")
    >>> [schedule(t) for t in (0, 249.9e9, 250e9, 1e12)], schedule.min_size, schedule.max_size
    ([768, 768, 1536, 3072], 768, 3072)
    >>> PiecewiseBatch.parse("0:32 8M:64 2M:128")
    Traceback (most recent call last):
    ...
    hf_batchsched.errors.ConfigError: batch schedule thresholds must strictly increase, got 0, 8M, 2M (8M then 2M)
    """

    thresholds: tuple[float, ...]
    sizes: tuple[int, ...]
    unit: str = "samples"

    def __post_init__(self):
        _check_batch_unit(self.unit)
        thresholds = tuple(self.thresholds) if isinstance(self.thresholds, Sequence) else ()
        sizes = tuple(self.sizes) if isinstance(self.sizes, Sequence) else ()
        if not thresholds or len(thresholds) != len(sizes):
            raise ConfigError(
                f"a piecewise batch schedule needs as many thresholds as sizes (at least one each), got "
                f"{self.thresholds!r} and {self.sizes!r}"
            )
        thresholds = tuple(parse_quantity(t) for t in thresholds)
        if thresholds[0] != 0:
            raise ConfigError(
                f"a piecewise batch schedule must start at threshold 0, got {_fmt(thresholds[0])}; "
                "add '0:<size>' first"
            )
        for before, after in zip(thresholds, thresholds[1:]):
            if not after > before:
                listed = ", ".join(_fmt(t) for t in thresholds)
                raise ConfigError(
                    f"batch schedule thresholds must strictly increase, got {listed} "
                    f"({_fmt(before)} then {_fmt(after)})"
                )
        sizes = tuple(_positive_int(f"batch size at threshold {_fmt(t)}", s) for t, s in zip(thresholds, sizes))
        object.__setattr__(self, "thresholds", thresholds)
        object.__setattr__(self, "sizes", sizes)

    @classmethod
    def parse(cls, spec: str, unit: str = "samples") -> PiecewiseBatch:
        """Parse Megatron's ``"0:32 2M:64 8M:128"`` syntax."""
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"a batch schedule string looks like '0:32 2M:64 8M:128', got {spec!r}")
        thresholds, sizes = [], []
        for entry in re.split(r"[\s,]+", spec.strip()):
            threshold, sep, size = entry.partition(":")
            if not sep:
                raise ConfigError(
                    f"batch schedule entry {entry!r} in {spec!r} is not 'threshold:size'; "
                    "write e.g. '0:32 2M:64 8M:128'"
                )
            try:
                size_value = float(size)
            except ValueError:
                raise ConfigError(f"batch size {size!r} in entry {entry!r} is not a number") from None
            thresholds.append(parse_quantity(threshold))
            sizes.append(size_value)
        return cls(tuple(thresholds), tuple(sizes), unit=unit)

    @classmethod
    def from_config(
        cls, *, schedule: str | None = None, thresholds=None, sizes=None, unit: str = "samples"
    ) -> PiecewiseBatch:
        """From a config: ``schedule`` (Megatron's string) or ``thresholds`` + ``sizes``."""
        if schedule is not None:
            if thresholds is not None or sizes is not None:
                raise ConfigError("give a piecewise batch schedule either as 'schedule' or as 'thresholds' + 'sizes'")
            return cls.parse(schedule, unit=unit)
        if thresholds is None or sizes is None:
            raise ConfigError(
                "a piecewise batch schedule needs 'schedule' (e.g. '0:32 2M:64') or 'thresholds' + 'sizes'"
            )
        return cls(tuple(thresholds), tuple(sizes), unit=unit)

    def __call__(self, consumed: float) -> int:
        self._check_consumed(consumed)
        return self.sizes[bisect.bisect_right(self.thresholds, consumed) - 1]

    @property
    def min_size(self) -> int:
        return min(self.sizes)

    @property
    def max_size(self) -> int:
        return max(self.sizes)

    @property
    def spec(self) -> str:
        """The Megatron-style string of this schedule."""
        return " ".join(f"{_fmt(t)}:{s}" for t, s in zip(self.thresholds, self.sizes))

    def to_config(self) -> dict:
        return {"name": "piecewise", "unit": self.unit, "schedule": self.spec}


def _fmt(value: float) -> str:
    """Shortest K/M/B/T form of a threshold: ``2000000 -> '2M'``, ``1500 -> '1.5K'``."""
    for suffix in ("T", "B", "M", "K"):
        scaled = value / _SUFFIXES[suffix]
        if abs(value) >= _SUFFIXES[suffix] and abs(scaled - round(scaled, 6)) < 1e-9:
            return f"{round(scaled, 6):g}{suffix}"
    return f"{value:g}"


@dataclass(frozen=True)
class LinearRampBatch(BatchSchedule):
    """Megatron-LM's ``--rampup-batch-size <start> <increment> <ramp_samples>`` towards ``final``.

    The ramp has ``(final - start) / increment`` intervals, each ``ramp_samples / num_increments`` long; in
    interval ``i`` (counted from 0) the size is ``start + i * increment``; after ``ramp_samples`` it is
    ``final``. As in Megatron, ``final - start`` must be a multiple of ``increment``.

    Args:
        start (`int`): the first batch size.
        increment (`int`): the size added at each interval.
        ramp_samples (`float`): the ramp's length in ``unit`` (Megatron's third number).
        final (`int`): the batch size after the ramp (Megatron's ``--global-batch-size``).
        unit (`str`, *optional*, defaults to `"samples"`): ``"samples"`` or ``"tokens"``.

    Megatron's docstring example: ``[16, 8, 300000]`` to 1024 is 126 intervals of about 2380 samples.

    >>> ramp = LinearRampBatch(16, 8, 300_000, 1024)
    >>> ramp.num_increments, round(ramp.interval, 2)
    (126, 2380.95)
    >>> [ramp(c) for c in (0, 2380, 2381, 150_000, 299_999, 300_000, 300_001)]
    [16, 16, 24, 520, 1016, 1024, 1024]
    """

    start: int
    increment: int
    ramp_samples: float
    final: int
    unit: str = "samples"

    def __post_init__(self):
        _check_batch_unit(self.unit)
        start = _positive_int("ramp start batch size", self.start)
        increment = _positive_int("ramp increment", self.increment)
        final = _positive_int("final batch size", self.final)
        ramp = _positive_number("ramp_samples", parse_quantity(self.ramp_samples))
        if final < start:
            raise ConfigError(f"final batch size {final} is below the ramp's start {start}; a ramp must grow")
        if (final - start) % increment:
            raise ConfigError(
                f"final - start = {final - start} is not a multiple of the increment {increment} "
                f"(Megatron's rule); pick e.g. final = {start + (final - start) // increment * increment}"
            )
        for name, value in (("start", start), ("increment", increment), ("ramp_samples", ramp), ("final", final)):
            object.__setattr__(self, name, value)

    @property
    def num_increments(self) -> int:
        return (self.final - self.start) // self.increment

    @property
    def interval(self) -> float:
        """Length of one interval of the staircase in ``unit``."""
        return self.ramp_samples / max(self.num_increments, 1)

    def __call__(self, consumed: float) -> int:
        self._check_consumed(consumed)
        if consumed >= self.ramp_samples or self.num_increments == 0:
            return self.final
        return min(self.start + int(consumed / self.interval) * self.increment, self.final)

    @property
    def min_size(self) -> int:
        return self.start

    @property
    def max_size(self) -> int:
        return self.final

    def to_config(self) -> dict:
        return {
            "name": "linear_ramp",
            "unit": self.unit,
            "start": self.start,
            "increment": self.increment,
            "ramp_samples": self.ramp_samples,
            "final": self.final,
        }


@dataclass(frozen=True)
class GeometricBatch(BatchSchedule):
    """Smith et al.'s schedule: multiply the batch by ``factor`` at each milestone, capped at ``max_size``:
    ``min(round(start * factor ** n), max_size)`` with ``n`` the number of milestones ``<= consumed``.

    Args:
        start (`int`): the initial batch size.
        factor (`float`): the growth factor per milestone (> 1; Smith et al. use 5).
        milestones (`Sequence[float]`): strictly increasing, positive milestones in ``unit`` (K/M/B/T allowed).
        max_size (`int`): the cap (Smith et al.: about N/10, 5120 for CIFAR-10).
        unit (`str`, *optional*, defaults to `"samples"`): ``"samples"`` or ``"tokens"``.

    CIFAR-10 in the paper: 128 -> 640 -> 3200 -> 5120 (capped) at epochs 60, 120, 160 of N = 50,000 samples:

    >>> smith = GeometricBatch(128, 5, [3_000_000, 6_000_000, 8_000_000], max_size=5120)
    >>> [smith(epoch * 50_000) for epoch in (0, 60, 120, 160, 199)]
    [128, 640, 3200, 5120, 5120]
    """

    start: int
    factor: float
    milestones: tuple[float, ...]
    max_size: int
    unit: str = "samples"

    def __post_init__(self):
        _check_batch_unit(self.unit)
        start = _positive_int("geometric start batch size", self.start)
        factor = _positive_number("geometric factor", self.factor)
        if factor < 1:
            raise ConfigError(f"geometric factor must be >= 1 (the batch grows), got {factor!r}")
        cap = _positive_int("geometric max_size", self.max_size)
        if cap < start:
            raise ConfigError(f"geometric max_size {cap} is below the start batch size {start}; raise max_size")
        if isinstance(self.milestones, (str, bytes)) or not isinstance(self.milestones, Sequence):
            raise ConfigError(f"geometric milestones must be a list of increasing numbers, got {self.milestones!r}")
        milestones = tuple(parse_quantity(m) for m in self.milestones)
        if any(not m > 0 for m in milestones):
            raise ConfigError(f"geometric milestones must be > 0, got {list(self.milestones)}")
        if any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ConfigError(f"geometric milestones must strictly increase, got {list(self.milestones)}")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "factor", factor)
        object.__setattr__(self, "max_size", cap)
        object.__setattr__(self, "milestones", milestones)

    def __call__(self, consumed: float) -> int:
        self._check_consumed(consumed)
        steps = bisect.bisect_right(self.milestones, consumed)
        return min(round(self.start * self.factor**steps), self.max_size)

    @property
    def min_size(self) -> int:
        return self.start

    # ``max_size`` is the dataclass field (the cap), which is the bound the property promises.

    def to_config(self) -> dict:
        return {
            "name": "geometric",
            "unit": self.unit,
            "start": self.start,
            "factor": self.factor,
            "milestones": list(self.milestones),
            "max_size": self.max_size,
        }
