"""The main job in one call: analysis, further sections, bundle; resumable after a kill.

:func:`run_study` is what ``curvscope demo`` and ``curvscope run`` do, callable from a notebook:
the spectrum analysis (:func:`~curvscope.analysis.spectrum.analyze`), the checkpoint sweep, the
mask overlap and the train-vs-test section when their inputs are given, and, with ``out``, the
bundle (JSON, npz, plots, HTML). With ``out`` every finished stage is saved in ``out/stages``
(:class:`~curvscope._stages.StageStore`) and every solver checkpoints inside its stage, so the
same call after a kill (SIGKILL included) continues where it stopped and ends with the result an
uninterrupted call gives; a folder left by another model, data set or options is refused with the
fix (``fresh=True``, the CLI's ``--fresh``). A finished study deletes ``out/stages``.

The flow stays one way: this module calls the analysis and the report; nothing below imports it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curvscope._checkpoint import CheckpointMismatchError
from curvscope._progress import Progress, ProgressUpdate, StagePlan, counting_products
from curvscope._stages import StageStore, problem_fingerprint
from curvscope.analysis.sections import (
    Section,
    mask_overlap_curve,
    section_summary,
    train_vs_test,
)
from curvscope.analysis.spectrum import (
    BUDGETS,
    SpectrumAnalysis,
    analyze,
    bottom_columns,
    estimated_seconds,
    planned_seconds,
    solve_columns,
)
from curvscope.analysis.sweeps import checkpoint_sweep
from curvscope.curvature._operators import HessianOperator
from curvscope.curvature._problem import Problem

STAGES_DIR = "stages"

__all__ = ["STAGES_DIR", "Study", "StudyInputError", "StudyMismatchError", "run_study"]


class StudyInputError(ValueError):
    """The model, loss or data cannot make a Problem (the message says what and the fix)."""


class StudyMismatchError(CheckpointMismatchError):
    """``out/stages`` holds another run's stages (other model, data or options)."""


@dataclass(frozen=True)
class Study:
    """What :func:`run_study` computed and wrote.

    Attributes:
        analysis: the spectrum analysis of the training data.
        extras: the further sections ``{name: section}`` (``checkpoints``, ``mask_overlap``,
            ``test``), each with a ``kind`` and a ``summary``.
        problem: the Problem analysed.
        paths: the bundle's files (empty without ``out``).
        resumed: the stages read back from an interrupted run (empty for a fresh one).
        wall_time: seconds of this call.
    """

    analysis: SpectrumAnalysis
    extras: dict[str, Section]
    problem: Problem
    paths: dict[str, Path] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)
    wall_time: float = 0.0

    def summary(self) -> list[str]:
        """The analysis's sentences, then one line per further section."""
        out = list(self.analysis.summary())
        for name, section in self.extras.items():
            for sentence in section_summary(section):
                out.append(f"{name.replace('_', ' ')}: {sentence}")
        return out


