#!/usr/bin/env python
"""curvscope beside PyHessian, hessian-eigenthings, curvlinops and skerch: top-k eigenpairs,
trace and spectral density on the same problems, in one run.

Every (problem, library, task, setting) cell runs in a fresh subprocess with one intra-op thread
and a wall-clock limit, so that peak memory is per cell and one slow or failing peer cannot hang
or kill the run. Each cell reports

* wall time of the task (``time.perf_counter``, with ``torch.cuda.synchronize`` on a GPU; the
  library's setup is timed separately),
* HVPs: matrix-vector products counted at each library's operator entry point (one per column of
  a block product), and product calls (one per call, whatever its number of columns),
* data passes: examples seen by a forward pre-hook on the model, divided by the dataset size
  (the same hook for every library),
* peak memory: ``ru_maxrss`` of the cell's process (CPU) or ``torch.cuda.max_memory_allocated``
  during the task (GPU), and its increase during the task,
* accuracy against an exact float64 spectrum (problems with at most ``--exact-limit``
  parameters) or against a labelled high-accuracy curvscope reference otherwise:
  top-k: relative residual ``||H v - l v|| / |l|`` of every returned pair (measured in a
  separate process with curvscope's Hessian operator) and ``max_i |est_i - ref_i| / |ref_i|``;
  trace ``|est - ref| / |ref|``; density ``W1(quadrature measure, reference measure) /
  (lambda_max - lambda_min)``.

A target table at the end compares curvscope with the fastest qualifying peer for each of the
targets of workload W1 (ResNet-18, ``--size w1``): density time ratio >= 5 at no worse W1
distance, top-k (relative residual ``--topk-tol``) time ratio >= 3, trace no slower than
curvlinops and >= 5x faster than PyHessian.

The peers are optional: each is imported lazily in its own cells and reported as "not installed"
when missing (``pip install -e '.[peers]'``). See ``benchmarks/README.md``.

Usage::

    python benchmarks/bench_spectral.py --size small              # CPU, CI-sized (< 10 min)
    python benchmarks/bench_spectral.py --size w1-tiny            # W1's settings, tiny ResNet, CPU
    python benchmarks/bench_spectral.py --size w1 --device cuda   # workload W1 on one GPU
    python benchmarks/bench_spectral.py --merge a.json b.json     # one report from split runs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent

PEERS = {  # import name -> (distribution name, label)
    "pyhessian": ("pyhessian", "PyHessian"),
    "hessian_eigenthings": ("hessian-eigenthings", "hessian-eigenthings"),
    "curvlinops": ("curvlinops-for-pytorch", "curvlinops"),
    "skerch": ("skerch", "skerch"),
}
LIB_LABELS = {"curvscope": "curvscope", **{k: v[1] for k, v in PEERS.items()}}
TASK_NAMES = ("topk", "trace", "density")
TASK_ALIASES = {"top10": "topk", "topk": "topk", "trace": "trace", "density": "density"}


@dataclass(frozen=True)
class Budget:
    """What every library is asked for (the same for all of them)."""

    k: int  # top-k eigenpairs (largest algebraic)
    tol: float  # relative residual ||Hv - lv|| / |l| asked for (and needed to "reach" it)
    slq_probes: int  # density: probes (runs)
    slq_steps: int  # density: Lanczos steps per probe
    trace_products: int  # trace: products per estimate

    @property
    def hutchpp_products(self) -> int:
        """Hutch++ splits its budget in three: the largest multiple of 3 within the budget."""
        return max(3, self.trace_products // 3 * 3)


# Per-size defaults. "small"/"medium": the CPU comparison on the Gaussian-mixture MLP and a small
# CNN (top-10, tol 1e-6, 10 x 80 SLQ). "w1": workload W1 (ResNet-18, 11.2M parameters, 2048
# images; one GPU) with the budgets of its targets; "w1-tiny": the same settings on a ResNet-18
# of width 8 (177k parameters) that runs in minutes on a CPU.
W1_FULL = dict(width=64, images=2048, image_size=32, batch=256)
W1_TINY = dict(width=8, images=64, image_size=16, batch=32)
SIZES: dict[str, dict[str, Any]] = {
    "small": dict(problems="gmm-f32,gmm-f64,cnn-f32", topk=10, topk_tol=1e-6, slq_probes=10,
                  slq_steps=80, trace_products=100, timeout="120", cells="all", he_max_iter=60,
                  sk_outer=120, sk_block=0, ref_slq_probes=20, ref_slq_chunk=20,
                  ref_timeout=900.0, w1=W1_TINY),
    "medium": dict(problems="gmm-f32,gmm-f64,cnn-f32", topk=10, topk_tol=1e-6, slq_probes=10,
                   slq_steps=80, trace_products=100, timeout="120", cells="all", he_max_iter=60,
                   sk_outer=120, sk_block=0, ref_slq_probes=20, ref_slq_chunk=20,
                   ref_timeout=900.0, w1=dict(width=16, images=256, image_size=32, batch=64)),
    "w1-tiny": dict(problems="w1-f32", topk=20, topk_tol=1e-3, slq_probes=10, slq_steps=100,
                    trace_products=100, timeout="120", cells="targets", he_max_iter=200,
                    sk_outer=120, sk_block=0, ref_slq_probes=20, ref_slq_chunk=10,
                    ref_timeout=900.0, w1=W1_TINY),
    "w1": dict(problems="w1-f32", topk=20, topk_tol=1e-3, slq_probes=10, slq_steps=100,
               trace_products=100, timeout="300", cells="targets", he_max_iter=200,
               sk_outer=120, sk_block=20, ref_slq_probes=20, ref_slq_chunk=5,
               ref_timeout=540.0, w1=W1_FULL),
}

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
                description=desc, config={"size": size, **cfg})


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
                description=getattr(zp, "description", "") or zp.name,
                config={"size": size, **kwargs})


def build_w1_problem(cfg: dict[str, int], seed: int) -> dict[str, Any]:
    """Workload W1 from ``curvscope.zoo.synthetic_images_resnet18``: torchvision's ResNet-18
    (same modules, names and initialisation) with a 10-class head at initialisation, eval mode,
    on class-structured synthetic 3 x size x size images; ``width`` 64 is the real ResNet-18.
    """
    from curvscope.zoo import synthetic_images_resnet18

    zp = synthetic_images_resnet18(10, n=cfg["images"], batch_size=cfg["batch"],
                                   size=cfg["image_size"], width=cfg["width"],
                                   dtype=torch.float32, seed=seed)
    model = zp.model.eval()
    for p in model.parameters():
        p.grad = None
    sizes = [len(t) for _, t in zp.batches]
    desc = zp.description
    if len(set(sizes)) != 1:
        desc += (f" NOTE: unequal batches {sizes}: hessian-eigenthings weights batches equally, "
                 "which biases its products here.")
    return dict(model=model, loss_fn=zp.loss_fn, batches=list(zp.batches),
                train_loss=float(zp.train_loss), description=desc,
                config={**cfg, "zoo": zp.name, "zoo_num_params":
                        sum(p.numel() for p in model.parameters())})


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
    config: dict[str, Any] = field(default_factory=dict)


FAMILIES = ("gmm", "cnn", "w1")
PROBLEM_NAMES = tuple(f"{f}-{d}" for f in FAMILIES for d in ("f32", "f64"))


def w1_config(args: argparse.Namespace) -> dict[str, int]:
    return dict(width=args.w1_width, images=args.w1_images, image_size=args.w1_image_size,
                batch=args.w1_batch)


def prepare_problems(args: argparse.Namespace, workdir: Path) -> list[ProblemSpec]:
    """Build every problem once in the parent and save it; the cells load the same file."""
    wanted = set(args.problems.split(","))
    unknown = wanted - set(PROBLEM_NAMES)
    if unknown:
        raise SystemExit(f"unknown problems {sorted(unknown)}; choose from {', '.join(PROBLEM_NAMES)}")
    classic = args.size if args.size in CNN_SIZES else "small"  # gmm / cnn at the W1 sizes
    builders = {"gmm": lambda: build_gmm_problem(classic, args.seed),
                "cnn": lambda: build_cnn_problem(classic, args.seed),
                "w1": lambda: build_w1_problem(w1_config(args), args.seed)}
    families = {f: builders[f]() for f in FAMILIES if any(w.startswith(f + "-") for w in wanted)}
    specs: list[ProblemSpec] = []
    for name in PROBLEM_NAMES:
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
            train_loss=fam["train_loss"], description=fam["description"], config=fam["config"]))
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
        self.t_start = ctx.Value("d", 0.0)  # time.time() at the start of the timed task

    def task_elapsed(self) -> float | None:
        """Seconds since the task's timer started (for a cell killed at its time limit)."""
        t = float(self.t_start.value)
        return time.time() - t if t > 0 else None

    def add(self, name: str, k: int = 1) -> None:
        v = getattr(self, name)
        with v.get_lock():
            v.value += int(k)

    def snapshot(self) -> dict[str, int]:
        return {n: int(getattr(self, n).value) for n in self.NAMES}


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


class CellContext:
    """What a task function gets: the problem, the budget, counters, and a start mark."""

    def __init__(self, spec: dict[str, Any], counters: Counters) -> None:
        self.spec = spec
        self.device = spec["device"]
        self.seed = spec["seed"]
        self.budget = Budget(**spec["budget"])
        self.model, self.loss_fn, self.batches = load_problem(spec["path"], self.device)
        self.dtype = next(self.model.parameters()).dtype
        self.num_data = sum(len(t) for _, t in self.batches)
        self.num_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.counters = counters
        self.notes: list[str] = []
        self._t_start: float | None = None
        self._at_start: dict[str, int] = {}
        self._rss_start = 0.0
        self.gpu_setup_peak_mib: float | None = None
        self.gpu_at_start_mib: float | None = None
        self.warmup_s: float | None = None
        self.product_s = 0.0  # time inside the operator's products (curvscope's cells)
        self.gradient_s: float | None = None  # one gradient over all the data (curvscope's cells)

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
        first-call costs (torch.func initialisation, lazy imports, cuDNN plans) are then paid by
        every library before the timer starts, as curvlinops' constructor does anyway.
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
        if is_cuda(self.device):
            self.gpu_setup_peak_mib = torch.cuda.max_memory_allocated() / 2**20
            self.gpu_at_start_mib = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        self._rss_start = max_rss_mib()
        self._at_start = self.counters.snapshot()
        self.counters.t_start.value = time.time()
        self._t_start = time.perf_counter()


