"""The exact spectrum of a small symmetric operator: the dense matrix from products, then ``eigh``.

When ``A [n, n]`` fits in memory (``n`` up to a few thousand), :func:`dense_spectrum` forms it
column block by column block, ``A [e_i .. e_{i+b}]`` (one pass over the data per block for a
curvature operator, whatever ``b``), symmetrises it (``(A + A^T) / 2``: the products' rounding
is not symmetric) and diagonalises it in float64 on the host. Every eigenvalue is then known to
the products' own precision, so densities, traces, negative fractions and outliers are exact, not
estimated. :func:`eigenpairs` turns the spectrum into an :class:`EigenResult` whose residuals
``||A v - l v||`` are measured with one more product of the operator itself.

What a dense path costs: ``n`` product columns (``ceil(n / b)`` passes) and ``O(n^3)`` for
``eigh``; an iterative run of ``q`` product columns is cheaper when ``q < n``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from curvscope._diagnostics import Cost, Counted
from curvscope.linops._base import LinearOperator
from curvscope.linops._checks import check_symmetric
from curvscope.solvers._results import EigenResult

#: Columns per product when the dense matrix is formed (one data pass each).
DENSE_BLOCK = 64


@dataclass(frozen=True)
class DenseSpectrum:
    """All eigenpairs of a symmetric operator, from its dense matrix.

    Attributes:
        eigenvalues: ``[n]`` ascending, float64, host.
        eigenvectors: ``[n, n]`` orthonormal columns, float64, host.
        matrix: the symmetrised dense matrix ``[n, n]`` (float64, host); ``None`` when dropped.
        asymmetry: ``||A - A^T||_F / ||A||_F`` of the formed matrix: the products' rounding.
        cost: products, data passes and wall time (forming the matrix and ``eigh``).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    matrix: Tensor | None
    asymmetry: float
    cost: Cost


def dense_matrix(A: LinearOperator, block_size: int = DENSE_BLOCK) -> tuple[Tensor, float, Cost]:
    """``A`` as a dense symmetrised float64 host matrix, its relative asymmetry and the cost."""
    check_symmetric(A, "dense_matrix")
    n = A.shape[0]
    counted = Counted(A)
    M = torch.empty(n, n, dtype=torch.float64)
    for i in range(0, n, block_size):
        j = min(i + block_size, n)
        E = torch.zeros(n, j - i, dtype=A.dtype, device=A.device)
        E[torch.arange(i, j), torch.arange(j - i)] = 1
        M[:, i:j] = (counted @ E).to("cpu", torch.float64)
    norm = float(M.norm()) or 1.0
    asymmetry = float((M - M.T).norm()) / norm
    return (M + M.T) / 2, asymmetry, counted.cost()


def dense_spectrum(A: LinearOperator, *, block_size: int = DENSE_BLOCK,
                   keep_matrix: bool = False) -> DenseSpectrum:
    """Every eigenpair of ``A`` (see the module docstring): ``n`` product columns plus ``eigh``."""
    t0 = time.perf_counter()
    M, asymmetry, cost = dense_matrix(A, block_size)
    return spectrum_of(M, asymmetry, cost, t0, keep_matrix=keep_matrix)


def spectrum_of(M: Tensor, asymmetry: float, cost: Cost, t0: float, *,
                keep_matrix: bool = False) -> DenseSpectrum:
    """:class:`DenseSpectrum` of an already formed symmetric float64 matrix (``t0``: when its
    products started, for the wall time).
    """
    values, vectors = torch.linalg.eigh(M)
    total = Cost(cost.num_matvecs, cost.num_products, cost.num_data_passes,
                 time.perf_counter() - t0, cost.engines)
    return DenseSpectrum(values, vectors, M if keep_matrix else None, asymmetry, total)


def eigenpairs(A: LinearOperator, spectrum: DenseSpectrum, k: int, which: str = "LA",
               *, tol: float | None = None) -> EigenResult:
    """The ``k`` largest (``LA``, descending) or smallest (``SA``, ascending) eigenpairs of a
    :class:`DenseSpectrum`, with residuals measured by one product of ``A`` itself.

    ``converged`` is true for every pair: the decomposition is exact up to the products'
    rounding, which the residuals show. ``tol`` (default: the largest residual relative to
    ``||A||``, the scale of that rounding) is recorded for the reader.
    """
    if which not in ("LA", "SA"):
        raise ValueError(f"which must be 'LA' or 'SA' for an exact spectrum, got {which!r}.")
    n = spectrum.eigenvalues.numel()
    k = min(int(k), n)
    idx = torch.arange(n - 1, n - 1 - k, -1) if which == "LA" else torch.arange(k)
    values, vectors = spectrum.eigenvalues[idx], spectrum.eigenvectors[:, idx]
    counted = Counted(A)
    AV = (counted @ vectors.to(dtype=A.dtype, device=A.device)).to("cpu", torch.float64)
    residuals = (AV - vectors * values).norm(dim=0)
    extra = counted.cost()
    cost = Cost(spectrum.cost.num_matvecs + extra.num_matvecs,
                spectrum.cost.num_products + extra.num_products,
                spectrum.cost.num_data_passes + extra.num_data_passes,
                spectrum.cost.wall_time + extra.wall_time, extra.engines)
    scale = float(spectrum.eigenvalues.abs().max()) or 1.0
    recorded = float(residuals.max()) / scale if tol is None and k else (tol or 0.0)
    return EigenResult(values.to(A.dtype), vectors.to(A.dtype), residuals.to(A.dtype),
                       torch.ones(k, dtype=torch.bool), "dense eigh", which, recorded, 0, cost)
