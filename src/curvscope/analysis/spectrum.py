"""The main job: the whole curvature picture of a model, with its explanation.

:func:`analyze` runs, on one :class:`~curvscope.Problem`:

1. the top-``k`` and bottom-``k`` Hessian eigenpairs (thick-restart Lanczos, certified residuals);
2. the SLQ density of the Hessian (linear and log scale), its bounds, the trace, the fraction and
   mass of negative eigenvalues;
3. the outlier / bulk split (:func:`~curvscope.analysis.outliers.find_outliers`), the density of
   the bulk after deflating the outliers, a power-law fit of the bulk's top;
4. Papyan's split ``H = G + H_res``: top eigenpairs and densities of the Gauss-Newton part ``G``
   and of the residual, and the overlap of the top eigenspaces of ``H`` and ``G``;
5. for cross-entropy, the class structure of ``G`` (:mod:`~curvscope.analysis.class_structure`):
   spectra of ``G_0``, ``G_1``, ``G_2``, ``G_{1+2}``, how many outliers each explains, overlaps
   with the top eigenspace, and a PCA embedding of the class means.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from curvscope._diagnostics import Cost
from curvscope._progress import Progress, ProgressUpdate, StagePlan, counting_products
from curvscope._stages import StageStore, problem_fingerprint
from curvscope.analysis.class_structure import ClassStructure, class_structure
from curvscope.analysis.formatting import with_error
from curvscope.analysis.outliers import (
    OutlierSplit,
    PowerLawFit,
    find_outliers,
    fit_power_law,
    subspace_overlap,
)
from curvscope.curvature._losses import recognise_loss
from curvscope.curvature._operators import GGNOperator, HessianOperator, ResidualOperator
from curvscope.curvature._problem import Problem
from curvscope.estimators.slq import SpectralDensity, slq
from curvscope.estimators.stats import student_t_quantile
from curvscope.solvers._results import ConvergenceWarning, EigenResult
from curvscope.solvers.dense import DENSE_BLOCK, dense_matrix, eigenpairs, spectrum_of
from curvscope.solvers.eigsh import default_block_size, eigsh, product_noise

logger = logging.getLogger(__name__)

BUDGETS = {  # num_probes, num_iters, extra top eigenpairs
    "small": (4, 40),
    "default": (10, 80),
    "large": (20, 150),
}


@dataclass(frozen=True)
class SpectrumAnalysis:
    """Everything :func:`analyze` measured (tensors on the host)."""

    info: dict[str, Any]
    top: EigenResult
    bottom: EigenResult
    density: SpectralDensity
    bulk_density: SpectralDensity | None
    outliers: OutlierSplit
    bulk_power_law: PowerLawFit | None
    ggn_top: EigenResult | None
    ggn_density: SpectralDensity | None
    residual_density: SpectralDensity | None
    overlap_hessian_ggn: float | None
    classes: ClassStructure | None
    class_overlaps: dict[str, float] = field(default_factory=dict)
    class_outliers: dict[str, int] = field(default_factory=dict)
    class_within: dict[str, Any] = field(default_factory=dict)

    def trace(self) -> tuple[float, float]:
        """``tr H`` from the density (``n * mean sum tau theta``) and its standard error."""
        return self.density.trace_function(lambda t: t)

    def summary(self) -> list[str]:
        """Plain-language findings, one sentence each."""
        out = []
        C = self.info.get("num_classes")
        n_out = self.outliers.count
        cls = f" for {C} classes" if C else ""
        split = self.outliers
        if n_out:
            sure = "" if split.confidence == "clear" else f" ({split.confidence})"
            evidence = split.evidence or f"gap ratio {split.gap_ratio:.2f} at the split"
            out.append(f"{n_out} outlier{'s' if n_out != 1 else ''}{cls}{sure}: the top {n_out} "
                       f"eigenvalue{'s stand' if n_out != 1 else ' stands'} out of the bulk "
                       f"({evidence}; bulk edge {split.bulk_edge:.3g}).")
        else:
            out.append(f"No outliers{cls}: " + (split.evidence or (
                f"no gap ratio among the top eigenvalues reaches {split.threshold} (largest "
                f"{split.gap_ratio:.2f})")) + ".")
        if self.overlap_hessian_ggn is not None and n_out:
            out.append(self._carrier_sentence())
        if self.residual_density is not None and self.ggn_density is not None:
            out.append("Bulk from the residual H - G: its spectrum is "
                       f"[{self.residual_density.bounds[0]:.3g}, "
                       f"{self.residual_density.bounds[1]:.3g}], G's is "
                       f"[{self.ggn_density.bounds[0]:.3g}, {self.ggn_density.bounds[1]:.3g}].")
        part = self.negative_part()
        res, (neg, _), (near, _) = part["resolution"], part["clearly_negative"], part["near_zero"]
        mass = part["mass"][0]
        out.append(f"{neg:.0%} of eigenvalues clearly negative (below -{res:.2g}, the density's "
                   f"resolution), {near:.0%} within +-{res:.2g} of zero; negative eigenvalues "
                   f"carry {mass:.0%} of the spectral mass (smallest eigenvalue "
                   f"{self._smallest_eigenvalue()}).")
        tr, half = self.trace_interval()
        how = ("exact: every eigenvalue from the dense Hessian" if self.density.exact else
               f"(95% interval over {self.density.num_probes} probes)")
        if not self.density.exact and half >= abs(tr):
            how += (": unresolved, the interval is wider than the value (about "
                    f"{_probes_to_resolve(self.density.num_probes, tr, half)} probes would "
                    "resolve it)")
        shown = f"{tr:.4g}" if self.density.exact else with_error(tr, half)
        out.append(f"Trace {shown} {how}; spectrum within "
                   f"[{self.density.bounds[0]:.3g}, {self.density.bounds[1]:.3g}].")
        if self.classes is not None and n_out:
            top = self.top.eigenvalues[:n_out].to(torch.float64)
            parts = []
            for term, label in (("G12", "class/cross-class means (G1+2)"),
                                ("G1", "class means (G1)")):
                spec = self.classes.spectrum(term)[:n_out]
                share = float(spec.sum() / top.sum())
                parts.append(f"the {label} give {self.class_outliers.get(term, 0)} eigenvalues "
                             f"above the bulk edge, {share:.0%} of the outliers' magnitude, "
                             f"overlap {self.class_overlaps.get(term, float('nan')):.2f} with "
                             "their eigenspace")
            out.append(f"Class structure of G ({self.classes.mode}): " + "; ".join(parts) + ".")
        return out

    def ggn_above_edge(self) -> int | None:
        """How many of G's top eigenvalues lie above H's bulk edge (``None``: no G or no edge)."""
        if self.ggn_top is None or self.outliers.bulk_edge is None:
            return None
        return int((self.ggn_top.eigenvalues > self.outliers.bulk_edge).sum())

    def _carrier_sentence(self) -> str:
        """Whether G carries the outliers: its eigenvalues above H's bulk edge and the overlap of
        its top space with H's (a term with none above the edge carries nothing).
        """
        n_out, ov, above = self.outliers.count, self.overlap_hessian_ggn, self.ggn_above_edge()
        assert ov is not None
        if not above:
            return (f"G (the Gauss-Newton part) has no eigenvalue above the bulk edge: it does "
                    f"not carry the outliers (overlap of the top-{n_out} eigenspaces of H and G "
                    f"{ov:.2f}).")
        carrier = "G (the Gauss-Newton part)" if ov >= 0.5 else "not G alone"
        return (f"Outliers carried by {carrier}: {above} of G's eigenvalues above the bulk edge, "
                f"overlap of the top-{n_out} eigenspaces of H and G {ov:.2f}.")

    def _smallest_eigenvalue(self) -> str:
        """The smallest eigenvalue found; when its pair did not converge, with its residual norm
        as the error bar (some eigenvalue of H lies within ``||Hv - lambda v||`` of it), as the
        key-number table shows it.
        """
        i = int(self.bottom.eigenvalues.argmin())
        lam = float(self.bottom.eigenvalues[i])
        if bool(self.bottom.converged[i]):
            return f"{lam:.3g}"
        return (f"{with_error(lam, float(self.bottom.residual_norms[i]))}, its residual bound: "
                "not converged")

    def negative_part(self) -> dict[str, Any]:
        """The negative part of the spectrum as every view reports it: the fraction of
        eigenvalues clearly negative (below ``-resolution``), the fraction within
        ``+-resolution`` of zero (the density cannot tell their sign), and the negative share of
        the spectral mass, each ``(value, standard error)``; ``resolution`` is the density's
        (SLQ: its Gaussian width; exact: the products' rounding).
        """
        res = self.density.resolution()
        return {"resolution": res,
                "clearly_negative": self.density.negative_fraction(threshold=res),
                "near_zero": self.density.near_zero_fraction(res),
                "mass": self.density.negative_mass()}

    def trace_interval(self, level: float = 0.95) -> tuple[float, float]:
        """``tr H`` and the half-width of its ``level`` interval (Student t over the probes)."""
        tr, se = self.trace()
        if self.density.exact:
            return tr, 0.0
        return tr, student_t_quantile(level, self.density.num_probes - 1) * se


def analyze(
    problem: Problem,
    *,
    k: int | None = None,
    budget: str = "default",
    seed: int = 0,
    outlier_threshold: float = 1.5,
    papyan: bool = True,
    classes: bool | None = None,
    class_mode: str = "auto",
    on_stage: Callable[[str, dict[str, Any]], None] | None = None,
    bottom_k: int = 5,
    exact: bool | None = None,
    checkpoint_dir: str | Path | None = None,
    on_progress: Callable[[ProgressUpdate], None] | None = None,
    progress: Progress | None = None,
) -> SpectrumAnalysis:
    """Run the full spectrum analysis of a Problem's Hessian (see the module docstring).

    Args:
        problem: the Problem.
        k: top eigenpairs to compute (default ``2 C + 10`` for ``C`` classes, else 20).
        budget: ``"small"``, ``"default"`` or ``"large"``: SLQ probes x Lanczos steps.
        seed: seed of every random choice.
        outlier_threshold: gap ratio of the outlier rule.
        papyan: also analyse ``G`` and ``H - G``.
        classes: class structure of ``G`` (default: when the loss is cross-entropy).
        class_mode: ``"auto"``, ``"exact"`` or ``"sketch"`` (see :func:`class_structure`).
        on_stage: called as ``on_stage(name, results_so_far)`` after each stage (the CLI saves
            them, so an interrupted run keeps what it computed).
        bottom_k: smallest eigenpairs to compute (to ``1e-3 ||H||`` absolute residual).
        exact: ``True``: the dense matrices of ``H`` and ``G`` from products of identity blocks
            and ``eigh`` (every eigenvalue, exact densities); ``False``: Lanczos, eigsh and SLQ;
            ``None`` (default): exact when :func:`exact_is_cheaper` (``P`` up to
            :data:`EXACT_MAX_PARAMS` and the cheaper by :func:`timed_plan`).
        checkpoint_dir: a folder that makes the analysis resumable
            (:class:`~curvscope._stages.StageStore`): every finished stage is saved there and
            every solver checkpoints inside its stage, so the same call after a kill (SIGKILL
            included) continues and returns what an uninterrupted call returns; a folder of
            another model, data or options is refused (``CheckpointMismatchError``). The
            folder is left for the caller to delete.
        on_progress: called with a :class:`~curvscope._progress.ProgressUpdate` after every
            curvature product and stage: the stage, its product columns done of planned, the
            run's, and the estimated seconds left (a progress bar's numbers). The plan itself
            (:func:`stage_plan`) comes with the ``plan`` stage of ``on_stage``; planned beside
            done per stage is in ``info["progress"]``.
        progress: a :class:`~curvscope._progress.Progress` shared with a larger run (as
            :func:`~curvscope.study.run_study` does): this analysis adds its stages to that
            plan, and the caller counts the products (``counting_products(progress.add)``);
            ``on_progress`` is then not used.
    """
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {sorted(BUDGETS)}, got {budget!r}.")
    if class_mode not in ("auto", "exact", "sketch"):
        raise ValueError(f"class_mode must be 'auto', 'exact' or 'sketch', got {class_mode!r}.")
    if not outlier_threshold > 1:
        raise ValueError(f"outlier_threshold must be > 1 (a ratio), got {outlier_threshold}.")
    if progress is not None:
        return _analyze(problem, k, budget, seed, outlier_threshold, papyan, classes, class_mode,
                        on_stage, bottom_k, exact, checkpoint_dir, progress)
    progress = Progress(on_progress)
    with counting_products(progress.add):
        return _analyze(problem, k, budget, seed, outlier_threshold, papyan, classes, class_mode,
                        on_stage, bottom_k, exact, checkpoint_dir, progress)


def _analyze(problem: Problem, k: int | None, budget: str, seed: int, outlier_threshold: float,
             papyan: bool, classes: bool | None, class_mode: str,
             on_stage: Callable[[str, dict[str, Any]], None] | None, bottom_k: int,
             exact: bool | None, checkpoint_dir: str | Path | None,
             progress: Progress) -> SpectrumAnalysis:
    """:func:`analyze` with its arguments checked, inside its product count."""
    num_probes, num_iters = BUDGETS[budget]
    num_classes = _num_classes(problem)
    P = problem.num_params
    if k is None:
        k = 2 * num_classes + 10 if num_classes else 20
    k = min(k, P)

    def gen(offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed + offset)

    done: dict[str, Any] = {}
    notes: list[str] = []

    def emit(name: str, value: Any) -> None:
        done[name] = value.to_dict() if hasattr(value, "to_dict") else value
        if on_stage is not None:
            on_stage(name, done)

    store = StageStore(checkpoint_dir, None if checkpoint_dir is None else {
        **problem_fingerprint(problem), "k": k, "budget": budget, "seed": seed,
        "outlier_threshold": outlier_threshold, "papyan": papyan, "classes": classes,
        "class_mode": class_mode, "bottom_k": bottom_k, "exact": exact,
        "version": _version()}, HessianOperator(problem), progress=progress)
    split_cols = planned_split(num_probes, num_iters, k, min(bottom_k, P), papyan)
    cols = sum(split_cols)

    def choose(_: Any) -> dict[str, Any]:
        H = HessianOperator(problem)
        block = default_block_size(H, k)  # eigsh's, from the same timed products
        plan = timed_plan(H, P, split_cols, num_probes, papyan, solve_block=block)
        if plan is not None:
            plan["solve_block"] = block
            if papyan:  # G's products have their own cost (no second derivatives)
                G = GGNOperator(problem)
                ggn = {w: G.estimated_seconds_per_column(int(w)) for w in plan["seconds_per_column"]}
                plan["ggn_seconds_per_column"] = (None if any(t is None for t in ggn.values())
                                                  else ggn)
        if exact is not None:
            use = bool(exact)
        elif plan is not None and plan["exact_s"] is not None:
            use = plan["exact_s"] <= plan["iterative_s"]
        else:
            use = exact_is_cheaper(P, cols, papyan)
        return {"use_exact": use, "plan": plan}

    chosen = store.run("plan", choose)
    use_exact, plan = chosen["use_exact"], chosen["plan"]
    stages = stage_plan(P, use_exact, k, min(bottom_k, P), papyan, num_probes, num_iters,
                        None if plan is None else plan["seconds_per_column"],
                        solve_block=1 if plan is None else plan.get("solve_block", 1),
                        ggn_seconds_per_column=None if plan is None else
                        plan.get("ggn_seconds_per_column"),
                        num_classes=num_classes if num_classes and classes is not False
                        else None)
    progress.set_plan(stages)
    emit("plan", {"method": "exact" if use_exact else "iterative",
                  "product_columns": sum(s.columns or 0 for s in stages),
                  "estimated_seconds": planned_seconds(stages),
                  "stages": [s.to_dict() for s in stages], "k": k,
                  "solve_block": 1 if plan is None else plan.get("solve_block", 1),
                  "seconds_per_column": None if plan is None else plan["seconds_per_column"]})
    if use_exact:
        spectra = _exact_spectra(problem, k, min(bottom_k, P), papyan, emit, store)
    else:
        spectra = _iterative_spectra(problem, k, min(bottom_k, P), papyan, num_probes, num_iters,
                                     outlier_threshold, gen, emit, notes, store, num_classes)
    top, bottom, density = spectra["top"], spectra["bottom"], spectra["density"]
    split = find_outliers(top.eigenvalues, threshold=outlier_threshold,
                          bulk_upper_bound=spectra["bulk_upper_bound"], num_classes=num_classes)
    bulk_density = spectra["bulk_density"](split.count)
    tail = top.eigenvalues[split.count:]
    power = fit_power_law(tail) if int((tail > 0).sum()) >= 3 else None
    ggn_top, ggn_density = spectra.get("ggn_top"), spectra.get("ggn_density")
    residual_density = spectra.get("residual_density")
    overlap = None
    if ggn_top is not None:
        r = max(split.count, 1)
        overlap = subspace_overlap(_vectors(top, r), _vectors(ggn_top, r))
        emit("papyan", {"ggn_top": ggn_top.to_dict(), "overlap_hessian_ggn": overlap})
    cls = None
    overlaps: dict[str, float] = {}
    explains: dict[str, int] = {}
    within: dict[str, Any] = {}
    if classes is None:
        classes = num_classes is not None
    if classes and num_classes:
        r = max(split.count, 1)

        def class_stage(inside: Path | None) -> dict[str, Any]:
            full = class_structure(problem, eigenvectors=_vectors(top, r), mode=class_mode,
                                   seed=seed, keep_vectors=True, checkpoint=inside)
            return {"overlaps": {t: full.overlap_with(t, rank=r) for t in CLASS_TERMS},
                    "explains": {t: 0 if split.bulk_edge is None else
                                 int((full.spectrum(t) > split.bulk_edge).sum())
                                 for t in CLASS_TERMS},
                    "within": _within_class(problem, full, ggn_density, gen(8)),
                    # C^2 P numbers: not kept in the result
                    "classes": dataclasses.replace(full, vectors=None)}

        found = store.run("classes", class_stage)
        cls, overlaps, explains, within = (found["classes"], found["overlaps"], found["explains"],
                                           found["within"])
        emit("classes", cls)
    info = {
        "num_params": P, "num_data": problem.num_data, "data_unit": problem.data_unit,
        "num_classes": num_classes,
        "dtype": str(problem.dtype), "device": str(problem.device), "mode": problem.mode,
        "reduction": problem.reduction, "seed": seed, "budget": budget, "k": k,
        "num_probes": num_probes, "num_iters": num_iters, "notes": notes,
        "method": "exact" if use_exact else "iterative",
        "product_noise": spectra.get("product_noise"), "tol": spectra.get("tol"),
        "method_reason": _method_reason(use_exact, exact, P, cols, papyan, plan),
        "method_plan": plan,
        "progress": [r for r in progress.summary() if r["state"] == "unplanned"
                     or any(r["name"] == s.name for s in stages)],
    }
    return SpectrumAnalysis(info, _host(top), _host(bottom), density, bulk_density, split, power,
                            None if ggn_top is None else _host(ggn_top), ggn_density,
                            residual_density, overlap, cls, overlaps, explains, within)


#: The class-structure terms of G whose overlaps and outlier counts the analysis reports.
CLASS_TERMS = ("G1", "G12", "G0", "G2")


def _version() -> str:
    from curvscope import __version__

    return __version__


#: Above this many parameters the analysis never forms dense matrices (``P^2`` float64 numbers
#: each for H, G and their eigenvectors, and ``O(P^3)`` eigh: about 5 s on one core at 3000).
EXACT_MAX_PARAMS = 3000


def planned_split(num_probes: int, num_iters: int, k: int, bottom_k: int,
                  papyan: bool) -> tuple[int, int]:
    """Product columns the iterative analysis is expected to take, ``(densities, solves)``:
    ``p x m`` per SLQ density (H's bulk, from which H's density follows, and with ``papyan`` G
    and H - G), and about ``4 k + 20`` per eigsh (top of H, top of G) plus ``4 bottom_k + 20``
    for the bottom of H.
    """
    densities = 3 if papyan else 1
    solves = solve_columns(k) * (2 if papyan else 1) + bottom_columns(bottom_k)
    return densities * num_probes * num_iters, solves


def stage_plan(P: int, use_exact: bool, k: int, bottom_k: int, papyan: bool, num_probes: int,
               num_iters: int, seconds_per_column: dict[str, float] | None, *,
               num_classes: int | None, solve_block: int = 1,
               ggn_seconds_per_column: dict[str, float] | None = None) -> list[StagePlan]:
    """The stages the analysis will run, each with its product columns, data passes and
    estimated seconds (from ``seconds_per_column``, the timed products of :func:`timed_plan`,
    keyed by columns per product; ``None``: not timed).

    Exact path: ``dense_H`` forms ``P`` columns in blocks of :data:`DENSE_BLOCK` and measures the
    top-``k`` and bottom pairs' residuals with one product each; ``dense_G`` likewise for ``G``
    (top ``k``). Iterative path: the products' noise (one product of 2 columns), eigsh for the
    top ``k`` (about ``4 k + 20`` columns in blocks of ``solve_block``, eigsh's
    :func:`~curvscope.solvers.eigsh.default_block_size`) and the bottom pairs
    (:func:`bottom_columns`, with the larger basis of :func:`bottom_basis`), one
    SLQ density of ``num_probes x num_iters`` columns in ``num_iters`` products (of the deflated
    bulk when there are outliers), and with ``papyan`` G's top pairs and the densities of ``G``
    and ``H - G``. G's stages use G's own timed products (``ggn_seconds_per_column``; H's
    when not given), ``H - G``'s H's (one Hessian product of the linearised loss per column).
    With ``num_classes``
    (the class structure runs): one pass of class-pair gradients (not counted as products) and
    eigsh for the within-class scatter's top ``C`` eigenvalues (``4 C + 20`` columns).
    """
    def seconds(columns: int, per_product: int, of_g: bool = False) -> float | None:
        timed = ggn_seconds_per_column if of_g and ggn_seconds_per_column else seconds_per_column
        return estimated_seconds(timed, columns, per_product)

    def dense(name: str, pairs: tuple[int, ...], of_g: bool = False) -> StagePlan:
        passes = -(-P // DENSE_BLOCK)
        est = seconds(P, DENSE_BLOCK, of_g)
        for n in pairs:
            s = seconds(n, n, of_g)
            est = None if est is None or s is None else est + s
        if est is not None:
            est += EIGH_SECONDS_PER_CUBE * P**3
        return StagePlan(name, P + sum(pairs), passes + len(pairs), est)

    def solve(name: str, wanted: int, cols: int | None = None, of_g: bool = False) -> StagePlan:
        cols = solve_columns(wanted) if cols is None else cols
        block = solve_block if wanted >= solve_block else 1
        return StagePlan(name, cols, -(-cols // block), seconds(cols, block, of_g))

    def density(name: str, also: tuple[str, ...] = (), of_g: bool = False) -> StagePlan:
        cols = num_probes * num_iters
        return StagePlan(name, cols, num_iters, seconds(cols, num_probes, of_g), also)

    if use_exact:
        stages = [dense("dense_H", (k, bottom_k))] + (
            [dense("dense_G", (k,), of_g=True)] if papyan else [])
    else:
        stages = [StagePlan("noise", 2, 1, seconds(2, 2)), solve("top", k),
                  solve("bottom", bottom_k, bottom_columns(bottom_k)),
                  density("density", also=("bulk_density",))]
        if papyan:
            stages += [solve("ggn_top", k, of_g=True), density("ggn_density", of_g=True),
                       density("residual_density")]
    if num_classes:
        # the class-pair gradients (one pass, not curvature products), then eigsh of the
        # within-class scatter for its top C eigenvalues
        cols = solve_columns(num_classes)
        stages.append(StagePlan("classes", cols, cols + 1, seconds(cols, 1)))
    return stages


def estimated_seconds(seconds_per_column: dict[str, float] | None, columns: int,
                      per_product: int) -> float | None:
    """Seconds of ``columns`` product columns made ``per_product`` at a time, from the timed
    seconds per column (keyed by the columns per product timed; the nearest width in ratio is
    used). ``None`` without timings.
    """
    if not seconds_per_column:
        return None
    widths = {int(w): t for w, t in seconds_per_column.items()}
    nearest = min(widths, key=lambda w: abs(math.log(w / max(per_product, 1))))
    return columns * widths[nearest]


def solve_columns(k: int) -> int:
    """Product columns eigsh is planned to take for ``k`` pairs (about ``4 k + 20``)."""
    return 4 * k + 20


def bottom_basis(bottom_k: int, n: int) -> int:
    """Eigsh's basis for the smallest pairs: ``max(20, 12 bottom_k)`` (capped at ``n``).

    The smallest eigenvalues of a trained net sit at the edge of the bulk near zero, in a
    cluster (gaps about 1e-4 of ``||H||`` on the demo): with eigsh's default basis
    (``2 k + 2 b``) restarted Lanczos stalls there (0 of 5 pairs within ``1e-3 ||H||`` after 188
    columns on the demo); with 60 vectors all 5 are in 144 columns.
    """
    return min(max(20, 12 * bottom_k), n)


def bottom_columns(bottom_k: int) -> int:
    """Product columns planned for the smallest pairs: about 2.5 bases (144 on the demo)."""
    return 5 * max(20, 12 * bottom_k) // 2


def planned_seconds(stages: list[StagePlan]) -> float | None:
    """The plan's estimated seconds (stages with products); ``None`` when any is not timed."""
    with_products = [s for s in stages if s.columns is not None]
    if any(s.seconds is None for s in with_products):
        return None
    return sum(float(s.seconds or 0.0) for s in with_products)


