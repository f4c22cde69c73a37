"""How the cost of curvature products grows: time and memory vs parameter count and data size.

Two model families, on one device per run:

* ``mlp``: a tanh MLP 64-w-w-10 on Gaussian inputs (parameter count grows as ``w**2``);
* ``resnet``: torchvision's ResNet-18 layout with a width knob (``curvscope.zoo.resnet18``; width
  64 is the real ResNet-18, 11.2M parameters) at initialisation in eval mode, on class-structured
  synthetic 3 x s x s images (``curvscope.zoo.synthetic_images_resnet18``: workload W1 at width 64,
  2048 images of 32x32, batches of 256).

Two sweeps: the *params* sweep (widths at a fixed data set) and the *data* sweep (one ResNet width,
growing number of images). Every row is measured in a fresh subprocess (``--no-isolate`` to run in
this process), with a time limit, so one size that runs out of memory or time is recorded as an
error in its row and the run goes on. Per row:

* ``gradient_s``: one gradient over the data, the unit of cost;
* ``hvp_single_s``: one Hessian-vector product (``engine="double_backward"``);
* ``hvp_batched_pv_s``: one product with ``k`` columns with the default engine (``auto``: the
  vmapped forward-over-reverse on an accelerator, a double-backward loop on a CPU), per vector;
  ``hvp_fwdrev_pv_s`` the same with ``engine="forward_over_reverse"`` (CPU only; on CUDA the
  default engine is that one); ``ggn_single_s`` / ``ggn_batched_pv_s`` the Gauss-Newton products;
  the ratios to the gradient (``*_xg``);
* ``batched_check``: ``max_j ||(A V)_j - A v_j|| / ||A v_j||`` of the batched product's first two
  columns against single products (float32 round-off expected);
* peak memory of one single product, one batched product (and of the GGN), next to the memory in
  use before it: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on
  a CPU the resident-set high-water mark (``VmHWM``) after resetting it through
  ``/proc/self/clear_refs`` (Linux; ``n/a`` elsewhere). The CPU figure counts the whole process
  (about 0.2-0.4 GB of torch itself) and memory that the allocator keeps after a free;
  ``*_peak_bytes`` are absolute and the ``base`` figures say what was there before;
* ``lanczos{steps}_{basis}``: ``curvscope.lanczos(H, steps, num_probes=1, reorth="full",
  basis=...)`` for ``basis`` in device / host / disk: wall time, peak memory as above, and
  ``peak / peak of one single product`` (the issue's target for the host basis: <= 1.5; only
  meaningful on an accelerator, where the host basis is off the device);
* precision, all with the same single-vector double-backward product: ``f32_vs_f64`` (float32
  against a float64 copy of the model and data), ``bf16_acc32`` / ``bf16_acc64`` (a bfloat16 copy,
  per-batch products accumulated in float32 / float64: ``curvscope.Problem(accumulate_dtype=...)``)
  with their error against float32 (``*_err``), against float64 (``*_err64``), against a float64
  product of the bf16-rounded model and data (``*_arith_err``: the arithmetic's own error, without
  the rounding of weights and inputs, which dominates ``*_err`` on small ResNets) and their time,
  and ``tf32`` (CUDA only: TF32 matmuls and convolutions, float32 storage) against float32. Every
  other CUDA measurement runs with TF32 *off* (``torch.backends.cuda.matmul.allow_tf32`` and
  ``torch.backends.cudnn.allow_tf32`` set False; cuDNN's default is True).
* optionally (``--stress-k``, on by default with ``--size large``) one forward-over-reverse product
  with many columns to exercise the operator's out-of-memory chunking: whether it finished, and the
  column chunk it ended with.

Prints markdown tables and the target summary, writes ``bench_scale_<device>.json`` and a PNG
(time and memory vs parameters and vs data size) under ``benchmarks/results`` (``--out``).
Run: ``python benchmarks/bench_scale.py [--device cuda] [--size tiny|small|medium|large]``.
Absolute times hold only for the machine; compare ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

import curvscope as cs
from curvscope import zoo

# Per size: the MLP widths (examples, batch), the ResNet widths (images, image side, batch), the
# ResNet width of the data sweep and its image counts, and the Lanczos steps.
SIZES = {
    "tiny": {"mlp": [8, 24], "mlp_n": 64, "mlp_batch": 32,
             "resnet": [2, 4], "resnet_n": 8, "image": 24, "resnet_batch": 4,
             "data_width": 2, "data_n": [4, 8, 16], "lanczos_steps": 20, "stress_k": 0},
    "small": {"mlp": [32, 128, 512], "mlp_n": 1024, "mlp_batch": 256,
              "resnet": [4, 8, 16], "resnet_n": 128, "image": 32, "resnet_batch": 64,
              "data_width": 8, "data_n": [64, 128, 256], "lanczos_steps": 100,
              "stress_k": 0},
    "medium": {"mlp": [64, 256, 1024, 2048], "mlp_n": 2048, "mlp_batch": 256,
               "resnet": [8, 16, 32, 64], "resnet_n": 512, "image": 32, "resnet_batch": 128,
               "data_width": 32, "data_n": [128, 256, 512, 1024], "lanczos_steps": 100,
               "stress_k": 64},
    "large": {"mlp": [256, 1024, 4096, 8192], "mlp_n": 4096, "mlp_batch": 256,
              "resnet": [16, 32, 64, 128, 192], "resnet_n": 2048, "image": 32,
              "resnet_batch": 256, "data_width": 64, "data_n": [256, 512, 1024, 2048, 4096],
              "lanczos_steps": 100, "stress_k": 128},
}
MLP_DIM, CLASSES = 64, 10
TARGET_KEYS = (
    "hvp_batched_per_vector_le_0.7x_gradient",
    "hvp_single_le_3x_gradient",
    "ggn_cheaper_than_hessian",
    "batched_product_never_oom",
    "lanczos_host_basis_peak_le_1.5x_product",
    "peak_memory_every_row",
    "mixed_precision_reported",
    "float32_vs_float64_reported",
    "scaling_params_1m_10m_100m",
    "scaling_data_size",
)


# ----------------------------------------------------------------------------- problems
def make_problem(spec: dict, device: torch.device) -> cs.Problem:
    """The float32 problem of one row, on ``device``."""
    if spec["family"] == "mlp":
        g = torch.Generator().manual_seed(0)
        n, w = spec["examples"], spec["width"]
        x = torch.randn(n, MLP_DIM, generator=g)
        y = torch.randint(0, CLASSES, (n,), generator=g)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(MLP_DIM, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(),
                                  nn.Linear(w, CLASSES))
        loss_fn: nn.Module = nn.CrossEntropyLoss()
        b = spec["batch"]
        batches = [(x[i:i + b], y[i:i + b]) for i in range(0, n, b)]
    else:
        zp = zoo.synthetic_images_resnet18(CLASSES, n=spec["examples"], batch_size=spec["batch"],
                                           width=spec["width"], size=spec["image"])
        model, loss_fn, batches = zp.model, zp.loss_fn, list(zp.batches)
    model = model.to(device).eval()
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    return cs.Problem(model, loss_fn, batches)


def cast_problem(p: cs.Problem, dtype: torch.dtype,
                 accumulate_dtype: torch.dtype | None = None) -> cs.Problem:
    """A copy of ``p`` with model and inputs in ``dtype`` (labels untouched)."""
    model = copy.deepcopy(p.model).to(dtype)
    batches = [(x.to(dtype), y) for x, y in p.data]
    return cs.Problem(model, p.loss_fn, batches, accumulate_dtype=accumulate_dtype)


# ----------------------------------------------------------------------------- timing, memory
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call."""
    fn()
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset the resident-set high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block: CUDA allocator statistics, or the process's RSS high-water mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base: int | None = None
        self.peak: int | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._ok = _reset_rss_peak()
            self.base = _proc_status_bytes("VmRSS") if self._ok else None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._ok:
            self.peak = _proc_status_bytes("VmHWM")


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for CUDA matmuls and cuDNN convolutions on (or off) inside the block."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _f64_fits(num_params: int, args: argparse.Namespace) -> bool:
    return args.f64_max_params <= 0 or num_params <= args.f64_max_params


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    return text[:300]


