"""The numbers a report shows, computed once from an analysis (the report prints them as given).

:func:`key_numbers` gathers, as a :class:`KeyNumbers`, every headline figure of a
:class:`~curvscope.analysis.spectrum.SpectrumAnalysis` with its error bar or residual (the trace
with its standard error and 95 % interval, the resolvable negative part, the extreme eigenvalues,
the outlier split, Papyan's terms); :func:`total_cost` adds up the products, data passes and
wall time of the parts. ``result.json`` holds them (:meth:`KeyNumbers.to_dict`); the HTML page
and ``compare`` read them back typed (:meth:`KeyNumbers.from_dict`), so one figure is told the
same way everywhere and no view looks up keys of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from curvscope._diagnostics import Cost
from curvscope.analysis.class_structure import TERMS
from curvscope.analysis.outliers import OutlierSplit, PowerLawFit
from curvscope.analysis.spectrum import SpectrumAnalysis
from curvscope.estimators.slq import SpectralDensity
from curvscope.solvers._results import EigenResult

__all__ = ["Eigenvalue", "Estimate", "KeyNumbers", "TermSpectrum", "TraceNumbers",
           "eigenpair_table", "key_numbers", "total_cost", "trace_numbers"]

#: The parts of an analysis that carry a cost, in report order.
COSTED_PARTS = ("top", "bottom", "ggn_top", "density", "bulk_density", "ggn_density",
                "residual_density", "classes")


def total_cost(a: SpectrumAnalysis) -> dict[str, Any]:
    """``{"total": .., "parts": {name: cost}}``: the analysis's products, data passes and wall
    time, part by part and summed (H's density taken from its deflated bulk's run costs
    nothing of its own: :meth:`~curvscope.estimators.slq.SpectralDensity.with_deflated`).
    """
    parts: dict[str, Cost] = {}
    for name in COSTED_PARTS:
        part = getattr(a, name)
        if part is not None:
            parts[name] = part.cost
    total = {
        "num_matvecs": sum(c.num_matvecs for c in parts.values()),
        "num_products": sum(c.num_products for c in parts.values()),
        "num_data_passes": sum(c.num_data_passes for c in parts.values()),
        "wall_time_s": sum(c.wall_time for c in parts.values()),
        "wall_time_source": "sum of the parts' costs",
    }
    return {"total": total, "parts": {k: c.to_dict() for k, c in parts.items()}}


def trace_numbers(a: SpectrumAnalysis) -> TraceNumbers:
    """The trace with its standard error and the 95 % interval every view shows; ``resolved``
    is false when the interval is wider than the value (the sign is not even known).
    """
    value, se = a.trace()
    _, half = a.trace_interval(0.95)
    return TraceNumbers(float(value), float(se), float(half), bool(a.density.exact),
                        bool(half < abs(value)))


#: Rows of the eigenpair tables shown in full up to this many pairs.
MAX_TABLE_PAIRS = 1000


def eigenpair_table(r: EigenResult) -> dict[str, Any]:
    """A solver result as the report's table: method, tolerance, cost and, pair by pair, the
    eigenvalue, ``||A v - l v||``, the relative residual and whether it converged.
    """
    d = r.to_dict()
    n = min(r.k, MAX_TABLE_PAIRS)
    for key in ("eigenvalues", "residual_norms", "converged"):
        d[key] = d[key][:n]
    d["relative_residuals"] = r.relative_residuals[:n].tolist()
    d["shown"] = f"{n} of {r.k}"
    return d


class _Flat:
    """A frozen dataclass of plain numbers: its fields are its JSON."""

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class Estimate(_Flat):
    """A figure with its standard error (``None``: none known)."""

    value: float
    std_error: float | None = None


@dataclass(frozen=True)
class TraceNumbers(_Flat):
    """The trace as every view shows it: the value, its standard error, the half-width of its
    95 % interval (Student t over the probes), whether it is exact (every eigenvalue from the
    dense matrix) and whether it is resolved (the interval narrower than the value).
    """

    value: float
    std_error: float
    interval_95: float
    exact: bool
    resolved: bool


@dataclass(frozen=True)
class Eigenvalue(_Flat):
    """An eigenvalue with its residual ``||Hv - lambda v||`` (which bounds its error)."""

    value: float
    residual_norm: float


@dataclass(frozen=True)
class TermSpectrum:
    """A further density's trace (with its standard error) and the bounds of its spectrum."""

    trace: Estimate
    bounds: tuple[float, float]


