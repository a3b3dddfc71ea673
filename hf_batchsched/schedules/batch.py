"""Batch-size schedules: the global batch size as a pure function of consumed samples (or tokens).

A ``BatchSchedule`` maps a clock reading ``consumed`` (samples, or tokens, seen before a step) to the
**global** batch size of the optimizer step that starts there, always counted in samples (sequences), as
Megatron-LM's ``--rampup-batch-size`` and ``--step-batch-size-schedule`` do. ``unit`` says what
``consumed`` and every threshold count: ``"samples"`` or ``"tokens"``.

Leaves (registered in ``BATCH_SCHEDULES``):

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
``to_lr``       (an ``LRMatchedBatch``)                  replaces an LR policy's decay
``adaptive``    ``AdaptiveBatchSchedule(min_size,        McCandlish et al. 2018: grows while the
                max_size, ...)`` (``schedules.adaptive``) measured noise scale exceeds the batch
``seesaw``      ``seesaw(lr_policy, ...)[0]``            Meterez et al. 2025: LR x sqrt(a) and batch
                (``schedules.seesaw_pair.SeesawBatch``)  x 1/a where the LR policy decays by a
==============  =======================================  ============================================

``adaptive`` is *online* (``schedule.online``): its sizes depend on gradient noise measured during training, so
``simulate`` (and ``hf-batchsched plot``) refuse it; every other schedule is a pure function of the clock.

``RoundedBatch`` (or ``schedule.rounded(multiple)``) rounds a schedule's sizes to multiples of
``micro_batch * world_size``; ``simulate`` lays out the optimizer steps of a run (the Trainer's horizon);
``equivalent_to_lr`` turns a decaying LR policy into a batch ramp plus a residual LR (Smith, Kindermans, Ying
& Le, "Don't Decay the Learning Rate, Increase the Batch Size", ICLR 2018, https://arxiv.org/abs/1711.00489).

Example:

>>> schedule = batch_schedule_from_config("0:32 2K:64 8K:128")
>>> [schedule(c) for c in (0, 1999, 2000, 8000, 10**6)]
[32, 32, 64, 128, 128]
>>> run = simulate(schedule, total_samples=10_000)
>>> run.num_steps, run.step_sizes[:3], run.step_sizes[-2:]
(173, [32, 32, 32], [128, 48])
"""

from __future__ import annotations

import bisect
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import ConfigError, check_choice
from .base import Policy, Registry

__all__ = [
    "BATCH_SCHEDULES",
    "BATCH_UNITS",
    "ROUNDING_MODES",
    "BatchSchedule",
    "ConstantBatch",
    "GeometricBatch",
    "LRMatchedBatch",
    "LinearRampBatch",
    "PiecewiseBatch",
    "RoundedBatch",
    "SimulatedRun",
    "batch_schedule_from_config",
    "batch_schedule_to_config",
    "equivalent_to_lr",
    "make_batch_schedule",
    "parse_quantity",
    "residual_lr",
    "round_batch_size",
    "simulate",
]

BATCH_UNITS = ("samples", "tokens")
ROUNDING_MODES = ("down", "nearest", "up")
_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMBGT]?)\s*$", re.IGNORECASE)


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(what: str, value, hint: str = "") -> int:
    if not _is_number(value) or value != int(value) or value <= 0:
        raise ConfigError(f"{what} must be a positive integer (a batch size in samples), got {value!r}{hint}")
    return int(value)


def _positive_number(what: str, value) -> float:
    if not _is_number(value) or not value > 0:
        raise ConfigError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_batch_unit(unit: str) -> str:
    check_choice("batch schedule unit", unit, BATCH_UNITS)
    return unit


