"""Shared pieces of the schedule library: the ``Policy`` wrapper and small registries.

An LR policy is a module-level pure function ``f(t, **params) -> float`` of training progress ``t``.
``Policy`` binds its parameters (like ``functools.partial``, but frozen, comparable and picklable) and
declares the unit ``t`` is counted in and whether ``f`` returns an absolute learning rate (LRBench's
policies, ``kind="lr"``) or a multiplier of the optimizer's base LR (``kind="multiplier"``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..clock import check_unit
from ..errors import ConfigError, check_choice

__all__ = ["Policy", "Registry"]

KINDS = ("lr", "multiplier")


@dataclass(frozen=True)
class Policy:
    """A pure function of progress with its parameters bound.

    Args:
        name (`str`): the registry name (e.g. ``"COS"``, ``"wsd"``).
        fn (`Callable`): a module-level function ``fn(t, **params) -> float``.
        params (`Mapping`): keyword arguments bound to ``fn``.
        unit (`str`, *optional*, defaults to `"steps"`): what ``t`` counts: steps, samples, tokens or fraction.
        kind (`str`, *optional*, defaults to `"lr"`): ``"lr"`` if ``fn`` returns a learning rate, ``"multiplier"``
            if it returns a factor of the optimizer's base learning rate.
    """

    name: str
    fn: Callable[..., float]
    params: Mapping = field(default_factory=dict)
    unit: str = "steps"
    kind: str = "lr"

    def __post_init__(self):
        check_unit(self.unit)
        check_choice("policy kind", self.kind, KINDS)
        object.__setattr__(self, "params", dict(self.params))

    def __call__(self, t: float) -> float:
        return float(self.fn(t, **self.params))

    def __hash__(self):
        return hash((self.name, self.fn, tuple(sorted(self.params.items(), key=lambda kv: kv[0])), self.unit))


class Registry:
    """Maps names to factories (a class, a classmethod or a function) and checks keyword arguments against each
    factory's signature, so a registered class names its own valid keys.

    >>> registry = Registry("widget")
    >>> @registry.register("square")
    ... def square(x, *, scale=1.0):
    ...     return scale * x * x
    >>> registry.build("square", x=3)
    9.0
    >>> registry.build("cube", x=3)
    Traceback (most recent call last):
    ...
    hf_batchsched.errors.ConfigError: unknown widget 'cube'; valid choices: square
    >>> registry.build("square", x=3, scael=2)
    Traceback (most recent call last):
    ...
    hf_batchsched.errors.ConfigError: widget 'square' got unknown parameter(s) scael; it takes: scale, x
    """

    def __init__(self, what: str):
        self.what = what
        self._factories: dict[str, Callable] = {}

    def register(self, name: str):
        def decorator(factory):
            if name in self._factories:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        return name in self._factories

    def get(self, name: str) -> Callable:
        check_choice(self.what, name, self._factories)
        return self._factories[name]

    def build(self, name: str, /, **kwargs):
        factory = self.get(name)
        signature = inspect.signature(factory)
        accepted = {
            p.name for p in signature.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
        takes_var_kwargs = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        unknown = sorted(set(kwargs) - accepted)
        if unknown and not takes_var_kwargs:
            raise ConfigError(
                f"{self.what} {name!r} got unknown parameter(s) {', '.join(unknown)}; "
                f"it takes: {', '.join(sorted(accepted))}"
            )
        missing = sorted(
            p.name
            for p in signature.parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in kwargs
        )
        if missing:
            raise ConfigError(f"{self.what} {name!r} is missing required parameter(s): {', '.join(missing)}")
        return factory(**kwargs)
