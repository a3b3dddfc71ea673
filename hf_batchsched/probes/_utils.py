"""Helpers shared by the probes and the callbacks: process group, device placement, batch running and splitting.

One home for what ``probes/`` and ``callbacks/`` each used to carry a copy of. Batches are what a ``DataLoader``
yields: a tensor, a mapping of tensors (Hugging Face) or a tuple/list of tensors, samples along dimension 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "available_memory",
    "batch_rows",
    "default_forward",
    "is_distributed",
    "model_device",
    "saved_tensor_bytes",
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


def available_memory(device: torch.device | str) -> int:
    """Bytes that new tensors on ``device`` can still take: on CUDA the driver's free memory plus what PyTorch's
    caching allocator holds unused; on the CPU the system's available memory (``psutil``)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    import psutil  # a dependency of accelerate

    return int(psutil.virtual_memory().available)


def _storage_key(tensor: torch.Tensor) -> tuple[Any, int]:
    try:
        storage = tensor.untyped_storage()
        return (tensor.device, storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without a plain storage
        return (tensor.device, id(tensor)), tensor.numel() * tensor.element_size()


def _return_unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def saved_tensor_bytes(exclude: Iterable[torch.Tensor] = ()) -> Iterator[dict[str, int]]:
    """Measure the memory an autograd graph built inside the block keeps alive: the bytes of the distinct storages
    of the tensors its operations save for backward (forward activations, and with ``create_graph=True`` what
    the backward saves for the next one), not counting the storages of ``exclude`` (e.g. the parameters, which
    exist anyway). The total is in ``["bytes"]`` of the yielded dict, final when the block exits.

    A ``torch.autograd.graph.saved_tensors_hooks`` pair that saves each tensor as is (detached, as the hooks
    require); a region of the model that installs its own hooks (non-reentrant activation checkpointing) is not
    seen, so the figure is a lower bound there.

    >>> weight = torch.ones(3, 4, requires_grad=True)
    >>> with saved_tensor_bytes(exclude=[weight]) as saved:
    ...     loss = (torch.ones(2, 3) @ weight).tanh().sum()  # saves the (2, 3) input and the (2, 4) tanh output
    >>> saved["bytes"]
    56
    """
    excluded = {_storage_key(t)[0] for t in exclude}
    sizes: dict[Any, int] = {}
    result = {"bytes": 0}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(tensor)
        if key not in excluded:
            sizes[key] = nbytes
        return tensor.detach()

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _return_unchanged):
            yield result
    finally:
        result["bytes"] = sum(sizes.values())
