"""Restriction of an operator to a subset of coordinates (a principal submatrix)."""

from __future__ import annotations

import torch
from torch import Tensor

from curvscope.linops._base import LinearOperator


def _as_index(index: Tensor | slice | list[int], n: int, device: torch.device) -> Tensor:
    if isinstance(index, slice):
        return torch.tensor(range(n)[index], dtype=torch.long, device=device)
    if isinstance(index, (list, tuple)) and len(index) == 0:
        raise ValueError("index is empty: a restriction needs at least one coordinate.")
    idx = torch.as_tensor(index, device=device)
    if idx.dtype == torch.bool:
        if idx.shape != (n,):
            raise ValueError(f"a boolean mask must have shape [{n}], got {tuple(idx.shape)}.")
        return idx.nonzero().squeeze(1)
    if idx.ndim != 1 or idx.is_floating_point():
        raise ValueError(f"index must be a 1-D integer tensor, slice or list, got {index!r}.")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"index out of range for an operator of size {n}.")
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError("index contains duplicates; a principal submatrix needs distinct indices.")
    return idx


class RestrictedOperator(LinearOperator):
    """The principal submatrix ``P^T A P`` where ``P`` selects the coordinates ``index``.

    Each product embeds ``X`` in zeros, applies ``A`` and reads the selected rows back, so it
    costs one product with ``A``. Symmetry and positive semi-definiteness are inherited.
    """

    def __init__(self, A: LinearOperator, index: Tensor | slice | list[int]) -> None:
        if A.shape[0] != A.shape[1]:
            raise ValueError(f"restriction needs a square operator, got shape {A.shape}.")
        self.A = A
        self.index = _as_index(index, A.shape[0], A.device)
        r = self.index.numel()
        super().__init__((r, r), dtype=A.dtype, device=A.device, tags=A.tags)

    def children(self) -> tuple[LinearOperator, ...]:
        return (self.A,)

    def _matmat(self, X: Tensor) -> Tensor:
        full = X.new_zeros(self.A.shape[1], X.shape[1])
        full[self.index] = X
        return (self.A @ full)[self.index]
