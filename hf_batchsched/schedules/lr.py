"""Learning-rate policies: modern shapes, composition (warmup, piecewise, product) and reading a policy's LR.

Every policy is a ``Policy`` (``hf_batchsched.schedules.base``): a module-level pure function of progress
``t`` with its parameters bound, a unit (``steps``, ``samples``, ``tokens`` or ``fraction``; every
length-like parameter is counted in it) and a kind:

- ``kind="lr"``: the value is an absolute learning rate: all 34 LRBench policies (``FIX`` ... ``COSRSWEXP``, see
  ``hf_batchsched.schedules.lrbench``).
- ``kind="multiplier"``: the value multiplies the optimizer's base learning rate (like ``LambdaLR`` and
  transformers' schedules). All modern shapes here: ``constant``, ``linear_decay``, ``cosine``,
  ``inverse_sqrt``, ``wsd``, ``one_cycle``.

Composition keeps the kind: ``warmup`` and ``piecewise`` have the kind of what they wrap (all regions must
share one), ``product`` is ``"lr"`` if one factor is an absolute LR (at most one may be) and
``"multiplier"`` otherwise.

Per-group learning rates (LoRA+, a classifier head with its own LR) keep their ratios: with initial LRs
``lr_0, lr_1, ...`` (group 0 is the reference), group ``i`` gets ``policy(t) * lr_i / lr_0`` for
``kind="lr"`` and ``lr_i * policy(t)`` for ``kind="multiplier"`` (see ``group_lrs_at``).

The registry, the checks of every parameter and the configs are in ``hf_batchsched.schedules.lr_config``.

Example:

>>> from hf_batchsched.schedules.lr_config import lr_policy_from_config
>>> policy = lr_policy_from_config(
...     {"name": "warmup", "warmup": 10, "policy": {"name": "COS", "k0": 1e-5, "k1": 1e-4, "l": 90}}
... )
>>> [f"{lr_at(policy, t, base_lr=0.0):.3g}" for t in (0, 5, 10, 55, 100)]
['0', '5e-05', '0.0001', '5.5e-05', '1e-05']
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from ..errors import ConfigError
from .base import Policy

__all__ = [
    "constant",
    "cosine_decay",
    "group_lrs_at",
    "inverse_sqrt",
    "linear_decay",
    "lr_at",
    "one_cycle",
    "piecewise",
    "product",
    "warmup_stable_decay",
    "with_warmup",
]

WSD_SHAPES = ("linear", "cosine", "1-sqrt")
ONE_CYCLE_ANNEALS = ("cos", "linear")


# --------------------------------------------------------------------------------------------------
# Modern shapes (multipliers of the optimizer's base learning rate)
# --------------------------------------------------------------------------------------------------


def constant(t: float, *, factor: float = 1.0) -> float:
    """Constant multiplier ``factor`` (transformers' ``constant``).

    >>> [constant(t, factor=0.5) for t in (0, 50, 100)]
    [0.5, 0.5, 0.5]
    """
    return factor


def linear_decay(t: float, *, total: float, end_factor: float = 0.0) -> float:
    """Linear decay from 1 at ``t = 0`` to ``end_factor`` at ``t = total``, then held:
    ``1 - (1 - end_factor) * min(t, total) / total``. Wrapped in ``warmup`` with ``total = T - w`` it is
    transformers' ``linear`` schedule.

    >>> for t in (0, 50, 100, 150):
    ...     print(t, f"{linear_decay(t, total=100, end_factor=0.1):.6g}")
    0 1
    50 0.55
    100 0.1
    150 0.1
    """
    return 1.0 - (1.0 - end_factor) * min(t, total) / total


def cosine_decay(t: float, *, total: float, min_lr_ratio: float = 0.0) -> float:
    """Half-cosine from 1 at ``t = 0`` to a floor ``min_lr_ratio`` at ``t = total``, then held:
    ``m + (1 - m) * (1 + cos(pi * min(t, total) / total)) / 2`` (transformers' ``cosine_with_min_lr`` with
    ``min_lr_rate = m``, after its warmup). Registered as ``"cosine"``.

    >>> for t in (0, 50, 100, 150):
    ...     print(t, f"{cosine_decay(t, total=100, min_lr_ratio=0.1):.6g}")
    0 1
    50 0.55
    100 0.1
    150 0.1
    """
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))


def inverse_sqrt(t: float, *, timescale: float) -> float:
    """Inverse square root: ``sqrt(timescale / (t + timescale))``; 1 at ``t = 0``, 1/2 at ``t = 3 timescale``.
    Wrapped in ``warmup`` (``warmup_start_factor=0``) it equals transformers' ``inverse_sqrt`` schedule.

    >>> for t in (0, 300, 3000):
    ...     print(t, f"{inverse_sqrt(t, timescale=1000):.6g}")
    0 1
    300 0.877058
    3000 0.5
    """
    return math.sqrt(timescale / (t + timescale))


def warmup_stable_decay(
    t: float,
    *,
    num_warmup: float,
    num_stable: float,
    num_decay: float,
    min_lr_ratio: float = 0.0,
    warmup_type: str = "linear",
    decay_type: str = "cosine",
) -> float:
    """Warmup-stable-decay (WSD), as transformers' ``warmup_stable_decay`` (``num_cycles=0.5``).

    With ``m = min_lr_ratio``: warmup ``m + (1 - m) * w(t / num_warmup)``; stable 1; decay
    ``m + (1 - m) * d((t - num_warmup - num_stable) / num_decay)``; then ``m``. Shapes: ``w(x)`` is ``x``
    (linear), ``(1 - cos(pi x)) / 2`` (cosine) or ``1 - sqrt(1 - x)`` (1-sqrt); ``d(x)`` is ``1 - x``,
    ``(1 + cos(pi x)) / 2`` or ``1 - sqrt(x)``. Registered as ``"wsd"``.

    >>> for t in (0, 5, 10, 50, 90, 95, 100, 120):
    ...     print(t, f"{warmup_stable_decay(t, num_warmup=10, num_stable=80, num_decay=10, decay_type='1-sqrt'):.6g}")
    0 0
    5 0.5
    10 1
    50 1
    90 1
    95 0.292893
    100 0
    120 0
    """
    if t < num_warmup:
        x = t / num_warmup
        if warmup_type == "linear":
            factor = x
        elif warmup_type == "cosine":
            factor = 0.5 * (1.0 - math.cos(math.pi * x))
        else:
            factor = 1.0 - math.sqrt(1.0 - x)
        return min_lr_ratio + (1.0 - min_lr_ratio) * factor
    if t < num_warmup + num_stable:
        return 1.0
    if t < num_warmup + num_stable + num_decay:
        x = (t - num_warmup - num_stable) / num_decay
        if decay_type == "linear":
            factor = 1.0 - x
        elif decay_type == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * x))
        else:
            factor = 1.0 - math.sqrt(x)
        return min_lr_ratio + (1.0 - min_lr_ratio) * factor
    return min_lr_ratio


def one_cycle(
    t: float,
    *,
    total: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal: str = "cos",
) -> float:
    """One-cycle (Smith & Topin 2017; torch ``OneCycleLR``, two phases) as a multiplier of the peak LR.

    The optimizer's learning rate plays torch's ``max_lr``. From ``1 / div_factor`` at ``t = 0`` up to 1 at
    ``t = pct_start * total``, then down to ``1 / (div_factor * final_div_factor)`` at ``t = total``
    (held after), each phase annealed by ``anneal``: cosine ``end + (start - end) * (1 + cos(pi x)) / 2`` or
    linear ``start + (end - start) * x``. torch counts its phases to ``pct_start * N - 1`` and ``N - 1``:
    ``OneCycleLR(total_steps=N, pct_start=p)`` equals ``one_cycle(total=N - 1, pct_start=(p N - 1) / (N - 1))``.

    >>> for t in (0, 15, 30, 65, 100):
    ...     print(t, f"{one_cycle(t, total=100, pct_start=0.3, div_factor=10, final_div_factor=100):.6g}")
    0 0.1
    15 0.55
    30 1
    65 0.5005
    100 0.001
    """
    peak = pct_start * total
    if t < peak:
        start, end, x = 1.0 / div_factor, 1.0, t / peak
    else:
        start, end, x = 1.0, 1.0 / (div_factor * final_div_factor), min(t - peak, total - peak) / (total - peak)
    if anneal == "cos":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * x))
    return start + (end - start) * x


# --------------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------------


def with_warmup(
    t: float, *, policy: Policy, warmup: float, warmup_start_factor: float = 0.0, prefix: bool = True
) -> float:
    """Linear warmup around any policy. Registered as ``"warmup"``.

    With ``prefix=True`` (the default) the wrapped policy's clock starts when warmup ends: it sees
    ``t - warmup``, so the warmup ramps to ``policy(0)`` and e.g. ``COS`` starts its anneal at ``k1`` right
    after. With ``prefix=False`` the wrapped policy sees ``t`` and the warmup replaces its first ``warmup``
    units, ramping to ``policy(warmup)``. During warmup the value is
    ``target * (warmup_start_factor + (1 - warmup_start_factor) * t / warmup)``.

    >>> from hf_batchsched.schedules import lrbench
    >>> cos = Policy("COS", lrbench.COS, {"k0": 0.0, "k1": 1e-3, "l": 100})
    >>> for t in (0, 5, 10, 60, 110):
    ...     print(t, f"{with_warmup(t, policy=cos, warmup=10, warmup_start_factor=0.1):.6g}")
    0 0.0001
    5 0.00055
    10 0.001
    60 0.0005
    110 0
    """
    if t < warmup:
        target = policy(0.0 if prefix else warmup)
        return target * (warmup_start_factor + (1.0 - warmup_start_factor) * t / warmup)
    return policy(t - warmup if prefix else t)


def piecewise(t: float, *, boundaries: Sequence[float], regions: Sequence[Policy]) -> float:
    """LRBench's ``piecewiseLR``: region ``i`` covers ``[boundaries[i-1], boundaries[i])`` (region 0 starts at
    0, the last is open-ended) and its policy sees time counted from the region's start.

    >>> from hf_batchsched.schedules import lrbench
    >>> fix = Policy("FIX", lrbench.FIX, {"k0": 0.1})
    >>> regions = (fix, Policy("STEP", lrbench.STEP, {"k0": 0.01, "gamma": 0.5, "l": 10}))
    >>> for t in (0, 99, 100, 109, 110, 120):
    ...     print(t, f"{piecewise(t, boundaries=(100,), regions=regions):.6g}")
    0 0.1
    99 0.1
    100 0.01
    109 0.01
    110 0.005
    120 0.0025
    """
    index = bisect.bisect_right(boundaries, t)
    region_start = boundaries[index - 1] if index else 0.0
    return regions[index](t - region_start)


def product(t: float, *, policies: Sequence[Policy]) -> float:
    """Product of policies (Composer's stacked schedulers, torch's ``ChainedScheduler``): ``prod_i p_i(t)``.

    >>> from hf_batchsched.schedules import lrbench
    >>> factors = (Policy("FIX", lrbench.FIX, {"k0": 1e-3}), Policy("constant", constant, {"factor": 0.5}))
    >>> [product(t, policies=factors) for t in (0, 100)]
    [0.0005, 0.0005]
    """
    return math.prod(policy(t) for policy in policies)


# --------------------------------------------------------------------------------------------------
# Using a policy
# --------------------------------------------------------------------------------------------------


def lr_at(policy: Policy, t: float, base_lr: float) -> float:
    """The absolute learning rate of ``policy`` at ``t``: ``policy(t)`` for ``kind="lr"``, ``base_lr * policy(t)``
    for ``kind="multiplier"``.

    Args:
        policy (`Policy`): an LR policy of either kind.
        t (`float`): progress in ``policy.unit``.
        base_lr (`float`): the optimizer's learning rate (group 0's initial LR); ignored for ``kind="lr"``.

    >>> from hf_batchsched.schedules.lr_config import make_lr_policy
    >>> lr_at(make_lr_policy("FIX", k0=0.01), 5, base_lr=1.0), lr_at(make_lr_policy("constant", factor=0.5), 5, 0.01)
    (0.01, 0.005)
    """
    value = policy(t)
    return value if policy.kind == "lr" else base_lr * value


def group_lrs_at(policy: Policy, t: float, initial_lrs: Sequence[float]) -> list[float]:
    """Learning rates of every parameter group at ``t``, keeping the groups' initial ratios.

    Group 0 is the reference: for ``kind="lr"`` group ``i`` gets ``policy(t) * initial_lrs[i] / initial_lrs[0]``,
    for ``kind="multiplier"`` ``initial_lrs[i] * policy(t)``.

    Args:
        policy (`Policy`): an LR policy of either kind.
        t (`float`): progress in ``policy.unit``.
        initial_lrs (`Sequence[float]`): each parameter group's initial learning rate; the first must be > 0.

    >>> from hf_batchsched.schedules.lr_config import make_lr_policy
    >>> [f"{lr:.3g}" for lr in group_lrs_at(make_lr_policy("FIX", k0=1e-4), 0, [2e-4, 3.2e-3])]  # LoRA+ ratio 16
    ['0.0001', '0.0016']
    >>> [f"{lr:.3g}" for lr in group_lrs_at(make_lr_policy("constant", factor=0.5), 0, [2e-4, 3.2e-3])]
    ['0.0001', '0.0016']
    """
    if not initial_lrs or not initial_lrs[0] > 0:
        raise ConfigError(f"initial_lrs must be a non-empty list whose first entry is > 0, got {list(initial_lrs)}")
    value = policy(t)
    if policy.kind == "lr":
        return [value * (lr / initial_lrs[0]) for lr in initial_lrs]
    return [lr * value for lr in initial_lrs]
