"""Sharpness of the training loss at the current weights: four estimators and one entry point.

All estimators measure the weighted mean loss ``f`` over fixed probe batches (``model(**batch).loss`` or
``loss_fn(model, batch)``, weighted by target tokens / samples, see
:func:`~hf_batchsched.probes.hvp.default_batch_weight`) as a function of the trainable parameters (the LoRA
adapters under peft), or with ``merged=True`` of the merged weight ``W0 + s*B@A`` of every LoRA layer, which
makes the answer invariant to the LoRA rescaling ``(B*c, A/c)``. They run in eval mode (dropout off, BatchNorm
on running statistics) unless ``train_mode=True``, draw randomness from a local generator seeded by ``seed``,
and leave the model exactly as found (see :func:`~hf_batchsched.probes.hvp.preserved_model_state`).

| metric (key) | definition | cost, in passes over the probe set |
|---|---|---|
| ``avg`` | ``E[f(w+e)] - f(w)``, ``e ~ N(0, (sigma*|w|)^2)`` (antithetic pairs) | ``num_samples + 1`` forwards |
| ``keskar`` | Keskar et al. 2017 metric 2.1, 10 L-BFGS-B iterations | ``keskar_evals`` forward+backward (11-40) |
| ``lambda_max`` | top Hessian eigenvalue, Lanczos on HVPs | ``<= max_steps`` HVPs (+ as many for EoS) |
| ``trace`` | Hutchinson estimate of ``tr(H)`` with its standard error | ``num_probes`` HVPs |

An exact HVP (double backprop) reuses each probe batch's first-order graph (built once per probe, memory
permitting) and then costs one double backward, about 1.3-1.9 forward+backward passes; a finite-difference one 2.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, check_choice, check_positive
from ._subspace import random_subspace
from .hvp import ProbeObjective, lanczos, preserved_model_state

__all__ = [
    "METRICS",
    "average_sharpness",
    "estimate_sharpness",
    "hessian_trace",
    "keskar_sharpness",
    "lambda_max",
    "validate_sharpness_options",
]


@contextmanager
def _probe(
    model: nn.Module,
    batches,
    loss_fn: Callable | None,
    weight_fn: Callable | None,
    merged: bool,
    train_mode: bool,
    seed: int,
    distributed: bool | None,
    hvp_method: str = "auto",
    fd_step: float | None = None,
    reuse_graph: bool | None = None,
) -> Iterator[ProbeObjective]:
    with preserved_model_state(model, train_mode=train_mode) as preserved:
        objective = ProbeObjective(
            model,
            batches,
            loss_fn=loss_fn,
            weight_fn=weight_fn,
            merged=merged,
            hvp_method=hvp_method,
            fd_step=fd_step,
            seed=seed,
            distributed=distributed,
            reuse_graph=reuse_graph,
            preserved=preserved,
        )
        try:
            yield objective
        finally:
            objective.close()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def average_sharpness(
    model: nn.Module,
    batches: Sequence,
    *,
    sigma: float = 0.05,
    num_samples: int = 8,
    noise: str = "elementwise",
    loss_fn: Callable | None = None,
    weight_fn: Callable | None = None,
    merged: bool = False,
    train_mode: bool = False,
    seed: int = 0,
    distributed: bool | None = None,
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
        loss_fn, weight_fn, merged, train_mode, seed, distributed:
            See :func:`estimate_sharpness`.

    Returns:
        `dict[str, float]`: ``avg`` (sharpness), ``avg_stderr`` (its standard error over pairs), ``loss``.
    """
    _check_option_values({"sigma": sigma, "noise": noise, "num_samples": num_samples})
    generator = _generator(seed)
    with _probe(model, batches, loss_fn, weight_fn, merged, train_mode, seed, distributed) as objective:
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
    loss_fn: Callable | None = None,
    weight_fn: Callable | None = None,
    merged: bool = False,
    train_mode: bool = False,
    seed: int = 0,
    distributed: bool | None = None,
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
        loss_fn, weight_fn, merged, train_mode, seed, distributed:
            See :func:`estimate_sharpness`.

    Returns:
        `dict[str, float]`: ``keskar``, ``keskar_first_order``, ``keskar_evals`` (function+gradient evaluations),
        ``loss``.
    """
    from scipy.optimize import minimize

    _check_option_values({"eps": eps, "maxiter": maxiter, "subspace_dim": subspace_dim})
    with _probe(model, batches, loss_fn, weight_fn, merged, train_mode, seed, distributed) as objective:
        if subspace_dim is None:
            basis = None
            center = objective.reference().double()
        else:
            dim = min(int(subspace_dim), objective.numel)
            basis = random_subspace(
                model, objective.numel, dim, seed, objective.dtype, objective.device, cache=cache_subspace
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
    hvp_method: str = "auto",
    fd_step: float | None = None,
    reuse_graph: bool | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    loss_fn: Callable | None = None,
    weight_fn: Callable | None = None,
    merged: bool = False,
    train_mode: bool = False,
    seed: int = 0,
    distributed: bool | None = None,
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
        hvp_method (`str`, *optional*, defaults to `"auto"`):
            ``"auto"``, ``"exact"`` (double backprop) or ``"fd"`` (central finite differences).
        fd_step (`float`, *optional*):
            Finite-difference step along a unit direction (default: see above).
        reuse_graph (`bool`, *optional*):
            Keep each probe batch's first-order graph across exact HVPs: ``True`` always (fastest; memory of all
            batches' graphs at once), ``False`` never (memory of one batch's graph; rebuilt at every HVP), ``None``
            (default) while the kept graphs' measured size fits in half the memory available when the first HVP
            starts. See :class:`~hf_batchsched.probes.hvp.ProbeObjective`.
        optimizer (`torch.optim.Optimizer`, *optional*):
            The training optimizer, for the EoS ratio (Adam statistics when it has them).
        lr (`float`, *optional*):
            Learning rate for the EoS ratio (overrides the optimizer's groups).
        loss_fn, weight_fn, merged, train_mode, seed, distributed:
            See :func:`estimate_sharpness`.

    Returns:
        `dict[str, float]`: ``lambda_max``, ``lambda_max_hvps`` (HVPs used), ``lambda_max_fd`` (1.0 if finite
        differences were used), and ``eos_ratio`` / ``lambda_max_preconditioned`` when computable.
    """
    _check_option_values({"max_steps": max_steps, "tol": tol})
    generator = _generator(seed)
    with _probe(
        model, batches, loss_fn, weight_fn, merged, train_mode, seed, distributed, hvp_method, fd_step, reuse_graph
    ) as objective:
        like = torch.zeros(1, dtype=objective.dtype, device=objective.device)
        result = lanczos(objective.hvp, objective.numel, max_steps, tol, generator, like=like)
        hvps = objective.num_hvps
        out = {"lambda_max": result.eigenvalue, "lambda_max_hvps": float(hvps)}
        out.update(_eos(objective, result.eigenvalue, optimizer, lr, max_steps, tol, generator, merged))
        out["lambda_max_fd"] = 1.0 if objective.hvp_method == "fd" else 0.0
    return out


