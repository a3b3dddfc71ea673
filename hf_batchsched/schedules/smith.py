"""Smith et al.'s equivalence of LR decay and batch growth: the SGD noise scale ``g`` and the schedules built on it.

For plain SGD with learning rate ``lr``, batch size ``B`` and ``N`` training samples the scale of the random
fluctuations is ``g = lr (N / B - 1)``; with momentum ``m`` it is ``g = lr (N / B - 1) / (1 - m)``. For
``B << N``, ``g ~ lr N / (B (1 - m))``, so the optimal batch grows like ``lr / (1 - m)``: dividing the LR by
``a`` is worth multiplying the batch by ``a`` (Smith & Le 2018, https://arxiv.org/abs/1710.06451; Smith, Kindermans,
Ying & Le, "Don't Decay the Learning Rate, Increase the Batch Size", ICLR 2018, https://arxiv.org/abs/1711.00489).

- ``sgd_noise``, ``batch_for_noise``, ``lr_for_noise``, ``rescale_batch_for_noise``: ``g`` on plain numbers;
  ``sgd_noise_of_group`` reads ``lr`` and ``m`` (or Adam's ``beta1``) from an optimizer parameter group (the trainer's
  ``batchsched/sgd_noise`` log);
- ``equivalent_to_lr`` applies ``g`` along a whole schedule: an ``LRMatchedBatch`` plus a ``residual_lr`` policy;
- ``lr_time_scale`` reads an LR policy on a batch schedule's clock (shared with Seesaw, ``schedules.seesaw_pair``).

``g`` is the noise of the seeds' SGD analysis, not McCandlish et al.'s measured gradient noise scale (a batch size,
``hf_batchsched.probes.noise_scale``).

>>> g = sgd_noise(0.1, dataset_size=50_000, batch_size=128, momentum=0.9)
>>> round(g, 4), round(batch_for_noise(g, lr=0.1, dataset_size=50_000, momentum=0.9), 6)
(389.625, 128.0)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigError, check_choice
from .base import Policy
from .batch_base import BatchSchedule, _check_batch_unit, _is_number, _positive_int, _positive_number, round_batch_size
from .lr_config import lr_policy_from_config, lr_policy_to_config

__all__ = [
    "LRMatchedBatch",
    "batch_for_noise",
    "equivalent_to_lr",
    "lr_for_noise",
    "lr_time_scale",
    "rescale_batch_for_noise",
    "residual_lr",
    "sgd_noise",
    "sgd_noise_of_group",
]


# --------------------------------------------------------------------------------------------------
# The noise scale g on numbers
# --------------------------------------------------------------------------------------------------


def _number(what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _positive(what: str, value) -> float:
    if not _number(what, value) > 0:
        raise ConfigError(f"{what} must be > 0, got {value!r}")
    return float(value)


def _momentum(value) -> float:
    if not 0 <= _number("momentum", value) < 1:
        raise ConfigError(f"momentum must be in [0, 1) (SGD's m, or Adam's beta1), got {value!r}")
    return float(value)


def _batch(batch_size, dataset_size) -> tuple[float, float]:
    batch, n = _positive("batch_size", batch_size), _positive("dataset_size", dataset_size)
    if batch > n:
        raise ConfigError(
            f"batch_size {batch_size} is larger than dataset_size {dataset_size}; the noise scale needs B <= N"
        )
    return batch, n


def sgd_noise(lr: float, dataset_size: int, batch_size: float, momentum: float = 0.0) -> float:
    """The SGD noise scale ``g = lr (N / B - 1) / (1 - m)``.

    Args:
        lr (`float`): the learning rate.
        dataset_size (`int`): ``N``, the number of training samples.
        batch_size (`float`): ``B``, the global batch size (``<= N``; ``B = N`` is full-batch descent, ``g = 0``).
        momentum (`float`, *optional*, defaults to `0.0`): ``m`` in ``[0, 1)``.

    >>> for lr, batch, m in ((0.1, 128, 0.0), (0.1, 128, 0.9), (0.1, 640, 0.0), (0.02, 128, 0.0), (0.1, 50_000, 0.0)):
    ...     print(lr, batch, m, f"{sgd_noise(lr, 50_000, batch, m):.6g}")
    0.1 128 0.0 38.9625
    0.1 128 0.9 389.625
    0.1 640 0.0 7.7125
    0.02 128 0.0 7.7925
    0.1 50000 0.0 0
    """
    batch, n = _batch(batch_size, dataset_size)
    return _number("lr", lr) * (n / batch - 1.0) / (1.0 - _momentum(momentum))


def batch_for_noise(noise: float, lr: float, dataset_size: int, momentum: float = 0.0) -> float:
    """The batch size with noise scale ``noise`` at ``lr``: ``B = N / (1 + g (1 - m) / lr)`` (a real number; round
    it with ``round_batch_size``).

    >>> round(batch_for_noise(38.9625, lr=0.1, dataset_size=50_000), 6)
    128.0
    >>> round(batch_for_noise(38.9625, lr=0.5, dataset_size=50_000), 3)  # 5x the LR: about 5x the batch
    633.513
    """
    g = _number("noise", noise)
    if g < 0:
        raise ConfigError(f"noise must be >= 0, got {noise!r}")
    n = _positive("dataset_size", dataset_size)
    return n / (1.0 + g * (1.0 - _momentum(momentum)) / _positive("lr", lr))


def lr_for_noise(noise: float, dataset_size: int, batch_size: float, momentum: float = 0.0) -> float:
    """The learning rate with noise scale ``noise`` at batch ``B``: ``lr = g (1 - m) / (N / B - 1)``.

    >>> round(lr_for_noise(38.9625, dataset_size=50_000, batch_size=128), 12)
    0.1
    """
    batch, n = _batch(batch_size, dataset_size)
    if batch == n:
        raise ConfigError("at batch_size == dataset_size the noise is 0 for every LR; lr_for_noise needs B < N")
    return _number("noise", noise) * (1.0 - _momentum(momentum)) / (n / batch - 1.0)


def rescale_batch_for_noise(
    batch_size: float,
    *,
    lr: float,
    new_lr: float,
    momentum: float = 0.0,
    new_momentum: float | None = None,
    dataset_size: int | None = None,
) -> float:
    """The batch that keeps the noise scale when the LR (and momentum) change: ``B`` proportional to
    ``lr / (1 - m)``.

    Without ``dataset_size`` this is the ``B << N`` rule ``B' = B (new_lr / lr) (1 - m) / (1 - new_m)``; with it,
    the exact ``g = lr (N / B - 1) / (1 - m)`` is held fixed.

    Args:
        batch_size (`float`): the current batch size.
        lr (`float`): the current learning rate.
        new_lr (`float`): the new learning rate.
        momentum (`float`, *optional*, defaults to `0.0`): the current momentum.
        new_momentum (`float`, *optional*): the new momentum; defaults to ``momentum``.
        dataset_size (`int`, *optional*): ``N``, for the exact noise scale.

    Smith et al.'s "increase the effective LR" runs: ``lr 0.1 -> 0.5`` and ``m 0.9 -> 0.98`` take ``B = 128`` to
    ``128 * 5 * 5 = 3200``:

    >>> round(rescale_batch_for_noise(128, lr=0.1, new_lr=0.5, momentum=0.9, new_momentum=0.98), 6)
    3200.0
    >>> round(rescale_batch_for_noise(128, lr=0.1, new_lr=0.5, dataset_size=50_000), 3)
    633.513
    """
    new_momentum = momentum if new_momentum is None else new_momentum
    if dataset_size is not None:
        g = sgd_noise(lr, dataset_size, batch_size, momentum)
        return batch_for_noise(g, new_lr, dataset_size, new_momentum)
    ratio = _positive("new_lr", new_lr) / _positive("lr", lr)
    return _positive("batch_size", batch_size) * ratio * (1.0 - _momentum(momentum)) / (1.0 - _momentum(new_momentum))


def sgd_noise_of_group(group: Mapping, dataset_size: int, batch_size: float, lr: float | None = None) -> float | None:
    """``sgd_noise`` of an optimizer parameter group: its ``lr`` (unless ``lr`` is given) and its ``momentum``, or
    Adam's ``beta1`` in its place; ``None`` when that momentum is outside ``[0, 1)`` (no noise scale to report).

    >>> round(sgd_noise_of_group({"lr": 0.1, "betas": (0.9, 0.999)}, 50_000, 128), 4)
    389.625
    """
    lr = group["lr"] if lr is None else lr
    momentum = group.get("momentum", group.get("betas", (0.0,))[0]) or 0.0
    if not 0 <= momentum < 1:
        return None
    return sgd_noise(float(lr), dataset_size, batch_size, float(momentum))


# --------------------------------------------------------------------------------------------------
# Along a schedule: replace LR decay by batch growth
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LRMatchedBatch(BatchSchedule):
    """The batch schedule built by ``equivalent_to_lr``: ``B(t) = B0 * r(t) ** -k`` rounded to ``multiple``,
    clamped to ``[B0, max_size]``, with ``r(t) = [lr(t) / (1 - m(t))] / [lr(w) / (1 - m(w))]`` and ``w`` the end
    of the warmup (``B = B0`` before it).

    With ``exact_noise=True`` (``k = 1`` only) ``B`` solves ``N / B - 1 = r(t) (N / B0 - 1)`` instead, the
    paper's full noise scale ``g = lr (N / B - 1) / (1 - m)``. See ``equivalent_to_lr`` for the arguments.
    """

    lr_policy: Policy
    base_batch_size: int
    max_size: int
    dataset_size: int
    k: float = 1.0
    momentum: Policy | float | None = None
    warmup: float = 0.0
    multiple: int = 1
    exact_noise: bool = False
    unit: str = "samples"
    time_scale: float = 1.0

    @property
    def min_size(self) -> int:
        return round_batch_size(self.base_batch_size, self.multiple, mode="nearest")

    def momentum_at(self, policy_t: float) -> float:
        """The original run's momentum at ``policy_t`` (in the LR policy's unit)."""
        if not isinstance(self.momentum, Policy):
            return float(self.momentum or 0.0)
        momentum = self.momentum(policy_t)
        if not 0 <= momentum < 1:
            raise ConfigError(
                f"the momentum policy gives {momentum!r} at t = {policy_t:g}; momentum must be in [0, 1)"
            )
        return momentum

    def noise_ratio(self, consumed: float) -> float:
        """``r(t)``: the original schedule's ``lr / (1 - m)`` relative to its value at the end of warmup."""
        policy_t = consumed * self.time_scale
        reference = self.lr_policy(self.warmup) / (1.0 - self.momentum_at(self.warmup))
        return self.lr_policy(policy_t) / (1.0 - self.momentum_at(policy_t)) / reference

    def ideal(self, consumed: float) -> float:
        """``B(t)`` before rounding and clamping (``inf`` once the LR reaches 0)."""
        if consumed * self.time_scale < self.warmup:
            return float(self.base_batch_size)
        ratio = self.noise_ratio(consumed)
        if ratio <= 0:
            return math.inf
        if self.exact_noise:
            return self.dataset_size / (1.0 + ratio * (self.dataset_size / self.base_batch_size - 1.0))
        return self.base_batch_size * ratio ** (-self.k)

    def __call__(self, consumed: float) -> int:
        self._check_consumed(consumed)
        ideal = self.ideal(consumed)
        if ideal >= self.max_size:
            return self.max_size
        return min(max(round_batch_size(ideal, self.multiple, mode="nearest"), self.min_size), self.max_size)

    def to_config(self) -> dict:
        """The ``equivalent_to_lr`` arguments that rebuild this schedule (YAML/JSON-ready; the LR and momentum
        policies as ``lr_policy_to_config`` dicts)."""
        momentum = self.momentum
        return {
            "name": "equivalent_to_lr",
            "unit": self.unit,
            "lr_policy": lr_policy_to_config(self.lr_policy),
            "base_batch_size": self.base_batch_size,
            "dataset_size": self.dataset_size,
            "max_batch_size": self.max_size,
            "k": self.k,
            "momentum": lr_policy_to_config(momentum) if isinstance(momentum, Policy) else momentum,
            "warmup": self.warmup,
            "multiple": self.multiple,
            "exact_noise": self.exact_noise,
        }


