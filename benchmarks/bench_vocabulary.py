"""Gauss-Newton and Fisher products of a language model with a 50k vocabulary: memory and time.

The output-space Hessian of the token cross-entropy is ``diag(p) - p p^T`` per token, a
``V x V`` block: materialised for ``tokens`` positions that would be ``tokens * V^2`` numbers
(32 tokens x 50,257^2 x 4 bytes = 323 GB). curvscope applies it in closed form,
``p * u - p (p . u)``, ``O(k * tokens * V)``. This script measures, on a GPT-2-shaped model with
GPT-2's vocabulary (tiny width, tied embeddings; no transformers needed), the peak memory of one
``G @ V`` and ``F @ V`` beside that of one gradient, and the time of each, for ``k`` columns.

Run::

    python benchmarks/bench_vocabulary.py            # CPU, about a minute
    python benchmarks/bench_vocabulary.py --quick    # vocabulary 5,000

Prints a markdown table and writes ``benchmarks/results/bench_vocabulary_cpu.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
import tracemalloc
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import curvscope as cs

RESULTS = Path(__file__).parent / "results"


class TinyGPT(nn.Module):
    """Embedding (tied LM head), one causal attention block, GPT-2's vocabulary."""

    def __init__(self, vocab: int, d: int = 16, context: int = 16) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.ln = nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        x = self.wte(ids) + self.wpe(torch.arange(T, device=ids.device))
        q, k, v = self.qkv(self.ln(x)).view(B, T, 3, 2, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
        return self.head(x + self.proj(a))


def _peak_bytes(fn: Any) -> tuple[float, int]:
    """Wall time and peak of torch's CPU allocations during ``fn``, above what was live before
    (from the profiler's memory accounting of the leaf operators: allocations add, frees
    subtract)."""
    gc.collect()
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    seconds = time.perf_counter() - t0
    # leaf events only: a parent's memory usage includes its children's
    events = sorted((e for e in prof.events() if not e.cpu_children),
                    key=lambda e: e.time_range.start)
    live, peak = 0, 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return seconds, peak


def measure(vocab: int, k: int, batch: int, T: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = TinyGPT(vocab, context=T).eval()
    ids = torch.randint(0, vocab, (batch, T))
    labels = ids.clone()
    labels[0, T // 2:] = -100  # padding
    problem = cs.Problem(model, cs.CausalLMLoss(), [(ids, labels)])
    V = torch.randn(problem.num_params, k)
    G, Fm = cs.GGNOperator(problem), cs.FisherMCOperator(problem, seed=0)
    problem.loss_and_gradient()  # warm up
    t_grad, m_grad = _peak_bytes(problem.loss_and_gradient)
    t_ggn, m_ggn = _peak_bytes(lambda: G @ V)
    t_fisher, m_fisher = _peak_bytes(lambda: Fm @ V)
    tokens = int((labels[:, 1:] != -100).sum())
    return {
        "vocab": vocab, "P": problem.num_params, "sequences": batch, "T": T,
        "counted_tokens": tokens, "k": k,
        "dense_output_hessian_bytes": batch * T * vocab * vocab * 4,
        "logits_bytes": batch * T * vocab * 4,
        "gradient": {"seconds": t_grad, "peak_bytes": m_grad},
        "ggn": {"seconds": t_ggn, "peak_bytes": m_ggn},
        "fisher_mc": {"seconds": t_fisher, "peak_bytes": m_fisher},
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| V | P | tokens | k | dense H_l would be | logits | peak: gradient / GGN / Fisher "
             "| seconds: gradient / GGN / Fisher |", "|" + "---|" * 8]
    for r in rows:
        mib = {n: r[n]["peak_bytes"] / 2**20 for n in ("gradient", "ggn", "fisher_mc")}
        sec = {n: r[n]["seconds"] for n in ("gradient", "ggn", "fisher_mc")}
        lines.append(
            f"| {r['vocab']:,} | {r['P']:,} | {r['sequences']}x{r['T']} | {r['k']} "
            f"| {r['dense_output_hessian_bytes'] / 1e9:,.0f} GB | {r['logits_bytes'] / 2**20:.1f} MiB "
            f"| {mib['gradient']:.0f} / {mib['ggn']:.0f} / {mib['fisher_mc']:.0f} MiB "
            f"| {sec['gradient']:.2f} / {sec['ggn']:.2f} / {sec['fisher_mc']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="vocabulary 5,000 only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tracemalloc.stop()
    rows = [measure(5_000, 4, 2, 16)] if args.quick else [
        measure(50_257, 1, 2, 16), measure(50_257, 4, 2, 16)]
    print(table(rows))
    result = {"benchmark": "bench_vocabulary", "device": "cpu", "torch": torch.__version__,
              "platform": platform.platform(), "rows": rows}
    out = args.out or RESULTS / "bench_vocabulary_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