def planned_columns(num_probes: int, num_iters: int, k: int, bottom_k: int,
                    papyan: bool) -> int:
    """The total of :func:`planned_split`: to compare with the dense path's ``P`` columns."""
    return sum(planned_split(num_probes, num_iters, k, bottom_k, papyan))


def exact_is_cheaper(P: int, iterative_columns: int, papyan: bool) -> bool:
    """Whether the dense path (``P`` columns of H, and ``P`` of G with ``papyan``) takes no more
    product columns than the iterative plan, for ``P <= EXACT_MAX_PARAMS``.
    """
    return P <= EXACT_MAX_PARAMS and P * (2 if papyan else 1) <= iterative_columns


#: Seconds per ``n^3`` of a float64 ``eigh`` on one CPU core (4270: 21 s, measured).
EIGH_SECONDS_PER_CUBE = 21.0 / 4270**3


def timed_plan(H: HessianOperator, P: int, split: tuple[int, int], num_probes: int,
               papyan: bool, solve_block: int = 1) -> dict[str, Any] | None:
    """The estimated seconds of both paths from the operator's timed trial products
    (:meth:`~curvscope.CurvatureOperator.estimated_seconds_per_column`: the first batch's
    timing scaled to the whole data): the dense
    path forms ``P`` columns of H (and of G with ``papyan``) in blocks of ``DENSE_BLOCK`` and
    runs ``eigh``; the iterative path spends ``split = (densities, solves)`` columns
    (:func:`planned_split`), its densities in products of ``num_probes`` columns, its solves one
    column at a time (``solve_block`` columns when eigsh takes blocks; that width is timed
    too, for the stage plan). Above :data:`EXACT_MAX_PARAMS` the dense path is not timed
    (``exact_s`` is ``None``: a block of 64 columns of a large model is not worth its memory).
    ``None`` when the operator cannot time its products (a forced engine).
    """
    widths = tuple(sorted({1, solve_block, num_probes}
                          | ({DENSE_BLOCK} if P <= EXACT_MAX_PARAMS else set())))
    timed = {w: H.estimated_seconds_per_column(w) for w in widths}
    if any(t is None for t in timed.values()):
        return None
    per = {w: float(t) for w, t in timed.items() if t is not None}
    matrices = 2 if papyan else 1
    slq_cols, solve_cols = split
    return {"exact_s": None if DENSE_BLOCK not in per else
            matrices * (P * per[DENSE_BLOCK] + EIGH_SECONDS_PER_CUBE * P**3),
            "iterative_s": slq_cols * per[num_probes] + solve_cols * per[1],
            "seconds_per_column": {str(w): t for w, t in per.items()}}


