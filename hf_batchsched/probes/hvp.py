"""Hessian-vector products over a model's probe loss: ``ProbeObjective``, and ``probe_objective`` to run one.

:class:`ProbeObjective` is the token-weighted mean loss over fixed probe batches as a function of a flat offset
vector, with its gradient and Hessian-vector products (exact double backprop, reusing each probe batch's
first-order graph memory permitting, or central finite differences, chosen automatically), in the space
``ProbeOptions.merged`` selects (``hf_batchsched.probes.spaces``). :func:`probe_objective` builds one under
:func:`~hf_batchsched.probes.preserve.preserved_model_state`, so the model is left exactly as found. The
eigenvalue solvers that consume the HVPs are in ``hf_batchsched.probes.lanczos``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..model_utils import is_distributed
from ._memory import available_memory, saved_tensor_bytes
from .options import ProbeOptions, default_batch_weight, default_loss_fn
from .preserve import PreservedState, preserved_model_state
from .spaces import Space, make_space

__all__ = ["ProbeObjective", "default_fd_step", "probe_objective"]

logger = logging.getLogger(__name__)

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
    default the number of target tokens or samples), evaluated at ``variables = base + delta``. The options are a
    :class:`~hf_batchsched.probes.options.ProbeOptions` or its fields as keywords (``train_mode`` is the mode of
    the :func:`preserved_model_state` block, not applied here). :func:`probe_objective` builds one and closes it;
    to build one yourself, do it inside :func:`preserved_model_state` (pass the state it yields as ``preserved=``,
    so the base point is its copy of the parameters rather than a second one) and call :meth:`close` when done (it
    frees kept graphs, removes the merged-space hooks and puts the variables back).

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
        options: ProbeOptions | None = None,
        *,
        preserved: PreservedState | None = None,
        **probe_options,
    ):
        options = ProbeOptions.build(options, **probe_options)
        self.options = options
        if isinstance(batches, dict) or not isinstance(batches, Sequence):
            batches = [batches] if isinstance(batches, dict) else list(batches)
        self.model = model
        self.batches = list(batches)
        self.distributed = _distributed_world(options.distributed)
        if not self.batches and not self.distributed:
            raise ConfigError("no probe batches given; pass a list of batches (dicts of tensors)")
        self.loss_fn = options.loss_fn or default_loss_fn
        weight_fn = options.weight_fn or default_batch_weight
        self.seed = options.seed
        self.space: Space = make_space(model, options.merged, preserved)
        if options.merged:  # only the offsets are differentiated: no graph work for the adapter weights
            for p in model.parameters():
                p.requires_grad_(False)
        self.variables = self.space.variables
        self.shapes = [v.shape for v in self.variables]
        self.numel = sum(v.numel() for v in self.variables)
        self.device = self.variables[0].device
        self.dtype = torch.float64 if any(v.dtype == torch.float64 for v in self.variables) else torch.float32
        self._fd_step = options.fd_step
        weights = torch.tensor([float(weight_fn(b)) for b in self.batches], dtype=torch.float64)
        total = self._reduce(weights.sum().reshape(1).to(self.device))
        self.total_weight = float(total)
        if not self.total_weight > 0:
            raise ConfigError("the probe batches have zero total weight (no target tokens); check their labels")
        self.scales = (weights / self.total_weight).tolist()
        self.hvp_method = options.hvp_method  # "auto" becomes the method the first HVP could use
        self.reuse_graph = options.reuse_graph  # becomes False for good if a kept graph goes stale
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


@contextlib.contextmanager
def probe_objective(
    model: nn.Module, batches: Sequence, options: ProbeOptions | None = None
) -> Iterator[ProbeObjective]:
    """A :class:`ProbeObjective` over ``batches`` under :func:`preserved_model_state` (in train mode with
    ``options.train_mode``); on exit the objective is closed and the model is exactly as found.

    >>> model = torch.nn.Linear(2, 1)
    >>> batch = {"x": torch.ones(4, 2), "y": torch.zeros(4, 1)}
    >>> mse = lambda model, batch: torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
    >>> with probe_objective(model, [batch], ProbeOptions(loss_fn=mse)) as objective:
    ...     objective.numel, objective.loss() == mse(model, batch).item()
    (3, True)
    """
    options = options if options is not None else ProbeOptions()
    with preserved_model_state(model, train_mode=options.train_mode) as preserved:
        objective = ProbeObjective(model, batches, options, preserved=preserved)
        try:
            yield objective
        finally:
            objective.close()
