"""The finite-difference Hessian engine against the exact engines, on the zoo, float32 and float64.

For each problem (the zoo's Gaussian mixture, digits MLP, BatchNorm CNN and character
transformer, plus a model whose attention runs on a fused ``scaled_dot_product_attention``
kernel, which has no second derivative), each dtype and each step scale ``c`` of
``h = c * eps^(1/3) * max(||theta||, sqrt(P)/10) / ||v||`` (the default ``c`` is
``curvscope.curvature._finite_difference.STEP_SCALE``), with and without Richardson's
extrapolation, it reports for ``k`` random vectors:

* the relative error ``||H_fd v - H v|| / ||H v||`` (median and worst over the vectors), where
  ``H v`` is the exact product of the same model in float64 (the math SDPA path for attention), so
  a float32 row measures everything float32 costs;
* the ratio of the engine's own error estimate to the measured error (median, and the fraction of
  vectors where the estimate is at least the error: an estimate that is too small is the failure
  that matters);
* the cost: gradients per column (4 with Richardson, 2 without) and wall time per column beside
  the exact double-backward engine's.

Run::

    python benchmarks/bench_finite_difference.py            # CPU, about a minute
    python benchmarks/bench_finite_difference.py --quick    # CI-sized: two problems, c = 1 only

Prints a markdown table and writes ``benchmarks/results/bench_finite_difference_<device>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import curvscope as cs
from curvscope import zoo
from curvscope.curvature import _finite_difference as fdmod

RESULTS = Path(__file__).parent / "results"


class SDPAClassifier(nn.Module):
    """Token embedding, one attention layer on ``F.scaled_dot_product_attention`` ([B, h, T, d]),
    mean pooling and a linear head: fused kernels on the CPU and GPU, no double backward."""

    def __init__(self, vocab: int = 12, d: int = 16, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, d))
        return self.head(torch.tanh(x).mean(1))


def sdpa_problem(seed: int = 0) -> tuple[nn.Module, nn.Module, list]:
    """A seeded SDPA classifier, trained a few steps on token patterns (its class = first token mod 3)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 12, (48, 6), generator=g)
    y = tokens[:, 0] % 3
    torch.manual_seed(seed)
    model = SDPAClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(tokens), y).backward()
        opt.step()
    return model.eval(), nn.CrossEntropyLoss(), [(tokens[i:i + 16], y[i:i + 16]) for i in (0, 16, 32)]


def problems(quick: bool) -> dict[str, tuple[nn.Module, Any, list]]:
    out: dict[str, tuple[nn.Module, Any, list]] = {}
    zp = zoo.gaussian_mixture(5, seed=0)
    out["gaussian_mixture(C=5)"] = (zp.model, zp.loss_fn, zp.batches)
    if not quick:
        for name in ("digits_mlp", "synthetic_images_cnn", "char_transformer"):
            if zoo.available().get(name):
                zp = zoo.load(name)
                out[zp.name] = (zp.model, zp.loss_fn, zp.batches)
    out["sdpa_classifier (fused attention)"] = sdpa_problem()
    return out


def _converted(batches: list, dtype: torch.dtype) -> list:
    def conv(t: Any) -> Any:
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return [(conv(x), conv(y)) for x, y in batches]


def _problem(model: nn.Module, loss: Any, batches: list, dtype: torch.dtype,
             attention: str) -> cs.Problem:
    m = copy.deepcopy(model).to(dtype)
    return cs.Problem(m, loss, _converted(batches, dtype), attention=attention)


def _timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(name: str, model: nn.Module, loss: Any, batches: list, k: int,
            scales: list[float], seed: int) -> list[dict[str, Any]]:
    rows = []
    ref_problem = _problem(model, loss, batches, torch.float64, "math")
    P = ref_problem.num_params
    V64 = torch.randn(P, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact_op = cs.HessianOperator(ref_problem, engine="double_backward")
    HV, t_exact = _timed(lambda: exact_op @ V64)
    norms = HV.norm(dim=0)
    for dtype in (torch.float64, torch.float32):
        problem = _problem(model, loss, batches, dtype, "native")
        V = V64.to(dtype)
        exact_dtype = cs.HessianOperator(_problem(model, loss, batches, dtype, "math"),
                                         engine="double_backward")
        HV_dtype, t_exact_dtype = _timed(lambda op=exact_dtype, V=V: op @ V)
        exact_dtype_err = ((HV_dtype.double() - HV).norm(dim=0) / norms)
        for richardson in (True, False):
            for c in scales:
                default, fdmod.STEP_SCALE = fdmod.STEP_SCALE, c * fdmod.STEP_SCALE
                op = cs.HessianOperator(problem, engine="finite_difference", richardson=richardson)
                try:
                    out, t = _timed(lambda op=op, V=V: op @ V)
                finally:
                    fdmod.STEP_SCALE = default
                err = (out.double() - HV).norm(dim=0)
                est = op.last_error_estimate
                assert est is not None
                rel = err / norms
                rows.append({
                    "problem": name, "P": P, "dtype": str(dtype).replace("torch.", ""),
                    "richardson": richardson, "step_scale": c,
                    "c": c * fdmod.STEP_SCALE,
                    "rel_error_median": float(rel.median()), "rel_error_max": float(rel.max()),
                    "estimate_over_error_median": float((est / err.clamp_min(1e-300)).median()),
                    "estimate_covers_error": float((est >= err).double().mean()),
                    "gradients_per_column": 4 if richardson else 2,
                    "seconds_per_column": t / k, "exact_seconds_per_column": t_exact_dtype / k,
                    "exact_engine_rel_error_median": float(exact_dtype_err.median()),
                })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| problem | P | dtype | Richardson | c | rel. error (median / max) | estimate / error "
            "| estimate >= error | s/column (FD / exact) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['P']:,} | {r['dtype']} | {'yes' if r['richardson'] else 'no'} "
            f"| {r['c']:g} | {r['rel_error_median']:.1e} / {r['rel_error_max']:.1e} "
            f"| {r['estimate_over_error_median']:.2g} | {r['estimate_covers_error']:.0%} "
            f"| {r['seconds_per_column']:.3f} / {r['exact_seconds_per_column']:.3f} |")
    return "\n".join(lines)


def best_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The default step (scale 1 of the default c) of every problem, dtype and mode."""
    return [r for r in rows if r["step_scale"] == 1.0]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: 2 problems, c = 1")
    parser.add_argument("-k", type=int, default=4, help="random vectors per cell")
    parser.add_argument("--scales", type=float, nargs="*", default=None,
                        help="step scales in units of the default c (default 0.1 0.3 1 3 10; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scales = args.scales or ([1.0] if args.quick else [0.1, 0.3, 1.0, 3.0, 10.0])
    rows: list[dict[str, Any]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cs.AttentionBackendWarning)
        for name, (model, loss, batches) in problems(args.quick).items():
            rows += measure(name, model, loss, batches, args.k, scales, seed=0)
    print(table(rows))
    print(f"\nDefault step (c = {fdmod.STEP_SCALE:g}):\n")
    print(table(best_rows(rows)))
    result = {"benchmark": "bench_finite_difference", "device": "cpu", "k": args.k,
              "scales": scales, "default_c": fdmod.STEP_SCALE, "torch": torch.__version__,
              "platform": platform.platform(),
              "threads": args.threads, "rows": rows}
    out = args.out or RESULTS / "bench_finite_difference_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
