"""Outliers vs bulk, subspace overlaps, and the bulk's tail exponent.

The outlier rule (eigengap): for the top eigenvalues ``l_1 >= ... >= l_K`` (positive ones), the
outliers are ``l_1 .. l_j`` for the ``j`` with the **largest** gap ratio ``l_j / l_{j+1}``,
provided it is at least ``threshold`` (default 1.5). With no such gap there are no outliers. Other
gaps above the threshold are listed too: Papyan's hierarchy puts a second, smaller gap after the
``C (C - 1)`` cross-class "mini-bulk". The bulk edge is ``l_{j+1}``; when a deflated SLQ density
is given, its upper spectral bound is reported beside it as a consistency check (it should equal
``l_{j+1}``).

Overlaps follow Fernandez et al. 2025: for orthonormal ``U [D, k]``, ``V [D, r]``,
``ov = ||U^T V||_F^2 / min(k, r)`` (1 for nested subspaces, ``max(k, r)/D`` by chance); for a mask
``M`` of ``m`` coordinates, ``ov = (1/k) sum_{j in M} ||U[j, :]||^2`` with chance ``m / D``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

DEFAULT_THRESHOLD = 1.5


@dataclass(frozen=True)
class OutlierSplit:
    """How many top eigenvalues stand out of the bulk, by the documented eigengap rule."""

    count: int
    gap_ratio: float
    threshold: float
    bulk_edge: float
    bulk_edge_slq: float | None
    rule: str = "j with the largest gap ratio l_j / l_(j+1) >= threshold among the top eigenvalues"
    other_gaps: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        gaps = tuple((int(j), float(r)) for j, r in self.other_gaps)
        object.__setattr__(self, "other_gaps", gaps)

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON."""
        out = dict(self.__dict__)
        out["other_gaps"] = [list(g) for g in self.other_gaps]
        return out


def find_outliers(eigenvalues: Tensor, *, threshold: float = DEFAULT_THRESHOLD,
                  bulk_upper_bound: float | None = None) -> OutlierSplit:
    """Split the top eigenvalues (any order) into outliers and bulk by the eigengap rule."""
    if threshold <= 1:
        raise ValueError(f"threshold must be > 1 (a ratio of eigenvalues), got {threshold}.")
    lam = eigenvalues.detach().to("cpu", torch.float64).sort(descending=True).values
    lam = lam[lam > 0]
    if lam.numel() < 2:
        edge = float(lam[-1]) if lam.numel() else 0.0
        return OutlierSplit(0, 1.0, threshold, edge, bulk_upper_bound)
    ratios = lam[:-1] / lam[1:]
    j = int(torch.argmax(ratios))
    if float(ratios[j]) < threshold:
        return OutlierSplit(0, float(ratios.max()), threshold, float(lam[0]), bulk_upper_bound)
    others = tuple((int(i) + 1, float(ratios[i])) for i in (ratios >= threshold).nonzero()
                   .squeeze(1).tolist() if i != j)
    return OutlierSplit(j + 1, float(ratios[j]), threshold, float(lam[j + 1]), bulk_upper_bound,
                        other_gaps=others)


def subspace_overlap(U: Tensor, V: Tensor) -> float:
    """Grassmannian overlap ``||U^T V||_F^2 / min(k, r)`` of two orthonormal bases."""
    if U.shape[0] != V.shape[0]:
        raise ValueError(f"bases of different dimension: {tuple(U.shape)} and {tuple(V.shape)}.")
    k, r = U.shape[1], V.shape[1]
    if min(k, r) == 0:
        return 0.0
    M = U.T.to(torch.float64) @ V.to(torch.float64)
    return float((M**2).sum() / min(k, r))


def mask_overlap(U: Tensor, mask: Tensor) -> tuple[float, float]:
    """Overlap of a parameter mask with the eigenspace ``U [D, k]`` and its chance level.

    ``ov = (1/k) sum_{j in M} ||U[j, :]||^2``; chance ``m / D`` for ``m`` masked coordinates.

    References:
        Fernandez, Schneider, Mahsereci, Hennig, "Connecting parameter magnitudes and Hessian
        eigenspaces at scale using sketched methods" (2025, arXiv:2504.14701).
    """
    mask = mask.to(torch.bool).reshape(-1)
    if mask.numel() != U.shape[0]:
        raise ValueError(f"mask has {mask.numel()} entries, the eigenvectors {U.shape[0]}.")
    k = U.shape[1]
    ov = float((U[mask.to(U.device)].to(torch.float64) ** 2).sum() / k)
    return ov, float(mask.sum()) / mask.numel()


def top_magnitude_mask(theta: Tensor, m: int) -> Tensor:
    """Boolean mask of the ``m`` largest-magnitude entries of a flat parameter vector."""
    mask = torch.zeros(theta.numel(), dtype=torch.bool, device=theta.device)
    mask[theta.abs().reshape(-1).topk(m).indices] = True
    return mask


@dataclass(frozen=True)
class PowerLawFit:
    """``l_j ~ a j^(-alpha)`` on the ranked bulk eigenvalues: exponent with its standard error."""

    exponent: float
    std_error: float
    num_points: int

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON."""
        return dict(self.__dict__)


def fit_power_law(eigenvalues: Tensor) -> PowerLawFit:
    """Least-squares fit of ``log l_j = log a - alpha log j`` over positive ranked eigenvalues.

    The standard error is the usual OLS one, ``s / sqrt(sum (x - mean x)^2)``.
    """
    lam = eigenvalues.detach().to("cpu", torch.float64).sort(descending=True).values
    lam = lam[lam > 0]
    n = lam.numel()
    if n < 3:
        raise ValueError(f"a power-law fit needs at least 3 positive eigenvalues, got {n}.")
    x = torch.log(torch.arange(1, n + 1, dtype=torch.float64))
    y = torch.log(lam)
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc**2).sum())
    resid = y - y.mean() - slope * xc
    s = math.sqrt(float((resid**2).sum()) / (n - 2))
    return PowerLawFit(-slope, s / math.sqrt(float((xc**2).sum())), n)
