"""Errors raised for bad user input.

Every error a user can trigger with a bad argument, config value or command-line flag is a
``ConfigError`` (a ``ValueError``), whose message says what is wrong and how to fix it. The
``hf-batchsched`` command prints such errors on one line and exits with code 2.
"""

from __future__ import annotations

__all__ = ["ConfigError", "check_choice", "check_positive"]


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


def check_positive(what: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise a ``ConfigError`` when ``value`` is not positive (or negative, with ``allow_zero``).

    >>> check_positive("max_micro_batch_size", 0)
    Traceback (most recent call last):
    ...
    hf_batchsched.errors.ConfigError: max_micro_batch_size must be > 0, got 0
    """
    if allow_zero and value < 0:
        raise ConfigError(f"{what} must be >= 0, got {value}")
    if not allow_zero and not value > 0:
        raise ConfigError(f"{what} must be > 0, got {value}")
