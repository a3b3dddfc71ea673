"""Gradient noise scale (McCandlish, Kaplan, Amodei et al. 2018, https://arxiv.org/abs/1812.06162).

For i.i.d. samples whose per-sample gradients have mean ``G`` and covariance ``Σ``, the mean gradient of a batch
of ``B`` samples satisfies ``E|G_B|² = |G|² + tr(Σ)/B``. Measuring ``|G_B|²`` at two batch sizes ``Bs < Bb``
gives unbiased estimates of both terms (the paper's App. A.1)::

    |G|²  ≈ (Bb·|G_Bb|² − Bs·|G_Bs|²) / (Bb − Bs)
    tr(Σ) ≈ (|G_Bs|² − |G_Bb|²) / (1/Bs − 1/Bb)

Each single estimate is very noisy (``|G|²`` can come out negative), so ``GradientNoiseScale`` keeps separate
bias-corrected exponential moving averages of the two and reports their ratio, the "simple" noise scale
``B_simple = tr(Σ)/|G|²``: a batch size, in the unit the batch sizes were given in (samples here). Training at
``B ≪ B_simple`` wastes optimizer steps, at ``B ≫ B_simple`` wastes samples; the critical batch size is about
``B_simple`` (exactly ``B_noise = tr(HΣ)/GᵀHG`` when the Hessian ``H`` is not a multiple of the identity).

In a chunked (gradient-accumulation) step both norms come almost for free: ``|G_Bs|²`` from the gradient after the
first micro-chunk's backward, ``|G_Bb|²`` from the step's accumulated gradient (``grad_sq_norm`` reads ``.grad``
in place, no gradient-sized copy). ``estimate_noise_scale`` is the stand-alone version that runs the chunks itself.

Example:

>>> g2, trace_sigma = two_batch_estimate(sq_norm_small=8.0, sq_norm_big=5.0, b_small=8, b_big=32)
>>> g2, trace_sigma, trace_sigma / g2
(4.0, 32.0, 8.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import torch

from ..batching import batch_rows, split_batch
from ..errors import ConfigError, check_positive
from ..model_utils import l2_norms

__all__ = [
    "GradientNoiseScale",
    "NoiseScaleSample",
    "estimate_noise_scale",
    "grad_sq_norm",
    "two_batch_estimate",
]


def two_batch_estimate(sq_norm_small: float, sq_norm_big: float, b_small: float, b_big: float) -> tuple[float, float]:
    """Unbiased estimates ``(|G|², tr(Σ))`` from squared mean-gradient norms at two batch sizes.

    Args:
        sq_norm_small (`float`): ``|G_Bs|²``, squared norm of the mean gradient of ``b_small`` samples.
        sq_norm_big (`float`): ``|G_Bb|²``, squared norm of the mean gradient of ``b_big`` samples.
        b_small (`float`): the small batch size ``Bs``.
        b_big (`float`): the big batch size ``Bb``; must be larger than ``b_small``.

    Returns:
        `tuple[float, float]`: ``(g2, trace_sigma)``. Either may be negative for a single pair of measurements;
        average many (``GradientNoiseScale``) before taking their ratio.

    With ``|G|² = 4``, ``tr(Σ) = 32`` the expected squared norms are ``4 + 32/8 = 8`` at ``Bs = 8`` and
    ``4 + 32/32 = 5`` at ``Bb = 32``; the estimator inverts this exactly:

    >>> two_batch_estimate(8.0, 5.0, 8, 32)
    (4.0, 32.0)
    >>> two_batch_estimate(8.0, 5.0, 8, 8)
    Traceback (most recent call last):
    ...
    hf_batchsched.errors.ConfigError: the two-batch noise-scale estimator needs b_small < b_big, got b_small=8 and \
