"""One self-contained HTML page from a bundle's JSON document and its PNG plots.

No external resources: the CSS is inline, the PNGs are embedded as base64 ``data:`` URIs, and the
only script is a tiny inline check that, on load, counts the images that decoded
(``img.complete && img.naturalWidth > 0``) and writes ``[images ok: n/N]`` into
``document.title``, together with ``[errors: ...]`` for any script or resource error. A headless
browser can read both from the title (see ``tests/test_report.py``).

The page holds no numerics: every number comes from the document written by
:func:`~curvscope.report.bundle.bundle_dict`.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping
from typing import Any

from curvscope.analysis.formatting import rounded_to_error
from curvscope.analysis.key_numbers import (
    TERM_SPECTRA,
    Eigenvalue,
    Estimate,
    KeyNumbers,
    TraceNumbers,
)

__all__ = ["CAPTIONS", "render_html"]

TITLE = "curvscope report"

#: What each figure shows and what to look for in it.
CAPTIONS = {
    "density": (
        "Spectral densities of the Hessian H, its Gauss-Newton part G and the residual H - G "
        "(stochastic Lanczos quadrature; shaded: +-1 standard error across probes). "
        "<b>Look for</b>: a bulk concentrated near zero, the outliers (red ticks, from Lanczos) "
        "isolated to its right; G is positive semi-definite and should carry the outliers, the "
        "residual is roughly symmetric around zero and carries the negative eigenvalues. Wide "
        "bands mean more probes are needed. Right: the same spectrum on a log10|λ| axis, "
        "positive and negative parts apart; the negative part's mass shows how far from a "
        "minimum the model is."),
    "top_eigenvalues": (
        "Ranked top eigenvalues (error bars: residual norms ||Hv - λv||, a bound on each "
        "eigenvalue's error), outliers in red, the bulk edge dashed. <b>Look for</b>: a clear "
        "gap after the last outlier (ratio at least the threshold), and G's top eigenvalues "
        "matching H's outliers when G carries them."),
    "class_structure": (
        "Papyan's decomposition of G: spectra of G1 (class means), G1+2 (class and cross-class "
        "means), G2 (cross-class deviations) and G0 (correct-class terms) beside H's top "
        "eigenvalues. <b>Look for</b>: G1 with about C eigenvalues at the height of H's "
        "outliers, G0 and G2 below the bulk edge; right, the overlap of each term's top space "
        "with H's outlier space (1: the same space; chance: r/P)."),
    "embedding": (
        "Exact PCA of the class means and of the class-pair means of the per-example gradients "
        "(from their Gram matrix). <b>Look for</b>: class means well apart (they make the "
        "outliers), and pair means grouped by their true class."),
}
SWEEP_CAPTION = ("Top eigenvalues across the sweep. <b>Look for</b>: outliers that settle (or "
                 "drift) as x grows, and their separation from the bulk edge.")
#: Captions of the other extras sections' figures, by the section's ``kind``.
SECTION_CAPTIONS = {
    "train_vs_test": (
        "Top eigenvalues of the Hessian on the training data and on held-out data, rank by rank "
        "(dotted: each split's bulk edge). <b>Look for</b>: the same number of outliers on both "
        "(they come from the class structure, not from memorised examples), and how far the "
        "test spectrum sits above the training one."),
    "mask_overlap": (
        "Weight of the top (outlier) eigenspace on the largest-magnitude parameters, for masks "
        "of growing size, against chance (dashed). <b>Look for</b>: a curve well above chance "
        "means the sharp directions live on the large weights (Fernandez et al. 2025)."),
}

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;color:#1d1d1f;
 background:#fafafa;line-height:1.45}
main{max-width:1240px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:1.7em;margin:0 0 4px} h2{font-size:1.3em;margin:34px 0 10px;border-bottom:2px solid
 #e3e3e3;padding-bottom:4px} h3{font-size:1.08em;margin:22px 0 6px} h4{margin:14px 0 4px}
.sub{color:#555;margin:0 0 18px}
.headline{background:#eef5ff;border-left:5px solid #1f77b4;padding:12px 16px;font-size:1.08em;
 margin:10px 0}
ul.summary li{margin:4px 0}
table{border-collapse:collapse;margin:8px 0 14px;background:#fff;font-size:.92em}
th,td{border:1px solid #ddd;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f1f1f1} td.num{text-align:right;font-family:'DejaVu Sans Mono',Menlo,Consolas,
 monospace;white-space:nowrap}
figure{margin:18px 0 26px;background:#fff;border:1px solid #e3e3e3;padding:10px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{color:#333;font-size:.93em;margin-top:8px}
details{margin:8px 0} summary{cursor:pointer;color:#1f5fa0}
.note{color:#666;font-size:.9em} .bad{color:#b00020;font-weight:600} .ok{color:#2a7d2a}
footer{color:#777;font-size:.85em;margin-top:40px}
"""

