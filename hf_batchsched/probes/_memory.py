"""Memory the probes may use: what a device has free, and what an autograd graph keeps alive."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["available_memory", "saved_tensor_bytes"]


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