#: The further densities whose trace and bounds are key numbers, as ``(part, label)``.
TERM_SPECTRA = (("ggn_density", "G"), ("residual_density", "H - G"),
                ("bulk_density", "bulk (outliers deflated)"))


@dataclass(frozen=True)
class KeyNumbers:
    """The numbers a report shows, each with its error bar or residual (no arrays): what the
    HTML page, ``compare`` and ``result.json`` read, so one figure is told the same way
    everywhere. ``to_dict`` is ``result.json``'s ``key_numbers``; ``from_dict`` reads it back
    (missing entries, e.g. of an older or partial document, become ``None`` / empty).

    Attributes:
        method: ``"exact"`` or ``"iterative"``.
        trace: the trace of H.
        negative_fraction: fraction of eigenvalues below ``-resolution`` (clearly negative).
        near_zero_fraction: fraction within ``+-resolution`` of zero (sign not resolved).
        resolution: the density's resolution (SLQ: its width; exact: the products' rounding).
        negative_mass: share of the spectral mass that is negative.
        spectrum_bounds: smallest and largest eigenvalue (SLQ: from Ritz values, residuals).
        largest_eigenvalue, smallest_eigenvalue: with their residuals.
        top_converged, bottom_converged: ``"converged/k"`` of the top and bottom pairs.
        outliers: the outlier split.
        bulk_power_law: the power-law fit of the bulk's top.
        overlap_hessian_ggn: overlap of the top eigenspaces of H and G.
        ggn_above_edge: G's eigenvalues above the bulk edge.
        eigenpairs: the solvers' tables (:func:`eigenpair_table`), by part.
        terms: trace and bounds of G, H - G and the deflated bulk, by part.
        class_overlaps, class_outliers, class_traces: the class terms of G, by term.
    """

    method: str = "iterative"
    trace: TraceNumbers | None = None
    negative_fraction: Estimate | None = None
    near_zero_fraction: Estimate | None = None
    resolution: float | None = None
    negative_mass: Estimate | None = None
    spectrum_bounds: tuple[float, float] | None = None
    largest_eigenvalue: Eigenvalue | None = None
    smallest_eigenvalue: Eigenvalue | None = None
    top_converged: str | None = None
    bottom_converged: str | None = None
    outliers: OutlierSplit | None = None
    bulk_power_law: PowerLawFit | None = None
    overlap_hessian_ggn: float | None = None
    ggn_above_edge: int | None = None
    eigenpairs: dict[str, dict[str, Any]] = field(default_factory=dict)
    terms: dict[str, TermSpectrum] = field(default_factory=dict)
    class_overlaps: dict[str, float] = field(default_factory=dict)
    class_outliers: dict[str, int] = field(default_factory=dict)
    class_traces: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``result.json``'s ``key_numbers`` (the terms as ``<part>_trace`` / ``<part>_bounds``)."""
        def plain(x: Any) -> Any:
            return x.to_dict() if hasattr(x, "to_dict") else x

        out: dict[str, Any] = {
            "trace": plain(self.trace), "negative_fraction": plain(self.negative_fraction),
            "near_zero_fraction": plain(self.near_zero_fraction), "resolution": self.resolution,
            "negative_mass": plain(self.negative_mass), "method": self.method,
            "spectrum_bounds": None if self.spectrum_bounds is None else
            list(self.spectrum_bounds),
            "largest_eigenvalue": plain(self.largest_eigenvalue),
            "smallest_eigenvalue": plain(self.smallest_eigenvalue),
            "top_converged": self.top_converged, "bottom_converged": self.bottom_converged,
            "outliers": plain(self.outliers), "bulk_power_law": plain(self.bulk_power_law),
            "overlap_hessian_ggn": self.overlap_hessian_ggn,
            "ggn_above_edge": self.ggn_above_edge, "eigenpairs": self.eigenpairs}
        for name, term in self.terms.items():
            out[f"{name}_trace"] = term.trace.to_dict()
            out[f"{name}_bounds"] = list(term.bounds)
        if self.class_overlaps:
            out.update(class_overlaps=dict(self.class_overlaps),
                       class_outliers=dict(self.class_outliers),
                       class_traces=dict(self.class_traces))
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> KeyNumbers:
        """Read :meth:`to_dict`'s form back."""
        d = d or {}

        def make(kind: Any, key: str) -> Any:
            v = d.get(key)
            return kind(**v) if isinstance(v, Mapping) else None

        bounds = d.get("spectrum_bounds")
        return cls(
            method=str(d.get("method", "iterative")), trace=make(TraceNumbers, "trace"),
            negative_fraction=make(Estimate, "negative_fraction"),
            near_zero_fraction=make(Estimate, "near_zero_fraction"),
            resolution=d.get("resolution"), negative_mass=make(Estimate, "negative_mass"),
            spectrum_bounds=None if not bounds else (float(bounds[0]), float(bounds[1])),
            largest_eigenvalue=make(Eigenvalue, "largest_eigenvalue"),
            smallest_eigenvalue=make(Eigenvalue, "smallest_eigenvalue"),
            top_converged=d.get("top_converged"), bottom_converged=d.get("bottom_converged"),
            outliers=make(OutlierSplit, "outliers"),
            bulk_power_law=make(PowerLawFit, "bulk_power_law"),
            overlap_hessian_ggn=d.get("overlap_hessian_ggn"),
            ggn_above_edge=d.get("ggn_above_edge"), eigenpairs=dict(d.get("eigenpairs") or {}),
            terms={name: TermSpectrum(Estimate(**d[f"{name}_trace"]),
                                      (float(d[f"{name}_bounds"][0]),
                                       float(d[f"{name}_bounds"][1])))
                   for name, _ in TERM_SPECTRA if f"{name}_trace" in d},
            class_overlaps=dict(d.get("class_overlaps") or {}),
            class_outliers=dict(d.get("class_outliers") or {}),
            class_traces=dict(d.get("class_traces") or {}))


