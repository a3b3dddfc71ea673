"""Ghost batch normalisation (Hoffer, Hubara & Soudry 2017, https://arxiv.org/abs/1705.08741), and its undo.

``convert_to_ghost_bn(model, ghost_batch_size)`` makes BN layers normalise each chunk of ``ghost_batch_size``
samples with that chunk's own statistics, so normalisation noise stays fixed while the batch grows;
``revert_ghost_bn(model)`` turns them back into plain torch BN. The ramp of ``BatchRampTrainer`` already runs every
forward on micro-chunks of at most ``max_micro_batch_size`` samples (ghost BN at that size with no module
surgery): this transform is for a plain ``Trainer`` whose per-device batch itself is large.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, check_positive

__all__ = [
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GhostSyncBatchNorm",
    "convert_to_ghost_bn",
    "revert_ghost_bn",
]

# torch's per-process BN forward: every BN class inherits it, except SyncBatchNorm, which overrides it with a
# collective over ranks.
_local_batch_norm = nn.BatchNorm1d.forward


class _GhostBatchNormMixin:
    """Training-mode forward that normalises each chunk of ``ghost_batch_size`` samples on its own.

    The running statistics are updated once per chunk, with the layer's own ``momentum`` (Hoffer et al.'s
    Algorithm 1: ``l = ceil(B / ghost_batch_size)`` updates per forward). With ``momentum=None`` the running
    statistics are the cumulative average over chunks (``num_batches_tracked`` counts chunks). A batch that
    ``ghost_batch_size`` does not divide ends in one smaller chunk. Evaluation mode is the parent class's
    forward, unchanged.
    """

    ghost_batch_size: int
    _ghost_base: type[nn.Module]

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (torch's argument name)
        if not self.training:
            return self._ghost_base.forward(self, input)
        # the local (per-process) batch norm, also for SyncBatchNorm: ghost batches are per-rank by definition
        # (Goyal et al. 2017: BN statistics are not computed across workers).
        if input.shape[0] <= self.ghost_batch_size:
            return _local_batch_norm(self, input)
        chunks = input.split(self.ghost_batch_size, dim=0)
        return torch.cat([_local_batch_norm(self, chunk) for chunk in chunks], dim=0)

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