def parse_quantity(text: str | float) -> float:
    """Parse a number with an optional K/M/B/T suffix (1e3, 1e6, 1e9, 1e12; ``G`` is accepted for ``B``).

    >>> parse_quantity("2M"), parse_quantity("1.5k"), parse_quantity("250B"), parse_quantity(300)
    (2000000.0, 1500.0, 250000000000.0, 300.0)
    >>> parse_quantity("2Q")
    Traceback (most recent call last):
    ...
    hf_batchsched.errors.ConfigError: cannot read '2Q' as a quantity; write a number with a K/M/B/T suffix, e.g. 2M
    """
    if _is_number(text):
        return float(text)
    match = _QUANTITY.match(str(text))
    if not match:
        raise ConfigError(f"cannot read {text!r} as a quantity; write a number with a K/M/B/T suffix, e.g. 2M")
    return float(match.group(1)) * _SUFFIXES[match.group(2).upper()]


def round_batch_size(size: float, multiple: int, *, mode: str = "down") -> int:
    """Round ``size`` to a positive multiple of ``multiple`` (never below ``multiple`` itself).

    Args:
        size (`float`): the batch size to round.
        multiple (`int`): e.g. ``micro_batch_size * world_size``.
        mode (`str`, *optional*, defaults to `"down"`): ``"down"`` (Megatron's
            ``--decrease-batch-size-if-needed``), ``"nearest"`` (halves round up) or ``"up"``.

    A size within 1e-9 of a multiple counts as that multiple, so ``128 * (0.1 / 0.02)`` gives 640, not 639.

    >>> [round_batch_size(s, 24, mode=m) for s in (100, 108, 5) for m in ROUNDING_MODES]
    [96, 96, 120, 96, 120, 120, 24, 24, 24]
    >>> round_batch_size(128 * (0.1 / 0.02), 1)
    640
    """
    multiple = _positive_int("multiple", multiple)
    check_choice("rounding mode", mode, ROUNDING_MODES)
    if not _is_number(size) or size < 0:
        raise ConfigError(f"cannot round batch size {size!r}; it must be a finite number >= 0")
    quotient = size / multiple
    if abs(quotient - round(quotient)) < 1e-9:
        count = round(quotient)
    elif mode == "down":
        count = math.floor(quotient)
    elif mode == "up":
        count = math.ceil(quotient)
    else:
        count = math.floor(quotient + 0.5)
    return max(1, int(count)) * multiple


# --------------------------------------------------------------------------------------------------
# The base class and leaves
# --------------------------------------------------------------------------------------------------


