"""BatchNorm recalibration: recompute running statistics with the current weights (Goyal et al. 2017, Sec. 5.2:
"recomputed prior to evaluating"), every sample weighted equally; ``save_bn_statistics``/``restore_bn_statistics``
undo it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..batching import split_batch
from ..errors import ConfigError, check_positive
from ..model_utils import batchnorm_modules, default_forward, is_distributed, model_device, to_device
from .freezing import is_bn_frozen

__all__ = ["recalibrate_bn", "restore_bn_statistics", "save_bn_statistics"]


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

    def make_hook(name: str, bn: nn.Module):
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


def _bn_buffers(bn: nn.Module) -> list[torch.Tensor | None]:
    return [bn.running_mean, bn.running_var, bn.num_batches_tracked]


def _reduce_and_write(layers: list[tuple[str, nn.Module]], sums: dict[str, list[torch.Tensor]]) -> None:
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


def save_bn_statistics(model: nn.Module) -> dict[str, list[torch.Tensor | None]]:
    """Copies of every BN layer's ``running_mean``, ``running_var`` and ``num_batches_tracked``, by layer name.

    What ``restore_bn_statistics`` puts back: the undo of ``recalibrate_bn`` (e.g. to evaluate on recalibrated
    statistics and then train on with the running ones).

    >>> model = nn.Sequential(nn.BatchNorm1d(1))
    >>> saved = save_bn_statistics(model)
    >>> recalibrate_bn(model, [(torch.tensor([[0.0], [2.0]]),)])["num_layers"]
    1
    >>> restore_bn_statistics(model, saved), model[0].running_mean.item(), model[0].running_var.item()
    (1, 0.0, 1.0)
    """
    return {
        name: [None if t is None else t.detach().clone() for t in _bn_buffers(bn)]
        for name, bn in batchnorm_modules(model)
    }


@torch.no_grad()
def restore_bn_statistics(model: nn.Module, saved: dict[str, list[torch.Tensor | None]]) -> int:
    """Copy statistics from ``save_bn_statistics`` back into the layers of the same names; returns how many."""
    restored = 0
    for name, bn in batchnorm_modules(model):
        if name not in saved:
            continue
        for buffer, copy in zip(_bn_buffers(bn), saved[name]):
            if buffer is not None and copy is not None:
                buffer.copy_(copy)
        restored += 1
    return restored
