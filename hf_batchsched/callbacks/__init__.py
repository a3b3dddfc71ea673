"""Trainer callbacks: thin shells over the functional twins in ``hf_batchsched.probes`` and ``.schedules``.

Every callback takes the trainer as an optional first argument (``XCallback(trainer, ...)``); without it, as in
``Trainer(..., callbacks=[XCallback()])`` or ``trainer.add_callback(XCallback)``, ``BatchRampTrainer`` binds it, and
for a plain ``Trainer`` ``bind_callbacks(trainer)`` does (``hf_batchsched.callback_binding``). Every callback logs
through ``hf_batchsched.trainer.log_metrics`` (``Trainer.log`` without cancelling the Trainer's own log)
and, when stateful, keeps its state in the checkpoint through ``hf_batchsched.callback_binding``.
"""

from ..callback_binding import bind_callbacks
from ..lr_cuts import PlateauTracker, scale_learning_rates
from .batchnorm import BNRecalibrationCallback, FreezeBNCallback
from .lr_monitor import LRMonitorCallback, param_group_lrs
from .noise_scale import NoiseScaleCallback
from .plateau import PlateauCallback
from .sharpness import SharpnessProbeCallback
from .spike_guard import SpikeDetector, SpikeGuardCallback
from .stability import StabilityMonitorCallback

__all__ = [
    "BNRecalibrationCallback",
    "FreezeBNCallback",
    "LRMonitorCallback",
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