def sync(device: str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def max_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def columns(V: Any, n: int) -> torch.Tensor:
    """Eigenvectors as an ``[n, j]`` tensor (from ``[n, j]``, ``[j, n]`` or a numpy array)."""
    V = torch.as_tensor(V)
    if V.ndim == 1:
        V = V[:, None]
    if V.shape[0] != n and V.shape[-1] == n:
        V = V.T
    return V


# ======================================================================================== tasks
# Each task function sets its library up, calls ctx.start(), runs, and returns a dict with the
# estimate ("eigenvalues" [+ "vectors", the matching eigenvectors as columns] | "trace" |
# "nodes"/"weights" [+ "grid"/"density"]) and "lib" (the library's own counters/diagnostics).


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
        sync(ctx.device)
        t = time.perf_counter()
        out = inner(X)
        sync(ctx.device)
        ctx.product_s += time.perf_counter() - t  # the rest of the task is not products
        return out

    H._matmat = counted  # instance attribute: every product (A @ X) goes through it

    def warm() -> None:  # one column and one block: on a GPU they take different engines
        v = ctx.vector()
        H @ v[:, None]
        H @ torch.stack([v, -v], 1)

    ctx.warmup(warm)
    ctx.gradient_s = _gradient_seconds(ctx)
    ctx.product_s = 0.0
    return H


def _gradient_seconds(ctx: CellContext, repeats: int = 3) -> float:
    """One gradient of the loss over all the data (forward + backward, the best of
    ``repeats``): the unit of a product's physical limit (setup, not timed)."""
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    best = float("inf")
    for _ in range(repeats):
        sync(ctx.device)
        t = time.perf_counter()
        for x, y in ctx.batches:
            loss = ctx.loss_fn(ctx.model(x), y) * (len(y) / ctx.num_data)
            torch.autograd.grad(loss, params)
        sync(ctx.device)
        best = min(best, time.perf_counter() - t)
    return best


def _cs_gen(ctx: CellContext) -> torch.Generator:
    return torch.Generator().manual_seed(ctx.seed)  # CPU generator: curvscope moves the draws


def _capture_warnings() -> contextlib.AbstractContextManager:
    return warnings.catch_warnings(record=True)


def cs_topk(ctx: CellContext, tol: float | None = None, engine: str = "auto",
            block_size: int | None = None) -> dict[str, Any]:
    from curvscope.solvers import eigsh

    b = ctx.budget
    H = _cs_operator(ctx, engine)
    ctx.start()
    with _capture_warnings() as w:
        warnings.simplefilter("always")
        r = eigsh(H, b.k, which="LA", tol=b.tol if tol is None else tol, block_size=block_size,
                  generator=_cs_gen(ctx))
    rel = r.relative_residuals
    return {"eigenvalues": r.eigenvalues.tolist(), "vectors": r.eigenvectors,
            "lib": {**r.cost.to_dict(), "converged": int(r.converged.sum()),
                    "worst_relative_residual": float(rel.max()), "restarts": r.num_iters,
                    "warnings": [str(x.message)[:200] for x in w]}}


def cs_trace(ctx: CellContext, method: str = "hutchpp") -> dict[str, Any]:
    from curvscope.estimators import hutchinson_trace, hutchpp_trace, xtrace

    b = ctx.budget
    H = _cs_operator(ctx)
    fn, budget = {"hutchpp": (hutchpp_trace, b.hutchpp_products),
                  "xtrace": (xtrace, b.trace_products),
                  "hutchinson": (hutchinson_trace, b.trace_products)}[method]
    ctx.start()
    est = fn(H, budget, generator=_cs_gen(ctx))
    return {"trace": float(est.value), "std_error": float(est.std_error),
            "lib": {**est.cost.to_dict(), "std_error": float(est.std_error)}}


def cs_density(ctx: CellContext, engine: str = "auto", basis: str | None = None) -> dict[str, Any]:
    from curvscope.estimators import slq

    b = ctx.budget
    H = _cs_operator(ctx, engine)
    extra = {"basis": basis} if basis else {}
    ctx.start()
    d = slq(H, b.slq_probes, b.slq_steps, generator=_cs_gen(ctx), **extra)
    nodes, weights = d.nodes.tolist(), d.weights.tolist()  # float64 on the host: synchronises
    t_task = time.perf_counter()
    grid, dens, _ = d.evaluate()  # the library's default smoothing (Lin-Saad-Yang, kappa 3)
    return {"nodes": nodes, "weights": weights, "grid": grid.tolist(),
            "density": dens.tolist(), "lib": {**d.cost.to_dict(), "reorth": d.reorth,
                                              "evaluate_s": time.perf_counter() - t_task}}


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
    h = phm.hessian(ctx.model, ctx.loss_fn, dataloader=ctx.loader(), cuda=is_cuda(ctx.device))
    ctx.warmup(lambda: h.dataloader_hv_product(ctx.vector_list()))
    return h


def ph_topk(ctx: CellContext, **kwargs: Any) -> dict[str, Any]:
    h = _ph_hessian(ctx)
    ctx.start()
    vals, vecs = h.eigenvalues(top_n=ctx.budget.k, **kwargs)
    V = torch.stack([torch.cat([t.reshape(-1) for t in v]) for v in vecs], 1) if vecs else None
    return {"eigenvalues": [float(v) for v in vals], "vectors": V, "lib": {"kwargs": kwargs}}


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
    b = ctx.budget
    h = _ph_hessian(ctx)
    if shim:
        torch.eig = _eig_shim  # type: ignore[attr-defined]
    ctx.start()
    nodes, weights = h.density(iter=b.slq_steps, n_v=b.slq_probes)
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
    r = he.lanczos(op, k=ctx.budget.k, seed=ctx.seed, **kwargs)
    return {"eigenvalues": r.eigenvalues.tolist(), "vectors": r.eigenvectors,
            "lib": {"iterations": r.iterations, "converged": int(r.converged.sum()),
                    "kwargs": kwargs}}


def he_trace(ctx: CellContext) -> dict[str, Any]:
    import hessian_eigenthings as he

    op = _he_operator(ctx)
    ctx.start()
    r = he.trace(op, num_matvecs=ctx.budget.trace_products, seed=ctx.seed)  # Hutch++
    return {"trace": float(r.estimate), "std_error": float(r.stderr),
            "lib": {"stderr": float(r.stderr)}}


def he_density(ctx: CellContext) -> dict[str, Any]:
    import hessian_eigenthings as he

    b = ctx.budget
    op = _he_operator(ctx)
    ctx.start()
    r = he.spectral_density(op, num_runs=b.slq_probes, lanczos_steps=b.slq_steps,
                            seed=ctx.seed)  # full reorthogonalisation (always on)
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
    try:  # the constructor checks determinism (2 gradients, 2 HVPs): counted as setup
        H = HessianLinearOperator(ctx.model, ctx.loss_fn, params, ctx.batches)
    except RuntimeError as err:
        if "deterministic" not in str(err):
            raise
        # non-deterministic GPU kernels can fail its check by rounding; say so and go on
        ctx.notes.append(f"curvlinops determinism check failed ({err}); rebuilt without it")
        H = HessianLinearOperator(ctx.model, ctx.loss_fn, params, ctx.batches,
                                  check_deterministic=False)
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
    vals, vecs = scipy_eigsh(H.to_scipy(), k=ctx.budget.k, return_eigenvectors=True, **kwargs)
    return {"eigenvalues": [float(v) for v in vals], "vectors": torch.from_numpy(vecs),
            "lib": {"kwargs": kwargs}}


def cl_trace(ctx: CellContext, method: str = "hutchpp") -> dict[str, Any]:
    import curvlinops

    b = ctx.budget
    H = _cl_operator(ctx)
    _seeded_global(ctx.seed)  # curvlinops draws probes from torch's global generator
    fn, budget = {"hutchpp": (curvlinops.hutchpp_trace, b.hutchpp_products),
                  "xtrace": (curvlinops.xtrace, b.trace_products),
                  "hutchinson": (curvlinops.hutchinson_trace, b.trace_products)}[method]
    ctx.start()
    est = fn(H, budget)
    return {"trace": float(est), "lib": {"num_matvecs": budget}}


def cl_density(ctx: CellContext) -> dict[str, Any]:
    import curvlinops
    import curvlinops.papyan2020traces.spectrum as spectrum

    b = ctx.budget
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
    grid, dens = curvlinops.lanczos_approximate_spectrum(H, ncv=b.slq_steps,
                                                         num_repeats=b.slq_probes)
    return {"nodes": [torch.as_tensor(e).double().cpu().tolist() for e, _ in runs],
            "weights": [(torch.as_tensor(V)[0, :].double() ** 2).cpu().tolist() for _, V in runs],
            "grid": torch.as_tensor(grid).double().cpu().tolist(),
            "density": torch.as_tensor(dens).double().cpu().tolist(),
            "lib": {"ncv": b.slq_steps, "num_repeats": b.slq_probes, "reorth": "none"}}


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


def _sk_blocks(ctx: CellContext) -> dict[str, Any]:
    block = int(ctx.spec.get("sk_block") or 0)
    return {"meas_blocksize": block} if block > 0 else {}


def sk_topk(ctx: CellContext, outer_dims: int | None = None) -> dict[str, Any]:
    from skerch.algorithms import seigh

    k = ctx.budget.k
    outer = outer_dims or k + 10
    lop = _sk_linop(ctx)
    extra = _sk_blocks(ctx)
    ctx.start()
    ews, evs = seigh(lop, ctx.device, ctx.dtype, outer, seed=ctx.seed, **extra)
    ews = torch.as_tensor(ews)
    order = torch.argsort(ews.real if ews.is_complex() else ews, descending=True)[:k]
    V = columns(evs, ctx.num_params)[:, order.to(torch.as_tensor(evs).device)]
    return {"eigenvalues": [float(v) for v in ews[order]], "vectors": V,
            "lib": {"outer_dims": outer, "recovery": "hmt", **extra}}


def sk_trace(ctx: CellContext, method: str = "hutch") -> dict[str, Any]:
    from skerch.algorithms import hutch, xhutchpp

    b = ctx.budget
    lop = _sk_linop(ctx)
    extra = _sk_blocks(ctx)
    ctx.start()
    if method == "hutch":
        out = hutch(lop, ctx.device, ctx.dtype, b.trace_products, seed=ctx.seed,
                    return_diag=False, **extra)
    else:  # XTrace: x_dims = budget/2 deflation measurements, recycled (budget HVPs)
        out = xhutchpp(lop, ctx.device, ctx.dtype, x_dims=b.trace_products // 2, gh_meas=0,
                       seed=ctx.seed, return_diag=False, **extra)
    return {"trace": float(out["tr"]), "lib": {"method": method, **extra}}


# ======================================================================================= cells


@dataclass
class Cell:
    library: str  # "curvscope" or an import name from PEERS
    task: str  # "topk" | "trace" | "density"
    setting: str  # human-readable
    fn: str  # name of the task function in TASKS
    kwargs: dict[str, Any] = field(default_factory=dict)
    role: str = "default"  # "default" | "tuned" | "variant" | "main" (curvscope)
    only_dtype: str | None = None
    na: str | None = None  # not applicable: reason (no process is started)
    summary: bool = False  # a curvscope cell that gets a row in the speed summary
    targets: tuple[str, ...] = ()  # the target rows this cell takes part in (see TARGETS)
    lean: bool = False  # run with --cells targets (the cells the targets need)


TASKS: dict[str, Callable[..., dict[str, Any]]] = {
    "cs_topk": cs_topk, "cs_trace": cs_trace, "cs_density": cs_density,
    "ph_topk": ph_topk, "ph_trace": ph_trace, "ph_density": ph_density,
    "he_topk": he_topk, "he_trace": he_trace, "he_density": he_density,
    "cl_topk": cl_topk, "cl_trace": cl_trace, "cl_density": cl_density,
    "sk_topk": sk_topk, "sk_trace": sk_trace,
}


def all_cells(args: argparse.Namespace, b: Budget) -> list[Cell]:
    k, tol, B, B3 = b.k, b.tol, b.trace_products, b.hutchpp_products
    p, m = b.slq_probes, b.slq_steps
    tuned_power = dict(maxIter=1000, tol=1e-6)
    he_tuned = dict(max_iter=args.he_max_iter, which="LA", reorthogonalize=True, tol=tol)
    T_HPP = ("trace-hutchpp:curvlinops", "trace-hutchpp:pyhessian")
    T_XT = ("trace-xtrace:curvlinops", "trace-xtrace:pyhessian")
    cs_slq_kwargs = {"basis": args.cs_slq_basis} if args.cs_slq_basis else {}
    cells = [
        # ---- curvscope
        Cell("curvscope", "topk", f"eigsh(k={k}) LA, tol {tol:g} (thick-restart Lanczos, default "
             "block)", "cs_topk", role="main", summary=True, targets=("topk",), lean=True),
        Cell("curvscope", "trace", f"hutchpp_trace, {B3} products", "cs_trace",
             {"method": "hutchpp"}, role="main", summary=True, targets=T_HPP, lean=True),
        Cell("curvscope", "trace", f"xtrace, {B} products", "cs_trace", {"method": "xtrace"},
             role="main", targets=T_XT, lean=True),
        Cell("curvscope", "trace", f"hutchinson_trace, {B} products", "cs_trace",
             {"method": "hutchinson"}, role="variant", only_dtype="float32"),
        Cell("curvscope", "density", f"slq {p} probes x {m} steps, full reorth"
             + (f", basis={args.cs_slq_basis}" if args.cs_slq_basis else ""), "cs_density",
             cs_slq_kwargs, role="main", summary=True, targets=("density",), lean=True),
        # ---- PyHessian
        Cell("pyhessian", "topk", f"eigenvalues(top_n={k}): power, maxIter 100, tol 1e-3 (defaults)",
             "ph_topk", role="default", targets=("topk",), lean=True),
        Cell("pyhessian", "topk", f"eigenvalues(top_n={k}, maxIter=1000, tol=1e-6)", "ph_topk",
             tuned_power, role="tuned", targets=("topk",)),
        Cell("pyhessian", "trace", "trace(): Hutchinson, maxIter 100, tol 1e-3 (defaults)",
             "ph_trace", role="default"),
        Cell("pyhessian", "trace", f"trace(maxIter={B}, tol=0): {B} probes", "ph_trace",
             {"maxIter": B, "tol": 0.0}, role="tuned",
             targets=("trace-hutchpp:pyhessian", "trace-xtrace:pyhessian"), lean=True),
        Cell("pyhessian", "density", f"density(iter={m}, n_v={p}) as installed",
             "ph_density", role="default", targets=("density",)),
        Cell("pyhessian", "density", f"density(iter={m}, n_v={p}) with "
             "torch.eig -> eigh SHIM (not the library as shipped)", "ph_density", {"shim": True},
             role="variant", targets=("density",), lean=True),
        # ---- hessian-eigenthings
        Cell("hessian_eigenthings", "topk", f"lanczos(k={k}): {2 * k} steps, LM (defaults)",
             "he_topk", role="default", targets=("topk",)),
        Cell("hessian_eigenthings", "topk",
             f"lanczos(k={k}, max_iter={args.he_max_iter}, which=LA, reorth, tol={tol:g})",
             "he_topk", he_tuned, role="tuned", targets=("topk",), lean=True),
        Cell("hessian_eigenthings", "trace", f"trace(num_matvecs={B}): Hutch++ ({B3} used)",
             "he_trace", role="default", targets=("trace:other",), lean=True),
        Cell("hessian_eigenthings", "density",
             f"spectral_density(num_runs={p}, lanczos_steps={m}): full reorth", "he_density",
             role="default", targets=("density",), lean=True),
        # ---- curvlinops
        Cell("curvlinops", "topk", f"scipy eigsh(H.to_scipy(), k={k}): LM, tol 0 (defaults)",
             "cl_topk", role="default", targets=("topk",)),
        Cell("curvlinops", "topk", f"scipy eigsh(k={k}, which=LA, tol={tol:g})", "cl_topk",
             {"which": "LA", "tol": tol}, role="tuned", targets=("topk",), lean=True),
        Cell("curvlinops", "trace", f"hutchpp_trace(H, {B3})", "cl_trace", {"method": "hutchpp"},
             role="default", targets=("trace-hutchpp:curvlinops",), lean=True),
        Cell("curvlinops", "trace", f"xtrace(H, {B})", "cl_trace", {"method": "xtrace"},
             role="default", targets=("trace-xtrace:curvlinops",), lean=True),
        Cell("curvlinops", "density", f"lanczos_approximate_spectrum(ncv={m}, "
             f"num_repeats={p}): no reorth (none offered), bounds by eigsh tol 1e-2",
             "cl_density", role="default", targets=("density",), lean=True),
        # ---- skerch (HVPs from curvlinops)
        Cell("skerch", "topk", f"seigh(outer_dims={k + 10}): HMT, Rademacher", "sk_topk",
             role="default", targets=("topk",)),
        Cell("skerch", "topk", f"seigh(outer_dims={args.sk_outer}): HMT", "sk_topk",
             {"outer_dims": args.sk_outer}, role="tuned", targets=("topk",), lean=True),
        Cell("skerch", "trace", f"hutch(num_meas={B}): Girard-Hutchinson", "sk_trace",
             {"method": "hutch"}, role="default", targets=("trace:other",), lean=True),
        Cell("skerch", "trace", f"xhutchpp(x_dims={B // 2}, gh_meas=0): XTrace, {B} HVPs",
             "sk_trace", {"method": "xtrace"}, role="default", targets=("trace:other",),
             lean=True),
        Cell("skerch", "density", "-", "", na="skerch has no spectral-density estimator"),
    ]
    if tol < 1e-4:  # the float32 variant with a tolerance float32 products can certify
        cells.insert(1, Cell("curvscope", "topk", "eigsh LA, tol 1e-4 (attainable in float32)",
                             "cs_topk", {"tol": 1e-4}, role="variant", only_dtype="float32",
                             summary=True))
    libs = set(args.libs.split(","))
    tasks = set(args.tasks.split(","))
    out = [c for c in cells if c.library in libs and c.task in tasks]
    if args.cells == "targets":
        out = [c for c in out if c.lean]
    if args.no_variants:
        out = [c for c in out if c.role != "variant"]
    return out


# ====================================================================================== workers


def _init_process(spec: dict[str, Any]) -> None:
    """Per-process settings shared by every cell, reference and residual process."""
    torch.set_num_threads(spec["threads"])
    # float32 means float32: no TF32 in cuDNN convolutions (on by default) or matmuls, unless
    # asked (--allow-tf32); applies to every library alike
    torch.backends.cudnn.allow_tf32 = bool(spec.get("allow_tf32"))
    torch.backends.cuda.matmul.allow_tf32 = bool(spec.get("allow_tf32"))
    warnings.filterwarnings("ignore", message=".*create_graph=True.*")


def _gpu_mib(fn: str) -> float | None:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return getattr(torch.cuda, fn)() / 2**20


def _cell_worker(spec: dict[str, Any], counters: Counters, out_q: Any) -> None:
    _init_process(spec)
    rss0 = max_rss_mib()
    t_entry = time.perf_counter()
    ctx: CellContext | None = None
    result: dict[str, Any] | None = None
    peak_gpu = None
    try:
        ctx = CellContext(spec, counters)
        t_setup0 = time.perf_counter()
        result = TASKS[spec["fn"]](ctx, **spec["kwargs"])
        sync(ctx.device)
        t_end = time.perf_counter()
        if ctx._t_start is None:
            raise RuntimeError("task function never called ctx.start()")
        peak_gpu = _gpu_mib("max_memory_allocated") if is_cuda(ctx.device) else None
        out = {"status": "ok", "result": result,
               "setup_s": ctx._t_start - t_setup0, "wall_s": t_end - ctx._t_start}
    except BaseException as err:  # report the library's error as it is
        t_end = time.perf_counter()
        start = ctx._t_start if ctx is not None and ctx._t_start is not None else None
        if is_cuda(spec["device"]):
            peak_gpu = _gpu_mib("max_memory_allocated")
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
    if ctx is not None and ctx.gradient_s is not None:
        out["product_s"], out["gradient_s"] = ctx.product_s, ctx.gradient_s
    out["rss_import_mib"] = rss0
    if ctx is not None and ctx.notes:
        out["lib_notes"] = ctx.notes
    if is_cuda(spec["device"]):
        out["peak_gpu_mib"] = peak_gpu  # during the task (reset at ctx.start())
        if ctx is not None:
            out["gpu_at_start_mib"] = ctx.gpu_at_start_mib  # model, data, library state
            out["peak_gpu_setup_mib"] = ctx.gpu_setup_peak_mib
    if out["status"] == "ok" and result is not None and "vectors" in result:
        try:  # after the timer and the memory reading: eigenvectors go to a file, not the queue
            V = result.pop("vectors")
            if V is None:
                raise ValueError("the library returned no eigenvectors")
            V = columns(V, ctx.num_params if ctx is not None else -1).detach().to("cpu")
            torch.save(V.contiguous(), spec["vec_path"])
            result["vectors_path"], result["vectors_shape"] = spec["vec_path"], list(V.shape)
        except Exception as err:  # noqa: BLE001 - the cell's estimate stands without vectors
            result["vectors_error"] = f"{type(err).__name__}: {err}"
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
    deadline = t0 + timeout
    while result is None:  # poll, so that a child that dies (abort, CUDA error) is seen at once
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            break
        try:
            result = q.get(timeout=min(1.0, remaining))
        except queue_mod.Empty:
            if not p.is_alive():
                with contextlib.suppress(queue_mod.Empty):  # a result may still be in the pipe
                    result = q.get(timeout=2.0)
                break
        except Exception as err:  # noqa: BLE001 - e.g. a result that cannot be unpickled
            result = {"status": "crashed", "error": f"result unreadable: {type(err).__name__}: {err}"}
    if result is None:
        elapsed = time.perf_counter() - t0
        if p.is_alive():
            p.terminate()  # our own child only
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        else:
            p.join()
        counts = counters.snapshot() if counters is not None else {}
        task_s = counters.task_elapsed() if counters is not None else None
        status = "timeout" if elapsed >= timeout - 0.5 else "crashed"
        where = (f"; its task had run {task_s:.0f} s" if task_s is not None else
                 "; still in setup" if counters is not None else "")
        return {"status": status, "error": f"{status} after {elapsed:.0f} s{where} (exit code "
                f"{p.exitcode})", "process_counts": counts, "elapsed_s": elapsed,
                "task_s_at_kill": task_s}
    p.join(30)
    if p.is_alive():  # finished its work but hangs on exit (e.g. CUDA teardown): end it
        p.terminate()
        p.join(5)
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


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, default=float))
    os.replace(tmp, path)


