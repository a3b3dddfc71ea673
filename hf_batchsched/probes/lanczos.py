"""Top eigenvalue of a symmetric operator given as a matvec: Lanczos, and power iteration as the baseline."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["LanczosResult", "lanczos", "power_iteration"]


@dataclass
class LanczosResult:
    """Top eigenvalue of a symmetric operator and how it was reached."""

    eigenvalue: float
    num_matvecs: int
    residual: float
    history: list[float] = field(default_factory=list)
    ritz_values: list[float] = field(default_factory=list)
    eigenvector: torch.Tensor | None = None


def _start_vector(n: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    vector = torch.randn(n, generator=generator, dtype=torch.float64).to(like.device, like.dtype)
    return vector / vector.norm()


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    max_steps: int = 20,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    like: torch.Tensor | None = None,
) -> LanczosResult:
    """Largest (algebraic) eigenvalue of a symmetric ``n x n`` operator by Lanczos with full reorthogonalisation.

    The tridiagonal matrix is solved in float64 (``scipy.linalg.eigh_tridiagonal``) at every step; the iteration
    stops when the Ritz residual ``beta_k * |s_k|`` is at most ``tol * |theta|`` or after ``max_steps`` matvecs.
    Lanczos converges to the top eigenvalue much faster than power iteration (the Krylov space contains the
    Chebyshev-accelerated power iterate), see ``benchmarks/bench_sharpness.py``.

    Example:

    >>> diag = torch.tensor([5.0, 1.0, 0.5, -2.0], dtype=torch.float64)
    >>> result = lanczos(lambda v: diag * v, 4, generator=torch.Generator().manual_seed(0), like=diag)
    >>> round(result.eigenvalue, 6), result.num_matvecs
    (5.0, 4)
    """
    from scipy.linalg import eigh_tridiagonal

    like = like if like is not None else torch.zeros(1)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    vector = _start_vector(n, generator, like)
    basis, alphas, betas, history = [vector], [], [], []
    previous = None
    theta, residual, ritz, top_vec = float("nan"), float("inf"), [], None
    for step in range(min(max_steps, n)):
        w = matvec(vector).to(like.device, like.dtype)
        alpha = float(torch.dot(w, vector))
        w = w - alpha * vector
        if previous is not None:
            w = w - betas[-1] * previous
        stacked = torch.stack(basis)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - stacked.T @ (stacked @ w)
        beta = float(w.norm())
        alphas.append(alpha)
        values, vectors = eigh_tridiagonal(np.array(alphas), np.array(betas)) if betas else (np.array(alphas), None)
        theta = float(values[-1])
        last = abs(float(vectors[-1, -1])) if vectors is not None else 1.0
        residual = beta * last
        history.append(theta)
        ritz = values.tolist()
        top_vec = vectors[:, -1] if vectors is not None else np.ones(1)
        if residual <= tol * max(abs(theta), 1e-30) or beta <= 1e-12 * max(abs(theta), 1e-30) or step + 1 >= n:
            break
        betas.append(beta)
        previous, vector = vector, w / beta
        basis.append(vector)
    eigenvector = (torch.stack(basis[: len(top_vec)]).T @ torch.as_tensor(top_vec, dtype=like.dtype)).to(like.device)
    return LanczosResult(theta, len(history), residual, history, ritz, eigenvector)


def power_iteration(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    max_steps: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    like: torch.Tensor | None = None,
) -> LanczosResult:
    """Largest-magnitude eigenvalue by power iteration, as PyHessian does (stop on relative change < ``tol``).

    Kept as the baseline for the benchmark; :func:`lanczos` needs far fewer matvecs for the same accuracy.

    >>> diag = torch.tensor([5.0, 1.0, 0.5], dtype=torch.float64)
    >>> result = power_iteration(lambda v: diag * v, 3, tol=1e-9, generator=torch.Generator().manual_seed(0),
    ...                          like=diag)
    >>> round(result.eigenvalue, 6)
    5.0
    """
    like = like if like is not None else torch.zeros(1)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    vector = _start_vector(n, generator, like)
    eigenvalue, history = None, []
    for _ in range(max_steps):
        hv = matvec(vector).to(like.device, like.dtype)
        new = float(torch.dot(hv, vector))
        history.append(new)
        norm = float(hv.norm())
        if norm == 0.0:
            eigenvalue = 0.0
            break
        vector = hv / norm
        if eigenvalue is not None and abs(new - eigenvalue) / (abs(eigenvalue) + 1e-6) < tol:
            eigenvalue = new
            break
        eigenvalue = new
    return LanczosResult(float(eigenvalue), len(history), math.nan, history, [], vector)
