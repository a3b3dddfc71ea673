"""LRBench's formula-based learning-rate policies as pure functions of progress.

All 34 functions of LRBench's code are here: the 13 of the paper's table (``PAPER_POLICIES``: FIX, STEP,
NSTEP, EXP, INV, POLY, TRI, TRI2, TRIEXP, SIN, SIN2, SINEXP, COS), SIG, the phase-shifted ``D*`` variants
(start at ``k1``), ``COS2``/``COSEXP``/``UPCOS*`` and the restart family (``RSW*``, ``SINRSW*``, ``COSRSW*``).

Each function takes the progress ``t`` (in the unit of the ``Policy`` that binds it: steps, samples,
tokens or fraction of the run) and LRBench's parameters, and returns an **absolute** learning rate
(``kind="lr"``). Names and parameters follow LRBench (Wu et al., "Demystifying Learning Rate Policies for
High Accuracy Training of Deep Neural Networks", IEEE BigData 2019, https://arxiv.org/abs/1908.06477;
code https://github.com/git-disl/LRBench, ``lr/LRfunctions.py``):

- ``k0``: the base (lower / starting) learning rate,
- ``k1``: the upper learning rate of cyclic policies, the starting one of ``POLY`` and ``COS``,
- ``gamma``: the decay factor,
- ``p``: the power,
- ``l``: the step size, half-period or horizon (a list of milestones for ``NSTEP``).

Conventions kept from LRBench: ``STEP``, ``NSTEP``, ``EXP``, ``INV`` and ``SIG`` scale ``k0``; ``POLY`` and
``COS`` start at ``k1`` and end at ``k0``; ``TRI*`` and ``SIN*`` start at ``k0`` and reach ``k1`` at
``t = l``; ``COS`` is periodic (back at ``k1`` at ``t = 2l``), so it is a one-shot anneal only when ``l``
is the run's length.

Deviations from LRBench (each is a bug there):

- ``NSTEP`` is pure: ``k0 * gamma**(number of milestones <= t)``. LRBench keeps the step counter in a
  function attribute shared by every NSTEP (creating a second one resets the first), advances it by at
  most one milestone per call and never goes back, so resume and non-monotone queries were wrong.
- ``POLY`` holds ``k0`` for ``t > l``; LRBench evaluates ``(1 - t/l)**p`` past the horizon, which rises
  again (even ``p``), changes sign (odd ``p``) or is complex (fractional ``p``).
- The restart family (``RSW*``, ``SINRSW*``, ``COSRSW*``) is ``k1`` at every restart ``t = n l`` and falls towards
  ``k0`` within the cycle. LRBench computes the phase as ``-t/l - floor(-t/l)``, which is 0 exactly at the
  restarts, so it returned ``k0`` at ``t = n l`` (``t = 0`` included) and jumped to ~``k1`` one step later.
- ``SIG`` is evaluated in a numerically stable form (LRBench's ``math.exp`` overflows for
  ``gamma * (l - t) > 709``); the values are the same.
- ``TRI*`` evaluate the triangle wave exactly, ``1 - |((t / l) mod 2) - 1|``, instead of
  ``(2/pi) |asin(sin(pi t / 2l))|`` (which loses ~1e-8 next to the peaks, where ``asin``'s slope is infinite).
- ``k0 + (k1 - k0) * x`` is evaluated as ``k0 * (1 - x) + k1 * x``: the same number up to rounding, and the
  end points are exact (LRBench's ``POLY(0)`` is ``k1`` plus one ulp).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

__all__ = [
    "COS",
    "EXP",
    "FIX",
    "INV",
    "NSTEP",
    "POLY",
    "SIG",
    "SIN",
    "SIN2",
    "SINEXP",
    "STEP",
    "TRI",
    "TRI2",
    "TRIEXP",
    "LRBENCH_POLICIES",
    "PAPER_POLICIES",
    "DTRI",
    "DTRI2",
    "DTRIEXP",
    "DSIN",
    "DSIN2",
    "DSINEXP",
    "COS2",
    "COSEXP",
    "UPCOS",
    "UPCOS2",
    "UPCOSEXP",
    "RSW",
    "RSW2",
    "RSWEXP",
    "SINRSW",
    "SINRSW2",
    "SINRSWEXP",
    "COSRSW",
    "COSRSW2",
    "COSRSWEXP",
]


def FIX(t: float, *, k0: float) -> float:  # noqa: N802 (LRBench's names)
    """Fixed learning rate: ``k0``.

    >>> for t in (0, 50, 100):
    ...     print(t, FIX(t, k0=0.01))
    0 0.01
    50 0.01
    100 0.01
    """
    return k0


def STEP(t: float, *, k0: float, gamma: float, l: float) -> float:  # noqa: N802, E741
    """Step decay: ``k0 * gamma**floor(t / l)``.

    >>> for t in (0, 9, 10, 25):
    ...     print(t, f"{STEP(t, k0=0.01, gamma=0.5, l=10):.6g}")
    0 0.01
    9 0.01
    10 0.005
    25 0.0025
    """
    return k0 * gamma ** math.floor(t / l)


def NSTEP(t: float, *, k0: float, gamma: float, l: Sequence[float]) -> float:  # noqa: N802, E741
    """Multi-step decay: ``k0 * gamma**i`` with ``i`` the number of milestones ``l_j <= t``.

    Pure, unlike LRBench's (see the module docstring): any ``t`` in any order gives the same value.

    >>> for t in (0, 29, 30, 60, 100, 5):
    ...     print(t, f"{NSTEP(t, k0=0.1, gamma=0.1, l=(30, 60)):.6g}")
    0 0.1
    29 0.1
    30 0.01
    60 0.001
    100 0.001
    5 0.1
    """
    return k0 * gamma ** bisect.bisect_right(l, t)


def EXP(t: float, *, k0: float, gamma: float) -> float:  # noqa: N802
    """Exponential decay: ``k0 * gamma**t``.

    >>> for t in (0, 50, 100):
    ...     print(t, f"{EXP(t, k0=0.01, gamma=0.99):.6g}")
    0 0.01
    50 0.00605006
    100 0.00366032
    """
    return k0 * gamma**t


def INV(t: float, *, k0: float, gamma: float, p: float) -> float:  # noqa: N802
    """Inverse-time decay: ``k0 * (1 + gamma * t)**(-p)``.

    >>> for t in (0, 50, 100):
    ...     print(t, f"{INV(t, k0=0.01, gamma=0.01, p=0.5):.6g}")
    0 0.01
    50 0.00816497
    100 0.00707107
    """
    return k0 * (1.0 + gamma * t) ** (-p)


def POLY(t: float, *, k0: float, k1: float, p: float, l: float) -> float:  # noqa: N802, E741
    """Polynomial decay from ``k1`` (at ``t = 0``) to ``k0`` (at ``t = l``, then held):
    ``(k1 - k0) * (1 - min(t, l) / l)**p + k0``.

    >>> for t in (0, 50, 100, 150):
    ...     print(t, f"{POLY(t, k0=0.001, k1=0.1, p=2, l=100):.6g}")
    0 0.1
    50 0.02575
    100 0.001
    150 0.001
    """
    return _lerp(k0, k1, (1.0 - min(t, l) / l) ** p)


def SIG(t: float, *, k0: float, gamma: float, l: float) -> float:  # noqa: N802, E741
    """Sigmoid: ``k0 / (1 + exp(-gamma * (t - l)))``; ``k0 / 2`` at ``t = l``, rising to ``k0`` if
    ``gamma > 0``, falling from ``k0`` if ``gamma < 0``.

    >>> for t in (0, 50, 100):
    ...     print(t, f"{SIG(t, k0=0.01, gamma=0.1, l=50):.6g}")
    0 6.69285e-05
    50 0.005
    100 0.00993307
    """
    z = gamma * (t - l)
    if z >= 0:
        return k0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return k0 * e / (1.0 + e)


def _lerp(k0: float, k1: float, x: float) -> float:
    """``k0 + (k1 - k0) * x``, written so that ``x = 0`` gives exactly ``k0`` and ``x = 1`` exactly ``k1``."""
    return k0 * (1.0 - x) + k1 * x


def _triangle(t: float, l: float) -> float:  # noqa: E741
    """Triangle wave of period ``2l``: 0 at ``t = 0``, 1 at ``t = l``, 0 at ``t = 2l``."""
    return 1.0 - abs((t / l) % 2.0 - 1.0)


def _halvings(t: float, l: float) -> int:  # noqa: E741
    """Number of completed periods ``2l``: the amplitude of ``TRI2``/``SIN2`` is divided by ``2**this``."""
    return math.floor(t / (2.0 * l))


def TRI(t: float, *, k0: float, k1: float, l: float) -> float:  # noqa: N802, E741
    """Triangular cyclic LR (Smith's CLR): ``k0 + (k1 - k0) * (2/pi) |asin(sin(pi t / 2l))|``.

    Starts at ``k0``, reaches ``k1`` at ``t = l``, back at ``k0`` at ``t = 2l``.

    >>> for t in (0, 5, 10, 20):
    ...     print(t, f"{TRI(t, k0=0.001, k1=0.01, l=10):.6g}")
    0 0.001
    5 0.0055
    10 0.01
    20 0.001
    """
    return _lerp(k0, k1, _triangle(t, l))


def TRI2(t: float, *, k0: float, k1: float, l: float) -> float:  # noqa: N802, E741
    """Triangular with the amplitude halved every cycle: ``k0 + (k1 - k0) * tri(t) / 2**floor(t / 2l)``.

    >>> for t in (0, 10, 20, 30):
    ...     print(t, f"{TRI2(t, k0=0.001, k1=0.01, l=10):.6g}")
    0 0.001
    10 0.01
    20 0.001
    30 0.0055
    """
    return _lerp(k0, k1, _triangle(t, l) / 2 ** _halvings(t, l))


def TRIEXP(t: float, *, k0: float, k1: float, gamma: float, l: float) -> float:  # noqa: N802, E741
    """Triangular with exponentially decaying amplitude: ``k0 + (k1 - k0) * tri(t) * gamma**t``.

    >>> for t in (0, 10, 20, 30):
    ...     print(t, f"{TRIEXP(t, k0=0.001, k1=0.01, gamma=0.99, l=10):.6g}")
    0 0.001
    10 0.00913944
    20 0.001
    30 0.0076573
    """
    return _lerp(k0, k1, _triangle(t, l) * gamma**t)


def SIN(t: float, *, k0: float, k1: float, l: float) -> float:  # noqa: N802, E741
    """Sine cyclic LR: ``k0 + (k1 - k0) * |sin(pi t / 2l)|``; ``k0`` at 0, ``k1`` at ``l``, ``k0`` at ``2l``.

    >>> for t in (0, 5, 10, 20):
    ...     print(t, f"{SIN(t, k0=0.001, k1=0.01, l=10):.6g}")
    0 0.001
    5 0.00736396
    10 0.01
    20 0.001
    """
    return _lerp(k0, k1, abs(math.sin(math.pi * t / (2.0 * l))))


def SIN2(t: float, *, k0: float, k1: float, l: float) -> float:  # noqa: N802, E741
    """Sine with the amplitude halved every cycle: ``k0 + (k1 - k0) * |sin(pi t / 2l)| / 2**floor(t / 2l)``.

    >>> for t in (0, 10, 20, 30):
    ...     print(t, f"{SIN2(t, k0=0.001, k1=0.01, l=10):.6g}")
    0 0.001
    10 0.01
    20 0.001
    30 0.0055
    """
    return _lerp(k0, k1, abs(math.sin(math.pi * t / (2.0 * l))) / 2 ** _halvings(t, l))


def SINEXP(t: float, *, k0: float, k1: float, gamma: float, l: float) -> float:  # noqa: N802, E741
    """Sine with exponentially decaying amplitude: ``k0 + (k1 - k0) * |sin(pi t / 2l)| * gamma**t``.

    >>> for t in (0, 10, 20, 30):
    ...     print(t, f"{SINEXP(t, k0=0.001, k1=0.01, gamma=0.99, l=10):.6g}")
    0 0.001
    10 0.00913944
    20 0.001
    30 0.0076573
    """
    return _lerp(k0, k1, abs(math.sin(math.pi * t / (2.0 * l))) * gamma**t)


def COS(t: float, *, k0: float, k1: float, l: float) -> float:  # noqa: N802, E741
    """Cosine (periodic): ``k0 + (k1 - k0) * (1 + cos(pi t / l)) / 2``; ``k1`` at 0, ``k0`` at ``l``,
    ``k1`` again at ``2l``. Set ``l`` to the run's length for a one-shot anneal.

    >>> for t in (0, 50, 100, 200):
    ...     print(t, f"{COS(t, k0=0.001, k1=0.1, l=100):.6g}")
    0 0.1
    50 0.0505
    100 0.001
    200 0.1
    """
    return _lerp(k0, k1, 0.5 * (1.0 + math.cos(math.pi * t / l)))


# --------------------------------------------------------------------------------------------------
# The rest of LRBench's code: phase-shifted (D*), cosine variants and the restart family
# --------------------------------------------------------------------------------------------------


def DTRI(t: float, *, k0: float, k1: float, l: float) -> float:  # noqa: N802, E741
    """``TRI`` shifted by half a period, starting at ``k1``: ``k0 + (k1 - k0) * tri(t + l)``.

    >>> [f"{DTRI(t, k0=0.001, k1=0.01, l=10):.6g}" for t in (0, 5, 10, 20)]
    ['0.01', '0.0055', '0.001', '0.01']
    """
    return _lerp(k0, k1, _triangle(t + l, l))


def DTRI2(t: float, *, k0: float, k1: float, l: float) -> float:  # noqa: N802, E741
    """``TRI2`` shifted by half a period: ``k0 + (k1 - k0) * tri(t + l) / 2**floor((t + l) / 2l)``; peaks at
    ``t = 0, 2l, 4l, ...`` with halving heights.

    >>> [f"{DTRI2(t, k0=0.001, k1=0.01, l=10):.6g}" for t in (0, 10, 20, 40)]
    ['0.01', '0.001', '0.0055', '0.00325']
    """
    return _lerp(k0, k1, _triangle(t + l, l) / 2 ** _halvings(t + l, l))


def DTRIEXP(t: float, *, k0: float, k1: float, gamma: float, l: float) -> float:  # noqa: N802, E741
    """``TRIEXP`` shifted by half a period: ``k0 + (k1 - k0) * tri(t + l) * gamma**t``.

    >>> [f"{DTRIEXP(t, k0=0.001, k1=0.01, gamma=0.99, l=10):.6g}" for t in (0, 10, 20, 40)]
    ['0.01', '0.001', '0.00836116', '0.00702075']
    """
    return _lerp(k0, k1, _triangle(t + l, l) * gamma**t)


def DSIN(t: float, *, k0: float, k1: float, l: float) -> float:  # noqa: N802, E741
    """``SIN`` shifted by half a period, starting at ``k1``: ``k0 + (k1 - k0) * |sin(pi (t + l) / 2l)|``.

    >>> [f"{DSIN(t, k0=0.001, k1=0.01, l=10):.6g}" for t in (0, 5, 10, 20)]
    ['0.01', '0.00736396', '0.001', '0.01']
    """
    return _lerp(k0, k1, abs(math.sin(math.pi * (t + l) / (2.0 * l))))


def DSIN2(t: float, *, k0: float, k1: float, l: float) -> float:  # noqa: N802, E741
    """``SIN2`` shifted by half a period: ``k0 + (k1 - k0) * |sin(pi (t + l) / 2l)| / 2**floor((t + l) / 2l)``.

    >>> [f"{DSIN2(t, k0=0.001, k1=0.01, l=10):.6g}" for t in (0, 10, 20, 40)]
    ['0.01', '0.001', '0.0055', '0.00325']
    """
    return _lerp(k0, k1, abs(math.sin(math.pi * (t + l) / (2.0 * l))) / 2 ** _halvings(t + l, l))


def DSINEXP(t: float, *, k0: float, k1: float, gamma: float, l: float) -> float:  # noqa: N802, E741
    """``SINEXP`` shifted by half a period: ``k0 + (k1 - k0) * |sin(pi (t + l) / 2l)| * gamma**t``.

    >>> [f"{DSINEXP(t, k0=0.001, k1=0.01, gamma=0.99, l=10):.6g}" for t in (0, 10, 20, 40)]
    ['0.01', '0.001', '0.00836116', '0.00702075']
    """
    return _lerp(k0, k1, abs(math.sin(math.pi * (t + l) / (2.0 * l))) * gamma**t)


def COS2(t: float, *, k0: float, k1: float, l: float) -> float:  # noqa: N802, E741
    """``COS`` with the amplitude halved every period: ``k0 + (k1 - k0) * (1 + cos(pi t / l)) / 2 / 2**floor((t + l)
    / 2l)``.

    >>> [f"{COS2(t, k0=0.001, k1=0.1, l=100):.6g}" for t in (0, 100, 200, 400)]
    ['0.1', '0.001', '0.0505', '0.02575']
    """
    return _lerp(k0, k1, 0.5 * (1.0 + math.cos(math.pi * t / l)) / 2 ** _halvings(t + l, l))


def COSEXP(t: float, *, k0: float, k1: float, gamma: float, l: float) -> float:  # noqa: N802, E741
    """``COS`` with exponentially decaying amplitude: ``k0 + (k1 - k0) * (1 + cos(pi t / l)) / 2 * gamma**t``.

    >>> [f"{COSEXP(t, k0=0.001, k1=0.1, gamma=0.99, l=100):.6g}" for t in (0, 100, 200)]
    ['0.1', '0.001', '0.014264']
    """
    return _lerp(k0, k1, 0.5 * (1.0 + math.cos(math.pi * t / l)) * gamma**t)


def UPCOS(t: float, *, k0: float, k1: float, l: float) -> float:  # noqa: N802, E741
    """Cosine starting at ``k0``: ``k0 + (k1 - k0) * (1 + cos(pi (t / l + 1))) / 2``; ``k1`` at ``t = l``.

    >>> [f"{UPCOS(t, k0=0.001, k1=0.1, l=100):.6g}" for t in (0, 50, 100, 200)]
    ['0.001', '0.0505', '0.1', '0.001']
    """
    return _lerp(k0, k1, 0.5 * (1.0 + math.cos(math.pi * (t / l + 1.0))))


def UPCOS2(t: float, *, k0: float, k1: float, l: float) -> float:  # noqa: N802, E741
    """``UPCOS`` with the amplitude halved every period: ``... / 2**floor(t / 2l)``.

    >>> [f"{UPCOS2(t, k0=0.001, k1=0.1, l=100):.6g}" for t in (0, 100, 300, 500)]
    ['0.001', '0.1', '0.0505', '0.02575']
    """
    return _lerp(k0, k1, 0.5 * (1.0 + math.cos(math.pi * (t / l + 1.0))) / 2 ** _halvings(t, l))


def UPCOSEXP(t: float, *, k0: float, k1: float, gamma: float, l: float) -> float:  # noqa: N802, E741
    """``UPCOS`` with exponentially decaying amplitude: ``... * gamma**t``.

    >>> [f"{UPCOSEXP(t, k0=0.001, k1=0.1, gamma=0.99, l=100):.6g}" for t in (0, 100, 300)]
    ['0.001', '0.0372372', '0.00585505']
    """
    return _lerp(k0, k1, 0.5 * (1.0 + math.cos(math.pi * (t / l + 1.0))) * gamma**t)


def _restart_phase(t: float, l: float) -> float:  # noqa: E741
    """1 at each restart ``t = n l``, falling linearly towards 0 just before the next: ``1 - frac(t / l)``.

    LRBench computes ``-t/l - floor(-t/l)``, which is the same except **at** the restarts, where it is 0: its
    restart policies return ``k0`` at ``t = n l`` and jump to ~``k1`` one step later.
    """
    return 1.0 - (t / l - math.floor(t / l))


def RSW(t: float, *, k0: float, k1: float, l: float) -> float:  # noqa: N802, E741
    """Sawtooth with restarts every ``l``: ``k0 + (k1 - k0) * (1 - frac(t / l))``; ``k1`` at every ``t = n l``.

    >>> [f"{RSW(t, k0=0.001, k1=0.01, l=10):.6g}" for t in (0, 5, 9, 10)]
    ['0.01', '0.0055', '0.0019', '0.01']
    """
    return _lerp(k0, k1, _restart_phase(t, l))


def RSW2(t: float, *, k0: float, k1: float, l: float) -> float:  # noqa: N802, E741
    """``RSW`` with the amplitude halved at every restart: ``... / 2**floor(t / l)``.

    >>> [f"{RSW2(t, k0=0.001, k1=0.01, l=10):.6g}" for t in (0, 5, 10, 20)]
    ['0.01', '0.0055', '0.0055', '0.00325']
    """
    return _lerp(k0, k1, _restart_phase(t, l) / 2 ** math.floor(t / l))


def RSWEXP(t: float, *, k0: float, k1: float, gamma: float, l: float) -> float:  # noqa: N802, E741
    """``RSW`` with exponentially decaying amplitude: ``... * gamma**t``.

    >>> [f"{RSWEXP(t, k0=0.001, k1=0.01, gamma=0.99, l=10):.6g}" for t in (0, 5, 10, 20)]
    ['0.01', '0.00527946', '0.00913944', '0.00836116']
    """
    return _lerp(k0, k1, _restart_phase(t, l) * gamma**t)


def SINRSW(t: float, *, k0: float, k1: float, l: float) -> float:  # noqa: N802, E741
    """Sine-shaped restarts: ``k0 + (k1 - k0) * sin(pi/2 * (1 - frac(t / l)))``; ``k1`` at every ``t = n l``.

    >>> [f"{SINRSW(t, k0=0.001, k1=0.01, l=10):.6g}" for t in (0, 5, 9, 10)]
    ['0.01', '0.00736396', '0.00240791', '0.01']
    """
    return _lerp(k0, k1, math.sin(0.5 * math.pi * _restart_phase(t, l)))


def SINRSW2(t: float, *, k0: float, k1: float, l: float) -> float:  # noqa: N802, E741
    """``SINRSW`` with the amplitude halved at every restart: ``... / 2**floor(t / l)``.

    >>> [f"{SINRSW2(t, k0=0.001, k1=0.01, l=10):.6g}" for t in (0, 5, 10, 20)]
    ['0.01', '0.00736396', '0.0055', '0.00325']
    """
    return _lerp(k0, k1, math.sin(0.5 * math.pi * _restart_phase(t, l)) / 2 ** math.floor(t / l))


def SINRSWEXP(t: float, *, k0: float, k1: float, gamma: float, l: float) -> float:  # noqa: N802, E741
    """``SINRSW`` with exponentially decaying amplitude: ``... * gamma**t``.

    >>> [f"{SINRSWEXP(t, k0=0.001, k1=0.01, gamma=0.99, l=10):.6g}" for t in (0, 5, 10, 20)]
    ['0.01', '0.00705206', '0.00913944', '0.00836116']
    """
    return _lerp(k0, k1, math.sin(0.5 * math.pi * _restart_phase(t, l)) * gamma**t)


def COSRSW(t: float, *, k0: float, k1: float, l: float) -> float:  # noqa: N802, E741
    """Cosine-shaped restarts: ``k0 + (k1 - k0) * (1 - cos(pi (1 - frac(t / l)))) / 2``; ``k1`` at every ``t = n l``.

    >>> [f"{COSRSW(t, k0=0.001, k1=0.01, l=10):.6g}" for t in (0, 5, 9, 10)]
    ['0.01', '0.0055', '0.00122025', '0.01']
    """
    return _lerp(k0, k1, 0.5 * (1.0 - math.cos(math.pi * _restart_phase(t, l))))


def COSRSW2(t: float, *, k0: float, k1: float, l: float) -> float:  # noqa: N802, E741
    """``COSRSW`` with the amplitude halved at every restart: ``... / 2**floor(t / l)``.

    >>> [f"{COSRSW2(t, k0=0.001, k1=0.01, l=10):.6g}" for t in (0, 5, 10, 20)]
    ['0.01', '0.0055', '0.0055', '0.00325']
    """
    return _lerp(k0, k1, 0.5 * (1.0 - math.cos(math.pi * _restart_phase(t, l))) / 2 ** math.floor(t / l))


def COSRSWEXP(t: float, *, k0: float, k1: float, gamma: float, l: float) -> float:  # noqa: N802, E741
    """``COSRSW`` with exponentially decaying amplitude: ``... * gamma**t``.

    >>> [f"{COSRSWEXP(t, k0=0.001, k1=0.01, gamma=0.99, l=10):.6g}" for t in (0, 5, 10, 20)]
    ['0.01', '0.00527946', '0.00913944', '0.00836116']
    """
    return _lerp(k0, k1, 0.5 * (1.0 - math.cos(math.pi * _restart_phase(t, l))) * gamma**t)


#: The 13 policies of LRBench's paper table (Wu et al. 2019).
PAPER_POLICIES = tuple("FIX STEP NSTEP EXP INV POLY TRI TRI2 TRIEXP SIN SIN2 SINEXP COS".split())

#: Every LRBench function by name (the 34 of ``lr/LRfunctions.py``).
LRBENCH_POLICIES = {
    fn.__name__: fn
    for fn in (
        FIX, STEP, NSTEP, EXP, INV, POLY, SIG,
        TRI, TRI2, TRIEXP, DTRI, DTRI2, DTRIEXP,
        SIN, SIN2, SINEXP, DSIN, DSIN2, DSINEXP,
        COS, COS2, COSEXP, UPCOS, UPCOS2, UPCOSEXP,
        RSW, RSW2, RSWEXP, SINRSW, SINRSW2, SINRSWEXP, COSRSW, COSRSW2, COSRSWEXP,
    )
}  # fmt: skip