def _method_reason(use_exact: bool, asked: bool | None, P: int, cols: int, papyan: bool,
                   plan: dict[str, Any] | None) -> str:
    if asked is not None:
        return f"exact={asked} was asked for"
    if P > EXACT_MAX_PARAMS:
        return f"P = {P} > {EXACT_MAX_PARAMS}: too large for dense matrices"
    dense = P * (2 if papyan else 1)
    if plan is None:
        return (f"products not timed (a forced engine): the dense matrices take {dense} product "
                f"columns, the iterative plan about {cols}")
    return (f"estimated from timed products: dense matrices ({dense} columns + eigh) "
            f"{plan['exact_s']:.2g} s, the iterative plan (about {cols} columns) "
            f"{plan['iterative_s']:.2g} s")


def _exact_spectra(problem: Problem, k: int, bottom_k: int, papyan: bool,
                   emit: Callable[[str, Any], None], store: StageStore) -> dict[str, Any]:
    """Every eigenvalue of H (and of G and H - G) from dense matrices: exact top / bottom
    pairs (residuals measured with products), exact densities; the bulk density is the
    spectrum without its top ``count`` eigenvalues. Two stages: ``dense_H`` and ``dense_G``.
    """
    H = HessianOperator(problem)
    held: dict[str, Tensor] = {}  # H's dense matrix while this run has it (for H - G)

    def hessian_stage(_: Path | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        MH, asym_h, cost_h = dense_matrix(H)
        held["MH"] = MH
        spec_h = spectrum_of(MH, asym_h, cost_h, t0)
        zero_tol = _zero_tol(spec_h.eigenvalues, problem.dtype)
        return {"top": eigenpairs(H, spec_h, k, "LA"), "bottom": eigenpairs(H, spec_h, bottom_k, "SA"),
                "density": SpectralDensity.from_eigenvalues(spec_h.eigenvalues, spec_h.cost,
                                                            zero_tol=zero_tol),
                "values": spec_h.eigenvalues, "cost": spec_h.cost, "zero_tol": zero_tol}

    dense_h = store.run("dense_H", hessian_stage)
    top, bottom, density = dense_h["top"], dense_h["bottom"], dense_h["density"]
    for name, value in (("top", top), ("bottom", bottom), ("density", density)):
        emit(name, value)
    values = dense_h["values"]

    def bulk(count: int) -> SpectralDensity | None:
        if not count:
            return None
        order = values.sort(descending=True).values
        return SpectralDensity.from_eigenvalues(order[count:], dense_h["cost"],
                                                deflated=order[:count], zero_tol=dense_h["zero_tol"])

    out: dict[str, Any] = {"top": top, "bottom": bottom, "density": density,
                           "bulk_upper_bound": None, "bulk_density": bulk}
    if not papyan:
        return out

    def ggn_stage(_: Path | None) -> dict[str, Any]:
        G = GGNOperator(problem)
        t1 = time.perf_counter()
        MG, asym_g, cost_g = dense_matrix(G)
        spec_g = spectrum_of(MG, asym_g, cost_g, t1)
        t2 = time.perf_counter()
        if "MH" in held:
            MH, cost_h = held["MH"], dense_h["cost"]
        else:  # resumed after dense_H: H's matrix again (P more product columns)
            MH, _asym, cost_h = dense_matrix(H)
        res = torch.linalg.eigvalsh(MH - MG)
        cost_r = _sum_costs(cost_h, cost_g, time.perf_counter() - t2)
        return {"ggn_top": _host(eigenpairs(G, spec_g, k, "LA")),
                "ggn_density": SpectralDensity.from_eigenvalues(
                    spec_g.eigenvalues, spec_g.cost,
                    zero_tol=_zero_tol(spec_g.eigenvalues, problem.dtype)),
                "residual_density": SpectralDensity.from_eigenvalues(
                    res, cost_r, zero_tol=_zero_tol(res, problem.dtype))}

    out.update(store.run("dense_G", ggn_stage))
    held.clear()
    return out


def _iterative_spectra(problem: Problem, k: int, bottom_k: int, papyan: bool, num_probes: int,
                       num_iters: int, outlier_threshold: float,
                       gen: Callable[[int], torch.Generator], emit: Callable[[str, Any], None],
                       notes: list[str], store: StageStore,
                       num_classes: int | None = None) -> dict[str, Any]:
    """Top / bottom pairs by eigsh, densities by SLQ; the bulk density after deflating the
    outliers found among the top pairs. Each solve is a stage of ``store``, checkpointed inside.
    """
    H = HessianOperator(problem)
    noise = store.run("noise", lambda _: product_noise(H, gen(9)))
    tol = top_tolerance(noise)
    notes_tol = {"product_noise": noise, "tol": tol}
    top = store.run("top", lambda inside: eigsh(H, k, which="LA", generator=gen(1), tol=tol,
                                                 checkpoint=inside))
    emit("top", top)
    # eigenvalues near zero cannot meet a relative tolerance: accept 1e-3 ||H|| absolute, and
    # a bounded effort (the mask in the result says which pairs converged)
    atol = 1e-3 * float(top.eigenvalues.abs().max())

    def bottom_stage(inside: Path | None) -> dict[str, Any]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            found = eigsh(H, bottom_k, which="SA", generator=gen(2), tol=tol, atol=atol,
                          max_iters=40, num_vectors=bottom_basis(bottom_k, problem.num_params),
                          checkpoint=inside)
        return {"result": found, "notes": [str(w.message) for w in caught]}

    low = store.run("bottom", bottom_stage)
    bottom = low["result"]
    notes += low["notes"]
    emit("bottom", bottom)
    split0 = find_outliers(top.eigenvalues, threshold=outlier_threshold,
                           num_classes=num_classes)
    bulk_density = None
    if split0.count:
        # one SLQ run of the bulk; H's density is the bulk's plus the outliers, exactly
        deflate = _first(top, split0.count)
        bulk_density = store.run("bulk_density", lambda inside: slq(
            H, num_probes, num_iters, deflate=deflate, generator=gen(4), checkpoint=inside))
        density = bulk_density.with_deflated()
    else:
        density = store.run("density", lambda inside: slq(H, num_probes, num_iters,
                                                          generator=gen(3), checkpoint=inside))
    emit("density", density)
    out: dict[str, Any] = {
        "top": top, "bottom": bottom, "density": density, **notes_tol,
        "bulk_upper_bound": bulk_density.bounds[1] if bulk_density else None,
        "bulk_density": lambda count: bulk_density}
    if papyan:
        G = GGNOperator(problem)
        out["ggn_top"] = _host(store.run("ggn_top", lambda inside: eigsh(
            G, k, which="LA", generator=gen(5), tol=tol, checkpoint=inside)))
        out["ggn_density"] = store.run("ggn_density", lambda inside: slq(
            G, num_probes, num_iters, generator=gen(6), checkpoint=inside))
        out["residual_density"] = store.run("residual_density", lambda inside: slq(
            ResidualOperator(problem), num_probes, num_iters, generator=gen(7),
            checkpoint=inside))
    return out


#: The relative residual asked of the top eigenpairs where the products allow it (float64).
TOP_TOL = 1e-6
#: How far above the products' measured rounding the tolerance stays (float32: 30 x ~5e-7).
NOISE_MARGIN = 30.0


def top_tolerance(noise: float) -> float:
    """``max(TOP_TOL, NOISE_MARGIN x noise)``: 1e-6 in float64, about 1e-5 to 3e-5 in float32,
    where 1e-6 is below the products' own rounding and eigsh would stall.
    """
    return max(TOP_TOL, NOISE_MARGIN * noise)


def _zero_tol(eigenvalues: Tensor, dtype: torch.dtype) -> float:
    """Eigenvalues within ``1e3 eps ||A||`` of zero (``eps`` of the products' dtype) are
    rounding noise of either sign, as in :func:`~curvscope.estimators.slq.slq`.
    """
    return 1e3 * torch.finfo(dtype).eps * float(eigenvalues.abs().max())


def _sum_costs(a: Cost, b: Cost, extra_seconds: float) -> Cost:
    return Cost(a.num_matvecs + b.num_matvecs, a.num_products + b.num_products,
                a.num_data_passes + b.num_data_passes,
                a.wall_time + b.wall_time + extra_seconds, {**a.engines, **b.engines})


def _probes_to_resolve(probes: int, value: float, half: float) -> int:
    """Probes for a 95 % half-width of a third of ``|value|``: the width shrinks as
    ``1 / sqrt(probes)``.
    """
    if value == 0:
        return probes * 100
    return int(math.ceil(probes * (3 * half / abs(value)) ** 2))


def _within_class(problem: Problem, cls: ClassStructure, ggn_density: SpectralDensity | None,
                  generator: torch.Generator) -> dict[str, Any]:
    """Top eigenvalues and trace of the within-class scatter ``G - G_class`` (Papyan's
    ``G_within``): exactly by Lanczos on ``GGN - Q diag(L) Q^T`` when the class-pair vectors are
    known (exact mode), the trace only otherwise.
    """
    out: dict[str, Any] = {}
    if ggn_density is not None:
        tr_g, se = ggn_density.trace_function(lambda t: t)
        out["trace"] = tr_g - cls.trace("class")
        out["trace_std_error"] = se
    if cls.vectors is not None:
        low = cls.term_operator("class", dtype=problem.accumulate_dtype, device=problem.device)
        op = GGNOperator(problem) - low
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            res = eigsh(op, min(cls.num_classes, problem.num_params), which="LA", tol=1e-4,
                        generator=generator, max_iters=50)
        out["top_eigenvalues"] = res.eigenvalues.detach().cpu().tolist()
        out["residual_norms"] = res.residual_norms.detach().cpu().tolist()
        out["method"] = "eigsh on G - G_class (exact class-pair vectors)"
    else:
        out["method"] = "trace only: tr G (SLQ) - tr G_class (sketched Gram)"
    return out


def _num_classes(problem: Problem) -> int | None:
    batch = next(iter(problem.batches()))
    if recognise_loss(problem.loss_fn, batch.target).name != "cross_entropy":
        return None
    if batch.target.ndim != 1:
        return None
    with torch.no_grad(), problem.model_context():
        out = problem.forward(problem.parameters(), batch.inputs)
    return int(out.shape[1]) if out.ndim == 2 else None


def _vectors(result: EigenResult, r: int) -> Tensor:
    assert result.eigenvectors is not None
    return result.eigenvectors[:, :r]


def _first(result: EigenResult, r: int) -> EigenResult:
    assert result.eigenvectors is not None
    return EigenResult(result.eigenvalues[:r], result.eigenvectors[:, :r],
                       result.residual_norms[:r], result.converged[:r], result.method,
                       result.which, result.tol, result.num_iters, result.cost)


def _host(result: EigenResult) -> EigenResult:
    vecs = None if result.eigenvectors is None else result.eigenvectors.detach().cpu()
    return EigenResult(result.eigenvalues.detach().cpu(), vecs, result.residual_norms.detach().cpu(),
                       result.converged.detach().cpu(), result.method, result.which, result.tol,
                       result.num_iters, result.cost, result.error_estimate)
