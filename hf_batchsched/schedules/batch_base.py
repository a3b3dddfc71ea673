"""The batch-schedule contract and its one rounding.

A ``BatchSchedule`` maps a clock reading ``consumed`` (samples, or tokens, seen before a step) to the **global**
batch size of the optimizer step that starts there, always counted in samples (sequences), as Megatron-LM's
``--rampup-batch-size`` and ``--step-batch-size-schedule`` do. ``unit`` says what ``consumed`` and every threshold
count: ``"samples"`` or ``"tokens"``. The leaves live in ``schedules.batch``, the registry and configs in
``schedules.batch_config``.

``RoundedBatch`` (or ``schedule.rounded(multiple)``) is the one rounding of the package: it rounds a schedule's
sizes to multiples of ``micro_batch * world_size`` and clamps them; ``RampBatchSampler`` rounds through it too.
``round_batch_size`` is its scalar version.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from ..errors import ConfigError, check_choice

__all__ = [
    "BATCH_UNITS",
    "ROUNDING_MODES",
    "BatchSchedule",
    "RoundedBatch",
    "parse_quantity",
    "round_batch_size",
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
    ) -> RoundedBatch:
        """This schedule with sizes rounded to multiples of ``multiple`` and clamped; see ``RoundedBatch``."""
        return RoundedBatch(self, multiple, mode=mode, min_size=min_size, max_size=max_size)

    def _check_consumed(self, consumed: float) -> None:
        if not _is_number(consumed) or consumed < 0:
            raise ConfigError(f"a batch schedule is read at consumed {self.unit} >= 0, got {consumed!r}")


@dataclass(frozen=True)
class RoundedBatch(BatchSchedule):
    """A schedule whose sizes are rounded to multiples of ``multiple`` and clamped to ``[min_size, max_size]``.

    Use ``multiple = micro_batch_size * world_size`` so every step splits into whole micro-batches on every
    rank. Rounding and clamping are monotone, so a non-decreasing schedule stays non-decreasing. In a config the
    options are one nested block, ``rounding: {multiple: 16, mode: down, min_size: 32, max_size: 256}``, so they
    never mix with the schedule's own parameters (``geometric``'s cap is its own ``max_size``).

    Args:
        schedule (`BatchSchedule`): the wrapped schedule (``RampBatchSampler`` also wraps a plain callable
            ``consumed -> size``; such a wrapper has no bounds and no config).
        multiple (`int`): every size is a positive multiple of it.
        mode (`str`, *optional*, defaults to `"down"`): ``"down"``, ``"nearest"`` or ``"up"``; ``"error"`` refuses a
            size that is not a multiple instead of rounding it.
        min_size (`int`, *optional*): lower clamp, a multiple of ``multiple``; defaults to the wrapped
            schedule's ``min_size`` rounded with ``mode`` (at least ``multiple``).
        max_size (`int`, *optional*): upper clamp, a multiple of ``multiple``; defaults to the wrapped
            schedule's ``max_size`` rounded with ``mode``.
        never_raise (`bool`, *optional*, defaults to `False`): refuse a size below ``multiple`` instead of raising
            it to ``multiple`` (the sampler's rule: a step never takes more samples than the schedule asks for).

    >>> from hf_batchsched.schedules.batch import PiecewiseBatch
    >>> rounded = PiecewiseBatch.parse("0:30 100:70 200:500").rounded(16, max_size=256)
    >>> [rounded(c) for c in (0, 100, 200)], rounded.min_size, rounded.max_size
    ([16, 64, 256], 16, 256)
    >>> rounded.to_config()["rounding"]
    {'multiple': 16, 'mode': 'down', 'min_size': 16, 'max_size': 256}
    """

    schedule: BatchSchedule
    multiple: int
    mode: str = "down"
    min_size: int | None = None
    max_size: int | None = None
    never_raise: bool = False
    unit: str = field(init=False)

    def __post_init__(self):
        if not isinstance(self.schedule, BatchSchedule) and not callable(self.schedule):
            raise ConfigError(f"RoundedBatch wraps a BatchSchedule, got {self.schedule!r}")
        multiple = _positive_int("multiple (micro_batch_size * world_size)", self.multiple)
        check_choice("rounding mode", self.mode, (*ROUNDING_MODES, "error"))
        bound_mode = "down" if self.mode == "error" else self.mode
        bounds = {}
        for name in ("min_size", "max_size"):
            value, default = getattr(self, name), getattr(self.schedule, name, None)
            if value is None:
                value = None if default is None else round_batch_size(default, multiple, mode=bound_mode)
            else:
                value = _positive_int(name, value)
                if value % multiple:
                    raise ConfigError(
                        f"{name} {value} is not a multiple of {multiple} (micro_batch_size * world_size); "
                        f"use {round_batch_size(value, multiple)} or {round_batch_size(value, multiple, mode='up')}"
                    )
            bounds[name] = value
        if None not in bounds.values() and bounds["max_size"] < bounds["min_size"]:
            raise ConfigError(f"max_size {bounds['max_size']} is below min_size {bounds['min_size']}")
        object.__setattr__(self, "multiple", multiple)
        object.__setattr__(self, "min_size", bounds["min_size"])
        object.__setattr__(self, "max_size", bounds["max_size"])
        object.__setattr__(self, "unit", _check_batch_unit(getattr(self.schedule, "unit", "samples")))

    @classmethod
    def from_options(cls, schedule: BatchSchedule, options: Mapping) -> RoundedBatch:
        """``schedule`` wrapped with a config's ``rounding`` block; unknown keys raise a ``ConfigError``."""
        accepted = sorted(f.name for f in fields(cls) if f.init and f.name != "schedule")
        if not isinstance(options, Mapping):
            raise ConfigError(
                f"a batch schedule's 'rounding' is a dict with keys {', '.join(accepted)}, got {options!r}"
            )
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ConfigError(f"rounding got unknown key(s) {', '.join(unknown)}; it takes: {', '.join(accepted)}")
        return cls(schedule, **{"multiple": 1, **options})

    def round(self, size: float, consumed: float | None = None) -> int:
        """``size`` (the wrapped schedule's value at ``consumed``) rounded to ``multiple`` and clamped."""
        refused = self.mode == "error" or (self.never_raise and size < self.multiple)
        if refused and _is_number(size) and size % self.multiple:
            if size < self.multiple:
                reason = "batch sizes are never raised above the schedule"
            else:
                reason = "rounding mode 'error' was asked for"
            where = "" if consumed is None else f" at {self.unit}={consumed}"
            raise ConfigError(
                f"the batch schedule asks for a global batch of {size}{where}, not a multiple of {self.multiple} "
                f"and {reason}; make the schedule's sizes multiples of {self.multiple}"
            )
        rounded = round_batch_size(size, self.multiple, mode="down" if self.mode == "error" else self.mode)
        if self.min_size is not None:
            rounded = max(rounded, self.min_size)
        return rounded if self.max_size is None else min(rounded, self.max_size)

    def __call__(self, consumed: float) -> int:
        return self.round(self.schedule(consumed), consumed)

    @property
    def online(self) -> bool:
        return getattr(self.schedule, "online", False)

    def to_config(self) -> dict:
        options = {"multiple": self.multiple, "mode": self.mode, "min_size": self.min_size, "max_size": self.max_size}
        if self.never_raise:
            options["never_raise"] = True
        return {**self.schedule.to_config(), "rounding": options}
