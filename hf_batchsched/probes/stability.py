"""Depth-wise stability statistics: activation growth with depth, BN input growth, per-block gradient norms.

Bjorck, Gomes, Selman & Weinberger 2018 ("Understanding Batch Normalization", https://arxiv.org/abs/1806.02375)
show that an unnormalised deep net diverges at large learning rates because activations grow geometrically with
depth (channel means of about 1 at layer 8, 3e3 at layer 44 and 1e8 at layer 80 during a diverging step), while BN
keeps them flat. The functions here measure exactly that, cheaply:

- ``activation_profile(model, batch)``: RMS and mean of each block's output, ordered by depth, and the slope of
  ``ln(RMS)`` against depth (a positive slope of ``s`` is a growth of ``e**s`` per block).
- ``bn_profile(model)``: the same profile with no forward pass, read from BN running statistics
  (``sqrt(running_var + running_mean**2)`` is the RMS of each BN layer's input).
- ``block_grad_norms(model, blocks)``: gradient L2 norm per block.

The loss-spike detectors the stability monitor uses are in ``hf_batchsched.probes.spikes``.

Blocks are found by ``find_blocks``: the most frequent non-container module class with children (decoder
layers of an LLM, conv layers of a ResNet), or the most frequent class of parameterised leaves (a plain MLP).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..model_utils import batchnorm_modules, default_forward, l2_norms, model_device, to_device

__all__ = [
    "DepthProfile",
    "ActivationRecorder",
    "activation_profile",
    "block_grad_norms",
    "bn_profile",
    "find_blocks",
    "log_rms_slope",
]

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def find_blocks(model: nn.Module, block_class: str | None = None) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs that make up ``model``'s depth, in registration order.

    With ``block_class`` (a class name such as ``"LlamaDecoderLayer"``), every module of that class. Otherwise
    the most frequent class among modules that have children and are not plain containers (``ModuleList``,
    ``Sequential``, ``ModuleDict``) or PEFT adapter wrappers, ties going to the class whose first instance is
    least nested (so an LLM gives its decoder layers, not their attention sub-modules); with no repeated such
    class, the most frequent class of leaves that own parameters (``Linear`` in a plain MLP).

    Example:

    >>> mlp = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    >>> [name for name, _ in find_blocks(mlp)]
    ['0', '2', '4']
    """
    named = [(name, module) for name, module in model.named_modules() if name]
    if block_class is not None:
        blocks = [(name, module) for name, module in named if type(module).__name__ == block_class]
        if not blocks:
            raise ConfigError(
                f"block_class {block_class!r} matches no module of {type(model).__name__}; pass the class name of "
                "its repeated layers (e.g. 'LlamaDecoderLayer'), or None to detect them"
            )
        return blocks
    # PEFT's adapter wrappers (lora.Linear, ...) are composite and numerous, but they are not depth units.
    composite = [
        (n, m)
        for n, m in named
        if not isinstance(m, _CONTAINERS)
        and next(m.children(), None) is not None
        and not type(m).__module__.startswith("peft.")
    ]
    leaves = [(n, m) for n, m in named if next(m.children(), None) is None and next(m.parameters(), None) is not None]
    for pool in (composite, leaves):
        counts = Counter(type(m) for _, m in pool)
        repeated = [cls for cls, count in counts.items() if count >= 2]
        if not repeated:
            continue
        depth = {cls: min(n.count(".") for n, m in pool if type(m) is cls) for cls in repeated}
        best = max(repeated, key=lambda cls: (counts[cls], -depth[cls]))
        return [(n, m) for n, m in pool if type(m) is best]
    return []


def log_rms_slope(rms: Sequence[float]) -> float:
    """Least-squares slope of ``ln(rms)`` against depth index ``0, 1, ...``: growth per block is ``e**slope``.

    `nan` with fewer than two values or a non-finite/non-positive one.

    >>> round(log_rms_slope([1.0, 10.0, 100.0]), 4) == round(math.log(10), 4)
    True
    >>> log_rms_slope([2.0, 2.0, 2.0])
    0.0
    """
    if len(rms) < 2 or not all(math.isfinite(v) and v > 0 for v in rms):
        return math.nan
    logs = [math.log(v) for v in rms]
    n = len(logs)
    x_mean, y_mean = (n - 1) / 2, sum(logs) / n
    numerator = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(logs))
    denominator = sum((i - x_mean) ** 2 for i in range(n))
    return numerator / denominator