def _ref_problem(spec: dict[str, Any]) -> tuple[Any, nn.Module, nn.Module, list]:
    """The problem in the reference dtype (float32 weights are exact in float64) and curvscope's
    Hessian operator on it.
    """
    import curvscope as cs

    dtype = getattr(torch, spec["ref_dtype"])
    model, loss_fn, batches = load_problem(spec["path"], spec["device"])
    model = model.to(dtype)
    batches = [(x.to(dtype), t) for x, t in batches]
    return cs.HessianOperator(cs.Problem(model, loss_fn, batches)), model, loss_fn, batches


def _ref_exact(H: Any, model: nn.Module, loss_fn: nn.Module, batches: list, spec: dict[str, Any],
               stem: Path) -> dict[str, Any]:
    n = H.shape[0]
    device = spec["device"]
    g = torch.Generator().manual_seed(12345)
    chunk = max(1, min(n, spec["dense_chunk"]))
    cols = []
    for i in range(0, n, chunk):
        E = torch.zeros(n, min(chunk, n - i), dtype=H.dtype, device=device)
        E[torch.arange(i, i + E.shape[1]), torch.arange(E.shape[1])] = 1.0
        cols.append(H @ E)
    D = torch.cat(cols, 1)
    asym = float((D - D.T).abs().max() / D.abs().max())
    evals = torch.linalg.eigvalsh((D + D.T) / 2).cpu().numpy()
    checks = []  # independent cross-check of the dense matrix with a plain autograd HVP
    for _ in range(3):
        v = torch.randn(n, dtype=torch.float64, generator=g).to(device=device, dtype=H.dtype)
        hv = _plain_hvp(model, loss_fn, batches, v)
        checks.append(float((D @ v - hv).norm() / hv.norm()))
    path = stem.with_suffix(".npy")
    np.save(path, evals)
    return dict(evals_path=str(path), trace=float(evals.sum()), lambda_min=float(evals[0]),
                lambda_max=float(evals[-1]), negative_fraction=float((evals < 0).mean()),
                dense_asymmetry=asym, plain_hvp_check=max(checks),
                unequal_batches=_unequal_batches_check(model, loss_fn, batches, D, g))