def residual_lr(t: float, *, batch_schedule: LRMatchedBatch) -> float:
    """The LR that keeps the noise of the original LR policy once the batch follows ``batch_schedule``.

    ``lr(t) * (B(t) / B0) ** (1 / k)``, times ``(1 - m0) / (1 - m(t))`` for a momentum policy (the new run holds
    momentum at its value ``m0`` at the end of warmup); with ``exact_noise``, ``lr(t) (N / B0 - 1) / (N / B(t) - 1)``
    instead of the power. While ``B`` tracks the LR this is the LR at the end of warmup; after the cap it decays
    like the original (the paper's hybrid); it absorbs the rounding of ``B``. The value has the kind of the
    original policy (an LR or a multiplier).
    """
    schedule = batch_schedule
    policy_t = t * schedule.time_scale
    lr = schedule.lr_policy(policy_t)
    if isinstance(schedule.momentum, Policy) and policy_t >= schedule.warmup:
        lr *= (1.0 - schedule.momentum_at(schedule.warmup)) / (1.0 - schedule.momentum_at(policy_t))
    size = schedule(t)
    if schedule.exact_noise:
        n = schedule.dataset_size
        return lr * (n / schedule.base_batch_size - 1.0) / (n / size - 1.0)
    return lr * (size / schedule.base_batch_size) ** (1.0 / schedule.k)


