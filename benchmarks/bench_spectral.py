#!/usr/bin/env python
"""curvscope beside PyHessian, hessian-eigenthings, curvlinops and skerch: top-10 eigenvalues,
trace and spectral density on the same problems, in one run.

Every (problem, library, task, setting) cell runs in a fresh ``spawn`` subprocess with one
intra-op thread and a wall-clock limit, so that peak memory is per cell and one slow peer cannot
hang the run. Each cell reports

* wall time of the task (``time.perf_counter``; the library's setup is timed separately),
* HVPs: matrix-vector products counted at each library's operator entry point (one per column of
  a block product), and product calls (one per call, whatever its number of columns),
* data passes: examples seen by a forward pre-hook on the model, divided by the dataset size
  (the same hook for every library),
* peak memory: ``ru_maxrss`` of the cell's process (CPU) or ``torch.cuda.max_memory_allocated``
  (GPU), and its increase during the task,
* accuracy against an exact float64 spectrum (problems with at most ``--exact-limit``
  parameters) or against a labelled high-accuracy curvscope reference otherwise:
  top-10 ``max_i |est_i - ref_i| / |ref_i|``; trace ``|est - ref| / |ref|``; density
  ``W1(quadrature measure, reference measure) / (lambda_max - lambda_min)``.

The peers are optional: each is imported lazily in its own cells and reported as "not installed"
when missing (``pip install -e '.[peers]'``). See ``benchmarks/README.md``.

Usage::

    python benchmarks/bench_spectral.py --size small              # CPU, CI-sized (< 10 min)
    python benchmarks/bench_spectral.py --size medium --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import resource
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
K = 10  # top-k
SLQ_PROBES, SLQ_STEPS = 10, 80  # density budget: 10 probes x 80 Lanczos steps = 800 products
TRACE_BUDGET = 100  # products per trace estimate (99 where the method needs a multiple of 3)
CS_TOL = 1e-6  # curvscope eigsh relative residual tolerance

PEERS = {  # import name -> (distribution name, label)
    "pyhessian": ("pyhessian", "PyHessian"),
    "hessian_eigenthings": ("hessian-eigenthings", "hessian-eigenthings"),
    "curvlinops": ("curvlinops-for-pytorch", "curvlinops"),
    "skerch": ("skerch", "skerch"),
}
LIB_LABELS = {"curvscope": "curvscope", **{k: v[1] for k, v in PEERS.items()}}

# ======================================================================================= problems


def make_cnn(channels: int, width1: int, width2: int, hidden: int, num_classes: int,
             size: int) -> nn.Module:
    """A small CNN with BatchNorm: two strided 3x3 convolutions, then two linear layers."""
    side = (size + 3) // 4
    return nn.Sequential(
        nn.Conv2d(channels, width1, 3, stride=2, padding=1), nn.BatchNorm2d(width1), nn.ReLU(),
        nn.Conv2d(width1, width2, 3, stride=2, padding=1), nn.BatchNorm2d(width2), nn.ReLU(),
        nn.Flatten(), nn.Linear(width2 * side * side, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


CNN_SIZES = {
    # channels, width1, width2, hidden, images, batch size
    "small": dict(channels=1, width1=8, width2=16, hidden=72, n=256, batch=64),
    "medium": dict(channels=3, width1=16, width2=32, hidden=96, n=1024, batch=128),
}


def build_cnn_problem(size: str, seed: int) -> dict[str, Any]:
    """Class-structured synthetic images (smooth class templates + noise), a briefly trained
    CNN with BatchNorm, returned in eval mode (running statistics calibrated on the data).
    """
    cfg = CNN_SIZES[size]
    side, C = 16, 10
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(C, cfg["channels"], side, side, generator=g)
    templates = nn.functional.avg_pool2d(templates, 5, 1, 2) * 2.0
    n = cfg["n"]
    y = torch.arange(C).repeat(n // C + 1)[:n][torch.randperm(n, generator=g)]
    X = templates[y] + 1.5 * torch.randn(n, cfg["channels"], side, side, generator=g)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = make_cnn(cfg["channels"], cfg["width1"], cfg["width2"], cfg["hidden"], C, side)
    finally:
        torch.random.set_rng_state(state)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(40):
        idx = torch.randint(0, n, (64,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():  # calibrate BatchNorm running statistics on the whole data set
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average
        for i in range(0, n, cfg["batch"]):
            model(X[i : i + cfg["batch"]])
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
    model.eval()
    for p in model.parameters():
        p.grad = None
    batches = [(X[i : i + cfg["batch"]], y[i : i + cfg["batch"]]) for i in range(0, n, cfg["batch"])]
    with torch.no_grad():
        train_loss = float(sum(loss_fn(model(x), t) * len(t) for x, t in batches) / n)
    desc = (f"{C} classes of synthetic {cfg['channels']}x{side}x{side} images (smoothed random "
            f"templates + noise 1.5); CNN conv{cfg['width1']}-conv{cfg['width2']} (stride 2, "
            f"BatchNorm, eval mode)-fc{cfg['hidden']}-fc{C}, 40 Adam steps")
    return dict(model=model, loss_fn=loss_fn, batches=batches, train_loss=train_loss,
                description=desc)


def build_gmm_problem(size: str, seed: int) -> dict[str, Any]:
    """Sagun et al.'s Gaussian-mixture MLP from ``curvscope.zoo`` (float64), with its weights and
    data rounded to float32 so that the float32 and float64 runs share one exact spectrum.
    """
    from curvscope.zoo import gaussian_mixture

    kwargs: dict[str, Any] = {"seed": seed}
    if size == "medium":
        kwargs.update(n_per_class=400, batch_size=500)
    zp = gaussian_mixture(10, **kwargs)
    model = copy.deepcopy(zp.model).float().double().eval()
    batches = [(x.float().double(), t) for x, t in zp.batches]
    sizes = {len(t) for _, t in batches}
    if len(sizes) != 1:  # equal batches keep hessian-eigenthings' equal weighting unbiased
        X = torch.cat([x for x, _ in batches])
        Y = torch.cat([t for _, t in batches])
        b = len(batches[0][1])
        while len(X) % b:
            b -= 1
        batches = [(X[i : i + b], Y[i : i + b]) for i in range(0, len(X), b)]
    with torch.no_grad():
        n = sum(len(t) for _, t in batches)
        train_loss = float(sum(zp.loss_fn(model(x), t) * len(t) for x, t in batches) / n)
    return dict(model=model, loss_fn=zp.loss_fn, batches=batches, train_loss=train_loss,
                description=getattr(zp, "description", "") or zp.name)


@dataclass
class ProblemSpec:
    name: str
    family: str  # problems of one family share a reference (same weights and data)
    dtype: str  # "float32" | "float64"
    path: str = ""
    num_params: int = 0
    num_data: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    train_loss: float = float("nan")
    description: str = ""


def prepare_problems(args: argparse.Namespace, workdir: Path) -> list[ProblemSpec]:
    """Build every problem once in the parent and save it; the cells load the same file."""
    wanted = set(args.problems.split(","))
    specs: list[ProblemSpec] = []
    families: dict[str, dict[str, Any]] = {}
    if wanted & {"gmm-f32", "gmm-f64"}:
        families["gmm"] = build_gmm_problem(args.size, args.seed)
    if wanted & {"cnn-f32", "cnn-f64"}:
        families["cnn"] = build_cnn_problem(args.size, args.seed)
    for name in ("gmm-f32", "gmm-f64", "cnn-f32", "cnn-f64"):
        if name not in wanted:
            continue
        family, dt = name.split("-")
        dtype = {"f32": torch.float32, "f64": torch.float64}[dt]
        fam = families[family]
        model = copy.deepcopy(fam["model"]).to(dtype).eval()
        batches = [(x.to(dtype), t) for x, t in fam["batches"]]
        path = workdir / f"{name}.pt"
        torch.save({"model": model, "loss_fn": fam["loss_fn"], "batches": batches}, path)
        specs.append(ProblemSpec(
            name=name, family=family, dtype=str(dtype).replace("torch.", ""), path=str(path),
            num_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
            num_data=sum(len(t) for _, t in batches), batch_sizes=[len(t) for _, t in batches],
            train_loss=fam["train_loss"], description=fam["description"]))
    unknown = wanted - {s.name for s in specs}
    if unknown:
        raise SystemExit(f"unknown problems {sorted(unknown)}; choose from gmm-f32, gmm-f64, "
                         "cnn-f32, cnn-f64")
    return specs


def load_problem(path: str, device: str) -> tuple[nn.Module, nn.Module, list]:
    blob = torch.load(path, weights_only=False)
    model = blob["model"].to(device).eval()
    batches = [(x.to(device), t.to(device)) for x, t in blob["batches"]]
    return model, blob["loss_fn"], batches


# ====================================================================================== counting


class Counters:
    """Shared counters (readable by the parent after a timeout kill)."""

    NAMES = ("hvps", "calls", "fwd_samples", "fwd_calls")

    def __init__(self, ctx: Any) -> None:
        for n in self.NAMES:
            setattr(self, n, ctx.Value("q", 0))

    def add(self, name: str, k: int = 1) -> None:
        v = getattr(self, name)
        with v.get_lock():
            v.value += int(k)

    def snapshot(self) -> dict[str, int]:
        return {n: int(getattr(self, n).value) for n in self.NAMES}


class CellContext:
    """What a task function gets: the problem, counters, and a start mark for the timer."""

    def __init__(self, spec: dict[str, Any], counters: Counters) -> None:
        self.spec = spec
        self.device = spec["device"]
        self.seed = spec["seed"]
        self.model, self.loss_fn, self.batches = load_problem(spec["path"], self.device)
        self.dtype = next(self.model.parameters()).dtype
        self.num_data = sum(len(t) for _, t in self.batches)
        self.num_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.counters = counters
        self.notes: list[str] = []
        self._t_start: float | None = None
        self._at_start: dict[str, int] = {}
        self._rss_start = 0.0
        self.warmup_s: float | None = None

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            counters.add("fwd_calls")
            counters.add("fwd_samples", int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim else 0)

        self.model.register_forward_pre_hook(hook)

    def loader(self) -> torch.utils.data.DataLoader:
        """A DataLoader yielding exactly ``self.batches`` (no re-collation, no shuffling)."""
        return torch.utils.data.DataLoader(self.batches, batch_size=None, shuffle=False)

    def count(self, columns: int) -> None:
        self.counters.add("calls")
        self.counters.add("hvps", columns)

    def warmup(self, product: Callable[[], Any]) -> None:
        """One untimed, uncounted product through the library's own operator (part of setup):
        first-call costs (torch.func initialisation, lazy imports) are then paid by every library
        before the timer starts, as curvlinops' constructor does anyway with its own check.
        """
        t = time.perf_counter()
        product()
        sync(self.device)
        self.warmup_s = time.perf_counter() - t

    def vector(self) -> torch.Tensor:
        """A random flat vector for warm-ups (private generator: global RNG untouched)."""
        g = torch.Generator().manual_seed(987654)
        return torch.randn(self.num_params, generator=g, dtype=torch.float64).to(
            device=self.device, dtype=self.dtype)

    def vector_list(self) -> list[torch.Tensor]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return [c.view_as(p) for c, p in zip(torch.split(self.vector(), [p.numel() for p in params]),
                                             params)]

    def start(self) -> None:
        """Mark the end of the library's setup and the start of the timed task."""
        sync(self.device)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        self._rss_start = max_rss_mib()
        self._at_start = self.counters.snapshot()
        self._t_start = time.perf_counter()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def max_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