def _ref_topk(H: Any, spec: dict[str, Any]) -> dict[str, Any]:
    from curvscope.solvers import eigsh

    g = torch.Generator().manual_seed(12345)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = eigsh(H, spec["k"], which="LA", tol=spec["ref_topk_tol"], generator=g, max_iters=100)
    return dict(topk=r.eigenvalues.tolist(), topk_converged=int(r.converged.sum()),
                topk_worst_relres=float(r.relative_residuals.max()), topk_tol=spec["ref_topk_tol"],
                topk_products=int(r.cost.num_matvecs))


def _ref_trace(H: Any, spec: dict[str, Any]) -> dict[str, Any]:
    from curvscope.estimators import hutchpp_trace

    g = torch.Generator().manual_seed(23456)
    tr = hutchpp_trace(H, spec["ref_trace_products"], generator=g, block_size=spec["ref_block"])
    return dict(trace=float(tr.value), trace_std_error=float(tr.std_error),
                trace_products=spec["ref_trace_products"])


def _ref_density(H: Any, spec: dict[str, Any], stem: Path) -> dict[str, Any]:
    """SLQ with more probes than the cells (in chunks: the Lanczos bases of a chunk live on the
    device at once), full reorthogonalisation, same number of steps unless asked otherwise.
    """
    from curvscope.estimators import slq

    g = torch.Generator().manual_seed(34567)
    total, chunk, steps = spec["ref_slq_probes"], max(1, spec["ref_slq_chunk"]), spec["ref_slq_steps"]
    nodes, weights, lo, hi, neg = [], [], math.inf, -math.inf, 0.0
    done = 0
    while done < total:
        p = min(chunk, total - done)
        d = slq(H, p, steps, generator=g)
        nodes.append(np.asarray(d.nodes.detach().cpu(), dtype=np.float64))
        weights.append(np.asarray(d.weights.detach().cpu(), dtype=np.float64))
        lo, hi = min(lo, float(d.bounds[0])), max(hi, float(d.bounds[1]))
        neg += float(d.negative_fraction()[0]) * p
        done += p
        del d
    N, W = np.concatenate(nodes), np.concatenate(weights)
    lo, hi = min(lo, float(N.min())), max(hi, float(N.max()))
    half = N.shape[0] // 2
    self_w1 = (w1_distance(N[:half].ravel(), W[:half].ravel(), N[half:].ravel(), W[half:].ravel())
               / (hi - lo)) if half else float("nan")
    path = stem.with_suffix(".npz")
    np.savez(path, nodes=N, weights=W)
    return dict(slq_path=str(path), lambda_min=lo, lambda_max=hi, negative_fraction=neg / total,
                slq_half_vs_half_w1_over_width=self_w1, slq_probes=total, slq_steps=steps,
                slq_chunk=chunk)


