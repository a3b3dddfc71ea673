"""Random orthonormal subspaces for Keskar's metric, drawn once per model, seed and size.

Keskar et al.'s ``A`` is an ``n x p`` matrix with random columns. Here its columns are an orthonormal basis of the
span of an ``n x p`` Gaussian matrix ``G``: ``Q = G R^-1`` with ``R`` the upper Cholesky factor of ``G^T G`` (the
``R`` of ``G = QR`` with a positive diagonal), so ``A^+ = A^T``. ``Q`` is never formed: ``G`` (one ``n x p`` matrix)
and the ``p x p`` factor ``R`` give ``Q y`` and ``Q^T g`` with a triangular solve each. Against a Householder QR of
``G`` this halves the build's arithmetic and needs one ``n x p`` matrix instead of three (the float64 draw, its
cast, ``Q``); the subspace is the same (column signs may differ, which the metric's symmetric box ignores).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = ["RandomSubspace", "random_subspace"]

# Rows drawn per call to the generator: bounds the float64 staging block (52 MB at p = 100).
_BLOCK_ROWS = 65536


class RandomSubspace:
    """Orthonormal coordinates ``Q`` (``n x dim``) of the span of a Gaussian matrix drawn from ``seed``.

    ``G`` is drawn in float64 from ``torch.Generator().manual_seed(seed)``, ``_BLOCK_ROWS`` rows at a time (for
    ``n`` up to 65,536 that is ``torch.randn(n, dim, dtype=torch.float64)``), and stored in ``dtype`` on
    ``device``; ``G^T G`` is accumulated in float64 from the stored values, so ``Q`` is orthonormal to float64
    accuracy whatever ``dtype`` is.

    Example:

    >>> basis = RandomSubspace(6, 2, seed=0, dtype=torch.float64, device="cpu")
    >>> q = basis.expand(torch.eye(2, dtype=torch.float64))  # columns of Q
    >>> identity = torch.eye(2, dtype=torch.float64)
    >>> torch.allclose(q.T @ q, identity), torch.allclose(basis.project(q[:, 0]), identity[0])
    (True, True)
    """

    def __init__(self, n: int, dim: int, seed: int, dtype: torch.dtype, device: torch.device | str):
        generator = torch.Generator().manual_seed(int(seed))
        self.gaussian = torch.empty(n, dim, dtype=dtype, device=device)
        gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        for start in range(0, n, _BLOCK_ROWS):
            block = torch.randn(min(_BLOCK_ROWS, n - start), dim, generator=generator, dtype=torch.float64)
            stored = self.gaussian[start : start + block.shape[0]]
            stored.copy_(block)
            exact = stored.double()
            gram += exact.T @ exact
        self.r = torch.linalg.cholesky(gram, upper=True)
        self.dtype = dtype

    @property
    def nbytes(self) -> int:
        """Memory the subspace holds."""
        return self.gaussian.numel() * self.gaussian.element_size() + self.r.numel() * self.r.element_size()

    def expand(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``Q @ coefficients`` (a ``dim`` vector, or ``dim x k``), in the stored dtype."""
        column = coefficients.reshape(coefficients.shape[0], -1).to(self.r.device, torch.float64)
        solved = torch.linalg.solve_triangular(self.r, column, upper=True)
        return (self.gaussian @ solved.to(self.dtype)).reshape(-1, *coefficients.shape[1:])

    def project(self, vector: torch.Tensor) -> torch.Tensor:
        """``Q^T @ vector`` (an ``n`` vector), in float64."""
        product = (self.gaussian.T @ vector.to(self.gaussian.device, self.dtype)).double().reshape(-1, 1)
        return torch.linalg.solve_triangular(self.r.T, product, upper=False).reshape(-1)


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, RandomSubspace]] = weakref.WeakKeyDictionary()


def random_subspace(
    model: nn.Module,
    n: int,
    dim: int,
    seed: int,
    dtype: torch.dtype,
    device: torch.device | str,
    cache: bool = True,
) -> RandomSubspace:
    """The :class:`RandomSubspace` for ``(n, dim, seed, dtype, device)``, built once and kept with ``model``.

    The subspace depends on nothing else (not on the parameters' values), so a kept one is exactly what a new
    build would give. One per model is kept, in a weak-keyed map: it goes when the model goes, or when a call with
    another key replaces it. ``cache=False`` builds a fresh one and keeps nothing.
    """
    key = (int(n), int(dim), int(seed), dtype, torch.device(device))
    if cache:
        entry = _CACHE.get(model)
        if entry is not None and entry[0] == key:
            return entry[1]
        _CACHE.pop(model, None)  # free the old one before building the next
    subspace = RandomSubspace(n, dim, seed, dtype, device)
    if cache:
        _CACHE[model] = (key, subspace)
    return subspace
