"""Coupling the optimizer's hyperparameters to the batch size: LR, AdamW weight decay and the Adam betas.

When the global batch grows from ``B0`` (the first step's) to ``B = k B0``, the settings tuned at ``B0`` stop
meaning what they meant. ``Coupling`` names the rules to apply; ``BatchRampTrainer(couple=...)`` applies them to
every optimizer step, from the step's actual global batch, for any batch schedule (the adaptive one included):

- ``lr="sqrt"``: LR x ``sqrt(k)`` (Adam-type optimizers: Malladi et al. 2022's SDE rule; OLMo-core's batch-size
  scheduler); ``lr="linear"``: LR x ``k`` (SGD: Goyal et al. 2017); ``None``: the LR is not coupled.
- ``weight_decay=True``: AdamW's time scale ``tau = B / (lr lambda D)`` (Wang & Aitchison 2024; Bergsma et al. 2025)
  is kept: ``lambda' = lambda k / s`` with ``s`` the LR factor above (``sqrt(k)`` under ``"sqrt"``, ``k`` under
  ``"linear"``, ``1`` without LR coupling; under a Seesaw schedule, whose LR already carries ``sqrt(k)``, that
  factor: ``lambda' = lambda sqrt(k)``). The LR policy's own decay is not compensated: ``tau`` is the time scale at
  the policy's LR.
- ``betas=True``: the half-lives of Adam's ``beta1`` and ``beta2``, counted in samples, are kept: ``beta' = beta**k``
  (Marek et al. 2025; the SDE rule of Malladi et al.).

The factors multiply what the LR policy / scheduler and the optimizer's param groups hold, group by group (so the
ratios between groups, e.g. LoRA+, are kept), for the optimizer step only: they are set right before
``optimizer.step()`` (``on_pre_optimizer_step``) and the groups' own values are put back right after it
(``on_optimizer_step``), so the scheduler, the saved optimizer state and every other callback see the uncoupled
values. ``B0`` is stored in the checkpoint's ramp state, so a resumed run applies exactly the same factors.

A config is a ``Coupling``, a dict (``{"lr": "sqrt", "weight_decay": true, "betas": true}``) or a string of
comma-separated items: ``"lr=sqrt"``, ``"lr=linear"``, ``"wd"`` (or ``weight_decay``), ``"betas"``; ``"none"`` or
``""`` is no coupling.

>>> Coupling.parse("lr=sqrt,wd,betas")
Coupling(lr='sqrt', weight_decay=True, betas=True)
>>> c = Coupling(lr="sqrt", weight_decay=True, betas=True)
>>> c.lr_scale(4.0), c.weight_decay_scale(4.0), round(c.beta(0.9, 4.0), 6)
(2.0, 2.0, 0.6561)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

from transformers import TrainerCallback

from .errors import ConfigError, check_choice

__all__ = ["COUPLED_LR_RULES", "Coupling", "CouplingCallback", "resolve_coupling"]

logger = logging.getLogger(__name__)

#: LR rules and their exponent p (LR x k**p).
COUPLED_LR_RULES = {"sqrt": 0.5, "linear": 1.0}
_WD_NAMES = ("wd", "weight_decay")


@dataclasses.dataclass(frozen=True)
class Coupling:
    """Which optimizer hyperparameters follow the batch size (see the module docstring for the rules).

    Args:
        lr (`str`, *optional*): ``"sqrt"``, ``"linear"`` or ``None`` (not coupled).
        weight_decay (`bool`, *optional*, defaults to `False`): keep AdamW's time scale ``B / (lr lambda D)``.
        betas (`bool`, *optional*, defaults to `False`): keep the half-lives of Adam's ``beta1`` and ``beta2`` in
            samples (``beta' = beta ** (B / B0)``).
    """

    lr: str | None = None
    weight_decay: bool = False
    betas: bool = False

    def __post_init__(self):
        if self.lr is not None:
            check_choice("couple lr", self.lr, COUPLED_LR_RULES)
        for name in ("weight_decay", "betas"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"couple {name} must be true or false, got {getattr(self, name)!r}")

    # ---- configs ---------------------------------------------------------------------------------
    @classmethod
    def parse(cls, value) -> Coupling | None:
        """A ``Coupling`` from a ``Coupling``, a dict, a string like ``"lr=sqrt,wd,betas"`` or ``None``; ``None``
        when nothing is coupled."""
        if value is None or isinstance(value, Coupling):
            coupling = value
        elif isinstance(value, Mapping):
            fields = {item.name for item in dataclasses.fields(cls)}
            params = {("weight_decay" if key == "wd" else key): item for key, item in value.items()}
            unknown = sorted(set(params) - fields)
            if unknown:
                raise ConfigError(
                    f"couple got unknown key(s) {', '.join(map(str, unknown))}; it takes lr (sqrt, linear or null), "
                    "weight_decay (true/false) and betas (true/false)"
                )
            coupling = cls(**params)
        elif isinstance(value, str):
            coupling = cls(**_parse_string(value))
        else:
            raise ConfigError(f"couple must be a Coupling, a dict or a string like 'lr=sqrt,wd,betas', got {value!r}")
        return coupling if coupling is not None and coupling.active else None

    def to_config(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        items = [f"lr={self.lr}"] if self.lr else []
        items += ["wd"] if self.weight_decay else []
        items += ["betas"] if self.betas else []
        return ",".join(items) or "none"

    @property
    def active(self) -> bool:
        return self.lr is not None or self.weight_decay or self.betas

    # ---- the rules (k = B / B0) ------------------------------------------------------------------
    def lr_scale(self, k: float) -> float:
        """LR factor: ``k ** p`` (``p`` = 1/2 for ``"sqrt"``, 1 for ``"linear"``, 0 without LR coupling)."""
        return float(k) ** COUPLED_LR_RULES.get(self.lr, 0.0)

    def weight_decay_scale(self, k: float, schedule_lr_exponent: float = 0.0) -> float:
        """Weight-decay factor keeping ``B / (lr lambda)`` fixed: ``k / lr_scale(k)`` (1 when not coupled); with a
        batch schedule whose paired LR already grows as ``k ** schedule_lr_exponent`` (Seesaw: 1/2), that too."""
        if not self.weight_decay:
            return 1.0
        return float(k) / (self.lr_scale(k) * float(k) ** schedule_lr_exponent)

    def beta(self, beta: float, k: float) -> float:
        """``beta ** k`` (the same half-life in samples) when the betas are coupled, else ``beta``."""
        return float(beta) ** float(k) if self.betas else float(beta)


def _parse_string(text: str) -> dict:
    params: dict = {}
    for raw in text.split(","):
        item = raw.strip().lower()
        if item in ("", "none", "off"):
            continue
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key == "lr" and value:
            params["lr"] = None if value in ("none", "null", "off") else value
        elif key in _WD_NAMES and value in ("", "true", "1", "on"):
            params["weight_decay"] = True
        elif key == "betas" and value in ("", "true", "1", "on"):
            params["betas"] = True
        else:
            raise ConfigError(
                f"couple: cannot read {raw.strip()!r} in {text!r}; give comma-separated items from lr=sqrt, "
                "lr=linear, wd, betas (e.g. 'lr=sqrt,wd,betas')"
            )
    return params


def resolve_coupling(couple, batch_schedule) -> Coupling | None:
    """The trainer's coupling: ``couple`` merged with an ``AdaptiveBatchSchedule``'s ``lr_scaling`` (one mechanism
    applies both); refuses the two when they name different LR rules, and an LR rule next to a batch schedule whose
    paired LR already follows the batch (Seesaw)."""
    coupling = Coupling.parse(couple)
    if coupling is not None and coupling.lr and getattr(batch_schedule, "lr_batch_exponent", 0):
        raise ConfigError(
            f"the {type(batch_schedule).__name__} schedule's LR already grows with the batch (x sqrt(B/B0)); "
            f"couple lr={coupling.lr} would scale it twice: drop lr= from couple (wd and betas compose with it)"
        )
    scaling = getattr(batch_schedule, "lr_scaling", None)
    if scaling is None:
        return coupling
    if coupling is not None and coupling.lr not in (None, scaling):
        raise ConfigError(
            f"the adaptive batch schedule has lr_scaling={scaling!r} but couple has lr={coupling.lr!r}; they are the "
            "same LR coupling: set one of them (couple='lr=...' or lr_scaling), not both"
        )
    return dataclasses.replace(coupling or Coupling(), lr=scaling)


def _inner(optimizer):
    """The torch optimizer under accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def check_optimizer(coupling: Coupling, optimizer) -> None:
    """Refuse, in one line, an optimizer whose hyperparameters the coupling cannot set exactly."""
    inner = _inner(optimizer)
    name = type(inner).__name__
    groups = optimizer.param_groups
    if coupling.weight_decay:
        decoupled = "adamw" in name.lower() or all(group.get("decoupled_weight_decay") for group in groups)
        if not decoupled or any("weight_decay" not in group for group in groups):
            raise ConfigError(
                f"couple weight_decay keeps AdamW's decoupled weight-decay time scale, but the optimizer is {name} "
                "(no decoupled weight_decay); use an AdamW optimizer (optim='adamw_torch') or drop 'wd' from couple"
            )
        if not any(float(group["weight_decay"]) > 0 for group in groups):
            raise ConfigError(
                "couple weight_decay has nothing to scale: every param group has weight_decay 0; set "
                "TrainingArguments(weight_decay=...) > 0 or drop 'wd' from couple"
            )
    if coupling.betas:
        has_betas = all(isinstance(group.get("betas"), (tuple, list)) and len(group["betas"]) == 2 for group in groups)
        if "adam" not in name.lower() or not has_betas:
            raise ConfigError(
                f"couple betas sets Adam's (beta1, beta2), but the optimizer is {name}, which has no Adam betas; use "
                "an Adam-type optimizer (optim='adamw_torch') or drop 'betas' from couple"
            )


class CouplingCallback(TrainerCallback):
    """Applies a ``Coupling`` around every optimizer step of a ``BatchRampTrainer`` (added by the trainer).

    ``base_batch_size`` (``B0``) is the first step's global batch; the trainer saves and restores it with the ramp
    state. ``last`` holds what the last step used (``lr_scale``, ``weight_decay``, ``beta1``, ``beta2`` of group 0).
    """

    def __init__(self, trainer, coupling: Coupling):
        self.trainer = trainer
        self.coupling = coupling
        self.base_batch_size: int | None = None
        self.last: dict[str, float] = {}
        self._restore: list[dict] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.sharding_engine in ("zero0", "zero1", "zero2", "zero3"):
            raise ConfigError(
                f"couple is not supported under DeepSpeed ({self.trainer.sharding_engine}): the engine steps inside "
                "the last micro-chunk's backward, before the step's hyperparameters could be set; use DDP or FSDP2"
            )
        check_optimizer(self.coupling, self.trainer.optimizer)

    def factor(self) -> float:
        """``k = B / B0`` for the step about to be taken (``B``: its global batch)."""
        size = self.trainer.last_batch_size
        if self.base_batch_size is None:
            self.base_batch_size = size
        return size / self.base_batch_size

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        coupling, k = self.coupling, self.factor()
        schedule_exponent = getattr(self.trainer.batch_schedule, "lr_batch_exponent", 0.0)
        lr_scale, wd_scale = coupling.lr_scale(k), coupling.weight_decay_scale(k, schedule_exponent)
        groups = self.trainer.optimizer.param_groups
        self._restore = [
            {key: group[key] for key in ("lr", "weight_decay", "betas") if key in group} for group in groups
        ]
        for group in groups:
            group["lr"] = group["lr"] * lr_scale
            if coupling.weight_decay:
                group["weight_decay"] = group["weight_decay"] * wd_scale
            if coupling.betas:
                group["betas"] = tuple(coupling.beta(beta, k) for beta in group["betas"])
        first = groups[0]
        self.last = {"batchsched/lr_scale": lr_scale}
        if coupling.weight_decay:
            self.last["batchsched/weight_decay"] = float(first["weight_decay"])
        if coupling.betas:
            self.last["batchsched/beta1"], self.last["batchsched/beta2"] = (float(b) for b in first["betas"])

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._restore is not None:
            for group, saved in zip(self.trainer.optimizer.param_groups, self._restore):
                group.update(saved)
            self._restore = None

    def state_dict(self) -> dict:
        return {"couple": self.coupling.to_config(), "base_batch_size": self.base_batch_size}
