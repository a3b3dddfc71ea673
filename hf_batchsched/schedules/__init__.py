"""Schedules: pure functions of training progress (LR policies, batch-size schedules)."""

# Batch-size schedules (hf_batchsched.schedules.batch).
from .batch import (
    BATCH_SCHEDULES,
    BatchSchedule,
    ConstantBatch,
    GeometricBatch,
    LinearRampBatch,
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

# LR policies (hf_batchsched.schedules.lr).
from .lr import (
    LR_POLICIES,
    group_lrs_at,
    lr_at,
    lr_policy_from_config,
    lr_policy_to_config,
    make_lr_policy,
)

__all__ = [
    "BATCH_SCHEDULES",
    "BatchSchedule",
    "ConstantBatch",
    "GeometricBatch",
    "LinearRampBatch",
    "PiecewiseBatch",
    "RoundedBatch",
    "SimulatedRun",
    "batch_schedule_from_config",
    "batch_schedule_to_config",
    "equivalent_to_lr",
    "make_batch_schedule",
    "round_batch_size",
    "simulate",
    "LR_POLICIES",
    "group_lrs_at",
    "lr_at",
    "lr_policy_from_config",
    "lr_policy_to_config",
    "make_lr_policy",
]

# Adaptive batch size from the measured gradient noise scale (hf_batchsched.schedules.adaptive).
from .adaptive import AdaptiveBatchSchedule  # noqa: E402

__all__ += ["AdaptiveBatchSchedule"]