def _worker(task: Callable[[dict[str, Any]], dict[str, Any]], spec: dict[str, Any],
            out_q: Any) -> None:
    """Run ``task(spec)`` in a subprocess and put its result, or the error, on ``out_q``."""
    _init_process(spec)
    try:
        out_q.put({"status": "ok", **task(spec)})
    except BaseException as err:
        out_q.put({"status": "error", "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc(limit=8)[-3000:]})


def _reference_worker(spec: dict[str, Any], out_q: Any) -> None:
    _worker(_reference, spec, out_q)


def _reference(spec: dict[str, Any]) -> dict[str, Any]:
    """Compute the missing reference parts; each is written to ``ref_dir`` as soon as it is done
    (a later part that times out keeps the earlier ones, and ``--ref-cache`` reuses them).
    """
    H, model, loss_fn, batches = _ref_problem(spec)
    ref_dir = Path(spec["ref_dir"])
    done = []
    for part, key in spec["parts"].items():
        t0 = time.perf_counter()
        stem = ref_dir / key
        if part == "exact":
            res = _ref_exact(H, model, loss_fn, batches, spec, stem)
        elif part == "topk":
            res = _ref_topk(H, spec)
        elif part == "trace":
            res = _ref_trace(H, spec)
        else:
            res = _ref_density(H, spec, stem)
        sync(spec["device"])
        res.update(seconds=time.perf_counter() - t0, dtype=spec["ref_dtype"], device=spec["device"],
                   num_params=int(H.shape[0]))
        _write_json_atomic(stem.with_suffix(".json"), res)
        done.append(part)
    return {"parts_done": done}


def reference_keys(spec: ProblemSpec, args: argparse.Namespace, b: Budget,
                   ref_dtype: str) -> dict[str, str]:
    """Cache keys of the reference parts: everything that changes a part's numbers."""
    base = {"v": 2, "family": spec.family, "config": spec.config, "seed": args.seed,
            "dtype": ref_dtype, "device": args.device.split(":")[0], "num_params": spec.num_params,
            "num_data": spec.num_data, "tf32": bool(args.allow_tf32)}
    parts = {"exact": {}, "topk": {"k": b.k, "tol": args.ref_topk_tol},
             "trace": {"products": args.ref_trace_products, "block": args.ref_block},
             "density": {"probes": args.ref_slq_probes, "steps": args.ref_slq_steps,
                         "chunk": args.ref_slq_chunk}}
    out = {}
    for part, extra in parts.items():
        h = hashlib.sha1(json.dumps({**base, "part": part, **extra}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
        out[part] = f"ref_{spec.family}_{part}_{h}"
    return out


def build_reference(spec: ProblemSpec, args: argparse.Namespace, b: Budget, tasks: set[str],
                    base: dict[str, Any], ref_dir: Path) -> dict[str, Any]:
    """Load the reference parts this run needs from ``ref_dir``, computing the missing ones in a
    subprocess; return one merged description (``status``: ok / partial / error).
    """
    ref_dtype = args.ref_dtype if args.ref_dtype != "auto" else (
        "float32" if spec.family == "w1" and is_cuda(args.device) else "float64")
    keys = reference_keys(spec, args, b, ref_dtype)
    exact = spec.num_params <= args.exact_limit
    need = ["exact"] if exact else [t for t in TASK_NAMES if t in tasks]
    missing = {p: keys[p] for p in need if not (ref_dir / f"{keys[p]}.json").exists()}
    run: dict[str, Any] = {}
    if missing:
        rspec = {**base, "path": spec.path, "ref_dir": str(ref_dir), "parts": missing,
                 "ref_dtype": ref_dtype, "k": b.k, "ref_topk_tol": args.ref_topk_tol,
                 "ref_trace_products": args.ref_trace_products, "ref_block": args.ref_block,
                 "ref_slq_probes": args.ref_slq_probes, "ref_slq_chunk": args.ref_slq_chunk,
                 "ref_slq_steps": args.ref_slq_steps, "dense_chunk": args.dense_chunk}
        run = run_in_subprocess(_reference_worker, (rspec,), args.ref_timeout)
    parts: dict[str, dict[str, Any]] = {}
    for p in need:
        f = ref_dir / f"{keys[p]}.json"
        if f.exists():
            parts[p] = json.loads(f.read_text())
            parts[p]["cached"] = p not in missing
    info: dict[str, Any] = {"status": "ok" if len(parts) == len(need) else
                            ("partial" if parts else "error"), "dtype": ref_dtype,
                            "num_params": spec.num_params, "parts": sorted(parts),
                            "parts_needed": need, "keys": {p: keys[p] for p in need},
                            "computed_now": sorted(p for p in missing if p in parts),
                            "from_cache": sorted(p for p in parts if p not in missing),
                            "seconds": sum(v.get("seconds", 0.0) for v in parts.values())}
    if run.get("status") not in (None, "ok"):
        info["error"] = run.get("error")
        info["traceback"] = run.get("traceback", "")
    if exact and "exact" in parts:
        e = parts["exact"]
        evals = np.load(e["evals_path"])
        info.update(kind="exact", label=f"exact {ref_dtype} spectrum (dense Hessian + eigvalsh)",
                    topk=evals[::-1][: max(b.k, 20)].tolist(), topk_worst_relres=0.0,
                    **{k: e[k] for k in ("evals_path", "trace", "lambda_min", "lambda_max",
                                         "negative_fraction", "dense_asymmetry",
                                         "plain_hvp_check", "unequal_batches")})
        return info
    info["kind"] = "reference"
    label = []
    if "topk" in parts:
        t = parts["topk"]
        info.update({k: t[k] for k in ("topk", "topk_converged", "topk_worst_relres", "topk_tol")})
        label.append(f"eigsh tol {t['topk_tol']:g} ({t['topk_converged']}/{b.k} converged, "
                     f"worst rel. residual {t['topk_worst_relres']:.1e})")
    if "trace" in parts:
        t = parts["trace"]
        info.update(trace=t["trace"], trace_std_error=t["trace_std_error"])
        label.append(f"hutchpp {t['trace_products']} products (trace)")
    if "density" in parts:
        t = parts["density"]
        info.update({k: t[k] for k in ("slq_path", "lambda_min", "lambda_max", "negative_fraction",
                                       "slq_half_vs_half_w1_over_width")})
        if info.get("topk"):
            info["lambda_max"] = max(info["lambda_max"], max(info["topk"]))
        label.append(f"slq {t['slq_probes']} probes x {t['slq_steps']} steps (density)")
    info["label"] = (f"curvscope {ref_dtype} reference: " + ", ".join(label) + "; NOT exact"
                     if label else "none")
    return info


# ==================================================================================== residuals


def _residual_worker(spec: dict[str, Any], out_q: Any) -> None:
    _worker(_residuals, spec, out_q)


def _residuals(spec: dict[str, Any]) -> dict[str, Any]:
    """Relative residuals ``||H v - l v|| / |l|`` of every returned pair (``v`` normalised),
    with curvscope's Hessian operator in the reference dtype, checked once against a plain
    autograd HVP.
    """
    t0 = time.perf_counter()
    H, model, loss_fn, batches = _ref_problem(spec)
    device, n, blk = spec["device"], H.shape[0], max(1, spec["block"])
    g = torch.Generator().manual_seed(4242)
    # the check goes through the same block product as the residuals (on a GPU: the vmapped
    # forward-over-reverse engine), against a plain double-backward HVP of its first column
    V0 = torch.randn(n, min(blk, 4), generator=g, dtype=torch.float64).to(device=device, dtype=H.dtype)
    hv = (H @ V0)[:, 0]
    hp = _plain_hvp(model, loss_fn, batches, V0[:, 0].contiguous())
    out: dict[str, Any] = {"operator_check": float((hv - hp).norm() / hp.norm()),
                           "dtype": spec["ref_dtype"], "cells": {}}
    del hv, hp, V0
    for item in spec["items"]:
        try:
            V = torch.load(item["path"], weights_only=True)
            if V.ndim != 2 or V.shape[0] != n:
                raise ValueError(f"vectors of shape {tuple(V.shape)}, expected [{n}, k]")
            V = V.to(device=device, dtype=H.dtype)
            norms = V.norm(dim=0)
            V = V / norms.clamp_min(torch.finfo(V.dtype).tiny)
            lam = torch.tensor(item["eigenvalues"], dtype=H.dtype, device=device)
            HV = torch.cat([H @ V[:, i : i + blk] for i in range(0, V.shape[1], blk)], dim=1)
            res = (HV - V * lam).norm(dim=0) / lam.abs().clamp_min(torch.finfo(V.dtype).tiny)
            rq = (V * HV).sum(0)
            G = V.T @ V
            overlap = float((G - torch.eye(G.shape[0], dtype=G.dtype, device=device)).abs().max())
            out["cells"][item["id"]] = {"relative_residuals": res.tolist(), "rayleigh": rq.tolist(),
                                        "vector_norms": norms.tolist(), "max_overlap": overlap}
            del V, HV, G
        except Exception as err:  # noqa: BLE001 - one bad file must not hide the others
            out["cells"][item["id"]] = {"error": f"{type(err).__name__}: {err}"}
        if is_cuda(device):
            torch.cuda.empty_cache()
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


MAX_OVERLAP = 0.1  # |v_i . v_j| above this: two returned vectors are (nearly) the same pair


def score_topk(result: dict[str, Any], b: Budget, ref_top: np.ndarray | None, ref_relres: float,
               resid: dict[str, Any] | None) -> dict[str, Any]:
    """Top-k accuracy: residuals of the returned pairs (the criterion), eigenvalue errors vs the
    reference, and whether the pairs are the top k (sorted values within ``2 tol + reference
    residual`` of the reference's; no two vectors the same).
    """
    k, tol = b.k, b.tol
    vals = np.asarray(result["eigenvalues"], float)
    order = np.argsort(-vals, kind="stable")
    est = vals[order][:k]
    out: dict[str, Any] = {"k": k, "tol": tol, "returned": int(vals.size)}
    why = []
    if est.size < k:
        why.append(f"only {est.size} of {k} eigenvalues returned")
    if ref_top is not None and ref_top.size >= est.size > 0:
        err = np.abs(est - ref_top[: est.size]) / np.abs(ref_top[: est.size])
        out.update(max_rel_err=float(err.max()), rel_err=err.tolist())
        out["top_match"] = bool(err.max() <= 2 * tol + ref_relres)
        if not out["top_match"]:
            j = int(np.argmax(err))
            why.append(f"not the top {k}: value #{j + 1} off by {err[j]:.1e} (relative) from the "
                       "reference's")
    else:
        out["top_match"] = None
    if resid and "relative_residuals" in resid:
        r = np.asarray(resid["relative_residuals"], float)[order][:k]
        rq = np.asarray(resid["rayleigh"], float)[order][:k]
        out.update(residuals=r.tolist(), max_residual=float(np.nanmax(r)) if r.size else None,
                   n_within_tol=int(np.sum(r <= tol)), max_overlap=resid["max_overlap"],
                   rayleigh_vs_value=float(np.max(np.abs(rq - est) / np.abs(est))) if r.size else None)
        if out["n_within_tol"] < k:
            why.append(f"{out['n_within_tol']}/{k} pairs with relative residual <= {tol:g} "
                       f"(worst {out['max_residual']:.1e})")
        if resid["max_overlap"] > MAX_OVERLAP:
            why.append(f"duplicate vectors (overlap {resid['max_overlap']:.2f})")
    else:
        why.append("residuals not measured: " + ((resid or {}).get("error")
                                                 or result.get("vectors_error") or "no vectors"))
    out["reached"] = not why
    out["why_not"] = "; ".join(why)
    return out


class Reference:
    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        self.topk = np.asarray(info["topk"], float) if info.get("topk") else None
        self.topk_relres = float(info.get("topk_worst_relres") or 0.0)
        self.trace = info.get("trace")
        lo, hi = info.get("lambda_min"), info.get("lambda_max")
        self.width = float(hi - lo) if lo is not None and hi is not None else None
        self.x = self.w = None
        if info.get("kind") == "exact":
            ev = np.load(info["evals_path"])
            self.x, self.w = ev, np.full(ev.shape, 1.0 / ev.size)
            self.topk = ev[::-1].copy()
        elif info.get("slq_path"):
            z = np.load(info["slq_path"])
            self.x, self.w = z["nodes"].ravel(), z["weights"].ravel()

    def score(self, task: str, result: dict[str, Any], b: Budget,
              resid: dict[str, Any] | None = None) -> dict[str, Any]:
        if task == "topk":
            return score_topk(result, b, self.topk, self.topk_relres, resid)
        if task == "trace":
            if self.trace is None:
                return {"error": "no reference trace"}
            return {"rel_err": abs(result["trace"] - self.trace) / abs(self.trace)}
        if self.x is None or not self.width:
            return {"error": "no reference density"}
        nodes, weights = result["nodes"], result["weights"]
        x = np.concatenate([np.asarray(n, float) for n in nodes])
        w = np.concatenate([np.asarray(v, float) for v in weights])
        out = {"w1_over_width": w1_distance(x, w, self.x, self.w) / self.width}
        half = len(nodes) // 2
        if half:  # the estimate's own probe noise: W1 between its two halves of probes
            xa = np.concatenate([np.asarray(n, float) for n in nodes[:half]])
            wa = np.concatenate([np.asarray(v, float) for v in weights[:half]])
            xb = np.concatenate([np.asarray(n, float) for n in nodes[half:]])
            wb = np.concatenate([np.asarray(v, float) for v in weights[half:]])
            out["half_vs_half_over_width"] = w1_distance(xa, wa, xb, wb) / self.width
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
    if "error" in acc and task != "topk":
        return acc["error"]
    if task == "topk":
        parts = []
        if acc.get("n_within_tol") is not None:
            parts.append(f"res ≤ {acc['tol']:g}: {acc['n_within_tol']}/{acc['k']} (worst "
                         f"{fmt_e(acc.get('max_residual'))})")
        if acc.get("max_rel_err") is not None:
            parts.append(f"max rel err {fmt_e(acc['max_rel_err'])}")
        parts.append("REACHED" if acc.get("reached") else f"not reached: {acc.get('why_not', '')}")
        return "; ".join(parts)
    if task == "trace":
        return f"rel err {fmt_e(acc['rel_err'])}"
    s = f"W1/width {fmt_e(acc['w1_over_width'])}"
    if "w1s_over_width" in acc:
        s += f" (smoothed {fmt_e(acc['w1s_over_width'])})"
    return s


def estimate_text(task: str, res: dict[str, Any]) -> str:
    r = res.get("result") or {}
    if task == "topk" and "eigenvalues" in r:
        v = sorted(r["eigenvalues"], reverse=True)
        return f"λ1={v[0]:.5g}, λ{len(v)}={v[-1]:.4g}" if v else ""
    if task == "trace" and "trace" in r:
        se = r.get("std_error")
        return f"tr={r['trace']:.5g}" + (f" ± {se:.2g}" if se is not None and math.isfinite(se) else "")
    return ""


def mem_text(rec: dict[str, Any]) -> str:
    """Peak memory of a cell: GPU (during the task; + what the task added) or process RSS."""
    if rec.get("peak_gpu_mib") is not None:
        start = rec.get("gpu_at_start_mib")
        plus = f" (+{rec['peak_gpu_mib'] - start:.0f})" if start is not None else ""
        return f"{rec['peak_gpu_mib']:.0f}{plus} GPU"
    if rec.get("peak_rss_mib") is not None:
        return f"{rec['peak_rss_mib']:.0f} (+{rec['peak_rss_mib'] - rec['rss_at_start_mib']:.0f})"
    return "–"


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
    if status == "ok":
        acc = accuracy_text(task, rec.get("accuracy")) if rec.get("accuracy") else (
            "(accuracy pending: residuals)" if task == "topk" else "–")
        est = estimate_text(task, rec)
        extra = rec.get("note", "")
        what = "; ".join(s for s in (est, extra) if s)
    else:
        err = rec.get("error", status).replace("|", "/").replace("\n", " ")
        acc = f"**{status}**: {err[:110]}"
        what = ""
    return (f"| {lib} | {task} | {setting} | {fmt_s(rec.get('wall_s'))} | {fmt_s(rec.get('setup_s'))} "
            f"| {c.get('hvps', 0)} | {c.get('calls', 0)} | {passes:.0f} | {mem_text(rec)} "
            f"| {acc}{' · ' + what if what else ''} |")


TABLE_HEAD = ("| library | task | setting | time s | setup s | HVPs | calls | data passes "
              "| peak MiB (+task) | accuracy · estimate |\n|---|---|---|---|---|---|---|---|---|---|")


def comparable(task: str, err_peer: float, err_cs: float) -> bool:
    """Accuracy comparable to curvscope's: within 10x (top-k eigenvalues, floor 1e-6), 3x (trace,
    floor 1e-3) or 2x (density, floor 1e-3) of curvscope's error, or better.
    """
    if task == "topk":
        return err_peer <= max(10 * err_cs, 1e-6)
    if task == "trace":
        return err_peer <= max(3 * err_cs, 1e-3)
    return err_peer <= max(2 * err_cs, 1e-3)


def main_error(task: str, acc: dict[str, Any] | None) -> float:
    if not acc or ("error" in acc and task != "topk"):
        return float("inf")
    v = {"topk": acc.get("max_rel_err", acc.get("max_residual")), "trace": acc.get("rel_err"),
         "density": acc.get("w1_over_width")}[task]
    return float("inf") if v is None else float(v)


def summarise(records: list[dict[str, Any]], problems: list[str]) -> tuple[str, list[dict]]:
    lines = ["| problem | task | curvscope (time · err) | fastest peer, any accuracy | fastest peer "
             "at comparable accuracy | speed-up vs that peer |", "|---|---|---|---|---|---|"]
    rows: list[dict] = []
    for prob in problems:
        for task in TASK_NAMES:
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


# ======================================================================================= targets


def target_defs(b: Budget, device: str = "cuda") -> dict[str, tuple[float, str]]:
    """The targets: key -> (time ratio needed, what it means).

    On a GPU, W1's (issue 5): SLQ >= 5x and top-k >= 3x the fastest peer, Hutch++/XTrace no
    slower than curvlinops and >= 5x PyHessian. On a CPU, W1-tiny's (issue 10): SLQ and top-k
    >= 2x the fastest peer, Hutch++/XTrace >= 1.2x curvlinops.
    """
    k, tol, B, B3 = b.k, b.tol, b.trace_products, b.hutchpp_products
    gpu = is_cuda(device)
    slq, topk, vs_cl = (5.0, 3.0, 1.0) if gpu else (2.0, 2.0, 1.2)
    rows = {
        "density": (slq, f"SLQ density {b.slq_probes}x{b.slq_steps}, full reorth: >= {slq:g}x "
                         "less wall time than the fastest peer, W1 distance no worse"),
        "topk": (topk, f"top-{k} eigenpairs to relative residual {tol:g}: >= {topk:g}x less "
                       "wall time than the fastest peer that reaches it"),
        "trace-hutchpp:curvlinops": (vs_cl, f"Hutch++ trace, {B3} products: >= {vs_cl:g}x "
                                            "curvlinops' hutchpp_trace"),
        "trace-xtrace:curvlinops": (vs_cl, f"XTrace, {B} products: >= {vs_cl:g}x curvlinops' "
                                           "xtrace"),
    }
    if gpu:
        rows.update({
            "trace-hutchpp:pyhessian": (5.0, f"Hutch++ trace, {B3} products: >= 5x faster than "
                                             f"PyHessian's trace ({B} probes)"),
            "trace-xtrace:pyhessian": (5.0, f"XTrace, {B} products: >= 5x faster than "
                                            f"PyHessian's trace ({B} probes)"),
        })
    return rows


def _qualifies(task: str, rec: dict[str, Any]) -> tuple[bool, str]:
    acc = rec.get("accuracy") or {}
    if task == "topk":
        return bool(acc.get("reached")), acc.get("why_not") or "accuracy not measured"
    err = main_error(task, acc)
    return math.isfinite(err), acc.get("error", "no finite accuracy")


def _brief(rec: dict[str, Any] | None, task: str) -> dict[str, Any] | None:
    if rec is None:
        return None
    acc = rec.get("accuracy") or {}
    out = {"library": rec["library"], "setting": rec["setting"], "status": rec["status"],
           "wall_s": rec.get("wall_s"), "peak_gpu_mib": rec.get("peak_gpu_mib"),
           "peak_rss_mib": rec.get("peak_rss_mib"), "memory": mem_text(rec),
           "error": main_error(task, acc), "hvps": (rec.get("counts") or {}).get("hvps")}
    if task == "topk":
        out.update(n_within_tol=acc.get("n_within_tol"), max_residual=acc.get("max_residual"))
    out.update(physical_limit(rec))
    return out


def physical_limit(rec: dict[str, Any]) -> dict[str, Any]:
    """For a cell that timed its products (curvscope's): the time in products and the rest,
    their cost in gradients per column, and the physical limit of the products: a product of
    ``k`` columns cannot cost less than one forward plus one backward shared by the columns,
    i.e. one gradient per product call (``limit_s = calls x gradient_s``).
    """
    product_s, grad_s, wall = rec.get("product_s"), rec.get("gradient_s"), rec.get("wall_s")
    counts = rec.get("counts") or {}
    hvps, calls = counts.get("hvps") or 0, counts.get("calls") or 0
    if product_s is None or not grad_s or not wall or not hvps:
        return {}
    return {"product_s": product_s, "not_products": max(0.0, 1.0 - product_s / wall),
            "gradient_s": grad_s, "gradients_per_column": product_s / (hvps * grad_s),
            "limit_s": calls * grad_s}


def evaluate_targets(records: list[dict[str, Any]], problems: list[str], ref_info: dict[str, Any],
                     families: dict[str, str], b: Budget,
                     device: str = "cuda") -> list[dict[str, Any]]:
    """For each target: curvscope's cell against the fastest qualifying peer (finished, with the
    accuracy the target asks for), the time ratio, MET / NOT MET and why.
    """
    rows = []
    for prob in problems:
        noise = (ref_info.get(families.get(prob, ""), {}) or {}).get(
            "slq_half_vs_half_w1_over_width") or 0.0
        for key, (need, title) in target_defs(b, device).items():
            recs = [r for r in records if r["problem"] == prob and key in (r.get("targets") or [])]
            if not recs:
                continue
            cs = next((r for r in recs if r["library"] == "curvscope"), None)
            peers = [r for r in recs if r["library"] != "curvscope"]
            task = recs[0]["task"]
            row: dict[str, Any] = {"problem": prob, "target": key, "title": title, "needed": need,
                                   "task": task}
            qual, fates = [], []
            for r in peers:
                label = f"{LIB_LABELS[r['library']]} [{r['setting'][:32]}]"
                if r["status"] == "ok":
                    ok, why = _qualifies(task, r)
                    if ok:
                        qual.append(r)
                        fates.append(f"{label}: {fmt_s(r['wall_s'])} s")
                    else:
                        fates.append(f"{label}: finished in {fmt_s(r['wall_s'])} s but {why}")
                else:
                    fates.append(f"{label}: {r['status']}"
                                 + (f" ({str(r.get('error', ''))[:90]})" if r.get("error") else ""))
            fastest = min(qual, key=lambda r: r["wall_s"], default=None)
            timeouts = [r for r in peers if r["status"] == "timeout"]
            row.update(curvscope=_brief(cs, task), fastest_peer=_brief(fastest, task), peers=fates)
            reasons: list[str] = []
            ratio = lower = None
            cs_ok = cs is not None and cs["status"] == "ok" and cs.get("wall_s")
            if cs is None:
                status = "NOT RUN"
                reasons.append("no curvscope cell in this run (--libs/--tasks/--cells)")
            elif not cs_ok:
                status = "NOT MET"
                reasons.append(f"curvscope {cs['status']}: {str(cs.get('error', ''))[:120]}")
            else:
                cs_err = main_error(task, cs.get("accuracy"))
                cs_reached, cs_why = _qualifies(task, cs)
                acc_ok, acc_note = True, ""
                if fastest is not None:
                    ratio = fastest["wall_s"] / cs["wall_s"]
                    p_err = main_error(task, fastest.get("accuracy"))
                    if task == "density":
                        # same algorithm, other random probes: "no worse" within the probe noise
                        # (half-vs-half W1 of curvscope's probes or of the reference's)
                        tol_w1 = max(noise, (cs.get("accuracy") or {}).get("half_vs_half_over_width")
                                     or 0.0)
                        acc_ok = cs_err <= p_err + tol_w1
                        acc_note = (f"W1/width {fmt_e(cs_err)} vs {fmt_e(p_err)} (probe noise "
                                    f"{fmt_e(tol_w1)})")
                    elif task == "trace":
                        acc_ok = comparable("trace", cs_err, p_err)
                        acc_note = (f"rel err {fmt_e(cs_err)} vs {fmt_e(p_err)} (single draws: "
                                    "within 3x, floor 1e-3)")
                elif timeouts:
                    # a killed peer's task ran at least this long (setup excluded)
                    t_min = min(r.get("task_s_at_kill") or 0.0 for r in timeouts)
                    lower = t_min / cs["wall_s"]
                if not cs_reached:  # curvscope must reach the accuracy itself, whatever the peers
                    status = "NOT MET"
                    reasons.append(f"curvscope's accuracy: {cs_why}")
                elif ratio is not None:
                    status = "MET" if ratio >= need and acc_ok else "NOT MET"
                    if ratio < need:
                        reasons.append(f"time ratio {ratio:.2f} < {need:g}")
                    if not acc_ok:
                        reasons.append(f"accuracy worse: {acc_note}")
                    elif acc_note:
                        reasons.append(acc_note)
                elif lower is not None:
                    status = "MET (lower bound)" if lower >= need else "UNDECIDED"
                    reasons.append(f"no qualifying peer finished; those that timed out give "
                                   f"ratio >= {lower:.2f}")
                elif peers:
                    status = "NO QUALIFYING PEER"
                    reasons.append("no peer reached the accuracy / finished")
                else:
                    status = "NO PEER"
                    reasons.append("no peer cell ran (not installed or not selected)")
            row.update(ratio=ratio, ratio_lower_bound=lower, status=status, reason="; ".join(reasons))
            rows.append(row)
    return rows


def targets_markdown(rows: list[dict[str, Any]]) -> str:
    def who(d: dict[str, Any] | None, task: str) -> str:
        if d is None:
            return "none"
        acc = fmt_e(d["error"])
        if task == "topk" and d.get("n_within_tol") is not None:
            acc = f"{d['n_within_tol']} ok, worst res {fmt_e(d.get('max_residual'))}"
        name = "" if d["library"] == "curvscope" else f"{LIB_LABELS[d['library']]} [{d['setting'][:36]}] "
        text = f"{name}{fmt_s(d.get('wall_s'))} s · {d['memory']} MiB · {acc}"
        if d.get("gradients_per_column") is not None:
            text += (f" · products {d['gradients_per_column']:.2f} gradients/column, "
                     f"{d['not_products']:.0%} of the time not products; limit "
                     f"{fmt_s(d['limit_s'])} s")
        return text

    lines = ["| problem | target | curvscope: time · peak mem · accuracy | fastest qualifying peer: "
             "time · peak mem · accuracy | ratio | needed | status | why |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = (f"{r['ratio']:.2f}x" if r["ratio"] is not None else
                 (f"≥ {r['ratio_lower_bound']:.2f}x" if r["ratio_lower_bound"] is not None else "–"))
        why = r["reason"]
        if r["status"] != "MET" and r["peers"]:  # each peer's fate, shortened (full text in JSON)
            why += " — peers: " + "; ".join(f[:110] + ("…" if len(f) > 110 else "") for f in r["peers"])
        lines.append(f"| {r['problem']} | {r['title']} | {who(r['curvscope'], r['task'])} | "
                     f"{who(r['fastest_peer'], r['task'])} | {ratio} | {r['needed']:g}x | "
                     f"**{r['status']}** | {why.replace('|', '/')} |")
    return "\n".join(lines)


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
    if is_cuda(device) and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info


def parse_timeouts(text: str) -> dict[str, float]:
    """``"300"`` or ``"120,density=300,topk=200"`` -> seconds per task."""
    out: dict[str, float] = {}
    default = 120.0
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            task, value = part.split("=", 1)
            if task.strip() not in TASK_ALIASES:
                raise ValueError(f"--timeout: unknown task {task!r}; use topk, trace or density")
            out[TASK_ALIASES[task.strip()]] = float(value)
        else:
            default = float(part)
    return {t: out.get(t, default) for t in TASK_NAMES}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=tuple(SIZES), default="small",
                   help="problem sizes and per-size defaults of the options marked (size): small / "
                   "medium: GMM MLP + small CNN, top-10 at tol 1e-6, 10x80 SLQ; w1: workload W1 "
                   "(ResNet-18, 11.2M parameters, 2048 images; a GPU), top-20 at 1e-3, 10x100 SLQ, "
                   "100 trace products, 300 s per cell; w1-tiny: the same on a width-8 ResNet-18")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--problems", default=None,
                   help="(size) comma list of " + ", ".join(PROBLEM_NAMES))
    p.add_argument("--libs", default="curvscope," + ",".join(PEERS),
                   help="comma list of curvscope, " + ", ".join(PEERS))
    p.add_argument("--tasks", default="topk,trace,density", help="comma list (top10 = topk)")
    p.add_argument("--cells", choices=("all", "targets"), default=None,
                   help="(size) all: defaults, tuned settings and variants; targets: only the cells "
                   "the target table needs (W1's budgets for every library)")
    p.add_argument("--no-variants", action="store_true", help="skip the extra variant cells")
    # budgets: asked of every library
    p.add_argument("--topk", type=int, default=None, help="(size) k of the top-k task")
    p.add_argument("--topk-tol", type=float, default=None,
                   help="(size) relative residual asked for, and needed to count as reached")
    p.add_argument("--slq-probes", type=int, default=None, help="(size) density probes")
    p.add_argument("--slq-steps", type=int, default=None, help="(size) Lanczos steps per probe")
    p.add_argument("--trace-products", type=int, default=None, help="(size) products per trace")
    # W1 problem
    p.add_argument("--w1-width", type=int, default=None, help="(size) ResNet-18 width (64: real)")
    p.add_argument("--w1-images", type=int, default=None, help="(size) images in W1")
    p.add_argument("--w1-image-size", type=int, default=None, help="(size) image side")
    p.add_argument("--w1-batch", type=int, default=None, help="(size) batch size")
    # running
    p.add_argument("--timeout", default=None,
                   help="(size) seconds per cell: '300' or per task '120,density=300,topk=200'")
    p.add_argument("--ref-timeout", type=float, default=None, help="(size) seconds per reference")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-method", choices=("auto", "forkserver", "spawn"), default="auto",
                   help="how cell processes start (both give a fresh process per cell); auto: "
                   "spawn on a GPU (no CUDA state can leak into a fork), forkserver on a CPU")
    p.add_argument("--allow-tf32", action="store_true",
                   help="let cuDNN/cuBLAS use TF32 for float32 (off: float32 is float32)")
    # references
    p.add_argument("--exact-limit", type=int, default=6000,
                   help="form the dense Hessian (exact spectrum) up to this many parameters")
    p.add_argument("--dense-chunk", type=int, default=256, help="columns per product for dense H")
    p.add_argument("--ref-dtype", choices=("auto", "float32", "float64"), default="auto",
                   help="dtype of the reference and of the residual checks; auto: float32 for W1 "
                   "on a GPU (float64 convolutions are slow there), float64 otherwise")
    p.add_argument("--ref-topk-tol", type=float, default=None,
                   help="reference eigsh tolerance (default 1e-10 in float64, 1e-4 in float32)")
    p.add_argument("--ref-slq-probes", type=int, default=None, help="(size) reference SLQ probes")
    p.add_argument("--ref-slq-steps", type=int, default=None,
                   help="reference SLQ steps (default: --slq-steps)")
    p.add_argument("--ref-slq-chunk", type=int, default=None,
                   help="(size) reference SLQ probes per call (bounds the basis memory)")
    p.add_argument("--ref-trace-products", type=int, default=600)
    p.add_argument("--ref-block", type=int, default=None,
                   help="columns per product in the reference trace and the residual checks "
                   "(default 8 on a GPU, 64 on a CPU)")
    p.add_argument("--ref-cache", default=None,
                   help="directory to keep reference parts in and reuse them from (split runs)")
    # library settings
    p.add_argument("--he-max-iter", type=int, default=None,
                   help="(size) hessian-eigenthings lanczos max_iter in the tuned setting")
    p.add_argument("--sk-outer", type=int, default=None,
                   help="(size) skerch seigh outer_dims in the tuned setting")
    p.add_argument("--sk-block", type=int, default=None,
                   help="(size) skerch meas_blocksize: columns per product (0: all at once)")
    p.add_argument("--cs-slq-basis", default=None,
                   help="curvscope slq basis= ('device', 'host'); default: the library's")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/"
                   "bench_spectral_<device>.json, or ..._<size> for the W1 sizes)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="print one report (tables, targets) from the JSON files of split runs "
                   "and write it to --out; runs nothing")
    args = p.parse_args(argv)
    d = SIZES[args.size]
    for name in ("problems", "cells", "he_max_iter", "sk_outer", "sk_block", "ref_slq_probes",
                 "ref_timeout"):
        if getattr(args, name) is None:
            setattr(args, name, d[name])
    for name in ("topk", "topk_tol", "slq_probes", "slq_steps", "trace_products"):
        if getattr(args, name) is None:
            setattr(args, name, d[name])
    for name, key in (("w1_width", "width"), ("w1_images", "images"),
                      ("w1_image_size", "image_size"), ("w1_batch", "batch")):
        if getattr(args, name) is None:
            setattr(args, name, d["w1"][key])
    if args.timeout is None:
        args.timeout = d["timeout"]
    try:
        args.timeouts = parse_timeouts(args.timeout)
    except ValueError as err:
        p.error(str(err))
    if args.ref_slq_steps is None:
        args.ref_slq_steps = args.slq_steps
    if args.ref_slq_chunk is None:
        args.ref_slq_chunk = d["ref_slq_chunk"]
    if args.ref_block is None:
        args.ref_block = 8 if is_cuda(args.device) else 64
    if args.ref_topk_tol is None:
        args.ref_topk_tol = -1.0  # resolved per reference dtype
    tasks = []
    for t in args.tasks.split(","):
        if t.strip() not in TASK_ALIASES:
            p.error(f"--tasks: unknown task {t!r}; use topk, trace, density")
        tasks.append(TASK_ALIASES[t.strip()])
    args.tasks = ",".join(dict.fromkeys(tasks))
    if args.start_method == "auto":
        args.start_method = "spawn" if is_cuda(args.device) else "forkserver"
    if args.merge is None and is_cuda(args.device) and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def budget_of(args: argparse.Namespace) -> Budget:
    return Budget(k=args.topk, tol=args.topk_tol, slq_probes=args.slq_probes,
                  slq_steps=args.slq_steps, trace_products=args.trace_products)


