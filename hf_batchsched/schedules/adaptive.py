"""``AdaptiveBatchSchedule``: a global batch size that follows the measured gradient noise scale.

McCandlish et al. (2018, https://arxiv.org/abs/1812.06162) show that the critical batch size is about the noise scale
``B_simple = tr(Σ)/|G|²``, and that it grows as the loss falls: below it, a bigger batch buys almost proportionally
fewer optimizer steps; above it, extra samples are mostly wasted. This schedule starts at ``min_size`` and multiplies
the batch by ``growth_factor`` whenever the averaged noise scale (``GradientNoiseScale``, fed by
``NoiseScaleCallback``) exceeds ``growth_threshold`` times the current batch for ``patience`` consecutive checks
(hysteresis: a noise scale hovering around the threshold does not flip the size; AdaptDL/Pollux only switch for a
1.05x predicted gain, hence the default threshold). It only grows, by whole factors (so sizes stay multiples of
``micro_batch * world_size`` if ``min_size`` is one, and BatchNorm/ghost-batch shapes stay whole), and never beyond
``max_size`` (the largest ``min_size * growth_factor**k`` not above the cap; OLMo-core's integer-factor rule).

Determinism: the schedule is a pure function of its state, the list of ``events`` (each ``{"effective_from": c,
"to": size, ...}``): ``schedule(consumed)`` is the size of the last event with ``effective_from <= consumed``.
Decisions are a deterministic function of the estimator's state and the check counter, all in ``state_dict``; the
callback computes the estimate from all-reduced norms, so every DDP rank takes the same decision, and a resumed run
takes the same decisions as the uninterrupted one. A decision made when the clock reads ``c`` takes effect at
``c + prefetched_batches * current_size``: batches a DataLoader has already requested keep their size, so the sizes
never depend on prefetch timing.

LR coupling (``lr_scaling``): ``lr_scale_at(consumed)`` is ``(size / min_size)`` (``"linear"``, SGD, Goyal et al.)
or its square root (``"sqrt"``, Adam, Malladi et al. 2022). ``BatchRampTrainer`` applies it as its LR coupling
(``couple="lr=<lr_scaling>"``, ``hf_batchsched.coupling``): every param group's LR is multiplied by it just before
each ``optimizer.step()`` and the scheduler's LR is put back right after, so it composes with any LR scheduler and the
logged ``learning_rate`` stays the scheduler's (the factor is logged as ``batchsched/lr_scale``). Giving the trainer
a ``couple`` with another LR rule as well is refused.

The Trainer's horizon: ``BatchRampTrainer`` plans the run with the schedule's state at ``train()`` time (the initial
size): the run ends when the data stream does, in fewer steps than planned. Use an LR policy on the ``samples`` clock
(``lr_policy=make_lr_policy(..., unit="samples")``) so decay follows the data, not the (shorter) step count.

Example:

>>> schedule = AdaptiveBatchSchedule(min_size=32, max_size=256, patience=2, warmup_updates=0)
>>> for _ in range(2):                          # noise scale ~100 > 1.05 x 32 twice: grow to 64 at once
...     schedule.estimator.update_estimates(g2=1.0, trace_sigma=100.0)
...     event = schedule.observe(consumed=640)
>>> event["from"], event["to"], schedule(639), schedule(640), schedule.current_size
(32, 64, 32, 64, 64)
>>> for _ in range(4):                          # 100 > 1.05 x 64 twice more: 128; then 100 < 1.05 x 128: stays
...     schedule.estimator.update_estimates(g2=1.0, trace_sigma=100.0)
...     _ = schedule.observe(consumed=1000)
>>> [e["to"] for e in schedule.events], schedule.max_size
([64, 128], 256)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from ..errors import ConfigError, check_choice, check_positive
from ..probes.noise_scale import GradientNoiseScale
from .batch_base import BatchSchedule

__all__ = ["LR_SCALINGS", "AdaptiveBatchSchedule"]

logger = logging.getLogger(__name__)

LR_SCALINGS = ("linear", "sqrt")
_LR_EXPONENT = {None: 0.0, "linear": 1.0, "sqrt": 0.5}


def _positive_int(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


class AdaptiveBatchSchedule(BatchSchedule):
    """Global batch size that grows by whole factors while the measured noise scale is above it.

    Args:
        min_size (`int`): the starting (and smallest) global batch in samples; make it a multiple of
            ``max_micro_batch_size * world_size`` (``NoiseScaleCallback`` checks).
        max_size (`int`): the cap; the schedule stops at the largest ``min_size * growth_factor**k <= max_size``
            (``self.max_size``). Smith et al. stop growing near a tenth of the dataset.
        growth_factor (`int`, *optional*, defaults to `2`): the whole factor the batch is multiplied by.
        growth_threshold (`float`, *optional*, defaults to `1.05`): grow when ``noise_scale > growth_threshold *
            current_size``; above 1 is a margin against noise, below 1 grows earlier.
        patience (`int`, *optional*, defaults to `3`): consecutive checks the condition must hold (any failing check
            resets the count; so does a growth).
        warmup_updates (`int`, *optional*, defaults to `10`): estimator updates before the first check (early
            estimates rest on few measurements).
        lr_scaling (`str`, *optional*): ``"linear"`` or ``"sqrt"`` to scale the LR with ``size / min_size``;
            ``None`` (default) leaves the LR alone (Smith et al.: the growing batch replaces LR decay).
        beta (`float`, *optional*, defaults to `0.99`): EMA decay of the owned ``GradientNoiseScale`` estimator.
        multiple (`int`, *optional*, defaults to `1`): micro batch x world size; ``min_size`` must be a multiple of it
            (so is every size, ``min_size * growth_factor**k``).
        unit (`str`, *optional*, defaults to `"samples"`): the clock; only ``"samples"`` (a config may name it).

    ``unit`` is ``"samples"``: ``consumed`` is the clock's consumed samples. ``online`` is ``True``: the sizes depend
    on measurements, so ``simulate`` and ``hf-batchsched plot`` refuse the schedule (``RampBatchSampler.plan`` lays
    out the run at the current size).

    In a config (YAML, ``BatchRampTrainer(batch_schedule={...})``) its name is ``"adaptive"``:

    >>> from hf_batchsched.schedules.batch_config import batch_schedule_from_config
    >>> schedule = batch_schedule_from_config({"name": "adaptive", "min_size": 16, "max_size": 100, "patience": 2})
    >>> type(schedule).__name__, schedule.max_size, schedule(0)
    ('AdaptiveBatchSchedule', 64, 16)
    """

    unit = "samples"
    online = True

    def __init__(
        self,
        min_size: int,
        max_size: int,
        *,
        growth_factor: int = 2,
        growth_threshold: float = 1.05,
        patience: int = 3,
        warmup_updates: int = 10,
        lr_scaling: str | None = None,
        beta: float = 0.99,
        multiple: int = 1,
        unit: str = "samples",
    ):
        if unit != "samples":
            raise ConfigError(f"the adaptive batch schedule counts samples, got unit {unit!r}; leave 'unit' out")
        self.min_size = _positive_int("min_size", min_size)
        requested_max = _positive_int("max_size", max_size)
        if requested_max < self.min_size:
            raise ConfigError(f"max_size={max_size} is below min_size={min_size}; the batch only grows")
        self.growth_factor = _positive_int("growth_factor", growth_factor)
        if self.growth_factor < 2:
            raise ConfigError(f"growth_factor must be a whole factor >= 2, got {growth_factor}")
        check_positive("growth_threshold", growth_threshold)
        self.growth_threshold = float(growth_threshold)
        self.patience = _positive_int("patience", patience)
        if isinstance(warmup_updates, bool) or not isinstance(warmup_updates, int) or warmup_updates < 0:
            raise ConfigError(f"warmup_updates must be an integer >= 0, got {warmup_updates!r}")
        self.warmup_updates = warmup_updates
        if lr_scaling is not None:
            check_choice("lr_scaling", lr_scaling, LR_SCALINGS)
        self.lr_scaling = lr_scaling
        self.requested_max_size = requested_max
        reachable = self.min_size
        while reachable * self.growth_factor <= requested_max:
            reachable *= self.growth_factor
        self.max_size = reachable
        multiple = _positive_int("multiple", multiple)
        if self.min_size % multiple:
            raise ConfigError(
                f"adaptive min_size {min_size} is not a multiple of {multiple} (micro_batch_size * world_size); every "
                f"size is min_size x growth_factor**k, so pick min_size = {(min_size // multiple + 1) * multiple}"
            )
        self.estimator = GradientNoiseScale(beta=beta)
        self.events: list[dict] = []
        self.checks_passed = 0

    # ---- the schedule ---------------------------------------------------------------------------
    def __call__(self, consumed: float) -> int:
        self._check_consumed(consumed)
        size = self.min_size
        for event in self.events:
            if consumed >= event["effective_from"]:
                size = event["to"]
        return size

    @property
    def current_size(self) -> int:
        """The size the latest decision asked for (it may not have taken effect yet)."""
        return self.events[-1]["to"] if self.events else self.min_size

    def lr_scale_at(self, consumed: float) -> float:
        """LR multiplier for the step starting at ``consumed``: ``(size / min_size) ** p``, ``p`` = 1, 1/2 or 0.

        >>> AdaptiveBatchSchedule(16, 64, lr_scaling="sqrt").lr_scale_at(0)
        1.0
        """
        return (self(consumed) / self.min_size) ** _LR_EXPONENT[self.lr_scaling]

    @property
    def lr_scale(self) -> float:
        """LR multiplier at ``current_size``."""
        return (self.current_size / self.min_size) ** _LR_EXPONENT[self.lr_scaling]

    # ---- decisions ------------------------------------------------------------------------------
    def should_grow(self, noise_scale: float, size: int) -> bool:
        """One check's condition: ``noise_scale > growth_threshold * size`` (``nan`` never passes)."""
        return not math.isnan(noise_scale) and noise_scale > self.growth_threshold * size

    def observe(self, consumed: int, prefetched_batches: int = 0, step: int | None = None) -> dict | None:
        """Run one check on the estimator's current noise scale; return the new event if the batch grows.

        Args:
            consumed (`int`): consumed samples (the clock) after the step just measured.
            prefetched_batches (`int`, *optional*, defaults to `0`): batches the DataLoader has already requested
                past ``consumed`` (``num_workers * prefetch_factor``); the change starts after them.
            step (`int`, *optional*): the optimizer step, recorded in the event for the log.

        No check is counted during ``warmup_updates``, while a previous change has not yet taken effect, or at the
        cap.
        """
        if self.estimator.num_updates < self.warmup_updates:
            return None
        if self.events and consumed < self.events[-1]["effective_from"]:
            return None
        size = self.current_size
        if size * self.growth_factor > self.max_size:
            return None
        noise_scale = self.estimator.noise_scale
        self.checks_passed = self.checks_passed + 1 if self.should_grow(noise_scale, size) else 0
        if self.checks_passed < self.patience:
            return None
        self.checks_passed = 0
        event = {
            "step": step,
            "consumed": int(consumed),
            "effective_from": int(consumed + prefetched_batches * size),
            "from": size,
            "to": size * self.growth_factor,
            "noise_scale": noise_scale,
        }
        self.events.append(event)
        logger.info(
            "AdaptiveBatchSchedule: noise scale %.4g > %.3g x %d for %d checks; global batch %d -> %d from sample %d",
            noise_scale,
            self.growth_threshold,
            size,
            self.patience,
            size,
            event["to"],
            event["effective_from"],
        )
        return event

    # ---- state ----------------------------------------------------------------------------------
    def to_config(self) -> dict:
        return {
            "name": "adaptive",
            "unit": self.unit,
            "min_size": self.min_size,
            "max_size": self.requested_max_size,
            "growth_factor": self.growth_factor,
            "growth_threshold": self.growth_threshold,
            "patience": self.patience,
            "warmup_updates": self.warmup_updates,
            "lr_scaling": self.lr_scaling,
            "beta": self.estimator.beta,
        }

    def state_dict(self) -> dict:
        """Decisions so far, the check counter, the estimator, and the config (checked on load)."""
        return {
            "config": self.to_config(),
            "events": [dict(event) for event in self.events],
            "checks_passed": self.checks_passed,
            "estimator": self.estimator.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if dict(state["config"]) != self.to_config():
            raise ConfigError(
                f"adaptive batch schedule state was saved with {dict(state['config'])} but this schedule is "
                f"{self.to_config()}; resume with the same settings"
            )
        self.events = [dict(event) for event in state["events"]]
        self.checks_passed = int(state["checks_passed"])
        self.estimator.load_state_dict(state["estimator"])

    def reset(self) -> None:
        """Back to ``min_size`` with a fresh estimator (a new run)."""
        self.events = []
        self.checks_passed = 0
        self.estimator.reset()

    def __repr__(self) -> str:
        return (
            f"AdaptiveBatchSchedule(min_size={self.min_size}, max_size={self.max_size}, "
            f"growth_factor={self.growth_factor}, current_size={self.current_size}, events={len(self.events)})"
        )
