"""Schedules: pure functions of training progress, by concept.

- ``base``: ``Policy`` (a pure function of progress with its parameters bound) and ``Registry``;
- ``lr`` (shapes and combinators), ``lrbench`` (LRBench's formula table), ``lr_config`` (the LR registry and configs),
  ``scheduler`` (the ``LRScheduler`` that applies a policy);
- ``batch_base`` (the ``BatchSchedule`` contract and its one rounding, ``RoundedBatch``), ``batch`` (the leaves),
  ``batch_config`` (the batch registry and configs), ``simulate`` (the optimizer steps of a run);
- ``smith`` (Smith et al.: the SGD noise scale and ``equivalent_to_lr``), ``seesaw_pair`` (Seesaw), ``adaptive``
  (the batch size driven by the measured gradient noise scale).
"""

from .adaptive import AdaptiveBatchSchedule
from .base import Policy, Registry
from .batch import ConstantBatch, GeometricBatch, LinearRampBatch, PiecewiseBatch
from .batch_base import BatchSchedule, RoundedBatch, round_batch_size
from .batch_config import (
    BATCH_SCHEDULES,
    as_batch_schedule,
    batch_schedule_from_config,
    batch_schedule_to_config,
    make_batch_schedule,
)
from .lr import group_lrs_at, lr_at
from .lr_config import LR_POLICIES, lr_policy_from_config, lr_policy_to_config, make_lr_policy
from .scheduler import PolicyLRScheduler
from .seesaw_pair import SeesawBatch, seesaw
from .simulate import SimulatedRun, simulate
from .smith import LRMatchedBatch, batch_for_noise, equivalent_to_lr, lr_for_noise, rescale_batch_for_noise, sgd_noise

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
    "as_batch_schedule",
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