@dataclass
class DepthProfile:
    """RMS and mean of some per-layer quantity, ordered by depth.

    Attributes:
        names (`list[str]`): module names, shallow to deep.
        rms (`list[float]`): root mean square per layer.
        mean (`list[float]`): mean per layer.
    """

    names: list[str]
    rms: list[float]
    mean: list[float]

    @property
    def log_rms_slope(self) -> float:
        """Slope of ``ln(rms)`` against depth index (see ``log_rms_slope``)."""
        return log_rms_slope(self.rms)

    @property
    def growth(self) -> float:
        """``rms[-1] / rms[0]``, the total growth from the first to the last layer (`nan` if undefined)."""
        if len(self.rms) < 2 or not self.rms[0] > 0:
            return math.nan
        return self.rms[-1] / self.rms[0]

    def to_metrics(self, prefix: str, per_layer: bool = True) -> dict[str, float]:
        """Flat metric dict: ``{prefix}rms/<name>``, ``{prefix}mean/<name>`` (with ``per_layer``),
        ``{prefix}log_rms_slope``, ``{prefix}growth``, ``{prefix}rms_max``."""
        metrics: dict[str, float] = {}
        if per_layer:
            for name, rms, mean in zip(self.names, self.rms, self.mean):
                metrics[f"{prefix}rms/{name}"] = rms
                metrics[f"{prefix}mean/{name}"] = mean
        if self.rms:
            metrics[f"{prefix}log_rms_slope"] = self.log_rms_slope
            metrics[f"{prefix}growth"] = self.growth
            metrics[f"{prefix}rms_max"] = max(self.rms, key=lambda v: v if math.isfinite(v) else math.inf)
        return metrics


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                return item
    return None


class ActivationRecorder:
    """Forward hooks that accumulate the RMS and mean of each block's output while attached.

    Sums stay on the device (no host sync per module) and accumulate over every forward while attached (all
    micro-batches of a step); ``profile()`` does one transfer. Use as a context manager or ``attach``/``detach``.

    Args:
        blocks (`list[tuple[str, nn.Module]]`): the modules to watch, shallow to deep.
        training_only (`bool`, *optional*, defaults to `False`): record only forwards that run with autograd
            enabled (training steps), ignoring no-grad probes such as BN recalibration that run while attached.
    """

    def __init__(self, blocks: list[tuple[str, nn.Module]], training_only: bool = False):
        self.blocks = blocks
        self.training_only = training_only
        self._handles: list[Any] = []
        self._sums: dict[int, torch.Tensor] = {}

    def make_hook(self, index: int):
        """The forward hook of block ``index``: adds its output's statistics to the running sums."""

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is None or (self.training_only and not torch.is_grad_enabled()):
                return
            with torch.no_grad():
                x = tensor.detach().float()
                stats = torch.stack([x.square().sum(), x.sum(), torch.tensor(float(x.numel()), device=x.device)])
                previous = self._sums.get(index)
                self._sums[index] = stats if previous is None else previous + stats

        return hook

    def attach(self) -> ActivationRecorder:
        if not self._handles:
            self._sums = {}
            self._handles = [
                module.register_forward_hook(self.make_hook(i)) for i, (_, module) in enumerate(self.blocks)
            ]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def dense_sums(self, device: torch.device | None = None) -> torch.Tensor:
        """``(len(blocks), 3)`` float tensor of (sum of squares, sum, count) per block, zeros for blocks not run."""
        if device is None:
            device = next(iter(self._sums.values())).device if self._sums else torch.device("cpu")
        dense = torch.zeros(len(self.blocks), 3, device=device)
        for index, stats in self._sums.items():
            dense[index] = stats.to(device)
        return dense

    def profile(self, sums: torch.Tensor | None = None) -> DepthProfile:
        """The recorded ``DepthProfile`` over the blocks that ran (``sums``: a ``dense_sums``, e.g. all-reduced)."""
        sums = self.dense_sums() if sums is None else sums
        seen = [i for i, count in enumerate(sums[:, 2].tolist()) if count > 0]
        if not seen:
            return DepthProfile([], [], [])
        sums = sums[seen]
        rms = (sums[:, 0] / sums[:, 2]).sqrt().tolist()
        mean = (sums[:, 1] / sums[:, 2]).tolist()
        return DepthProfile([self.blocks[i][0] for i in seen], rms, mean)

    def __enter__(self) -> ActivationRecorder:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()