SCRIPT = """
(function () {
  var base = document.title, errors = [];
  function update(loaded) {
    var t = base;
    if (loaded) {
      var imgs = document.images, ok = 0;
      for (var i = 0; i < imgs.length; i++) {
        if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; }
      }
      t += ' [images ok: ' + ok + '/' + imgs.length + ']';
    }
    if (errors.length) { t += ' [errors: ' + errors.join('; ') + ']'; }
    document.title = t;
  }
  window.addEventListener('error', function (e) {
    var el = e.target;
    errors.push(el && el.tagName ? ('resource ' + el.tagName.toLowerCase() + ' failed')
                                 : (e.message || 'error'));
    update(document.readyState === 'complete');
  }, true);
  window.addEventListener('load', function () { update(true); });
})();
"""


# ----------------------------------------------------------------------------- formatting
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, digits: int = 4) -> str:
    if isinstance(x, bool) or x is None:
        return "—" if x is None else str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x == 0 or 1e-3 <= abs(x) < 1e5:
            return f"{x:.{digits}g}"
        return f"{x:.{digits - 1}e}"
    return _e(x)


def _pm(d: TraceNumbers | Estimate | Eigenvalue | None) -> tuple[str, str]:
    """``(value, error)`` cells of a key number; a value with an error bar is rounded to the
    digit the bar resolves (:mod:`curvscope.analysis.formatting`).
    """
    if d is None:
        return _num(None), ""
    if isinstance(d, TraceNumbers):
        if d.exact:
            return _num(d.value), "exact"
        value, err = rounded_to_error(d.value, d.interval_95)
        return value, f"± {err} (95%)"
    if isinstance(d, Eigenvalue):
        return _num(d.value), "residual " + _num(d.residual_norm, 2)
    if d.std_error is None:
        return _num(d.value), ""
    value, err = rounded_to_error(d.value, d.std_error)
    return value, (f"± {err}" if err else "")


