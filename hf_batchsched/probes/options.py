"""What a probe measures and how: ``ProbeOptions``, the one statement of the options every sharpness estimator
shares, with the default loss and batch weight, and the checks of the estimators' own option values.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, check_choice, check_positive

__all__ = [
    "HVP_METHODS",
    "HVP_OPTIONS",
    "ProbeOptions",
    "check_option_values",
    "default_batch_weight",
    "default_loss_fn",
]

HVP_METHODS = ("auto", "exact", "fd")


@dataclass(frozen=True)
class ProbeOptions:
    """How a probe evaluates the loss: the options shared by every sharpness estimator and by ``ProbeObjective``.

    Each estimator takes ``probe=ProbeOptions(...)`` or the same names as keywords (``lambda_max(model, batches,
    loss_fn=..., seed=1)``); :meth:`build` merges the two.

    Args:
        loss_fn (`Callable[[model, batch], Tensor]`, *optional*):
            Loss of one batch; defaults to ``model(**batch).loss`` (``default_loss_fn``).
        weight_fn (`Callable[[batch], float]`, *optional*):
            Weight of one batch in the mean; defaults to its target-token (or sample) count (``default_batch_weight``).
        merged (`bool`, *optional*, defaults to `False`):
            Measure in merged LoRA weight space (invariant to the ``(B*c, A/c)`` rescaling).
        train_mode (`bool`, *optional*, defaults to `False`):
            Probe in train mode (dropout on, with masks fixed per batch; BatchNorm statistics restored after).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the probe's local generators.
        distributed (`bool`, *optional*):
            All-reduce over ``torch.distributed`` (each rank passes its share of the batches); auto-detected.
        hvp_method (`str`, *optional*, defaults to `"auto"`):
            Hessian-vector products by ``"exact"`` double backprop, ``"fd"`` central finite differences, or
            ``"auto"`` (exact where the model supports it). Read by the HVP-based metrics only (``HVP_OPTIONS``).
        fd_step (`float`, *optional*):
            Finite-difference step along a unit direction (default: ``hvp.default_fd_step``).
        reuse_graph (`bool`, *optional*):
            Keep each probe batch's first-order graph across exact HVPs: ``True`` always, ``False`` never, ``None``
            (default) while the kept graphs fit in half the memory available (see ``hvp.ProbeObjective``).

    >>> ProbeOptions.build(ProbeOptions(seed=3), merged=True).seed, ProbeOptions.build(merged=True).merged
    (3, True)
    >>> ProbeOptions(hvp_method="magic")
    Traceback (most recent call last):
    ...
    hf_batchsched.errors.ConfigError: unknown hvp_method 'magic'; valid choices: auto, exact, fd
    """

    loss_fn: Callable | None = None
    weight_fn: Callable | None = None
    merged: bool = False
    train_mode: bool = False
    seed: int = 0
    distributed: bool | None = None
    hvp_method: str = "auto"
    fd_step: float | None = None
    reuse_graph: bool | None = None

    def __post_init__(self):
        check_choice("hvp_method", self.hvp_method, HVP_METHODS)
        if self.reuse_graph not in (None, True, False):
            raise ConfigError(f"reuse_graph must be True, False or None (automatic), got {self.reuse_graph!r}")

    def generator(self) -> torch.Generator:
        """A fresh local generator seeded by ``seed``, for the estimator's own random draws (noise, probe vectors)."""
        return torch.Generator().manual_seed(int(self.seed))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def build(cls, options: ProbeOptions | None = None, **overrides) -> ProbeOptions:
        """``options`` (default: all defaults) with ``overrides`` replaced; an unknown name is a ``TypeError``."""
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown probe option(s) {', '.join(unknown)}; accepted: {', '.join(cls.names())}")
        options = options if options is not None else cls()
        return dataclasses.replace(options, **overrides) if overrides else options


# Options that only the metrics built on Hessian-vector products read.
HVP_OPTIONS = ("hvp_method", "fd_step", "reuse_graph")


def default_loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    """``model(**batch).loss``: the model's own (mean) loss, e.g. shifted token cross-entropy for a causal LM."""
    loss = model(**batch).loss
    if loss is None:
        raise ConfigError(
            "model(**batch).loss is None: the probe batches have no 'labels'; add labels or pass "
            "loss_fn=lambda model, batch: <scalar loss>"
        )
    return loss


def default_batch_weight(batch) -> float:
    """The weight of a probe batch in the average: the number of items its mean loss averages over.

    ``labels`` with 2+ dimensions are taken as causal-LM token labels (the loss is shifted by one position and
    ignores ``-100``), so the weight is the number of ``labels[..., 1:] != -100``; 1-D ``labels`` (classification)
    count samples; otherwise the first dimension of the first tensor; otherwise 1. Pass ``weight_fn`` to the
    estimators for other conventions (e.g. token classification, whose labels are not shifted).

    >>> default_batch_weight({"labels": torch.tensor([[5, 6, -100], [1, 2, 3]])})
    3.0
    >>> default_batch_weight({"labels": torch.tensor([0, 1, 1])})
    3.0
    """
    if isinstance(batch, dict):
        labels = batch.get("labels")
        if isinstance(labels, torch.Tensor):
            if labels.dim() >= 2:
                return float((labels[..., 1:] != -100).sum())
            return float(labels.shape[0])
        values = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        values = [batch]
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return float(value.shape[0])
    return 1.0


def check_option_values(options: Mapping) -> None:
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