def activation_profile(
    model: nn.Module,
    batch: Any,
    blocks: list[tuple[str, nn.Module]] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> DepthProfile:
    """RMS and mean of each block's output on one forward pass of ``batch``, shallow to deep.

    The forward runs in the model's current mode, under ``torch.no_grad``; the model is left exactly as found:
    BN running statistics (and ``num_batches_tracked``) are restored, and the global RNG state too (dropout).

    Args:
        model (`torch.nn.Module`): the model.
        batch (`Any`): one batch (a Hugging Face dict batch is called as ``model(**batch)``).
        blocks (`list[tuple[str, nn.Module]]`, *optional*): the modules to watch; ``find_blocks(model)`` if `None`.
        forward_fn (`Callable[[model, batch], Any]`, *optional*): how to run the batch.

    Returns:
        `DepthProfile`: see its ``log_rms_slope`` (growth per block) and ``to_metrics``.

    Example:

    >>> torch.manual_seed(0) and None
    >>> mlp = nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(4)])
    >>> with torch.no_grad():
    ...     for layer in mlp:
    ...         _ = layer.weight.copy_(3 * torch.eye(16))
    >>> profile = activation_profile(mlp, torch.ones(2, 16))
    >>> [round(v) for v in profile.rms], round(math.exp(profile.log_rms_slope), 3)
    ([3, 9, 27, 81], 3.0)
    """
    blocks = find_blocks(model) if blocks is None else blocks
    forward_fn = default_forward if forward_fn is None else forward_fn
    device = model_device(model)
    saved = [
        (buffer, buffer.clone())
        for _, bn in batchnorm_modules(model)
        for buffer in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
        if buffer is not None
    ]
    recorder = ActivationRecorder(blocks)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), recorder:
            forward_fn(model, to_device(batch, device))
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)
    return recorder.profile()


def bn_profile(model: nn.Module) -> DepthProfile:
    """Depth profile of BN inputs read from running statistics: no forward pass, no hooks.

    Per BN layer (in depth order), ``rms = sqrt(mean_c(running_var + running_mean**2))``, the RMS of the layer's
    input as its running statistics estimate it, and ``mean = mean_c(running_mean)``.

    >>> model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2))
    >>> _ = model[1].running_var.fill_(100.0)
    >>> profile = bn_profile(model)
    >>> profile.names, [round(v, 3) for v in profile.rms], round(profile.growth, 3)
    (['0', '1'], [1.0, 10.0], 10.0)
    """
    layers = batchnorm_modules(model)
    if not layers:
        return DepthProfile([], [], [])
    device = layers[0][1].running_mean.device
    with torch.no_grad():  # three batched ops for all layers instead of a few per layer
        means = torch.cat([bn.running_mean.detach().float().to(device) for _, bn in layers])
        variances = torch.cat([bn.running_var.detach().float().to(device) for _, bn in layers])
        segment = torch.cat(
            [torch.full((bn.num_features,), i, device=device) for i, (_, bn) in enumerate(layers)]
        ).long()
        channels = torch.tensor([float(bn.num_features) for _, bn in layers], device=device)
        summed = torch.zeros(2, len(layers), device=device)
        summed[0].index_add_(0, segment, variances + means.square())
        summed[1].index_add_(0, segment, means)
        rows = (summed / channels).tolist()
    rms = [math.sqrt(max(v, 0.0)) if math.isfinite(v) else v for v in rows[0]]
    return DepthProfile([name for name, _ in layers], rms, rows[1])


def block_grad_norms(model: nn.Module, blocks: list[tuple[str, nn.Module]]) -> tuple[list[str], torch.Tensor]:
    """Gradient L2 norm of each block's parameters, then of all of ``model``'s parameters, as one tensor.

    Returns ``(names, norms)`` where ``norms`` has ``len(names) + 1`` entries (the last one is the total) and stays
    on the device; parameters without a gradient count as zero.

    >>> model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    >>> model[0].weight.grad, model[1].weight.grad = torch.tensor([[3.0]]), torch.tensor([[4.0]])
    >>> names, norms = block_grad_norms(model, find_blocks(model))
    >>> names, norms.tolist()
    (['0', '1'], [3.0, 4.0, 5.0])
    """

    device = model_device(model)
    owner = {id(p): index for index, (_, module) in enumerate(blocks) for p in module.parameters()}
    grads, slots = [], []
    for p in model.parameters():
        if p.grad is not None:
            grads.append(p.grad.detach())
            slots.append(owner.get(id(p), len(blocks)))  # len(blocks): not in any block, counts in the total only
    squares = torch.zeros(len(blocks) + 1, device=device)
    if grads:
        norms = torch.stack([norm.float().to(device) for norm in l2_norms(grads)])
        squares.index_add_(0, torch.tensor(slots, device=device), norms.square())
    totals = torch.cat([squares[:-1], squares.sum().reshape(1)])
    return [name for name, _ in blocks], totals.sqrt()
