"""Errors raised for bad user input.

Every error a user can trigger with a bad argument, config value or command-line flag is a
``ConfigError`` (a ``ValueError``), whose message says what is wrong and how to fix it. The
``hf-batchsched`` command prints such errors on one line and exits with code 2.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["ConfigError", "check_choice", "check_integer", "check_positive"]


class ConfigError(ValueError):
    """A bad argument or config value; the message names it and says how to fix it."""


def check_choice(what: str, value: object, choices) -> None:
    """Raise a ``ConfigError`` listing the valid choices when ``value`` is not one of them.

    Example:

    >>> check_choice("unit", "epochs", ["steps", "samples"])
    Traceback (most recent call last):
    ...
    hf_batchsched.errors.ConfigError: unknown unit 'epochs'; valid choices: samples, steps
    """
    choices = sorted(choices)
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; valid choices: {', '.join(map(str, choices))}")


def check_positive(what: str, value: float, *, allow_zero: bool = False, allow_inf: bool = False) -> None:
    """Raise a ``ConfigError`` when ``value`` is not a finite positive number (or negative, with ``allow_zero``).

    NaN, infinities (unless ``allow_inf``), booleans and non-numbers are refused too.

    >>> check_positive("max_micro_batch_size", 0)
    Traceback (most recent call last):
    ...
    hf_batchsched.errors.ConfigError: max_micro_batch_size must be > 0, got 0
    >>> check_positive("threshold", float("nan"), allow_zero=True)
    Traceback (most recent call last):
    ...
    hf_batchsched.errors.ConfigError: threshold must be a finite number >= 0, got nan
    """
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{what} must be a number {bound}, got {value!r}")
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ConfigError(f"{what} must be a finite number {bound}, got {value}")
    if (value < 0) if allow_zero else not value > 0:
        raise ConfigError(f"{what} must be {bound}, got {value}")


def check_integer(what: str, value: object) -> None:
    """Raise a ``ConfigError`` when ``value`` is not an integer (a bool, a float or a string is refused).

    >>> check_integer("seed", "abc")
    Traceback (most recent call last):
    ...
    hf_batchsched.errors.ConfigError: seed must be an integer, got 'abc'
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{what} must be an integer, got {value!r}")
