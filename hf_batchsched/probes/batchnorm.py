"""BatchNorm state that stays correct while the batch size moves: ghost BN, recalibration, freezing.

Three tools, each a plain function usable without a Trainer (the callbacks in
``hf_batchsched.callbacks.batchnorm`` are thin shells over them):

- ``convert_to_ghost_bn(model, ghost_batch_size)``: ghost batch normalisation (Hoffer, Hubara & Soudry 2017,
  https://arxiv.org/abs/1705.08741). BN layers normalise each chunk of ``ghost_batch_size`` samples with that
  chunk's own statistics, so normalisation noise stays fixed while the batch grows.
- ``recalibrate_bn(model, batches)``: recompute running statistics with the current weights, weighting every
  sample equally (Goyal et al. 2017, Sec. 5.2: "recomputed prior to evaluating").
- ``freeze_bn(model)``: keep BN layers in inference mode (running statistics fixed) through the Trainer's
  per-step ``model.train()``; ``unfreeze_bn`` undoes it.

Note: the batch-size ramp of ``hf_batchsched.trainer.BatchRampTrainer`` already runs every forward on micro-chunks
of at most ``max_micro_batch_size`` samples, which is ghost BN at the micro-batch size with no module surgery;
``convert_to_ghost_bn`` is for a plain ``Trainer`` whose per-device batch itself is large.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hf_batchsched.errors import ConfigError, check_positive
from hf_batchsched.probes._utils import default_forward, is_distributed, model_device, split_batch, to_device

__all__ = [
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GhostSyncBatchNorm",
    "batchnorm_modules",
    "convert_to_ghost_bn",
    "revert_ghost_bn",
    "recalibrate_bn",
    "freeze_bn",
    "unfreeze_bn",
    "is_bn_frozen",
    "default_forward",
]


def batchnorm_modules(model: nn.Module, *, tracked_only: bool = True) -> list[tuple[str, _BatchNorm]]:
    """The ``(name, module)`` pairs of every BatchNorm layer of ``model``, in registration (depth) order.

    Any subclass of ``torch.nn.modules.batchnorm._BatchNorm`` counts (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``,
    the ghost classes below). With ``tracked_only`` (the default), layers without running statistics
    (``track_running_stats=False``) are left out.
    """
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and (not tracked_only or module.running_mean is not None)
    ]


# ---------------------------------------------------------------------------------------------------------------
# Ghost batch normalisation
# ---------------------------------------------------------------------------------------------------------------


class _GhostBatchNormMixin:
    """Training-mode forward that normalises each chunk of ``ghost_batch_size`` samples on its own.

    The running statistics are updated once per chunk, with the layer's own ``momentum`` (Hoffer et al.'s
    Algorithm 1: ``l = ceil(B / ghost_batch_size)`` updates per forward). With ``momentum=None`` the running
    statistics are the cumulative average over chunks (``num_batches_tracked`` counts chunks). A batch that
    ``ghost_batch_size`` does not divide ends in one smaller chunk. Evaluation mode is the parent class's
    forward, unchanged.
    """

    ghost_batch_size: int
    _ghost_base: type[_BatchNorm]

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (torch's argument name)
        if not self.training:
            return self._ghost_base.forward(self, input)
        # _BatchNorm.forward is the local (per-process) batch norm, also for SyncBatchNorm: ghost batches are
        # per-rank by definition (Goyal et al. 2017: BN statistics are not computed across workers).
        if input.shape[0] <= self.ghost_batch_size:
            return _BatchNorm.forward(self, input)
        chunks = input.split(self.ghost_batch_size, dim=0)
        return torch.cat([_BatchNorm.forward(self, chunk) for chunk in chunks], dim=0)

    def extra_repr(self) -> str:
        return f"{self._ghost_base.extra_repr(self)}, ghost_batch_size={self.ghost_batch_size}"


class GhostBatchNorm1d(_GhostBatchNormMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with ghost batches; same parameters, buffers and ``state_dict`` keys."""

    _ghost_base = nn.BatchNorm1d