def hessian_trace(
    model: nn.Module,
    batches: Sequence,
    *,
    num_probes: int = 10,
    hvp_method: str = "auto",
    fd_step: float | None = None,
    reuse_graph: bool | None = None,
    loss_fn: Callable | None = None,
    weight_fn: Callable | None = None,
    merged: bool = False,
    train_mode: bool = False,
    seed: int = 0,
    distributed: bool | None = None,
) -> dict[str, float]:
    """Hutchinson estimate of the Hessian trace, ``mean_k z_k^T H z_k`` with Rademacher ``z_k``, and its stderr.

    Runs exactly ``num_probes`` HVPs (no relative-change stopping rule: PyHessian's stops after 2 samples on
    noisy estimates). ``trace_stderr`` is the sample standard deviation over ``sqrt(num_probes)``.

    Args:
        num_probes (`int`, *optional*, defaults to `10`):
            Rademacher probes (HVPs), at least 2.
        hvp_method, fd_step, reuse_graph:
            See :func:`lambda_max`.
        loss_fn, weight_fn, merged, train_mode, seed, distributed:
            See :func:`estimate_sharpness`.

    Returns:
        `dict[str, float]`: ``trace`` and ``trace_stderr``.
    """
    _check_option_values({"num_probes": num_probes})
    generator = _generator(seed)
    with _probe(
        model, batches, loss_fn, weight_fn, merged, train_mode, seed, distributed, hvp_method, fd_step, reuse_graph
    ) as objective:
        samples = []
        for _ in range(num_probes):
            z = torch.randint(0, 2, (objective.numel,), generator=generator).to(objective.device, objective.dtype)
            z = 2 * z - 1
            samples.append(float(torch.dot(z, objective.hvp(z))))
    values = np.array(samples)
    return {"trace": float(values.mean()), "trace_stderr": float(values.std(ddof=1) / math.sqrt(len(values)))}


