"""The numbers a report shows, computed once from an analysis (the report prints them as given).

:func:`key_numbers` gathers every headline figure of a
:class:`~curvscope.analysis.spectrum.SpectrumAnalysis` with its error bar or residual (the trace
with its standard error and 95 % interval, the resolvable negative part, the extreme eigenvalues,
the outlier split, Papyan's terms); :func:`total_cost` adds up the products, data passes and
wall time of the parts. The HTML page, ``compare`` and ``result.json`` all read these, so one
figure is told the same way everywhere.
"""

from __future__ import annotations

from typing import Any

from curvscope._diagnostics import Cost
from curvscope.analysis.class_structure import TERMS
from curvscope.analysis.spectrum import SpectrumAnalysis
from curvscope.estimators.slq import SpectralDensity
from curvscope.solvers._results import EigenResult

__all__ = ["eigenpair_table", "key_numbers", "total_cost", "trace_numbers"]

#: The parts of an analysis that carry a cost, in report order.
COSTED_PARTS = ("top", "bottom", "ggn_top", "density", "bulk_density", "ggn_density",
                "residual_density", "classes")


def _pair(value_and_error: tuple[float, float]) -> dict[str, float]:
    value, se = value_and_error
    return {"value": value, "std_error": se}


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


def trace_numbers(a: SpectrumAnalysis) -> dict[str, Any]:
    """The trace with its standard error and the 95 % interval every view shows; ``resolved``
    is false when the interval is wider than the value (the sign is not even known).
    """
    value, se = a.trace()
    _, half = a.trace_interval(0.95)
    return {"value": value, "std_error": se, "interval_95": half,
            "exact": bool(a.density.exact), "resolved": bool(half < abs(value))}


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


def key_numbers(a: SpectrumAnalysis) -> dict[str, Any]:
    """The numbers the report shows, each with its error bar or residual (no arrays)."""
    negative = a.negative_part()
    kn: dict[str, Any] = {
        "trace": trace_numbers(a),
        "negative_fraction": _pair(negative["clearly_negative"]),
        "near_zero_fraction": _pair(negative["near_zero"]),
        "resolution": a.density.resolution(),
        "negative_mass": _pair(negative["mass"]),
        "method": a.info.get("method", "iterative"),
        "spectrum_bounds": list(a.density.bounds),
        "largest_eigenvalue": {"value": float(a.top.eigenvalues[0]),
                               "residual_norm": float(a.top.residual_norms[0])}
        if a.top.k else None,
        "smallest_eigenvalue": {"value": float(a.bottom.eigenvalues.min()),
                                "residual_norm": float(a.bottom.residual_norms[
                                    int(a.bottom.eigenvalues.argmin())])}
        if a.bottom.k else None,
        "top_converged": f"{int(a.top.converged.sum())}/{a.top.k}",
        "bottom_converged": f"{int(a.bottom.converged.sum())}/{a.bottom.k}",
        "outliers": a.outliers.to_dict(),
        "bulk_power_law": None if a.bulk_power_law is None else a.bulk_power_law.to_dict(),
        "overlap_hessian_ggn": a.overlap_hessian_ggn,
        "ggn_above_edge": a.ggn_above_edge(),
        "eigenpairs": {name: eigenpair_table(getattr(a, name))
                       for name in ("top", "bottom", "ggn_top") if getattr(a, name) is not None},
    }
    for name in ("bulk_density", "ggn_density", "residual_density"):
        s: SpectralDensity | None = getattr(a, name)
        if s is not None:
            kn[f"{name}_trace"] = _pair(s.trace_function(lambda t: t))
            kn[f"{name}_bounds"] = list(s.bounds)
    if a.classes is not None:
        kn["class_overlaps"] = dict(a.class_overlaps)
        kn["class_outliers"] = dict(a.class_outliers)
        kn["class_traces"] = {t: a.classes.trace(t) for t in TERMS}
    return kn
