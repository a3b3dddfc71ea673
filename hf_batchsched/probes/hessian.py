"""Curvature from Hessian-vector products: the top eigenvalue (with the edge-of-stability ratio) and the trace.

Both run on the HVPs of :class:`~hf_batchsched.probes.hvp.ProbeObjective` (options:
:class:`~hf_batchsched.probes.options.ProbeOptions`, ``hvp_method``/``fd_step``/``reuse_graph`` included) and
leave the model exactly as found. The entry point over several metrics is
``hf_batchsched.probes.sharpness.estimate_sharpness``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from .hvp import ProbeObjective, probe_objective
from .lanczos import lanczos
from .options import ProbeOptions, check_option_values

__all__ = ["hessian_trace", "lambda_max"]


def _eos(
    objective: ProbeObjective,
    top: float,
    optimizer: torch.optim.Optimizer | None,
    lr: float | None,
    max_steps: int,
    tol: float,
    generator: torch.Generator,
    merged: bool,
) -> dict[str, float]:
    """Edge-of-stability ratio: 1.0 means the optimizer sits at its stability threshold."""
    if optimizer is None:
        return {} if lr is None else {"eos_ratio": top * lr / 2.0}
    if merged:
        raise ConfigError(
            "the edge-of-stability ratio needs the optimizer's own coordinates; pass merged=False with optimizer=, "
            "or pass lr= instead of optimizer= for the plain-SGD ratio lambda_max * lr / 2"
        )
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    adam = any("exp_avg_sq" in optimizer.state.get(p, {}) for p in objective.variables)
    diag, lrs, betas = [], [], set()
    for name, var in zip(objective.space.names, objective.variables):
        group = group_of.get(id(var))
        if group is None:
            raise ConfigError(f"the optimizer does not hold trainable parameter {name!r}; pass the training optimizer")
        lr_p = float(lr if lr is not None else group["lr"])
        lrs.append(lr_p)
        if adam:
            state = optimizer.state.get(var, {})
            if "exp_avg_sq" not in state:
                return {}  # no Adam statistics yet (before the first step): nothing to report
            beta1, beta2 = group["betas"]
            betas.add(float(beta1))
            step = float(state["step"])
            v_hat = state["exp_avg_sq"].detach().double() / (1 - beta2**step)
            precond = (1 - beta1**step) * (v_hat.sqrt() + group["eps"])
            diag.append(lr_p / precond)
        else:
            betas.add(float(group.get("momentum", 0.0) or 0.0))
            diag.append(torch.full(var.shape, lr_p, dtype=torch.float64, device=var.device))
    beta = max(betas)
    threshold = (2 + 2 * beta) / (1 - beta) if adam else 2 + 2 * beta
    uniform_lr = len(set(lrs)) == 1
    if not adam and uniform_lr:
        return {"eos_ratio": top * lrs[0] / threshold}
    root = objective.flatten(diag).sqrt()
    result = lanczos(lambda v: root * objective.hvp(root * v), objective.numel, max_steps, tol, generator, like=root)
    out = {"eos_ratio": result.eigenvalue / threshold}
    if adam and uniform_lr and lrs[0] > 0:
        out["lambda_max_preconditioned"] = result.eigenvalue / lrs[0]
    return out


def lambda_max(
    model: nn.Module,
    batches: Sequence,
    *,
    max_steps: int = 20,
    tol: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    probe: ProbeOptions | None = None,
    **probe_options,
) -> dict[str, float]:
    """Top Hessian eigenvalue by Lanczos on Hessian-vector products, and the edge-of-stability ratio.

    HVPs are exact (double backprop) where the model supports it and central finite differences otherwise;
    ``hvp_method="auto"`` tries double backprop and falls back on the SDPA/flash-attention "derivative ... not
    implemented" error and on reentrant checkpointing. ``fd_step`` defaults to ``u^(1/3) * rms(x)``, ``u`` the
    machine epsilon of the lowest-precision variable and ``rms(x)`` the root mean square of the parameters (see
    :func:`~hf_batchsched.probes.hvp.default_fd_step`). Exact HVPs build each probe batch's first-order graph
    once and reuse it for every Lanczos step while the graphs fit in half the free memory (``reuse_graph``).

    Edge of stability (Cohen et al. 2021, 2022): with ``optimizer`` holding Adam(W) statistics, the
    preconditioned sharpness ``lambda_1(P^-1 H)`` with ``P = (1-beta1^t)(sqrt(v_hat) + eps)`` is compared to
    ``(2+2*beta1)/((1-beta1)*lr)`` (38/lr for beta1=0.9); for SGD with momentum ``beta``, ``lambda_max`` is
    compared to ``(2+2*beta)/lr`` (``2/lr`` without momentum). ``eos_ratio`` is the ratio to that threshold (1.0
    at the edge), computed with per-group learning rates folded into the preconditioner. With ``lr`` alone
    ``eos_ratio = lambda_max * lr / 2``.

    Args:
        max_steps (`int`, *optional*, defaults to `20`):
            Maximum Lanczos steps (HVPs).
        tol (`float`, *optional*, defaults to `1e-3`):
            Relative Ritz-residual tolerance.
        optimizer (`torch.optim.Optimizer`, *optional*):
            The training optimizer, for the EoS ratio (Adam statistics when it has them).
        lr (`float`, *optional*):
            Learning rate for the EoS ratio (overrides the optimizer's groups).
        probe (`ProbeOptions`, *optional*), **probe_options:
            How the loss is evaluated (``loss_fn``, ``merged``, ``train_mode``, ``seed``, ...): a
            :class:`~hf_batchsched.probes.options.ProbeOptions`, or its fields as keywords.

    Returns:
        `dict[str, float]`: ``lambda_max``, ``lambda_max_hvps`` (HVPs used), ``lambda_max_fd`` (1.0 if finite
        differences were used), and ``eos_ratio`` / ``lambda_max_preconditioned`` when computable.
    """
    check_option_values({"max_steps": max_steps, "tol": tol})
    options = ProbeOptions.build(probe, **probe_options)
    generator = options.generator()
    with probe_objective(model, batches, options) as objective:
        like = torch.zeros(1, dtype=objective.dtype, device=objective.device)
        result = lanczos(objective.hvp, objective.numel, max_steps, tol, generator, like=like)
        hvps = objective.num_hvps
        out = {"lambda_max": result.eigenvalue, "lambda_max_hvps": float(hvps)}
        out.update(_eos(objective, result.eigenvalue, optimizer, lr, max_steps, tol, generator, options.merged))
        out["lambda_max_fd"] = 1.0 if objective.hvp_method == "fd" else 0.0
    return out


def hessian_trace(
    model: nn.Module,
    batches: Sequence,
    *,
    num_probes: int = 10,
    probe: ProbeOptions | None = None,
    **probe_options,
) -> dict[str, float]:
    """Hutchinson estimate of the Hessian trace, ``mean_k z_k^T H z_k`` with Rademacher ``z_k``, and its stderr.

    Runs exactly ``num_probes`` HVPs (no relative-change stopping rule: PyHessian's stops after 2 samples on
    noisy estimates). ``trace_stderr`` is the sample standard deviation over ``sqrt(num_probes)``.

    Args:
        num_probes (`int`, *optional*, defaults to `10`):
            Rademacher probes (HVPs), at least 2.
        probe (`ProbeOptions`, *optional*), **probe_options:
            How the loss is evaluated (``loss_fn``, ``merged``, ``train_mode``, ``seed``, ...): a
            :class:`~hf_batchsched.probes.options.ProbeOptions`, or its fields as keywords.

    Returns:
        `dict[str, float]`: ``trace`` and ``trace_stderr``.
    """
    check_option_values({"num_probes": num_probes})
    options = ProbeOptions.build(probe, **probe_options)
    generator = options.generator()
    with probe_objective(model, batches, options) as objective:
        samples = []
        for _ in range(num_probes):
            z = torch.randint(0, 2, (objective.numel,), generator=generator).to(objective.device, objective.dtype)
            z = 2 * z - 1
            samples.append(float(torch.dot(z, objective.hvp(z))))
    values = np.array(samples)
    return {"trace": float(values.mean()), "trace_stderr": float(values.std(ddof=1) / math.sqrt(len(values)))}
