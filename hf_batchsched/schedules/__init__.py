"""Schedules: pure functions of training progress (LR policies, batch-size schedules, the SGD noise scale), the
adaptive batch size driven by the measured gradient noise scale, and the LR scheduler that applies a policy."""

from .adaptive import AdaptiveBatchSchedule
from .base import Policy, Registry
from .batch import (
    BATCH_SCHEDULES,
    BatchSchedule,
    ConstantBatch,
    GeometricBatch,
    LinearRampBatch,
    LRMatchedBatch,
    PiecewiseBatch,
    RoundedBatch,
    SimulatedRun,
    batch_schedule_from_config,
    batch_schedule_to_config,
    equivalent_to_lr,
    make_batch_schedule,
    round_batch_size,
    simulate,
)
from .lr import LR_POLICIES, group_lrs_at, lr_at, lr_policy_from_config, lr_policy_to_config, make_lr_policy
from .noise import batch_for_noise, lr_for_noise, rescale_batch_for_noise, sgd_noise
from .scheduler import PolicyLRScheduler
from .seesaw_pair import SeesawBatch, seesaw

__all__ = [
    # batch-size schedules
    "BATCH_SCHEDULES",
    "AdaptiveBatchSchedule",
    "BatchSchedule",
    "ConstantBatch",
    "GeometricBatch",
    "LRMatchedBatch",
    "LinearRampBatch",
    "PiecewiseBatch",
    "RoundedBatch",
    "SeesawBatch",
    "SimulatedRun",
    "batch_schedule_from_config",
    "batch_schedule_to_config",
    "equivalent_to_lr",
    "make_batch_schedule",
    "round_batch_size",
    "seesaw",
    "simulate",
    # LR policies and the scheduler
    "LR_POLICIES",
    "Policy",
    "PolicyLRScheduler",
    "Registry",
    "group_lrs_at",
    "lr_at",
    "lr_policy_from_config",
    "lr_policy_to_config",
    "make_lr_policy",
    # the SGD noise scale (Smith et al.)
    "batch_for_noise",
    "lr_for_noise",
    "rescale_batch_for_noise",
    "sgd_noise",
]