def run_study(
    model: Any,
    loss_fn: Callable[..., Any],
    data: Any,
    *,
    out: str | Path | None = None,
    test_data: Any = None,
    checkpoints: Sequence[tuple[int, dict[str, Any]]] | None = None,
    problem_options: Mapping[str, Any] | None = None,
    k: int | None = None,
    budget: str = "default",
    seed: int = 0,
    method: str = "auto",
    fresh: bool = False,
    on_stage: Callable[[str, dict[str, Any]], None] | None = None,
    on_progress: Callable[[ProgressUpdate], None] | None = None,
    identity: Mapping[str, Any] | None = None,
    provenance_extra: Mapping[str, Any] | None = None,
) -> Study:
    """Analyse a model's Hessian and write the report bundle (the CLI's ``demo`` / ``run``).

    Args:
        model: the ``nn.Module`` (as for :class:`~curvscope.Problem`).
        loss_fn: the loss.
        data: the training batches.
        out: folder of the bundle and of the resumable stages; ``None``: nothing written.
        test_data: held-out batches: a small analysis of their Hessian beside the training one.
        checkpoints: ``(step, state_dict)`` pairs along training: a checkpoint sweep.
        problem_options: further :class:`~curvscope.Problem` keywords.
        k: top eigenpairs (as for :func:`~curvscope.analysis.spectrum.analyze`).
        budget: ``"small"``, ``"default"`` or ``"large"``.
        seed: seed of every random choice.
        method: ``"auto"``, ``"exact"`` or ``"iterative"`` (``analyze``'s ``exact``).
        fresh: discard the stages an earlier run left in ``out``.
        on_stage: called as ``on_stage(name, results_so_far)`` after each stage.
        on_progress: called after every curvature product and stage of the whole study (the
            analysis, the checkpoint sweep, the test-data analysis) with a
            :class:`~curvscope.ProgressUpdate` (stage, columns done of planned, time left; see
            :func:`~curvscope.analysis.spectrum.analyze`).
        identity: more that identifies the run (the CLI passes the run file's digest): a
            change refuses to resume.
        provenance_extra: more provenance for the bundle (name, command, ...).

    Raises:
        StudyMismatchError: ``out/stages`` belongs to another run; pass ``fresh=True``.
        StudyInputError: the model, loss or data make no Problem.
        ValueError: bad options.
    """
    if method not in ("auto", "exact", "iterative"):
        raise ValueError(f"method must be 'auto', 'exact' or 'iterative', got {method!r}.")
    t0 = time.perf_counter()
    opts = dict(problem_options or {})
    try:
        problem = Problem(model, loss_fn, data, **opts)
    except (TypeError, ValueError) as err:
        raise StudyInputError(str(err)) from err
    options = {"k": k, "budget": budget, "seed": seed, "method": method,
               "test": test_data is not None, "checkpoints": len(checkpoints or ()),
               "problem_options": repr(sorted((key, repr(v)) for key, v in opts.items()
                                              if key != "engine_choices")),
               **dict(identity or {})}
    folder = None if out is None else Path(out) / STAGES_DIR
    if fresh and folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    identity_of_problem = problem_fingerprint(problem)
    store = _open(folder, {**identity_of_problem, **options}, problem)
    resumed = _finished(folder)
    exact = {"auto": None, "exact": True, "iterative": False}[method]
    sub = None if folder is None else folder / "analysis"
    progress = Progress(on_progress)
    store.progress = progress
    test_problem = None if test_data is None else Problem(model, loss_fn, test_data, **opts)
    n_checkpoints = len(checkpoints or ())
    test_share = None if test_problem is None else test_problem.num_data / problem.num_data

    def staged(name: str, done: dict[str, Any]) -> None:
        if name == "plan":  # the study's own stages join the analysis's plan
            extra = study_stages(done["plan"], n_checkpoints, test_share)
            progress.set_plan(extra)
            done = {**done, "plan": with_stages(done["plan"], extra)}
        if on_stage is not None:
            on_stage(name, done)

    with counting_products(progress.add):
        analysis = analyze(problem, k=k, budget=budget, seed=seed, on_stage=staged, exact=exact,
                           progress=progress, checkpoint_dir=sub)
        extras: dict[str, Section] = {}
        k_sweep = min(analysis.info["k"], 20)
        if checkpoints:
            extras["checkpoints"] = store.run("checkpoint_sweep", lambda _: checkpoint_sweep(
                model, checkpoints, loss_fn, data, k=k_sweep, seed=seed, **opts))
        if analysis.top.eigenvectors is not None:
            theta = problem.param_space.join(problem.parameters()).cpu()
            extras["mask_overlap"] = mask_overlap_curve(analysis, theta)
        if on_stage is not None:
            on_stage("sweeps", {"extras": list(extras)})
        if test_problem is not None:
            progress.begin("test")
            test = analyze(test_problem, k=k_sweep, budget="small", seed=seed, papyan=False,
                           classes=False, bottom_k=1,
                           checkpoint_dir=None if folder is None else folder / "test")
            progress.end("test")
            extras["test"] = train_vs_test(analysis, test, k_sweep)
        if on_stage is not None:
            on_stage("test", {"test": "test" in extras})
    paths: dict[str, Path] = {}
    if out is not None:
        from curvscope.report import provenance, save_bundle

        prov = provenance({**dict(provenance_extra or {}), "seed": seed, "budget": budget,
                           "parameter_values": identity_of_problem["parameter_values"],
                           "data": identity_of_problem["data"],
                           "resumed_stages": resumed,
                           "wall_time_total": time.perf_counter() - t0})
        paths = save_bundle(analysis, out, provenance=prov, extras=extras)
        store.clear()
    if on_stage is not None:
        on_stage("bundle", {"bundle": {key: str(v) for key, v in paths.items()}})
    return Study(analysis, extras, problem, paths, resumed, time.perf_counter() - t0)


def study_stages(plan: Mapping[str, Any], checkpoints: int, test_share: float | None
                 ) -> list[StagePlan]:
    """The stages :func:`run_study` adds to the analysis's ``plan`` (as the ``plan`` stage
    emits it): top eigenvalues at each of ``checkpoints`` saved checkpoints (one eigsh for
    ``min(k, 20)`` pairs each, in the plan's eigsh blocks), and the small analysis of the test
    data (``test_share``: its size relative to the training data, which scales the timed
    seconds).
    """
    k_sweep = min(int(plan["k"]), 20)
    per_column = plan.get("seconds_per_column")
    out = []
    block = int(plan.get("solve_block") or 1)
    block = block if k_sweep >= block else 1
    if checkpoints:
        cols = checkpoints * solve_columns(k_sweep)
        passes = checkpoints * -(-solve_columns(k_sweep) // block)
        out.append(StagePlan("checkpoint_sweep", cols, passes,
                             estimated_seconds(per_column, cols, block)))
    if test_share is not None:
        probes, steps = BUDGETS["small"]
        solves = solve_columns(k_sweep) + bottom_columns(1)
        cols = 2 + solves + probes * steps
        one, many = (estimated_seconds(per_column, solves, 1),
                     estimated_seconds(per_column, probes * steps + 2, probes))
        out.append(StagePlan("test", cols, 1 + solves + steps,
                             None if one is None or many is None else (one + many) * test_share))
    return out


def with_stages(plan: Mapping[str, Any], extra: list[StagePlan]) -> dict[str, Any]:
    """``plan`` (as the ``plan`` stage emits it) with the stages ``extra`` added."""
    stages = [StagePlan.from_dict(s) for s in plan["stages"]] + extra
    return {**plan, "stages": [s.to_dict() for s in stages],
            "product_columns": sum(s.columns or 0 for s in stages),
            "estimated_seconds": planned_seconds(stages)}


def _open(folder: Path | None, fingerprint: dict[str, Any], problem: Problem) -> StageStore:
    try:
        return StageStore(folder, fingerprint, HessianOperator(problem))
    except CheckpointMismatchError as err:
        raise StudyMismatchError(
            f"{folder} holds the stages of another run ({err}); the model, the data or the "
            "options changed since. Start afresh with fresh=True (curvscope: --fresh), or use "
            "another output folder.") from err


def _finished(folder: Path | None) -> list[str]:
    """The stages an earlier run finished in ``folder`` (read back instead of computed), as
    ``part/stage`` names.
    """
    if folder is None or not folder.is_dir():
        return []
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.stage"))
