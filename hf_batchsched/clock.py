"""The training clock: progress counted in consumed samples and tokens, not only optimizer steps.

With a moving batch size, optimizer steps stop being a measure of progress. Every schedule in this
package declares the unit it is a function of (``steps``, ``samples``, ``tokens`` or ``fraction`` of
the run) and reads its argument from a ``TrainingClock``. The clock is part of checkpoint state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import ConfigError, check_choice

__all__ = ["UNITS", "TrainingClock", "check_unit"]

UNITS = ("steps", "samples", "tokens", "fraction")


def check_unit(unit: str) -> str:
    """Return ``unit`` if it is one of ``UNITS``, else raise a ``ConfigError`` listing them."""
    check_choice("unit", unit, UNITS)
    return unit


@dataclass
class TrainingClock:
    """Counts optimizer steps, consumed samples and consumed tokens (global, over all ranks).

    ``total_*`` give the run's horizon, used by the ``fraction`` unit (samples when known, else steps,
    else tokens).

    Example:

    >>> clock = TrainingClock(total_samples=1000)
    >>> clock.advance(samples=64, tokens=64 * 128)
    >>> clock.value("steps"), clock.value("samples"), clock.value("tokens"), clock.value("fraction")
    (1, 64, 8192, 0.064)
    """

    optimizer_steps: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    total_steps: int | None = None
    total_samples: int | None = None
    total_tokens: int | None = None

    def advance(self, samples: int, tokens: int = 0, steps: int = 1) -> None:
        """Record one optimizer step (or ``steps``) that consumed ``samples`` samples and ``tokens`` tokens."""
        self.optimizer_steps += steps
        self.consumed_samples += int(samples)
        self.consumed_tokens += int(tokens)

    def value(self, unit: str) -> float:
        """The clock's reading in ``unit``."""
        check_unit(unit)
        if unit == "steps":
            return self.optimizer_steps
        if unit == "samples":
            return self.consumed_samples
        if unit == "tokens":
            return self.consumed_tokens
        for done, total in (
            (self.consumed_samples, self.total_samples),
            (self.optimizer_steps, self.total_steps),
            (self.consumed_tokens, self.total_tokens),
        ):
            if total:
                return done / total
        raise ConfigError(
            "a schedule on the 'fraction' unit needs the run's length; set total_samples, total_steps or "
            "total_tokens on the clock (the Trainer integration does this from num_train_epochs / max_steps)"
        )

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if not hasattr(self, key):
                raise ConfigError(f"unknown TrainingClock state key {key!r}")
            setattr(self, key, value)