def _table(rows: list[list[str]], head: list[str] | None = None, num_cols: set[int] | None = None,
           ) -> str:
    num_cols = num_cols or set()
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(
            f"<td class='num'>{c}</td>" if i in num_cols else f"<td>{c}</td>"
            for i, c in enumerate(r)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _img(name: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f"<figure id='fig-{_e(name)}'><img src='data:image/png;base64,{data}' "
            f"alt='{_e(name.replace('_', ' '))} plot'><figcaption><b>{_e(name)}</b>: {caption}"
            "</figcaption></figure>")


# ----------------------------------------------------------------------------- sections
def _headline(doc: Mapping[str, Any]) -> str:
    kn = KeyNumbers.from_dict(doc.get("key_numbers"))
    prov = doc.get("provenance", {})
    parts = []
    out = kn.outliers
    C = prov.get("num_classes")
    if out is not None:
        n = out.count
        parts.append(f"{n} outlier{'s' if n != 1 else ''}" + (f" for {C} classes" if C else "")
                     + (f" ({out.confidence})" if n and out.confidence != "clear" else ""))
    ov = kn.overlap_hessian_ggn
    if ov is not None and out is not None and out.count:
        if kn.ggn_above_edge == 0:
            parts.append("G has no eigenvalue above the bulk edge")
        else:
            parts.append(("outliers carried by G" if ov >= 0.5 else
                          "outliers not carried by G alone") + f" (overlap {ov:.2f})")
    nf, nz = kn.negative_fraction, kn.near_zero_fraction
    if nf is not None:
        text = f"{nf.value:.0%} of eigenvalues clearly negative"
        if nz is not None:
            text += f", {nz.value:.0%} within ±{_num(kn.resolution, 2)} of zero"
        parts.append(text)
    tr = kn.trace
    if tr is not None:
        value, err = _pm(tr)
        unresolved = "" if tr.resolved else " (unresolved: more probes needed)"
        parts.append(f"trace {value} {err}{unresolved}")
    if "G1" in kn.class_overlaps:
        parts.append(f"class means (G1) overlap {kn.class_overlaps['G1']:.2f} with the outlier "
                     "space")
    return "; ".join(parts) + "." if parts else ""


def _key_table(doc: Mapping[str, Any]) -> str:
    kn = KeyNumbers.from_dict(doc.get("key_numbers"))
    rows: list[list[str]] = []

    def add(name: str, d: TraceNumbers | Estimate | Eigenvalue | None, note: str = "") -> None:
        v, err = _pm(d)
        rows.append([_e(name), v, err, note])

    exact = kn.method == "exact"
    add("trace tr H" + (" (exact)" if exact else " (SLQ)"), kn.trace,
        "every eigenvalue from the dense Hessian" if exact else
        "error: 95% interval (Student t over the probes)")
    if kn.largest_eigenvalue is not None:
        add("largest eigenvalue λ_max", kn.largest_eigenvalue, "error: ||Hv - λv||")
    if kn.smallest_eigenvalue is not None:
        add("smallest eigenvalue λ_min", kn.smallest_eigenvalue, "error: ||Hv - λv||")
    b = kn.spectrum_bounds
    if b:
        rows.append(["spectrum bounds" + (" (exact)" if exact else " (SLQ)"),
                     f"[{_num(b[0])}, {_num(b[1])}]", "",
                     "smallest and largest eigenvalue" if exact else
                     "from Ritz values and residuals"])
    res = _num(kn.resolution, 2)
    add(f"fraction of eigenvalues clearly negative (below -{res})", kn.negative_fraction,
        "the density's resolution: " + ("the products' rounding" if exact else "its width"))
    if kn.near_zero_fraction is not None:
        add(f"fraction within ±{res} of zero (sign not resolved)", kn.near_zero_fraction)
    add("share of spectral mass that is negative", kn.negative_mass)
    out = kn.outliers
    if out is not None:
        rows.append(["outliers (eigengap rule)", _num(out.count), _e(str(out.confidence)),
                     _e(out.evidence or
                        f"largest j with λ_j/λ_(j+1) ≥ {_num(out.threshold)}; ratio at "
                        f"the split {_num(out.gap_ratio)}")])
        if out.bulk_edge is not None:  # no outliers: no bulk edge
            rows.append(["bulk edge", _num(out.bulk_edge), "",
                         "λ_(j+1) from Lanczos" + (f"; deflated-SLQ bound {_num(out.bulk_edge_slq)}"
                                                   if out.bulk_edge_slq is not None else "")])
    pl = kn.bulk_power_law
    if pl is not None:
        rows.append(["bulk tail exponent α (λ_j ~ j^-α)", _num(pl.exponent),
                     "± " + _num(pl.std_error, 2), f"{pl.num_points} eigenvalues"])
    if kn.overlap_hessian_ggn is not None:
        rows.append(["overlap of H's and G's top spaces", _num(kn.overlap_hessian_ggn), "",
                     "1: same space; chance r/P"])
    for name, label in TERM_SPECTRA:
        term = kn.terms.get(name)
        if term is not None:
            add(f"trace of {label} (SLQ)", term.trace,
                f"spectrum in [{_num(term.bounds[0])}, {_num(term.bounds[1])}]")
    for name, ov in kn.class_overlaps.items():
        n_above = kn.class_outliers.get(name)
        tr = kn.class_traces.get(name)
        rows.append([f"class term {_e(name.replace('G12', 'G1+2'))}: overlap with outlier space",
                     _num(ov), "", f"{n_above} eigenvalues above the bulk edge; trace {_num(tr)}"])
    rows.append(["eigenpairs converged (top, bottom)",
                 _e(f"{kn.top_converged}, {kn.bottom_converged}"), "", ""])
    return _table(rows, ["quantity", "value", "error bar / residual", "note"], {1, 2})


def _eigen_table(part: Mapping[str, Any] | None, title: str) -> str:
    if not part:
        return ""
    ev = part.get("eigenvalues", [])
    res = part.get("residual_norms", [])
    rel = part.get("relative_residuals", [None] * len(ev))
    conv = part.get("converged", [None] * len(ev))
    rows = [[str(i + 1), _num(lam, 8), _num(r, 2), _num(q, 2),
             "<span class='ok'>yes</span>" if c else "<span class='bad'>no</span>"]
            for i, (lam, r, q, c) in enumerate(zip(ev, res, rel, conv))]
    head = (f"{_e(title)}: {_e(part.get('method'))} ({_e(part.get('which'))}), tol "
            f"{_num(part.get('tol'))}, {_num(part.get('num_matvecs'))} products, "
            f"{_num(part.get('num_data_passes'))} data passes, {_num(part.get('wall_time'), 3)} s")
    return (f"<details><summary>{head}</summary>"
            + _table(rows, ["rank", "λ", "||Av - λv||", "relative", "converged"], {0, 1, 2, 3})
            + "</details>")


def _cost_table(costs: Any) -> str:
    if not isinstance(costs, Mapping) or not costs:
        return ""
    cols = ["num_matvecs", "num_products", "num_data_passes", "wall_time"]
    rows = [[_e(part)] + [_num(c.get(k)) for k in cols] for part, c in costs.items()
            if isinstance(c, Mapping)]
    return ("<h3>Cost by part</h3>"
            + _table(rows, ["part", "matrix-vector products", "product calls", "data passes",
                            "wall time (s)"], {1, 2, 3, 4}))


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, Mapping):
        out: list[tuple[str, Any]] = []
        for k, v in d.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, d)]