# ----------------------------------------------------------------------------- one row
def measure(spec: dict, device: torch.device, args: argparse.Namespace) -> dict:
    """Every measurement of one row; a failing group is recorded in ``row["errors"]``."""
    row: dict = {**spec, "errors": {}, "group_s": {}}
    if device.type == "cuda":  # strict float32 everywhere except the TF32 measurement
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    k, reps = args.k, args.repeats
    state: dict = {}

    def group(name, fn):
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - recorded in the row, the run goes on
            row["errors"][name] = _error_text(err)
            if args.verbose:
                traceback.print_exc()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["group_s"][name] = time.perf_counter() - t0

    def setup():
        threads = torch.get_num_threads()
        if device.type == "cuda":  # building ResNets evaluates them on the CPU: not timed
            torch.set_num_threads(os.cpu_count() or 1)
        try:
            p = make_problem(spec, device)
        finally:
            torch.set_num_threads(threads)
        row["params"] = p.num_params
        row["num_data"] = p.num_data
        state["p"] = p
        state["v"] = torch.randn(p.num_params, generator=torch.Generator().manual_seed(1)).to(device)
        state["H_db"] = cs.HessianOperator(p, engine="double_backward")
        state["H"] = cs.HessianOperator(p)
        state["G"] = cs.GGNOperator(p)

    group("setup", setup)
    if "p" not in state:
        return row
    p, v = state["p"], state["v"]
    H_db, H, G = state["H_db"], state["H"], state["G"]

    def products():
        row["gradient_s"] = _timed(lambda: p.loss_and_gradient(), device, reps)
        row["hvp_single_s"] = _timed(lambda: H_db @ v, device, reps)
        row["ggn_single_s"] = _timed(lambda: G @ v, device, reps)
        with PeakMemory(device) as m:
            Hv = H_db @ v
        row["hvp_single_peak_bytes"], row["hvp_single_base_bytes"] = m.peak, m.base
        state["Hv"] = Hv.cpu()  # the reference of the precision figures, off the device

    def batched():
        # the k columns live on the device only for the batched products (not during Lanczos)
        g = torch.Generator().manual_seed(2)
        V = state["V"] = torch.randn(p.num_params, k, generator=g).to(device)
        row["hvp_batched_pv_s"] = _timed(lambda: H @ V, device, reps) / k
        with PeakMemory(device) as m:
            HV = H @ V
        row["hvp_batched_peak_bytes"], row["hvp_batched_base_bytes"] = m.peak, m.base
        row["hvp_batched_engine"] = ("double_backward (loop)" if device.type == "cpu"
                                     else H.active_engine if H.active_engine != "auto"
                                     else "forward_over_reverse")
        row["hvp_batched_chunk"] = H.chunk_size or k
        singles = torch.stack([H_db @ V[:, j] for j in range(min(2, k))], 1)
        row["batched_check"] = max(_rel(HV[:, j], singles[:, j]) for j in range(singles.shape[1]))
        if device.type == "cpu":
            Hf = cs.HessianOperator(p, engine="forward_over_reverse")
            row["hvp_fwdrev_pv_s"] = _timed(lambda: Hf @ V, device, reps) / k
            row["batched_check"] = max(row["batched_check"], max(
                _rel((Hf @ V[:, :2])[:, j], singles[:, j]) for j in range(singles.shape[1])))
        else:
            row["hvp_fwdrev_pv_s"] = row["hvp_batched_pv_s"]

    def ggn():
        V = state["V"]
        row["ggn_batched_pv_s"] = _timed(lambda: G @ V, device, reps) / k
        with PeakMemory(device) as m:
            G @ V
        row["ggn_batched_peak_bytes"], row["ggn_batched_base_bytes"] = m.peak, m.base

    group("products", products)
    group("batched", batched)
    group("ggn", ggn)
    state.pop("V", None)
    for key in ("hvp_single_s", "hvp_batched_pv_s", "hvp_fwdrev_pv_s", "ggn_single_s",
                "ggn_batched_pv_s"):
        if key in row and "gradient_s" in row:
            row[key[:-2] + "_xg"] = row[key] / row["gradient_s"]

    if spec.get("lanczos") and args.lanczos_steps > 0:
        steps = min(args.lanczos_steps, p.num_params)
        row["lanczos_steps"] = steps
        for basis in args.bases:
            def run(basis=basis):
                with PeakMemory(device) as m:
                    t = time.perf_counter()
                    res = cs.lanczos(H, steps, num_probes=1, reorth="full", basis=basis,
                                     generator=torch.Generator().manual_seed(0))
                    _sync(device)
                    row[f"lanczos_{basis}_s"] = time.perf_counter() - t
                row[f"lanczos_{basis}_peak_bytes"] = m.peak
                row[f"lanczos_{basis}_base_bytes"] = m.base
                row[f"lanczos_{basis}_top_ritz"] = float(res.ritz()[0].max())
                single = row.get("hvp_single_peak_bytes")
                if m.peak and single:
                    row[f"lanczos_{basis}_peak_x_product"] = m.peak / single
                del res
            group(f"lanczos_{basis}", run)

    def precision():
        Hv = state.get("Hv")
        if Hv is None:
            Hv = (H_db @ v).cpu()
        v64 = v.double()
        ref64 = ref_rounded = None
        pb = cast_problem(p, torch.bfloat16)
        if _f64_fits(p.num_params, args):
            try:
                p64 = cast_problem(p, torch.float64)
                ref64 = (cs.HessianOperator(p64, engine="double_backward") @ v64).cpu()
                row["f32_vs_f64_err"] = _rel(Hv, ref64)
                del p64
                # float64 product of the bf16-rounded model and data: the arithmetic's own error
                rounded64 = cast_problem(pb, torch.float64)
                ref_rounded = (cs.HessianOperator(rounded64, engine="double_backward")
                               @ v64).cpu()
                del rounded64
            except Exception as err:  # noqa: BLE001 - float64 may not fit
                row["errors"]["f64"] = _error_text(err)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        else:
            row["skipped"] = {"f64": f"more than --f64-max-params={args.f64_max_params:g} "
                                     "parameters"}
        for acc, name in ((torch.float32, "bf16_acc32"), (torch.float64, "bf16_acc64")):
            Hb = cs.HessianOperator(cs.Problem(pb.model, pb.loss_fn, pb.data,
                                               accumulate_dtype=acc), engine="double_backward")
            x = v.to(acc)
            out = Hb @ x
            row[f"{name}_err"] = _rel(out, Hv)
            if ref64 is not None:
                row[f"{name}_err64"] = _rel(out, ref64)
            if ref_rounded is not None:
                row[f"{name}_arith_err"] = _rel(out, ref_rounded)
            row[f"{name}_s"] = _timed(lambda Hb=Hb, x=x: Hb @ x, device, reps)
            del Hb
        if device.type == "cuda":
            with tf32(True):
                out = H_db @ v
                row["tf32_err"] = _rel(out, Hv)
                row["tf32_s"] = _timed(lambda: H_db @ v, device, reps)
            if ref64 is not None:
                row["tf32_err64"] = _rel(out, ref64)

    group("precision", precision)

    if args.stress_k:
        def stress():
            Hs = cs.HessianOperator(p, engine="forward_over_reverse")
            k_s = args.stress_k
            if device.type == "cuda":  # inputs and outputs (not chunked) within 20 % of memory
                total = torch.cuda.get_device_properties(device).total_memory
                k_s = max(2, min(k_s, int(0.1 * total / (4 * p.num_params))))
            X = torch.randn(p.num_params, k_s, device=device)
            with PeakMemory(device) as m:
                t = time.perf_counter()
                Hs @ X
                _sync(device)
                row["stress_s"] = time.perf_counter() - t
            row["stress_k"] = k_s
            row["stress_chunk"] = Hs.chunk_size or k_s
            row["stress_peak_bytes"] = m.peak
        group("stress", stress)
    return row


