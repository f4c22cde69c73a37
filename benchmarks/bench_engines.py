"""The engine-choice table: Hessian kernel x model x columns, cost per column in gradients.

For every model (the zoo's Gaussian mixture, digits MLP, BatchNorm CNN, character transformer and
a width-8 ResNet-18 ("W1-tiny"), and HuggingFace BERT, GPT-2 and ViT and a timm ViT built from
configs, nothing downloaded) and every number of columns ``k`` (``--columns``, default 1,4,16,32),
it times ``HessianOperator(problem) @ X`` for ``X`` of shape ``[P, k]``:

* each exact kernel of :data:`curvscope.HESSIAN_KERNELS` forced, by putting its name into a fresh
  Problem's ``engine_choices`` for every ``k`` before the first product (the batched double
  backward of one column *is* the loop, so it has no ``k = 1`` row);
* ``engine="auto"`` on a fresh Problem: its steady-state cost, the kernel it chose, and the
  overhead of its first product (the timed trial on the first batch; at the first ``k`` also the
  one-time check of the double backward against finite differences);
* curvlinops' ``HessianLinearOperator`` (the peer, when installed; its constructor's determinism
  check is setup and not timed).

Units: seconds per column divided by the time of one full gradient over the same batches
(forward + ``loss.backward()`` per batch), i.e. **gradients per column**. Every cell is the
minimum of ``--repeats`` products after one untimed warm-up product. Beside every timing: the
process's peak resident set (VmHWM after resetting it through ``/proc/self/clear_refs``) and its
increase over the resident set before the product (on CUDA ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``); the shared-pass bound (a batched product of ``k`` columns
costs at least one forward and backward shared by the columns: ``1/k`` gradients per column) and
the fraction of the measured cost it accounts for; and the relative Frobenius difference of the
product to the double-backward loop's (float64 models: at most 1e-12, else the row says FAIL;
float32: at most ``10 sqrt(eps)``, auto's own agreement tolerance).

Run::

    python benchmarks/bench_engines.py                  # CPU, one thread, about 5 minutes
    python benchmarks/bench_engines.py --size tiny      # CI-sized: 2 zoo models, k = 1, 4
    python benchmarks/bench_engines.py --models gmm,bert --columns 1,8,64 --repeats 5

Prints a markdown table and a summary and writes ``benchmarks/results/bench_engines_<device>.json``
(``--out`` to change). Returns 1 when a correctness check failed, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import curvscope as cs
from curvscope import zoo

RESULTS = Path(__file__).parent / "results"
KERNELS: tuple[str, ...] = tuple(cs.HESSIAN_KERNELS)
LOOP = "double_backward_loop"
MIB = float(2**20)
TOL = {"float64": 1e-12, "float32": 10 * torch.finfo(torch.float32).eps ** 0.5}
ALL_MODELS = ("gmm", "digits_mlp", "cnn_bn", "char_transformer", "w1_tiny",
              "bert", "gpt2", "vit", "timm_vit")
TINY_MODELS = ("gmm", "cnn_bn")
#: curvlinops' product "differs" when its difference to the loop exceeds 10x the largest among
#: curvscope's kernels, and at least this
PEER_FLOOR = {"float64": 1e-12, "float32": 1e-5}


# ------------------------------------------------------------------------------ models
@dataclass
class Model:
    """A model as given to curvscope, and how curvlinops is given the same objective."""

    name: str
    model: nn.Module
    loss_fn: Any
    batches: list
    #: curvlinops' ``(model_func, loss_func, data, kwargs)``; ``None``: the same as curvscope's
    peer: tuple[nn.Module, Any, list, dict[str, Any]] | None = None
    note: str = ""
    problem_kwargs: dict[str, Any] = field(default_factory=dict)

    def problem(self) -> cs.Problem:
        return cs.Problem(self.model, self.loss_fn, self.batches, **self.problem_kwargs)


class LogitsOf(nn.Module):
    """``model(**X).logits`` (or ``model(X).logits``) as a module: curvlinops calls ``f(X)`` and
    needs a tensor. The parameters are the wrapped model's own tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, X: Any) -> torch.Tensor:
        out = self.model(**X) if isinstance(X, dict) else self.model(X)
        return out.logits


