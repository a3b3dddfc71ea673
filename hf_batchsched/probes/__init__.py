"""Measurements of a model that work without a Trainer (the functional twins of the callbacks).

Each probe leaves the model exactly as found: parameters, buffers (BatchNorm running statistics included),
gradients, ``requires_grad`` flags, train/eval mode and RNG states. The sharpness probes and their HVP/Lanczos
machinery restore all of it through ``preserve.preserved_model_state``; ``activation_profile`` restores the BN
buffers and the RNG state it could move; ``estimate_noise_scale`` restores buffers, ``.grad`` and the RNG
state; the rest only read (``bn_profile``, ``grad_sq_norm``, ``block_grad_norms``) or hold their own state (the
spike detectors, ``GradientNoiseScale``). Model changes with an undo (ghost BN, freezing, BN recalibration) are
in ``hf_batchsched.transforms``.
"""

from .noise_scale import GradientNoiseScale, estimate_noise_scale, grad_sq_norm, two_batch_estimate
from .sharpness import average_sharpness, estimate_sharpness, hessian_trace, keskar_sharpness, lambda_max
from .spikes import LossSpikeDetector, SpikeDetector
from .stability import activation_profile, bn_profile

__all__ = [
    "GradientNoiseScale",
    "LossSpikeDetector",
    "SpikeDetector",
    "activation_profile",
    "average_sharpness",
    "bn_profile",
    "estimate_noise_scale",
    "estimate_sharpness",
    "grad_sq_norm",
    "hessian_trace",
    "keskar_sharpness",
    "lambda_max",
    "two_batch_estimate",
]