# ----------------------------------------------------------------------------- the runs
def row_specs(args: argparse.Namespace) -> list[dict]:
    """The rows of this run, the data-sweep row that coincides with a params-sweep row merged."""
    size = SIZES[args.size]
    specs: dict[tuple, dict] = {}

    def add(spec, sweep, lanczos):
        if args.widths and spec["width"] not in args.widths:
            return
        key = (spec["family"], spec["width"], spec["examples"], spec.get("image"), spec["batch"])
        entry = specs.setdefault(key, {**spec, "sweeps": [], "lanczos": False})
        entry["sweeps"].append(sweep)
        entry["lanczos"] = entry["lanczos"] or lanczos
    if "params" in args.sweep:
        if "mlp" in args.family:
            for w in size["mlp"]:
                add({"family": "mlp", "width": w, "examples": size["mlp_n"],
                     "batch": size["mlp_batch"]}, "params", True)
        if "resnet" in args.family:
            for w in size["resnet"]:
                add({"family": "resnet", "width": w, "examples": size["resnet_n"],
                     "image": size["image"], "batch": size["resnet_batch"]}, "params", True)
    if "data" in args.sweep and "resnet" in args.family:
        for n in size["data_n"]:
            add({"family": "resnet", "width": size["data_width"], "examples": n,
                 "image": size["image"], "batch": size["resnet_batch"]}, "data",
                args.lanczos_data)
    return list(specs.values())