METRICS: dict[str, Callable[..., dict[str, float]]] = {
    "avg": average_sharpness,
    "keskar": keskar_sharpness,
    "lambda_max": lambda_max,
    "trace": hessian_trace,
}


def _accepted(function: Callable) -> set[str]:
    return {
        name
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _check_option_values(options: Mapping) -> None:
    """The estimators' checks of their option values, usable before anything runs (e.g. when a callback is built)."""
    for name in ("sigma", "eps", "tol", "maxiter", "max_steps"):
        if name in options:
            check_positive(name, options[name])
    if options.get("subspace_dim") is not None:
        check_positive("subspace_dim", options["subspace_dim"])
    if "noise" in options:
        check_choice("noise", options["noise"], ("elementwise", "row"))
    counts = (("num_samples", 2, True, "antithetic pairs"), ("num_probes", 2, False, "for a standard error"))
    for name, low, even, why in counts:
        if name not in options:
            continue
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (even and value % 2):
            kind = "an even number" if even else "an integer"
            raise ConfigError(f"{name} must be {kind} >= {low} ({why}), got {value!r}")


def validate_sharpness_options(
    metrics: Sequence[str], options: dict, *, callback_keys: Sequence[str] = ()
) -> tuple[str, ...]:
    """Check metric names, option names and option values without running anything; returns the metrics as a tuple.

    ``callback_keys`` (the arguments of a caller such as ``SharpnessProbeCallback``) are listed among the accepted
    names when an option is unknown.

    >>> validate_sharpness_options(["avg", "lambda_max"], {"sigma": 0.1, "max_steps": 10})
    ('avg', 'lambda_max')
    >>> validate_sharpness_options(["hessian"], {})
    Traceback (most recent call last):
    ...
    hf_batchsched.errors.ConfigError: unknown sharpness metric 'hessian'; valid choices: avg, keskar, lambda_max, trace
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    if not metrics:
        raise ConfigError(f"no sharpness metric given; choose from {', '.join(sorted(METRICS))}")
    for metric in metrics:
        check_choice("sharpness metric", metric, METRICS)
    accepted = set().union(*(_accepted(METRICS[m]) for m in metrics))
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"option(s) {', '.join(unknown)} not used by metric(s) {', '.join(metrics)}; "
            f"accepted: {', '.join(sorted(accepted | set(callback_keys)))}"
        )
    _check_option_values(options)
    return metrics


def estimate_sharpness(
    model: nn.Module,
    batches: Sequence,
    metrics: Sequence[str] = ("avg",),
    **options,
) -> dict[str, float]:
    """Run several sharpness estimators on the same probe batches; the functional twin of the callback.

    Each option goes to every metric that accepts it (e.g. ``seed``, ``merged``, ``sigma`` for ``avg``,
    ``max_steps`` for ``lambda_max``); an option no selected metric accepts is an error.

    Shared options:
        loss_fn (`Callable[[model, batch], Tensor]`, *optional*):
            Loss of one batch; defaults to ``model(**batch).loss``.
        weight_fn (`Callable[[batch], float]`, *optional*):
            Weight of one batch in the mean; defaults to its target-token (or sample) count.
        merged (`bool`, *optional*, defaults to `False`):
            Measure in merged LoRA weight space (invariant to the ``(B*c, A/c)`` rescaling).
        train_mode (`bool`, *optional*, defaults to `False`):
            Probe in train mode (dropout on, with masks fixed per batch; BatchNorm statistics restored after).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the probe's local generators.
        distributed (`bool`, *optional*):
            All-reduce over ``torch.distributed`` (each rank passes its share of the batches); auto-detected.

    Returns:
        `dict[str, float]`: the union of the estimators' results, e.g. ``{"avg": ..., "avg_stderr": ...,
        "loss": ...}``.

    Example:

    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Linear(3, 1)
    >>> batches = [{"x": torch.randn(8, 3), "y": torch.randn(8, 1)}]
    >>> def loss_fn(model, batch):
    ...     return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
    >>> out = estimate_sharpness(model, batches, ("avg", "lambda_max"), loss_fn=loss_fn)
    >>> sorted(out)
    ['avg', 'avg_stderr', 'lambda_max', 'lambda_max_fd', 'lambda_max_hvps', 'loss']
    """
    metrics = validate_sharpness_options(metrics, options)
    results: dict[str, float] = {}
    for metric in metrics:
        function = METRICS[metric]
        accepted = _accepted(function)
        results.update(function(model, batches, **{k: v for k, v in options.items() if k in accepted}))
    return results
