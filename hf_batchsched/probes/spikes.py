"""Rolling-window spike detectors: ``SpikeDetector`` (z-score), the one detector of the package, and
``LossSpikeDetector``, its variant that flags a loss above ``threshold`` times the window's 90th percentile.

Pure state machines over a stream of floats (no model, no Trainer): ``SpikeGuardCallback`` and
``StabilityMonitorCallback`` feed them losses and gradient norms.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, check_positive

__all__ = ["LossSpikeDetector", "SpikeDetector"]


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
        self.values = deque((float(v) for v in state.get("values", [])), maxlen=self.window)
        self.spikes = int(state.get("spikes", 0))
        self.last_score = float(state.get("last_score", self.undefined_score))


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