def _child_argv(args: argparse.Namespace, spec: dict, out: str) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--threads",
            str(args.threads), "-k", str(args.k), "--repeats", str(args.repeats),
            "--lanczos-steps", str(args.lanczos_steps), "--bases", ",".join(args.bases),
            "--stress-k", str(args.stress_k), "--f64-max-params", str(args.f64_max_params),
            "--_row", json.dumps(spec), "--_row-out", out]
    return argv + (["--verbose"] if args.verbose else [])


def run_row(spec: dict, args: argparse.Namespace) -> dict:
    """One row, in a fresh subprocess with a time limit unless ``--no-isolate``."""
    t0 = time.perf_counter()
    if not args.isolate:
        row = measure(spec, torch.device(args.device), args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "row.json")
            try:
                # the disk basis's temporary file goes to `tmp` too: removed even after a kill
                proc = subprocess.run(_child_argv(args, spec, out), capture_output=True,
                                      text=True, timeout=args.timeout,
                                      env={**os.environ, "TMPDIR": tmp})
                if os.path.exists(out):
                    with open(out) as f:
                        row = json.load(f)
                else:
                    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
                    row = {**spec, "errors": {"row": f"subprocess exited with {proc.returncode}: "
                                                     + " | ".join(tail)}}
                if args.verbose and proc.stderr:
                    print(proc.stderr, file=sys.stderr)
            except subprocess.TimeoutExpired:
                row = {**spec, "errors": {"row": f"timed out after {args.timeout} s"}}
    row["row_wall_s"] = time.perf_counter() - t0
    return row