def _shown(section: Mapping[str, Any]) -> dict[str, Any]:
    """A section's JSON without the entries that say how to rebuild it (``__dataclass__``)."""
    return {k: v for k, v in section.items() if not (k.startswith("__") and k.endswith("__"))}


def _value(v: Any, manifest: Mapping[str, Any]) -> str:
    if isinstance(v, Mapping) and "__array__" in v:
        spec = manifest.get(v["__array__"], {})
        note = (f"<span class='note'>array {_e(spec.get('shape'))} {_e(spec.get('dtype'))} "
                f"(arrays.npz: {_e(v['__array__'])})</span>")
        return (_value(v["values"], manifest) + " " + note) if "values" in v else note
    if isinstance(v, Mapping) and "__tuple__" in v:
        return _value(v["__tuple__"], manifest)
    if isinstance(v, float | int) and not isinstance(v, bool):
        return _num(v)
    if isinstance(v, list):
        shown = ", ".join(_value(x, manifest) for x in v[:24])
        return f"[{shown}{', …' if len(v) > 24 else ''}]" + (
            f" <span class='note'>({len(v)} items)</span>" if len(v) > 24 else "")
    if isinstance(v, Mapping):
        return ", ".join(f"{_e(k)}: {_value(x, manifest)}" for k, x in _shown(v).items())
    return _e(v)


def _records(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(r, Mapping) for r in v)


