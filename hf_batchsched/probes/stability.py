"""Depth-wise stability statistics: activation growth with depth, per-block gradient norms, loss spikes.

Bjorck, Gomes, Selman & Weinberger 2018 ("Understanding Batch Normalization", https://arxiv.org/abs/1806.02375)
show that an unnormalised deep net diverges at large learning rates because activations grow geometrically with
depth (channel means of about 1 at layer 8, 3e3 at layer 44 and 1e8 at layer 80 during a diverging step), while BN
keeps them flat. The functions here measure exactly that, cheaply:

- ``activation_profile(model, batch)``: RMS and mean of each block's output, ordered by depth, and the slope of
  ``ln(RMS)`` against depth (a positive slope of ``s`` is a growth of ``e**s`` per block).
- ``bn_profile(model)``: the same profile with no forward pass, read from BN running statistics
  (``sqrt(running_var + running_mean**2)`` is the RMS of each BN layer's input).
- ``block_grad_norms(model, blocks)``: gradient L2 norm per block.
- ``SpikeDetector``: rolling-window spike test (z-score), the one detector of the package; ``LossSpikeDetector``
  is its variant that flags a loss above ``threshold`` times the 90th percentile of the window.

Blocks are found by ``find_blocks``: the most frequent non-container module class with children (decoder
layers of an LLM, conv layers of a ResNet), or the most frequent class of parameterised leaves (a plain MLP).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_batchsched.errors import ConfigError, check_positive
from hf_batchsched.probes._utils import default_forward, model_device, to_device
from hf_batchsched.probes.batchnorm import batchnorm_modules

__all__ = [
    "DepthProfile",
    "ActivationRecorder",
    "LossSpikeDetector",
    "SpikeDetector",
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

    def _make_hook(self, index: int):
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
                module.register_forward_hook(self._make_hook(i)) for i, (_, module) in enumerate(self.blocks)
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
        norms = torch.stack([norm.float().to(device) for norm in torch._foreach_norm(grads)])
        squares.index_add_(0, torch.tensor(slots, device=device), norms.square())
    totals = torch.cat([squares[:-1], squares.sum().reshape(1)])
    return [name for name, _ in blocks], totals.sqrt()


class SpikeDetector:
    """Rolling-window spike detector: the one implementation behind ``SpikeGuardCallback`` and the stability monitor.

    ``observe(x)`` returns ``(is_spike, score)``. The score compares ``x`` with a reference computed from the last
    ``window`` accepted values; here the z-score ``(x - mean) / std`` (population std, mean as reference).
    :class:`LossSpikeDetector` swaps in a ratio to the window's upper decile. A value is a spike when, with at least
    ``min_history`` values held, ``score > sigma`` and ``x - reference > min_delta``; a non-finite ``x`` is always a
    spike (score ``inf``). Spikes are counted (``spikes``) and not added to the window, so one outlier does not widen
    it and hide the next. Below ``min_history`` values the score is ``0.0`` (z-score) or ``nan`` (ratio).

    The spread is floored, ``max(std, rel_floor * |mean|, abs_floor)``, so that a window of (nearly) equal values
    does not turn rounding into a spike: gradient norms clipped at ``max_grad_norm`` are all equal up to rounding
    (std about 1e-7 of the mean), and a last-bit difference would otherwise score z = 7. The floor of 1% of the
    mean is above the rounding of any training dtype (one bf16 step is at most 2**-7 = 0.78% of a value, so
    rounding scores z <= 0.78 < sigma) and below the step-to-step spread of a real training loss or gradient norm
    (several % of the mean), where it changes nothing. On a flat window a spike then needs a rise above
    ``sigma`` % of the mean (6% by default); the divergences a guard is for are 2x to 100x. ``abs_floor`` only
    keeps the division finite when the whole window is at zero.

    Args:
        window (`int`, *optional*, defaults to `128`): accepted values kept.
        sigma (`float`, *optional*, defaults to `6.0`): score above which a value is a spike.
        min_history (`int`, *optional*, defaults to `20`): values needed before a score is computed.
        min_delta (`float`, *optional*, defaults to `0.0`): smallest absolute rise above the reference that counts.
        rel_floor (`float`, *optional*, defaults to `0.01`): floor of the spread relative to ``|mean|``, in [0, 1).
        abs_floor (`float`, *optional*, defaults to `1e-6`): absolute floor of the spread (and of
            :class:`LossSpikeDetector`'s reference), > 0.

    Example:

    >>> detector = SpikeDetector(window=8, sigma=3.0, min_history=4)
    >>> [detector.observe(x)[0] for x in (1.0, 1.1, 0.9, 1.0, 1.05, 5.0, 1.0, float("nan"))]
    [False, False, False, False, False, True, False, True]
    >>> round(detector.observe(1.2)[1], 3), detector.spikes  # (1.2 - mean) / std of the 7 accepted values
    (3.159, 3)
    """

    #: score while fewer than ``min_history`` values are held
    undefined_score = 0.0

    def __init__(
        self,
        window: int = 128,
        sigma: float = 6.0,
        min_history: int = 20,
        min_delta: float = 0.0,
        rel_floor: float = 0.01,
        abs_floor: float = 1e-6,
    ):
        check_positive("window", window)
        check_positive("sigma", sigma)
        check_positive("min_history", min_history)
        if not min_delta >= 0:
            raise ConfigError(f"min_delta must be >= 0 (an absolute rise above the reference), got {min_delta}")
        if not 0 <= rel_floor < 1:
            raise ConfigError(f"rel_floor must be in [0, 1) (a fraction of the window's mean), got {rel_floor}")
        if not 0 < abs_floor < math.inf:
            raise ConfigError(f"abs_floor must be a finite number > 0, got {abs_floor}")
        self.rel_floor, self.abs_floor = float(rel_floor), float(abs_floor)
        if min_history > window:
            raise ConfigError(
                f"min_history ({min_history}) cannot exceed window ({window}); lower it or widen the window"
            )
        self.window, self.sigma, self.min_history = int(window), float(sigma), int(min_history)
        self.min_delta = float(min_delta)
        self.values: deque[float] = deque(maxlen=self.window)
        self.spikes = 0
        self.last_score = self.undefined_score

    def reference_and_score(self, x: float) -> tuple[float, float]:
        """``(mean, z-score of x)`` over the window, the spread floored (call with at least one value held)."""
        n = len(self.values)
        mean = sum(self.values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / n)
        return mean, (x - mean) / max(std, self.rel_floor * abs(mean), self.abs_floor)

    def score(self, x: float) -> float:
        """The score of ``x`` against the current window, without recording it."""
        if len(self.values) < self.min_history:
            return self.undefined_score
        return self.reference_and_score(float(x))[1]

    def zscore(self, x: float) -> float:
        """Alias of :meth:`score` (the z-score for this class)."""
        return self.score(x)

    def check(self, x: float) -> tuple[bool, float]:
        """``(is_spike, score)`` of ``x`` against the current window, recording nothing."""
        x = float(x)
        if not math.isfinite(x):
            return True, math.inf
        if len(self.values) < self.min_history:
            return False, self.undefined_score
        reference, score = self.reference_and_score(x)
        return score > self.sigma and x - reference > self.min_delta, score

    def record(self, x: float, spike: bool, score: float, keep: bool = True) -> None:
        """Record a checked value: a spike is counted; another value enters the window if ``keep``.

        (``keep=False``: a value that is not a spike itself but belongs to a step left out for another reason.)
        """
        self.last_score = score
        if spike:
            self.spikes += 1
        elif keep:
            self.values.append(float(x))

    def observe(self, x: float) -> tuple[bool, float]:
        """Check and record ``x``; returns ``(is_spike, score)``."""
        spike, score = self.check(x)
        self.record(x, spike, score)
        return spike, score

    def update(self, x: float) -> bool:
        """Record ``x``; ``True`` if it is a spike."""
        return self.observe(x)[0]

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "spikes": self.spikes, "last_score": self.last_score}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        values = state.get("values", state.get("history", []))  # "history": LossSpikeDetector's former key
        self.values = deque((float(v) for v in values), maxlen=self.window)
        self.spikes = int(state.get("spikes", 0))
        self.last_score = float(state.get("last_score", state.get("last_ratio", self.undefined_score)))


class LossSpikeDetector(SpikeDetector):
    """:class:`SpikeDetector` scoring a loss as its ratio to the 90th percentile of the last ``window`` losses.

    The reference is the window's upper decile, not its mean, because per-batch losses are heavy-tailed once a
    task is nearly solved (median 0.02 with batches at 0.3 is noise, not divergence). The jump must also exceed
    the reference by ``min_delta`` in absolute terms. Assumes a non-negative loss (cross-entropy); the ratio is
    ``nan`` (no spike) while the reference is negative, and the reference is floored at ``abs_floor`` (1e-6).
    Bjorck et al. call a step divergent when the loss grows 1000x in one step; ``threshold=3`` catches the onset
    long before that.

    Args:
        window (`int`, *optional*, defaults to `50`): losses kept for the reference percentile.
        threshold (`float`, *optional*, defaults to `3.0`): ratio to the reference that counts as a spike, > 1.
        min_history (`int`, *optional*, defaults to `5`): losses needed before a ratio is computed.
        min_delta (`float`, *optional*, defaults to `0.1`): smallest absolute rise above the reference that counts.

    Example:

    >>> detector = LossSpikeDetector(window=4, threshold=3.0, min_history=3)
    >>> [detector.update(loss) for loss in [2.0, 1.9, 1.8, 1.7, 9.0, float("nan"), 1.6]]
    [False, False, False, False, True, True, False]
    >>> detector.spikes, round(detector.last_ratio, 3)
    (2, 0.842)
    """

    undefined_score = math.nan

    def __init__(self, window: int = 50, threshold: float = 3.0, min_history: int = 5, min_delta: float = 0.1):
        if not threshold > 1:
            raise ConfigError(f"threshold must be > 1 (a ratio to the reference loss), got {threshold}")
        super().__init__(window=window, sigma=threshold, min_history=min_history, min_delta=min_delta)

    def reference_and_score(self, x: float) -> tuple[float, float]:
        """``(90th percentile of the window, x / max(it, abs_floor))``; ``nan`` when the percentile is negative.

        The floor keeps a window of losses at zero up to rounding (a memorised batch: float32 cross-entropies of
        0 to 1e-7) from scoring rounding as a spike when ``min_delta`` is 0.
        """
        reference = sorted(self.values)[int(0.9 * (len(self.values) - 1))]
        return reference, (x / max(reference, self.abs_floor) if reference >= 0 else math.nan)

    @property
    def threshold(self) -> float:
        """The ratio above which a loss is a spike (``sigma`` of the base class)."""
        return self.sigma

    @property
    def history(self) -> list[float]:
        """The accepted losses in the window, oldest first."""
        return list(self.values)

    @property
    def last_ratio(self) -> float:
        """The ratio of the last observed loss (``nan`` before ``min_history``, ``inf`` for a non-finite loss)."""
        return self.last_score