# ----------------------------------------------------------------------------- targets
def _ok(row: dict, *keys: str) -> bool:
    return all(isinstance(row.get(key), (int, float)) for key in keys)


def targets(rows: list[dict], device: torch.device, args: argparse.Namespace) -> dict:
    """Each target of the issue: the measured figure and MET / NOT MET (or n/a)."""
    out: dict = {}

    def put(key, target, measured, value, met):
        status = "n/a" if met is None else ("MET" if met else "NOT MET")
        out[key] = {"target": target, "measured": measured, "value": value, "status": status}

    def worst(key, fmt="{:.2f}x", among=None):
        among = rows if among is None else among
        got = [(r[key], r) for r in among if _ok(r, key)]
        if not got:
            return None, "not measured", False
        value, r = max(got, key=lambda t: t[0])
        best = min(t[0] for t in got)
        text = (f"worst {fmt.format(value)} ({r['family']} w={r['width']}, {r['params']:,} params, "
                f"n={r['examples']}); best {fmt.format(best)}; {len(got)}/{len(among)} rows")
        return value, text, len(got) == len(among)

    value, text, complete = worst("hvp_batched_pv_xg")
    fwd = [r["hvp_fwdrev_pv_xg"] for r in rows if _ok(r, "hvp_fwdrev_pv_xg")]
    if device.type == "cpu" and fwd:
        text += f"; forward-over-reverse engine: worst {max(fwd):.2f}x, best {min(fwd):.2f}x"
    put(TARGET_KEYS[0], f"batched HVP (k={args.k}, default engine) per vector <= 0.7x a gradient",
        text, value, complete and value is not None and value <= 0.7)
    value, text, complete = worst("hvp_single_xg")
    put(TARGET_KEYS[1], "single-vector HVP <= 3x a gradient", text, value,
        complete and value is not None and value <= 3.0)
    ratios = [(r["ggn_batched_pv_s"] / r["hvp_batched_pv_s"], r) for r in rows
              if _ok(r, "ggn_batched_pv_s", "hvp_batched_pv_s")]
    singles = [r["ggn_single_s"] / r["hvp_single_s"] for r in rows
               if _ok(r, "ggn_single_s", "hvp_single_s")]
    if ratios:
        value = max(t[0] for t in ratios)
        text = (f"GGN/Hessian time, batched per vector: worst {value:.2f}, best "
                f"{min(t[0] for t in ratios):.2f}; single vector: worst "
                f"{max(singles) if singles else float('nan'):.2f}; {len(ratios)}/{len(rows)} rows")
        met = len(ratios) == len(rows) and value < 1 and (not singles or max(singles) < 1)
    else:
        value, text, met = None, "not measured", False
    put(TARGET_KEYS[2], "GGN products cheaper than Hessian products (single and batched)", text,
        value, met)
    oom = [r for r in rows if any("OutOfMemory" in e or "out of memory" in e
                                  for k_, e in r.get("errors", {}).items()
                                  if k_ in ("batched", "ggn", "stress", "products"))]
    done = [r for r in rows if _ok(r, "hvp_batched_pv_s", "ggn_batched_pv_s")]
    text = f"batched products finished in {len(done)}/{len(rows)} rows, {len(oom)} out of memory"
    stress = [r for r in rows if _ok(r, "stress_s")]
    if args.stress_k:
        chunks = sorted({r["stress_chunk"] for r in stress})
        ks = sorted({r["stress_k"] for r in stress})
        text += (f"; stress product with k={ks} columns: finished in {len(stress)}/{len(rows)} "
                 f"rows, column chunks it ended with: {chunks}")
    put(TARGET_KEYS[3], "memory chunking: a batched product never runs out of memory", text,
        len(oom), not oom and len(done) == len(rows)
        and (not args.stress_k or len(stress) == len(rows)))
    lanczos_rows = [r for r in rows if r.get("lanczos")]
    value, text, complete = worst("lanczos_host_peak_x_product", among=lanczos_rows)
    text = text.replace(" rows", " rows with Lanczos", 1)
    if value is not None:
        for basis in ("device", "disk"):
            key = f"lanczos_{basis}_peak_x_product"
            vals = [r[key] for r in rows if _ok(r, key)]
            if vals:
                text += f"; {basis} basis: worst {max(vals):.2f}x"
    if device.type == "cpu":
        text += "; n/a on a CPU: the host basis is in the same memory as the device's"
        met = None
    else:
        met = value is not None and value <= 1.5 and complete
    put(TARGET_KEYS[4], f"{args.lanczos_steps}-step full-reorth Lanczos, host basis: peak device "
        "memory <= 1.5x one single-vector product", text, value, met)
    have = [r for r in rows if _ok(r, "hvp_single_peak_bytes", "hvp_batched_peak_bytes")]
    put(TARGET_KEYS[5], "peak memory reported in every row",
        f"{len(have)}/{len(rows)} rows", len(have), len(have) == len(rows))
    keys = ["bf16_acc32_err", "bf16_acc64_err"] + (["tf32_err"] if device.type == "cuda" else [])
    have = [r for r in rows if _ok(r, *keys)]
    parts = []
    for key in keys:
        vals = [r[key] for r in rows if _ok(r, key)]
        if vals:
            parts.append(f"{key[:-4]} vs f32: {min(vals):.1e}..{max(vals):.1e}")
    if device.type == "cpu":
        parts.append("tf32: n/a on a CPU")
    put(TARGET_KEYS[6], "bf16 (float32 / float64 accumulation) and TF32 products: error vs "
        "float32 reported", "; ".join(parts) + f"; {len(have)}/{len(rows)} rows",
        max((r["bf16_acc32_err"] for r in have), default=None), len(have) == len(rows))
    vals = [r["f32_vs_f64_err"] for r in rows if _ok(r, "f32_vs_f64_err")]
    wanted = [r for r in rows if _ok(r, "params") and _f64_fits(r["params"], args)]
    put(TARGET_KEYS[7], "float32 product error vs a float64 reference reported (where float64 "
        "fits)", (f"{min(vals):.1e}..{max(vals):.1e}; " if vals else "")
        + f"{len(vals)}/{len(rows)} rows ({len(rows) - len(wanted)} above --f64-max-params)",
        max(vals, default=None), bool(vals) and len(vals) >= len(wanted))
    sweep = [r for r in rows if "params" in r.get("sweeps", []) and _ok(r, "gradient_s",
                                                                        "hvp_single_s")]
    largest = max((r["params"] for r in sweep), default=0)
    reached = [m for m in (1e6, 1e7, 1e8) if any(r["params"] >= m for r in sweep)]
    put(TARGET_KEYS[8], "time and memory vs parameter count at 1M, 10M and 100M+ parameters",
        f"largest measured {largest:,} parameters; decades reached: "
        f"{', '.join(f'{m:.0e}' for m in reached) or 'none'}", largest, len(reached) == 3)
    data = [r for r in rows if "data" in r.get("sweeps", []) and _ok(r, "gradient_s")]
    put(TARGET_KEYS[9], "time and memory vs data size",
        f"{len(data)} data sizes measured: {sorted(r['examples'] for r in data)}", len(data),
        len(data) >= 3)
    return out


