"""Helpers shared by the probes and the callbacks: process group, device placement, batch running and splitting.

One home for what ``probes/`` and ``callbacks/`` each used to carry a copy of. Batches are what a ``DataLoader``
yields: a tensor, a mapping of tensors (Hugging Face) or a tuple/list of tensors, samples along dimension 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "batch_rows",
    "default_forward",
    "is_distributed",
    "model_device",
    "split_batch",
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


def batch_rows(batch: Any) -> int | None:
    """Number of samples in ``batch``: the first dimension of its first non-scalar tensor (``None`` if it has none).

    >>> batch_rows({"attention_mask": torch.ones(3, 5), "labels": torch.zeros(3, 5)}), batch_rows({"n": 1})
    (3, None)
    """
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else []
    return next((rows for rows in map(batch_rows, values) if rows is not None), None)


def _slice_rows(batch: Any, start: int, stop: int, rows: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == rows else batch
    if isinstance(batch, Mapping):
        return type(batch)({key: _slice_rows(value, start, stop, rows) for key, value in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice_rows(value, start, stop, rows) for value in batch)
    return batch


def split_batch(batch: Any, micro_batch_size: int | None) -> list[Any]:
    """Chunks of at most ``micro_batch_size`` samples, in order; ``[batch]`` when it fits or there is no limit.

    Tensors whose first dimension is the batch's sample count are sliced; everything else (scalars, strings, a
    tensor of another length) is passed to every chunk unchanged. Containers keep their type.

    >>> [chunk["x"].tolist() for chunk in split_batch({"x": torch.arange(5), "scale": 2.0}, 2)]
    [[0, 1], [2, 3], [4]]
    """
    rows = batch_rows(batch)
    if micro_batch_size is None or rows is None or rows <= micro_batch_size:
        return [batch]
    return [_slice_rows(batch, start, start + micro_batch_size, rows) for start in range(0, rows, micro_batch_size)]
