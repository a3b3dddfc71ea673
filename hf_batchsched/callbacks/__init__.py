"""Trainer callbacks: thin shells over the functional twins in ``hf_batchsched.probes`` and ``.schedules``.

Every callback takes the trainer as an optional first argument (``XCallback(trainer, ...)``); without it, as in
``Trainer(..., callbacks=[XCallback()])`` or ``trainer.add_callback(XCallback)``, ``BatchRampTrainer`` binds it, and
for a plain ``Trainer`` ``bind_callbacks(trainer)`` does (``hf_batchsched.callbacks._binding``). Every callback logs
through ``hf_batchsched.callbacks._logging.log_metrics`` (``Trainer.log`` without cancelling the Trainer's own log)
and, when stateful, keeps its state in the checkpoint through ``hf_batchsched.callbacks._state``.
"""

from ._binding import bind_callbacks
from .batchnorm import BNRecalibrationCallback, FreezeBNCallback
from .lr_monitor import LRMonitorCallback, param_group_lrs
from .noise_scale import NoiseScaleCallback
from .plateau import PlateauCallback, PlateauTracker, scale_learning_rates
from .sharpness import SharpnessProbeCallback
from .spike_guard import LossSpikeGuard, SpikeDetector, SpikeGuardCallback
from .stability import StabilityMonitorCallback

__all__ = [
    "BNRecalibrationCallback",
    "FreezeBNCallback",
    "LRMonitorCallback",
    "LossSpikeGuard",
    "NoiseScaleCallback",
    "PlateauCallback",
    "PlateauTracker",
    "SharpnessProbeCallback",
    "SpikeDetector",
    "SpikeGuardCallback",
    "StabilityMonitorCallback",
    "bind_callbacks",
    "param_group_lrs",
    "scale_learning_rates",
]
