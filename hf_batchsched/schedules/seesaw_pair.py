"""Seesaw (Meterez et al. 2025, https://arxiv.org/abs/2510.14717): trade LR decay for batch growth, Adam's way.

Wherever an LR policy would multiply the LR by ``alpha < 1``, Seesaw multiplies the LR by ``sqrt(alpha)`` and the
batch by ``1 / alpha`` instead. With Adam's square-root rule (LR ~ sqrt(B)) the noise of the update,
``lr / sqrt(B)``, is the base schedule's at every point of the data, in fewer optimizer steps. The batch is capped
at ``max_batch_size``; from there on the LR takes the rest of the decay.

``seesaw(lr_policy, base_batch_size, max_batch_size)`` returns the pair ``(batch_schedule, lr_schedule)``, both on
the samples (or tokens) clock, so the pair covers the same data as the base run:

- ``r(t) = lr(t) / lr(w)``: the base policy's decay since the end of its warmup ``w`` (``B = B0`` before it);
- the batch is ``B0 * factor**n`` with ``n = floor(log(1 / r) / log(factor))`` (the paper doubles the batch each
  time a step schedule would halve the LR: ``factor=2``; ``factor=None`` follows ``B0 / r`` continuously, rounded
  to ``multiple``), never below ``B0``, capped at ``max_batch_size``;
- the LR is ``lr(t) * sqrt(B(t) / B0)``, so ``lr_seesaw / sqrt(B_seesaw) = lr_base / sqrt(B0)`` at every step
  (it also absorbs the batch's rounding and the cap).

A base policy on ``steps`` is read at ``consumed / B0`` (the steps of the base run at constant ``B0``).
``BatchRampTrainer(batch_schedule=<the SeesawBatch>)`` takes the LR schedule from it (``lr_policy`` must then be
unset); in YAML: ``batch_schedule: {name: seesaw, lr_policy: {...}, base_batch_size: 64, max_batch_size: 512}``.

>>> from hf_batchsched.schedules.lr_config import make_lr_policy
>>> base = make_lr_policy("NSTEP", k0=1e-3, gamma=0.5, l=[1000, 2000, 3000], unit="samples")
>>> batch, lr = seesaw(base, base_batch_size=8, max_batch_size=32)
>>> [(batch(c), f"{lr(c):.4g}") for c in (0, 1000, 2000, 3000)]
[(8, '0.001'), (16, '0.0007071'), (32, '0.0005'), (32, '0.00025')]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigError
from .base import Policy
from .batch_base import BatchSchedule, _check_batch_unit, _positive_int, round_batch_size
from .lr_config import lr_policy_from_config, lr_policy_to_config
from .smith import lr_time_scale

__all__ = ["SeesawBatch", "check_seesaw_pair", "seesaw", "seesaw_lr"]

#: Relative slack when counting how many ``factor``-fold decays the base LR has gone through: a policy that
#: lands exactly on ``lr(w) / factor**n`` (a step schedule) may round a hair above it.
_DECAY_SLACK = 1e-9


@dataclass(frozen=True)
class SeesawBatch(BatchSchedule):
    """The batch schedule of ``seesaw``: ``B0 / r(t)`` in ``factor``-fold jumps, clamped to ``[B0, max_size]``.

    See ``seesaw`` for the arguments. ``lr_batch_exponent`` (1/2) is how the paired LR schedule scales with the batch;
    ``BatchRampTrainer(couple="wd")`` uses it to keep AdamW's time scale.
    """

    lr_policy: Policy
    base_batch_size: int
    max_size: int
    factor: int | None = 2
    warmup: float = 0.0
    multiple: int = 1
    unit: str = "samples"
    time_scale: float = 1.0

    lr_batch_exponent = 0.5

    @property
    def min_size(self) -> int:
        return self.base_batch_size

    def decay(self, consumed: float) -> float:
        """``r(t)``: the base LR relative to its value at the end of warmup (1 before it)."""
        policy_t = consumed * self.time_scale
        if policy_t < self.warmup:
            return 1.0
        return self.lr_policy(policy_t) / self.lr_policy(self.warmup)

    def __call__(self, consumed: float) -> int:
        self._check_consumed(consumed)
        ratio = self.decay(consumed)
        if ratio >= 1:
            return self.base_batch_size
        if ratio <= 0:
            return self.max_size
        growth = 1.0 / ratio
        if self.factor is not None:
            jumps = math.floor(math.log(growth) / math.log(self.factor) + _DECAY_SLACK)
            return min(self.base_batch_size * self.factor**jumps, self.max_size)
        ideal = self.base_batch_size * growth
        if ideal >= self.max_size:
            return self.max_size
        return min(max(round_batch_size(ideal, self.multiple, mode="nearest"), self.base_batch_size), self.max_size)

    def to_config(self) -> dict:
        """The ``seesaw`` arguments that rebuild this schedule (YAML/JSON-ready)."""
        return {
            "name": "seesaw",
            "unit": self.unit,
            "lr_policy": lr_policy_to_config(self.lr_policy),
            "base_batch_size": self.base_batch_size,
            "max_batch_size": self.max_size,
            "factor": self.factor,
            "warmup": self.warmup,
            "multiple": self.multiple,
        }


def seesaw_lr(t: float, *, batch_schedule: SeesawBatch) -> float:
    """Seesaw's LR: the base policy's value times ``sqrt(B(t) / B0)`` (same kind as the base policy)."""
    schedule = batch_schedule
    return schedule.lr_policy(t * schedule.time_scale) * math.sqrt(schedule(t) / schedule.base_batch_size)


def seesaw(
    lr_policy: Policy | Mapping | str,
    base_batch_size: int,
    max_batch_size: int,
    *,
    factor: int | None = 2,
    warmup: float = 0.0,
    unit: str = "samples",
    multiple: int = 1,
) -> tuple[SeesawBatch, Policy]:
    """The Seesaw pair built from ``lr_policy``: ``(batch_schedule, lr_schedule)`` on the ``unit`` clock.

    Args:
        lr_policy (`Policy`, `dict` or `str`): the base LR policy with its decays (cosine, step, WSD, ...), either
            kind (a config is read by ``lr_policy_from_config``). On ``unit`` it
            is read at the consumed samples/tokens; a ``steps`` policy (with ``unit="samples"``) at ``consumed / B0``.
        base_batch_size (`int`): ``B0``, the base run's constant batch (a multiple of ``multiple``).
        max_batch_size (`int`): the cap; rounded down to a multiple of ``multiple``.
        factor (`int`, *optional*, defaults to `2`): the batch grows in jumps of this whole factor (each time the base
            LR has fallen by it; the paper's 2); ``None`` follows ``B0 / r(t)`` continuously (rounded to ``multiple``).
        warmup (`float`, *optional*, defaults to `0.0`): the base policy's warmup length in its unit: until then the
            batch is ``B0`` and the LR the base policy's.
        unit (`str`, *optional*, defaults to `"samples"`): the clock of both schedules.
        multiple (`int`, *optional*, defaults to `1`): batch sizes are multiples of it (micro batch x world size).

    Returns:
        `tuple[SeesawBatch, Policy]`: the batch schedule and the LR schedule.
    """
    if not isinstance(lr_policy, (Policy, Mapping, str)):
        raise ConfigError(f"seesaw takes an LR Policy (see make_lr_policy) or its config, got {lr_policy!r}")
    lr_policy = lr_policy_from_config(lr_policy)
    _check_batch_unit(unit)
    multiple = _positive_int("multiple", multiple)
    base = _positive_int("base_batch_size", base_batch_size)
    if base % multiple:
        raise ConfigError(
            f"seesaw base_batch_size {base} is not a multiple of {multiple} (micro batch x world size); every size "
            f"is a multiple of it: pick base_batch_size = {(base // multiple + 1) * multiple}"
        )
    cap = round_batch_size(_positive_int("max_batch_size", max_batch_size), multiple, mode="down")
    if cap < base:
        raise ConfigError(f"seesaw max_batch_size {max_batch_size} is below base_batch_size {base}; raise it")
    if factor is not None:
        factor = _positive_int("factor", factor)
        if factor < 2:
            raise ConfigError(f"seesaw factor must be a whole number >= 2 (or null for continuous), got {factor}")
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not warmup >= 0 or math.isinf(warmup):
        raise ConfigError(f"seesaw warmup must be a number >= 0 (in the LR policy's unit), got {warmup!r}")
    time_scale = lr_time_scale(lr_policy, unit, base, "the seesaw schedules")
    if not lr_policy(warmup) > 0:
        raise ConfigError(
            f"the base LR at the end of warmup (t = {warmup:g} {lr_policy.unit}) must be > 0, got "
            f"{lr_policy(warmup)!r}; for a policy that warms up from 0 pass warmup=<its length>"
        )
    schedule = SeesawBatch(lr_policy, base, cap, factor, float(warmup), multiple, unit, time_scale)
    lr_schedule = Policy(
        f"seesaw({lr_policy.name})", seesaw_lr, {"batch_schedule": schedule}, unit=unit, kind=lr_policy.kind
    )
    return schedule, lr_schedule


def check_seesaw_pair(batch_schedule, lr_policy, batch_size_multiple: int) -> Policy | None:
    """The LR policy a trainer runs: Seesaw's own with a ``SeesawBatch`` (refusing a second ``lr_policy`` and sizes
    the sampler would round), else ``lr_policy``."""
    if not isinstance(batch_schedule, SeesawBatch):
        return lr_policy
    if lr_policy is not None:
        raise ConfigError(
            "the seesaw batch schedule sets the LR itself (from its lr_policy); remove the trainer's lr_policy and "
            "put the base policy in the seesaw config"
        )
    if batch_schedule.multiple % batch_size_multiple:
        raise ConfigError(
            f"seesaw multiple={batch_schedule.multiple} is not a multiple of the trainer's batch_size_multiple "
            f"(default world_size) {batch_size_multiple}, so the sampler would round its sizes and the LR would not "
            f"match them; build it with multiple={batch_size_multiple}"
        )
    return seesaw(
        batch_schedule.lr_policy,
        batch_schedule.base_batch_size,
        batch_schedule.max_size,
        factor=batch_schedule.factor,
        warmup=batch_schedule.warmup,
        unit=batch_schedule.unit,
        multiple=batch_schedule.multiple,
    )[1]
