"""Randomized diagonal estimators: Hutchinson (Bekas et al.) and XDiag (Epperly et al.).

Both return a :class:`DiagonalEstimate`: the ``[n]`` estimate of ``diag(A)``, a per-entry
standard error, and the exact :class:`~curvscope._diagnostics.Cost`. ``hutchinson_diagonal``
takes one product call, ``xdiag`` two (``A Omega``, then ``A Q``), with ``block_size=None``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvscope._diagnostics import Cost, Counted
from curvscope.estimators.trace import (
    check_blocks,
    leave_one_out_directions,
    num_test_vectors,
    orthonormal_basis,
    probes_for,
    validate_trace_input,
)
from curvscope.linops._base import LinearOperator

__all__ = ["DiagonalEstimate", "hutchinson_diagonal", "xdiag"]


@dataclass(frozen=True)
class DiagonalEstimate:
    """A randomized estimate of ``diag(A)`` with per-entry standard errors.

    Attributes:
        diagonal: ``[n]`` on the operator's device and dtype; the mean of the per-probe samples.
        std_error: ``[n]``, ``std(samples, ddof=1) / sqrt(num_probes)`` per entry (``nan`` for a
            single probe), or ``None`` when not available.
        method: ``"hutchinson"`` or ``"xdiag"``.
        num_probes: the number of samples averaged per entry.
        cost: products, product calls, data passes and wall time.
    """

    diagonal: Tensor
    std_error: Tensor | None
    method: str
    num_probes: int
    cost: Cost

    @property
    def trace(self) -> float:
        """``sum_i diagonal_i``, the implied trace estimate."""
        return float(self.diagonal.sum())

    def block_sums(self, blocks: Mapping[str, slice]) -> dict[str, float]:
        """``{name: sum(diagonal[s])}`` for named unit-step slices, e.g. ``H.param_space.blocks()``.

        Raises:
            TypeError: ``blocks`` is not a mapping of slices.
            ValueError: a slice has a step other than 1 or lies outside ``[0, n]``.
        """
        ranges = check_blocks(blocks, self.diagonal.numel(), "block_sums")
        if not ranges:
            return {}
        sums = torch.stack([self.diagonal[a:b].sum() for a, b in ranges.values()])
        return dict(zip(ranges, sums.to("cpu", torch.float64).tolist()))

    def to_dict(self, *, include_values: bool = True) -> dict[str, Any]:
        """Plain numbers and lists for JSON.

        Args:
            include_values: put the ``n`` entries of ``diagonal`` and ``std_error`` in the dict
                (turn off for large models and save the tensors with ``torch.save``).
        """
        out: dict[str, Any] = {"method": self.method, "num_probes": int(self.num_probes),
                               "n": int(self.diagonal.numel()), "trace": self.trace,
                               **self.cost.to_dict()}
        if include_values:
            out["diagonal"] = self.diagonal.detach().to("cpu", torch.float64).tolist()
            out["std_error"] = (None if self.std_error is None else
                                self.std_error.detach().to("cpu", torch.float64).tolist())
        return out

    def __str__(self) -> str:
        err = ("" if self.std_error is None else
               f", median std error {float(self.std_error.median()):.2g}")
        return (f"diag: {self.diagonal.numel()} entries, sum {self.trace:.6g}{err} "
                f"({self.method}, {self.cost.num_matvecs} products)")


def _estimate(D: Tensor, method: str, counted: Counted) -> DiagonalEstimate:
    """Mean and per-row standard error of the ``[n, k]`` per-sample estimates ``D``."""
    k = D.shape[1]
    if k < 2:
        err = torch.full_like(D[:, 0], math.nan)
    else:
        err = D.std(dim=1, correction=1) / math.sqrt(k)
    return DiagonalEstimate(D.mean(dim=1), err, method, k, counted.cost())


def hutchinson_diagonal(
    A: LinearOperator,
    num_matvecs: int,
    *,
    distribution: str = "rademacher",
    block_size: int | None = None,
    generator: torch.Generator | None = None,
) -> DiagonalEstimate:
    """Hutchinson-type estimate of ``diag(A)``: the mean of ``z ⊙ A z`` over random probes.

    .. math:: d = \\frac{1}{m}\\sum_{j=1}^m z_j \\odot A z_j, \\qquad E[z z^\\top] = I,

    so ``E[d_i] = A_ii``; with Rademacher probes ``Var(d_i) = (1/m) sum_{l != i} A_il^2`` and the
    estimate is exact on diagonal matrices. The per-entry error is ``std(ddof=1) / sqrt(m)``.

    Args:
        A: a square :class:`~curvscope.linops.LinearOperator` ``[n, n]``.
        num_matvecs: the number of probes ``m >= 1``.
        distribution: ``"rademacher"`` (default), ``"gaussian"`` or ``"sphere"``.
        block_size: at most this many columns per product call (default: all in one call).
        generator: a ``torch.Generator`` for the probes.

    Returns:
        A :class:`DiagonalEstimate` with ``method="hutchinson"``.

    Raises:
        TypeError: ``A`` is not a LinearOperator, ``generator`` is not a torch.Generator, or
            ``num_matvecs``/``block_size`` is not an int.
        ValueError: ``A`` is not square, ``num_matvecs < 1``, or ``distribution`` is unknown.

    Example:
        >>> import torch
        >>> from curvscope.linops import DiagonalOperator
        >>> A = DiagonalOperator(torch.tensor([1.0, -2.0, 5.0], dtype=torch.float64))
        >>> hutchinson_diagonal(A, 3).diagonal.tolist()
        [1.0, -2.0, 5.0]

    References:
        C. Bekas, E. Kokiopoulou, Y. Saad (2007), "An estimator for the diagonal of a matrix",
        Appl. Numer. Math. 57(11-12); M. F. Hutchinson (1989), Commun. Stat. Simul. Comput.
        18(3).
    """
    who = "hutchinson_diagonal"
    A, m, block_size = validate_trace_input(A, num_matvecs, 1, who, distribution, block_size, generator)
    counted = Counted(A)
    Z = probes_for(A, m, distribution, generator)
    return _estimate(Z * counted.matmat_blocked(Z, block_size), "hutchinson", counted)


def xdiag(
    A: LinearOperator,
    num_matvecs: int,
    *,
    block_size: int | None = None,
    generator: torch.Generator | None = None,
) -> DiagonalEstimate:
    """XDiag: a low-rank diagonal plus Hutchinson on the remainder, each vector left out in turn.

    With ``k = floor(m/2)`` Rademacher test vectors ``Omega``, ``Y = A Omega = Q R``, ``Z = A Q``
    and the leave-one-out projectors ``P_i = Q (I - s_i s_i^T) Q^T`` (``s_i`` the unit columns of
    ``R^{-T}``), each test vector gives

    .. math:: d_i = diag(P_i A) + w_i \\odot (I - P_i) A w_i,

    and ``d = mean(d_i)``; per entry, error ``std(d_i) / sqrt(k)``. Here
    ``diag(P_i A) = diag(Q Z^T) - (Q s_i) ⊙ (Z s_i)`` and ``(I - P_i) A w_i = Y_i - Q (I - s_i s_i^T)
    Q^T Y_i``, so two product calls suffice. Each ``d_i`` is unbiased; the estimate is exact when
    ``rank(A) < k``. ``A`` must be symmetric (``Z = A Q`` stands for ``A^T Q``). An odd
    ``num_matvecs`` leaves one product unspent.

    Args:
        A: a square symmetric :class:`~curvscope.linops.LinearOperator` ``[n, n]``.
        num_matvecs: the budget ``m`` with ``2 <= m <= 2n``; ``2 * floor(m/2)`` products are spent.
        block_size: at most this many columns per product call (default: one call per stage).
        generator: a ``torch.Generator`` for ``Omega``.

    Returns:
        A :class:`DiagonalEstimate` with ``method="xdiag"`` and ``num_probes = k``.

    Raises:
        TypeError: as :func:`hutchinson_diagonal`.
        ValueError: ``A`` is not square or not tagged symmetric, or ``num_matvecs < 2`` or
            ``> 2n``.

    Example:
        >>> import torch
        >>> from curvscope.linops import LowRankOperator
        >>> V = torch.linalg.qr(torch.randn(40, 2, dtype=torch.float64))[0]
        >>> A = LowRankOperator(V, torch.tensor([3.0, -1.0], dtype=torch.float64))
        >>> est = xdiag(A, 8, generator=torch.Generator().manual_seed(0))  # k = 4 > rank
        >>> bool(torch.allclose(est.diagonal, (V * V) @ torch.tensor([3.0, -1.0],
        ...      dtype=torch.float64), rtol=0, atol=1e-12))
        True

    References:
        E. N. Epperly, J. A. Tropp, R. J. Webber (2024), "XTrace: Making the Most of Every Sample
        in Stochastic Trace Estimation", SIAM J. Matrix Anal. Appl. 45(1), arXiv:2301.07825
        (Section 4, XDiag; the authors' ``xdiag.m``); R. A. Baston, Y. Nakatsukasa (2022),
        "Stochastic diagonal estimation: probabilistic bounds and an improved algorithm",
        arXiv:2201.10684 (Diag++).
    """
    who = "xdiag"
    A, m, block_size = validate_trace_input(A, num_matvecs, 2, who, "rademacher", block_size, generator,
                                 "two products per test vector")
    if not A.is_symmetric:
        raise ValueError(f"{who} needs a symmetric operator; got tags {sorted(A.tags) or '{}'}. "
                         "If the matrix is symmetric, build it as DenseOperator(M, "
                         "tags={'symmetric'}); otherwise use hutchinson_diagonal.")
    k = num_test_vectors(m, A.shape[0], who)
    counted = Counted(A)
    Omega = probes_for(A, k, "rademacher", generator)
    Y = counted.matmat_blocked(Omega, block_size)
    Q, R = orthonormal_basis(Y)
    Z = counted.matmat_blocked(Q, block_size)
    S = leave_one_out_directions(R)
    T = Z.T @ Omega                                  # Q^T A Omega
    QS, ZS = Q @ S, Z @ S
    low_rank = (Q * Z).sum(1, keepdim=True) - QS * ZS           # diag(P_i A), column i
    residual = Y - Q @ (T - S * (S * T).sum(0))                # (I - P_i) A w_i
    return _estimate(low_rank + Omega * residual, "xdiag", counted)
