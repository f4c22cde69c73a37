"""Figures of a :class:`~curvscope.analysis.spectrum.SpectrumAnalysis` (matplotlib, optional).

Every function returns a :class:`matplotlib.figure.Figure` built directly (not through
``pyplot``): no backend is chosen or changed, no global figure list grows, nothing is shown or
saved. Save with ``fig.savefig("x.png")``; in a notebook the figure displays as the cell's value
once matplotlib's notebook integration is active (``import matplotlib.pyplot`` or
``%matplotlib inline``). matplotlib is imported inside the functions only; without it they raise
:class:`ImportError` naming the extra to install.

Example (needs matplotlib)::

    import curvscope as cs
    from curvscope.analysis.spectrum import analyze
    from curvscope.report import plot_density
    from curvscope.zoo import gaussian_mixture

    z = gaussian_mixture(5)
    a = analyze(cs.Problem(z.model, z.loss_fn, z.batches), budget="small")
    plot_density(a).savefig("density.png", dpi=120)
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from curvscope._state import DATACLASS
from curvscope.analysis.sections import SECTION_TYPES, MaskOverlap, TrainVsTest
from curvscope.analysis.sweeps import Sweep

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from curvscope.analysis.spectrum import SpectrumAnalysis
    from curvscope.estimators.slq import SpectralDensity

__all__ = [
    "is_sweep",
    "plot_class_structure",
    "plot_density",
    "plot_embedding",
    "plot_mask_overlap",
    "plot_section",
    "plot_sweep",
    "plot_train_vs_test",
    "plot_top_eigenvalues",
    "render_pngs",
]

INSTALL_HINT = "pip install 'curvscope[plot]'"
COLORS = {"H": "#1f77b4", "G": "#ff7f0e", "residual": "#2ca02c", "outlier": "#d62728",
          "bulk": "#555555"}
#: How far below its peak a log-scale density is drawn (decades).
DENSITY_DECADES = 7
_KAPPA = 3.0


def _figure(**kwargs: Any) -> Figure:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"curvscope's plots need matplotlib, which is not installed: "
                          f"{INSTALL_HINT}") from err
    return Figure(layout="constrained", **kwargs)


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _outlier_rug(ax: Axes, values: np.ndarray, *, log: bool, label: str) -> None:
    """Short ticks at the bottom of ``ax`` at the outlier eigenvalues."""
    if values.size == 0:
        return
    x = np.log10(np.abs(values)) if log else values
    ax.vlines(x, 0.0, 0.07, transform=ax.get_xaxis_transform(), color=COLORS["outlier"], lw=1.6,
              label=label)


# --------------------------------------------------------------------------- density
def _lsy_sigma(lo: float, hi: float, m: int) -> float:
    """Lin-Saad-Yang Gaussian width for ``m`` nodes on ``[lo, hi]`` (as in SpectralDensity)."""
    return max((hi - lo) / 2 * (2.0 / max(m - 1, 1)) / math.sqrt(8 * math.log(_KAPPA)), 1e-300)


def plot_density(analysis: SpectrumAnalysis, *, num: int = 1024) -> Figure:
    """Spectral densities of ``H``, ``G`` and the residual ``H - G`` (SLQ) with error bands.

    Left: density of ``lambda`` on a linear axis (log density axis) with the band of +-1 standard
    error across probes, and the outlier eigenvalues (from Lanczos) as red ticks. Right: density
    of ``log10 |lambda|`` for the positive and the negative eigenvalues of ``H`` (and ``G``'s
    positive part), on a Lin-Saad-Yang width fitted to the log axis.

    Args:
        analysis: a SpectrumAnalysis.
        num: grid points.

    Returns:
        a Figure with two axes.
    """
    fig = _figure(figsize=(12.5, 4.8))
    ax_lin, ax_log = fig.subplots(1, 2)
    parts: list[tuple[str, SpectralDensity, str]] = [("H (Hessian)", analysis.density, COLORS["H"])]
    if analysis.ggn_density is not None:
        parts.append(("G (Gauss-Newton)", analysis.ggn_density, COLORS["G"]))
    if analysis.residual_density is not None:
        parts.append(("H - G (residual)", analysis.residual_density, COLORS["residual"]))
    n_out = analysis.outliers.count
    outliers = _np(analysis.top.eigenvalues[:n_out])
    d0 = analysis.density

    # linear axis
    lo = min(p[1].bounds[0] for p in parts)
    hi = max(p[1].bounds[1] for p in parts)
    width = hi - lo if hi > lo else max(abs(hi), 1.0)
    grid = torch.linspace(lo - 0.05 * width, hi + 0.05 * width, num, dtype=torch.float64)
    peak = 0.0
    for label, dens, color in parts:
        g, d, se = (_np(t) for t in dens.evaluate(grid))
        se = np.nan_to_num(se)
        peak = max(peak, float(d.max()))
        ax_lin.plot(g, d, color=color, lw=1.4, label=label)
        ax_lin.fill_between(g, np.maximum(d - se, 1e-300), d + se, color=color, alpha=0.22, lw=0)
    floor = peak * 10.0 ** (-DENSITY_DECADES) if peak > 0 else 1e-300
    ax_lin.set_yscale("log")
    ax_lin.set_ylim(floor, peak * 3 if peak > 0 else 1.0)
    ax_lin.set_xlim(float(grid[0]), float(grid[-1]))
    ax_lin.axvline(0.0, color="k", lw=0.6, alpha=0.4)
    _outlier_rug(ax_lin, outliers, log=False,
                 label=f"H outliers ({n_out}, {'eigh' if d0.exact else 'Lanczos'})")
    if d0.exact:
        ax_lin.set_title(f"Spectral density (exact: all {d0.dimension:,} eigenvalues, "
                         "Gaussian-broadened)")
    else:
        ax_lin.fill_between([], [], [], color="grey", alpha=0.3,
                            label="+-1 std. error (SLQ probes)")
        ax_lin.set_title(f"Spectral density (SLQ, {d0.num_probes} probes x {d0.num_iters} nodes)")
    ax_lin.set_xlabel("eigenvalue λ (loss / parameter²)")
    ax_lin.set_ylabel("density φ(λ) (per unit λ, log scale)")
    ax_lin.legend(loc="upper right", fontsize=8, framealpha=0.9)
    ax_lin.grid(alpha=0.25)

    # log10 |lambda| axis
    hparts = [p for p in parts if not p[0].startswith("H - G")]
    top = max(max(abs(b) for b in p[1].bounds) for p in hparts)
    top = top if top > 0 else 1.0
    mags = d0.nodes.abs()[d0.weights > 1e-12]
    small = float(mags.min()) if mags.numel() else top * 1e-6
    lo_log = max(math.log10(max(small, 1e-300)), math.log10(top) - 8.0)
    hi_log = math.log10(top)
    pad = 0.05 * max(hi_log - lo_log, 1.0)
    lo_log, hi_log = lo_log - pad, hi_log + pad
    lgrid = torch.linspace(lo_log, hi_log, num, dtype=torch.float64)
    sigma = _lsy_sigma(lo_log, hi_log, d0.num_iters)
    eps = top * 1e-12
    curves = [("H, λ > 0", d0, "positive", COLORS["H"], "-"),
              ("H, λ < 0", d0, "negative", COLORS["H"], "--")]
    if analysis.ggn_density is not None:
        curves.append(("G, λ > 0", analysis.ggn_density, "positive", COLORS["G"], "-"))
    lpeak = 0.0
    for label, dens, part, color, ls in curves:
        g, d, se = (_np(t) for t in dens.evaluate(lgrid, sigma=sigma, scale="log", part=part,
                                                   eps=eps))
        se = np.nan_to_num(se)
        neg = dens.negative_fraction()[0]
        mass = neg if part == "negative" else 1.0 - neg
        lpeak = max(lpeak, float(d.max()))
        ax_log.plot(g, d, color=color, ls=ls, lw=1.4, label=f"{label} (mass {mass:.0%})")
        ax_log.fill_between(g, np.maximum(d - se, 1e-300), d + se, color=color, alpha=0.18, lw=0)
    ax_log.set_yscale("log")
    ax_log.set_ylim(lpeak * 10.0 ** (-DENSITY_DECADES + 2) if lpeak > 0 else 1e-300,
                    lpeak * 3 if lpeak > 0 else 1.0)
    ax_log.set_xlim(lo_log, hi_log)
    _mark_log_resolution(ax_log, analysis.negative_part()["resolution"], sigma, lo_log, hi_log)
    _outlier_rug(ax_log, outliers[outliers > 0], log=True, label="H outliers")
    if analysis.outliers.bulk_edge is not None and analysis.outliers.bulk_edge > 0:
        ax_log.axvline(math.log10(analysis.outliers.bulk_edge), color=COLORS["bulk"], ls=":",
                       lw=1.0, label=f"bulk edge {_fmt(analysis.outliers.bulk_edge)}")
    ax_log.set_title("Magnitudes: density of log10|λ| by sign")
    ax_log.set_xlabel("log10 |λ|  (λ in loss / parameter²)")
    ax_log.set_ylabel("density per decade (log scale)")
    ax_log.legend(loc="upper left", fontsize=8, framealpha=0.9)
    ax_log.grid(alpha=0.25)
    return fig


def _mark_log_resolution(ax: Axes, resolution: float, sigma: float, lo: float, hi: float) -> None:
    """Mark what the log-|λ| panel cannot resolve: magnitudes below the density's resolution
    (shaded: their sign and shape are smoothing, not structure) and the Gaussian width used on
    the log axis (a bar of +-sigma decades: lobes narrower than it are the kernel's).
    """
    if resolution > 0 and math.log10(resolution) > lo:
        edge = min(math.log10(resolution), hi)
        ax.axvspan(lo, edge, color="0.6", alpha=0.18, lw=0, hatch="//",
                   label=f"|λ| < {_fmt(resolution)}: below the resolution")
    y = ax.get_ylim()
    level = y[1] / (y[1] / y[0]) ** 0.05 if y[0] > 0 else y[1] * 0.5  # top right
    x0 = hi - 0.04 * (hi - lo) - 2 * sigma
    ax.plot([x0, x0 + 2 * sigma], [level, level], color="0.25", lw=2.5, solid_capstyle="butt",
            label=f"smoothing width ±σ = {sigma:.2g} decades")


# --------------------------------------------------------------------------- top eigenvalues
def _integer_ticks(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _ranked(ax: Axes, values: np.ndarray, residuals: np.ndarray, n_highlight: int, color: str,
            labels: tuple[str, str]) -> None:
    ranks = np.arange(1, values.size + 1)
    pos = values > 0
    hi = ranks <= n_highlight
    for mask, c, lab, size in ((hi & pos, COLORS["outlier"], labels[0], 7),
                               (~hi & pos, color, labels[1], 5)):
        if mask.any():
            ax.errorbar(ranks[mask], values[mask], yerr=np.minimum(residuals[mask],
                                                                   0.99 * values[mask]),
                        fmt="o", ms=size, color=c, ecolor="k", elinewidth=0.8, capsize=2,
                        label=lab)
    if (~pos).any():
        ax.text(0.98, 0.02, f"{int((~pos).sum())} non-positive values not shown (log axis)",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("rank j")
    _integer_ticks(ax)
    ax.grid(alpha=0.25, which="both")


def plot_top_eigenvalues(analysis: SpectrumAnalysis) -> Figure:
    """Ranked top eigenvalues of ``H`` (outliers in red, bulk edge, outlier rule), and of ``G``.

    Error bars are the residual norms ``||A v - l v||`` (a bound on each eigenvalue's error).

    Returns:
        a Figure with two axes (``H``, ``G``), or one when ``G`` was not analysed.
    """
    fig = _figure(figsize=(12.5, 4.6))
    has_g = analysis.ggn_top is not None
    axes = fig.subplots(1, 2, sharey=True) if has_g else [fig.subplots(1, 1)]
    split = analysis.outliers
    top = analysis.top
    _ranked(axes[0], _np(top.eigenvalues), _np(top.residual_norms), split.count, COLORS["H"],
            (f"H outliers ({split.count})", "H, top of the bulk"))
    if split.bulk_edge is not None:  # no outliers: no edge
        axes[0].axhline(split.bulk_edge, color=COLORS["bulk"], ls="--", lw=1,
                        label=f"bulk edge λ_(j+1) = {_fmt(split.bulk_edge)}")
    if split.bulk_edge_slq is not None and split.bulk_edge_slq > 0:
        axes[0].axhline(split.bulk_edge_slq, color=COLORS["bulk"], ls=":", lw=1,
                        label=f"deflated-SLQ bulk bound {_fmt(split.bulk_edge_slq)}")
    sure = getattr(split, "confidence", "clear")
    rule = (f"outlier rule: λ_j / λ_(j+1) ≥ {split.threshold:g}, or a gap well above the "
            f"bulk's spacing\n{split.count} outlier{'s' if split.count != 1 else ''}"
            + (f" ({sure})" if split.count and sure != "clear" else "")
            + (f"; gap ratio at the split {split.gap_ratio:.2f}" if split.count else
               f"; largest gap ratio {split.gap_ratio:.2f}"))
    if analysis.bulk_power_law is not None:
        pl = analysis.bulk_power_law
        rule += f"\nbulk tail λ_j ~ j^(-α): α = {pl.exponent:.2f} ± {pl.std_error:.2f}"
    axes[0].text(0.98, 0.97, rule, transform=axes[0].transAxes, ha="right", va="top", fontsize=8,
                 bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9})
    axes[0].set_title(f"Top {top.k} eigenvalues of H ({int(top.converged.sum())}/{top.k} "
                      f"converged, tol {top.tol:g})")
    axes[0].set_ylabel("eigenvalue λ (loss / parameter², log scale)")
    axes[0].legend(loc="lower left", fontsize=8, framealpha=0.9)
    if has_g:
        g = analysis.ggn_top
        assert g is not None
        _ranked(axes[1], _np(g.eigenvalues), _np(g.residual_norms), split.count, COLORS["G"],
                (f"G, ranks 1-{split.count} (as many as H's outliers)", "G, further ranks"))
        if split.bulk_edge is not None:
            axes[1].axhline(split.bulk_edge, color=COLORS["bulk"], ls="--", lw=1,
                            label=f"H's bulk edge {_fmt(split.bulk_edge)}")
        ov = analysis.overlap_hessian_ggn
        axes[1].set_title(f"Top {g.k} eigenvalues of G; overlap with H's top-{max(split.count, 1)}"
                          f" space {ov:.2f}" if ov is not None else f"Top {g.k} eigenvalues of G")
        axes[1].tick_params(labelleft=True)
        axes[1].set_ylabel("eigenvalue λ (loss / parameter², log scale)")
        axes[1].legend(loc="lower left", fontsize=8, framealpha=0.9)
    return fig


# --------------------------------------------------------------------------- class structure
_TERM_STYLE = {"G1": ("G1 (class means)", "s", "#9467bd"),
               "G12": ("G1+2 (class/cross-class)", "D", "#17becf"),
               "G2": ("G2 (cross-class deviations)", "^", "#8c564b"),
               "G0": ("G0 (correct-class terms)", "v", "#e377c2")}


def _need_classes(analysis: SpectrumAnalysis) -> None:
    if analysis.classes is None:
        raise ValueError("this analysis has no class structure (the loss is not a cross-entropy "
                         "over class labels, or analyze(classes=False)); nothing to plot.")


def plot_class_structure(analysis: SpectrumAnalysis) -> Figure:
    """Spectra of Papyan's ``G0``, ``G1``, ``G2``, ``G1+2`` beside ``H``'s top eigenvalues, and
    how much of ``H``'s outlier space each term's top space covers.

    Returns:
        a Figure with two axes.

    Raises:
        ValueError: the analysis has no class structure.
    """
    _need_classes(analysis)
    cls = analysis.classes
    assert cls is not None
    fig = _figure(figsize=(12.5, 5.6))
    ax, ax_ov = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.7, 1]})
    split = analysis.outliers
    top = _np(analysis.top.eigenvalues)
    limit = max(3 * top.size, 2 * cls.num_classes)
    ranks = np.arange(1, top.size + 1)
    ok = top > 0
    ax.plot(ranks[ok], top[ok], "o", ms=9, mfc="none", mec="k", mew=1.2,
            label="H top eigenvalues (Lanczos)")
    out = ok & (ranks <= split.count)
    ax.plot(ranks[out], top[out], "o", ms=9, color=COLORS["outlier"], alpha=0.35,
            label=f"H outliers ({split.count})")
    tiny = max(float(top.max()) if top.size else 0.0, 1e-300) * 1e-12
    shown_max = 0
    for term in ("G1", "G12", "G2", "G0"):
        lab, marker, color = _TERM_STYLE[term]
        spec = _np(cls.spectrum(term))[:limit]
        spec = spec[spec > tiny]
        n_above = analysis.class_outliers.get(term)
        extra = f"; {n_above} above bulk edge" if n_above is not None else ""
        ax.plot(np.arange(1, spec.size + 1), spec, marker=marker, ms=4, lw=0.8, color=color,
                label=f"{lab}{extra}")
        shown_max = max(shown_max, spec.size)
    within = [v for v in analysis.class_within.get("top_eigenvalues", []) if v > tiny]
    if within:
        ax.plot(np.arange(1, len(within) + 1), within, marker="x", ms=5, lw=0.8, color="0.35",
                label="within-class G - G_class")
    if split.bulk_edge is not None:
        ax.axhline(split.bulk_edge, color=COLORS["bulk"], ls="--", lw=1,
                   label=f"H bulk edge {_fmt(split.bulk_edge)}")
    ax.set_yscale("log")
    ax.set_xlim(0, max(shown_max, top.size) + 1)
    _integer_ticks(ax)
    ax.set_xlabel("rank j")
    ax.set_ylabel("eigenvalue (loss / parameter², log scale)")
    ax.set_title(f"Class structure of G ({cls.num_classes} classes, {cls.mode} Gram)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8,
              framealpha=0.9)
    ax.grid(alpha=0.25, which="major")

    terms = [t for t in ("G1", "G12", "G2", "G0") if t in analysis.class_overlaps]
    vals = [analysis.class_overlaps[t] for t in terms]
    bars = ax_ov.bar(range(len(terms)), vals, color=[_TERM_STYLE[t][2] for t in terms])
    for b, t in zip(bars, terms):
        n_above = analysis.class_outliers.get(t)
        ax_ov.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.02,
                   f"{b.get_height():.2f}" + (f"\n{n_above} > edge" if n_above is not None else ""),
                   ha="center", va="bottom", fontsize=8)
    ax_ov.set_xticks(range(len(terms)), [t.replace("G12", "G1+2") for t in terms])
    r = max(split.count, 1)
    P = int(analysis.info.get("num_params") or 0)
    if P:
        ax_ov.axhline(r / P, color="k", ls=":", lw=1, label=f"chance level r/P = {r / P:.1e}")
        ax_ov.legend(loc="upper right", fontsize=8)
    ax_ov.set_ylim(0, 1.25)
    ax_ov.set_xlabel("term")
    ax_ov.set_ylabel(f"overlap with H's top-{r} space (0..1)")
    ax_ov.set_title("Which term carries the outliers")
    ax_ov.grid(alpha=0.25, axis="y")
    return fig


# --------------------------------------------------------------------------- embedding
def _class_colors(C: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if C <= 10 else "tab20" if C <= 20 else "viridis"]
    return [cmap(c if C <= 20 else c / max(C - 1, 1)) for c in range(C)]


def _pc_shares(gram: torch.Tensor, coords: np.ndarray) -> list[float]:
    m = gram.shape[0]
    Hc = torch.eye(m, dtype=torch.float64) - 1.0 / m
    total = float(torch.trace(Hc @ gram.to(torch.float64) @ Hc))
    return [float((coords[:, i] ** 2).sum()) / total if total > 0 else float("nan")
            for i in range(coords.shape[1])]


def plot_embedding(analysis: SpectrumAnalysis) -> Figure:
    """PCA (exact, from the Gram matrix) of the class means ``delta_c`` and of the class-pair
    means ``delta_{c,c'}``, coloured by the true class ``c``.

    Returns:
        a Figure with two axes.

    Raises:
        ValueError: the analysis has no class structure.
    """
    _need_classes(analysis)
    cls = analysis.classes
    assert cls is not None
    C = cls.num_classes
    colors = _class_colors(C)
    fig = _figure(figsize=(12.5, 5.2))
    ax_m, ax_p = fig.subplots(1, 2)
    for ax, which, gram in ((ax_m, "class_means", cls.means_gram()), (ax_p, "pairs", cls.gram)):
        xy = _np(cls.embedding(which, dims=2))
        if xy.shape[1] < 2:
            xy = np.concatenate([xy, np.zeros((xy.shape[0], 2 - xy.shape[1]))], axis=1)
        share = _pc_shares(gram, xy)
        if which == "class_means":
            for c in range(C):
                ax.scatter(xy[c, 0], xy[c, 1], s=70, color=colors[c], edgecolor="k", lw=0.6,
                           label=f"class {c}" if C <= 10 else None, zorder=3)
                if C <= 30:
                    ax.annotate(str(c), (xy[c, 0], xy[c, 1]), xytext=(5, 5),
                                textcoords="offset points", fontsize=8)
            ax.set_title(f"Class means δ_c ({C} classes)")
        else:
            idx = np.arange(C * C)
            c_of, c2_of = idx // C, idx % C
            for c in range(C):
                off = (c_of == c) & (c2_of != c)
                diag = (c_of == c) & (c2_of == c)
                ax.scatter(xy[off, 0], xy[off, 1], s=22, color=colors[c], alpha=0.8, lw=0,
                           zorder=2)
                ax.scatter(xy[diag, 0], xy[diag, 1], s=120, marker="*", color=colors[c],
                           edgecolor="k", lw=0.6, zorder=3)
            ax.scatter([], [], s=22, color="grey", label="δ_(c,c'), c' ≠ c")
            ax.scatter([], [], s=120, marker="*", color="grey", edgecolor="k", lw=0.6,
                       label="δ_(c,c) (correct class)")
            ax.set_title(f"Class-pair means δ_(c,c') ({C * C} points), colour = class c")
        ax.set_xlabel(f"PC 1 ({share[0]:.0%} of variance; gradient units)")
        ax.set_ylabel(f"PC 2 ({share[1]:.0%} of variance; gradient units)")
        ax.set_aspect("equal", adjustable="datalim")
        ax.axhline(0, color="k", lw=0.5, alpha=0.3)
        ax.axvline(0, color="k", lw=0.5, alpha=0.3)
        ax.grid(alpha=0.25)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8, framealpha=0.9, ncol=2 if C > 5 else 1)
    return fig


# --------------------------------------------------------------------------- sweeps
def is_sweep(section: Any) -> bool:
    """Whether an extras section is a sweep: a :class:`~curvscope.analysis.sweeps.Sweep`, or a
    dict (a caller's, or a saved one's JSON) with ``x`` and ``top_eigenvalues``.
    """
    if isinstance(section, Sweep):
        return True
    return isinstance(section, Mapping) and "x" in section and "top_eigenvalues" in section


def plot_sweep(section: Sweep | Mapping[str, Any], *, name: str | None = None) -> Figure:
    """Top-eigenvalue positions across a sweep (sample sizes, checkpoints, ...).

    Args:
        section: a :class:`~curvscope.analysis.sweeps.Sweep`, or a dict with its fields:
            ``{"x": [n], "top_eigenvalues": [n, k]}`` with optional ``"x_label"``,
            ``"title"``, ``"bulk_edge": [n]``, ``"std_error": [n, k]`` (error bars),
            ``"log_x": bool`` (default: when ``x`` is positive and spans 2 decades). Lists,
            tensors or numpy arrays; missing entries as NaN.
        name: the section's name (default title).

    Returns:
        a Figure with one axis.

    Raises:
        ValueError: keys missing or shapes that do not match.
    """
    sweep = section if isinstance(section, Sweep) else Sweep.from_mapping(section)
    x = _np(sweep.x).reshape(-1)
    Y = _np(sweep.top_eigenvalues)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2 or Y.shape[0] != x.size:
        raise ValueError(f"top_eigenvalues must have shape [len(x)={x.size}, k], got "
                         f"{list(Y.shape)}.")
    err = _np(sweep.std_error) if sweep.std_error is not None else None
    if err is not None and err.reshape(Y.shape[0], -1).shape != Y.shape:
        raise ValueError(f"std_error must have the shape of top_eigenvalues {list(Y.shape)}, got "
                         f"{list(err.shape)}.")
    fig = _figure(figsize=(8.5, 4.8))
    ax = fig.subplots(1, 1)
    from matplotlib import colormaps

    k = Y.shape[1]
    cmap = colormaps["viridis"]
    for j in range(k):
        color = cmap(j / max(k - 1, 1) * 0.9)
        yerr = None if err is None else err.reshape(Y.shape)[:, j]
        ax.errorbar(x, Y[:, j], yerr=yerr, fmt="-o", ms=3.5, lw=1, color=color, capsize=2,
                    label=f"λ_{j + 1}" if (k <= 10 or j in (0, k - 1)) else None)
    if sweep.bulk_edge is not None:
        edge = _np(sweep.bulk_edge).reshape(-1)
        ax.plot(x, edge, "k--", lw=1.2, label="bulk edge")
    finite = Y[np.isfinite(Y)]
    if finite.size and (finite > 0).all():
        ax.set_yscale("log")
    log_x = sweep.log_x
    if log_x is None:
        log_x = bool((x > 0).all() and x.max() / x.min() >= 100) if x.size else False
    if log_x:
        ax.set_xscale("log")
    title_name = (name or "").replace("_", " ")
    x_label = str(sweep.x_label if sweep.x_label != "x" else title_name or "x")
    ax.set_xlabel(x_label)
    ax.set_ylabel("eigenvalue λ (loss / parameter²" + (", log scale)" if finite.size and
                                                     (finite > 0).all() else ")"))
    ax.set_title(str(sweep.title or f"Top {k} eigenvalues across {title_name or x_label}"))
    ax.grid(alpha=0.25, which="both")
    ax.legend(loc="best", fontsize=8, ncol=2 if k > 5 else 1, framealpha=0.9)
    return fig


# --------------------------------------------------------------------------- other sections
def plot_train_vs_test(section: TrainVsTest, *, name: str | None = None) -> Figure:
    """The top eigenvalues on training and on held-out data, rank by rank, with each split's
    bulk edge (the section of :func:`curvscope.analysis.sections.train_vs_test`).
    """
    tr, te = _np(section.train_top).reshape(-1), _np(section.test_top).reshape(-1)
    fig = _figure(figsize=(8.5, 4.4))
    ax = fig.subplots(1, 1)
    ax.plot(np.arange(1, tr.size + 1), tr, "o-", ms=4, lw=1, color="#1f77b4", label="train")
    ax.plot(np.arange(1, te.size + 1), te, "s--", ms=4, lw=1, color="#d62728", label="test")
    for edge, color, split in ((section.train_bulk_edge, "#1f77b4", "train"),
                               (section.test_bulk_edge, "#d62728", "test")):
        if edge is not None and np.isfinite(float(edge)):
            ax.axhline(float(edge), color=color, ls=":", lw=1, label=f"{split} bulk edge")
    if tr.size and (tr > 0).all() and (te > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("rank j")
    ax.set_ylabel("eigenvalue λ_j")
    ax.set_title(str(section.title or f"Top {tr.size} eigenvalues: train "
                     f"({section.train_outliers} outliers) vs test ({section.test_outliers})"))
    ax.grid(alpha=0.25, which="both")
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    return fig


def plot_mask_overlap(section: MaskOverlap, *, name: str | None = None) -> Figure:
    """The top eigenspace's weight on the largest-magnitude parameters against mask size, with
    chance (the section of :func:`curvscope.analysis.sections.mask_overlap_curve`).
    """
    P = float(section.num_params)
    m = _np(section.mask_sizes).reshape(-1) / P
    fig = _figure(figsize=(8.5, 4.4))
    ax = fig.subplots(1, 1)
    ax.plot(m, _np(section.overlap).reshape(-1), "o-", ms=4, lw=1.2, color="#2ca02c",
            label=f"overlap with the top-{section.k} eigenspace")
    ax.plot(m, _np(section.chance).reshape(-1), "k--", lw=1, label="chance (mask size / P)")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"mask: fraction of the {int(P):,} parameters kept ({section.mask})")
    ax.set_ylabel("overlap (0..1)")
    ax.set_title(str(section.title or "Weight of the top eigenspace on the largest parameters"))
    ax.grid(alpha=0.25, which="both")
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    return fig


#: The figure of each section class; sweeps (:func:`is_sweep`) are drawn by :func:`plot_sweep`.
SECTION_PLOTS: dict[type, Callable[..., Figure]] = {
    TrainVsTest: plot_train_vs_test,
    MaskOverlap: plot_mask_overlap,
}


def section_kind(section: Any) -> str | None:
    """The ``kind`` of a section: a section object's, or a dict's (its JSON) entry."""
    if isinstance(section, Mapping):
        kind = section.get("kind")
        return None if kind is None else str(kind)
    return getattr(section, "kind", None)


def section_image_name(name: str, section: Any) -> str | None:
    """The image name of an extras section's figure (``None``: the section has none); the
    section object or its saved JSON give the same name.
    """
    if is_sweep(section):
        return f"sweep_{_safe(name)}"
    if type(section) in SECTION_PLOTS or (
            isinstance(section, Mapping) and SECTION_TYPES.get(str(section_kind(section)))
            in SECTION_PLOTS and DATACLASS in section):
        return f"section_{_safe(name)}"
    return None


def plot_section(name: str, section: Any) -> Figure:
    """The figure of one extras section (a sweep, or a class in :data:`SECTION_PLOTS`)."""
    if is_sweep(section):
        return plot_sweep(section, name=name)
    return SECTION_PLOTS[type(section)](section, name=name)


# --------------------------------------------------------------------------- all at once
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "section"


def render_pngs(analysis: SpectrumAnalysis, extras: dict[str, Any] | None = None, *,
                dpi: int = 110) -> dict[str, bytes]:
    """Every applicable figure as PNG bytes, ``{name: png}`` in report order.

    Names: ``density``, ``top_eigenvalues``, ``class_structure`` and ``embedding`` (with a class
    structure), ``sweep_<section>`` for each sweep in ``extras`` and ``section_<section>``
    for each other section with a figure (:func:`section_image_name`).
    """
    figs: dict[str, Figure] = {"density": plot_density(analysis),
                               "top_eigenvalues": plot_top_eigenvalues(analysis)}
    if analysis.classes is not None:
        figs["class_structure"] = plot_class_structure(analysis)
        figs["embedding"] = plot_embedding(analysis)
    for name, section in (extras or {}).items():
        key = section_image_name(name, section)
        if key is not None:
            figs[key] = plot_section(name, section)
    out = {}
    for name, fig in figs.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        out[name] = buf.getvalue()
    return out