def _extras(doc: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    from curvscope.report.plots import is_sweep, section_image_name

    extras = doc.get("extras") or {}
    if not extras:
        return ""
    manifest = doc.get("arrays", {})
    out = ["<h2 id='extras'>Further sections</h2>"]
    for name, section in extras.items():
        out.append(f"<h3>{_e(name.replace('_', ' '))}</h3>")
        summary = section.get("summary") if isinstance(section, Mapping) else None
        if isinstance(summary, list) and summary:
            out.append("<ul class='summary'>" + "".join(f"<li>{_e(str(t))}</li>" for t in summary)
                       + "</ul>")
        img = section_image_name(name, section)
        if img is not None and img in images:
            caption = SWEEP_CAPTION if is_sweep(section) else SECTION_CAPTIONS.get(
                str(section.get("kind")), "")
            out.append(_img(img, images[img], caption))
        rest = {k: v for k, v in _shown(section).items()  # the title is the figure's
                if k != "summary" and not (k == "title" and v is None)} if isinstance(
            section, Mapping) else section
        out.append(_section(rest, manifest))
    return "\n".join(out)


def _section(section: Mapping[str, Any], manifest: Mapping[str, Any], depth: int = 0) -> str:
    section = _shown(section)
    scalars = [(k, v) for k, v in section.items()
               if not _records(v) and not (isinstance(v, Mapping) and "__array__" not in v)]
    out = []
    if scalars:
        out.append(_table([[_e(k), _value(v, manifest)] for k, v in scalars], ["entry", "value"]))
    for k, v in section.items():
        if _records(v):
            cols: list[str] = []
            for r in v:
                cols += [c for c in r if c not in cols]
            out.append(f"<h4>{_e(k)}</h4>" + _table(
                [[_value(r.get(c), manifest) for c in cols] for r in v], [_e(c) for c in cols]))
        elif isinstance(v, Mapping) and "__array__" not in v:
            out.append(f"<h4>{_e(k)}</h4>" + (_section(v, manifest, depth + 1) if depth < 4
                                              else _value(v, manifest)))
    return "\n".join(out)


# ----------------------------------------------------------------------------- page
def render_html(bundle_dict: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    """The report page of a bundle: one self-contained HTML string.

    Args:
        bundle_dict: the document of ``result.json`` (from
            :func:`~curvscope.report.bundle.bundle_dict` or a loaded bundle's ``document``).
        images: ``{name: PNG bytes}`` in display order (``density``, ``top_eigenvalues``,
            ``class_structure``, ``embedding``, ``sweep_<section>``).

    Returns:
        the page (title, summary, key numbers with error bars, plots with captions, extras,
        provenance), with no external resource.

    Raises:
        TypeError: ``bundle_dict`` is not a mapping or an image is not bytes.

    Example:
        >>> page = render_html({"summary": ["1 outlier."]}, {})
        >>> page.startswith("<!DOCTYPE html>"), "1 outlier." in page, "http" in page
        (True, True, False)
    """
    if not isinstance(bundle_dict, Mapping):
        raise TypeError(f"bundle_dict must be the bundle's JSON document (a dict), got "
                        f"{type(bundle_dict).__name__}.")
    for name, png in images.items():
        if not isinstance(png, bytes | bytearray):
            raise TypeError(f"images[{name!r}] must be PNG bytes, got {type(png).__name__}.")
    doc = bundle_dict
    prov = doc.get("provenance", {}) or {}
    versions = prov.get("versions", {}) or {}
    sub = ", ".join(s for s in [
        f"{prov['num_params']:,} parameters" if isinstance(prov.get("num_params"), int) else "",
        f"{prov['num_data']:,} {prov.get('data_unit') or 'examples'}"
        if isinstance(prov.get("num_data"), int) else "",
        f"{prov['num_classes']} classes" if prov.get("num_classes") else "",
        str(prov.get("dtype", "")), f"budget {(prov.get('budgets') or {}).get('budget')}"
        if prov.get("budgets") else "", f"seed {prov.get('seed')}" if "seed" in prov else "",
        prov.get("timestamp_utc", ""),
        f"curvscope {versions['curvscope']}" if versions.get("curvscope") else "",
    ] if s)
    body = [f"<h1>{TITLE}</h1>", f"<p class='sub'>{_e(sub)}</p>"]
    headline = _headline(doc)
    if headline:
        body.append(f"<div class='headline'>{_e(headline)}</div>")
    summary = doc.get("summary") or []
    if summary:
        body.append("<h2 id='summary'>Summary</h2><ul class='summary'>"
                    + "".join(f"<li>{_e(s)}</li>" for s in summary) + "</ul>")
    if doc.get("key_numbers"):
        body.append("<h2 id='numbers'>Key numbers</h2>" + _key_table(doc))
        parts = KeyNumbers.from_dict(doc["key_numbers"]).eigenpairs
        body.append(_eigen_table(parts.get("top"), "Top eigenpairs of H"))
        body.append(_eigen_table(parts.get("bottom"), "Bottom eigenpairs of H"))
        body.append(_eigen_table(parts.get("ggn_top"), "Top eigenpairs of G"))
    main_imgs = [(n, p) for n, p in images.items()
                 if not n.startswith(("sweep_", "section_"))]  # those show with their section
    plots_state = doc.get("plots")
    body.append("<h2 id='plots'>Plots</h2>")
    if main_imgs:
        body += [_img(n, p, CAPTIONS.get(n, "")) for n, p in main_imgs]
    else:
        body.append(f"<p class='note'>No plots: {_e(plots_state or 'none given')}.</p>")
    body.append(_extras(doc, images))
    if prov:
        rows = [[_e(k), _value(v, {})] for k, v in _flatten(
            {k: v for k, v in prov.items() if k != "costs"})]
        body.append("<h2 id='provenance'>Provenance</h2>" + _table(rows, ["entry", "value"]))
        body.append(_cost_table(prov.get("costs")))
    body.append(f"<footer>schema version {_e(doc.get('schema_version', '?'))}; data in "
                "result.json and arrays.npz beside this page.</footer>")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{TITLE}</title><script>{SCRIPT}</script><style>{CSS}</style></head>\n"
            "<body><main>\n" + "\n".join(b for b in body if b) + "\n</main></body></html>\n")
