"""Checks of the operators handed to algorithms, the one implementation every solver and
estimator calls, with messages that say what was expected, what came and the fix.
"""

from __future__ import annotations

from curvscope.linops._base import LinearOperator

__all__ = ["check_square_operator", "check_symmetric"]


def check_square_operator(A: object, who: str) -> LinearOperator:
    """Return ``A`` if it is a non-empty square :class:`LinearOperator`; raise otherwise."""
    if not isinstance(A, LinearOperator):
        raise TypeError(
            f"{who} needs a curvscope LinearOperator, got {type(A).__name__}; wrap a matrix with "
            "curvscope.linops.DenseOperator(M)."
        )
    m, n = A.shape
    if m != n:
        raise ValueError(f"{who} needs a square operator, got shape {A.shape}; traces, "
                         "diagonals and eigenvalues are only defined for square matrices.")
    if n < 1:
        raise ValueError(f"{who} needs a non-empty operator, got shape {A.shape}.")
    return A


def check_symmetric(A: object, who: str) -> LinearOperator:
    """Return ``A`` if it is a non-empty square :class:`LinearOperator` tagged symmetric."""
    A = check_square_operator(A, who)
    if not A.is_symmetric:
        raise ValueError(
            f"{who} needs a symmetric operator; got tags {sorted(A.tags) or '{}'}. If you know "
            "the matrix is symmetric, build it as DenseOperator(M, tags={'symmetric'})."
        )
    return A
