"""Hessian-vector products, Lanczos and power iteration over a model's probe loss.

Building blocks of the sharpness probe (``hf_batchsched.probes.sharpness``):

- :func:`preserved_model_state`: a context manager under which a probe may do anything to the model; on exit
  the model is exactly as found (parameters, buffers such as BatchNorm running statistics and
  ``num_batches_tracked``, ``.grad`` tensors including ``None``, ``requires_grad`` flags, train/eval mode of
  every module, and the global RNG states of torch (CPU and CUDA), numpy and ``random``).
- :class:`ProbeObjective`: the token-weighted mean loss over fixed probe batches as a function of a flat
  offset vector, with its gradient and Hessian-vector products (exact double backprop, reusing each probe
  batch's first-order graph memory permitting, or central finite differences, chosen automatically). It works
  in one of two spaces: the trainable parameters (LoRA adapters under peft), or with ``merged=True`` the merged
  weight of every LoRA layer (``W0 + s*B@A``), which makes the answer invariant to the LoRA rescaling symmetry
  ``(B*c, A/c)``.
- :func:`lanczos` and :func:`power_iteration`: top eigenvalue of a symmetric operator given as a matvec.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, check_choice
from ._utils import available_memory, is_distributed, saved_tensor_bytes

__all__ = [
    "HVP_METHODS",
    "LanczosResult",
    "PreservedState",
    "ProbeObjective",
    "default_batch_weight",
    "default_loss_fn",
    "default_fd_step",
    "lanczos",
    "power_iteration",
    "preserved_model_state",
]

logger = logging.getLogger(__name__)

HVP_METHODS = ("auto", "exact", "fd")

# Errors that mean "this model cannot be differentiated twice (or with autograd.grad) here": SDPA / flash
# attention kernels without a double backward, fused kernels, and reentrant activation checkpointing.
_NO_DOUBLE_BACKWARD = re.compile(
    r"derivative for .* is not implemented|not implemented for double backward|does not support double backward"
    r"|double backwards? .*not (?:supported|implemented)|Checkpointing is not compatible|incompatible with \.grad\(\)",
    re.IGNORECASE,
)
_REENTRANT_CHECKPOINT = re.compile(r"Checkpointing is not compatible|incompatible with \.grad\(\)", re.IGNORECASE)
# A kept graph whose saved tensors a later forward changed in place (e.g. BatchNorm running statistics in train mode)
_MODIFIED_IN_PLACE = re.compile(r"modified by an inplace operation", re.IGNORECASE)


# --------------------------------------------------------------------------------------------------------------
# Leave the model exactly as found
# --------------------------------------------------------------------------------------------------------------


class PreservedState:
    """What :func:`preserved_model_state` saved on entry; a probe built inside the block reads its parameter
    copies instead of making its own (:class:`ProbeObjective` ``preserved=``)."""

    def __init__(self, params: Sequence[nn.Parameter], values: Sequence[torch.Tensor | None]):
        self._values = {id(p): (p, value) for p, value in zip(params, values) if value is not None}

    def value_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """The copy of ``param`` saved on entry if ``param`` still holds exactly that value, else ``None``.

        The copy is the one restored on exit: read it, never write to it.
        """
        entry = self._values.get(id(param))
        if entry is None or entry[0] is not param:
            return None
        value = entry[1]
        return value if value.shape == param.shape and torch.equal(value, param.detach()) else None


@contextlib.contextmanager
def preserved_model_state(model: nn.Module, train_mode: bool = False) -> Iterator[PreservedState]:
    """Run a probe on ``model`` and restore everything it could change, bit for bit, on exit.

    Inside the block the model is in eval mode (dropout off, BatchNorm on running statistics), or in train mode
    with ``train_mode=True`` (BatchNorm statistics then move inside the block and are restored on exit), and
    every ``.grad`` is ``None`` (the original tensors are put back on exit, untouched). Restored on exit: the
    values of the parameters that required grad on entry (the ones a probe perturbs; frozen parameters are not
    copied, so a frozen 4-bit or 7B base costs no extra memory), every ``requires_grad`` flag, every buffer,
    every ``.grad`` (``None`` stays ``None``), each module's ``training`` flag, and the RNG states of torch (CPU,
    and CUDA when initialised), numpy and ``random``.

    Yields a :class:`PreservedState`: pass it as ``ProbeObjective(..., preserved=state)`` so the probe's base
    point is the copy made here (one copy of the trainable parameters in all, not two).

    Example:

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Dropout(0.5))
    >>> before = [t.clone() for t in model.state_dict().values()]
    >>> with preserved_model_state(model, train_mode=True):
    ...     _ = model(torch.randn(4, 2))  # BN statistics move, dropout draws from the global RNG
    ...     with torch.no_grad():
    ...         _ = model[0].weight.add_(1.0)
    >>> all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values())), model.training
    (True, True)
    """
    params = list(model.parameters())
    # a probe perturbs only the trainable parameters: cloning the frozen base (e.g. 7B weights) would double memory
    saved_values = [p.detach().clone() if p.requires_grad else None for p in params]
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    buffers = list(model.buffers())
    saved_buffers = [b.detach().clone() for b in buffers]
    modes = [(module, module.training) for module in model.modules()]
    torch_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    # bitsandbytes Linear4bit on AVX512-BF16 CPUs repacks its weight in place on the first eval-mode forward whose
    # input does not require grad, after which no gradient flows through it (gemv_4bit has no autograd kernel):
    # keep a probe from doing that to the model
    repacking = [
        (m, m.support_avx512bf16_for_cpu) for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")
    ]
    try:
        for module, _ in repacking:
            module.support_avx512bf16_for_cpu = False
        for p in params:
            p.grad = None
        model.train(train_mode)
        yield PreservedState(params, saved_values)
    finally:
        for module, flag in repacking:
            module.support_avx512bf16_for_cpu = flag
        with torch.no_grad():
            for p, value, flag, grad in zip(params, saved_values, saved_flags, saved_grads):
                p.requires_grad_(flag)
                if value is not None:
                    p.copy_(value)
                p.grad = grad
            for b, value in zip(buffers, saved_buffers):
                b.copy_(value)
        for module, mode in modes:
            module.training = mode
        torch.set_rng_state(torch_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


# --------------------------------------------------------------------------------------------------------------
# Loss over probe batches
# --------------------------------------------------------------------------------------------------------------


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


def default_fd_step(dtype: torch.dtype, reference_rms: float = 1.0, base_norm: float = 0.0) -> float:
    """Central-difference step along a unit direction: ``u^(1/3) * rms(x)``, at least ``8 * u * ||x_stored||``.

    ``u`` is the machine epsilon of the lowest-precision variable, ``rms(x)`` the root mean square of the point's
    entries (the parameters, or the merged LoRA weights with ``merged=True``; 1 if they are all zero) and
    ``||x_stored||`` the norm of the values the perturbation is added to (the parameters; 0 for merged offsets).

    - ``(g(x+hv) - g(x-hv)) / 2h`` has truncation error ``~h^2 * |D^3 f(x)[v, v]| / 6`` and rounding error
      ``~u / h`` times the gradient's scale; ``h = u^(1/3)`` balances them for a function that varies over unit
      lengths. A network's loss varies over the scale of its weights: the top Hessian direction is concentrated
      on few entries, and moving them by a fraction of their own size changes the curvature by as much. So the
      length unit is ``rms(x)`` (about 0.02-0.1 for transformer weights), not 1 and not ``||x||`` (which grows
      as ``sqrt(n)``); see the README for the measured errors of each choice.
    - The perturbation is rounded to the stored dtype entry by entry, an error of norm up to ``0.29 * u * ||x||``;
      the floor keeps it under 4% of the step (it binds in bf16, or in fp32 beyond ~17M spread-out entries).

    >>> f"{default_fd_step(torch.float32, reference_rms=0.05):.1e}", f"{default_fd_step(torch.float64):.1e}"
    ('2.5e-04', '6.1e-06')
    >>> f"{default_fd_step(torch.bfloat16, reference_rms=0.05, base_norm=30.0):.2f}"  # the rounding floor binds
    '1.88'
    """
    eps = float(torch.finfo(dtype).eps)
    scale = reference_rms if reference_rms > 0 and math.isfinite(reference_rms) else 1.0
    return max(eps ** (1.0 / 3.0) * scale, 8.0 * eps * base_norm)


class _Space:
    """Variables of the probe: leaf tensors that require grad, their base values, and the reference point x."""

    variables: list[torch.Tensor]
    names: list[str]

    def reference(self) -> list[torch.Tensor]:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        pass


class _ParameterSpace(_Space):
    def __init__(self, model: nn.Module, preserved: PreservedState | None = None):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError(
                "the model has no trainable parameters (requires_grad=True) to probe; unfreeze the parameters to "
                "measure (e.g. attach a LoRA adapter with peft), or use merged=True on a peft LoRA model"
            )
        self.names = [n for n, _ in named]
        self.variables = [p for _, p in named]
        # the copy preserved_model_state already made, when the parameter still holds it; else a copy of our own
        saved = [preserved.value_of(p) if preserved is not None else None for p in self.variables]
        self.base = [value if value is not None else p.detach().clone() for p, value in zip(self.variables, saved)]

    def reference(self) -> list[torch.Tensor]:
        return self.base


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency of the project
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _base_weight(layer: nn.Module) -> torch.Tensor:
    weight = layer.get_base_layer().weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit (QLoRA): dequantize the base weight for the reference
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).float()
    if weight.dtype in (torch.int8, torch.uint8):
        raise ConfigError("merged=True does not support 8-bit base weights; use merged=False (adapter space)")
    return weight.detach().float()


class _MergedLoraSpace(_Space):
    """Offsets E of each adapted layer's merged weight, added as ``output += x @ E.T`` by a forward hook."""

    def __init__(self, model: nn.Module):
        layers = _lora_layers(model)
        if not layers:
            raise ConfigError("merged=True needs a peft LoRA model (no LoraLayer found); use merged=False")
        self.names, self.variables, self._reference, self._hooks = [], [], [], []
        for name, layer in layers:
            if getattr(layer, "fan_in_fan_out", False) or not hasattr(layer.get_base_layer(), "weight"):
                raise ConfigError(f"merged=True supports LoRA on Linear layers only; {name!r} is not one")
            merged = _base_weight(layer)
            for adapter in layer.active_adapters:
                if adapter in getattr(layer, "lora_A", {}):
                    merged = merged + layer.get_delta_weight(adapter).detach().float()
            dtype = torch.float64 if layer.get_base_layer().weight.dtype == torch.float64 else torch.float32
            offset = torch.zeros(merged.shape, dtype=dtype, device=merged.device, requires_grad=True)
            self.names.append(name + ".merged_weight")
            self.variables.append(offset)
            self._reference.append(merged.to(dtype))
            self._hooks.append(layer.register_forward_hook(self._hook(offset), with_kwargs=True))
        self.base = [torch.zeros_like(v) for v in self.variables]

    @staticmethod
    def _hook(offset: torch.Tensor):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["x"]
            return output + F.linear(x.to(offset.dtype), offset).to(output.dtype)

        return hook

    def reference(self) -> list[torch.Tensor]:
        return self._reference

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def _distributed_world(distributed: bool | None) -> bool:
    available = is_distributed()
    if distributed is None:
        return available and torch.distributed.get_world_size() > 1
    if distributed and not available:
        raise ConfigError("distributed=True needs an initialised torch.distributed process group")
    return distributed


