"""Spectra across sample sizes and training checkpoints (Papyan's scaling plots).

Papyan (2020) shows the outliers' positions follow the class structure as the number of examples
per class and training progress; these helpers measure the top Hessian eigenvalues along either
axis with the same solver and seed, returning a :class:`Sweep` for the report: ``x`` with its
``x_label``, ``top_eigenvalues [len(x), k]`` and their ``residual_norms``, and a ``summary`` the report
prints as given (what :func:`curvscope.report.plots.plot_sweep` draws).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvscope.curvature._operators import HessianOperator
from curvscope.curvature._problem import Problem
from curvscope.solvers.eigsh import eigsh


@dataclass(frozen=True)
class Sweep:
    """Top eigenvalues along an axis (sample size, training step, ...): a report section.

    Attributes:
        kind: ``"sample_size"``, ``"checkpoints"`` or a name of the caller's.
        x: ``[n]`` the axis.
        top_eigenvalues: ``[n][k]`` the top eigenvalues at each ``x`` (descending).
        x_label: what ``x`` is ("examples per class", "training step").
        residual_norms: ``[n][k]`` their residuals ``||H v - l v||`` (empty when not known).
        summary: the sentences the report prints as given.
        bulk_edge: ``[n]`` the bulk edge at each ``x``, or ``None``.
        std_error: ``[n][k]`` error bars of the eigenvalues, or ``None``.
        log_x: draw ``x`` on a log scale (``None``: when it is positive and spans 2 decades).
        title: the figure's title (``None``: one from the axis).
    """

    kind: str
    x: list[float]
    top_eigenvalues: Any
    x_label: str = "x"
    residual_norms: list[list[float]] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    bulk_edge: Any = None
    std_error: Any = None
    log_x: bool | None = None
    title: str | None = None

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> Sweep:
        """A sweep from a dict with at least ``x`` and ``top_eigenvalues`` (a caller's own
        section); unknown keys are left out.

        Raises:
            ValueError: ``x`` or ``top_eigenvalues`` missing.
        """
        if not all(key in section for key in ("x", "top_eigenvalues")):
            raise ValueError("a sweep section needs 'x' ([n]) and 'top_eigenvalues' ([n, k]); got "
                             f"keys {sorted(section)}.")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"kind": "sweep", **{k: v for k, v in section.items() if k in names}})


def _top(problem: Problem, k: int, seed: int) -> tuple[list[float], list[float]]:
    res = eigsh(HessianOperator(problem), min(k, problem.num_params), which="LA", tol=1e-4,
                generator=torch.Generator().manual_seed(seed))
    return res.eigenvalues.tolist(), res.residual_norms.tolist()


def _section(kind: str, x: list[int], x_label: str, rows: list[list[float]],
             residuals: list[list[float]]) -> Sweep:
    first, last = rows[0][0], rows[-1][0]
    summary = [f"Largest eigenvalue {first:.3g} at {x_label} {x[0]:,} and {last:.3g} at "
               f"{x[-1]:,} ({last / first:.2f}x)." if first else
               f"Largest eigenvalue {last:.3g} at {x_label} {x[-1]:,}."]
    return Sweep(kind=kind, x=list(x), x_label=x_label, top_eigenvalues=rows,
                 residual_norms=residuals, summary=summary)


def first_per_class(batches: Sequence[tuple[Tensor, Tensor]], n_per_class: int
                    ) -> list[tuple[Tensor, Tensor]]:
    """The first ``n_per_class`` examples of every class, in data order, as one batch."""
    xs, ys = [], []
    seen: dict[int, int] = {}
    for x, y in batches:
        for i in range(len(y)):
            c = int(y[i])
            if seen.get(c, 0) < n_per_class:
                seen[c] = seen.get(c, 0) + 1
                xs.append(x[i : i + 1])
                ys.append(y[i : i + 1])
    if not xs:
        raise ValueError("no examples in the data.")
    return [(torch.cat(xs), torch.cat(ys))]


def sample_size_sweep(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    batches: Sequence[tuple[Tensor, Tensor]],
    sizes: Sequence[int],
    *,
    k: int = 20,
    seed: int = 0,
    **problem_options: Any,
) -> Sweep:
    """Top-``k`` Hessian eigenvalues on the first ``n`` examples per class, for each ``n``."""
    rows, residuals = [], []
    for n in sizes:
        problem = Problem(model, loss_fn, first_per_class(batches, n), **problem_options)
        vals, res = _top(problem, k, seed)
        rows.append(vals)
        residuals.append(res)
    return _section("sample_size", [int(n) for n in sizes], "examples per class", rows, residuals)


def checkpoint_sweep(
    model: nn.Module,
    checkpoints: Sequence[tuple[int, dict[str, Tensor]]],
    loss_fn: Callable[..., Tensor],
    batches: Sequence[Any],
    *,
    k: int = 20,
    seed: int = 0,
    **problem_options: Any,
) -> Sweep:
    """Top-``k`` Hessian eigenvalues at saved checkpoints ``(step, state_dict)`` along training.

    The model is copied for each checkpoint; the user's model is not touched.
    """
    rows, residuals, steps = [], [], []
    for step, state in checkpoints:
        clone = copy.deepcopy(model)
        clone.load_state_dict(state)
        vals, res = _top(Problem(clone, loss_fn, batches, **problem_options), k, seed)
        rows.append(vals)
        residuals.append(res)
        steps.append(int(step))
    return _section("checkpoints", steps, "training step", rows, residuals)