class BatchSchedule:
    """Base class: ``schedule(consumed) -> int`` is the global batch size (in samples) of the optimizer step
    that starts when ``consumed`` samples (or tokens, per ``unit``) have been seen.

    Subclasses are frozen dataclasses (picklable, comparable) that implement ``__call__``, ``min_size``,
    ``max_size`` (bounds every value lies in; tight for the leaves) and ``to_config``. ``online`` is ``True`` for a
    schedule whose sizes depend on measurements taken during training (``AdaptiveBatchSchedule``): it is not a pure
    function of the clock, so ``simulate`` cannot lay out its run ahead of time.
    """

    unit: str = "samples"
    online: bool = False

    def __call__(self, consumed: float) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    # Every leaf also has ``min_size`` and ``max_size`` (a property or a field): bounds of every value.
    min_size: int
    max_size: int

    def to_config(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def rounded(
        self, multiple: int, *, mode: str = "down", min_size: int | None = None, max_size: int | None = None
    ) -> BatchSchedule:
        """This schedule with sizes rounded to multiples of ``multiple`` and clamped; see ``RoundedBatch``."""
        return RoundedBatch(self, multiple, mode=mode, min_size=min_size, max_size=max_size)

    def _check_consumed(self, consumed: float) -> None:
        if not _is_number(consumed) or consumed < 0:
            raise ConfigError(f"a batch schedule is read at consumed {self.unit} >= 0, got {consumed!r}")


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


@dataclass(frozen=True)
class RoundedBatch(BatchSchedule):
    """A schedule whose sizes are rounded to multiples of ``multiple`` and clamped to ``[min_size, max_size]``.

    Use ``multiple = micro_batch_size * world_size`` so every step splits into whole micro-batches on every
    rank. Rounding and clamping are monotone, so a non-decreasing schedule stays non-decreasing.

    Args:
        schedule (`BatchSchedule`): the wrapped schedule.
        multiple (`int`): every size is a positive multiple of it.
        mode (`str`, *optional*, defaults to `"down"`): ``"down"``, ``"nearest"`` or ``"up"``.
        min_size (`int`, *optional*): lower clamp, a multiple of ``multiple``; defaults to the wrapped
            schedule's ``min_size`` rounded with ``mode`` (at least ``multiple``).
        max_size (`int`, *optional*): upper clamp, a multiple of ``multiple``; defaults to the wrapped
            schedule's ``max_size`` rounded with ``mode``.

    >>> rounded = PiecewiseBatch.parse("0:30 100:70 200:500").rounded(16, max_size=256)
    >>> [rounded(c) for c in (0, 100, 200)], rounded.min_size, rounded.max_size
    ([16, 64, 256], 16, 256)
    """

    schedule: BatchSchedule
    multiple: int
    mode: str = "down"
    min_size: int | None = None
    max_size: int | None = None
    unit: str = field(init=False)

    def __post_init__(self):
        if not isinstance(self.schedule, BatchSchedule):
            raise ConfigError(f"RoundedBatch wraps a BatchSchedule, got {self.schedule!r}")
        multiple = _positive_int("multiple (micro_batch_size * world_size)", self.multiple)
        check_choice("rounding mode", self.mode, ROUNDING_MODES)
        bounds = {}
        for name, default in (("min_size", self.schedule.min_size), ("max_size", self.schedule.max_size)):
            value = getattr(self, name)
            if value is None:
                value = round_batch_size(default, multiple, mode=self.mode)
            else:
                value = _positive_int(name, value)
                if value % multiple:
                    raise ConfigError(
                        f"{name} {value} is not a multiple of {multiple} (micro_batch_size * world_size); "
                        f"use {round_batch_size(value, multiple)} or {round_batch_size(value, multiple, mode='up')}"
                    )
            bounds[name] = value
        if bounds["max_size"] < bounds["min_size"]:
            raise ConfigError(f"max_size {bounds['max_size']} is below min_size {bounds['min_size']}")
        object.__setattr__(self, "multiple", multiple)
        object.__setattr__(self, "min_size", bounds["min_size"])
        object.__setattr__(self, "max_size", bounds["max_size"])
        object.__setattr__(self, "unit", self.schedule.unit)

    def __call__(self, consumed: float) -> int:
        size = round_batch_size(self.schedule(consumed), self.multiple, mode=self.mode)
        return min(max(size, self.min_size), self.max_size)

    @property
    def online(self) -> bool:
        return self.schedule.online

    def to_config(self) -> dict:
        return {
            **self.schedule.to_config(),
            "multiple": self.multiple,
            "rounding": self.mode,
            "min_size": self.min_size,
            "max_size": self.max_size,
        }


# --------------------------------------------------------------------------------------------------
# Registry and configs
# --------------------------------------------------------------------------------------------------

BATCH_SCHEDULES = Registry("batch schedule")


@BATCH_SCHEDULES.register("constant")
def _make_constant(*, size: int, unit: str = "samples") -> ConstantBatch:
    return ConstantBatch(size, unit=unit)


@BATCH_SCHEDULES.register("piecewise")
def _make_piecewise(
    *, schedule: str | None = None, thresholds=None, sizes=None, unit: str = "samples"
) -> PiecewiseBatch:
    if schedule is not None:
        if thresholds is not None or sizes is not None:
            raise ConfigError("give a piecewise batch schedule either as 'schedule' or as 'thresholds' + 'sizes'")
        return PiecewiseBatch.parse(schedule, unit=unit)
    if thresholds is None or sizes is None:
        raise ConfigError("a piecewise batch schedule needs 'schedule' (e.g. '0:32 2M:64') or 'thresholds' + 'sizes'")
    return PiecewiseBatch(tuple(thresholds), tuple(sizes), unit=unit)


@BATCH_SCHEDULES.register("linear_ramp")
def _make_linear_ramp(
    *, start: int, increment: int, ramp_samples: float, final: int, unit: str = "samples"
) -> LinearRampBatch:
    return LinearRampBatch(start, increment, ramp_samples, final, unit=unit)


@BATCH_SCHEDULES.register("geometric")
def _make_geometric(
    *, start: int, factor: float, milestones: Sequence[float], max_size: int, unit: str = "samples"
) -> GeometricBatch:
    return GeometricBatch(start, factor, tuple(milestones), max_size, unit=unit)


# Parameters of a registered schedule that share their name with make_batch_schedule's rounding options.
_OWN_PARAMETERS = {
    "geometric": ("max_size",),
    "equivalent_to_lr": ("multiple",),
    "adaptive": ("min_size", "max_size", "multiple"),
    "seesaw": ("multiple",),
}


def make_batch_schedule(
    name: str,
    *,
    multiple: int = 1,
    rounding: str = "down",
    min_size: int | None = None,
    max_size: int | None = None,
    **params,
) -> BatchSchedule:
    """Build the registered batch schedule ``name`` (``BATCH_SCHEDULES.names()``), optionally rounded.

    Args:
        name (`str`): ``"constant"``, ``"piecewise"``, ``"linear_ramp"``, ``"geometric"``, ``"equivalent_to_lr"``
            or ``"adaptive"``.
        multiple (`int`, *optional*, defaults to `1`): round sizes to multiples of it (``RoundedBatch``); for
            ``equivalent_to_lr`` and ``adaptive`` their own ``multiple`` parameter.
        rounding (`str`, *optional*, defaults to `"down"`): the rounding mode when ``multiple > 1``.
        min_size (`int`, *optional*): lower clamp of the rounded schedule; ``adaptive``'s starting size.
        max_size (`int`, *optional*): the cap of ``geometric`` and ``adaptive``; for other schedules the upper clamp
            of the rounded schedule.
        **params: the schedule's parameters (``unit`` included); unknown or missing ones raise a ``ConfigError``.

    >>> make_batch_schedule("linear_ramp", start=16, increment=16, ramp_samples="5859375", final=1536)(0)
    16
    >>> make_batch_schedule("geometric", start=100, factor=2, milestones=[10], max_size=400, multiple=64)(10)
    192
    """
    options = {"multiple": multiple, "min_size": min_size, "max_size": max_size}
    for key in _OWN_PARAMETERS.get(name, ()):  # the schedule's own parameters, not the rounding wrapper's
        value = options.pop(key)
        if value is not None:
            params[key] = value
    multiple, min_size, max_size = options.get("multiple", 1), options.get("min_size"), options.get("max_size")
    schedule = BATCH_SCHEDULES.build(name, **params)
    if multiple != 1 or min_size is not None or max_size is not None:
        schedule = RoundedBatch(schedule, multiple, mode=rounding, min_size=min_size, max_size=max_size)
    return schedule


def batch_schedule_from_config(cfg: Mapping | str | int | BatchSchedule, *, unit: str | None = None) -> BatchSchedule:
    """Build a batch schedule from a config.

    Args:
        cfg (`dict`, `str`, `int` or `BatchSchedule`): a ``BatchSchedule`` (returned as is); an int (or a string of
            one) for a constant batch; a Megatron-style string ``"0:32 2M:64"``; or a dict with ``"name"`` and the
            schedule's parameters (plus optional ``multiple``, ``rounding``, ``min_size``, ``max_size``).
        unit (`str`, *optional*): the unit for strings and ints, and the default for dicts without ``"unit"``
            (defaults to ``"samples"``).

    >>> batch_schedule_from_config(32)
    ConstantBatch(size=32, unit='samples')
    >>> batch_schedule_from_config("0:32 2M:64", unit="tokens")(2e6)
    64
    >>> cfg = {"name": "geometric", "start": 128, "factor": 5, "milestones": [10], "max_size": 5120}
    >>> batch_schedule_from_config(cfg)(10)
    640
    """
    if isinstance(cfg, BatchSchedule):
        return cfg
    if _is_number(cfg):
        return ConstantBatch(cfg, unit=unit or "samples")
    if isinstance(cfg, str):
        if ":" not in cfg:
            try:
                size = float(cfg)
            except ValueError:
                raise ConfigError(
                    f"cannot read batch schedule {cfg!r}; give a size (e.g. 64) or thresholds like '0:32 2M:64 8M:128'"
                ) from None
            return ConstantBatch(size, unit=unit or "samples")
        return PiecewiseBatch.parse(cfg, unit=unit or "samples")
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"a batch schedule config must be a dict, a string or an int, got {cfg!r}")
    params = dict(cfg)
    if "name" not in params:
        raise ConfigError(
            f"batch schedule config {cfg!r} has no 'name'; valid names: {', '.join(BATCH_SCHEDULES.names())}"
        )
    name = params.pop("name")
    params.setdefault("unit", unit or "samples")
    return make_batch_schedule(name, **params)


