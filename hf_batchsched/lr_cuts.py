"""LR cuts on top of whatever scheduler is running: *how* (``scale_learning_rates``, ``cut_learning_rates``) and
*when* a plateau calls for one (``PlateauTracker``, a pure state machine usable without a Trainer).

``PlateauCallback`` and ``SpikeGuardCallback`` are the thin shells that drive these from Trainer events. The one
private scheduler attribute an LR cut has to update (torch's last LRs) is written through
``hf_batchsched.trainer.set_scheduler_lrs``.
"""

from __future__ import annotations

import math

from .errors import ConfigError, check_choice, check_positive
from .trainer import set_scheduler_lrs

__all__ = ["PlateauTracker", "check_scheduler_honours_scale", "cut_learning_rates", "scale_learning_rates"]


# --------------------------------------------------------------------------------------------------
# LR scaling that composes with the running scheduler
# --------------------------------------------------------------------------------------------------


def scale_learning_rates(optimizer, scheduler, factor: float) -> list[float]:
    """Multiply every parameter group's learning rate by ``factor`` now and in every later scheduler step.

    The optimizer's ``param_groups[i]["lr"]`` are scaled at once (the next update uses them). So that the next
    ``scheduler.step()`` does not undo the cut, the scheduler is told too:

    - a scheduler with an ``lr_scale`` attribute (``hf_batchsched``'s ``PolicyLRScheduler``) has it multiplied;
    - a scheduler with ``base_lrs`` (``LambdaLR``, i.e. every ``lr_scheduler_type`` of transformers, and torch's
      closed-form schedulers) has them multiplied; chainable torch schedulers and ``ReduceLROnPlateau`` build
      on the group LRs, which are already scaled.

    Both live in the scheduler's ``state_dict``, so the cut survives checkpoint and resume.

    Args:
        optimizer (`torch.optim.Optimizer`): the optimizer (the Trainer's, possibly accelerate-wrapped).
        scheduler (`LRScheduler`, *optional*): the running scheduler, or ``None``.
        factor (`float`): the multiplier, > 0.

    Returns:
        `list[float]`: the new group learning rates.

    Example:

    >>> import torch
    >>> params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    >>> opt = torch.optim.SGD([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 1.6}])
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    >>> [round(lr, 6) for lr in scale_learning_rates(opt, sched, 0.5)]
    [0.05, 0.8]
    >>> opt.step(); sched.step()
    >>> [round(lr, 6) for lr in sched.get_last_lr()]  # the schedule's 1/2 times the cut's 1/2
    [0.025, 0.4]
    """
    if not factor > 0 or not math.isfinite(factor):
        raise ConfigError(f"an LR scale factor must be a finite number > 0, got {factor}")
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
    if scheduler is not None:
        if hasattr(scheduler, "lr_scale"):
            scheduler.lr_scale = scheduler.lr_scale * factor
        elif hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        set_scheduler_lrs(scheduler, [group["lr"] for group in optimizer.param_groups])
    return [group["lr"] for group in optimizer.param_groups]


def cut_learning_rates(optimizer, scheduler, scale: float, factor: float, min_scale: float) -> float:
    """One more LR cut by ``factor`` on top of the cumulative ``scale``, floored at ``min_scale``.

    Applies the step from ``scale`` to the new cumulative scale with :func:`scale_learning_rates` and returns the new
    scale; returns ``scale`` unchanged (and touches nothing) when the floor is already reached.
    """
    new_scale = max(scale * factor, min_scale)
    if new_scale < scale:
        scale_learning_rates(optimizer, scheduler, new_scale / scale)
        return new_scale
    return scale


def check_scheduler_honours_scale(scheduler) -> None:
    """A ``PolicyLRScheduler`` on an absolute-LR policy ignores ``base_lrs`` scaling: it needs ``lr_scale``."""
    policy = getattr(scheduler, "policy", None)
    if policy is not None and getattr(policy, "kind", None) == "lr" and not hasattr(scheduler, "lr_scale"):
        raise ConfigError(
            f"{type(scheduler).__name__} on the absolute-LR policy {policy.name!r} has no 'lr_scale' attribute, so an "
            "LR cut would be undone at the next step; update hf_batchsched or use a multiplier policy"
        )


# --------------------------------------------------------------------------------------------------
# The decision logic (functional twin)
# --------------------------------------------------------------------------------------------------


class PlateauTracker:
    """Detects plateaus of a metric, like torch's ``ReduceLROnPlateau``.

    A value is an improvement iff it beats the best so far by more than ``threshold`` (relative: ``v < best *
    (1 - threshold)`` for ``mode="min"``, ``v > best * (1 + threshold)`` for ``"max"``; absolute: ``best -
    threshold`` / ``best + threshold``). After more than ``patience`` evaluations without improvement,
    ``update`` returns ``True`` (a plateau), resets the count and starts ``cooldown`` evaluations during which
    bad evaluations are not counted. (torch's relative test uses ``best * (1 -/+ threshold)``, which is lenient
    for negative metrics; here the margin is ``|best| * threshold``. For positive metrics the two agree, tested.)

    Example (patience 2: the third non-improving evaluation is a plateau):

    >>> tracker = PlateauTracker(mode="min", patience=2, threshold=1e-3)
    >>> [tracker.update(v) for v in (1.0, 0.9, 0.9, 0.9, 0.9, 0.85, 0.8)]
    [False, False, False, False, True, False, False]
    """

    def __init__(
        self,
        mode: str = "min",
        patience: int = 2,
        threshold: float = 1e-3,
        threshold_mode: str = "rel",
        cooldown: int = 0,
    ):
        check_choice("mode", mode, ("min", "max"))
        check_choice("threshold_mode", threshold_mode, ("rel", "abs"))
        check_positive("patience", patience, allow_zero=True)
        check_positive("threshold", threshold, allow_zero=True)
        check_positive("cooldown", cooldown, allow_zero=True)
        self.mode, self.patience, self.threshold = mode, int(patience), float(threshold)
        self.threshold_mode, self.cooldown = threshold_mode, int(cooldown)
        self.best: float | None = None
        self.num_bad_evals = 0
        self.cooldown_counter = 0

    def is_better(self, value: float) -> bool:
        if self.best is None:
            return True
        sign = 1.0 if self.mode == "min" else -1.0
        if self.threshold_mode == "rel":
            margin = abs(self.best) * self.threshold
        else:
            margin = self.threshold
        return sign * (self.best - value) > margin

    def update(self, value: float) -> bool:
        """Record one evaluation; ``True`` when it completes a plateau (act now)."""
        value = float(value)
        if math.isnan(value):
            bad = True
        else:
            bad = not self.is_better(value)
            if not bad:
                self.best = value
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_evals = 0
        elif bad:
            self.num_bad_evals += 1
        else:
            self.num_bad_evals = 0
        if self.num_bad_evals > self.patience:
            self.num_bad_evals = 0
            self.cooldown_counter = self.cooldown
            return True
        return False

    def state_dict(self) -> dict:
        return {"best": self.best, "num_bad_evals": self.num_bad_evals, "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]
        self.num_bad_evals = int(state["num_bad_evals"])
        self.cooldown_counter = int(state["cooldown_counter"])
