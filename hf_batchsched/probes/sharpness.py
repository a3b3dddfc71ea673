"""Sharpness of the training loss at the current weights: four estimators and one entry point.

All estimators measure the weighted mean loss ``f`` over fixed probe batches (``model(**batch).loss`` or
``loss_fn(model, batch)``, weighted by target tokens / samples, see
:func:`~hf_batchsched.probes.options.default_batch_weight`) as a function of the trainable parameters (the LoRA
adapters under peft), or with ``merged=True`` of the merged weight ``W0 + s*B@A`` of every LoRA layer, which
makes the answer invariant to the LoRA rescaling ``(B*c, A/c)``. They run in eval mode (dropout off, BatchNorm
on running statistics) unless ``train_mode=True``, draw randomness from a local generator seeded by ``seed``,
and leave the model exactly as found (see :func:`~hf_batchsched.probes.preserve.preserved_model_state`). The
options they share are stated once, as :class:`~hf_batchsched.probes.options.ProbeOptions`.

| metric (key) | definition | cost, in passes over the probe set |
|---|---|---|
| ``avg`` | ``E[f(w+e)] - f(w)``, ``e ~ N(0, (sigma*|w|)^2)`` (antithetic pairs) | ``num_samples + 1`` forwards |
| ``keskar`` | Keskar et al. 2017 metric 2.1, 10 L-BFGS-B iterations | ``keskar_evals`` forward+backward (11-40) |
| ``lambda_max`` | top Hessian eigenvalue, Lanczos on HVPs | ``<= max_steps`` HVPs (+ as many for EoS) |
| ``trace`` | Hutchinson estimate of ``tr(H)`` with its standard error | ``num_probes`` HVPs |

This module is the entry point (``estimate_sharpness``, the metric registry, option checks); the estimators are
in ``perturbation.py`` (``avg``, ``keskar``) and ``hessian.py`` (``lambda_max``, ``trace``).

An exact HVP (double backprop) reuses each probe batch's first-order graph (built once per probe, memory
permitting) and then costs one double backward, about 1.3-1.9 forward+backward passes; a finite-difference one 2.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from torch import nn

from ..errors import ConfigError, check_choice
from .hessian import hessian_trace, lambda_max
from .options import HVP_OPTIONS, ProbeOptions, check_option_values
from .perturbation import average_sharpness, keskar_sharpness

__all__ = [
    "METRICS",
    "average_sharpness",
    "estimate_sharpness",
    "hessian_trace",
    "keskar_sharpness",
    "lambda_max",
    "validate_sharpness_options",
]


METRICS: dict[str, Callable[..., dict[str, float]]] = {
    "avg": average_sharpness,
    "keskar": keskar_sharpness,
    "lambda_max": lambda_max,
    "trace": hessian_trace,
}


# The metrics that run on Hessian-vector products, and so read the ``HVP_OPTIONS`` of ``ProbeOptions``.
_HVP_METRICS = ("lambda_max", "trace")


def _own_options(metric: str) -> set[str]:
    """The metric's own keyword options (``sigma``, ``max_steps``, ...), not the shared ``ProbeOptions``."""
    return {
        name
        for name, parameter in inspect.signature(METRICS[metric]).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "probe"
    }


def _accepted(metric: str) -> set[str]:
    """Every option name the metric reads: its own and the ``ProbeOptions`` it uses."""
    shared = set(ProbeOptions.names())
    if metric not in _HVP_METRICS:
        shared -= set(HVP_OPTIONS)
    return _own_options(metric) | shared


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
    accepted = set().union(*(_accepted(m) for m in metrics))
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"option(s) {', '.join(unknown)} not used by metric(s) {', '.join(metrics)}; "
            f"accepted: {', '.join(sorted(accepted | set(callback_keys)))}"
        )
    check_option_values(options)
    return metrics


def estimate_sharpness(
    model: nn.Module,
    batches: Sequence,
    metrics: Sequence[str] = ("avg",),
    probe: ProbeOptions | None = None,
    **options,
) -> dict[str, float]:
    """Run several sharpness estimators on the same probe batches; the functional twin of the callback.

    Each option goes to every metric that accepts it (e.g. ``seed``, ``merged``, ``sigma`` for ``avg``,
    ``max_steps`` for ``lambda_max``); an option no selected metric accepts is an error.

    The shared options (``loss_fn``, ``weight_fn``, ``merged``, ``train_mode``, ``seed``, ``distributed``, and
    ``hvp_method``, ``fd_step``, ``reuse_graph`` for the HVP-based metrics) are the fields of
    :class:`~hf_batchsched.probes.options.ProbeOptions`: pass them as keywords or as ``probe=``; they are built
    into one ``ProbeOptions`` that every metric gets.

    Returns:
        `dict[str, float]`: the union of the estimators' results, e.g. ``{"avg": ..., "avg_stderr": ...,
        "loss": ...}``.

    Example:

    >>> import torch
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
    shared = set(ProbeOptions.names())
    probe = ProbeOptions.build(probe, **{k: v for k, v in options.items() if k in shared})
    results: dict[str, float] = {}
    for metric in metrics:
        own = _own_options(metric)
        results.update(METRICS[metric](model, batches, probe=probe, **{k: v for k, v in options.items() if k in own}))
    return results