def batch_schedule_to_config(schedule: BatchSchedule) -> dict:
    """The config dict (YAML/JSON-ready) that ``batch_schedule_from_config`` turns back into an equal schedule.

    >>> batch_schedule_to_config(PiecewiseBatch.parse("0:32 2000000:64"))
    {'name': 'piecewise', 'unit': 'samples', 'schedule': '0:32 2M:64'}
    """
    return schedule.to_config()


# --------------------------------------------------------------------------------------------------
# Simulating a run
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Smith et al.: replace LR decay by batch growth
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LRMatchedBatch(BatchSchedule):
    """The batch schedule built by ``equivalent_to_lr``: ``B(t) = B0 * r(t) ** -k`` rounded to ``multiple``,
    clamped to ``[B0, max_size]``, with ``r(t) = [lr(t) / (1 - m(t))] / [lr(w) / (1 - m(w))]`` and ``w`` the end
    of the warmup (``B = B0`` before it).

    With ``exact_noise=True`` (``k = 1`` only) ``B`` solves ``N / B - 1 = r(t) (N / B0 - 1)`` instead, the
    paper's full noise scale ``g = lr (N / B - 1) / (1 - m)``. See ``equivalent_to_lr`` for the arguments.
    """

    lr_policy: Policy
    base_batch_size: int
    max_size: int
    dataset_size: int
    k: float = 1.0
    momentum: Policy | float | None = None
    warmup: float = 0.0
    multiple: int = 1
    exact_noise: bool = False
    unit: str = "samples"
    time_scale: float = 1.0

    @property
    def min_size(self) -> int:
        return round_batch_size(self.base_batch_size, self.multiple, mode="nearest")

    def momentum_at(self, policy_t: float) -> float:
        """The original run's momentum at ``policy_t`` (in the LR policy's unit)."""
        if not isinstance(self.momentum, Policy):
            return float(self.momentum or 0.0)
        momentum = self.momentum(policy_t)
        if not 0 <= momentum < 1:
            raise ConfigError(
                f"the momentum policy gives {momentum!r} at t = {policy_t:g}; momentum must be in [0, 1)"
            )
        return momentum

    def noise_ratio(self, consumed: float) -> float:
        """``r(t)``: the original schedule's ``lr / (1 - m)`` relative to its value at the end of warmup."""
        policy_t = consumed * self.time_scale
        reference = self.lr_policy(self.warmup) / (1.0 - self.momentum_at(self.warmup))
        return self.lr_policy(policy_t) / (1.0 - self.momentum_at(policy_t)) / reference

    def ideal(self, consumed: float) -> float:
        """``B(t)`` before rounding and clamping (``inf`` once the LR reaches 0)."""
        if consumed * self.time_scale < self.warmup:
            return float(self.base_batch_size)
        ratio = self.noise_ratio(consumed)
        if ratio <= 0:
            return math.inf
        if self.exact_noise:
            return self.dataset_size / (1.0 + ratio * (self.dataset_size / self.base_batch_size - 1.0))
        return self.base_batch_size * ratio ** (-self.k)

    def __call__(self, consumed: float) -> int:
        self._check_consumed(consumed)
        ideal = self.ideal(consumed)
        if ideal >= self.max_size:
            return self.max_size
        return min(max(round_batch_size(ideal, self.multiple, mode="nearest"), self.min_size), self.max_size)

    def to_config(self) -> dict:
        """The ``equivalent_to_lr`` arguments that rebuild this schedule (YAML/JSON-ready; the LR and momentum
        policies as ``lr_policy_to_config`` dicts)."""
        from .lr import lr_policy_to_config

        momentum = self.momentum
        return {
            "name": "equivalent_to_lr",
            "unit": self.unit,
            "lr_policy": lr_policy_to_config(self.lr_policy),
            "base_batch_size": self.base_batch_size,
            "dataset_size": self.dataset_size,
            "max_batch_size": self.max_size,
            "k": self.k,
            "momentum": lr_policy_to_config(momentum) if isinstance(momentum, Policy) else momentum,
            "warmup": self.warmup,
            "multiple": self.multiple,
            "exact_noise": self.exact_noise,
        }