def _estimate(value_and_error: tuple[float, float]) -> Estimate:
    value, se = value_and_error
    return Estimate(float(value), float(se))


def key_numbers(a: SpectrumAnalysis) -> KeyNumbers:
    """The numbers the report shows, each with its error bar or residual (no arrays)."""
    negative = a.negative_part()
    terms = {}
    for name, _ in TERM_SPECTRA:
        s: SpectralDensity | None = getattr(a, name)
        if s is not None:
            terms[name] = TermSpectrum(_estimate(s.trace_function(lambda t: t)),
                                       (float(s.bounds[0]), float(s.bounds[1])))
    low = int(a.bottom.eigenvalues.argmin()) if a.bottom.k else 0
    return KeyNumbers(
        method=a.info.get("method", "iterative"),
        trace=trace_numbers(a),
        negative_fraction=_estimate(negative["clearly_negative"]),
        near_zero_fraction=_estimate(negative["near_zero"]),
        resolution=a.density.resolution(),
        negative_mass=_estimate(negative["mass"]),
        spectrum_bounds=(float(a.density.bounds[0]), float(a.density.bounds[1])),
        largest_eigenvalue=Eigenvalue(float(a.top.eigenvalues[0]),
                                      float(a.top.residual_norms[0])) if a.top.k else None,
        smallest_eigenvalue=Eigenvalue(float(a.bottom.eigenvalues[low]),
                                       float(a.bottom.residual_norms[low]))
        if a.bottom.k else None,
        top_converged=f"{int(a.top.converged.sum())}/{a.top.k}",
        bottom_converged=f"{int(a.bottom.converged.sum())}/{a.bottom.k}",
        outliers=a.outliers, bulk_power_law=a.bulk_power_law,
        overlap_hessian_ggn=a.overlap_hessian_ggn, ggn_above_edge=a.ggn_above_edge(),
        eigenpairs={name: eigenpair_table(getattr(a, name))
                    for name in ("top", "bottom", "ggn_top") if getattr(a, name) is not None},
        terms=terms,
        class_overlaps={} if a.classes is None else dict(a.class_overlaps),
        class_outliers={} if a.classes is None else dict(a.class_outliers),
        class_traces={} if a.classes is None else {t: a.classes.trace(t) for t in TERMS})
