"""Further report sections computed from analyses: train vs test, parameter-mask overlap.

Each function returns a section dataclass with its ``kind`` and its ``summary`` sentences; the
report draws the section by its type (:data:`curvscope.report.plots.SECTION_PLOTS`) and prints
its ``summary`` as given, so the sentences and the figure say the same (the report computes
nothing). The sweeps of :mod:`curvscope.analysis.sweeps` (:class:`Sweep`) are sections too;
:data:`SECTION_TYPES` names every kind, so a saved bundle reads each section back as its class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvscope.analysis.formatting import with_error
from curvscope.analysis.outliers import mask_overlap, top_magnitude_mask
from curvscope.analysis.spectrum import SpectrumAnalysis
from curvscope.analysis.sweeps import Sweep


@dataclass(frozen=True)
class TraceEntry:
    """A trace with its 95 % interval's half-width (zero and ``exact`` for a dense spectrum)."""

    value: float
    half_width_95: float
    exact: bool

    @classmethod
    def of(cls, a: SpectrumAnalysis) -> TraceEntry:
        """The trace of ``a`` with its 95 % interval."""
        tr, half = a.trace_interval()
        return cls(tr, half, bool(a.density.exact))

    def __str__(self) -> str:
        if self.exact:
            return f"{self.value:.4g} (exact)"
        return f"{with_error(self.value, self.half_width_95)} (95%)"


@dataclass(frozen=True)
class TrainVsTest:
    """The top eigenvalues, outliers and traces on training and held-out data, side by side."""

    k: int
    train_top: list[float]
    test_top: list[float]
    train_outliers: int
    test_outliers: int
    train_outlier_confidence: str
    test_outlier_confidence: str
    train_bulk_edge: float | None
    test_bulk_edge: float | None
    train_trace: TraceEntry
    test_trace: TraceEntry
    top_ratio: float
    summary: list[str]
    kind: str = "train_vs_test"
    title: str | None = None


@dataclass(frozen=True)
class MaskOverlap:
    """The top eigenspace's weight on the largest-magnitude parameters, by mask size."""

    k: int
    num_params: int
    mask: str
    mask_sizes: list[int]
    overlap: list[float]
    chance: list[float]
    summary: list[str]
    kind: str = "mask_overlap"
    title: str | None = None


#: Every kind of section and its class (what a saved section is read back as).
SECTION_TYPES: dict[str, type] = {
    "sample_size": Sweep, "checkpoints": Sweep, "sweep": Sweep,
    "train_vs_test": TrainVsTest, "mask_overlap": MaskOverlap,
}
#: A section: one of :data:`SECTION_TYPES`, or a caller's own dict.
Section = Sweep | TrainVsTest | MaskOverlap | dict


def section_summary(section: Any) -> list[str]:
    """The summary sentences of any section (a caller's dict may have none)."""
    if isinstance(section, dict):
        summary = section.get("summary", [])
        return [str(t) for t in summary] if isinstance(summary, list) else []
    return list(getattr(section, "summary", []))


def _count(a: SpectrumAnalysis) -> str:
    """The outlier count with the rule's confidence ("2 (clear)", "5 (probable)", "0")."""
    split = a.outliers
    return f"{split.count} ({split.confidence})" if split.count else "0"


def train_vs_test(train: SpectrumAnalysis, test: SpectrumAnalysis, k: int = 20
                  ) -> TrainVsTest:
    """The top ``k`` eigenvalues, outlier counts and traces of the Hessian on the training data
    and on held-out data, side by side (Papyan 2020 Sec. 8: the outliers are a property of the
    class structure, seen on test data too).
    """
    k = min(k, train.top.eigenvalues.numel(), test.top.eigenvalues.numel())
    tr_top = train.top.eigenvalues[:k].to(torch.float64)
    te_top = test.top.eigenvalues[:k].to(torch.float64)
    ratio = float(te_top[0] / tr_top[0]) if float(tr_top[0]) != 0 else math.nan
    trace_train, trace_test = TraceEntry.of(train), TraceEntry.of(test)
    summary = [
        f"Largest eigenvalue on test data {float(te_top[0]):.3g} vs {float(tr_top[0]):.3g} on "
        f"the training data ({ratio:.2f}x); outliers: {_count(test)} on test, "
        f"{_count(train)} on train.",
        f"Trace on test {trace_test} vs train {trace_train}.",
    ]
    return TrainVsTest(
        k=k, train_top=tr_top.tolist(), test_top=te_top.tolist(),
        train_outliers=train.outliers.count, test_outliers=test.outliers.count,
        train_outlier_confidence=train.outliers.confidence,
        test_outlier_confidence=test.outliers.confidence,
        train_bulk_edge=train.outliers.bulk_edge, test_bulk_edge=test.outliers.bulk_edge,
        train_trace=trace_train, test_trace=trace_test, top_ratio=ratio, summary=summary)


def mask_overlap_curve(analysis: SpectrumAnalysis, theta: Tensor, *, points: int = 8
                       ) -> MaskOverlap:
    """How much of the top eigenspace lies on the largest-magnitude parameters, for masks of
    growing size (Fernandez et al. 2025, "Connecting parameter magnitudes and Hessian
    eigenspaces at scale using sketched methods"): the overlap
    ``(1/r) sum_{j in M_m} ||U[j, :]||^2`` of the top-``m`` magnitude mask with the top ``r``
    eigenvectors (``r`` the number of outliers, at least 1), against chance ``m / P``.
    """
    if analysis.top.eigenvectors is None:
        raise ValueError("the analysis kept no eigenvectors; the mask overlap needs them.")
    theta = theta.reshape(-1)
    P = theta.numel()
    r = max(analysis.outliers.count, 1)
    U = analysis.top.eigenvectors[:, :r]
    sizes = sorted({max(1, int(round(P * f))) for f in
                    torch.logspace(math.log10(max(r, 1) / P), math.log10(0.5), points).tolist()})
    overlaps, chances = [], []
    for m in sizes:
        ov, chance = mask_overlap(U, top_magnitude_mask(theta, m))
        overlaps.append(ov)
        chances.append(chance)
    at = min(range(len(sizes)), key=lambda i: abs(sizes[i] / P - 0.1))
    lift = overlaps[at] / chances[at] if chances[at] else math.nan
    summary = [f"The top-{r} eigenspace puts {overlaps[at]:.0%} of its weight on the "
               f"{sizes[at]:,} largest-magnitude parameters ({sizes[at] / P:.0%} of them; "
               f"{lift:.2f}x chance)."]
    return MaskOverlap(k=r, num_params=P, mask="largest-magnitude parameters",
                       mask_sizes=sizes, overlap=overlaps, chance=chances, summary=summary)