def default_out(args: argparse.Namespace, merged: bool = False) -> Path:
    dev = args.device.split(":")[0]
    tag = "" if args.size in ("small", "medium") else f"_{args.size}"
    return HERE / "results" / f"bench_spectral_{dev}{tag}{'_merged' if merged else ''}.json"


def run_references(specs: list[ProblemSpec], args: argparse.Namespace, b: Budget,
                   base: dict[str, Any], ref_dir: Path) -> dict[str, Any]:
    ref_info: dict[str, Any] = {}
    tasks = set(args.tasks.split(","))
    for fam in dict.fromkeys(s.family for s in specs):
        spec = next(s for s in specs if s.family == fam)
        args_ref = copy.copy(args)
        ref_dtype = args.ref_dtype if args.ref_dtype != "auto" else (
            "float32" if fam == "w1" and is_cuda(args.device) else "float64")
        if args.ref_topk_tol <= 0:
            # float32: well above its rounding floor, and enough to tell the top k at tol 1e-3
            args_ref.ref_topk_tol = 1e-10 if ref_dtype == "float64" else 1e-4
        print(f"\n[reference] {fam}: P={spec.num_params:,}, {ref_dtype} ...", flush=True)
        info = build_reference(spec, args_ref, b, tasks, base, ref_dir)
        ref_info[fam] = info
        if info["status"] == "error":
            print(f"[reference] {fam}: FAILED: {info.get('error')}\n{info.get('traceback', '')}",
                  flush=True)
            continue
        if info["kind"] == "exact":
            extra = (f"; dense asym {info['dense_asymmetry']:.1e}, plain-autograd HVP check "
                     f"{info['plain_hvp_check']:.1e}; unequal batches: {info['unequal_batches']}")
        else:
            extra = ""
            if info.get("trace_std_error") is not None:
                extra += f"; trace ± {info['trace_std_error']:.2g}"
            if info.get("slq_half_vs_half_w1_over_width") is not None:
                extra += (f"; SLQ half-vs-half W1/width "
                          f"{info['slq_half_vs_half_w1_over_width']:.2e}")
        vals = ", ".join(f"{k}={info[k]:.6g}" for k in ("trace", "lambda_min", "lambda_max")
                         if info.get(k) is not None)
        top = f"λ1={info['topk'][0]:.6g}, " if info.get("topk") else ""
        print(f"[reference] {fam} ({info['status']}): {info['label']} in {info['seconds']:.1f} s "
              f"(computed now: {info['computed_now']}, from --ref-cache: {info['from_cache']}); "
              f"{top}{vals}{extra}" + (f"\n  error: {info['error']}" if info.get("error") else ""),
              flush=True)
    return ref_info


