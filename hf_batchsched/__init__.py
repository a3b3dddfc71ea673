"""hf-batchsched: Hugging Face Trainer add-ons for batch-size ramping, LR policies, sharpness and stability.

The public API is importable from the package root::

    from hf_batchsched import BatchRampTrainer, make_batch_schedule, make_lr_policy, SharpnessProbeCallback

Names are loaded on first access (PEP 562 module ``__getattr__``), so ``import hf_batchsched`` stays light: it
imports neither torch nor transformers until a name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    # batch-size ramp inside the Trainer
    "BatchRampTrainer": "trainer",
    "BatchRampMixin": "trainer",
    "RampBatchSampler": "data.sampler",
    "TrainingClock": "clock",
    "Coupling": "coupling",
    # schedules
    "PolicyLRScheduler": "schedules.scheduler",
    "make_lr_policy": "schedules.lr_config",
    "make_batch_schedule": "schedules.batch_config",
    "equivalent_to_lr": "schedules.smith",
    "seesaw": "schedules.seesaw_pair",
    "AdaptiveBatchSchedule": "schedules.adaptive",
    # callbacks
    "SharpnessProbeCallback": "callbacks.sharpness",
    "StabilityMonitorCallback": "callbacks.stability",
    "BNRecalibrationCallback": "callbacks.batchnorm",
    "FreezeBNCallback": "callbacks.batchnorm",
    "NoiseScaleCallback": "callbacks.noise_scale",
    "PlateauCallback": "callbacks.plateau",
    "SpikeGuardCallback": "callbacks.spike_guard",
    "LRMonitorCallback": "callbacks.lr_monitor",
    "bind_callbacks": "callbacks",
    # measurement
    "critical_batch_size": "critical_batch",
    # errors
    "ConfigError": "errors",
}

__all__ = [
    "AdaptiveBatchSchedule",
    "BNRecalibrationCallback",
    "BatchRampMixin",
    "BatchRampTrainer",
    "ConfigError",
    "Coupling",
    "FreezeBNCallback",
    "LRMonitorCallback",
    "NoiseScaleCallback",
    "PlateauCallback",
    "PolicyLRScheduler",
    "RampBatchSampler",
    "SharpnessProbeCallback",
    "SpikeGuardCallback",
    "StabilityMonitorCallback",
    "TrainingClock",
    "__version__",
    "bind_callbacks",
    "critical_batch_size",
    "equivalent_to_lr",
    "make_batch_schedule",
    "make_lr_policy",
    "seesaw",
]

if TYPE_CHECKING:  # static analysers and IDEs see the real objects
    from .callbacks import bind_callbacks
    from .callbacks.batchnorm import BNRecalibrationCallback, FreezeBNCallback
    from .callbacks.lr_monitor import LRMonitorCallback
    from .callbacks.noise_scale import NoiseScaleCallback
    from .callbacks.plateau import PlateauCallback
    from .callbacks.sharpness import SharpnessProbeCallback
    from .callbacks.spike_guard import SpikeGuardCallback
    from .callbacks.stability import StabilityMonitorCallback
    from .clock import TrainingClock
    from .coupling import Coupling
    from .critical_batch import critical_batch_size
    from .data.sampler import RampBatchSampler
    from .errors import ConfigError
    from .schedules.adaptive import AdaptiveBatchSchedule
    from .schedules.batch_config import make_batch_schedule
    from .schedules.lr_config import make_lr_policy
    from .schedules.scheduler import PolicyLRScheduler
    from .schedules.seesaw_pair import seesaw
    from .schedules.smith import equivalent_to_lr
    from .trainer import BatchRampMixin, BatchRampTrainer


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_batchsched' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
