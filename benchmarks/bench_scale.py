"""How the cost of curvature products grows: time and memory vs parameter count and data size.

For MLPs of growing width (parameter counts from ~1e4 up to ~1e7 with --size large) and growing
data, it measures in one run on one device:

* one gradient over the data (the unit of cost),
* one Hessian-vector product (double-backward engine) and one batched product of k columns
  (forward-over-reverse, vmapped) per vector, and a GGN product per vector,
* a 20-step Lanczos with the basis on the device vs in host memory (peak device memory),
* bf16 products accumulated in float32 vs float32 products (relative error).

Prints a markdown table, writes ``benchmarks/results/bench_scale_<device>.json`` and a PNG plot of
time per product vs parameter count. Run: ``python benchmarks/bench_scale.py [--device cuda]
[--size small|medium|large]``. Absolute times hold only for the machine; compare ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch
from torch import nn

import curvscope as cs

SIZES = {"small": [32, 128, 512], "medium": [64, 256, 1024, 2048], "large": [256, 1024, 2048, 4096]}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats=3):
    fn()  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_problem(width, n, device, dtype, batch=256, classes=10, dim=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                          nn.Linear(width, classes)).to(device=device, dtype=dtype)
    batches = [(x[i:i + batch].to(device, dtype), y[i:i + batch].to(device))
               for i in range(0, n, batch)]
    return cs.Problem(model, nn.CrossEntropyLoss(), batches)


def measure(width, n, device, k):
    p = make_problem(width, n, device, torch.float32)
    P = p.num_params
    row = {"width": width, "params": P, "examples": n}
    row["gradient_s"] = _timed(lambda: p.loss_and_gradient(), device)
    H_db = cs.HessianOperator(p, engine="double_backward")
    H = cs.HessianOperator(p)
    G = cs.GGNOperator(p)
    v = torch.randn(P, device=device)
    V = torch.randn(P, k, device=device)
    row["hvp_single_s"] = _timed(lambda: H_db @ v, device)
    row["hvp_batched_per_vector_s"] = _timed(lambda: H @ V, device) / k
    row["ggn_batched_per_vector_s"] = _timed(lambda: G @ V, device) / k
    _peak_reset(device)
    H @ V
    row["batched_product_peak_bytes"] = _peak(device)
    for basis in ("device", "host"):
        _peak_reset(device)
        t = time.perf_counter()
        cs.lanczos(H, 20, num_probes=1, basis=basis, generator=torch.Generator().manual_seed(0))
        _sync(device)
        row[f"lanczos20_{basis}_s"] = time.perf_counter() - t
        row[f"lanczos20_{basis}_peak_bytes"] = _peak(device)
    # bf16 products accumulated in float32, vs float32 products
    pb = make_problem(width, n, device, torch.bfloat16)
    pb_acc = cs.Problem(pb.model, pb.loss_fn, pb.data, accumulate_dtype=torch.float32)
    Hb = cs.HessianOperator(pb_acc, engine="double_backward")
    ref = H_db @ v
    row["bf16_rel_error"] = float((Hb @ v - ref).norm() / ref.norm())
    row["bf16_hvp_single_s"] = _timed(lambda: Hb @ v, device)
    for key in ("hvp_single_s", "hvp_batched_per_vector_s", "ggn_batched_per_vector_s"):
        row[key[:-2] + "_x_gradient"] = row[key] / row["gradient_s"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("-k", type=int, default=16, help="columns of the batched product")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [measure(w, 1024, device, args.k) for w in SIZES[args.size]]
    widths = SIZES[args.size]
    rows += [measure(widths[len(widths) // 2], n, device, args.k) for n in (256, 4096)]
    cols = ["params", "examples", "gradient_s", "hvp_single_x_gradient",
            "hvp_batched_per_vector_x_gradient", "ggn_batched_per_vector_x_gradient",
            "lanczos20_device_s", "lanczos20_host_s", "bf16_rel_error"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c])
                                for c in cols) + " |")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "device": str(device), "platform": platform.platform(),
            "threads": args.threads, "k": args.k, "size": args.size}
    (out / f"bench_scale_{device.type}.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                                    indent=1))
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    by_p = [r for r in rows if r["examples"] == 1024]
    for key, label in (("gradient_s", "gradient"), ("hvp_single_s", "HVP, one vector"),
                       ("hvp_batched_per_vector_s", f"HVP, batched x{args.k}, per vector"),
                       ("ggn_batched_per_vector_s", f"GGN, batched x{args.k}, per vector")):
        ax.loglog([r["params"] for r in by_p], [r[key] for r in by_p], "o-", label=label)
    ax.set_xlabel("parameters")
    ax.set_ylabel("seconds per product (1024 examples)")
    ax.set_title(f"curvscope cost vs size ({device})")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(out / f"bench_scale_{device.type}.png", dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
