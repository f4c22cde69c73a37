"""Two bundles side by side: the same key numbers as each report (the same error bars), and what
differs between the two runs (model, data, dtype, method, budget) said before any number.

Nothing is computed here: every figure is a saved key number, formatted the way the report page
formats it (:mod:`curvscope.report.html`).
"""

from __future__ import annotations

import html as _html
from collections.abc import Mapping
from typing import Any

from curvscope.analysis.formatting import with_error
from curvscope.analysis.key_numbers import Eigenvalue, Estimate, TraceNumbers
from curvscope.report.bundle import LoadedBundle

__all__ = ["compare_bundles", "render_compare_html"]


def _pm(entry: TraceNumbers | Eigenvalue | None, digits: int = 4) -> str:
    """``value +- 95 % half-width`` (``exact``), as the report's key table shows a trace; an
    eigenvalue with its residual.
    """
    if entry is None:
        return "—"
    value = f"{entry.value:.{digits}g}"
    if isinstance(entry, Eigenvalue):
        return f"{value} (residual {entry.residual_norm:.1g})"
    if entry.exact:
        return f"{value} (exact)"
    text = f"{with_error(entry.value, entry.interval_95)} (95%)"
    return text if entry.resolved else text + ", unresolved"


def _fraction(entry: Estimate | None) -> str:
    if entry is None:
        return "—"
    return f"{entry.value:.1%} +- {entry.std_error or 0.0:.1%} (s.e.)"


def _rows(b: LoadedBundle) -> dict[str, str]:
    kn, info = b.key_numbers, b.analysis.info
    out = kn.outliers
    count = 0 if out is None else out.count
    sure = "clear" if out is None else out.confidence
    edge = None if out is None else out.bulk_edge
    return {
        "model": str(b.provenance.get("name", "?")),
        "parameters": f"{info['num_params']:,}",
        "examples": f"{info['num_data']:,} {info.get('data_unit', '')}".strip(),
        "classes": str(info.get("num_classes")),
        "dtype": str(info.get("dtype")),
        "method": kn.method,
        "budget": str(info.get("budget")),
        "outliers": f"{count}" + (f" ({sure})" if count and sure != "clear" else ""),
        "largest eigenvalue": _pm(kn.largest_eigenvalue),
        "bulk edge": "—" if edge is None else f"{edge:.4g}",
        "trace": _pm(kn.trace),
        "clearly negative": _fraction(kn.negative_fraction),
        "within resolution of zero": _fraction(kn.near_zero_fraction),
        "overlap H/G": "—" if kn.overlap_hessian_ggn is None else
        f"{kn.overlap_hessian_ggn:.3f}",
    }


def _differences(a: LoadedBundle, b: LoadedBundle) -> list[str]:
    """Sentences on what makes the two runs not like for like."""
    ia, ib, pa, pb = a.analysis.info, b.analysis.info, a.provenance, b.provenance
    out = []
    if pa.get("name") != pb.get("name") or ia["num_params"] != ib["num_params"]:
        out.append(f"Different models: {pa.get('name', '?')} with {ia['num_params']:,} "
                   f"parameters vs {pb.get('name', '?')} with {ib['num_params']:,}; eigenvalues "
                   "are per parameter of each model and compare only in shape.")
    elif pa.get("parameter_values") and pa.get("parameter_values") != pb.get("parameter_values"):
        out.append("Same model, different weights (e.g. another checkpoint or seed).")
    if ia["num_data"] != ib["num_data"] or (pa.get("data") and pa.get("data") != pb.get("data")):
        out.append(f"Different data: {ia['num_data']:,} vs {ib['num_data']:,} "
                   f"{ia.get('data_unit', 'examples')}" +
                   ("" if ia["num_data"] != ib["num_data"] else " (same size, other contents)")
                   + ".")
    if ia.get("dtype") != ib.get("dtype"):
        out.append(f"Different dtypes: {ia.get('dtype')} vs {ib.get('dtype')}; differences at "
                   "the lower precision's rounding (about 1e-6 relative in float32) mean nothing.")
    for key, what in (("method", "methods"), ("budget", "budgets")):
        if ia.get(key) != ib.get(key):
            out.append(f"Different {what}: {ia.get(key)} vs {ib.get(key)}; the error bars "
                       "differ, compare within them.")
    return out


def compare_bundles(a: LoadedBundle, b: LoadedBundle) -> dict[str, Any]:
    """``{"differences": [sentences], "rows": {name: [a, b]}}`` for two loaded bundles."""
    ra, rb = _rows(a), _rows(b)
    return {"differences": _differences(a, b), "rows": {k: [ra[k], rb[k]] for k in ra},
            "a": str(a.path), "b": str(b.path)}


def render_compare_html(comparison: Mapping[str, Any]) -> str:
    """The comparison as one self-contained HTML page."""
    e = _html.escape
    notes = "".join(f"<li>{e(s)}</li>" for s in comparison["differences"]) or \
        "<li>Same model, data, dtype, method and budget.</li>"
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v[0])}</td><td>{e(v[1])}</td></tr>"
                   for k, v in comparison["rows"].items())
    return ("<!doctype html><meta charset='utf-8'><title>curvscope compare</title>"
            "<style>body{font-family:sans-serif;margin:24px}td,th{padding:4px 10px;"
            "text-align:left;border-bottom:1px solid #ddd}</style>"
            f"<h1>curvscope compare</h1><ul>{notes}</ul><table><tr><th></th>"
            f"<th>{e(comparison['a'])}</th><th>{e(comparison['b'])}</th></tr>{rows}</table>")
