"""Schedules: pure functions of training progress (LR policies, batch-size schedules)."""

# LR policies (hf_batchsched.schedules.lr); batch-size schedule exports are added next to these.
from .lr import (
    LR_POLICIES,
    group_lrs_at,
    lr_at,
    lr_policy_from_config,
    lr_policy_to_config,
    make_lr_policy,
)

__all__ = [
    "LR_POLICIES",
    "group_lrs_at",
    "lr_at",
    "lr_policy_from_config",
    "lr_policy_to_config",
    "make_lr_policy",
]