def _split(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]


def _hf_peer(model: nn.Module, loss_fn: Any, batches: list[dict], key: str) -> tuple:
    data = [_split(b) for b in batches]
    return (LogitsOf(model), loss_fn, data, {"batch_size_fn": lambda X: X[key].shape[0]})


def _zoo(zp: zoo.ZooProblem, name: str | None = None) -> Model:
    return Model(name or zp.name, zp.model.eval(), zp.loss_fn, zp.batches)


def build_gmm() -> Model:
    return _zoo(zoo.gaussian_mixture(10, seed=0))


def build_digits_mlp() -> Model:
    return _zoo(zoo.digits_mlp(seed=0))


def build_cnn_bn() -> Model:
    return _zoo(zoo.synthetic_images_cnn(seed=0))


def build_char_transformer() -> Model:
    """The zoo's character transformer on windows every 8 characters (103 windows of 32 in 2
    batches instead of 412 in 4: the same model, a quarter of the data, to keep the run short)."""
    zp = zoo.char_transformer(stride=8, batch_size=64, seed=0)
    return _zoo(zp, f"{zp.name} (stride 8)")


def build_w1_tiny() -> Model:
    zp = zoo.synthetic_images_resnet18(10, n=64, batch_size=32, size=16, width=8,
                                       dtype=torch.float32, seed=0)
    return _zoo(zp, "W1-tiny: resnet18(width=8), 64 x 3x16x16")


def _tokens(n_batches: int, n: int, length: int, vocab: int, seed: int,
            pad: bool) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, vocab, (n, length), generator=g)
        mask = torch.ones(n, length, dtype=torch.long)
        if pad:
            lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
            lengths[0] = length
            mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
            ids = ids.masked_fill(mask == 0, 0)
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def build_bert() -> Model:
    """BertForSequenceClassification: 2 layers of width 64, 2 padded batches of 8 x 16 tokens."""
    from curvscope.testing import import_transformers

    transformers = import_transformers()
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=16, type_vocab_size=1, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).double().eval()
    g = torch.Generator().manual_seed(1)
    batches = [{**b, "labels": torch.randint(0, 3, (8,), generator=g)}
               for b in _tokens(2, 8, 16, 100, seed=2, pad=True)]
    loss = nn.CrossEntropyLoss()
    return Model("HF BertForSequenceClassification", model, loss, batches,
                 peer=_hf_peer(model, loss, batches, "input_ids"))


def build_gpt2() -> Model:
    """GPT2LMHeadModel (tied embeddings): 2 layers of width 64, 2 batches of 8 x 16 tokens.

    No padding: every batch has the same number of counted tokens, so curvscope's token-count
    batch weights and curvlinops' example-count weights define the same risk."""
    from curvscope.testing import import_transformers

    transformers = import_transformers()
    config = transformers.GPT2Config(vocab_size=100, n_positions=16, n_embd=64, n_layer=2,
                                     n_head=4, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    batches = [{**b, "labels": b["input_ids"].clone()}
               for b in _tokens(2, 8, 16, 100, seed=3, pad=False)]
    loss = cs.CausalLMLoss()
    return Model("HF GPT2LMHeadModel", model, loss, batches,
                 peer=_hf_peer(model, loss, batches, "input_ids"))


def build_vit() -> Model:
    """ViTForImageClassification: 3x16x16 images, patch 4, 2 layers of width 64, float32."""
    from curvscope.testing import import_transformers

    transformers = import_transformers()
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    g = torch.Generator().manual_seed(4)
    batches = [{"pixel_values": torch.randn(8, 3, 16, 16, generator=g),
                "labels": torch.randint(0, 10, (8,), generator=g)} for _ in range(2)]
    loss = nn.CrossEntropyLoss()
    return Model("HF ViTForImageClassification", model, loss, batches,
                 peer=_hf_peer(model, loss, batches, "pixel_values"))


def build_timm_vit() -> Model:
    """timm vit_tiny_patch16_224 shrunk: 3x32x32 images, patch 8, 2 blocks of width 64, float32."""
    from curvscope.testing import import_timm

    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                              num_classes=10).eval()
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
               for _ in range(2)]
    return Model("timm vit_tiny_patch16_224 (32 px, patch 8, width 64)", model,
                 nn.CrossEntropyLoss(), batches)