b_big=8; measure the small norm on a part of the big batch (e.g. one micro-chunk of a gradient-accumulation step)
    """
    check_positive("b_small", b_small)
    if not b_small < b_big:
        raise ConfigError(
            f"the two-batch noise-scale estimator needs b_small < b_big, got b_small={b_small} and b_big={b_big}; "
            "measure the small norm on a part of the big batch (e.g. one micro-chunk of a gradient-accumulation step)"
        )
    g2 = (b_big * sq_norm_big - b_small * sq_norm_small) / (b_big - b_small)
    trace_sigma = (sq_norm_small - sq_norm_big) / (1.0 / b_small - 1.0 / b_big)
    return float(g2), float(trace_sigma)


class GradientNoiseScale:
    """Bias-corrected moving averages of ``|G|²`` and ``tr(Σ)``, and their ratio ``B_simple``.

    The two quantities are averaged separately (the ratio of averages, not the average of ratios: a single
    ``|G|²`` estimate is often near zero or negative). Bias correction is Adam's: after ``n`` updates the
    average is divided by ``1 − beta**n``, so the first reading is the first estimate, not ``(1 − beta)`` of it.

    Args:
        beta (`float`, *optional*, defaults to `0.99`): EMA decay per update, in ``[0, 1)``; the average spans about
            ``1/(1 − beta)`` updates. k-diffusion uses 0.9998 for long runs; short fine-tuning runs need less.

    Example:

    >>> gns = GradientNoiseScale(beta=0.5)
    >>> gns.noise_scale
    nan
    >>> gns.update(sq_norm_small=8.0, sq_norm_big=5.0, b_small=8, b_big=32)
    >>> gns.grad_sq_norm, gns.trace_sigma, gns.noise_scale
    (4.0, 32.0, 8.0)
    >>> gns.update(sq_norm_small=6.0, sq_norm_big=3.0, b_small=8, b_big=32)   # estimates (2.0, 32.0)
    >>> round(gns.grad_sq_norm, 4), round(gns.trace_sigma, 4), round(gns.noise_scale, 4)
    (2.6667, 32.0, 12.0)
    """

    def __init__(self, beta: float = 0.99):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"beta must be in [0, 1), got {beta}; e.g. 0.99 averages over about 100 updates")
        self.beta = float(beta)
        self.num_updates = 0
        self._ema_g2 = 0.0
        self._ema_trace = 0.0

    def update(self, sq_norm_small: float, sq_norm_big: float, b_small: float, b_big: float) -> None:
        """Fold in one pair of squared norms (see ``two_batch_estimate``)."""
        g2, trace_sigma = two_batch_estimate(sq_norm_small, sq_norm_big, b_small, b_big)
        self.update_estimates(g2, trace_sigma)

    def update_estimates(self, g2: float, trace_sigma: float) -> None:
        """Fold in one pair of already-computed estimates ``(|G|², tr(Σ))``."""
        if not (math.isfinite(g2) and math.isfinite(trace_sigma)):
            raise ConfigError(
                f"non-finite noise-scale estimate (|G|²={g2}, tr(Σ)={trace_sigma}); the gradients overflowed. "
                "Skip such steps (the callback does) or lower the learning rate"
            )
        self.num_updates += 1
        self._ema_g2 = self.beta * self._ema_g2 + (1.0 - self.beta) * g2
        self._ema_trace = self.beta * self._ema_trace + (1.0 - self.beta) * trace_sigma

    def _correction(self) -> float:
        return 1.0 - self.beta**self.num_updates

    @property
    def grad_sq_norm(self) -> float:
        """Averaged ``|G|²`` (``nan`` before the first update)."""
        return self._ema_g2 / self._correction() if self.num_updates else math.nan

    @property
    def trace_sigma(self) -> float:
        """Averaged ``tr(Σ)``, the per-sample gradient variance summed over parameters (``nan`` before any update)."""
        return self._ema_trace / self._correction() if self.num_updates else math.nan

    @property
    def noise_scale(self) -> float:
        """``B_simple = tr(Σ)/|G|²`` from the averages: ``nan`` before any update, ``inf`` while ``|G|² <= 0``.

        ``inf`` means the averaged true-gradient signal is not yet resolved above the noise (any batch is "small").
        """
        if not self.num_updates:
            return math.nan
        g2, trace_sigma = self.grad_sq_norm, self.trace_sigma
        if g2 <= 0.0:
            return math.inf if trace_sigma > 0.0 else math.nan
        return trace_sigma / g2

    def reset(self) -> None:
        """Forget every update (keeps ``beta``)."""
        self.num_updates = 0
        self._ema_g2 = self._ema_trace = 0.0

    def state_dict(self) -> dict:
        return {
            "beta": self.beta,
            "num_updates": self.num_updates,
            "ema_g2": self._ema_g2,
            "ema_trace": self._ema_trace,
        }

    def load_state_dict(self, state: Mapping) -> None:
        if float(state["beta"]) != self.beta:
            raise ConfigError(
                f"noise-scale state was saved with beta={state['beta']} but this estimator has beta={self.beta}; "
                "resume with the same beta"
            )
        self.num_updates = int(state["num_updates"])
        self._ema_g2 = float(state["ema_g2"])
        self._ema_trace = float(state["ema_trace"])

    def __repr__(self) -> str:
        return (
            f"GradientNoiseScale(beta={self.beta}, num_updates={self.num_updates}, noise_scale={self.noise_scale:.4g})"
        )


def grad_sq_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """``Σ_p |p.grad|²`` as a 0-dim float32 tensor, read in place (no gradient-sized copy, no host sync).

    Parameters whose ``.grad`` is ``None`` are skipped. Norms are taken in float32 whatever the gradient dtype, so
    bf16/fp16 gradients do not lose the small difference the two-batch estimator needs.

    >>> layer = torch.nn.Linear(2, 1)
    >>> layer.weight.grad = torch.tensor([[3.0, 4.0]]); layer.bias.grad = torch.tensor([12.0])
    >>> grad_sq_norm(layer.parameters())
    tensor(169.)
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    # float64 stays float64; bf16/fp16/fp32 are normed in fp32 (l2_norms)
    squares = [norm.to(device).square() for norm in l2_norms(grads)]
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in squares) else torch.float32
    return torch.stack([s.to(dtype) for s in squares]).sum()


