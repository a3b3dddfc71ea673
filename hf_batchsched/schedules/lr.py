"""Learning-rate policies: LRBench's formulas, modern shapes, composition, a registry and configs.

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

Example:

>>> policy = lr_policy_from_config(
...     {"name": "warmup", "warmup": 10, "policy": {"name": "COS", "k0": 1e-5, "k1": 1e-4, "l": 90}}
... )
>>> [f"{lr_at(policy, t, base_lr=0.0):.3g}" for t in (0, 5, 10, 55, 100)]
['0', '5e-05', '0.0001', '5.5e-05', '1e-05']
"""

from __future__ import annotations

import bisect
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence

from ..clock import check_unit
from ..errors import ConfigError
from . import lrbench
from .base import Policy, Registry

__all__ = [
    "LR_POLICIES",
    "constant",
    "cosine_decay",
    "group_lrs_at",
    "inverse_sqrt",
    "linear_decay",
    "lr_at",
    "lr_policy_from_config",
    "lr_policy_to_config",
    "make_lr_policy",
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


# --------------------------------------------------------------------------------------------------
# Registry, validation and configs
# --------------------------------------------------------------------------------------------------

LR_POLICIES = Registry("LR policy")

_MEANING = {
    "k0": "the base LR",
    "k1": "the upper LR",
    "gamma": "the decay factor",
    "p": "the power",
    "l": "the step size / half-period / horizon in the policy's unit",
    "total": "the length in the policy's unit",
    "timescale": "in the policy's unit",
    "warmup": "the warmup length in the policy's unit",
    "num_warmup": "in the policy's unit",
    "num_stable": "in the policy's unit",
    "num_decay": "in the policy's unit",
}


def _fail(policy: str, param: str, requirement: str, value) -> None:
    meaning = f" ({param} is {_MEANING[param]})" if param in _MEANING else ""
    raise ConfigError(f"LR policy {policy!r}: parameter {param!r} must be {requirement}, got {value!r}{meaning}")


def _number(policy: str, param: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        _fail(policy, param, "a finite number", value)
    return value


def _positive(policy: str, param: str, value):
    if not _number(policy, param, value) > 0:
        _fail(policy, param, "> 0", value)
    return value


def _non_negative(policy: str, param: str, value):
    if not _number(policy, param, value) >= 0:
        _fail(policy, param, ">= 0", value)
    return value


def _unit_interval(policy: str, param: str, value):
    if not 0 <= _number(policy, param, value) <= 1:
        _fail(policy, param, "in [0, 1]", value)
    return value


def _open_unit_interval(policy: str, param: str, value):
    if not 0 < _number(policy, param, value) < 1:
        _fail(policy, param, "in (0, 1)", value)
    return value


def _decay_factor(policy: str, param: str, value):
    if not 0 < _number(policy, param, value) <= 1:
        _fail(policy, param, "in (0, 1] (a decaying amplitude)", value)
    return value


def _nonzero(policy: str, param: str, value):
    if _number(policy, param, value) == 0:
        _fail(policy, param, "non-zero (> 0 rises, < 0 falls)", value)
    return value


def _bool(policy: str, param: str, value):
    if not isinstance(value, bool):
        _fail(policy, param, "true or false", value)
    return value


def _increasing(policy: str, param: str, value) -> tuple:
    """Strictly increasing, positive boundaries / milestones, returned as a tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        _fail(policy, param, "a non-empty list of increasing numbers", value)
    for entry in value:
        _positive(policy, param, entry)
    if any(b <= a for a, b in zip(value, value[1:])):
        _fail(policy, param, "strictly increasing", list(value))
    return tuple(value)


def _one_of(choices: Sequence[str]) -> Callable:
    def check(policy: str, param: str, value):
        if value not in choices:
            _fail(policy, param, f"one of {', '.join(map(repr, choices))}", value)
        return value

    return check


_UNIT_PARAMETER = inspect.Parameter("unit", inspect.Parameter.KEYWORD_ONLY, default="steps")


def _register_formula(name: str, fn: Callable[..., float], kind: str, **checks: Callable) -> None:
    """Register a factory for ``fn`` whose signature is ``fn``'s keyword parameters plus ``unit``."""
    signature = inspect.Signature([*list(inspect.signature(fn).parameters.values())[1:], _UNIT_PARAMETER])

    def factory(**kwargs) -> Policy:
        bound = signature.bind(**kwargs)
        bound.apply_defaults()
        params = dict(bound.arguments)
        unit = check_unit(params.pop("unit"))
        for param, check in checks.items():
            params[param] = check(name, param, params[param])
        return Policy(name, fn, params, unit=unit, kind=kind)

    factory.__signature__ = signature
    factory.__name__ = factory.__qualname__ = f"make_{name}"
    factory.__doc__ = fn.__doc__
    LR_POLICIES.register(name)(factory)


_LRBENCH_CHECKS = {
    "FIX": {"k0": _positive},
    "STEP": {"k0": _positive, "gamma": _positive, "l": _positive},
    "NSTEP": {"k0": _positive, "gamma": _positive, "l": _increasing},
    "EXP": {"k0": _positive, "gamma": _positive},
    "INV": {"k0": _positive, "gamma": _positive, "p": _positive},
    "POLY": {"k0": _non_negative, "k1": _non_negative, "p": _positive, "l": _positive},
    "SIG": {"k0": _positive, "gamma": _nonzero, "l": _number},
}
# The cyclic, cosine and restart families: k0, k1 >= 0, a positive (half-)period l, a decaying gamma.
_CYCLIC_CHECKS = {"k0": _non_negative, "k1": _non_negative, "gamma": _decay_factor, "l": _positive}
for _name, _fn in lrbench.LRBENCH_POLICIES.items():
    _checks = _LRBENCH_CHECKS.get(_name)
    if _checks is None:
        _checks = {param: _CYCLIC_CHECKS[param] for param in list(inspect.signature(_fn).parameters)[1:]}
    _register_formula(_name, _fn, "lr", **_checks)

_register_formula("constant", constant, "multiplier", factor=_positive)
_register_formula("linear_decay", linear_decay, "multiplier", total=_positive, end_factor=_unit_interval)
_register_formula("cosine", cosine_decay, "multiplier", total=_positive, min_lr_ratio=_unit_interval)
_register_formula("inverse_sqrt", inverse_sqrt, "multiplier", timescale=_positive)
_register_formula(
    "wsd",
    warmup_stable_decay,
    "multiplier",
    num_warmup=_non_negative,
    num_stable=_non_negative,
    num_decay=_positive,
    min_lr_ratio=_unit_interval,
    warmup_type=_one_of(WSD_SHAPES),
    decay_type=_one_of(WSD_SHAPES),
)
_register_formula(
    "one_cycle",
    one_cycle,
    "multiplier",
    total=_positive,
    pct_start=_open_unit_interval,
    div_factor=_positive,
    final_div_factor=_positive,
    anneal=_one_of(ONE_CYCLE_ANNEALS),
)


def _as_policy(value, unit: str, owner: str, param: str) -> Policy:
    """A nested policy given as a ``Policy``, a name or a config dict, on the owner's unit."""
    if isinstance(value, Policy):
        if value.unit != unit:
            raise ConfigError(
                f"LR policy {owner!r}: parameter {param!r} holds a policy on unit {value.unit!r} but {owner!r} is on "
                f"{unit!r}; give both the same unit"
            )
        return value
    if isinstance(value, (str, Mapping)):
        return lr_policy_from_config(value, unit=unit)
    raise ConfigError(
        f"LR policy {owner!r}: parameter {param!r} must be a Policy, a policy name or a config dict, got {value!r}"
    )


def _as_policies(value, unit: str, owner: str, param: str) -> tuple[Policy, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence) or not value:
        raise ConfigError(
            f"LR policy {owner!r}: parameter {param!r} must be a non-empty list of policies, got {value!r}"
        )
    return tuple(_as_policy(item, unit, owner, f"{param}[{i}]") for i, item in enumerate(value))


@LR_POLICIES.register("warmup")
def make_warmup(
    *, policy, warmup: float, warmup_start_factor: float = 0.0, prefix: bool = True, unit: str = "steps"
) -> Policy:
    """Linear warmup around ``policy``; see ``with_warmup``.

    Args:
        policy (`Policy`, `str` or `dict`): the wrapped policy (a config dict inherits ``unit``).
        warmup (`float`): the warmup length in ``unit``.
        warmup_start_factor (`float`, *optional*, defaults to `0.0`): the first value, as a fraction of the target.
        prefix (`bool`, *optional*, defaults to `True`): start the wrapped policy's clock when warmup ends.
        unit (`str`, *optional*, defaults to `"steps"`): the unit of ``t`` and ``warmup``.
    """
    check_unit(unit)
    params = {
        "policy": _as_policy(policy, unit, "warmup", "policy"),
        "warmup": _non_negative("warmup", "warmup", warmup),
        "warmup_start_factor": _unit_interval("warmup", "warmup_start_factor", warmup_start_factor),
        "prefix": _bool("warmup", "prefix", prefix),
    }
    return Policy("warmup", with_warmup, params, unit=unit, kind=params["policy"].kind)


@LR_POLICIES.register("piecewise")
def make_piecewise(*, boundaries: Sequence[float], regions: Sequence, unit: str = "steps") -> Policy:
    """LRBench-style regions; see ``piecewise``.

    Args:
        boundaries (`Sequence[float]`): strictly increasing, positive region starts in ``unit``.
        regions (`Sequence`): ``len(boundaries) + 1`` policies (``Policy``, names or config dicts) of one kind.
        unit (`str`, *optional*, defaults to `"steps"`): the unit of ``t`` and ``boundaries``.
    """
    check_unit(unit)
    boundaries = _increasing("piecewise", "boundaries", boundaries)
    regions = _as_policies(regions, unit, "piecewise", "regions")
    if len(regions) != len(boundaries) + 1:
        raise ConfigError(
            f"LR policy 'piecewise': parameter 'regions' must hold len(boundaries) + 1 = {len(boundaries) + 1} "
            f"policies (one per region), got {len(regions)}"
        )
    kinds = sorted({region.kind for region in regions})
    if len(kinds) > 1:
        raise ConfigError(
            "LR policy 'piecewise': parameter 'regions' mixes absolute LRs (kind='lr') and multipliers; "
            "use one kind for every region"
        )
    return Policy("piecewise", piecewise, {"boundaries": boundaries, "regions": regions}, unit=unit, kind=kinds[0])


@LR_POLICIES.register("product")
def make_product(*, policies: Sequence, unit: str = "steps") -> Policy:
    """Product of policies; see ``product``.

    Args:
        policies (`Sequence`): policies (``Policy``, names or config dicts); at most one may be ``kind="lr"``
            (then the product is an absolute LR, else a multiplier).
        unit (`str`, *optional*, defaults to `"steps"`): the unit of ``t``.
    """
    check_unit(unit)
    policies = _as_policies(policies, unit, "product", "policies")
    absolute = [p.name for p in policies if p.kind == "lr"]
    if len(absolute) > 1:
        raise ConfigError(
            f"LR policy 'product': parameter 'policies' holds {len(absolute)} absolute LRs ({', '.join(absolute)}); "
            "at most one factor may be kind='lr', the others must be multipliers"
        )
    return Policy("product", product, {"policies": policies}, unit=unit, kind="lr" if absolute else "multiplier")


def make_lr_policy(name: str, *, unit: str = "steps", **params) -> Policy:
    """Build the registered LR policy ``name`` with ``params`` in ``unit``.

    Args:
        name (`str`): a name in ``LR_POLICIES`` (``LR_POLICIES.names()`` lists them).
        unit (`str`, *optional*, defaults to `"steps"`): what ``t`` and every length parameter count: steps,
            samples, tokens or fraction (of the run).
        **params: the policy's parameters; unknown or missing ones raise a ``ConfigError`` naming them.

    Example:

    >>> policy = make_lr_policy("STEP", k0=0.1, gamma=0.5, l=1000, unit="samples")
    >>> policy(2500), policy.kind, policy.unit
    (0.025, 'lr', 'samples')
    >>> make_lr_policy("COS", k0=0.0, k1=0.1)
    Traceback (most recent call last):
    ...
    hf_batchsched.errors.ConfigError: LR policy 'COS' is missing required parameter(s): l
    """
    return LR_POLICIES.build(name, unit=unit, **params)


def lr_policy_from_config(cfg: Mapping | str | Policy, *, unit: str | None = None) -> Policy:
    """Build a policy from a config: a ``Policy`` (returned as is), a name, or a dict with ``"name"``.

    Nested policies (``"policy"`` of ``warmup``, ``"regions"`` of ``piecewise``, ``"policies"`` of
    ``product``) are dicts, names or ``Policy`` objects and inherit the parent's ``"unit"``.

    Args:
        cfg (`dict`, `str` or `Policy`): the config.
        unit (`str`, *optional*): the inherited unit; a dict naming another unit raises a ``ConfigError``.
            Defaults to the dict's own ``"unit"``, else ``"steps"``.

    Example:

    >>> policy = lr_policy_from_config({
    ...     "name": "piecewise", "unit": "samples", "boundaries": [1000],
    ...     "regions": [{"name": "SINEXP", "k0": 1e-5, "k1": 1e-4, "gamma": 0.999, "l": 250},
    ...                 {"name": "POLY", "k0": 1e-6, "k1": 1e-5, "p": 1, "l": 1000}]})
    >>> policy.unit, policy.params["regions"][1].unit, f"{policy(1500):.3g}"
    ('samples', 'samples', '5.5e-06')
    """
    if isinstance(cfg, Policy):
        if unit is not None and cfg.unit != unit:
            raise ConfigError(
                f"LR policy {cfg.name!r} is on unit {cfg.unit!r}, expected {unit!r}; give both the same unit"
            )
        return cfg
    if isinstance(cfg, str):
        return make_lr_policy(cfg, unit=unit or "steps")
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"an LR policy config must be a dict, a policy name or a Policy, got {cfg!r}")
    params = dict(cfg)
    if "name" not in params:
        raise ConfigError(f"LR policy config {cfg!r} has no 'name'; valid names: {', '.join(LR_POLICIES.names())}")
    name = params.pop("name")
    own_unit = params.pop("unit", unit or "steps")
    if unit is not None and own_unit != unit:
        raise ConfigError(
            f"LR policy {name!r} has unit {own_unit!r} inside a policy on unit {unit!r}; nested policies must share "
            "their parent's unit (leave 'unit' out to inherit it)"
        )
    return make_lr_policy(name, unit=own_unit, **params)


def _to_config_value(value):
    if isinstance(value, Policy):
        return lr_policy_to_config(value)
    if isinstance(value, (tuple, list)):
        return [_to_config_value(item) for item in value]
    return value


def lr_policy_to_config(policy: Policy) -> dict:
    """The config dict (plain dicts, lists and scalars; YAML/JSON-ready) that ``lr_policy_from_config``
    turns back into an equal policy.

    >>> lr_policy_to_config(make_lr_policy("NSTEP", k0=0.1, gamma=0.1, l=[30, 60]))
    {'name': 'NSTEP', 'unit': 'steps', 'k0': 0.1, 'gamma': 0.1, 'l': [30, 60]}
    """
    return {"name": policy.name, "unit": policy.unit, **{k: _to_config_value(v) for k, v in policy.params.items()}}
