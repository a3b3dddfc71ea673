"""Sharpness from perturbed losses: average-case sharpness (forward passes only) and Keskar et al.'s metric 2.1.

Both measure the probe loss ``f`` of :class:`~hf_batchsched.probes.hvp.ProbeObjective` (options:
:class:`~hf_batchsched.probes.options.ProbeOptions`) at points around the current weights, and leave the model
exactly as found. The entry point over several metrics is ``hf_batchsched.probes.sharpness.estimate_sharpness``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ._subspace import random_subspace
from .hvp import probe_objective
from .options import ProbeOptions, check_option_values

__all__ = ["average_sharpness", "keskar_sharpness"]


def average_sharpness(
    model: nn.Module,
    batches: Sequence,
    *,
    sigma: float = 0.05,
    num_samples: int = 8,
    noise: str = "elementwise",
    probe: ProbeOptions | None = None,
    **probe_options,
) -> dict[str, float]:
    """Average-case sharpness ``E[f(w+e)] - f(w)`` from forward passes only (the cheap default).

    The noise is parameter-scaled: with ``noise="elementwise"`` each entry gets ``e_i ~ N(0, (sigma*|w_i|)^2)``
    (as in Andriushchenko et al. 2023's adaptive average sharpness); with ``noise="row"`` each row of a matrix
    gets ``N(0, (sigma*||w_row||/sqrt(d_in))^2)`` per entry (Flat-LoRA's filter/row normalisation; 1-D tensors
    fall back to element-wise). Samples come in antithetic pairs ``(e, -e)``: the first-order term cancels
    exactly within each pair, so the estimate measures curvature (``~ sigma^2/2 * sum_i H_ii w_i^2``), not the
    gradient. With ``merged=True`` ``w`` is the merged weight ``W0 + s*B@A`` (the natural scale; in adapter
    space LoRA ``B`` starts at 0 and gets no element-wise noise).

    Args:
        model (`torch.nn.Module`):
            The model; its trainable parameters (or merged LoRA weights) are perturbed.
        batches (`list[dict]`):
            Fixed probe batches, each passed as ``model(**batch)``.
        sigma (`float`, *optional*, defaults to `0.05`):
            Relative noise scale.
        num_samples (`int`, *optional*, defaults to `8`):
            Perturbed loss evaluations (an even number: ``num_samples // 2`` antithetic pairs).
        noise (`str`, *optional*, defaults to `"elementwise"`):
            ``"elementwise"`` or ``"row"`` scaling.
        probe (`ProbeOptions`, *optional*), **probe_options:
            How the loss is evaluated (``loss_fn``, ``merged``, ``train_mode``, ``seed``, ...): a
            :class:`~hf_batchsched.probes.options.ProbeOptions`, or its fields as keywords.

    Returns:
        `dict[str, float]`: ``avg`` (sharpness), ``avg_stderr`` (its standard error over pairs), ``loss``.
    """
    check_option_values({"sigma": sigma, "noise": noise, "num_samples": num_samples})
    options = ProbeOptions.build(probe, **probe_options)
    generator = options.generator()
    with probe_objective(model, batches, options) as objective:
        scales = []
        for ref in objective.space.reference():
            ref = ref.detach().to(objective.dtype)
            if noise == "row" and ref.dim() >= 2:
                row = ref.reshape(ref.shape[0], -1)
                scale = (row.norm(dim=1, keepdim=True) / math.sqrt(row.shape[1])).expand_as(row).reshape(ref.shape)
            else:
                scale = ref.abs()
            scales.append(sigma * scale)
        scale = objective.flatten(scales)
        base = objective.loss()
        pairs = []
        for _ in range(num_samples // 2):
            eps = torch.randn(objective.numel, generator=generator, dtype=torch.float64)
            eps = eps.to(objective.device, objective.dtype) * scale
            pairs.append(0.5 * (objective.loss(eps) + objective.loss(-eps)) - base)
    values = np.array(pairs)
    stderr = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return {"avg": float(values.mean()), "avg_stderr": stderr, "loss": base}


def keskar_sharpness(
    model: nn.Module,
    batches: Sequence,
    *,
    eps: float = 1e-3,
    subspace_dim: int | None = 100,
    maxiter: int = 10,
    cache_subspace: bool = True,
    probe: ProbeOptions | None = None,
    **probe_options,
) -> dict[str, float]:
    """Keskar et al. (ICLR 2017) metric 2.1: ``100 * (max_{y in C} f(x + A y) - f(x)) / (1 + f(x))``.

    ``C`` is the box ``|y_i| <= eps * (|(A^+ x)_i| + 1)``; ``A`` is ``n x subspace_dim`` with orthonormal random
    columns (an orthonormal basis of the span of a Gaussian matrix drawn from ``seed``, so ``A^+ = A^T``; see
    :class:`~hf_batchsched.probes._subspace.RandomSubspace`), or the identity with ``subspace_dim=None`` (full
    space). The maximum is sought with ``maxiter`` iterations of scipy's L-BFGS-B from ``y = 0``, as in the
    paper, and the best evaluated point is reported. Cost: ``keskar_evals`` forward+backward passes over the probe
    set (the line search makes it 11 to ~4x ``maxiter``; 40 measured on a tiny Llama), each with two ``n x p``
    matrix-vector products. ``A`` takes ``n * subspace_dim`` values of the parameters' dtype (fine for LoRA
    adapters, not for full 7B weights); it is drawn on the first call and kept with the model for the next calls
    with the same seed, size and ``subspace_dim`` (it depends on nothing else), unless ``cache_subspace=False``.

    Away from a minimum the metric is first order: ``keskar_first_order`` reports the linear prediction
    ``100 * sum_i |g_i| * halfwidth_i / (1 + f)``; when the two agree, the metric measures a weighted L1 gradient
    norm, not curvature.

    Args:
        eps (`float`, *optional*, defaults to `1e-3`):
            Relative box half-width (the paper uses 1e-3 and 5e-4).
        subspace_dim (`int` or `None`, *optional*, defaults to `100`):
            Random subspace dimension ``p`` (clipped to ``n``); ``None`` for the full space.
        maxiter (`int`, *optional*, defaults to `10`):
            L-BFGS-B iterations.
        cache_subspace (`bool`, *optional*, defaults to `True`):
            Keep ``A`` with the model for later calls (one per model, freed with it); ``False`` draws it for this
            call only.
        probe (`ProbeOptions`, *optional*), **probe_options:
            How the loss is evaluated (``loss_fn``, ``merged``, ``train_mode``, ``seed``, ...): a
            :class:`~hf_batchsched.probes.options.ProbeOptions`, or its fields as keywords.

    Returns:
        `dict[str, float]`: ``keskar``, ``keskar_first_order``, ``keskar_evals`` (function+gradient evaluations),
        ``loss``.
    """
    from scipy.optimize import minimize

    check_option_values({"eps": eps, "maxiter": maxiter, "subspace_dim": subspace_dim})
    options = ProbeOptions.build(probe, **probe_options)
    with probe_objective(model, batches, options) as objective:
        if subspace_dim is None:
            basis = None
            center = objective.reference().double()
        else:
            dim = min(int(subspace_dim), objective.numel)
            basis = random_subspace(
                model, objective.numel, dim, options.seed, objective.dtype, objective.device, cache=cache_subspace
            )
            center = basis.project(objective.reference())
        half = (eps * (center.abs() + 1.0)).cpu().numpy()
        state: dict[str, float] = {"best": -math.inf}

        def negative_loss(y: np.ndarray) -> tuple[float, np.ndarray]:
            y_t = torch.from_numpy(y).to(objective.device, objective.dtype)
            delta = y_t if basis is None else basis.expand(y_t)
            value, grad = objective.loss_and_grad(delta)
            grad_y = grad if basis is None else basis.project(grad)
            grad_y = grad_y.double().cpu().numpy()
            if "f0" not in state:
                state["f0"], state["g0"] = value, grad_y
            state["best"] = max(state["best"], value)
            return -value, -grad_y

        minimize(
            negative_loss,
            np.zeros(len(half)),
            jac=True,
            method="L-BFGS-B",
            bounds=list(zip(-half, half)),
            options={"maxiter": int(maxiter)},
        )
        evals = objective.num_evals
    f0 = state["f0"]
    first_order = 100.0 * float(np.abs(state["g0"]) @ half) / (1.0 + f0)
    return {
        "keskar": 100.0 * (state["best"] - f0) / (1.0 + f0),
        "keskar_first_order": first_order,
        "keskar_evals": float(evals),
        "loss": f0,
    }