@BATCH_SCHEDULES.register("equivalent_to_lr")
def _make_equivalent_to_lr(
    *,
    lr_policy,
    base_batch_size: int,
    dataset_size: int,
    max_batch_size: int | None = None,
    optimizer: str = "sgd",
    k: float | None = None,
    momentum=None,
    warmup: float = 0.0,
    unit: str = "samples",
    multiple: int = 1,
    exact_noise: bool = False,
) -> LRMatchedBatch:
    """The batch schedule of ``equivalent_to_lr``; ``lr_policy`` (and a momentum policy) as configs or ``Policy``."""
    from .lr import lr_policy_from_config

    if isinstance(momentum, (Mapping, str)):
        momentum = lr_policy_from_config(momentum)
    schedule, _ = equivalent_to_lr(
        lr_policy_from_config(lr_policy),
        base_batch_size=base_batch_size,
        dataset_size=dataset_size,
        max_batch_size=max_batch_size,
        optimizer=optimizer,
        k=k,
        momentum=momentum,
        warmup=warmup,
        unit=unit,
        multiple=multiple,
        exact_noise=exact_noise,
    )
    return schedule


def residual_lr(t: float, *, batch_schedule: LRMatchedBatch) -> float:
    """The LR that keeps the noise of the original LR policy once the batch follows ``batch_schedule``.

    ``lr(t) * (B(t) / B0) ** (1 / k)``, times ``(1 - m0) / (1 - m(t))`` for a momentum policy (the new run holds
    momentum at its value ``m0`` at the end of warmup); with ``exact_noise``, ``lr(t) (N / B0 - 1) / (N / B(t) - 1)``
    instead of the power. While ``B`` tracks the LR this is the LR at the end of warmup; after the cap it decays
    like the original (the paper's hybrid); it absorbs the rounding of ``B``. The value has the kind of the
    original policy (an LR or a multiplier).
    """
    schedule = batch_schedule
    policy_t = t * schedule.time_scale
    lr = schedule.lr_policy(policy_t)
    if isinstance(schedule.momentum, Policy) and policy_t >= schedule.warmup:
        lr *= (1.0 - schedule.momentum_at(schedule.warmup)) / (1.0 - schedule.momentum_at(policy_t))
    size = schedule(t)
    if schedule.exact_noise:
        n = schedule.dataset_size
        return lr * (n / schedule.base_batch_size - 1.0) / (n / size - 1.0)
    return lr * (size / schedule.base_batch_size) ** (1.0 / schedule.k)


