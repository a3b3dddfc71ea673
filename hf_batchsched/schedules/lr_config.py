"""The LR-policy registry (``LR_POLICIES``), the checks of every parameter, and configs.

``make_lr_policy(name, unit=..., **params)`` builds a registered policy: LRBench's 34 formulas
(``hf_batchsched.schedules.lrbench``), the modern shapes and combinators of ``hf_batchsched.schedules.lr``.
``lr_policy_from_config`` / ``lr_policy_to_config`` turn configs (YAML/JSON-ready dicts) into policies and back;
nested policies inherit their parent's unit.

>>> policy = lr_policy_from_config({"name": "warmup", "warmup": 10, "policy": {"name": "constant"}})
>>> lr_policy_to_config(policy)["policy"], policy(5)
({'name': 'constant', 'unit': 'steps', 'factor': 1.0}, 0.5)
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence

from ..clock import check_unit
from ..errors import ConfigError
from .base import Policy, Registry
from .lr import (
    ONE_CYCLE_ANNEALS,
    WSD_SHAPES,
    constant,
    cosine_decay,
    inverse_sqrt,
    linear_decay,
    one_cycle,
    piecewise,
    product,
    warmup_stable_decay,
    with_warmup,
)
from .lrbench import LRBENCH_POLICIES

__all__ = ["LR_POLICIES", "lr_policy_from_config", "lr_policy_to_config", "make_lr_policy"]


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
for _name, _fn in LRBENCH_POLICIES.items():
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
