"""Planted spectra: symmetric matrices with a chosen spectrum, dense or matrix-free.

Eigensolvers and density estimators are tested against these: compare eigenvalues and residuals
``||A v - l v||``, never raw eigenvectors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from curvscope.linops._base import PSD, SYMMETRIC, LinearOperator

_F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class PlantedOperator(LinearOperator):
    """Matrix-free ``A = H diag(l) H^T`` with ``H = H_1 ... H_r`` a product of random
    Householder reflections ``H_i = I - 2 u_i u_i^T``.

    Any spectrum ``l`` at ``O(n r)`` per column, so ``n = 10^5`` needs no ``n x n`` matrix.
    Eigenvectors: ``H e_i`` (:meth:`eigenvectors`). Float64 on the CPU; tagged psd when every
    ``l_i >= 0`` (or as ``psd`` says).

    Example:
        >>> A = PlantedOperator(torch.tensor([3.0, 1.0, -2.0]))
        >>> torch.allclose(torch.linalg.eigvalsh(A.to_dense()),
        ...                torch.tensor([-2.0, 1.0, 3.0], dtype=torch.float64))
        True
    """

    def __init__(self, eigenvalues: Tensor, *, num_reflections: int = 3, seed: int = 0,
                 psd: bool | None = None) -> None:
        lam = eigenvalues.to(_F64)
        psd = bool((lam >= 0).all()) if psd is None else psd
        tags = {SYMMETRIC} | ({PSD} if psd else set())
        super().__init__((lam.numel(), lam.numel()), dtype=_F64, device="cpu", tags=tags)
        U = torch.randn(lam.numel(), num_reflections, generator=_gen(1000 + seed), dtype=_F64)
        self.U = U / U.norm(dim=0)
        self.eigenvalues = lam

    def _reflect(self, X: Tensor, order: Iterable[int]) -> Tensor:
        for i in order:
            u = self.U[:, i : i + 1]
            X = X - 2 * u @ (u.T @ X)
        return X

    def apply_H(self, X: Tensor) -> Tensor:
        """``H X``."""
        return self._reflect(X, reversed(range(self.U.shape[1])))

    def _matmat(self, X: Tensor) -> Tensor:
        Y = self._reflect(X, range(self.U.shape[1]))  # H^T X
        return self.apply_H(self.eigenvalues.unsqueeze(1) * Y)

    def eigenvectors(self, index: Sequence[int]) -> Tensor:
        """The eigenvectors ``H e_i`` for ``i`` in ``index``, as columns ``[n, len(index)]``."""
        E = torch.zeros(self.shape[0], len(index), dtype=_F64)
        E[torch.as_tensor(index), torch.arange(len(index))] = 1.0
        return self.apply_H(E)


def planted_matrix(eigenvalues: Tensor, seed: int = 0) -> Tensor:
    """Dense ``Q diag(l) Q^T`` with a Haar-random orthogonal ``Q`` (float64, exactly symmetric)."""
    n = eigenvalues.numel()
    Q = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed), dtype=_F64))[0]
    M = (Q * eigenvalues.to(_F64)) @ Q.T
    return (M + M.T) / 2