# ======================================================================================== tasks
# Each task function sets its library up, calls ctx.start(), runs, and returns a dict with the
# estimate ("eigenvalues" | "trace" | "nodes"/"weights" [+ "grid"/"density"]) and "lib" (the
# library's own counters and diagnostics).


def _seeded_global(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


# ------------------------------------------------------------------------------- curvscope
def _cs_operator(ctx: CellContext, engine: str = "auto") -> Any:
    import curvscope as cs

    problem = cs.Problem(ctx.model, ctx.loss_fn, ctx.batches)
    H = cs.HessianOperator(problem, engine=engine)
    inner = H._matmat

    def counted(X: torch.Tensor) -> torch.Tensor:
        ctx.count(X.shape[1])
        return inner(X)

    H._matmat = counted  # instance attribute: every product (A @ X) goes through it
    ctx.warmup(lambda: H @ ctx.vector()[:, None])
    return H


def _cs_gen(ctx: CellContext) -> torch.Generator:
    return torch.Generator().manual_seed(ctx.seed)


def _capture_warnings() -> contextlib.AbstractContextManager:
    return warnings.catch_warnings(record=True)


def cs_topk(ctx: CellContext, tol: float = CS_TOL, engine: str = "auto",
            block_size: int | None = None) -> dict[str, Any]:
    from curvscope.solvers import eigsh

    H = _cs_operator(ctx, engine)
    ctx.start()
    with _capture_warnings() as w:
        warnings.simplefilter("always")
        r = eigsh(H, K, which="LA", tol=tol, block_size=block_size, generator=_cs_gen(ctx))
    rel = r.relative_residuals
    return {"eigenvalues": r.eigenvalues.tolist(),
            "lib": {**r.cost.to_dict(), "converged": int(r.converged.sum()),
                    "worst_relative_residual": float(rel.max()), "restarts": r.num_iters,
                    "warnings": [str(x.message)[:200] for x in w]}}


def cs_trace(ctx: CellContext, method: str = "hutchpp") -> dict[str, Any]:
    from curvscope.estimators import hutchinson_trace, hutchpp_trace, xtrace

    H = _cs_operator(ctx)
    fn, budget = {"hutchpp": (hutchpp_trace, 99), "xtrace": (xtrace, TRACE_BUDGET),
                  "hutchinson": (hutchinson_trace, TRACE_BUDGET)}[method]
    ctx.start()
    est = fn(H, budget, generator=_cs_gen(ctx))
    return {"trace": float(est.value), "std_error": float(est.std_error),
            "lib": {**est.cost.to_dict(), "std_error": float(est.std_error)}}


def cs_density(ctx: CellContext, engine: str = "auto") -> dict[str, Any]:
    from curvscope.estimators import slq

    H = _cs_operator(ctx, engine)
    ctx.start()
    d = slq(H, SLQ_PROBES, SLQ_STEPS, generator=_cs_gen(ctx))
    grid, dens, _ = d.evaluate()  # the library's default smoothing (Lin-Saad-Yang, kappa 3)
    return {"nodes": d.nodes.tolist(), "weights": d.weights.tolist(), "grid": grid.tolist(),
            "density": dens.tolist(), "lib": {**d.cost.to_dict(), "reorth": d.reorth}}


# ------------------------------------------------------------------------------- PyHessian
def _ph_hessian(ctx: CellContext) -> Any:
    import importlib

    phm = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports the class)
    inner_dl = phm.hessian.dataloader_hv_product
    inner_hvp = phm.hessian_vector_product

    def dl_counted(self: Any, v: Any) -> Any:
        ctx.count(1)
        return inner_dl(self, v)

    def hvp_counted(gradsH: Any, params: Any, v: Any) -> Any:
        ctx.count(1)
        return inner_hvp(gradsH, params, v)

    phm.hessian.dataloader_hv_product = dl_counted
    phm.hessian_vector_product = hvp_counted
    _seeded_global(ctx.seed)  # PyHessian draws its vectors from torch's global generator
    # the dataloader form: every HVP runs over all batches, weighted by batch size
    h = phm.hessian(ctx.model, ctx.loss_fn, dataloader=ctx.loader(),
                    cuda=ctx.device.startswith("cuda"))
    ctx.warmup(lambda: h.dataloader_hv_product(ctx.vector_list()))
    return h


