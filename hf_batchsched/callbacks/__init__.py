"""hf_batchsched.callbacks"""

from .batchnorm import BNRecalibrationCallback, FreezeBNCallback  # noqa: E402, F401  (batchnorm)
from .lr_monitor import LRMonitorCallback, param_group_lrs  # noqa: E402, F401  (LR policies)
from .noise_scale import NoiseScaleCallback  # noqa: E402, F401  (gradient noise scale)
from .plateau import PlateauCallback, PlateauTracker, scale_learning_rates  # noqa: E402, F401  (LR policies)
from .sharpness import SharpnessProbeCallback  # noqa: E402, F401  (sharpness probe)
from .spike_guard import LossSpikeGuard, SpikeDetector, SpikeGuardCallback  # noqa: E402, F401  (LR policies)
from .stability import StabilityMonitorCallback  # noqa: E402, F401  (stability monitor)