BUILDERS: dict[str, Callable[[], Model]] = {
    "gmm": build_gmm, "digits_mlp": build_digits_mlp, "cnn_bn": build_cnn_bn,
    "char_transformer": build_char_transformer, "w1_tiny": build_w1_tiny, "bert": build_bert,
    "gpt2": build_gpt2, "vit": build_vit, "timm_vit": build_timm_vit,
}


# ------------------------------------------------------------------------------ measuring
def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of one call: the process's resident-set high-water mark (Linux) and, on CUDA,
    ``torch.cuda.max_memory_allocated``; each beside its increase over the start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss0: int | None = None
        self.cuda0: int | None = None

    def start(self) -> None:
        self.rss0 = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.rss0 = _status_kib("VmRSS")
        except OSError:
            pass
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda0 = int(torch.cuda.memory_allocated(self.device))

    def stop(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {"peak_mib": None, "increase_mib": None}
        hwm = _status_kib("VmHWM") if self.rss0 is not None else None
        if hwm is not None and self.rss0 is not None:
            out = {"peak_mib": hwm / 1024, "increase_mib": (hwm - self.rss0) / 1024}
        if self.device.type == "cuda" and self.cuda0 is not None:
            peak = int(torch.cuda.max_memory_allocated(self.device))
            out["cuda_peak_mib"] = peak / MIB
            out["cuda_increase_mib"] = (peak - self.cuda0) / MIB
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _once(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, dict]:
    mem = PeakMemory(device)
    mem.start()
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    seconds = time.perf_counter() - t0
    return out, seconds, mem.stop()


def _merge_memory(samples: list[dict]) -> dict[str, float | None]:
    """The largest peak and the largest increase over the timed calls."""
    merged: dict[str, float | None] = {}
    for key in samples[0]:
        values = [s[key] for s in samples if s.get(key) is not None]
        merged[key] = max(values) if values else None
    return merged


def timed(fn: Callable[[], Any], repeats: int, device: torch.device,
          warm_up: bool = True) -> dict[str, Any]:
    """``fn`` once untimed (its time is kept as ``first_seconds``), then ``repeats`` times: the
    minimum, every time, the memory and the last output."""
    first = None
    if warm_up:
        _, first, _ = _once(fn, device)
    times, mems, out = [], [], None
    for _ in range(repeats):
        out, seconds, mem = _once(fn, device)
        times.append(seconds)
        mems.append(mem)
    return {"seconds": min(times), "times": times, "first_seconds": first,
            "memory": _merge_memory(mems), "out": out}


def gradient_seconds(problem: cs.Problem, repeats: int, device: torch.device) -> float:
    """One full gradient over the Problem's batches: forward + ``loss.backward()`` per batch."""
    model = problem.model
    params = [p for p in model.parameters() if p.requires_grad]

    def full_gradient() -> None:
        for p in params:
            p.grad = None
        for batch in problem.data:
            inputs, target = problem.batch_fn(batch)
            if isinstance(inputs, dict):
                out = model(**inputs)
            elif isinstance(inputs, tuple):
                out = model(*inputs)
            else:
                out = model(inputs)
            problem.loss_fn(problem.output_fn(out), target).backward()

    try:
        return timed(full_gradient, repeats, device)["seconds"]
    finally:
        for p in params:
            p.grad = None


def forced_operator(m: Model, kernel: str, columns: list[int]) -> cs.HessianOperator:
    """``HessianOperator`` on a fresh Problem whose engine table names ``kernel`` for every k."""
    problem = m.problem()
    H = cs.HessianOperator(problem)
    for k in columns:
        problem.engine_choices[H._choice_key(k)] = {
            "engine": kernel, "seconds_per_column": {}, "columns": k, "examples": 0,
            "peak_extra_bytes": None}
    return H


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-300))


