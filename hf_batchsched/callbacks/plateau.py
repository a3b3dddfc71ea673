"""State-based LR policy: cut the learning rate (or switch policy) when an evaluation metric plateaus.

``PlateauCallback`` is ``ReduceLROnPlateau`` for the Hugging Face ``Trainer`` that *composes* with whatever
scheduler is running (warmup + cosine, an ``hf_batchsched`` policy, ...): on a plateau it multiplies every
parameter group's LR by ``factor`` (group ratios such as LoRA+ are kept) and the cut persists through later
scheduler steps. With ``policies`` it instead switches to the next policy in the list, LRBench's
``ChangeLROnPlateau`` (Wu et al. 2019) with its bugs fixed (it reads its own list, monitors ``eval_loss``, uses a
relative threshold, and the new policy's clock starts at the switch).

The decision logic is ``hf_batchsched.lr_cuts.PlateauTracker``, a pure state machine usable without a Trainer; the
LR cut is ``hf_batchsched.lr_cuts.scale_learning_rates(optimizer, scheduler, factor)``.

Metrics (through ``trainer.log``, so they reach every ``report_to`` integration), logged at every evaluation:

| name | meaning |
|---|---|
| ``lr/plateau_events`` | number of plateaus detected so far (cuts or switches) |
| ``lr/plateau_scale`` | cumulative LR factor applied by the callback (1.0 = none) |
| ``lr/plateau_bad_evals`` | evaluations since the metric last improved |
| ``lr/plateau_policy_index`` | index of the active policy in ``policies`` (only with ``policies``) |
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import TrainerCallback

from ..callback_binding import TrainerBoundCallback, load_callback_state, save_callback_state
from ..errors import ConfigError
from ..lr_cuts import PlateauTracker, check_scheduler_honours_scale, cut_learning_rates
from ..trainer import log_metrics, set_scheduler_lrs

__all__ = ["PlateauCallback"]


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
            check_scheduler_honours_scale(scheduler)
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
            new_scale = cut_learning_rates(
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
        set_scheduler_lrs(scheduler, lrs)
