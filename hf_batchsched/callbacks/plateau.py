"""State-based LR policy: cut the learning rate (or switch policy) when an evaluation metric plateaus.

``PlateauCallback`` is ``ReduceLROnPlateau`` for the Hugging Face ``Trainer`` that *composes* with whatever
scheduler is running (warmup + cosine, an ``hf_batchsched`` policy, ...): on a plateau it multiplies every
parameter group's LR by ``factor`` (group ratios such as LoRA+ are kept) and the cut persists through later
scheduler steps. With ``policies`` it instead switches to the next policy in the list, LRBench's
``ChangeLROnPlateau`` (Wu et al. 2019) with its bugs fixed (it reads its own list, monitors ``eval_loss``, uses a
relative threshold, and the new policy's clock starts at the switch).

The decision logic is ``PlateauTracker``, a pure state machine usable without a Trainer; the LR cut is
``scale_learning_rates(optimizer, scheduler, factor)``.

Metrics (through ``trainer.log``, so they reach every ``report_to`` integration), logged at every evaluation:

| name | meaning |
|---|---|
| ``lr/plateau_events`` | number of plateaus detected so far (cuts or switches) |
| ``lr/plateau_scale`` | cumulative LR factor applied by the callback (1.0 = none) |
| ``lr/plateau_bad_evals`` | evaluations since the metric last improved |
| ``lr/plateau_policy_index`` | index of the active policy in ``policies`` (only with ``policies``) |
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from transformers import TrainerCallback

from ..errors import ConfigError, check_choice, check_positive
from ._binding import TrainerBoundCallback
from ._logging import log_metrics
from ._state import load_callback_state, save_callback_state

__all__ = [
    "PlateauCallback",
    "PlateauTracker",
    "load_callback_state",
    "save_callback_state",
    "scale_learning_rates",
]


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
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return [group["lr"] for group in optimizer.param_groups]


def _cut_learning_rates(optimizer, scheduler, scale: float, factor: float, min_scale: float) -> float:
    """One more LR cut by ``factor`` on top of the cumulative ``scale``, floored at ``min_scale``.

    Applies the step from ``scale`` to the new cumulative scale with :func:`scale_learning_rates` and returns the new
    scale; returns ``scale`` unchanged (and touches nothing) when the floor is already reached.
    """
    new_scale = max(scale * factor, min_scale)
    if new_scale < scale:
        scale_learning_rates(optimizer, scheduler, new_scale / scale)
        return new_scale
    return scale


def _check_scheduler_honours_scale(scheduler) -> None:
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


# --------------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------------


def _eval_metric_name(metric: str) -> str:
    return metric if metric.startswith("eval_") else f"eval_{metric}"


class PlateauCallback(TrainerBoundCallback, TrainerCallback):
    """Cut the LR (or switch LR policy) when an evaluation metric stops improving.

    Args:
        trainer (`transformers.Trainer`, *optional*): the trainer; evaluation must be on (``eval_strategy`` not
            ``"no"``). Without it the callback is bound by ``BatchRampTrainer`` or ``hf_batchsched.bind_callbacks``.
        metric (`str`, *optional*, defaults to `"eval_loss"`): the evaluation metric watched (``"loss"`` means
            ``"eval_loss"``, as ``metric_for_best_model``).
        mode (`str`, *optional*, defaults to `"min"`): ``"min"`` if lower is better, ``"max"`` otherwise.
        factor (`float`, *optional*, defaults to `0.5`): LR multiplier on a plateau, in (0, 1).
        patience (`int`, *optional*, defaults to `2`): non-improving evaluations tolerated; the next one acts.
        threshold (`float`, *optional*, defaults to `1e-3`): minimal relative improvement (``threshold_mode="rel"``)
            or absolute improvement (``"abs"``) that counts.
        threshold_mode (`str`, *optional*, defaults to `"rel"`): ``"rel"`` or ``"abs"``.
        cooldown (`int`, *optional*, defaults to `0`): evaluations after a plateau during which none is counted.
        min_lr_ratio (`float`, *optional*, defaults to `0.01`): floor of the cumulative cut, relative to the LR the
            scheduler would give (a relative floor works at any LR scale, unlike an absolute ``min_lr`` such as
            GreedyLR's ``1e-3``, which exceeds typical fine-tuning LRs).
        policies (`list`, *optional*): LR policies (``Policy``, name or config dict) to switch through instead of
            cutting: the run starts with the trainer's ``lr_policy`` (``BatchRampTrainer``) and each plateau moves to
            the next policy of this list, whose clock starts at the switch; after the last one, plateaus are only
            counted. All policies take the trainer policy's unit and need its kind.

    Raises ``ConfigError`` at init when evaluation is off or an argument is invalid, and at the first evaluation
    when ``metric`` is not among the evaluation metrics (the message lists them).

    Example::

        from hf_batchsched.callbacks import PlateauCallback
        trainer.add_callback(PlateauCallback(trainer, metric="eval_loss", factor=0.5, patience=2))
    """

    STATE_KEY = "hf_batchsched.PlateauCallback"

    def __init__(
        self,
        trainer=None,
        metric: str = "eval_loss",
        mode: str = "min",
        factor: float = 0.5,
        patience: int = 2,
        threshold: float = 1e-3,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr_ratio: float = 0.01,
        policies: Sequence | None = None,
    ):
        if not 0 < factor < 1:
            raise ConfigError(f"factor must be in (0, 1) (the LR multiplier on a plateau), got {factor}")
        if not 0 < min_lr_ratio <= 1:
            raise ConfigError(
                f"min_lr_ratio must be in (0, 1] (a floor relative to the scheduled LR), got {min_lr_ratio}"
            )
        self.metric = _eval_metric_name(metric)
        self.factor = float(factor)
        self.min_lr_ratio = float(min_lr_ratio)
        self.tracker = PlateauTracker(mode, patience, threshold, threshold_mode, cooldown)
        if policies is not None and (
            isinstance(policies, (str, dict)) or not isinstance(policies, Sequence) or not policies
        ):
            raise ConfigError(f"policies must be a non-empty list of LR policies, got {policies!r}")
        self._policy_specs = policies
        self.policies = None
        self.events = 0
        self.scale = 1.0
        self.policy_index = 0
        self.switch_points: list[float] = []
        self._base_policy = None
        self._training = False
        if trainer is not None:
            self.bind(trainer)

    def _bind(self, trainer) -> None:
        eval_strategy = str(getattr(trainer.args.eval_strategy, "value", trainer.args.eval_strategy))
        if eval_strategy == "no":
            raise ConfigError(
                "PlateauCallback reacts to evaluation metrics but evaluation is off (eval_strategy='no'); set "
                "eval_strategy='steps' with eval_steps, or 'epoch', and pass an eval_dataset"
            )
        if self._policy_specs is not None:
            self.policies = self._check_policies(trainer, self._policy_specs)

    @staticmethod
    def _check_policies(trainer, policies) -> list:
        from ..schedules.lr_config import lr_policy_from_config

        if isinstance(policies, (str, dict)) or not isinstance(policies, Sequence) or not policies:
            raise ConfigError(f"policies must be a non-empty list of LR policies, got {policies!r}")
        base = getattr(trainer, "lr_policy", None)
        if base is None:
            raise ConfigError(
                "PlateauCallback(policies=...) switches away from the trainer's LR policy, but the trainer has none; "
                "use BatchRampTrainer(..., lr_policy=...) for the policy to start with"
            )
        built = [lr_policy_from_config(policy, unit=base.unit) for policy in policies]
        kinds = {policy.kind for policy in built} | {base.kind}
        if len(kinds) > 1:
            raise ConfigError(
                "PlateauCallback: policies mix absolute LRs (kind='lr') and multipliers with the trainer's lr_policy "
                f"({base.name!r}, kind={base.kind!r}); give them all one kind"
            )
        return built

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "tracker": self.tracker.state_dict(),
            "events": self.events,
            "scale": self.scale,
            "policy_index": self.policy_index,
            "switch_points": list(self.switch_points),
        }

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.events = int(state["events"])
        self.scale = float(state["scale"])
        self.policy_index = int(state["policy_index"])
        self.switch_points = [float(t) for t in state["switch_points"]]

    # ---- events ---------------------------------------------------------------------------------
    def on_train_end(self, args, state, control, **kwargs):
        self._training = False

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._training = True
        saved = load_callback_state(state, self.STATE_KEY)
        if saved is not None:
            self.load_state_dict(saved)
        scheduler = self.trainer.lr_scheduler
        if self.policies is None:
            _check_scheduler_honours_scale(scheduler)
        else:
            if not (hasattr(scheduler, "policy") and hasattr(scheduler, "clock")):
                raise ConfigError(
                    "PlateauCallback(policies=...) needs the trainer's PolicyLRScheduler (BatchRampTrainer with "
                    f"lr_policy=...), found {type(scheduler).__name__}"
                )
            self._base_policy = scheduler.policy
            if self.switch_points:  # resumed after switches: the scheduler came back with the first policy
                self._install_policy(scheduler)
        save_callback_state(state, self.STATE_KEY, self.state_dict())

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = metrics or {}
        if not self._training:
            return  # an evaluation outside train(): nothing to schedule
        if self.metric not in metrics:
            raise ConfigError(
                f"PlateauCallback watches {self.metric!r}, which this evaluation did not log; available metrics: "
                f"{', '.join(sorted(metrics))}. Pass one of them as metric=, or return it from compute_metrics"
            )
        if self.tracker.update(metrics[self.metric]):
            self._on_plateau()
        logs = {
            "lr/plateau_events": self.events,
            "lr/plateau_scale": self.scale,
            "lr/plateau_bad_evals": self.tracker.num_bad_evals,
        }
        if self.policies is not None:
            logs["lr/plateau_policy_index"] = self.policy_index
        save_callback_state(state, self.STATE_KEY, self.state_dict())
        log_metrics(self.trainer, logs)

    def _on_plateau(self) -> None:
        scheduler = self.trainer.lr_scheduler
        if self.policies is None:
            new_scale = _cut_learning_rates(
                self.trainer.optimizer, scheduler, self.scale, self.factor, self.min_lr_ratio
            )
            if new_scale < self.scale:
                self.scale = new_scale
                self.events += 1
            return
        if self.policy_index < len(self.policies):
            now = float(scheduler.clock.value(scheduler.policy.unit))
            if self.switch_points and now <= self.switch_points[-1]:
                return  # two plateaus at the same clock reading: keep the policy that just started
            self.switch_points.append(now)
            self.policy_index += 1
            self.events += 1
            self._install_policy(scheduler)

    def _install_policy(self, scheduler) -> None:
        """Set the scheduler's policy to the base policy, then each switched-to policy from its switch point on."""
        from ..schedules.lr_config import make_lr_policy

        regions = [self._base_policy, *self.policies[: len(self.switch_points)]]
        if len(regions) == 1:
            scheduler.policy = self._base_policy
        else:
            scheduler.policy = make_lr_policy(
                "piecewise", boundaries=list(self.switch_points), regions=regions, unit=self._base_policy.unit
            )
        # Apply the new policy's LR now (the next update uses it), keeping the group ratios.
        lrs = scheduler.get_lr()
        for group, lr in zip(self.trainer.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = list(lrs)
