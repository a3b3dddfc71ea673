"""``PolicyLRScheduler``: a torch LR scheduler that reads a ``TrainingClock`` and applies a ``Policy``.

With a moving batch size, optimizer steps stop measuring progress; a policy on the ``samples`` or ``tokens``
clock keeps warmup and decay at the same point of the data however the batch grows. The scheduler has no
counter of its own: every ``step()`` sets each group's LR to ``group_lrs_at(policy, clock.value(unit), initial_lrs)``
(group ratios, e.g. LoRA+, are kept), so after a checkpoint restore of the clock the LR is exactly the pure
function's value.

Example:

>>> import torch
>>> from hf_batchsched.clock import TrainingClock
>>> from hf_batchsched.schedules.lr_config import make_lr_policy
>>> clock = TrainingClock()
>>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
>>> policy = make_lr_policy("linear_decay", total=100, unit="samples")
>>> scheduler = PolicyLRScheduler(optimizer, policy, clock)
>>> optimizer.step(); clock.advance(samples=25); scheduler.step()
>>> [round(lr, 6) for lr in scheduler.get_last_lr()]
[0.075]
"""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LRScheduler

from ..clock import TrainingClock
from ..errors import ConfigError
from .base import Policy
from .lr import group_lrs_at

__all__ = ["PolicyLRScheduler"]


class PolicyLRScheduler(LRScheduler):
    """Sets every parameter group's LR from ``policy`` evaluated on ``clock`` in the policy's unit.

    Args:
        optimizer (`torch.optim.Optimizer`): the optimizer; its groups' LRs at construction are the base LRs.
        policy (`Policy`): an LR policy (``kind="lr"``: absolute LR of group 0, other groups keep their ratio;
            ``kind="multiplier"``: factor of each group's base LR).
        clock (`TrainingClock`): the clock the policy reads (the Trainer advances it after every step).
        last_epoch (`int`, *optional*, defaults to `-1`): passed to ``LRScheduler``.

    Every LR is checked before it is applied: a policy that gives a negative, infinite or NaN learning rate raises
    a ``ConfigError`` naming the policy, the clock reading and the value, and the optimizer's param groups are left
    as they were (at construction: before ``LRScheduler`` records ``initial_lr``; at ``step()``: before any group's
    LR changes). Group 0's base LR must be > 0: a ``kind="multiplier"`` policy scales it, and a ``kind="lr"`` policy
    keeps the other groups' ratios to it.

    >>> import torch
    >>> from hf_batchsched.schedules.base import Policy
    >>> def overshoot(t):
    ...     return 1e-3 - 1e-4 * t  # a linear decay that runs past zero after t = 10
    >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    >>> clock = TrainingClock()
    >>> scheduler = PolicyLRScheduler(optimizer, Policy("overshoot", overshoot), clock)
    >>> clock.advance(samples=4, steps=11)
    >>> try:
    ...     scheduler.step()
    ... except ConfigError as error:
    ...     print(str(error).split(";")[0])
    LR policy 'overshoot' gives learning rate -0.0001 for param group 0 at steps = 11
    >>> optimizer.param_groups[0]["lr"]  # untouched
    0.001
    """

    def __init__(self, optimizer, policy: Policy, clock: TrainingClock, last_epoch: int = -1):
        self.policy = policy
        self.clock = clock
        # Validate before LRScheduler.__init__ writes ``initial_lr`` into the groups and applies the first LR.
        base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
        self._check_base_lrs(base_lrs)
        self._policy_lrs(base_lrs)
        super().__init__(optimizer, last_epoch)

    #: Extra factor on every group's LR, set by state-based callbacks (``PlateauCallback``, ``SpikeGuardCallback``
    #: through ``scale_learning_rates``); an instance value is part of ``state_dict``, so it survives resume.
    lr_scale: float = 1.0

    def get_lr(self) -> list[float]:
        return self._policy_lrs(self.base_lrs)

    def step(self, epoch: int | None = None) -> None:
        """Set every group's LR to the policy's value at the clock's current reading (checked first)."""
        self._policy_lrs(self.base_lrs)  # raises before LRScheduler.step touches a counter or a param group
        super().step(epoch)

    def _check_base_lrs(self, base_lrs: list[float]) -> None:
        name = self.policy.name
        if not base_lrs:
            raise ConfigError("the optimizer has no param groups; PolicyLRScheduler has nothing to schedule")
        first = float(base_lrs[0])
        if first > 0 and math.isfinite(first):
            return
        if self.policy.kind == "multiplier":
            raise ConfigError(
                f"LR policy {name!r} is a multiplier of the optimizer's learning rate, but param group 0 starts at "
                f"lr={first!r}, so every learning rate it sets would be {first!r}; set a learning rate > 0 "
                "(TrainingArguments(learning_rate=...) or the optimizer's lr) as the peak the policy scales"
            )
        raise ConfigError(
            f"LR policy {name!r} sets param group 0's learning rate and keeps the other groups' ratios to it, but "
            f"group 0 starts at lr={first!r}, so the ratios are undefined; set a learning rate > 0 "
            "(TrainingArguments(learning_rate=...) or the optimizer's lr; its value is replaced by the policy's)"
        )

    def _policy_lrs(self, base_lrs: list[float]) -> list[float]:
        """The policy's LR for every group at the clock's current reading, each checked finite and >= 0."""
        unit = self.policy.unit
        t = self.clock.value(unit)
        lrs = group_lrs_at(self.policy, t, base_lrs)
        if self.lr_scale != 1.0:
            lrs = [lr * self.lr_scale for lr in lrs]
        for index, lr in enumerate(lrs):
            if not (math.isfinite(lr) and lr >= 0):
                step = self.clock.optimizer_steps
                where = f"{unit} = {t:g}" + ("" if unit == "steps" else f" (optimizer step {step})")
                scale = f" (including lr_scale={self.lr_scale:g})" if self.lr_scale != 1.0 else ""
                raise ConfigError(
                    f"LR policy {self.policy.name!r} gives learning rate {lr:.6g}{scale} for param group {index} at "
                    f"{where}; learning rates must be finite and >= 0. Fix the policy's parameters so it stays >= 0 "
                    "over the whole run (e.g. a decay that ends at or above 0, a horizon as long as the run)"
                )
        return lrs

    def state_dict(self) -> dict:
        """Scheduler state without the policy and clock (the policy is config, the clock is saved by the trainer)."""
        return {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "policy", "clock")}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update({key: value for key, value in state_dict.items() if key not in ("policy", "clock")})