@contextlib.contextmanager
def _math_sdpa() -> Iterator[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:160]


def _fallback_notes(caught: list[warnings.WarningMessage]) -> list[str]:
    return sorted({_first_line(w.message)  # type: ignore[arg-type]
                   for w in caught if issubclass(w.category, cs.EngineFallbackWarning)})


# ------------------------------------------------------------------------------ one model
def measure_model(key: str, columns: list[int], repeats: int, device: torch.device,
                  peer: bool) -> list[dict[str, Any]]:
    try:
        m = BUILDERS[key]()
        if device.type != "cpu":
            _to_device(m, device)
        problem = m.problem()
    except Exception as err:  # noqa: BLE001 - a model that cannot be built is a row, not a crash
        return [{"key": key, "model": key, "kernel": None, "status": "skipped",
                 "reason": _first_line(err)}]
    P, dtype = problem.num_params, str(problem.dtype).replace("torch.", "")
    tol = TOL.get(dtype, TOL["float32"])
    grad_s = gradient_seconds(problem, repeats, device)
    base = {"key": key, "model": m.name, "P": P, "dtype": dtype, "examples": problem.num_data,
            "batches": len(m.batches), "gradient_seconds": grad_s}
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(P, max(columns), generator=gen, dtype=torch.float64).to(
        device=device, dtype=problem.dtype)
    reference: dict[int, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []

    def row(kernel: str, k: int, cell: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
        r: dict[str, Any] = {**base, "kernel": kernel, "k": k, **extra}
        if cell is None:
            rows.append(r)
            return r
        per_col = cell["seconds"] / k
        grads = per_col / grad_s
        r.update({"status": r.get("status", "ok"), "seconds_per_column": per_col,
                  "gradients_per_column": grads, "times": cell["times"],
                  "first_product_seconds": cell["first_seconds"],
                  "bound_gradients_per_column": 1.0 / k,
                  "bound_fraction": (1.0 / k) / grads, **cell["memory"]})
        out = cell["out"]
        if kernel == LOOP:
            reference[k] = out
        if k in reference:
            r["rel_diff_to_loop"] = rel_diff(out, reference[k])
            if kernel != "curvlinops" and r["rel_diff_to_loop"] > tol:
                r["status"] = "FAIL"
            if kernel == "curvlinops":  # beyond the rounding spread of curvscope's own kernels?
                spread = max([q.get("rel_diff_to_loop", 0.0) for q in rows
                              if q.get("k") == k and q["kernel"] != "curvlinops"], default=0.0)
                r["differs_threshold"] = max(10 * spread, PEER_FLOOR.get(dtype, 1e-5))
                r["differs"] = r["rel_diff_to_loop"] > r["differs_threshold"]
        rows.append(r)
        return r

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cs.AttentionBackendWarning)
        # ---- every kernel forced
        for kernel in KERNELS:
            ks = [k for k in columns if k > 1 or kernel != "double_backward_batched"]
            H = forced_operator(m, kernel, ks)
            for k in ks:
                Xk = X[:, :k].contiguous()
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", cs.EngineFallbackWarning)
                        cell = timed(lambda H=H, Xk=Xk: H @ Xk, repeats, device)
                except Exception as err:  # noqa: BLE001 - reported in the row
                    row(kernel, k, None, status="error", reason=_first_line(err))
                    continue
                notes = _fallback_notes(caught)
                row(kernel, k, cell, **({"notes": notes} if notes else {}))
        # ---- auto on a fresh Problem: first product (with the trial) timed, then steady state
        problem = m.problem()
        H = cs.HessianOperator(problem)
        for i, k in enumerate(columns):
            Xk = X[:, :k].contiguous()
            try:
                _, first, _ = _once(lambda H=H, Xk=Xk: H @ Xk, device)
                cell = timed(lambda H=H, Xk=Xk: H @ Xk, repeats, device, warm_up=False)
            except Exception as err:  # noqa: BLE001
                row("auto", k, None, status="error", reason=_first_line(err))
                continue
            record = problem.engine_choices.get(H._choice_key(k), {})
            overhead = first - cell["seconds"]
            row("auto", k, cell, chosen=record.get("engine", H.active_engine),
                trial=record.get("seconds_per_column"),
                auto_first_product_seconds=first, first_product_overhead_seconds=overhead,
                first_product_overhead_gradients=overhead / grad_s,
                overhead_includes_fd_check=i == 0)
        # ---- curvlinops
        if peer:
            curvlinops_rows(m, problem, columns, X, repeats, device, row)
    return rows


def curvlinops_rows(m: Model, problem: cs.Problem, columns: list[int], X: torch.Tensor,
                    repeats: int, device: torch.device, row: Callable[..., dict]) -> None:
    """curvlinops' ``HessianLinearOperator`` on the same objective (rows are added by ``row``)."""
    try:
        import curvlinops
        from curvlinops import HessianLinearOperator
    except ImportError as err:
        for k in columns:
            row("curvlinops", k, None, status="not installed", reason=_first_line(err))
        return
    model_func, loss_fn, data, kwargs = m.peer or (m.model, m.loss_fn, m.batches, {})
    named = dict(m.model.named_parameters())
    params = [named[n] for n in problem.param_space.names]  # curvscope's order
    notes = [f"curvlinops {_version('curvlinops-for-pytorch') or curvlinops.__name__}"]
    try:
        t0 = time.perf_counter()
        try:
            op = HessianLinearOperator(model_func, loss_fn, params, data, **kwargs)
        except Exception as err:  # noqa: BLE001 - e.g. the determinism check on a fused kernel
            notes.append(f"determinism check failed ({_first_line(err)}); built without it")
            op = HessianLinearOperator(model_func, loss_fn, params, data,
                                       check_deterministic=False, **kwargs)
        setup = time.perf_counter() - t0
    except Exception as err:  # noqa: BLE001
        for k in columns:
            row("curvlinops", k, None, status="error", reason=_first_line(err))
        return
    # curvlinops' own kernels first; where they fail (no forward-mode rule for a fused attention
    # kernel), SDPA's math path, as curvscope takes it, for this and every later product
    state: dict[str, Callable[[], Any]] = {"context": contextlib.nullcontext}

    def product(Xk: torch.Tensor) -> torch.Tensor:
        with state["context"]():
            return op @ Xk

    for k in columns:
        Xk = X[:, :k].contiguous()
        try:
            try:
                cell = timed(lambda Xk=Xk: product(Xk), repeats, device)
            except Exception as err:  # noqa: BLE001
                if state["context"] is not contextlib.nullcontext:
                    raise
                notes.append(f"native kernels failed ({_first_line(err)}); SDPA on its math path")
                state["context"] = _math_sdpa
                cell = timed(lambda Xk=Xk: product(Xk), repeats, device)
        except Exception as err:  # noqa: BLE001
            row("curvlinops", k, None, status="error", reason=_first_line(err))
            continue
        row("curvlinops", k, cell, setup_seconds=setup, notes=list(notes))


def _to_device(m: Model, device: torch.device) -> None:
    def move(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj.to(device)
        if isinstance(obj, dict):
            return {k: move(v) for k, v in obj.items()}
        if isinstance(obj, (tuple, list)):
            return type(obj)(move(v) for v in obj)
        return obj

    m.model.to(device)
    m.batches = move(m.batches)
    if m.peer is not None:
        model_func, loss_fn, data, kwargs = m.peer
        m.peer = (model_func, loss_fn, move(data), kwargs)


# ------------------------------------------------------------------------------ reporting
def _label(r: dict[str, Any]) -> str:
    return f"auto -> {r['chosen']}" if r["kernel"] == "auto" and "chosen" in r else r["kernel"]


def _cl_seconds(rows: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    return {(r["key"], r["k"]): r["seconds_per_column"] for r in rows
            if r.get("kernel") == "curvlinops" and "seconds_per_column" in r}


def _mem(r: dict[str, Any]) -> str:
    if r.get("cuda_peak_mib") is not None:
        return f"{r['cuda_peak_mib']:.1f} (+{r['cuda_increase_mib']:.1f}) GPU"
    if r.get("peak_mib") is None:
        return "n/a"
    return f"{r['peak_mib']:.0f} (+{r['increase_mib']:.1f})"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | P | dtype | kernel | k | s/column | gradients/column "
            "| bound 1/k (bound / measured) | peak MiB (+increase) | vs curvlinops "
            "| rel. diff to loop |")
    lines = [head, "|" + "---|" * 11]
    cl = _cl_seconds(rows)
    for r in rows:
        if r.get("status") == "skipped":
            lines.append(f"| {r['model']} | | | skipped: {r['reason']} | | | | | | | |")
            continue
        if "seconds_per_column" not in r:
            lines.append(f"| {r['model']} | {r['P']:,} | {r['dtype']} | {r['kernel']} | {r['k']} "
                         f"| {r['status']}: {r.get('reason', '')} | | | | | |")
            continue
        peer = cl.get((r["key"], r["k"]))
        vs = "" if r["kernel"] == "curvlinops" or peer is None else \
            f"{peer / r['seconds_per_column']:.2f}x"
        diff = r.get("rel_diff_to_loop")
        dtext = "" if diff is None else f"{diff:.1e}"
        if r["status"] == "FAIL":
            dtext += " FAIL"
        elif r.get("differs"):
            dtext += " **differs**"
        notes = " (fell back)" if r.get("notes") and r["kernel"] != "curvlinops" else ""
        if r["kernel"] == "curvlinops" and any("math path" in n for n in r.get("notes", [])):
            notes = " (math SDPA)"
        lines.append(
            f"| {r['model']} | {r['P']:,} | {r['dtype']} | {_label(r)}{notes} | {r['k']} "
            f"| {r['seconds_per_column']:.2e} | {r['gradients_per_column']:.2f} "
            f"| {1 / r['k']:.3g} ({r['bound_fraction']:.0%}) | {_mem(r)} | {vs} | {dtext} |")
    return "\n".join(lines)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and k: the fastest forced kernel, auto's choice and cost, auto vs curvlinops."""
    out = []
    cl = _cl_seconds(rows)
    cells = sorted({(r["key"], r["k"]) for r in rows if "k" in r},
                   key=lambda c: (ALL_MODELS.index(c[0]) if c[0] in ALL_MODELS else 99, c[1]))
    for key, k in cells:
        mine = [r for r in rows if r["key"] == key and r.get("k") == k
                and "seconds_per_column" in r]
        forced = {r["kernel"]: r["seconds_per_column"] for r in mine
                  if r["kernel"] in KERNELS and not r.get("notes")}
        auto = next((r for r in mine if r["kernel"] == "auto"), None)
        if not forced or auto is None:
            continue
        fastest = min(forced, key=forced.__getitem__)
        chosen = auto.get("chosen")
        chosen_forced = forced.get(chosen)
        s: dict[str, Any] = {
            "key": key, "model": auto["model"], "k": k, "fastest": fastest,
            "fastest_gradients_per_column": forced[fastest] / auto["gradient_seconds"],
            "auto_chose": chosen,
            "chosen_over_fastest": None if chosen_forced is None else chosen_forced / forced[fastest],
            "auto_over_fastest": auto["seconds_per_column"] / forced[fastest],
            "auto_over_curvlinops": (auto["seconds_per_column"] / cl[(key, k)]
                                     if (key, k) in cl else None),
            "trial_overhead_gradients": auto["first_product_overhead_gradients"],
            "overhead_includes_fd_check": auto["overhead_includes_fd_check"],
            "curvlinops_beats_every_kernel": (key, k) in cl and cl[(key, k)] < min(forced.values()),
        }
        s["auto_within_10_percent"] = (s["chosen_over_fastest"] is not None
                                       and s["chosen_over_fastest"] <= 1.10)
        out.append(s)
    return out


def summary_table(summary: list[dict[str, Any]]) -> str:
    lines = ["| model | k | fastest kernel (gradients/column) | auto chose | chosen / fastest "
             "(auto measured / fastest) | within 10 % | auto / curvlinops "
             "| auto's first-product overhead (gradients) |", "|" + "---|" * 8]
    for s in summary:
        vs_cl = "" if s["auto_over_curvlinops"] is None else f"{s['auto_over_curvlinops']:.2f}"
        if s["curvlinops_beats_every_kernel"]:
            vs_cl += " (curvlinops beats every kernel)"
        cof = "n/a" if s["chosen_over_fastest"] is None else f"{s['chosen_over_fastest']:.2f}"
        lines.append(
            f"| {s['model']} | {s['k']} | {s['fastest']} ({s['fastest_gradients_per_column']:.2f}) "
            f"| {s['auto_chose']} | {cof} ({s['auto_over_fastest']:.2f}) "
            f"| {'yes' if s['auto_within_10_percent'] else '**no**'} | {vs_cl} "
            f"| {s['trial_overhead_gradients']:.1f}{' *' if s['overhead_includes_fd_check'] else ''} |")
    lines.append("\n\\* includes the one-time check of the double backward against finite "
                 "differences, which auto's first product on an operator does.")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    info: dict[str, Any] = {
        "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
        "python": sys.version.split()[0], "torch": torch.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    info["packages"] = {name: _version(name) for name in
                        ("curvlinops-for-pytorch", "transformers", "timm", "scikit-learn")}
    return info


def _version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------ main
def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4,16, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("default", "tiny"), default="default",
                        help="tiny: CI-sized, 2 zoo models and columns 1,4")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated, from {','.join(ALL_MODELS)} (default: all; "
                             f"tiny: {','.join(TINY_MODELS)})")
    parser.add_argument("--columns", type=_int_list, default=None,
                        help="column counts k (default 1,4,16,32; tiny: 1,4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed products per cell (min)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-curvlinops", action="store_true", help="skip the peer")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    tiny = args.size == "tiny"
    models = (args.models.split(",") if args.models else list(TINY_MODELS if tiny else ALL_MODELS))
    unknown = [m for m in models if m not in BUILDERS]
    if unknown:
        parser.error(f"unknown models {unknown}; expected some of {list(ALL_MODELS)}")
    columns = args.columns or ([1, 4] if tiny else [1, 4, 16, 32])
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine()
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for key in models:
        t0 = time.perf_counter()
        new = measure_model(key, columns, args.repeats, device, not args.no_curvlinops)
        rows += new
        print(f"[{key}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
    info["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    summary = summarize(rows)
    print(table(rows))
    print()
    print(summary_table(summary))
    failed = [r for r in rows if r.get("status") == "FAIL"]
    for r in failed:
        print(f"FAIL: {r['model']} {r['kernel']} k={r['k']}: relative difference to the loop "
              f"{r['rel_diff_to_loop']:.1e} > {TOL.get(r['dtype'], TOL['float32']):.0e}")
    result = {"benchmark": "bench_engines", "device": device.type,
              "args": {**vars(args), "out": str(args.out) if args.out else None,
                       "models": models, "columns": columns},
              "machine": info, "threads": args.threads, "kernels": list(KERNELS),
              "tolerance": TOL, "wall_seconds": time.perf_counter() - start,
              "rows": rows, "summary": summary}
    out = args.out or RESULTS / f"bench_engines_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