# ----------------------------------------------------------------------------- output
def _fmt(value, kind="g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if kind == "bytes":
        return f"{value / 2**20:.0f}M" if value < 2**30 else f"{value / 2**30:.2f}G"
    if kind == "int":
        return f"{value:,}"
    return f"{value:.3g}"


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(key), kind) for key, _, kind in cols) + " |")
    return "\n".join(lines)


def print_report(rows: list[dict], summary: dict, args: argparse.Namespace) -> None:
    ident = [("family", "model", "g"), ("width", "w", "g"), ("params", "params", "int"),
             ("examples", "N", "int")]
    print(f"\n### Cost (k={args.k}; seconds, ratios to one gradient)\n")
    print(_table(rows, ident + [
        ("gradient_s", "grad s", "g"), ("hvp_single_xg", "HVP 1 /g", "g"),
        ("hvp_batched_pv_xg", f"HVP x{args.k} /vec /g", "g"),
        ("hvp_fwdrev_pv_xg", "fwd-rev /vec /g", "g"), ("ggn_single_xg", "GGN 1 /g", "g"),
        ("ggn_batched_pv_xg", f"GGN x{args.k} /vec /g", "g"),
        ("batched_check", "batched vs single", "g")]))
    steps = args.lanczos_steps
    print(f"\n### Memory (peak; CUDA: allocated, CPU: process RSS) and {steps}-step Lanczos\n")
    print(_table(rows, ident + [
        ("hvp_single_base_bytes", "before", "bytes"), ("hvp_single_peak_bytes", "HVP 1", "bytes"),
        ("hvp_batched_peak_bytes", f"HVP x{args.k}", "bytes"),
        ("ggn_batched_peak_bytes", f"GGN x{args.k}", "bytes"),
        ("lanczos_device_s", "Lz dev s", "g"), ("lanczos_host_s", "Lz host s", "g"),
        ("lanczos_disk_s", "Lz disk s", "g"),
        ("lanczos_device_peak_x_product", "dev peak/HVP", "g"),
        ("lanczos_host_peak_x_product", "host peak/HVP", "g"),
        ("lanczos_disk_peak_x_product", "disk peak/HVP", "g")]))
    print("\n### Precision (relative error of one HVP; time in seconds)\n")
    print(_table(rows, ident + [
        ("f32_vs_f64_err", "f32 vs f64", "g"), ("bf16_acc32_err", "bf16/acc32 vs f32", "g"),
        ("bf16_acc64_err", "bf16/acc64 vs f32", "g"), ("bf16_acc32_err64", "bf16/acc32 vs f64", "g"),
        ("bf16_acc32_arith_err", "bf16/acc32 arith", "g"),
        ("bf16_acc64_arith_err", "bf16/acc64 arith", "g"),
        ("tf32_err", "tf32 vs f32", "g"), ("hvp_single_s", "f32 s", "g"),
        ("bf16_acc32_s", "bf16/acc32 s", "g"), ("bf16_acc64_s", "bf16/acc64 s", "g"),
        ("tf32_s", "tf32 s", "g")]))
    errs = [(r, e) for r in rows for e in r.get("errors", {}).items()]
    if errs:
        print("\n### Errors\n")
        for r, (where, text) in errs:
            print(f"- {r['family']} w={r['width']} N={r['examples']}: {where}: {text}")
    print("\n### Targets\n")
    print("| target | measured | status |\n|---|---|---|")
    for item in summary.values():
        print(f"| {item['target']} | {item['measured']} | **{item['status']}** |")