_OPTIMIZER_EXPONENTS = {"sgd": 1.0, "adam": 2.0}


def lr_time_scale(lr_policy: Policy, unit: str, base_batch_size: int, owner: str) -> float:
    """Factor from a batch schedule's clock (``unit``) to ``lr_policy``'s: 1, or ``1 / base_batch_size`` for a steps
    policy read on the samples clock (steps at the base batch); other mismatches are refused naming ``owner``."""
    if lr_policy.unit == unit:
        return 1.0
    if lr_policy.unit == "steps" and unit == "samples":
        return 1.0 / base_batch_size
    raise ConfigError(
        f"the LR policy counts {lr_policy.unit!r} but {owner} counts {unit!r}; build the LR policy on "
        f"unit={unit!r} (a steps policy is converted only for unit='samples')"
    )


def equivalent_to_lr(
    lr_policy: Policy | Mapping | str,
    *,
    base_batch_size: int,
    dataset_size: int,
    max_batch_size: int | None = None,
    optimizer: str = "sgd",
    k: float | None = None,
    momentum: Policy | Mapping | float | None = None,
    warmup: float = 0.0,
    unit: str = "samples",
    multiple: int = 1,
    exact_noise: bool = False,
) -> tuple[LRMatchedBatch, Policy]:
    """Turn a decaying LR policy into a growing batch plus a residual LR (Smith, Kindermans, Ying & Le 2018).

    The SGD noise scale is ``g = lr (N / B - 1) / (1 - m) ~ lr N / (B (1 - m))``, so dividing the LR by
    ``a`` is equivalent to multiplying the batch by ``a``. The batch becomes
    ``B(t) = B0 * (lr(w) / lr(t)) ** k`` (momentum: ``lr / (1 - m)`` in place of ``lr``), rounded to
    ``multiple``, never below ``B0`` and capped at ``max_batch_size``; the LR becomes
    ``lr(t) * (B(t) / B0) ** (1 / k)``: constant while the batch grows, decaying like the original once the cap
    is reached (the paper's hybrid), so the noise at every point of the data equals the original schedule's.
    ``k = 1`` is the linear scaling rule of SGD; ``k = 2`` the square-root rule of Adam (Malladi et al. 2022:
    ``lr ~ sqrt(B)``, so an ``a``-fold LR decay becomes an ``a**2``-fold batch growth).

    Args:
        lr_policy (`Policy`, `dict` or `str`): the original LR policy (either kind; a config is read by
            ``lr_policy_from_config``). On ``unit`` it is read at the consumed
            samples/tokens; on ``"steps"`` (with ``unit="samples"``) it is read at ``consumed / B0``, the steps of
            the original constant-batch run.
        base_batch_size (`int`): ``B0``, the original run's batch size.
        dataset_size (`int`): ``N``, the number of training samples.
        max_batch_size (`int`, *optional*): ``B_max``; defaults to ``dataset_size // 10`` (the paper's choice).
        optimizer (`str`, *optional*, defaults to `"sgd"`): ``"sgd"`` (``k = 1``) or ``"adam"`` (``k = 2``).
        k (`float`, *optional*): an explicit exponent, overriding ``optimizer``.
        momentum (`float`, `Policy` or its config, *optional*): the original run's momentum; a policy (on
            ``lr_policy``'s unit) is folded into the batch (the new run holds momentum at its value ``m0`` at the end
            of warmup), a number cancels out unless ``exact_noise``.
        warmup (`float`, *optional*, defaults to `0.0`): the LR warmup's length ``w`` in ``lr_policy``'s unit: until
            then the batch stays ``B0`` and the LR follows ``lr_policy`` (warmup is for stability, not noise); the
            batch is ``B0`` at the LR ``lr(w)``.
        unit (`str`, *optional*, defaults to `"samples"`): the clock of the returned schedules.
        multiple (`int`, *optional*, defaults to `1`): round batch sizes to multiples of it.
        exact_noise (`bool`, *optional*, defaults to `False`): keep ``lr (N / B - 1)`` fixed instead of ``lr N / B``
            (``k = 1`` only); matters when ``B`` is not much smaller than ``N``.

    Returns:
        `tuple[BatchSchedule, Policy]`: the batch schedule and the residual LR policy, both on ``unit``.

    Smith et al.'s CIFAR-10 set-up (LR x0.2 at epochs 60, 120, 160; ``N = 50,000``, ``B0 = 128``):

    >>> from hf_batchsched.schedules.batch import ConstantBatch
    >>> from hf_batchsched.schedules.lr_config import make_lr_policy
    >>> from hf_batchsched.schedules.simulate import simulate
    >>> epoch = 50_000
    >>> decay = make_lr_policy("NSTEP", k0=0.1, gamma=0.2, l=[60 * epoch, 120 * epoch, 160 * epoch], unit="samples")
    >>> batch, lr = equivalent_to_lr(decay, base_batch_size=128, dataset_size=50_000, max_batch_size=5120)
    >>> for e in (0, 60, 120, 160):
    ...     print(e, batch(e * epoch), f"{lr(e * epoch):.3g}")
    0 128 0.1
    60 640 0.1
    120 3200 0.1
    160 5120 0.032
    >>> simulate(ConstantBatch(128), 200 * epoch).num_steps, simulate(batch, 200 * epoch).num_steps
    (78125, 29142)
    """
    if not isinstance(lr_policy, (Policy, Mapping, str)):
        raise ConfigError(f"equivalent_to_lr takes an LR Policy (see make_lr_policy) or its config, got {lr_policy!r}")
    lr_policy = lr_policy_from_config(lr_policy)
    if isinstance(momentum, (Mapping, str)):
        momentum = lr_policy_from_config(momentum)
    _check_batch_unit(unit)
    base = _positive_int("base_batch_size", base_batch_size)
    n = _positive_int("dataset_size", dataset_size, " (the number of training samples)")
    cap = n // 10 if max_batch_size is None else _positive_int("max_batch_size", max_batch_size)
    if cap < base:
        raise ConfigError(
            f"max_batch_size {cap} is below base_batch_size {base}; the batch can only grow "
            f"(raise max_batch_size, or dataset_size, whose tenth is the default cap)"
        )
    multiple = _positive_int("multiple", multiple)
    cap = round_batch_size(cap, multiple, mode="down")
    if k is None:
        check_choice("optimizer", optimizer, _OPTIMIZER_EXPONENTS)
        k = _OPTIMIZER_EXPONENTS[optimizer]
    k = _positive_number("k (the batch/LR exponent)", k)
    if exact_noise and k != 1:
        raise ConfigError("exact_noise=True needs k = 1 (SGD's noise scale); use exact_noise=False with Adam's k = 2")
    if exact_noise and cap >= n:
        raise ConfigError(f"with exact_noise the cap {cap} must be below dataset_size {n}")
    time_scale = lr_time_scale(lr_policy, unit, base, "the batch schedule")
    if isinstance(momentum, Policy):
        if momentum.unit != lr_policy.unit:
            raise ConfigError(f"the momentum policy counts {momentum.unit!r}, the LR policy {lr_policy.unit!r}")
        m0 = momentum(warmup if _is_number(warmup) else 0.0)
    elif momentum is None or _is_number(momentum):
        m0 = float(momentum or 0.0)
    else:
        raise ConfigError(f"momentum must be a number in [0, 1), a Policy or None, got {momentum!r}")
    if not 0 <= m0 < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {m0!r}")
    if not _is_number(warmup) or warmup < 0:
        raise ConfigError(f"warmup must be a number >= 0 (in the LR policy's unit), got {warmup!r}")
    if not lr_policy(warmup) > 0:
        raise ConfigError(
            f"the LR at the end of warmup (t = {warmup:g} {lr_policy.unit}) must be > 0, got {lr_policy(warmup)!r}; "
            "for a policy that warms up from 0 pass warmup=<its length>"
        )
    schedule = LRMatchedBatch(
        lr_policy,
        base,
        cap,
        n,
        k=k,
        momentum=momentum,
        warmup=float(warmup),
        multiple=multiple,
        exact_noise=exact_noise,
        unit=unit,
        time_scale=time_scale,
    )
    residual = Policy(
        f"residual({lr_policy.name})", residual_lr, {"batch_schedule": schedule}, unit=unit, kind=lr_policy.kind
    )
    return schedule, residual
