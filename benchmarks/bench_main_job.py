"""The main job's cost by model size: ``analyze()`` wall time in gradients, exact vs iterative.

One family, grown over four orders of magnitude: Sagun et al.'s Gaussian-mixture classifier
(``curvscope.zoo.gaussian_mixture``, C = 10 classes, 1,000 examples in 4 batches, float64, ReLU
MLP ``d -> h -> h -> C``), with ``(d, h)`` chosen for P = 10^2 ... 10^6 parameters; the row
``demo`` is what ``curvscope demo`` analyses (``d = 100, h = 30``, P = 4,270). Each row, in a fresh
subprocess with a time limit (``--no-isolate``: in this process):

* ``gradient_s``: one gradient of the loss over all the data (best of 3), the unit of cost;
* ``analysis_s``: ``curvscope.analyze(problem, budget=...)``, the whole main job (plan, top and
  bottom eigenpairs, densities of H, G and H - G, class structure); ``analysis_xg`` its ratio to
  the gradient; ``stages_s`` the seconds of each stage (from ``on_stage``);
* ``method``: the path the timed plan chose (``exact``: dense matrices and ``eigh``; ``iterative``:
  Lanczos, eigsh, SLQ); ``planned_s``, ``planned_columns`` and ``planned_passes``: what the run's
  plan said before it started (every stage, from timed products), so the cost model is checked
  too; ``eta_at_quarter_s``: the time left the progress bar showed when a quarter of the planned
  columns were done, beside ``left_at_quarter_s``, the time that was actually left;
* ``data_passes``: passes over the data the analysis made (read from the Problem) and
  ``passes_xg`` the analysis time per pass in gradients (a pass of a product with ``k`` columns
  costs at least one forward and backward: the physical limit is ``analysis_xg >= data_passes``
  only for one column per pass);
* ``product_columns``: columns multiplied, summed over the results' costs (the exact path's
  results share the dense matrices' cost, so it counts those more than once);
  ``counted_columns``: the columns of every curvature product the run made, counted as they
  were made (the table's ``columns``), beside ``planned_columns``.

Run ``python benchmarks/bench_main_job.py`` (``--sizes 1e2,1e3,demo`` for a subset; ``--budget
small`` for the smaller budget). It prints a markdown table and writes
``benchmarks/results/bench_main_job_cpu.json``. Timings are for comparison within one run only
(the machines are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import curvscope as cs
from curvscope import zoo

#: ``name: (input_dim d, hidden h)``; P = d h + h + h^2 + h + 10 h + 10.
SIZES = {
    "1e2": (10, 4),
    "1e3": (100, 8),
    "demo": (100, 30),
    "1e4": (100, 60),
    "1e5": (100, 270),
    "1e6": (100, 950),
}


def _num_params(d: int, h: int, c: int = 10) -> int:
    return d * h + h + h * h + h + h * c + c


def make_problem(name: str, dtype: torch.dtype) -> tuple[cs.Problem, zoo.ZooProblem]:
    d, h = SIZES[name]
    zp = zoo.gaussian_mixture(10, input_dim=d, hidden=h, max_steps=300, dtype=dtype)
    return cs.Problem(zp.model, zp.loss_fn, zp.batches), zp


def gradient_seconds(zp: zoo.ZooProblem, repeats: int = 3) -> float:
    """Best of ``repeats`` of one full-data gradient (the batches weighted by their size)."""
    params = [p for p in zp.model.parameters() if p.requires_grad]
    n = sum(len(b[1]) for b in zp.batches)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = sum(zp.loss_fn(zp.model(x), y) * (len(y) / n) for x, y in zp.batches)
        torch.autograd.grad(loss, params)
        best = min(best, time.perf_counter() - t0)
    return best


def _columns(a: cs.SpectrumAnalysis) -> int:
    parts = (a.top, a.bottom, a.density, a.ggn_top, a.ggn_density, a.residual_density, a.classes)
    return sum(p.cost.num_matvecs for p in parts if p is not None and hasattr(p, "cost"))


def measure(name: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    problem, zp = make_problem(name, torch.float64)
    row: dict = {"size": name, "num_params": problem.num_params, "num_data": problem.num_data,
                 "hidden": SIZES[name][1], "input_dim": SIZES[name][0]}
    row["gradient_s"] = gradient_seconds(zp)
    stages: dict[str, float] = {}
    last = [time.perf_counter()]
    plan: dict = {}
    quarter: dict = {}

    def on_stage(stage: str, done: dict) -> None:
        now = time.perf_counter()
        stages[stage] = stages.get(stage, 0.0) + now - last[0]
        last[0] = now
        if stage == "plan":
            plan.update(done["plan"])

    def on_progress(update) -> None:  # the time left the progress bar showed at 25 % of the plan
        if not quarter and update.planned and update.columns >= update.planned / 4:
            quarter.update(eta_s=update.eta_s, at=time.perf_counter())

    passes0 = problem.num_data_passes
    t0 = last[0] = time.perf_counter()
    a = cs.analyze(problem, budget=args.budget, on_stage=on_stage, on_progress=on_progress)
    end = time.perf_counter()
    row["analysis_s"] = end - t0
    row["analysis_xg"] = row["analysis_s"] / row["gradient_s"]
    row["stages_s"] = stages
    row["method"] = a.info["method"]
    row["planned_s"] = plan.get("estimated_seconds")
    row["planned_columns"] = plan.get("product_columns")
    row["planned_passes"] = sum(s.get("passes") or 0 for s in plan.get("stages", []))
    row["counted_columns"] = sum(r["done_columns"] for r in a.info["progress"])
    row["stage_plan"] = a.info["progress"]  # planned vs done, per stage
    row["eta_at_quarter_s"] = quarter.get("eta_s")
    row["left_at_quarter_s"] = None if not quarter else end - quarter["at"]
    row["data_passes"] = problem.num_data_passes - passes0
    row["passes_xg"] = row["analysis_xg"] / max(row["data_passes"], 1)
    row["product_columns"] = _columns(a)
    row["outliers"] = a.outliers.count
    row["outlier_confidence"] = a.outliers.confidence
    return row


def run_row(name: str, args: argparse.Namespace) -> dict:
    """One row, in a fresh subprocess with a time limit unless ``--no-isolate``."""
    if not args.isolate:
        return measure(name, args)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        argv = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads),
                "--budget", args.budget, "--_row", name, "--_row-out", out]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            d, h = SIZES[name]
            return {"size": name, "num_params": _num_params(d, h),
                    "error": f"timed out after {args.timeout:.0f} s"}
        if os.path.exists(out):
            with open(out) as f:
                return json.load(f)
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return {"size": name, "error": f"subprocess exited with {proc.returncode}: {tail}"}


def _fmt(x, spec: str = ".3g") -> str:
    return "—" if x is None else (f"{x:{spec}}" if isinstance(x, (int, float)) else str(x))


def table(rows: list[dict]) -> str:
    head = ("| size | P | method | gradient (s) | analysis (s) | planned (s) | time left at 25 %: "
            "shown / actual (s) | analysis / gradient | data passes (planned) | per pass "
            "(gradients) | columns (planned) | outliers | slowest stage |")
    out = [head, "|" + "---|" * 13]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['size']} | {_fmt(r.get('num_params'), ',')} | {r['error']} |"
                       + " |" * 10)
            continue
        slow = max(r["stages_s"].items(), key=lambda kv: kv[1]) if r["stages_s"] else ("—", 0)
        out.append(
            f"| {r['size']} | {r['num_params']:,} | {r['method']} | {_fmt(r['gradient_s'])} | "
            f"{_fmt(r['analysis_s'])} | {_fmt(r.get('planned_s'))} | "
            f"{_fmt(r.get('eta_at_quarter_s'))} / {_fmt(r.get('left_at_quarter_s'))} | "
            f"{_fmt(r['analysis_xg'], ',.0f')} | {r['data_passes']} "
            f"({_fmt(r.get('planned_passes'), ',')}) | {_fmt(r['passes_xg'])} | "
            f"{_fmt(r.get('counted_columns'), ',')} ({_fmt(r.get('planned_columns'), ',')}) | "
            f"{r['outliers']} ({r['outlier_confidence']}) | {slow[0]} {slow[1]:.1f} s |")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="1e2,1e3,demo,1e4,1e5,1e6",
                        help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--budget", default="default", choices=["small", "default", "large"])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per row")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="every row in this process")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--_row", help=argparse.SUPPRESS)
    parser.add_argument("--_row-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; expected some of {list(SIZES)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args._row:  # a child: one row to a file
        row = measure(args._row, args)
        with open(args._row_out, "w") as f:
            json.dump(row, f)
        return row
    rows = []
    for name in args.sizes:
        rows.append(run_row(name, args))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    result = {"benchmark": "bench_main_job", "budget": args.budget, "threads": args.threads,
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "curvscope": cs.__version__, "cpus": os.cpu_count()},
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_main_job_cpu.json"
    path.write_text(json.dumps(result, indent=1))
    print()
    print(table(rows))
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
