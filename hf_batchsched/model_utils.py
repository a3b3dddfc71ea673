"""What the probes, the transforms and the callbacks need to know about a model: its process group, its device,
its BatchNorm layers, and how to move a batch to it and run it.

Batches are what a ``DataLoader`` yields: a tensor, a mapping of tensors (Hugging Face) or a tuple/list of tensors,
samples along dimension 0 (``hf_batchsched.batching`` counts and splits them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "BATCHNORM_CLASSES",
    "batchnorm_modules",
    "default_forward",
    "is_distributed",
    "l2_norms",
    "model_device",
    "to_device",
    "world_size_and_rank",
]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised (collectives must then run on every rank)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size_and_rank() -> tuple[int, int]:
    """``(world_size, rank)`` of the default process group, ``(1, 0)`` without one.

    >>> world_size_and_rank()
    (1, 0)
    """
    if is_distributed():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor (nested in mappings, tuples and lists) moved to ``device``; other values kept.

    >>> to_device({"x": torch.zeros(1), "id": "a"}, "cpu")
    {'x': tensor([0.]), 'id': 'a'}
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({key: to_device(value, device) for key, value in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run one batch: ``model(**batch)`` for a mapping (Hugging Face), ``model(*batch)`` for a tuple/list, else
    ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


# Every BatchNorm class torch ships derives from one of these (LazyBatchNorm*d too), and so do the ghost classes of
# hf_batchsched.transforms.ghost_bn.
BATCHNORM_CLASSES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_modules(model: nn.Module, *, tracked_only: bool = True) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of every BatchNorm layer of ``model``, in registration (depth) order.

    Any subclass of ``BATCHNORM_CLASSES`` counts (``BatchNorm1d/2d/3d``, their lazy forms, ``SyncBatchNorm``, the
    ghost classes). With ``tracked_only`` (the default), layers without running statistics
    (``track_running_stats=False``) are left out.
    """
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, BATCHNORM_CLASSES) and (not tracked_only or module.running_mean is not None)
    ]


def l2_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The L2 norm of each tensor, read in place (no copy), accumulated in float32 whatever the tensor's dtype
    (float64 stays float64), so bf16/fp16 gradients keep the small differences the probes compare.

    >>> [n.item() for n in l2_norms([torch.tensor([3.0, 4.0]), torch.tensor([12.0], dtype=torch.bfloat16)])]
    [5.0, 12.0]
    """
    return [
        torch.linalg.vector_norm(t.to_dense() if t.is_sparse else t, dtype=torch.promote_types(t.dtype, torch.float32))
        for t in tensors
    ]