class ProbeObjective:
    """The probe loss ``f(delta)`` over fixed batches, its gradient and Hessian-vector products, on a flat vector.

    ``f`` is the weighted mean of ``loss_fn(model, batch)`` over ``batches`` (weights from ``weight_fn``, by
    default the number of target tokens or samples), evaluated at ``variables = base + delta``. Build it inside
    :func:`preserved_model_state` (pass the state it yields as ``preserved=``, so the base point is its copy of the
    parameters rather than a second one); call :meth:`close` when done (it frees kept graphs, removes the
    merged-space hooks and puts the variables back).

    Under ``torch.distributed`` (``distributed=None`` detects it), every sum over batches is all-reduced, so each
    rank passes its own share of the probe batches (possibly none) and every rank gets the same numbers; every
    rank must make the same sequence of calls.

    Before each batch the global torch RNG is re-seeded from ``seed`` and the batch index, so with
    ``train_mode=True`` dropout draws the same masks at every evaluation and ``f`` stays a fixed function.

    **Exact HVPs and graph reuse.** An exact HVP needs each batch's first-order graph (forward, then the gradient
    with ``create_graph=True``); the HVP itself is one more backward through it. Since the batches and the base
    point are fixed, a kept graph serves every later HVP at the base point: ``reuse_graph=True`` keeps all of
    them (memory: the activations and gradient graph of every batch at once), ``False`` rebuilds them at every
    HVP (memory: one batch's), and ``None`` (default) keeps a batch's graph while the kept graphs' measured size
    (the bytes of the tensors they save, parameters excluded) stays within half the memory available on the
    device when the first HVP starts; batches beyond that are rebuilt each time. Any change of the variables
    (:meth:`set_offset` with an offset, e.g. a loss or gradient away from the base) frees the kept graphs. If a
    kept graph turns out stale because a later forward changed a tensor it saved in place (BatchNorm running
    statistics with ``train_mode=True`` and several batches), the HVP is redone without reuse for good.
    :attr:`num_forwards`, :attr:`num_graph_builds`, :attr:`graph_bytes` and :attr:`kept_graphs` report what
    happened.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence,
        loss_fn: Callable | None = None,
        weight_fn: Callable | None = None,
        merged: bool = False,
        hvp_method: str = "auto",
        fd_step: float | None = None,
        seed: int = 0,
        distributed: bool | None = None,
        reuse_graph: bool | None = None,
        preserved: PreservedState | None = None,
    ):
        check_choice("hvp_method", hvp_method, HVP_METHODS)
        if reuse_graph not in (None, True, False):
            raise ConfigError(f"reuse_graph must be True, False or None (automatic), got {reuse_graph!r}")
        if isinstance(batches, dict) or not isinstance(batches, Sequence):
            batches = [batches] if isinstance(batches, dict) else list(batches)
        self.model = model
        self.batches = list(batches)
        self.distributed = _distributed_world(distributed)
        if not self.batches and not self.distributed:
            raise ConfigError("no probe batches given; pass a list of batches (dicts of tensors)")
        self.loss_fn = loss_fn or default_loss_fn
        weight_fn = weight_fn or default_batch_weight
        self.seed = seed
        self.space: _Space = _MergedLoraSpace(model) if merged else _ParameterSpace(model, preserved)
        if merged:  # only the offsets are differentiated: no graph work for the adapter weights
            for p in model.parameters():
                p.requires_grad_(False)
        self.variables = self.space.variables
        self.shapes = [v.shape for v in self.variables]
        self.numel = sum(v.numel() for v in self.variables)
        self.device = self.variables[0].device
        self.dtype = torch.float64 if any(v.dtype == torch.float64 for v in self.variables) else torch.float32
        self._fd_step = fd_step
        weights = torch.tensor([float(weight_fn(b)) for b in self.batches], dtype=torch.float64)
        total = self._reduce(weights.sum().reshape(1).to(self.device))
        self.total_weight = float(total)
        if not self.total_weight > 0:
            raise ConfigError("the probe batches have zero total weight (no target tokens); check their labels")
        self.scales = (weights / self.total_weight).tolist()
        self.hvp_method = hvp_method
        self.reuse_graph = reuse_graph
        self._packed_4bit = [
            name
            for name, module in model.named_modules()
            if getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
        ]
        self.num_evals = 0
        self.num_hvps = 0
        self.num_forwards = 0
        self.num_graph_builds = 0
        self.graph_bytes: dict[int, int] = {}
        self._graphs: dict[int, list[torch.Tensor | None]] = {}
        self._graph_budget: float | None = None
        self._offset_applied = False
        self._warned_low_precision = False
        self._use_backward = False

    # -- helpers --------------------------------------------------------------------------------------------
    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            torch.distributed.all_reduce(tensor)
        return tensor

    def flatten(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        return torch.cat(
            [
                (t if t is not None else torch.zeros(s, device=self.device)).reshape(-1).to(self.dtype)
                for t, s in zip(tensors, self.shapes)
            ]
        )

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [c.view(s) for c, s in zip(flat.split([v.numel() for v in self.variables]), self.shapes)]

    def reference(self) -> torch.Tensor:
        """The current point x as a flat vector (the merged weights with ``merged=True``)."""
        return self.flatten(self.space.reference())

    @property
    def fd_step(self) -> float:
        """Finite-difference step along a unit direction: ``fd_step=`` if given, else :func:`default_fd_step`."""
        if self._fd_step is None:
            lowest = min((v.dtype for v in self.variables), key=lambda d: torch.finfo(d).bits)
            with torch.no_grad():
                square = sum(float(r.detach().double().square().sum()) for r in self.space.reference())
                stored = math.sqrt(sum(float(b.double().square().sum()) for b in self.space.base))
            self._fd_step = default_fd_step(lowest, math.sqrt(square / self.numel), stored)
        return self._fd_step

    @property
    def kept_graphs(self) -> int:
        """How many probe batches' first-order graphs are kept for the next exact HVP."""
        return len(self._graphs)

    def release_graphs(self) -> None:
        """Free the kept first-order graphs (the next exact HVP rebuilds what it needs)."""
        self._graphs = {}

    @torch.no_grad()
    def set_offset(self, delta: torch.Tensor | None) -> None:
        """Set the variables to ``base + delta`` (``None``: exactly back to base, bit for bit).

        An offset frees the kept HVP graphs; ``None`` when the variables are already at base does nothing.
        """
        if delta is None and not self._offset_applied:
            return
        self.release_graphs()
        chunks = self.unflatten(delta) if delta is not None else [None] * len(self.variables)
        for var, base, chunk in zip(self.variables, self.space.base, chunks):
            var.copy_(base)
            if chunk is not None:
                var.add_(chunk.to(var.dtype))
        self._offset_applied = delta is not None

    def close(self) -> None:
        self.release_graphs()
        self.set_offset(None)
        self.space.close()

    def _batch_loss(self, index: int, batch) -> torch.Tensor:
        torch.manual_seed((self.seed * 1_000_003 + index) % (2**63))
        self.num_forwards += 1
        try:
            loss = self.loss_fn(self.model, batch)
        except torch.OutOfMemoryError as error:
            raise ConfigError(
                f"probe batch {index} does not fit in memory ({error}); split the probe set into smaller batches "
                "(SharpnessProbeCallback(probe_batch_size=...) or shorter lists of smaller dicts)"
            ) from error
        return loss * self.scales[index]

    def _batch_loss_and_grad(self, index: int, batch, create_graph: bool = False):
        """Loss of one batch (scaled by its weight) and its gradient w.r.t. the variables (``None`` if unused)."""
        if self._packed_4bit:
            raise ConfigError(
                f"bitsandbytes repacked the 4-bit weight of {self._packed_4bit[0]!r} "
                f"(and {len(self._packed_4bit) - 1} more) for CPU inference (an eval-mode forward without grad); "
                "gradients do not flow through repacked weights, so gradient-based metrics would be silently "
                "wrong. Use metric 'avg', or reload the model (the probe itself never repacks)"
            )
        if not self._use_backward:
            loss = self._batch_loss(index, batch)
            try:
                grads = torch.autograd.grad(loss, self.variables, create_graph=create_graph, allow_unused=True)
                return loss, list(grads)
            except RuntimeError as error:
                if create_graph or not _REENTRANT_CHECKPOINT.search(str(error)):
                    raise
            logger.info("reentrant activation checkpointing: computing gradients with .backward()")
            self._use_backward = True
        # reentrant activation checkpointing rejects autograd.grad: accumulate into .grad instead (the model's own
        # .grad tensors are out of the way under preserved_model_state and come back on exit)
        if create_graph:
            raise RuntimeError("Checkpointing is not compatible with .grad(): no double backprop")
        for p in self.model.parameters():
            p.grad = None
        for var in self.variables:
            var.grad = None
        loss = self._batch_loss(index, batch)
        loss.backward()
        grads = [var.grad for var in self.variables]
        for p in self.model.parameters():
            p.grad = None
        for var in self.variables:
            var.grad = None
        return loss, grads

    # -- public evaluations ---------------------------------------------------------------------------------
    @torch.no_grad()
    def loss(self, delta: torch.Tensor | None = None) -> float:
        """``f(delta)`` (forward passes only)."""
        self.set_offset(delta)
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        for index, batch in enumerate(self.batches):
            total += self._batch_loss(index, batch).detach().double()
        self.num_evals += 1
        return float(self._reduce(total))

    def loss_and_grad(self, delta: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """``f(delta)`` and its gradient as a flat vector (one forward+backward per batch)."""
        self.set_offset(delta)
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        grad = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        with torch.enable_grad():
            for index, batch in enumerate(self.batches):
                loss, grads = self._batch_loss_and_grad(index, batch)
                total += loss.detach().double()
                grad += self.flatten(grads)
        self.num_evals += 1
        total, grad = self._reduce(total), self._reduce(grad)
        return float(total), grad

    def _first_order_graph(self, index: int, batch) -> tuple[list[torch.Tensor | None], bool]:
        """Batch ``index``'s gradient with its graph (``create_graph=True``), and whether to keep it."""
        self.num_graph_builds += 1
        if self.reuse_graph is not None:
            return self._batch_loss_and_grad(index, batch, create_graph=True)[1], self.reuse_graph
        if self._graph_budget is None:  # half of what is free before the first graph exists
            self._graph_budget = 0.5 * available_memory(self.device)
        excluded = [*self.model.parameters(), *self.model.buffers(), *self.variables]
        with saved_tensor_bytes(exclude=excluded) as saved:
            grads = self._batch_loss_and_grad(index, batch, create_graph=True)[1]
        size = saved["bytes"] + sum(g.numel() * g.element_size() for g in grads if g is not None)
        self.graph_bytes[index] = size
        kept = sum(self.graph_bytes[i] for i in self._graphs)
        return grads, kept + size <= self._graph_budget

    def _hvp_exact(self, vector: torch.Tensor) -> torch.Tensor:
        pieces = self.unflatten(vector)
        out = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        with torch.enable_grad():
            for index, batch in enumerate(self.batches):
                grads, reused = self._graphs.get(index), index in self._graphs
                keep = reused
                if grads is None:
                    grads, keep = self._first_order_graph(index, batch)
                    if keep:
                        self._graphs[index] = grads
                pairs = [(g, p.to(g.dtype)) for g, p in zip(grads, pieces) if g is not None and g.requires_grad]
                if not pairs:
                    continue
                try:
                    hv = torch.autograd.grad(
                        [g for g, _ in pairs],
                        self.variables,
                        grad_outputs=[p for _, p in pairs],
                        allow_unused=True,
                        retain_graph=keep,
                    )
                except RuntimeError as error:
                    if not reused or not _MODIFIED_IN_PLACE.search(str(error)):
                        raise
                    logger.info("a kept HVP graph went stale (%s); rebuilding graphs at every HVP", error)
                    self.release_graphs()
                    self.reuse_graph = False
                    return self._hvp_exact(vector)
                out += self.flatten(hv)
        return out

    def _hvp_fd(self, vector: torch.Tensor) -> torch.Tensor:
        if not self._warned_low_precision and any(torch.finfo(v.dtype).bits < 32 for v in self.variables):
            self._warned_low_precision = True
            logger.warning(
                "finite-difference HVPs on %s variables are unreliable (lambda_max measured 87%% low to 262x high "
                "on bf16 tiny Llamas): probe fp32 weights or use exact HVPs",
                min((v.dtype for v in self.variables), key=lambda d: torch.finfo(d).bits),
            )
        norm = float(vector.norm())
        if norm == 0.0:
            return torch.zeros_like(vector)
        step = self.fd_step / norm
        _, plus = self.loss_and_grad(step * vector)
        _, minus = self.loss_and_grad(-step * vector)
        self.num_evals -= 2
        self.set_offset(None)
        return (plus - minus) / (2 * step)

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        """``H @ vector`` at the base point: exact (double backprop) or central finite differences.

        With ``hvp_method="auto"`` the first call tries double backprop and, if the model cannot be differentiated
        twice (SDPA/flash attention "derivative ... not implemented", reentrant checkpointing), switches to finite
        differences for good; :attr:`hvp_method` then says which one was used. Exact HVPs reuse kept first-order
        graphs (see the class docstring).
        """
        self.num_hvps += 1
        vector = vector.to(self.device, self.dtype)
        if self.hvp_method == "fd":
            return self._hvp_fd(vector)  # loss_and_grad has already summed the gradients over ranks
        self.set_offset(None)
        try:
            out = self._hvp_exact(vector)
        except RuntimeError as error:
            self.release_graphs()
            if self.hvp_method != "auto" or not _NO_DOUBLE_BACKWARD.search(str(error)):
                raise
            logger.info("double backprop unavailable (%s); using finite-difference HVPs", str(error).splitlines()[0])
            self.hvp_method = "fd"
            return self._hvp_fd(vector)  # loss_and_grad has already summed the gradients over ranks
        if self.hvp_method == "auto":
            self.hvp_method = "exact"
        return self._reduce(out)


# --------------------------------------------------------------------------------------------------------------
# Eigenvalue solvers
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LanczosResult:
    """Top eigenvalue of a symmetric operator and how it was reached."""

    eigenvalue: float
    num_matvecs: int
    residual: float
    history: list[float] = field(default_factory=list)
    ritz_values: list[float] = field(default_factory=list)
    eigenvector: torch.Tensor | None = None


def _start_vector(n: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    vector = torch.randn(n, generator=generator, dtype=torch.float64).to(like.device, like.dtype)
    return vector / vector.norm()


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    max_steps: int = 20,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    like: torch.Tensor | None = None,
) -> LanczosResult:
    """Largest (algebraic) eigenvalue of a symmetric ``n x n`` operator by Lanczos with full reorthogonalisation.

    The tridiagonal matrix is solved in float64 (``scipy.linalg.eigh_tridiagonal``) at every step; the iteration
    stops when the Ritz residual ``beta_k * |s_k|`` is at most ``tol * |theta|`` or after ``max_steps`` matvecs.
    Lanczos converges to the top eigenvalue much faster than power iteration (the Krylov space contains the
    Chebyshev-accelerated power iterate), see ``benchmarks/bench_sharpness.py``.

    Example:

    >>> diag = torch.tensor([5.0, 1.0, 0.5, -2.0], dtype=torch.float64)
    >>> result = lanczos(lambda v: diag * v, 4, generator=torch.Generator().manual_seed(0), like=diag)
    >>> round(result.eigenvalue, 6), result.num_matvecs
    (5.0, 4)
    """
    from scipy.linalg import eigh_tridiagonal

    like = like if like is not None else torch.zeros(1)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    vector = _start_vector(n, generator, like)
    basis, alphas, betas, history = [vector], [], [], []
    previous = None
    theta, residual, ritz, top_vec = float("nan"), float("inf"), [], None
    for step in range(min(max_steps, n)):
        w = matvec(vector).to(like.device, like.dtype)
        alpha = float(torch.dot(w, vector))
        w = w - alpha * vector
        if previous is not None:
            w = w - betas[-1] * previous
        stacked = torch.stack(basis)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - stacked.T @ (stacked @ w)
        beta = float(w.norm())
        alphas.append(alpha)
        values, vectors = eigh_tridiagonal(np.array(alphas), np.array(betas)) if betas else (np.array(alphas), None)
        theta = float(values[-1])
        last = abs(float(vectors[-1, -1])) if vectors is not None else 1.0
        residual = beta * last
        history.append(theta)
        ritz = values.tolist()
        top_vec = vectors[:, -1] if vectors is not None else np.ones(1)
        if residual <= tol * max(abs(theta), 1e-30) or beta <= 1e-12 * max(abs(theta), 1e-30) or step + 1 >= n:
            break
        betas.append(beta)
        previous, vector = vector, w / beta
        basis.append(vector)
    eigenvector = (torch.stack(basis[: len(top_vec)]).T @ torch.as_tensor(top_vec, dtype=like.dtype)).to(like.device)
    return LanczosResult(theta, len(history), residual, history, ritz, eigenvector)


def power_iteration(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    max_steps: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    like: torch.Tensor | None = None,
) -> LanczosResult:
    """Largest-magnitude eigenvalue by power iteration, as PyHessian does (stop on relative change < ``tol``).

    Kept as the baseline for the benchmark; :func:`lanczos` needs far fewer matvecs for the same accuracy.

    >>> diag = torch.tensor([5.0, 1.0, 0.5], dtype=torch.float64)
    >>> result = power_iteration(lambda v: diag * v, 3, tol=1e-9, generator=torch.Generator().manual_seed(0),
    ...                          like=diag)
    >>> round(result.eigenvalue, 6)
    5.0
    """
    like = like if like is not None else torch.zeros(1)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    vector = _start_vector(n, generator, like)
    eigenvalue, history = None, []
    for _ in range(max_steps):
        hv = matvec(vector).to(like.device, like.dtype)
        new = float(torch.dot(hv, vector))
        history.append(new)
        norm = float(hv.norm())
        if norm == 0.0:
            eigenvalue = 0.0
            break
        vector = hv / norm
        if eigenvalue is not None and abs(new - eigenvalue) / (abs(eigenvalue) + 1e-6) < tol:
            eigenvalue = new
            break
        eigenvalue = new
    return LanczosResult(float(eigenvalue), len(history), math.nan, history, [], vector)
