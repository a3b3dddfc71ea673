"""Functional twins of the callbacks: plain functions (and small state machines) that work without a Trainer.

Each leaves the model exactly as found (parameters, buffers, gradients, train/eval mode, RNG state).
"""

from .batchnorm import convert_to_ghost_bn, freeze_bn, recalibrate_bn, revert_ghost_bn, unfreeze_bn
from .noise_scale import GradientNoiseScale, estimate_noise_scale, grad_sq_norm, two_batch_estimate
from .sharpness import average_sharpness, estimate_sharpness, hessian_trace, keskar_sharpness, lambda_max
from .stability import LossSpikeDetector, SpikeDetector, activation_profile, bn_profile

__all__ = [
    "GradientNoiseScale",
    "LossSpikeDetector",
    "SpikeDetector",
    "activation_profile",
    "average_sharpness",
    "bn_profile",
    "convert_to_ghost_bn",
    "estimate_noise_scale",
    "estimate_sharpness",
    "freeze_bn",
    "grad_sq_norm",
    "hessian_trace",
    "keskar_sharpness",
    "lambda_max",
    "recalibrate_bn",
    "revert_ghost_bn",
    "two_batch_estimate",
    "unfreeze_bn",
]