def ph_topk(ctx: CellContext, **kwargs: Any) -> dict[str, Any]:
    h = _ph_hessian(ctx)
    ctx.start()
    vals, _ = h.eigenvalues(top_n=K, **kwargs)
    return {"eigenvalues": [float(v) for v in vals], "lib": {"kwargs": kwargs}}


def ph_trace(ctx: CellContext, **kwargs: Any) -> dict[str, Any]:
    h = _ph_hessian(ctx)
    ctx.start()
    samples = h.trace(**kwargs)
    return {"trace": float(np.mean(samples)), "lib": {"samples": len(samples), "kwargs": kwargs}}


def _eig_shim(T: torch.Tensor, eigenvectors: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in for the removed ``torch.eig``: symmetric ``T`` via ``eigh``, same return layout."""
    w, V = torch.linalg.eigh(T)
    return torch.stack([w, torch.zeros_like(w)], dim=1), V


def ph_density(ctx: CellContext, shim: bool = False) -> dict[str, Any]:
    h = _ph_hessian(ctx)
    if shim:
        torch.eig = _eig_shim  # type: ignore[attr-defined]
    ctx.start()
    nodes, weights = h.density(iter=SLQ_STEPS, n_v=SLQ_PROBES)
    return {"nodes": np.asarray(nodes, dtype=np.float64).tolist(),
            "weights": np.asarray(weights, dtype=np.float64).tolist(),
            "lib": {"torch.eig": "patched with eigh" if shim else "torch's own"}}


# --------------------------------------------------------------------- hessian-eigenthings
def _he_operator(ctx: CellContext) -> Any:
    import hessian_eigenthings as he

    op = he.HessianOperator(ctx.model, ctx.loader(), he.supervised_loss(ctx.loss_fn))
    inner = op.matvec

    def counted(v: torch.Tensor) -> torch.Tensor:
        ctx.count(1)
        return inner(v)

    op.matvec = counted
    ctx.warmup(lambda: op.matvec(ctx.vector()))
    return op


def he_topk(ctx: CellContext, **kwargs: Any) -> dict[str, Any]:
    import hessian_eigenthings as he

    op = _he_operator(ctx)
    ctx.start()
    r = he.lanczos(op, k=K, seed=ctx.seed, **kwargs)
    return {"eigenvalues": r.eigenvalues.tolist(),
            "lib": {"iterations": r.iterations, "converged": int(r.converged.sum()),
                    "kwargs": kwargs}}


def he_trace(ctx: CellContext) -> dict[str, Any]:
    import hessian_eigenthings as he

    op = _he_operator(ctx)
    ctx.start()
    r = he.trace(op, seed=ctx.seed)  # defaults: Hutch++, num_matvecs=100 (99 used)
    return {"trace": float(r.estimate), "std_error": float(r.stderr),
            "lib": {"stderr": float(r.stderr)}}


def he_density(ctx: CellContext) -> dict[str, Any]:
    import hessian_eigenthings as he

    op = _he_operator(ctx)
    ctx.start()
    r = he.spectral_density(op, seed=ctx.seed)  # defaults: 10 runs x 80 steps, full reorth
    nodes = r.raw_eigenvalues.double().cpu()
    weights = r.raw_weights.double().cpu()
    keep = ~torch.isnan(nodes)
    return {"nodes": [n[k].tolist() for n, k in zip(nodes, keep)],
            "weights": [w[k].tolist() for w, k in zip(weights, keep)],
            "grid": r.grid.double().cpu().tolist(), "density": r.density.double().cpu().tolist(),
            "lib": {"runs": int(nodes.shape[0]), "steps": int(nodes.shape[1]),
                    "sigma": float(r.sigma)}}


# ------------------------------------------------------------------------------ curvlinops
def _cl_operator(ctx: CellContext) -> Any:
    from curvlinops import HessianLinearOperator

    params = [p for p in ctx.model.parameters() if p.requires_grad]
    H = HessianLinearOperator(ctx.model, ctx.loss_fn, params, ctx.batches)  # checks determinism
    inner = H._matmat

    def counted(M: list[torch.Tensor]) -> list[torch.Tensor]:
        ctx.count(int(M[0].shape[-1]))
        return inner(M)

    H._matmat = counted
    ctx.warmup(lambda: H @ ctx.vector())
    return H


def cl_topk(ctx: CellContext, **kwargs: Any) -> dict[str, Any]:
    from scipy.sparse.linalg import eigsh as scipy_eigsh

    H = _cl_operator(ctx)
    ctx.start()
    # curvlinops has no eigensolver: its documented route is scipy's ARPACK on H.to_scipy()
    vals = scipy_eigsh(H.to_scipy(), k=K, return_eigenvectors=False, **kwargs)
    return {"eigenvalues": sorted((float(v) for v in vals), reverse=True),
            "lib": {"kwargs": kwargs}}


def cl_trace(ctx: CellContext, method: str = "hutchpp") -> dict[str, Any]:
    import curvlinops

    H = _cl_operator(ctx)
    _seeded_global(ctx.seed)  # curvlinops draws probes from torch's global generator
    fn, budget = {"hutchpp": (curvlinops.hutchpp_trace, 99), "xtrace": (curvlinops.xtrace, 100),
                  "hutchinson": (curvlinops.hutchinson_trace, 100)}[method]
    ctx.start()
    est = fn(H, budget)
    return {"trace": float(est), "lib": {"num_matvecs": budget}}


def cl_density(ctx: CellContext) -> dict[str, Any]:
    import curvlinops
    import curvlinops.papyan2020traces.spectrum as spectrum

    H = _cl_operator(ctx)
    runs: list[tuple[torch.Tensor, torch.Tensor]] = []
    inner = spectrum.fast_lanczos

    def recording(A: Any, ncv: int, *args: Any, **kwargs: Any) -> Any:
        out = inner(A, ncv, *args, **kwargs)
        runs.append(out)
        return out

    spectrum.fast_lanczos = recording  # to read the quadrature nodes/weights behind the grid
    _seeded_global(ctx.seed)
    ctx.start()
    grid, dens = curvlinops.lanczos_approximate_spectrum(H, ncv=SLQ_STEPS, num_repeats=SLQ_PROBES)
    return {"nodes": [e.double().cpu().tolist() for e, _ in runs],
            "weights": [(V[0, :].double() ** 2).cpu().tolist() for _, V in runs],
            "grid": grid.double().cpu().tolist(), "density": dens.double().cpu().tolist(),
            "lib": {"ncv": SLQ_STEPS, "num_repeats": SLQ_PROBES, "reorth": "none"}}


# ---------------------------------------------------------------------------------- skerch
def _sk_linop(ctx: CellContext) -> Any:
    """skerch needs ``A @ X`` and ``X @ A``: curvlinops' Hessian (its documented HVP backend)
    wrapped in a ``skerch.linops.BaseLinOp``; HVPs are counted inside curvlinops.
    """
    from skerch.linops import BaseLinOp

    H = _cl_operator(ctx)
    n = ctx.num_params

    class HessianLinOp(BaseLinOp):
        def matmul(self, x: torch.Tensor) -> torch.Tensor:
            return H @ x

        def rmatmul(self, x: torch.Tensor) -> torch.Tensor:
            return (H @ x.T).T  # symmetric

    return HessianLinOp((n, n))


def sk_topk(ctx: CellContext, outer_dims: int = K + 10) -> dict[str, Any]:
    from skerch.algorithms import seigh

    lop = _sk_linop(ctx)
    ctx.start()
    ews, _ = seigh(lop, ctx.device, ctx.dtype, outer_dims, seed=ctx.seed)
    vals = sorted((float(v) for v in ews), reverse=True)[:K]
    return {"eigenvalues": vals, "lib": {"outer_dims": outer_dims, "recovery": "hmt"}}


def sk_trace(ctx: CellContext, method: str = "hutch") -> dict[str, Any]:
    from skerch.algorithms import hutch, xhutchpp

    lop = _sk_linop(ctx)
    ctx.start()
    if method == "hutch":
        out = hutch(lop, ctx.device, ctx.dtype, TRACE_BUDGET, seed=ctx.seed, return_diag=False)
    else:  # XTrace: x_dims=50 deflation measurements, recycled (100 HVPs)
        out = xhutchpp(lop, ctx.device, ctx.dtype, x_dims=TRACE_BUDGET // 2, gh_meas=0,
                       seed=ctx.seed, return_diag=False)
    return {"trace": float(out["tr"]), "lib": {"method": method}}


# ======================================================================================= cells


@dataclass
class Cell:
    library: str  # "curvscope" or an import name from PEERS
    task: str  # "top10" | "trace" | "density"
    setting: str  # human-readable
    fn: str  # name of the task function in TASKS
    kwargs: dict[str, Any] = field(default_factory=dict)
    role: str = "default"  # "default" | "tuned" | "variant" | "main" (curvscope)
    only_dtype: str | None = None
    na: str | None = None  # not applicable: reason (no process is started)
    summary: bool = False  # a curvscope cell that gets a row in the speed summary


TASKS: dict[str, Callable[..., dict[str, Any]]] = {
    "cs_topk": cs_topk, "cs_trace": cs_trace, "cs_density": cs_density,
    "ph_topk": ph_topk, "ph_trace": ph_trace, "ph_density": ph_density,
    "he_topk": he_topk, "he_trace": he_trace, "he_density": he_density,
    "cl_topk": cl_topk, "cl_trace": cl_trace, "cl_density": cl_density,
    "sk_topk": sk_topk, "sk_trace": sk_trace,
}


def all_cells(args: argparse.Namespace) -> list[Cell]:
    tuned_power = dict(maxIter=1000, tol=1e-6)
    he_tuned = dict(max_iter=args.he_max_iter, which="LA", reorthogonalize=True, tol=1e-6)
    cells = [
        # ---- curvscope
        Cell("curvscope", "top10", f"eigsh LA, tol {CS_TOL:g} (thick-restart Lanczos, default block)", "cs_topk",
             role="main", summary=True),
        Cell("curvscope", "top10", "eigsh LA, tol 1e-4 (attainable in float32)", "cs_topk",
             {"tol": 1e-4}, role="variant", only_dtype="float32", summary=True),
        Cell("curvscope", "trace", "hutchpp_trace, 99 products", "cs_trace", {"method": "hutchpp"},
             role="main", summary=True),
        Cell("curvscope", "trace", "xtrace, 100 products", "cs_trace", {"method": "xtrace"},
             role="variant", only_dtype="float32"),
        Cell("curvscope", "trace", "hutchinson_trace, 100 products", "cs_trace",
             {"method": "hutchinson"}, role="variant", only_dtype="float32"),
        Cell("curvscope", "density", f"slq {SLQ_PROBES} probes x {SLQ_STEPS} steps, full reorth",
             "cs_density", role="main", summary=True),
        # ---- PyHessian
        Cell("pyhessian", "top10", "eigenvalues(top_n=10): power, maxIter 100, tol 1e-3 (defaults)",
             "ph_topk", role="default"),
        Cell("pyhessian", "top10", "eigenvalues(top_n=10, maxIter=1000, tol=1e-6)", "ph_topk",
             tuned_power, role="tuned"),
        Cell("pyhessian", "trace", "trace(): Hutchinson, maxIter 100, tol 1e-3 (defaults)",
             "ph_trace", role="default"),
        Cell("pyhessian", "trace", "trace(maxIter=100, tol=0): 100 probes", "ph_trace",
             {"maxIter": TRACE_BUDGET, "tol": 0.0}, role="tuned"),
        Cell("pyhessian", "density", f"density(iter={SLQ_STEPS}, n_v={SLQ_PROBES}) as installed",
             "ph_density", role="default"),
        Cell("pyhessian", "density", f"density(iter={SLQ_STEPS}, n_v={SLQ_PROBES}) with "
             "torch.eig -> eigh SHIM (not the library as shipped)", "ph_density", {"shim": True},
             role="variant"),
        # ---- hessian-eigenthings
        Cell("hessian_eigenthings", "top10", "lanczos(k=10): 20 steps, LM (defaults)", "he_topk",
             role="default"),
        Cell("hessian_eigenthings", "top10",
             f"lanczos(k=10, max_iter={args.he_max_iter}, which=LA, reorth, tol=1e-6)",
             "he_topk", he_tuned, role="tuned"),
        Cell("hessian_eigenthings", "trace", "trace(): Hutch++, 100 -> 99 products (defaults)",
             "he_trace", role="default"),
        Cell("hessian_eigenthings", "density",
             "spectral_density(): 10 runs x 80 steps, full reorth (defaults)", "he_density",
             role="default"),
        # ---- curvlinops
        Cell("curvlinops", "top10", "scipy eigsh(H.to_scipy(), k=10): LM, tol 0 (defaults)",
             "cl_topk", role="default"),
        Cell("curvlinops", "top10", "scipy eigsh(k=10, which=LA, tol=1e-6)", "cl_topk",
             {"which": "LA", "tol": 1e-6}, role="tuned"),
        Cell("curvlinops", "trace", "hutchpp_trace(H, 99)", "cl_trace", {"method": "hutchpp"},
             role="default"),
        Cell("curvlinops", "trace", "xtrace(H, 100)", "cl_trace", {"method": "xtrace"},
             role="variant", only_dtype="float32"),
        Cell("curvlinops", "density", f"lanczos_approximate_spectrum(ncv={SLQ_STEPS}, "
             f"num_repeats={SLQ_PROBES}): no reorth (none offered), bounds by eigsh tol 1e-2",
             "cl_density", role="default"),
        # ---- skerch (HVPs from curvlinops)
        Cell("skerch", "top10", "seigh(outer_dims=20): HMT, Rademacher", "sk_topk", role="default"),
        Cell("skerch", "top10", f"seigh(outer_dims={args.sk_outer}): HMT", "sk_topk",
             {"outer_dims": args.sk_outer}, role="tuned"),
        Cell("skerch", "trace", "hutch(num_meas=100): Girard-Hutchinson", "sk_trace",
             {"method": "hutch"}, role="default"),
        Cell("skerch", "trace", "xhutchpp(x_dims=50, gh_meas=0): XTrace, 100 HVPs", "sk_trace",
             {"method": "xtrace"}, role="variant", only_dtype="float32"),
        Cell("skerch", "density", "-", "", na="skerch has no spectral-density estimator"),
    ]
    libs = set(args.libs.split(","))
    tasks = set(args.tasks.split(","))
    out = [c for c in cells if c.library in libs and c.task in tasks]
    if args.no_variants:
        out = [c for c in out if c.role != "variant"]
    return out


# ====================================================================================== workers


def _cell_worker(spec: dict[str, Any], counters: Counters, out_q: Any) -> None:
    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore", message=".*create_graph=True.*")
    rss0 = max_rss_mib()
    t_entry = time.perf_counter()
    ctx: CellContext | None = None
    try:
        ctx = CellContext(spec, counters)
        t_setup0 = time.perf_counter()
        result = TASKS[spec["fn"]](ctx, **spec["kwargs"])
        sync(ctx.device)
        t_end = time.perf_counter()
        if ctx._t_start is None:
            raise RuntimeError("task function never called ctx.start()")
        out = {"status": "ok", "result": result,
               "setup_s": ctx._t_start - t_setup0, "wall_s": t_end - ctx._t_start}
    except BaseException as err:  # report the library's error as it is
        t_end = time.perf_counter()
        start = ctx._t_start if ctx is not None and ctx._t_start is not None else None
        out = {"status": "error", "error": f"{type(err).__name__}: {err}".strip(),
               "traceback": traceback.format_exc(limit=6)[-2000:],
               "wall_s": (t_end - start) if start else None,
               "setup_s": (start - t_entry) if start else (t_end - t_entry)}
    after = counters.snapshot()
    base = ctx._at_start if ctx is not None and ctx._at_start else {n: 0 for n in Counters.NAMES}
    out["counts"] = {n: after[n] - base.get(n, 0) for n in Counters.NAMES}
    out["num_data"] = ctx.num_data if ctx is not None else None
    out["peak_rss_mib"] = max_rss_mib()
    out["rss_at_start_mib"] = (ctx._rss_start or rss0) if ctx is not None else rss0
    out["warmup_s"] = ctx.warmup_s if ctx is not None else None
    out["rss_import_mib"] = rss0
    if spec["device"].startswith("cuda") and torch.cuda.is_available():
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    out_q.put(out)


START_METHOD = "spawn"


def mp_context() -> Any:
    return mp.get_context(START_METHOD)


def run_in_subprocess(target: Callable, args: tuple, timeout: float,
                      counters: Counters | None = None) -> dict[str, Any]:
    ctx = mp_context()
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q), daemon=True)
    t0 = time.perf_counter()
    p.start()
    result = None
    try:
        result = q.get(timeout=timeout)
    except queue_mod.Empty:
        pass
    if result is None:
        elapsed = time.perf_counter() - t0
        if p.is_alive():
            p.terminate()  # our own child only
            p.join(5)
            if p.is_alive():
                p.kill()
        else:
            p.join()
        counts = counters.snapshot() if counters is not None else {}
        status = "timeout" if elapsed >= timeout - 0.5 else "crashed"
        return {"status": status, "error": f"{status} after {elapsed:.0f} s (exit code "
                f"{p.exitcode})", "process_counts": counts, "elapsed_s": elapsed}
    p.join(10)
    result["elapsed_s"] = time.perf_counter() - t0
    return result


# ==================================================================================== reference


def _plain_hvp(model: nn.Module, loss_fn: nn.Module, batches: list, v: torch.Tensor) -> torch.Tensor:
    """Independent check: autograd double-backward HVP of the mean loss over all examples."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(len(t) for _, t in batches)
    chunks = list(torch.split(v, [p.numel() for p in params]))
    vs = [c.view_as(p) for c, p in zip(chunks, params)]
    out = torch.zeros_like(v)
    for x, t in batches:
        loss = loss_fn(model(x), t) * (len(t) / n)
        g = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(g, params, grad_outputs=vs)
        out += torch.cat([h.reshape(-1) for h in hv])
    return out


def _unequal_batches_check(model: nn.Module, loss_fn: nn.Module, batches: list, D: torch.Tensor,
                           g: torch.Generator) -> dict[str, Any]:
    """Side check (not part of the timed comparison): the same data re-split into unequal
    batches (40/30/20/10 %); ``H v`` of curvscope and of hessian-eigenthings against the dense
    Hessian. hessian-eigenthings averages batches with equal weights.
    """
    import curvscope as cs

    X = torch.cat([x for x, _ in batches])
    Y = torch.cat([t for _, t in batches])
    n = len(Y)
    cuts = [0, int(0.4 * n), int(0.7 * n), int(0.9 * n), n]
    uneq = [(X[a:b], Y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    v = torch.randn(D.shape[0], dtype=D.dtype, generator=g).to(D.device)
    exact = D @ v
    out: dict[str, Any] = {"batch_sizes": [b - a for a, b in zip(cuts[:-1], cuts[1:])]}
    Hu = cs.HessianOperator(cs.Problem(model, loss_fn, uneq))
    out["curvscope_rel_err"] = float((Hu @ v - exact).norm() / exact.norm())
    if importlib.util.find_spec("hessian_eigenthings") is not None:
        import hessian_eigenthings as he

        op = he.HessianOperator(model, uneq, he.supervised_loss(loss_fn))
        out["hessian_eigenthings_rel_err"] = float((op.matvec(v) - exact).norm() / exact.norm())
    return out


def _reference_worker(spec: dict[str, Any], out_q: Any) -> None:
    torch.set_num_threads(spec["threads"])
    try:
        out_q.put({"status": "ok", **_reference(spec)})
    except BaseException as err:
        out_q.put({"status": "error", "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc(limit=8)[-3000:]})


def _reference(spec: dict[str, Any]) -> dict[str, Any]:
    import curvscope as cs
    from curvscope.estimators import hutchpp_trace, slq
    from curvscope.solvers import eigsh

    t0 = time.perf_counter()
    device = spec["device"]
    model, loss_fn, batches = load_problem(spec["path"], device)
    model64 = copy.deepcopy(model).double()
    batches64 = [(x.double(), t) for x, t in batches]
    H64 = cs.HessianOperator(cs.Problem(model64, loss_fn, batches64))
    n = H64.shape[0]
    g = torch.Generator().manual_seed(12345)
    out: dict[str, Any] = {"num_params": n}
    if n <= spec["exact_limit"]:
        chunk = max(1, min(n, spec["dense_chunk"]))
        cols = []
        for i in range(0, n, chunk):
            E = torch.zeros(n, min(chunk, n - i), dtype=torch.float64, device=device)
            E[torch.arange(i, i + E.shape[1]), torch.arange(E.shape[1])] = 1.0
            cols.append(H64 @ E)
        D = torch.cat(cols, 1)
        asym = float((D - D.T).abs().max() / D.abs().max())
        evals = torch.linalg.eigvalsh((D + D.T) / 2).cpu().numpy()
        # independent cross-check of the dense matrix with a plain autograd HVP
        checks = []
        for _ in range(3):
            v = torch.randn(n, dtype=torch.float64, generator=g).to(device)
            hv = _plain_hvp(model64, loss_fn, batches64, v)
            checks.append(float((D @ v - hv).norm() / hv.norm()))
        out["unequal_batches"] = _unequal_batches_check(model64, loss_fn, batches64, D, g)
        path = Path(spec["path"]).with_suffix(".evals.npy")
        np.save(path, evals)
        out.update(kind="exact", label="exact float64 spectrum (dense Hessian + eigvalsh)",
                   top10=evals[::-1][:K].tolist(), trace=float(evals.sum()),
                   lambda_min=float(evals[0]), lambda_max=float(evals[-1]),
                   negative_fraction=float((evals < 0).mean()), evals_path=str(path),
                   dense_asymmetry=asym, plain_hvp_check=max(checks))
    else:
        r = eigsh(H64, K, which="LA", tol=1e-10, generator=g)
        tr = hutchpp_trace(H64, spec["ref_trace_products"], generator=g, block_size=64)
        # density reference: many SLQ probes on the float64 operator
        d = slq(H64, spec["ref_slq_probes"], SLQ_STEPS, generator=g)
        nodes = d.nodes.numpy()
        weights = d.weights.numpy()
        half = nodes.shape[0] // 2
        self_w1 = w1_distance(nodes[:half].ravel(), weights[:half].ravel(),
                              nodes[half:].ravel(), weights[half:].ravel())
        lam_min = float(min(nodes.min(), d.bounds[0]))
        lam_max = float(max(r.eigenvalues.max(), nodes.max()))
        path = Path(spec["path"]).with_suffix(".refslq.npz")
        np.savez(path, nodes=nodes, weights=weights)
        out.update(kind="reference",
                   label=(f"curvscope float64 reference: eigsh tol 1e-10 (top-10), hutchpp "
                          f"{spec['ref_trace_products']} products (trace), slq "
                          f"{spec['ref_slq_probes']} probes x {SLQ_STEPS} (density); NOT exact"),
                   top10=r.eigenvalues.tolist(), top10_converged=int(r.converged.sum()),
                   top10_worst_relres=float(r.relative_residuals.max()),
                   trace=float(tr.value), trace_std_error=float(tr.std_error),
                   lambda_min=lam_min, lambda_max=lam_max,
                   negative_fraction=float(d.negative_fraction()[0]), slq_path=str(path),
                   slq_half_vs_half_w1_over_width=self_w1 / (lam_max - lam_min))
    out["seconds"] = time.perf_counter() - t0
    return out


# ===================================================================================== accuracy


def w1_distance(xa: np.ndarray, wa: np.ndarray, xb: np.ndarray, wb: np.ndarray) -> float:
    """Wasserstein-1 distance between two discrete measures on the line (weights normalised)."""
    xa, wa = np.asarray(xa, float).ravel(), np.asarray(wa, float).ravel()
    xb, wb = np.asarray(xb, float).ravel(), np.asarray(wb, float).ravel()
    ok_a, ok_b = np.isfinite(xa) & np.isfinite(wa), np.isfinite(xb) & np.isfinite(wb)
    xa, wa, xb, wb = xa[ok_a], wa[ok_a], xb[ok_b], wb[ok_b]
    x = np.concatenate([xa, xb])
    d = np.concatenate([wa / wa.sum(), -wb / wb.sum()])
    order = np.argsort(x, kind="stable")
    F = np.cumsum(d[order])[:-1]
    return float(np.sum(np.abs(F) * np.diff(x[order])))


def grid_measure(grid: list[float], density: list[float]) -> tuple[np.ndarray, np.ndarray]:
    g = np.asarray(grid, float)
    f = np.clip(np.asarray(density, float), 0, None)
    dx = np.gradient(g)
    return g, f * dx


class Reference:
    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        self.top10 = np.asarray(info["top10"], float)
        self.trace = float(info["trace"])
        self.width = float(info["lambda_max"] - info["lambda_min"])
        if info["kind"] == "exact":
            ev = np.load(info["evals_path"])
            self.x, self.w = ev, np.full(ev.shape, 1.0 / ev.size)
        else:
            z = np.load(info["slq_path"])
            self.x, self.w = z["nodes"].ravel(), z["weights"].ravel()

    def score(self, task: str, result: dict[str, Any]) -> dict[str, Any]:
        if task == "top10":
            est = np.asarray(sorted(result["eigenvalues"], reverse=True), float)
            if est.size < K:
                return {"error": f"only {est.size} values"}
            err = np.abs(est[:K] - self.top10) / np.abs(self.top10)
            return {"max_rel_err": float(err.max()), "rel_err": err.tolist()}
        if task == "trace":
            return {"rel_err": abs(result["trace"] - self.trace) / abs(self.trace)}
        nodes, weights = result["nodes"], result["weights"]
        x = np.concatenate([np.asarray(n, float) for n in nodes])
        w = np.concatenate([np.asarray(v, float) for v in weights])
        out = {"w1_over_width": w1_distance(x, w, self.x, self.w) / self.width}
        if result.get("grid") is not None:
            gx, gw = grid_measure(result["grid"], result["density"])
            out["w1s_over_width"] = w1_distance(gx, gw, self.x, self.w) / self.width
        return out


# ======================================================================================== report


def fmt_s(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def fmt_e(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.2e}" if x < 0.01 else f"{x:.3g}"


def accuracy_text(task: str, acc: dict[str, Any] | None) -> str:
    if not acc:
        return "–"
    if "error" in acc:
        return acc["error"]
    if task == "top10":
        return f"max rel err {fmt_e(acc['max_rel_err'])}"
    if task == "trace":
        return f"rel err {fmt_e(acc['rel_err'])}"
    s = f"W1/width {fmt_e(acc['w1_over_width'])}"
    if "w1s_over_width" in acc:
        s += f" (smoothed {fmt_e(acc['w1s_over_width'])})"
    return s


def estimate_text(task: str, res: dict[str, Any]) -> str:
    r = res.get("result") or {}
    if task == "top10" and "eigenvalues" in r:
        v = sorted(r["eigenvalues"], reverse=True)
        return f"λ1={v[0]:.5g}, λ10={v[-1]:.4g}" if v else ""
    if task == "trace" and "trace" in r:
        se = r.get("std_error")
        return f"tr={r['trace']:.5g}" + (f" ± {se:.2g}" if se is not None and math.isfinite(se) else "")
    return ""


def cell_row(rec: dict[str, Any]) -> str:
    lib = LIB_LABELS[rec["library"]]
    status = rec["status"]
    task = rec["task"]
    setting = rec["setting"]
    if status in ("not installed", "n/a", "skipped"):
        why = f": {rec['error']}" if rec.get("error") else ""
        return f"| {lib} | {task} | {setting} | **{status}**{why} | | | | | | |"
    c = rec.get("counts") or rec.get("process_counts") or {}
    n = rec.get("num_data") or rec.get("problem_num_data") or 0
    passes = c.get("fwd_samples", 0) / n if n else float("nan")
    hv = f"{c.get('hvps', 0)}"
    calls = f"{c.get('calls', 0)}"
    mem = rec.get("peak_gpu_mib")
    if mem is not None:
        mem_s = f"{mem:.0f} (GPU)"
    elif rec.get("peak_rss_mib") is not None:
        mem_s = f"{rec['peak_rss_mib']:.0f} (+{rec['peak_rss_mib'] - rec['rss_at_start_mib']:.0f})"
    else:
        mem_s = "–"
    if status == "ok":
        acc = accuracy_text(task, rec.get("accuracy"))
        est = estimate_text(task, rec)
        extra = rec.get("note", "")
        what = "; ".join(s for s in (est, extra) if s)
    else:
        err = rec.get("error", status).replace("|", "/").replace("\n", " ")
        acc = f"**{status}**: {err[:110]}"
        what = ""
    return (f"| {lib} | {task} | {setting} | {fmt_s(rec.get('wall_s'))} | {fmt_s(rec.get('setup_s'))} "
            f"| {hv} | {calls} | {passes:.0f} | {mem_s} | {acc}{' · ' + what if what else ''} |")


TABLE_HEAD = ("| library | task | setting | time s | setup s | HVPs | calls | data passes "
              "| peak RSS MiB (+task) | accuracy · estimate |\n|---|---|---|---|---|---|---|---|---|---|")


def comparable(task: str, err_peer: float, err_cs: float) -> bool:
    """Accuracy comparable to curvscope's: within 10x (top-10, floor 1e-6), 3x (trace, floor
    1e-3) or 2x (density, floor 1e-3) of curvscope's error, or better.
    """
    if task == "top10":
        return err_peer <= max(10 * err_cs, 1e-6)
    if task == "trace":
        return err_peer <= max(3 * err_cs, 1e-3)
    return err_peer <= max(2 * err_cs, 1e-3)


def main_error(task: str, acc: dict[str, Any] | None) -> float:
    if not acc or "error" in acc:
        return float("inf")
    return {"top10": acc.get("max_rel_err"), "trace": acc.get("rel_err"),
            "density": acc.get("w1_over_width")}[task]


def summarise(records: list[dict[str, Any]], problems: list[str]) -> tuple[str, list[dict]]:
    lines = ["| problem | task | curvscope (time · err) | fastest peer, any accuracy | fastest peer "
             "at comparable accuracy | speed-up vs that peer |", "|---|---|---|---|---|---|"]
    rows = []
    for prob in problems:
        for task in ("top10", "trace", "density"):
            recs = [r for r in records if r["problem"] == prob and r["task"] == task
                    and r["status"] == "ok" and r.get("wall_s") is not None]
            peers = [r for r in recs if r["library"] != "curvscope"
                     and math.isfinite(main_error(task, r.get("accuracy")))]
            fastest = min(peers, key=lambda r: r["wall_s"], default=None)
            for cs_rec in (r for r in recs if r["library"] == "curvscope" and r.get("summary")):
                e_cs = main_error(task, cs_rec.get("accuracy"))
                comp = [r for r in peers
                        if comparable(task, main_error(task, r.get("accuracy")), e_cs)]
                fastest_c = min(comp, key=lambda r: r["wall_s"], default=None)
                _summary_row(lines, rows, prob, task, cs_rec, e_cs, fastest, fastest_c)
    return "\n".join(lines), rows


def _summary_row(lines: list[str], rows: list[dict], prob: str, task: str, cs_rec: dict[str, Any],
                 e_cs: float, fastest: dict[str, Any] | None,
                 fastest_c: dict[str, Any] | None) -> None:
    def desc(r: dict[str, Any] | None) -> str:
        if r is None:
            return "none"
        return (f"{LIB_LABELS[r['library']]} [{r['setting'][:48]}] {fmt_s(r['wall_s'])} s · "
                f"{fmt_e(main_error(task, r.get('accuracy')))}")

    ratio = fastest_c["wall_s"] / cs_rec["wall_s"] if fastest_c else None
    if ratio is None:
        ratio_s = "no peer comparable"
    elif ratio >= 1:
        ratio_s = f"**{ratio:.2f}x**"
    else:
        ratio_s = f"**{ratio:.2f}x** (curvscope slower)"
    cs_label = f"{fmt_s(cs_rec['wall_s'])} s · {fmt_e(e_cs)}"
    if cs_rec["role"] != "main":
        cs_label += f" [{cs_rec['setting']}]"
    lines.append(f"| {prob} | {task} | {cs_label} | {desc(fastest)} | {desc(fastest_c)} | {ratio_s} |")

    def brief(r: dict[str, Any] | None) -> dict[str, Any] | None:
        if r is None:
            return None
        return {"library": r["library"], "setting": r["setting"], "wall_s": r["wall_s"],
                "error": main_error(task, r.get("accuracy"))}

    rows.append({"problem": prob, "task": task, "curvscope_setting": cs_rec["setting"],
                 "curvscope_s": cs_rec["wall_s"], "curvscope_err": e_cs,
                 "fastest_peer": brief(fastest), "fastest_comparable_peer": brief(fastest_c),
                 "speedup_vs_comparable": ratio})


# ========================================================================================== main


def peer_versions() -> dict[str, str]:
    out = {}
    for mod, (dist, _) in PEERS.items():
        if importlib.util.find_spec(mod) is None:
            out[mod] = "not installed"
            continue
        try:
            out[mod] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[mod] = "installed (version unknown)"
    return out


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(ImportError):
        import scipy

        info["scipy"] = scipy.__version__
    with contextlib.suppress(Exception):
        import curvscope

        info["curvscope"] = curvscope.__version__
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=("small", "medium"), default="small")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--problems", default="gmm-f32,gmm-f64,cnn-f32",
                   help="comma list of gmm-f32, gmm-f64, cnn-f32, cnn-f64")
    p.add_argument("--libs", default="curvscope," + ",".join(PEERS),
                   help="comma list of curvscope, " + ", ".join(PEERS))
    p.add_argument("--tasks", default="top10,trace,density")
    p.add_argument("--no-variants", action="store_true", help="skip the extra variant cells")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per cell")
    p.add_argument("--ref-timeout", type=float, default=900.0, help="seconds per reference")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-method", choices=("forkserver", "spawn"), default="forkserver",
                   help="how cell processes start (both give a fresh process per cell)")
    p.add_argument("--exact-limit", type=int, default=6000,
                   help="form the dense Hessian (exact spectrum) up to this many parameters")
    p.add_argument("--dense-chunk", type=int, default=256, help="columns per product for dense H")
    p.add_argument("--ref-slq-probes", type=int, default=20)
    p.add_argument("--ref-trace-products", type=int, default=600)
    p.add_argument("--he-max-iter", type=int, default=60,
                   help="hessian-eigenthings lanczos max_iter in the tuned setting")
    p.add_argument("--sk-outer", type=int, default=120,
                   help="skerch seigh outer_dims in the tuned setting")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/"
                   "bench_spectral_<device>.json)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_run = time.perf_counter()
    versions = peer_versions()
    info = machine_info(args.device)
    print(f"# bench_spectral: size={args.size} device={args.device} threads/cell={args.threads} "
          f"timeout/cell={args.timeout:.0f}s", flush=True)
    print(f"torch {torch.__version__}, curvscope {info.get('curvscope')}, peers: "
          + ", ".join(f"{LIB_LABELS[k]} {v}" for k, v in versions.items())
          + f"; load average {info.get('loadavg')}", flush=True)

    global START_METHOD
    START_METHOD = args.start_method
    if START_METHOD == "forkserver":
        # every cell is still a fresh process, forked from a server that has only imported
        # these modules (and never run any benchmark code): saves ~2 s of imports per cell
        preload = ["torch", "numpy", "curvscope", "scipy.sparse.linalg"]
        preload += [m for m, v in versions.items() if v != "not installed"]
        mp.get_context("forkserver").set_forkserver_preload(preload)
    workdir = Path(tempfile.mkdtemp(prefix="bench_spectral_"))
    specs = prepare_problems(args, workdir)
    cells = all_cells(args)
    base = {"device": args.device, "seed": args.seed, "threads": args.threads}

    # ---- references (one per family, in a subprocess)
    references: dict[str, Reference] = {}
    ref_info: dict[str, Any] = {}
    for fam in dict.fromkeys(s.family for s in specs):
        spec = next(s for s in specs if s.family == fam)
        # the reference always uses the float64 copy of the (float32-representable) weights
        rspec = {**base, "path": spec.path, "exact_limit": args.exact_limit,
                 "dense_chunk": args.dense_chunk, "ref_slq_probes": args.ref_slq_probes,
                 "ref_trace_products": args.ref_trace_products}
        print(f"\n[reference] {fam}: P={spec.num_params:,} ...", flush=True)
        res = run_in_subprocess(_reference_worker, (rspec,), args.ref_timeout)
        ref_info[fam] = res
        if res.get("status") == "ok":
            references[fam] = Reference(res)
            extra = ""
            if res["kind"] == "exact":
                extra = (f"; dense asym {res['dense_asymmetry']:.1e}, plain-autograd HVP check "
                         f"{res['plain_hvp_check']:.1e}; unequal batches: {res['unequal_batches']}")
            else:
                extra = (f"; top-10 converged {res['top10_converged']}/10, trace ± "
                         f"{res['trace_std_error']:.2g}, SLQ half-vs-half W1/width "
                         f"{res['slq_half_vs_half_w1_over_width']:.2e}")
            print(f"[reference] {fam}: {res['label']} in {res['seconds']:.1f} s; λ1={res['top10'][0]:.6g}, "
                  f"λ10={res['top10'][-1]:.6g}, trace={res['trace']:.6g}, λmin={res['lambda_min']:.4g}"
                  + extra, flush=True)
        else:
            print(f"[reference] {fam}: FAILED: {res.get('error')}\n{res.get('traceback', '')}",
                  flush=True)

    # ---- cells
    records: list[dict[str, Any]] = []
    for spec in specs:
        print(f"\n[cells] {spec.name} (P={spec.num_params:,}, N={spec.num_data}, batches "
              f"{spec.batch_sizes})", flush=True)
        for cell in cells:
            if cell.only_dtype and cell.only_dtype != spec.dtype:
                continue
            rec: dict[str, Any] = {"problem": spec.name, "library": cell.library, "task": cell.task,
                                   "setting": cell.setting, "role": cell.role,
                                   "kwargs": cell.kwargs, "problem_num_data": spec.num_data,
                                   "summary": cell.summary}
            if cell.library != "curvscope" and versions.get(cell.library) == "not installed":
                rec.update(status="not installed",
                           error=f"pip install {PEERS[cell.library][0]} (or -e '.[peers]')")
            elif cell.library == "skerch" and versions.get("curvlinops") == "not installed":
                rec.update(status="skipped", error="skerch cells take their HVPs from curvlinops")
            elif cell.na:
                rec.update(status="n/a", error=cell.na)
            else:
                counters = Counters(mp_context())
                cspec = {**base, "path": spec.path, "fn": cell.fn, "kwargs": cell.kwargs}
                res = run_in_subprocess(_cell_worker, (cspec, counters), args.timeout, counters)
                rec.update(res)
                ref = references.get(spec.family)
                if rec["status"] == "ok" and ref is not None:
                    try:
                        rec["accuracy"] = ref.score(cell.task, rec["result"])
                    except Exception as err:  # noqa: BLE001 - report, don't crash the run
                        rec["accuracy"] = {"error": f"scoring failed: {err}"}
                lib = (rec.get("result") or {}).get("lib") or {}
                if cell.library == "curvscope" and cell.task == "top10" and lib:
                    rec["note"] = (f"{lib.get('converged')}/10 converged, worst rel. residual "
                                   f"{lib.get('worst_relative_residual', float('nan')):.1e}, "
                                   f"{lib.get('restarts')} restarts")
                elif cell.library == "hessian_eigenthings" and cell.task == "top10" and lib:
                    rec["note"] = f"{lib.get('converged')}/10 flagged converged"
            records.append(rec)
            print("  " + cell_row(rec), flush=True)

    # ---- report
    print("\n\n## Results\n")
    print(f"size={args.size}, device={args.device}, {args.threads} thread(s) per cell, seed "
          f"{args.seed}; torch {torch.__version__}; "
          + ", ".join(f"{LIB_LABELS[k]} {v}" for k, v in versions.items()))
    for spec in specs:
        ref = ref_info.get(spec.family, {})
        print(f"\n### {spec.name}: P={spec.num_params:,}, N={spec.num_data} in batches of "
              f"{spec.batch_sizes[0]} (equal), {spec.dtype}, train loss {spec.train_loss:.4g}")
        print(spec.description.rstrip(".") + ".")
        if ref.get("status") == "ok":
            print(f"Accuracy reference: **{ref['label']}**; λ1={ref['top10'][0]:.6g}, "
                  f"λ10={ref['top10'][-1]:.6g}, trace={ref['trace']:.6g}, λmin={ref['lambda_min']:.4g}, "
                  f"negative fraction {ref['negative_fraction']:.3f}.")
            ub = ref.get("unequal_batches")
            if ub and spec.dtype == "float64":
                print(f"Side check, same data re-split into unequal batches {ub['batch_sizes']}: "
                      f"relative error of H v vs the dense Hessian: curvscope "
                      f"{fmt_e(ub['curvscope_rel_err'])}"
                      + (f", hessian-eigenthings {fmt_e(ub['hessian_eigenthings_rel_err'])} "
                         "(equal weight per batch)" if "hessian_eigenthings_rel_err" in ub else "")
                      + ". The timed cells use equal batches.")
            if ref.get("kind") == "reference":
                print(f"Reference noise: trace ± {ref['trace_std_error']:.2g} (rel "
                      f"{ref['trace_std_error'] / abs(ref['trace']):.1e}); density W1/width between "
                      f"two halves of the reference probes {ref['slq_half_vs_half_w1_over_width']:.1e} "
                      "(density errors near this are at the reference's noise floor).")
        else:
            print(f"Accuracy reference: unavailable ({ref.get('error')}).")
        print()
        print(TABLE_HEAD)
        for rec in records:
            if rec["problem"] == spec.name:
                print(cell_row(rec))
    summary_md, summary_rows = summarise(records, [s.name for s in specs])
    print("\n## Speed: curvscope vs the fastest peer\n")
    print(" ".join((comparable.__doc__ or "").split()))
    print()
    print(summary_md)
    total = time.perf_counter() - t_run
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(f"\nTotal wall time {total:.0f} s; load average at start {info.get('loadavg')}, "
          f"end {info['loadavg_end']} (other jobs share this machine: treat times as ±30 %).")

    default_out = HERE / "results" / f"bench_spectral_{args.device.split(':')[0]}.json"
    out_path = Path(args.out) if args.out else default_out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for rec in records:  # keep the JSON small: drop the gridded densities, round the nodes
        res = rec.get("result")
        if isinstance(res, dict):
            res.pop("grid", None)
            res.pop("density", None)
            for key in ("nodes", "weights"):
                if key in res:
                    res[key] = [[float(f"{x:.7g}") for x in row] for row in res[key]]
    ref_json = {}
    for fam, r in ref_info.items():
        r = dict(r)
        if r.get("kind") == "exact" and r.get("evals_path"):
            ev = np.load(r["evals_path"])
            r["eigenvalue_quantiles"] = np.quantile(ev, np.linspace(0, 1, 21)).tolist()
        ref_json[fam] = r
    payload = {
        "benchmark": "bench_spectral", "args": vars(args), "machine": info,
        "versions": {"torch": torch.__version__, "curvscope": info.get("curvscope"), **versions},
        "constants": {"k": K, "slq_probes": SLQ_PROBES, "slq_steps": SLQ_STEPS,
                      "trace_budget": TRACE_BUDGET, "curvscope_tol": CS_TOL},
        "problems": [vars(s) for s in specs], "references": ref_json, "cells": records,
        "summary": summary_rows, "total_seconds": total,
        "notes": [
            "HVPs are counted at each library's operator entry (columns of block products "
            "count one each); data passes = examples seen by a forward pre-hook / N.",
            "Peak RSS is ru_maxrss of the cell's own process (includes ~0.3-0.5 GB for torch "
            "and the libraries); '+task' is its increase during the timed task.",
            "gmm-f32 and gmm-f64 share weights/data rounded to float32, so one exact float64 "
            "spectrum scores both.",
            "PyHessian's density as shipped calls the removed torch.eig; the 'SHIM' row patches "
            "torch.eig with eigh for comparison and is not the library as shipped.",
            "skerch has no HVP of its own: its cells use curvlinops' Hessian behind a "
            "skerch BaseLinOp adapter.",
            "Batches are equal-sized, so hessian-eigenthings' equal weighting of batches is "
            "unbiased here (it is biased for a short last batch).",
        ],
    }
    out_path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"\nwrote {out_path}")
    shutil.rmtree(workdir, ignore_errors=True)  # saved problems and reference spectra
    return 0


if __name__ == "__main__":
    sys.exit(main())
