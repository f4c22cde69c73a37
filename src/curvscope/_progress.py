"""Progress of a long run in product columns, against its plan, with the time left.

Every curvature product reports its columns to the listeners active in the current context
(:func:`counting_products`; the report comes from
:meth:`~curvscope.CurvatureOperator._matmat`, the one place where data go through the model for a
product of any curvature matrix, so nothing is counted twice). A :class:`Progress` is such a
listener. It holds the run's plan, one :class:`StagePlan` per stage (the product columns and data
passes the stage is expected to take and its seconds estimated from timed products), follows
the stages as a :class:`~curvscope._stages.StageStore` runs them, and after every product hands its
subscriber a :class:`ProgressUpdate`: the stage, its columns done of planned, the run's, and the
seconds left.

The time left is the planned seconds still to go, scaled by what the plan has been worth so far
in this process::

    eta = (planned_total - planned_done) * elapsed / planned_done

where planned work is counted per column (a stage's planned seconds over its planned columns):
``planned_done`` for the columns done here, ``planned_total`` for each stage's columns as now
known (a finished stage's own, a running stage's plan or more: a solver that needs more restarts
than planned makes its stage bigger, not the run slower). Stages read back from a checkpoint
count as done but not in the ratio, so a resumed run's estimate is its own speed. Without timed
products (a forced engine) the planned columns stand in for seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

ProductListener = Callable[[int], None]

_LISTENERS: ContextVar[tuple[ProductListener, ...]] = ContextVar(
    "curvscope_product_listeners", default=())


@contextmanager
def counting_products(listener: ProductListener) -> Iterator[None]:
    """Call ``listener(num_columns)`` after every curvature product made inside the block."""
    token = _LISTENERS.set(_LISTENERS.get() + (listener,))
    try:
        yield
    finally:
        _LISTENERS.reset(token)


def report_product(num_columns: int) -> None:
    """Tell the active listeners that a product of ``num_columns`` columns finished."""
    for listener in _LISTENERS.get():
        listener(num_columns)


@dataclass(frozen=True)
class StagePlan:
    """What one stage is expected to take.

    Attributes:
        name: the stage (as :meth:`~curvscope._stages.StageStore.run` names it).
        columns: product columns; ``None`` for a stage that makes no curvature products (its
            work is gradients, e.g. the class structure), which the estimate leaves out.
        passes: data passes of those products.
        seconds: estimated from the operator's timed products; ``None`` when not timed.
        also: other stage names that take this plan's place (e.g. ``bulk_density`` for
            ``density``: which of the two runs is known only after the top eigenpairs).
    """

    name: str
    columns: int | None
    passes: int | None = None
    seconds: float | None = None
    also: tuple[str, ...] = ()

    def matches(self, stage: str) -> bool:
        return stage == self.name or stage in self.also

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "columns": self.columns, "passes": self.passes,
                "seconds": self.seconds, "also": list(self.also)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StagePlan:
        return cls(d["name"], d["columns"], d.get("passes"), d.get("seconds"),
                   tuple(d.get("also", ())))


@dataclass(frozen=True)
class ProgressUpdate:
    """Where a run stands, after a product or a stage (what a progress bar shows).

    Attributes:
        stage: the running stage (``None`` between stages).
        stage_columns: product columns of that stage so far.
        stage_planned: its planned columns (``None``: not planned or no products).
        columns: product columns of the whole run so far, in this process.
        planned: planned columns of the whole run.
        stages_done: planned stages finished (read back from a checkpoint included).
        stages_planned: planned stages.
        elapsed_s: seconds since the run began, in this process.
        eta_s: estimated seconds left (``None`` until a planned product has run).
    """

    stage: str | None
    stage_columns: int
    stage_planned: int | None
    columns: int
    planned: int
    stages_done: int
    stages_planned: int
    elapsed_s: float
    eta_s: float | None


def progress_line(update: ProgressUpdate) -> str:
    """One line for a progress bar: ``top 44/84 · 1,082/2,642 columns · about 6 s left``."""
    if not update.planned:  # before the plan: the products are being timed
        return f"{update.stage or 'starting'}: timing products"
    parts = []
    if update.stage is not None:
        planned = "" if update.stage_planned is None else f"/{update.stage_planned:,}"
        parts.append(f"{update.stage} {update.stage_columns:,}{planned}")
    parts.append(f"{update.columns:,}/{update.planned:,} columns")
    if update.eta_s is not None:
        parts.append(f"about {_duration(update.eta_s)} left")
    return " · ".join(parts)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_lines(method: str, stages: list[StagePlan]) -> list[str]:
    """The plan as the run states it before it starts: a line for the whole run, then a line per
    stage (columns, data passes, estimated seconds).
    """
    with_products = [s for s in stages if s.columns is not None]
    columns = sum(s.columns or 0 for s in with_products)
    passes = sum(s.passes or 0 for s in with_products)
    seconds = [s.seconds for s in with_products]
    total = ("" if not seconds or any(t is None for t in seconds) else
             f", estimated {_duration(sum(float(t or 0.0) for t in seconds))} from timed products")
    lines = [f"plan: {method} path, about {columns:,} product columns in {passes:,} data "
             f"passes{total}"]
    for s in stages:
        if s.columns is None:
            lines.append(f"  {s.name}: no curvature products")
            continue
        est = "" if s.seconds is None else f", ~{_duration(s.seconds)}"
        lines.append(f"  {s.name}: {s.columns:,} columns, {s.passes or 0:,} passes{est}")
    return lines


@dataclass
class _StageRecord:
    plan: StagePlan
    columns: int = 0
    products: int = 0  # one data pass each
    seconds: float = 0.0
    state: str = "pending"  # pending | running | done | resumed


@dataclass
class Progress:
    """Follows a run against its plan; see the module docstring.

    Args:
        subscriber: called with a :class:`ProgressUpdate` after every product and stage.
        clock: seconds (a test passes a fake clock).
    """

    subscriber: Callable[[ProgressUpdate], None] | None = None
    clock: Callable[[], float] = time.perf_counter
    _stages: list[_StageRecord] = field(default_factory=list)
    _current: _StageRecord | None = None
    _current_name: str | None = None
    _unplanned_columns: dict[str, int] = field(default_factory=dict)
    _unplanned_products: dict[str, int] = field(default_factory=dict)
    _columns: int = 0

    def __post_init__(self) -> None:
        self._t0 = self.clock()
        self._stage_t0 = self._t0

    def set_plan(self, stages: list[StagePlan]) -> None:
        """The stages still to come (may be called again to add stages)."""
        known = {r.plan.name for r in self._stages}
        self._stages += [_StageRecord(s) for s in stages if s.name not in known]
        self._notify()

    @property
    def plan(self) -> list[StagePlan]:
        return [r.plan for r in self._stages]

    def _record(self, stage: str) -> _StageRecord | None:
        for r in self._stages:
            if r.plan.matches(stage) and r.state in ("pending", "running"):
                return r
        return None

    def begin(self, stage: str) -> None:
        """Stage ``stage`` starts computing."""
        self._current_name, self._current = stage, self._record(stage)
        self._stage_t0 = self.clock()
        if self._current is not None:
            self._current.state = "running"
        self._notify()

    def end(self, stage: str) -> None:
        """Stage ``stage`` finished computing."""
        if self._current is not None and self._current_name == stage:
            self._current.state = "done"
            self._current.seconds = self.clock() - self._stage_t0
        self._current_name, self._current = None, None
        self._notify()

    def resumed(self, stage: str) -> None:
        """Stage ``stage`` was read back from a checkpoint: done, in no time."""
        record = self._record(stage)
        if record is not None:
            record.state = "resumed"
        self._notify()

    def add(self, num_columns: int) -> None:
        """A product of ``num_columns`` columns finished (a :data:`ProductListener`)."""
        self._columns += num_columns
        if self._current is not None:
            self._current.columns += num_columns
            self._current.products += 1
        elif self._current_name is not None:
            name = self._current_name
            self._unplanned_columns[name] = self._unplanned_columns.get(name, 0) + num_columns
            self._unplanned_products[name] = self._unplanned_products.get(name, 0) + 1
        self._notify()

    def _rate(self, record: _StageRecord) -> float:
        """Planned work per column of the stage: its seconds per planned column, else 1 (the
        columns stand in for seconds when any stage is not timed); 0 without products.
        """
        p = record.plan
        if not p.columns:
            return 0.0
        if all(r.plan.seconds is not None for r in self._stages if r.plan.columns):
            return float(p.seconds or 0.0) / p.columns
        return 1.0

    def _size(self, record: _StageRecord) -> float:
        """The stage's columns as now known: a finished stage's own, a running stage's plan
        or more (a solver that needs more restarts than planned), a pending stage's plan.
        """
        planned = float(record.plan.columns or 0)
        if record.state == "resumed":
            return planned
        if record.state == "done":
            return float(record.columns)
        return max(planned, float(record.columns))

    def eta_seconds(self) -> float | None:
        """Seconds left: the planned work still to go, at this process's speed so far (planned
        work per column, times the columns as now known, see :meth:`_size`).
        """
        total = sum(self._rate(r) * self._size(r) for r in self._stages)
        resumed = sum(self._rate(r) * self._size(r) for r in self._stages
                      if r.state == "resumed")
        here = sum(self._rate(r) * r.columns for r in self._stages if r.state != "resumed")
        if here <= 0.0:
            return None
        return max(total - resumed - here, 0.0) * (self.clock() - self._t0) / here

    def update(self) -> ProgressUpdate:
        """Where the run stands now."""
        current = self._current
        return ProgressUpdate(
            stage=self._current_name,
            stage_columns=(current.columns if current is not None else
                           self._unplanned_columns.get(self._current_name or "", 0)),
            stage_planned=None if current is None else current.plan.columns,
            columns=self._columns,
            planned=sum(r.plan.columns or 0 for r in self._stages),
            stages_done=sum(r.state in ("done", "resumed") for r in self._stages),
            stages_planned=len(self._stages),
            elapsed_s=self.clock() - self._t0,
            eta_s=self.eta_seconds())

    def summary(self) -> list[dict[str, Any]]:
        """Each planned stage's plan beside what it took (columns, products, i.e. data passes,
        and seconds; a stage read back from a checkpoint took nothing here): how well the run's
        plan held.
        """
        out = [{**r.plan.to_dict(), "done_columns": r.columns, "done_passes": r.products,
                "done_seconds": r.seconds, "state": r.state} for r in self._stages]
        out += [{"name": name, "columns": None, "passes": None, "seconds": None, "also": [],
                 "done_columns": cols, "done_passes": self._unplanned_products[name],
                 "done_seconds": None, "state": "unplanned"}
                for name, cols in self._unplanned_columns.items()]
        return out

    def _notify(self) -> None:
        if self.subscriber is not None:
            self.subscriber(self.update())
