"""Operators with explicit structure: dense, diagonal and low-rank ``V diag(l) V^T``."""

from __future__ import annotations

import torch
from torch import Tensor

from curvscope.linops._base import PSD, SYMMETRIC, LinearOperator


def _as_float_tensor(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {x.dtype}; use {name}.double().")
    return x


class DenseOperator(LinearOperator):
    """A dense matrix ``M`` as an operator.

    Tags are detected: symmetric when ``M == M^T`` to ``~100 eps``; ``psd`` is never guessed
    (pass ``tags`` to assert it).
    """

    def __init__(self, M: Tensor, *, tags: set[str] | frozenset[str] | None = None) -> None:
        M = _as_float_tensor(M, "M")
        if M.ndim != 2:
            raise ValueError(f"M must be a matrix [m, n], got shape {tuple(M.shape)}.")
        if tags is None:
            tags = set()
            if M.shape[0] == M.shape[1]:
                tol = 100 * torch.finfo(M.dtype).eps * float(M.abs().max())  # relative
                if bool((M - M.T).abs().max() <= tol):
                    tags.add(SYMMETRIC)
        super().__init__((M.shape[0], M.shape[1]), dtype=M.dtype, device=M.device, tags=tags)
        self.M = M

    def _matmat(self, X: Tensor) -> Tensor:
        return self.M @ X


class DiagonalOperator(LinearOperator):
    """``diag(d)``; tagged psd when every ``d_i >= 0``."""

    def __init__(self, d: Tensor) -> None:
        d = _as_float_tensor(d, "d")
        if d.ndim != 1:
            raise ValueError(f"d must be a vector [n], got shape {tuple(d.shape)}.")
        tags = {SYMMETRIC} | ({PSD} if bool((d >= 0).all()) else set())
        super().__init__((d.numel(), d.numel()), dtype=d.dtype, device=d.device, tags=tags)
        self.d = d

    def _matmat(self, X: Tensor) -> Tensor:
        return self.d.unsqueeze(1) * X


class LowRankOperator(LinearOperator):
    """``V diag(l) V^T`` for ``V`` of shape ``[n, r]`` and ``l`` of shape ``[r]``.

    This is what deflation subtracts and what sketches and Lanczos return.
    """

    def __init__(self, V: Tensor, eigenvalues: Tensor) -> None:
        V = _as_float_tensor(V, "V")
        eigenvalues = _as_float_tensor(eigenvalues, "eigenvalues")
        if V.ndim != 2 or eigenvalues.ndim != 1 or V.shape[1] != eigenvalues.shape[0]:
            raise ValueError(
                f"expected V [n, r] and eigenvalues [r], got {tuple(V.shape)} and "
                f"{tuple(eigenvalues.shape)}."
            )
        if V.dtype != eigenvalues.dtype or V.device != eigenvalues.device:
            raise ValueError(
                f"V ({V.dtype}, {V.device}) and eigenvalues ({eigenvalues.dtype}, "
                f"{eigenvalues.device}) must share dtype and device."
            )
        tags = {SYMMETRIC} | ({PSD} if bool((eigenvalues >= 0).all()) else set())
        n = V.shape[0]
        super().__init__((n, n), dtype=V.dtype, device=V.device, tags=tags)
        self.V, self.eigenvalues = V, eigenvalues

    def _matmat(self, X: Tensor) -> Tensor:
        return self.V @ (self.eigenvalues.unsqueeze(1) * (self.V.T @ X))
