"""hf_batchsched.probes"""

from .batchnorm import (  # noqa: E402, F401  (batchnorm)
    convert_to_ghost_bn,
    freeze_bn,
    recalibrate_bn,
    revert_ghost_bn,
    unfreeze_bn,
)
from .noise_scale import (  # noqa: E402, F401  (gradient noise scale)
    GradientNoiseScale,
    estimate_noise_scale,
    grad_sq_norm,
    two_batch_estimate,
)
from .sharpness import (  # noqa: E402, F401  (sharpness probe)
    average_sharpness,
    estimate_sharpness,
    hessian_trace,
    keskar_sharpness,
    lambda_max,
)
from .stability import LossSpikeDetector, activation_profile, bn_profile  # noqa: E402, F401  (stability)