def plot(rows: list[dict], path: Path, device: torch.device, args: argparse.Namespace) -> None:
    """Four panels: time and peak memory vs parameters (params sweep) and vs data size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig = Figure(figsize=(12, 8.5))
    axes = fig.subplots(2, 2)
    time_keys = [("gradient_s", "gradient", "C0"), ("hvp_single_s", "HVP, 1 vector", "C1"),
                 ("hvp_batched_pv_s", f"HVP, x{args.k}, per vector", "C2"),
                 ("ggn_batched_pv_s", f"GGN, x{args.k}, per vector", "C3")]
    if device.type == "cpu":
        time_keys.append(("hvp_fwdrev_pv_s", f"HVP fwd-over-rev, x{args.k}, per vector", "C5"))
    mem_keys = [("hvp_single_peak_bytes", "HVP, 1 vector", "C1"),
                ("hvp_batched_peak_bytes", f"HVP, x{args.k}", "C2"),
                ("ggn_batched_peak_bytes", f"GGN, x{args.k}", "C3"),
                ("lanczos_device_peak_bytes", "Lanczos, basis on device", "C4"),
                ("lanczos_host_peak_bytes", "Lanczos, basis in host memory", "C6")]
    styles = {"mlp": ("s", "--"), "resnet": ("o", "-")}
    mem_label = "peak GPU memory allocated" if device.type == "cuda" else "peak process RSS"

    def draw(ax, x_key, subset, keys, scale=1.0):
        """Colour: the quantity; marker and line: the model family (legend entries once each)."""
        from matplotlib.lines import Line2D

        handles, families = [], []
        for key, label, color in keys:
            drawn = False
            for family in ("mlp", "resnet"):
                fam = sorted((r for r in subset if r["family"] == family and _ok(r, x_key, key)),
                             key=lambda r: r[x_key])
                if fam:
                    marker, line = styles[family]
                    ax.plot([r[x_key] for r in fam], [r[key] * scale for r in fam],
                            marker=marker, linestyle=line, color=color)
                    drawn = True
                    families += [family] if family not in families else []
            if drawn:
                handles.append(Line2D([], [], color=color, label=label))
        for family in families:
            marker, line = styles[family]
            handles.append(Line2D([], [], color="black", marker=marker, linestyle=line,
                                  label={"mlp": "MLP", "resnet": "ResNet-18"}[family]))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if handles:
            ax.legend(handles=handles, fontsize=7)

    by_p = [r for r in rows if "params" in r.get("sweeps", [])]
    by_n = [r for r in rows if "data" in r.get("sweeps", [])]
    size = SIZES[args.size]
    draw(axes[0, 0], "params", by_p, time_keys)
    axes[0, 0].set_title(f"time per product vs parameters\n(MLP: {size['mlp_n']} examples; "
                         f"ResNet-18: {size['resnet_n']} images {size['image']}x{size['image']})",
                         fontsize=10)
    axes[0, 0].set_ylabel("seconds")
    draw(axes[0, 1], "params", by_p, mem_keys, 2**-20)
    axes[0, 1].set_title(f"{mem_label} vs parameters", fontsize=10)
    axes[0, 1].set_ylabel("MiB")
    draw(axes[1, 0], "examples", by_n, time_keys)
    axes[1, 0].set_title(f"time per product vs data size (ResNet-18, width {size['data_width']})",
                         fontsize=10)
    axes[1, 0].set_ylabel("seconds")
    draw(axes[1, 1], "examples", by_n, mem_keys[:3], 2**-20)
    axes[1, 1].set_title(f"{mem_label} vs data size (batches of {size['resnet_batch']})",
                         fontsize=10)
    axes[1, 1].set_ylabel("MiB")
    for ax in axes[0]:
        ax.set_xlabel("parameters")
    for ax in axes[1]:
        ax.set_xlabel("examples")
    fig.suptitle(f"curvscope bench_scale: {device} ({args.size}, {args.threads} thread(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "curvscope": cs.__version__, "cpu": platform.processor()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                               if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--size", choices=list(SIZES), default="small",
                        help="tiny: CI smoke test; small: CPU default; medium, large: a GPU")
    parser.add_argument("--family", default="mlp,resnet", help="comma list: mlp, resnet")
    parser.add_argument("--sweep", default="params,data", help="comma list: params, data")
    parser.add_argument("-k", type=int, default=16, help="columns of the batched product")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (best of) per figure")
    parser.add_argument("--lanczos-steps", type=int, default=None,
                        help="Lanczos steps (full reorthogonalisation; default per size: 100, "
                        "30 with --size tiny); 0 skips Lanczos")
    parser.add_argument("--bases", default="device,host,disk", help="Lanczos basis placements")
    parser.add_argument("--lanczos-data", action="store_true",
                        help="also run Lanczos on the data-sweep rows")
    parser.add_argument("--stress-k", type=int, default=None,
                        help="columns of the chunking stress product (0: off; default per size)")
    parser.add_argument("--f64-max-params", type=float, default=3e7,
                        help="skip the float64 references above this many parameters (0: never)")
    parser.add_argument("--widths", default="",
                        help="comma list: only the rows of these widths (to split a long run)")
    parser.add_argument("--tag", default="",
                        help="output stem bench_scale_<device>_<tag> (parts of a split run)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="combine the rows of these result files (parts of a split run) into "
                        "one table, summary, JSON and plot; -k, --size, --lanczos-steps and "
                        "--stress-k are taken from the first file")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per row")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="measure every row in this process (no time limit per row)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="folder for bench_scale_<device>.json / .png")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of errors")
    parser.add_argument("--_row", help=argparse.SUPPRESS)
    parser.add_argument("--_row-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.family = [f for f in args.family.split(",") if f]
    args.sweep = [s for s in args.sweep.split(",") if s]
    args.bases = [b for b in args.bases.split(",") if b]
    args.widths = [int(w) for w in args.widths.split(",") if w]
    if args.stress_k is None:
        args.stress_k = SIZES[args.size]["stress_k"]
    if args.lanczos_steps is None:
        args.lanczos_steps = SIZES[args.size]["lanczos_steps"]
    for name, allowed in (("family", ("mlp", "resnet")), ("sweep", ("params", "data")),
                          ("bases", ("device", "host", "disk"))):
        bad = set(getattr(args, name)) - set(allowed)
        if bad:
            parser.error(f"--{name}: unknown {sorted(bad)}; choose from {allowed}")
    if args.k < 2:
        parser.error("-k must be at least 2")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args._row:  # a child: one row, written to a file
        row = measure(json.loads(args._row), device, args)
        Path(args._row_out).write_text(json.dumps(row))
        return row
    t0 = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    parts = None
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        first = parts[0]["meta"]["args"]
        for key in ("k", "size", "lanczos_steps", "stress_k", "threads", "f64_max_params"):
            setattr(args, key, first[key])
        device = torch.device(parts[0]["meta"]["args"]["device"])
        rows = [row for part in parts for row in part["rows"]]
    else:
        rows = []
        for spec in row_specs(args):
            row = run_row(spec, args)
            rows.append(row)
            print(f"[{time.perf_counter() - t0:6.1f} s] {row['family']} w={row['width']} "
                  f"N={row['examples']}: {row.get('params', '?')} params, row "
                  f"{row['row_wall_s']:.1f} s"
                  + (f", errors: {sorted(row['errors'])}" if row.get("errors") else ""),
                  file=sys.stderr, flush=True)
    summary = targets(rows, device, args)
    print_report(rows, summary, args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_scale_{device.type}" + (f"_{args.tag}" if args.tag else "")
    meta = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if not k.startswith("_") and k != "merge"},
            "size": SIZES[args.size],
            "machine": parts[0]["meta"]["machine"] if parts else _machine(device),
            "load_average_start_end": [load_start,
                                       os.getloadavg() if hasattr(os, "getloadavg") else None],
            "tf32": "off except the tf32 measurement" if device.type == "cuda" else "n/a",
            "memory": ("torch.cuda.max_memory_allocated after reset_peak_memory_stats"
                       if device.type == "cuda" else
                       "process VmHWM after writing 5 to /proc/self/clear_refs (absolute RSS)"),
            "wall_s": (sum(part["meta"]["wall_s"] for part in parts) if parts
                       else time.perf_counter() - t0)}
    if args.merge:
        meta["merged_from"] = [str(path) for path in args.merge]
    result = {"meta": meta, "targets": summary, "rows": rows}
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot(rows, args.out / f"{stem}.png", device, args)
    print(f"\nwrote {args.out / stem}.json and .png ({meta['wall_s']:.0f} s)", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
