"""Outliers vs bulk, subspace overlaps, and the bulk's tail exponent.

The outlier rule (eigengap): for the top eigenvalues ``l_1 >= ... >= l_K`` (positive ones), the
outliers are ``l_1 .. l_j`` for the ``j`` with the **largest** gap ratio ``l_j / l_{j+1}``,
provided it is at least ``threshold`` (default 1.5); below it, a gap that stands several times
above the bulk's own spacing still counts, as "probable" (:func:`find_outliers`). With no such
gap there are no outliers and no bulk edge. Other
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


#: A gap this many times the bulk's typical log gap ratio is an outlier gap even below the
#: threshold (the second rule).
RELATIVE_GAP = 4.0
#: ... provided the ratio itself is at least this.
MIN_RELATIVE_RATIO = 1.1
#: Eigenvalues needed below a split to measure the bulk's typical gap.
MIN_TAIL = 3
#: The bulk's spacing is measured on the next this-many gaps below a split (local: a power-law
#: bulk's ratios shrink down the ranks, and its top gap is no outlier).
BULK_WINDOW = 5


@dataclass(frozen=True)
class OutlierSplit:
    """How many top eigenvalues stand out of the bulk, by the documented eigengap rules.

    ``confidence`` says which rule found them: ``"clear"`` (a gap ratio at least ``threshold``),
    ``"probable"`` (a gap well above the bulk's typical ratio, but below ``threshold``) or
    ``"none"``; ``evidence`` says why in words. ``bulk_edge`` is ``l_(count+1)``, and ``None``
    with no outliers (no edge is drawn at the top eigenvalue).
    """

    count: int
    gap_ratio: float
    threshold: float
    bulk_edge: float | None
    bulk_edge_slq: float | None
    rule: str = ("j with the largest gap ratio l_j / l_(j+1) >= threshold; else a gap "
                 f"{RELATIVE_GAP:g}x the bulk's local median log gap ratio (at j = C - 1 or C when the "
                 "C classes are known)")
    other_gaps: tuple[tuple[int, float], ...] = ()
    confidence: str = "clear"
    evidence: str = ""

    def __post_init__(self) -> None:
        gaps = tuple((int(j), float(r)) for j, r in self.other_gaps)
        object.__setattr__(self, "other_gaps", gaps)

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON."""
        out = dict(self.__dict__)
        out["other_gaps"] = [list(g) for g in self.other_gaps]
        return out


def find_outliers(eigenvalues: Tensor, *, threshold: float = DEFAULT_THRESHOLD,
                  bulk_upper_bound: float | None = None,
                  num_classes: int | None = None,
                  relative_gap: float | None = RELATIVE_GAP) -> OutlierSplit:
    """Split the top eigenvalues (any order) into outliers and bulk.

    Rule 1 (``"clear"``): the ``j`` with the largest gap ratio ``l_j / l_(j+1)``, when it is at
    least ``threshold``. Rule 2 (``"probable"``), when no ratio reaches it: a gap whose
    ``log(l_j / l_(j+1))`` is at least :data:`RELATIVE_GAP` times the median of the next
    :data:`BULK_WINDOW` log ratios below it (the bulk's own local spacing, at least
    :data:`MIN_TAIL` of them) and whose
    ratio is at least :data:`MIN_RELATIVE_RATIO`; with ``num_classes`` ``C`` known, a gap at
    ``j = C - 1`` or ``C`` (Papyan's ``C`` class outliers, ``C - 1`` under softmax) is taken
    first. A densely spaced real-network spectrum (ratios ~1.02 in the bulk) with a 1.3 gap
    after the class outliers is found by rule 2; a smoothly decaying one has no outliers.
    ``relative_gap=None`` keeps rule 1 only (the threshold alone decides).
    """
    if threshold <= 1:
        raise ValueError(f"threshold must be > 1 (a ratio of eigenvalues), got {threshold}.")
    lam = eigenvalues.detach().to("cpu", torch.float64).sort(descending=True).values
    lam = lam[lam > 0]
    if lam.numel() < 2:
        return OutlierSplit(0, 1.0, threshold, None, bulk_upper_bound, confidence="none",
                            evidence="fewer than two positive top eigenvalues")
    ratios = lam[:-1] / lam[1:]
    j = int(torch.argmax(ratios))
    if float(ratios[j]) >= threshold:
        others = tuple((int(i) + 1, float(ratios[i])) for i in (ratios >= threshold).nonzero()
                       .squeeze(1).tolist() if i != j)
        return OutlierSplit(j + 1, float(ratios[j]), threshold, float(lam[j + 1]),
                            bulk_upper_bound, other_gaps=others, confidence="clear",
                            evidence=f"gap ratio {float(ratios[j]):.2f} >= {threshold:g} "
                                     f"after rank {j + 1}")
    found = None if relative_gap is None else _relative_gap(ratios, num_classes, relative_gap)
    if found is None:
        return OutlierSplit(0, float(ratios.max()), threshold, None, bulk_upper_bound,
                            confidence="none",
                            evidence=f"no gap ratio reaches {threshold:g} (largest "
                                     f"{float(ratios.max()):.2f}) and none stands out of the "
                                     "bulk's own spacing")
    i, score, by_classes = found
    why = f"gap ratio {float(ratios[i]):.2f} after rank {i + 1} is {score:.1f}x the bulk's " \
          "local typical gap"
    if by_classes:
        why += f", at the class count (C = {num_classes})"
    return OutlierSplit(i + 1, float(ratios[i]), threshold, float(lam[i + 1]), bulk_upper_bound,
                        confidence="probable", evidence=why)


def _relative_gap(ratios: Tensor, num_classes: int | None, factor: float
                  ) -> tuple[int, float, bool] | None:
    """The index, score and class-count flag of rule 2's gap (``None``: none qualifies)."""
    logs = ratios.log()
    scores: dict[int, float] = {}
    for i in range(len(logs) - MIN_TAIL + 1):
        tail = logs[i + 1 : i + 1 + BULK_WINDOW]
        typical = float(tail.median())
        if float(ratios[i]) < MIN_RELATIVE_RATIO:
            continue
        score = float(logs[i]) / max(typical, 1e-12)
        if score >= factor:
            scores[i] = score
    if not scores:
        return None
    if num_classes:
        at_classes = [i for i in scores if i + 1 in (num_classes - 1, num_classes)]
        if at_classes:
            i = max(at_classes, key=lambda c: scores[c])
            return i, scores[i], True
    i = max(scores, key=lambda c: scores[c])
    return i, scores[i], False


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