class NoiseScaleSample(NamedTuple):
    """One measurement: squared norms of the mean gradient of ``b_small`` and of ``b_big`` samples."""

    sq_norm_small: float
    sq_norm_big: float
    b_small: int
    b_big: int

    def estimate(self) -> tuple[float, float]:
        """``(|G|², tr(Σ))`` from this measurement (``two_batch_estimate``)."""
        return two_batch_estimate(self.sq_norm_small, self.sq_norm_big, self.b_small, self.b_big)


def estimate_noise_scale(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
    batch,
    micro_batch_size: int,
) -> NoiseScaleSample:
    """Measure ``|G_Bs|²`` and ``|G_Bb|²`` on one batch by gradient accumulation over micro-chunks.

    The functional twin of ``NoiseScaleCallback``: splits ``batch`` into chunks of ``micro_batch_size`` samples,
    accumulates the gradient of ``loss_fn(model, chunk) * len(chunk) / len(batch)`` (so the total is the mean
    gradient of the batch), reads ``|G_Bs|²`` after the first chunk (the chunk's own mean gradient, rescaled) and
    ``|G_Bb|²`` at the end. The model is left exactly as found: parameters are not stepped; buffers (BatchNorm
    running statistics in train mode) and ``.grad`` of every parameter are restored; train/eval mode is not
    changed; the global RNG state is restored.

    Args:
        model (`torch.nn.Module`): the model; its current mode (train/eval) is used as is.
        loss_fn (`Callable`): ``loss_fn(model, chunk) -> scalar`` returning the **mean** loss over the chunk's samples.
        batch (`torch.Tensor`, `dict` or `tuple`): the big batch, samples along dim 0.
        micro_batch_size (`int`): samples per chunk ``Bs``; the batch must hold at least two chunks.

    Returns:
        `NoiseScaleSample`: ``(sq_norm_small, sq_norm_big, b_small, b_big)``; ``.estimate()`` gives
        ``(|G|², tr(Σ))``.

    Example:

    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Linear(3, 1)
    >>> x = torch.randn(64, 3); y = x.sum(1, keepdim=True) + torch.randn(64, 1)
    >>> mse = lambda model, chunk: torch.nn.functional.mse_loss(model(chunk[0]), chunk[1])
    >>> sample = estimate_noise_scale(model, mse, (x, y), micro_batch_size=16)
    >>> sample.b_small, sample.b_big, sample.sq_norm_small > 0, model.weight.grad is None
    (16, 64, True, True)
    """
    chunks = split_batch(batch, micro_batch_size)
    sizes = [batch_rows(chunk) for chunk in chunks]
    total = sum(sizes)
    if len(chunks) < 2:
        raise ConfigError(
            f"estimate_noise_scale needs at least two micro-chunks, but a batch of {total} samples with "
            f"micro_batch_size={micro_batch_size} is one chunk; use a micro_batch_size below the batch size"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in params]
    # a forward in train mode moves BatchNorm running statistics (and any other buffer a module updates)
    saved_buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    for p in params:
        p.grad = None
    try:
        cuda_devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=cuda_devices):
            for index, (chunk, size) in enumerate(zip(chunks, sizes)):
                loss = loss_fn(model, chunk) * (size / total)
                loss.backward()
                if index == 0:
                    # .grad now holds (size/total) x the chunk's mean gradient: undo that weight.
                    sq_small = grad_sq_norm(params) * (total / size) ** 2
            sq_big = grad_sq_norm(params)
    finally:
        for p, grad in zip(params, saved_grads):
            p.grad = grad
        with torch.no_grad():
            for buffer, copy in saved_buffers:
                buffer.copy_(copy)
    return NoiseScaleSample(float(sq_small), float(sq_big), sizes[0], total)
