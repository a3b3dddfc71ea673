"""``PolicyLRScheduler``: a torch LR scheduler that reads a ``TrainingClock`` and applies a ``Policy``.

With a moving batch size, optimizer steps stop measuring progress; a policy on the ``samples`` or ``tokens``
clock keeps warmup and decay at the same point of the data however the batch grows. The scheduler has no
counter of its own: every ``step()`` sets each group's LR to ``group_lrs_at(policy, clock.value(unit), initial_lrs)``
(group ratios, e.g. LoRA+, are kept), so after a checkpoint restore of the clock the LR is exactly the pure
function's value.

Example:

>>> import torch
>>> from hf_batchsched.clock import TrainingClock
>>> from hf_batchsched.schedules.lr import make_lr_policy
>>> clock = TrainingClock()
>>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
>>> policy = make_lr_policy("linear_decay", total=100, unit="samples")
>>> scheduler = PolicyLRScheduler(optimizer, policy, clock)
>>> optimizer.step(); clock.advance(samples=25); scheduler.step()
>>> [round(lr, 6) for lr in scheduler.get_last_lr()]
[0.075]
"""

from __future__ import annotations

from torch.optim.lr_scheduler import LRScheduler

from ..clock import TrainingClock
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
    """

    def __init__(self, optimizer, policy: Policy, clock: TrainingClock, last_epoch: int = -1):
        self.policy = policy
        self.clock = clock
        super().__init__(optimizer, last_epoch)

    #: Extra factor on every group's LR, set by state-based callbacks (``PlateauCallback``, ``SpikeGuardCallback``
    #: through ``scale_learning_rates``); an instance value is part of ``state_dict``, so it survives resume.
    lr_scale: float = 1.0

    def get_lr(self) -> list[float]:
        lrs = group_lrs_at(self.policy, self.clock.value(self.policy.unit), self.base_lrs)
        return lrs if self.lr_scale == 1.0 else [lr * self.lr_scale for lr in lrs]

    def state_dict(self) -> dict:
        """Scheduler state without the policy and clock (the policy is config, the clock is saved by the trainer)."""
        return {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "policy", "clock")}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update({key: value for key, value in state_dict.items() if key not in ("policy", "clock")})
