"""The batch-schedule registry (``BATCH_SCHEDULES``) and configs.

Every registered name builds one class from its own signature, so the registry names bad keys: the leaves of
``schedules.batch`` (their constructors; ``PiecewiseBatch.from_config`` also reads Megatron's string), Smith et al.'s
``LRMatchedBatch`` and Seesaw's ``SeesawBatch`` (the batch half of ``equivalent_to_lr`` and ``seesaw``, which read
nested LR-policy configs) and the online ``AdaptiveBatchSchedule``. A config's
optional ``rounding`` block wraps the schedule in ``RoundedBatch``; every other key is the schedule's own.

>>> cfg = {"name": "linear_ramp", "start": 16, "increment": 16, "ramp_samples": 96, "final": 48}
>>> schedule = batch_schedule_from_config({**cfg, "rounding": {"multiple": 32, "mode": "up"}})
>>> [schedule(c) for c in (0, 32, 96)], batch_schedule_to_config(schedule)["rounding"]["multiple"]
([32, 32, 64], 32)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

from ..errors import ConfigError, check_positive
from .adaptive import AdaptiveBatchSchedule
from .base import Registry
from .batch import ConstantBatch, GeometricBatch, LinearRampBatch, PiecewiseBatch
from .batch_base import BatchSchedule, RoundedBatch, _is_number
from .seesaw_pair import seesaw
from .smith import equivalent_to_lr

__all__ = [
    "BATCH_SCHEDULES",
    "as_batch_schedule",
    "batch_schedule_from_config",
    "batch_schedule_to_config",
    "make_batch_schedule",
]

BATCH_SCHEDULES = Registry("batch schedule")
BATCH_SCHEDULES.register("constant")(ConstantBatch)
BATCH_SCHEDULES.register("piecewise")(PiecewiseBatch.from_config)
BATCH_SCHEDULES.register("linear_ramp")(LinearRampBatch)
BATCH_SCHEDULES.register("geometric")(GeometricBatch)


def _batch_of_pair(build_pair: Callable) -> Callable[..., BatchSchedule]:
    """The batch schedule of a ``(batch_schedule, lr_policy)`` builder, registered with the builder's own signature
    (so the registry names its valid keys)."""

    def build(**params) -> BatchSchedule:
        return build_pair(**params)[0]

    build.__signature__ = inspect.signature(build_pair)
    build.__name__ = build.__qualname__ = f"{build_pair.__name__}_batch"
    return build


BATCH_SCHEDULES.register("equivalent_to_lr")(_batch_of_pair(equivalent_to_lr))
BATCH_SCHEDULES.register("adaptive")(AdaptiveBatchSchedule)
BATCH_SCHEDULES.register("seesaw")(_batch_of_pair(seesaw))


def make_batch_schedule(name: str, *, rounding: Mapping | None = None, **params) -> BatchSchedule:
    """Build the registered batch schedule ``name`` (``BATCH_SCHEDULES.names()``), optionally rounded.

    Args:
        name (`str`): ``"constant"``, ``"piecewise"``, ``"linear_ramp"``, ``"geometric"``, ``"equivalent_to_lr"``,
            ``"adaptive"`` or ``"seesaw"``.
        rounding (`dict`, *optional*): wrap the schedule in ``RoundedBatch`` with these options: ``multiple``
            (defaults to 1), ``mode`` (``"down"``, ``"nearest"``, ``"up"`` or ``"error"``), ``min_size``,
            ``max_size`` (the clamp); unknown keys raise a ``ConfigError``.
        **params: the schedule's own parameters (``unit`` included; ``geometric``'s ``max_size`` is its cap,
            ``equivalent_to_lr``'s ``multiple`` its own rounding); unknown or missing ones raise a ``ConfigError``.

    >>> make_batch_schedule("linear_ramp", start=16, increment=16, ramp_samples="5859375", final=1536)(0)
    16
    >>> geometric = make_batch_schedule("geometric", start=100, factor=2, milestones=[10], max_size=400)
    >>> rounded = make_batch_schedule("geometric", start=100, factor=2, milestones=[10], max_size=400,
    ...                               rounding={"multiple": 64})
    >>> geometric(10), rounded(10)
    (200, 192)
    """
    schedule = BATCH_SCHEDULES.build(name, **params)
    return schedule if rounding is None else RoundedBatch.from_options(schedule, rounding)


def batch_schedule_from_config(cfg: Mapping | str | int | BatchSchedule, *, unit: str | None = None) -> BatchSchedule:
    """Build a batch schedule from a config.

    Args:
        cfg (`dict`, `str`, `int` or `BatchSchedule`): a ``BatchSchedule`` (returned as is); an int (or a string of
            one) for a constant batch; a Megatron-style string ``"0:32 2M:64"``; or a dict with ``"name"`` and the
            schedule's parameters (plus an optional ``rounding`` block, see ``make_batch_schedule``).
        unit (`str`, *optional*): the unit for strings and ints, and the default for dicts without ``"unit"``
            (defaults to ``"samples"``).

    >>> batch_schedule_from_config(32)
    ConstantBatch(size=32, unit='samples')
    >>> batch_schedule_from_config("0:32 2M:64", unit="tokens")(2e6)
    64
    >>> cfg = {"name": "geometric", "start": 128, "factor": 5, "milestones": [10], "max_size": 5120}
    >>> batch_schedule_from_config(cfg)(10)
    640
    >>> batch_schedule_from_config({**cfg, "rounding": {"multiple": 96, "max_size": 4800}})(10)
    576
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


def as_batch_schedule(schedule) -> BatchSchedule | Callable[[float], int]:
    """What ``BatchRampTrainer(batch_schedule=...)`` and ``RampBatchSampler`` accept, as a schedule: a
    ``BatchSchedule`` (as is), an ``int`` (a ``ConstantBatch``), a config (a dict or a Megatron-style string such
    as ``"0:32 2M:64"``, through ``batch_schedule_from_config``), or any callable ``consumed -> size`` whose optional
    ``.unit`` says what ``consumed`` counts (``"samples"``, the default, or ``"tokens"``).

    >>> as_batch_schedule(32)(1000), as_batch_schedule("0:8 1K:16")(1000)
    (32, 16)
    """
    if isinstance(schedule, bool):
        raise ConfigError(f"batch_schedule must be an int, a config dict or a callable, got {schedule!r}")
    if isinstance(schedule, int):
        check_positive("batch_schedule", schedule)
        return ConstantBatch(schedule)
    if isinstance(schedule, (BatchSchedule, Mapping, str)):
        return batch_schedule_from_config(schedule)
    if callable(schedule):
        unit = getattr(schedule, "unit", "samples")
        if unit not in ("samples", "tokens"):
            raise ConfigError(
                f"a batch schedule must be a function of consumed 'samples' or 'tokens', got unit {unit!r}; "
                "build it on one of those clocks"
            )
        return schedule
    raise ConfigError(f"batch_schedule must be an int, a config dict or a callable, got {type(schedule).__name__}")