class GhostBatchNorm2d(_GhostBatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with ghost batches; same parameters, buffers and ``state_dict`` keys."""

    _ghost_base = nn.BatchNorm2d


class GhostBatchNorm3d(_GhostBatchNormMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with ghost batches; same parameters, buffers and ``state_dict`` keys."""

    _ghost_base = nn.BatchNorm3d


class GhostSyncBatchNorm(_GhostBatchNormMixin, nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` turned into per-rank ghost BN: chunks are normalised locally, with no collective."""

    _ghost_base = nn.SyncBatchNorm


_TO_GHOST: dict[type, type] = {
    nn.BatchNorm1d: GhostBatchNorm1d,
    nn.BatchNorm2d: GhostBatchNorm2d,
    nn.BatchNorm3d: GhostBatchNorm3d,
    nn.SyncBatchNorm: GhostSyncBatchNorm,
}
_FROM_GHOST: dict[type, type] = {ghost: base for base, ghost in _TO_GHOST.items()}


def convert_to_ghost_bn(model: nn.Module, ghost_batch_size: int) -> int:
    """Turn every ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` of ``model`` into ghost BN, in place.

    Each layer's class is switched to the matching subclass (``GhostBatchNorm2d`` for ``BatchNorm2d``, ...), so
    parameters keep their identity (an optimizer built before still holds them), and ``state_dict`` keys, buffers
    and checkpoints are unchanged. In training mode each chunk of ``ghost_batch_size`` samples is normalised with
    its own mean and variance, and the running statistics take one update per chunk at the layer's ``momentum``
    (an EMA: with ``l`` chunks per forward the statistics forget ``l`` times faster per optimizer step than plain
    BN; divide ``momentum`` by ``l`` to keep the per-step memory). With ``momentum=None`` they are the cumulative
    average over chunks. When ``ghost_batch_size`` does not divide the batch, the last chunk is smaller (a chunk
    of one sample with no spatial extent raises torch's "Expected more than 1 value per channel"). Batches no
    larger than ``ghost_batch_size``, and evaluation mode, behave exactly as plain BN. Subclasses of the BN classes
    are left alone (their forward may differ); layers already converted get the new ``ghost_batch_size``.

    Under ``BatchRampTrainer`` (``hf_batchsched.trainer``) with ``max_micro_batch_size`` this is not needed: each
    micro-chunk is its own forward, which is ghost BN at the micro-batch size.

    Args:
        model (`torch.nn.Module`):
            The model to convert in place.
        ghost_batch_size (`int`):
            Samples per ghost batch (Hoffer et al. use 128 on ImageNet/CIFAR; per rank under DDP).

    Returns:
        `int`: the number of layers converted (or re-sized).

    Example:

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    >>> keys = list(model.state_dict())
    >>> convert_to_ghost_bn(model, ghost_batch_size=16)
    1
    >>> type(model[1]).__name__, list(model.state_dict()) == keys
    ('GhostBatchNorm1d', True)
    >>> revert_ghost_bn(model), type(model[1]).__name__
    (1, 'BatchNorm1d')
    """
    if isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, int):
        raise ConfigError(f"ghost_batch_size must be an int, got {ghost_batch_size!r}")
    check_positive("ghost_batch_size", ghost_batch_size)
    converted = 0
    for module in model.modules():
        cls = type(module)
        if cls in _TO_GHOST:
            module.__class__ = _TO_GHOST[cls]
        elif cls not in _FROM_GHOST:
            continue
        module.ghost_batch_size = ghost_batch_size
        converted += 1
    return converted


def revert_ghost_bn(model: nn.Module) -> int:
    """Turn the ghost layers made by ``convert_to_ghost_bn`` back into plain torch BN; returns how many."""
    reverted = 0
    for module in model.modules():
        base = _FROM_GHOST.get(type(module))
        if base is not None:
            module.__class__ = base
            del module.ghost_batch_size
            reverted += 1
    return reverted


# ---------------------------------------------------------------------------------------------------------------
# Recalibration
# ---------------------------------------------------------------------------------------------------------------


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    micro_batch_size: int | None = None,
) -> dict[str, int]:
    """Recompute every BN layer's running mean and variance with the model's current weights.

    The model runs forward in training mode (as in training, and as ``torch.optim.swa_utils.update_bn`` and
    precise-BN do: each BN layer normalises with its batch's statistics) on up to ``num_batches`` batches, with no
    autograd. A pre-hook on each BN layer sums its input per channel in float64, and the layer's buffers are then
    set to the **pooled statistics over all samples seen**, every sample weighted equally whatever its batch's
    size:

    - ``running_mean = sum(x) / n`` over all ``n`` elements per channel (samples x spatial positions);
    - ``running_var = (sum(x**2) - n * mean**2) / (n - 1)``: the pooled *unbiased* variance, matching what torch
      BN stores (it keeps the unbiased batch variance in ``running_var``).

    (Averaging per-batch means with equal weights, as ``momentum=None`` / ``update_bn`` do, is biased when batch
    sizes differ, as they do under a batch ramp.) Under ``torch.distributed`` the sums and counts are all-reduced,
    so every rank ends with the same, global statistics; every rank must call this with the same ``num_batches``.
    ``num_batches_tracked`` is left as it was. Layers without running statistics, frozen layers (``freeze_bn``)
    and layers that saw no input are left unchanged. Each module's train/eval mode, the gradients and the global
    RNG state (dropout, samplers) are restored afterwards.

    Args:
        model (`torch.nn.Module`):
            The model, unwrapped (not the DDP wrapper).
        batches (`Iterable`):
            Training batches: Hugging Face dict batches (``model(**batch)``), tuples or tensors; moved to the
            model's device.
        num_batches (`int`, *optional*):
            Use at most this many batches; all of ``batches`` when `None`.
        forward_fn (`Callable[[model, batch], Any]`, *optional*):
            How to run one batch; defaults to ``default_forward``.
        micro_batch_size (`int`, *optional*):
            Split each batch (every tensor along its first dimension) into forwards of at most this many samples,
            as ``BatchRampTrainer`` does in training: memory stays flat and each BN layer normalises the same
            chunk size it trains with. The pooled statistics do not depend on the split, except through the
            normalisation of earlier BN layers. No split when `None`.

    Returns:
        `dict[str, int]`: ``{"num_batches": ..., "num_samples": ..., "num_layers": ...}`` (``num_samples`` counts
        the first dimension of the first BN layer's inputs on this rank).

    Example:

    >>> model = nn.Sequential(nn.BatchNorm1d(1))
    >>> batches = [torch.tensor([[0.0], [2.0]]), torch.tensor([[4.0], [4.0], [4.0], [4.0]])]
    >>> recalibrate_bn(model, [(b,) for b in batches])
    {'num_batches': 2, 'num_samples': 6, 'num_layers': 1}
    >>> round(model[0].running_mean.item(), 4), round(model[0].running_var.item(), 4)  # of 0, 2, 4, 4, 4, 4
    (3.0, 2.8)
    """
    if num_batches is not None:
        if isinstance(num_batches, bool) or not isinstance(num_batches, int):
            raise ConfigError(f"num_batches must be an int or None, got {num_batches!r}")
        check_positive("num_batches", num_batches)
    if micro_batch_size is not None:
        if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int):
            raise ConfigError(f"micro_batch_size must be an int or None, got {micro_batch_size!r}")
        check_positive("micro_batch_size", micro_batch_size)
    forward_fn = default_forward if forward_fn is None else forward_fn
    layers = [(name, bn) for name, bn in batchnorm_modules(model) if not is_bn_frozen(bn)]
    device = model_device(model)
    sums: dict[str, list[torch.Tensor]] = {}
    first_layer_samples = [0]

    def make_hook(name: str, bn: _BatchNorm):
        dtype = _accumulator_dtype(bn.running_mean.device)

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().to(dtype).transpose(0, 1).reshape(bn.num_features, -1)
            stats = sums.setdefault(
                name, [torch.zeros(bn.num_features, dtype=dtype, device=x.device) for _ in range(3)]
            )
            stats[0] += x.shape[1]
            stats[1] += x.sum(dim=1)
            stats[2] += x.square().sum(dim=1)
            if name == layers[0][0]:
                first_layer_samples[0] += args[0].shape[0]

        return hook

    modes = {module: module.training for module in model.modules()}
    saved = {name: [None if t is None else t.clone() for t in _bn_buffers(bn)] for name, bn in layers}
    handles = [bn.register_forward_pre_hook(make_hook(name, bn)) for name, bn in layers]
    seen = 0
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model.train()
            if layers:
                for batch in batches:
                    if num_batches is not None and seen >= num_batches:
                        break
                    for chunk in split_batch(batch, micro_batch_size):
                        forward_fn(model, to_device(chunk, device))
                    seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
        for name, bn in layers:
            for buffer, copy in zip(_bn_buffers(bn), saved[name]):
                if buffer is not None:
                    buffer.copy_(copy)

    if layers:
        _reduce_and_write(layers, sums)
    return {"num_batches": seen, "num_samples": first_layer_samples[0], "num_layers": len(layers)}


def _bn_buffers(bn: _BatchNorm) -> list[torch.Tensor | None]:
    return [bn.running_mean, bn.running_var, bn.num_batches_tracked]


def _reduce_and_write(layers: list[tuple[str, _BatchNorm]], sums: dict[str, list[torch.Tensor]]) -> None:
    """All-reduce (when distributed) the per-layer counts and sums, then write the pooled statistics."""
    anchor = layers[0][1].running_mean
    dtype = _accumulator_dtype(anchor.device)
    pieces = []
    for name, bn in layers:
        stats = sums.get(name)
        if stats is None:
            stats = [torch.zeros(bn.num_features, dtype=dtype, device=anchor.device) for _ in range(3)]
        pieces.append(torch.cat([s.to(device=anchor.device, dtype=dtype) for s in stats]))
    flat = torch.cat(pieces)
    if is_distributed():
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    offset = 0
    for _, bn in layers:
        channels = bn.num_features
        count, total, total_sq = flat[offset : offset + 3 * channels].view(3, channels)
        offset += 3 * channels
        n = count[0]
        if n < 2:  # saw no input (or a single value per channel): nothing to estimate from
            continue
        mean = total / n
        var = (total_sq - n * mean.square()).clamp_min(0) / (n - 1)
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Freezing
# ---------------------------------------------------------------------------------------------------------------

_FREEZE_ATTR = "_hf_batchsched_bn_freeze"


def _force_eval(module: nn.Module, args: tuple) -> None:
    module.training = False


def freeze_bn(model: nn.Module, freeze_affine: bool = False) -> int:
    """Keep every BatchNorm layer of ``model`` in inference mode until ``unfreeze_bn``, even across ``model.train()``.

    The Trainer calls ``model.train()`` at every step, which undoes a plain ``bn.eval()``. Here a forward pre-hook
    on each BN layer sets ``training = False`` just before the layer runs, so it normalises with its running
    statistics and never updates them, whatever mode the rest of the model is in. With ``freeze_affine`` the
    layers' ``weight`` and ``bias`` also stop receiving gradients (``requires_grad=False``; optimizers skip
    parameters whose ``grad`` is `None`). Already frozen layers are skipped.

    Args:
        model (`torch.nn.Module`):
            The model whose BN layers to freeze, in place.
        freeze_affine (`bool`, *optional*, defaults to `False`):
            Also stop training the BN scale and shift.

    Returns:
        `int`: the number of layers newly frozen.

    Example:

    >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> freeze_bn(model)
    1
    >>> _ = model.train()(torch.randn(8, 3))
    >>> model[1].running_mean.abs().sum().item(), model[1].training
    (0.0, False)
    >>> unfreeze_bn(model)
    1
    """
    frozen = 0
    for _, bn in batchnorm_modules(model, tracked_only=False):
        if is_bn_frozen(bn):
            continue
        affine_flags = {name: p.requires_grad for name, p in bn.named_parameters(recurse=False)}
        if freeze_affine:
            for p in bn.parameters(recurse=False):
                p.requires_grad_(False)
        handle = bn.register_forward_pre_hook(_force_eval)
        setattr(bn, _FREEZE_ATTR, (handle, affine_flags))
        frozen += 1
    return frozen


def unfreeze_bn(model: nn.Module) -> int:
    """Undo ``freeze_bn``: remove the hooks, restore ``requires_grad``, put each layer in ``model``'s mode.

    Returns the number of layers unfrozen.
    """
    unfrozen = 0
    for _, bn in batchnorm_modules(model, tracked_only=False):
        record = getattr(bn, _FREEZE_ATTR, None)
        if record is None:
            continue
        handle, affine_flags = record
        handle.remove()
        for name, p in bn.named_parameters(recurse=False):
            p.requires_grad_(affine_flags.get(name, p.requires_grad))
        bn.training = model.training
        delattr(bn, _FREEZE_ATTR)
        unfrozen += 1
    return unfrozen


def is_bn_frozen(module: nn.Module) -> bool:
    """Whether ``freeze_bn`` froze this layer."""
    return getattr(module, _FREEZE_ATTR, None) is not None