def run_cells(spec: ProblemSpec, cells: list[Cell], args: argparse.Namespace, b: Budget,
              versions: dict[str, str], base: dict[str, Any], workdir: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    print(f"\n[cells] {spec.name} (P={spec.num_params:,}, N={spec.num_data}, batches "
          f"{spec.batch_sizes})", flush=True)
    for i, cell in enumerate(cells):
        if cell.only_dtype and cell.only_dtype != spec.dtype:
            continue
        cell_id = f"{spec.name}:{i}"
        timeout = args.timeouts[cell.task]
        rec: dict[str, Any] = {"cell_id": cell_id, "problem": spec.name, "library": cell.library,
                               "task": cell.task, "setting": cell.setting, "role": cell.role,
                               "fn": cell.fn, "kwargs": cell.kwargs, "targets": list(cell.targets),
                               "problem_num_data": spec.num_data, "summary": cell.summary,
                               "timeout_s": timeout}
        if cell.library != "curvscope" and versions.get(cell.library) == "not installed":
            rec.update(status="not installed",
                       error=f"pip install {PEERS[cell.library][0]} (or -e '.[peers]')")
        elif cell.library == "skerch" and versions.get("curvlinops") == "not installed":
            rec.update(status="skipped", error="skerch cells take their HVPs from curvlinops")
        elif cell.na:
            rec.update(status="n/a", error=cell.na)
        else:
            counters = Counters(mp_context())
            cspec = {**base, "path": spec.path, "fn": cell.fn, "kwargs": cell.kwargs,
                     "vec_path": str(workdir / f"vecs_{spec.name}_{i}.pt")}
            try:
                res = run_in_subprocess(_cell_worker, (cspec, counters), timeout, counters)
            except Exception as err:  # noqa: BLE001 - a cell never ends the run
                res = {"status": "crashed", "error": f"could not run the cell: {err}"}
            rec.update(res)
            lib = (rec.get("result") or {}).get("lib") or {}
            if cell.library == "curvscope" and cell.task == "topk" and lib:
                rec["note"] = (f"{lib.get('converged')}/{b.k} converged (own check), worst rel. "
                               f"residual {lib.get('worst_relative_residual', float('nan')):.1e}, "
                               f"{lib.get('restarts')} restarts")
            elif cell.library == "hessian_eigenthings" and cell.task == "topk" and lib:
                rec["note"] = f"{lib.get('converged')}/{b.k} flagged converged"
            if rec.get("lib_notes"):
                rec["note"] = "; ".join([rec.get("note", ""), *rec["lib_notes"]]).strip("; ")
        records.append(rec)
        print("  " + cell_row(rec), flush=True)
    return records


def measure_residuals(spec: ProblemSpec, records: list[dict[str, Any]], args: argparse.Namespace,
                      base: dict[str, Any], ref_dtype: str) -> dict[str, Any]:
    items = []
    for rec in records:
        res = rec.get("result") or {}
        if rec["task"] == "topk" and rec["status"] == "ok" and res.get("vectors_path"):
            items.append({"id": rec["cell_id"], "path": res["vectors_path"],
                          "eigenvalues": res["eigenvalues"]})
    if not items:
        return {"status": "ok", "cells": {}}
    print(f"[residuals] {spec.name}: {len(items)} cells, curvscope HessianOperator in {ref_dtype} "
          "...", flush=True)
    rspec = {**base, "path": spec.path, "ref_dtype": ref_dtype, "items": items,
             "block": args.ref_block}
    out = run_in_subprocess(_residual_worker, (rspec,), args.ref_timeout)
    if out.get("status") == "ok":
        print(f"[residuals] {spec.name}: done in {out['seconds']:.1f} s; operator vs plain autograd "
              f"HVP {out['operator_check']:.1e}", flush=True)
    else:
        print(f"[residuals] {spec.name}: FAILED: {out.get('error')}\n{out.get('traceback', '')}",
              flush=True)
    return out


def score_records(records: list[dict[str, Any]], ref: Reference | None, b: Budget,
                  resid: dict[str, Any]) -> None:
    for rec in records:
        if rec["status"] != "ok" or ref is None:
            continue
        r = None
        if rec["task"] == "topk":
            r = (resid.get("cells") or {}).get(rec["cell_id"])
            if r is None and resid.get("status") != "ok":
                r = {"error": f"residual process {resid.get('status')}: {resid.get('error')}"}
        try:
            rec["accuracy"] = ref.score(rec["task"], rec["result"], b, r)
        except Exception as err:  # noqa: BLE001 - report, don't crash the run
            rec["accuracy"] = {"error": f"scoring failed: {type(err).__name__}: {err}"}


def print_report(payload: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """Per-problem tables, the speed summary and the target table, from a run's payload."""
    args, versions, b = payload["args"], payload["versions"], Budget(**payload["budget"])
    records, specs, ref_info = payload["cells"], payload["problems"], payload["references"]
    print("\n\n## Results\n")
    print(f"size={args['size']}, device={args['device']}, {args['threads']} thread(s) per cell, "
          f"seed {args['seed']}; budgets: top-{b.k} to relative residual {b.tol:g}, SLQ "
          f"{b.slq_probes} probes x {b.slq_steps} steps, trace {b.trace_products} products; "
          f"torch {versions.get('torch')}, curvscope {versions.get('curvscope')}; "
          + ", ".join(f"{LIB_LABELS[k]} {v}" for k, v in versions.items() if k in PEERS))
    if payload.get("machine", {}).get("gpu"):
        m = payload["machine"]
        print(f"GPU: {m['gpu']} (CUDA {m.get('cuda')}); TF32 "
              f"{'allowed' if args.get('allow_tf32') else 'off'}.")
    for spec in specs:
        ref = ref_info.get(spec["family"], {})
        print(f"\n### {spec['name']}: P={spec['num_params']:,}, N={spec['num_data']} in batches of "
              f"{spec['batch_sizes'][0]}{' (equal)' if len(set(spec['batch_sizes'])) == 1 else ''}, "
              f"{spec['dtype']}, train loss {spec['train_loss']:.4g}")
        print(spec["description"].rstrip(".") + ".")
        if ref.get("status") in ("ok", "partial"):
            vals = ", ".join(f"{k}={ref[k]:.6g}" for k in ("trace", "lambda_min") if ref.get(k) is not None)
            top = f"λ1={ref['topk'][0]:.6g}, λ{b.k}={ref['topk'][b.k - 1]:.6g}, " if (
                ref.get("topk") and len(ref["topk"]) >= b.k) else ""
            print(f"Accuracy reference ({ref['status']}): **{ref['label']}**; {top}{vals}.")
            ub = ref.get("unequal_batches")
            if ub and spec["dtype"] == "float64":
                print(f"Side check, same data re-split into unequal batches {ub['batch_sizes']}: "
                      f"relative error of H v vs the dense Hessian: curvscope "
                      f"{fmt_e(ub['curvscope_rel_err'])}"
                      + (f", hessian-eigenthings {fmt_e(ub['hessian_eigenthings_rel_err'])} "
                         "(equal weight per batch)" if "hessian_eigenthings_rel_err" in ub else "")
                      + ". The timed cells use equal batches.")
            if ref.get("kind") == "reference":
                noise = []
                if ref.get("trace_std_error") is not None:
                    noise.append(f"trace ± {ref['trace_std_error']:.2g} (rel "
                                 f"{ref['trace_std_error'] / abs(ref['trace']):.1e})")
                if ref.get("slq_half_vs_half_w1_over_width") is not None:
                    noise.append(f"density W1/width between two halves of the reference probes "
                                 f"{ref['slq_half_vs_half_w1_over_width']:.1e} (density errors near "
                                 "this are at the reference's noise floor)")
                if noise:
                    print("Reference noise: " + "; ".join(noise) + ".")
        else:
            print(f"Accuracy reference: unavailable ({ref.get('error')}).")
        res = (payload.get("residuals") or {}).get(spec["name"])
        if res:
            print(f"Top-k residuals measured with curvscope's HessianOperator in {res.get('dtype')}"
                  + (f"; that operator vs a plain autograd HVP: {res['operator_check']:.1e}"
                     if res.get("operator_check") is not None else f": {res.get('error')}") + ".")
        print()
        print(TABLE_HEAD)
        for rec in records:
            if rec["problem"] == spec["name"]:
                print(cell_row(rec))
    names = [s["name"] for s in specs]
    summary_md, summary_rows = summarise(records, names)
    print("\n## Speed: curvscope vs the fastest peer\n")
    print(" ".join((comparable.__doc__ or "").split()))
    print()
    print(summary_md)
    families = {s["name"]: s["family"] for s in specs}
    target_rows = evaluate_targets(records, names, ref_info, families, b, args["device"])
    print("\n## Targets: curvscope vs the fastest qualifying peer (same budget)\n")
    print("Qualifying: finished, and for top-k every one of the k pairs has relative residual <= "
          f"{b.tol:g} (measured here, not self-reported), no two vectors the same, and the values "
          "match the reference's top k; for the density a finite W1 distance; for the trace a "
          "finite error. Ratio = peer time / curvscope time. 'MET (lower bound)': every peer that "
          "could qualify was killed at its time limit, so its ratio is at least (its task's time "
          "when killed) / (curvscope's time). Beside curvscope's time: its products' cost in "
          "gradients per column (one gradient = a forward and a backward over all the data, "
          "timed in the cell's setup), the share of the task that is not products, and the "
          "physical limit of its products: one gradient per product call (a batched product "
          "cannot cost less than a forward and a backward shared by its columns).\n")
    print(targets_markdown(target_rows) if target_rows else "(no target cells in this run)")
    return summary_rows, target_rows


def write_payload(payload: dict[str, Any], out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for rec in payload["cells"]:  # keep the JSON small: drop the gridded densities, round the nodes
        res = rec.get("result")
        if isinstance(res, dict):
            res.pop("grid", None)
            res.pop("density", None)
            for key in ("nodes", "weights"):
                if key in res:
                    res[key] = [[float(f"{x:.7g}") for x in row] for row in res[key]]
    out_path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"\nwrote {out_path}")


NOTES = [
    "HVPs are counted at each library's operator entry (columns of block products count one "
    "each); data passes = examples seen by a forward pre-hook / N.",
    "Peak memory: on a CPU ru_maxrss of the cell's own process (includes ~0.3-0.5 GB for torch "
    "and the libraries), '+task' its increase during the timed task; on a GPU "
    "torch.cuda.max_memory_allocated during the task (peak statistics reset at its start), "
    "'+task' the part above what was allocated when the task started.",
    "Top-k accuracy: every returned pair's relative residual ||H v - l v|| / |l| is measured "
    "after the cell, in a separate process, with curvscope's HessianOperator in the reference "
    "dtype (cross-checked against a plain autograd HVP); a library 'reaches' the tolerance when "
    "all k pairs are within it, no two vectors coincide and the values match the reference's top k.",
    "gmm-f32 and gmm-f64 share weights/data rounded to float32, so one exact float64 spectrum "
    "scores both; W1's float64 copy (w1-f64) likewise holds the float32 weights.",
    "PyHessian's density as shipped calls the removed torch.eig; the 'SHIM' row patches "
    "torch.eig with eigh for comparison and is not the library as shipped.",
    "skerch has no HVP of its own: its cells use curvlinops' Hessian behind a skerch BaseLinOp "
    "adapter.",
    "Batches are equal-sized, so hessian-eigenthings' equal weighting of batches is unbiased "
    "here (it is biased for a short last batch).",
    "On a GPU TF32 is off for every library unless --allow-tf32.",
]


def merge(args: argparse.Namespace) -> int:
    """One report from several JSON files of split runs (same budgets)."""
    payloads = [json.loads(Path(f).read_text()) for f in args.merge]
    first = payloads[0]
    for f, pl in zip(args.merge[1:], payloads[1:]):
        if pl.get("budget") != first.get("budget"):
            print(f"WARNING: {f} has budgets {pl.get('budget')} != {first.get('budget')}: the "
                  "target table uses the first file's", flush=True)
    problems: dict[str, Any] = {}
    refs: dict[str, Any] = {}
    resid: dict[str, Any] = {}
    cells: dict[tuple, dict[str, Any]] = {}
    for pl in payloads:
        for s in pl["problems"]:
            problems.setdefault(s["name"], s)
        for fam, info in pl.get("references", {}).items():
            merged = dict(refs.get(fam, {}))
            for key, value in info.items():
                merged.setdefault(key, value)
            if info.get("label") and merged.get("label") != info["label"]:
                merged["label"] = f"{merged['label']} + {info['label']}"
            if info.get("status") == "ok":
                merged["status"] = "ok"
            refs[fam] = merged
        resid.update(pl.get("residuals") or {})
        for rec in pl["cells"]:
            cells[(rec["problem"], rec["library"], rec["task"], rec["setting"])] = rec  # last wins
    payload = {**first, "merged_from": [str(f) for f in args.merge], "problems": list(problems.values()),
               "references": refs, "residuals": resid, "cells": list(cells.values()),
               "total_seconds": sum(pl.get("total_seconds", 0.0) for pl in payloads),
               "versions": {**first["versions"], **{k: v for pl in payloads
                                                    for k, v in pl["versions"].items()
                                                    if v != "not installed"}}}
    summary_rows, target_rows = print_report(payload)
    payload.update(summary=summary_rows, targets=target_rows)
    out_args = argparse.Namespace(**{**first["args"]})
    write_payload(payload, Path(args.out) if args.out else default_out(out_args, merged=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    torch.set_num_threads(args.threads)
    t_run = time.perf_counter()
    b = budget_of(args)
    versions = peer_versions()
    info = machine_info(args.device)
    print(f"# bench_spectral: size={args.size} device={args.device} threads/cell={args.threads} "
          f"timeouts/cell={args.timeouts} cells={args.cells}; budget {asdict(b)}", flush=True)
    print(f"torch {torch.__version__}, curvscope {info.get('curvscope')}, peers: "
          + ", ".join(f"{LIB_LABELS[k]} {v}" for k, v in versions.items())
          + f"; load average {info.get('loadavg')}" + (f"; GPU {info['gpu']}" if info.get("gpu") else ""),
          flush=True)

    global START_METHOD
    START_METHOD = args.start_method
    if START_METHOD == "forkserver":
        # every cell is still a fresh process, forked from a server that has only imported
        # these modules (and never run any benchmark code): saves ~2 s of imports per cell
        preload = ["torch", "numpy", "curvscope", "scipy.sparse.linalg"]
        preload += [m for m, v in versions.items() if v != "not installed"]
        mp.get_context("forkserver").set_forkserver_preload(preload)
    workdir = Path(tempfile.mkdtemp(prefix="bench_spectral_"))
    ref_dir = Path(args.ref_cache) if args.ref_cache else workdir / "ref"
    ref_dir.mkdir(parents=True, exist_ok=True)
    try:
        specs = prepare_problems(args, workdir)
        cells = all_cells(args, b)
        base = {"device": args.device, "seed": args.seed, "threads": args.threads,
                "budget": asdict(b), "allow_tf32": args.allow_tf32, "sk_block": args.sk_block}

        ref_info = run_references(specs, args, b, base, ref_dir)
        records: list[dict[str, Any]] = []
        residuals: dict[str, Any] = {}
        for spec in specs:
            recs = run_cells(spec, cells, args, b, versions, base, workdir)
            ref_dtype = ref_info.get(spec.family, {}).get("dtype", "float64")
            resid = measure_residuals(spec, recs, args, base, ref_dtype)
            residuals[spec.name] = {k: v for k, v in resid.items() if k != "cells"}
            rinfo = ref_info.get(spec.family, {})
            ref = None
            if rinfo.get("status") in ("ok", "partial"):
                try:
                    ref = Reference(rinfo)
                except Exception as err:  # noqa: BLE001
                    print(f"[reference] unusable: {err}", flush=True)
            score_records(recs, ref, b, resid)
            for rec in recs:  # the vectors were only needed for the residuals
                res = rec.get("result") or {}
                if res.get("vectors_path"):
                    with contextlib.suppress(OSError):
                        os.remove(res["vectors_path"])
            records.extend(recs)

        total = time.perf_counter() - t_run
        info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        payload = {
            "benchmark": "bench_spectral", "args": {k: v for k, v in vars(args).items()},
            "machine": info,
            "versions": {"torch": torch.__version__, "curvscope": info.get("curvscope"), **versions},
            "budget": asdict(b), "problems": [vars(s) for s in specs], "references": ref_info,
            "residuals": residuals, "cells": records, "total_seconds": total, "notes": NOTES,
        }
        summary_rows, target_rows = print_report(payload)
        payload.update(summary=summary_rows, targets=target_rows)
        print(f"\nTotal wall time {total:.0f} s; load average at start {info.get('loadavg')}, "
              f"end {info['loadavg_end']} (other jobs share this machine: treat times as ±30 %).")
        for r in ref_info.values():
            if r.get("kind") == "exact" and r.get("evals_path"):
                with contextlib.suppress(OSError):
                    ev = np.load(r["evals_path"])
                    r["eigenvalue_quantiles"] = np.quantile(ev, np.linspace(0, 1, 21)).tolist()
        write_payload(payload, Path(args.out) if args.out else default_out(args))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # problems, vectors, uncached references
    return 0


if __name__ == "__main__":
    sys.exit(main())