_OPTIMIZER_EXPONENTS = {"sgd": 1.0, "adam": 2.0}


def lr_time_scale(lr_policy: Policy, unit: str, base_batch_size: int, owner: str) -> float:
    """Factor from a batch schedule's clock (``unit``) to ``lr_policy``'s: 1, or ``1 / base_batch_size`` for a steps
    policy read on the samples clock (steps at the base batch); other mismatches are refused naming ``owner``."""
    if lr_policy.unit == unit:
        return 1.0
    if lr_policy.unit == "steps" and unit == "samples":
        return 1.0 / base_batch_size
    raise ConfigError(
        f"the LR policy counts {lr_policy.unit!r} but {owner} counts {unit!r}; build the LR policy on "
        f"unit={unit!r} (a steps policy is converted only for unit='samples')"
    )


def equivalent_to_lr(
    lr_policy: Policy,
    *,
    base_batch_size: int,
    dataset_size: int,
    max_batch_size: int | None = None,
    optimizer: str = "sgd",
    k: float | None = None,
    momentum: Policy | float | None = None,
    warmup: float = 0.0,
    unit: str = "samples",
    multiple: int = 1,
    exact_noise: bool = False,
) -> tuple[BatchSchedule, Policy]:
    """Turn a decaying LR policy into a growing batch plus a residual LR (Smith, Kindermans, Ying & Le 2018).

    The SGD noise scale is ``g = lr (N / B - 1) / (1 - m) ~ lr N / (B (1 - m))``, so dividing the LR by
    ``a`` is equivalent to multiplying the batch by ``a``. The batch becomes
    ``B(t) = B0 * (lr(w) / lr(t)) ** k`` (momentum: ``lr / (1 - m)`` in place of ``lr``), rounded to
    ``multiple``, never below ``B0`` and capped at ``max_batch_size``; the LR becomes
    ``lr(t) * (B(t) / B0) ** (1 / k)``: constant while the batch grows, decaying like the original once the cap
    is reached (the paper's hybrid), so the noise at every point of the data equals the original schedule's.
    ``k = 1`` is the linear scaling rule of SGD; ``k = 2`` the square-root rule of Adam (Malladi et al. 2022:
    ``lr ~ sqrt(B)``, so an ``a``-fold LR decay becomes an ``a**2``-fold batch growth).

    Args:
        lr_policy (`Policy`): the original LR policy (either kind). On ``unit`` it is read at the consumed
            samples/tokens; on ``"steps"`` (with ``unit="samples"``) it is read at ``consumed / B0``, the steps of
            the original constant-batch run.
        base_batch_size (`int`): ``B0``, the original run's batch size.
        dataset_size (`int`): ``N``, the number of training samples.
        max_batch_size (`int`, *optional*): ``B_max``; defaults to ``dataset_size // 10`` (the paper's choice).
        optimizer (`str`, *optional*, defaults to `"sgd"`): ``"sgd"`` (``k = 1``) or ``"adam"`` (``k = 2``).
        k (`float`, *optional*): an explicit exponent, overriding ``optimizer``.
        momentum (`float` or `Policy`, *optional*): the original run's momentum; a policy (on ``lr_policy``'s unit)
            is folded into the batch (the new run holds momentum at its value ``m0`` at the end of warmup), a number
            cancels out unless ``exact_noise``.
        warmup (`float`, *optional*, defaults to `0.0`): the LR warmup's length ``w`` in ``lr_policy``'s unit: until
            then the batch stays ``B0`` and the LR follows ``lr_policy`` (warmup is for stability, not noise); the
            batch is ``B0`` at the LR ``lr(w)``.
        unit (`str`, *optional*, defaults to `"samples"`): the clock of the returned schedules.
        multiple (`int`, *optional*, defaults to `1`): round batch sizes to multiples of it.
        exact_noise (`bool`, *optional*, defaults to `False`): keep ``lr (N / B - 1)`` fixed instead of ``lr N / B``
            (``k = 1`` only); matters when ``B`` is not much smaller than ``N``.

    Returns:
        `tuple[BatchSchedule, Policy]`: the batch schedule and the residual LR policy, both on ``unit``.

    Smith et al.'s CIFAR-10 set-up (LR x0.2 at epochs 60, 120, 160; ``N = 50,000``, ``B0 = 128``):

    >>> from hf_batchsched.schedules.lr import make_lr_policy
    >>> epoch = 50_000
    >>> decay = make_lr_policy("NSTEP", k0=0.1, gamma=0.2, l=[60 * epoch, 120 * epoch, 160 * epoch], unit="samples")
    >>> batch, lr = equivalent_to_lr(decay, base_batch_size=128, dataset_size=50_000, max_batch_size=5120)
    >>> for e in (0, 60, 120, 160):
    ...     print(e, batch(e * epoch), f"{lr(e * epoch):.3g}")
    0 128 0.1
    60 640 0.1
    120 3200 0.1
    160 5120 0.032
    >>> simulate(ConstantBatch(128), 200 * epoch).num_steps, simulate(batch, 200 * epoch).num_steps
    (78125, 29142)
    """
    if not isinstance(lr_policy, Policy):
        raise ConfigError(f"equivalent_to_lr takes an LR Policy (see make_lr_policy), got {lr_policy!r}")
    _check_batch_unit(unit)
    base = _positive_int("base_batch_size", base_batch_size)
    n = _positive_int("dataset_size", dataset_size, " (the number of training samples)")
    cap = n // 10 if max_batch_size is None else _positive_int("max_batch_size", max_batch_size)
    if cap < base:
        raise ConfigError(
            f"max_batch_size {cap} is below base_batch_size {base}; the batch can only grow "
            f"(raise max_batch_size, or dataset_size, whose tenth is the default cap)"
        )
    multiple = _positive_int("multiple", multiple)
    cap = round_batch_size(cap, multiple, mode="down")
    if k is None:
        check_choice("optimizer", optimizer, _OPTIMIZER_EXPONENTS)
        k = _OPTIMIZER_EXPONENTS[optimizer]
    k = _positive_number("k (the batch/LR exponent)", k)
    if exact_noise and k != 1:
        raise ConfigError("exact_noise=True needs k = 1 (SGD's noise scale); use exact_noise=False with Adam's k = 2")
    if exact_noise and cap >= n:
        raise ConfigError(f"with exact_noise the cap {cap} must be below dataset_size {n}")
    time_scale = lr_time_scale(lr_policy, unit, base, "the batch schedule")
    if isinstance(momentum, Policy):
        if momentum.unit != lr_policy.unit:
            raise ConfigError(f"the momentum policy counts {momentum.unit!r}, the LR policy {lr_policy.unit!r}")
        m0 = momentum(warmup if _is_number(warmup) else 0.0)
    elif momentum is None or _is_number(momentum):
        m0 = float(momentum or 0.0)
    else:
        raise ConfigError(f"momentum must be a number in [0, 1), a Policy or None, got {momentum!r}")
    if not 0 <= m0 < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {m0!r}")
    if not _is_number(warmup) or warmup < 0:
        raise ConfigError(f"warmup must be a number >= 0 (in the LR policy's unit), got {warmup!r}")
    if not lr_policy(warmup) > 0:
        raise ConfigError(
            f"the LR at the end of warmup (t = {warmup:g} {lr_policy.unit}) must be > 0, got {lr_policy(warmup)!r}; "
            "for a policy that warms up from 0 pass warmup=<its length>"
        )
    schedule = LRMatchedBatch(
        lr_policy,
        base,
        cap,
        n,
        k=k,
        momentum=momentum,
        warmup=float(warmup),
        multiple=multiple,
        exact_noise=exact_noise,
        unit=unit,
        time_scale=time_scale,
    )
    residual = Policy(
        f"residual({lr_policy.name})", residual_lr, {"batch_schedule": schedule}, unit=unit, kind=lr_policy.kind
    )
    return schedule, residual
