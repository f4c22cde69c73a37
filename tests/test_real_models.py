"""Real model families under DEFAULT settings: HuggingFace GPT-2 / BERT / ViT, timm ViT, torchvision
ResNet, ``nn.TransformerEncoderLayer`` and a raw ``F.scaled_dot_product_attention`` model.

Each family: a tiny float64 model, ``cs.Problem(model, loss, data)`` with nothing but the defaults,
and (a) ``H @ V`` against an independent reference (the dense Hessian of ``curvscope.testing.dense``
for ``P <= 1500``, else central differences of the full-data gradient with a step study), (b)
``GGNOperator @ V`` against ``J^T H_l J V`` (dense, or by ``torch.func.jvp`` / ``vjp`` and the loss
Hessian by autograd), (c) ``eigsh(H, 5)`` converged with measured residuals. Every reference is
plain autograd / ``torch.func`` on SDPA's math backend with the Transformer fast path off, written
here without curvscope's operators. A family whose package does not import is skipped with the
error. Then the run files in ``examples/`` (slow: the full analysis) and
``curvscope.testing.import_torchvision`` / ``import_timm``.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import curvscope as cs
from conftest import rel_err
from curvscope.cli import main as cli_main
from curvscope.testing import (
    dense_ggn,
    dense_hessian,
    import_timm,
    import_torchvision,
    import_transformers,
    matching_torchvision,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
F64 = torch.float64
RTOL = 1e-7  # the bound; dense references agree to ~1e-13, finite differences to ~1e-9


def _require(importer: Callable[[], Any]) -> Any:
    """The package, or a skip that says why it does not import (never a silent pass)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the CUDA-torchvision note
            return importer()
    except ImportError as err:
        pytest.skip(f"{importer.__name__}() failed: {err}")


@contextlib.contextmanager
def math_attention():
    """Reference computations: SDPA on its math backend (twice differentiable), fast path off."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


# ----------------------------------------------------------------------------- the families
@dataclass
class Family:
    """A tiny model with its data, as given to curvscope, and what the references need.

    ``ref_batches`` are ``(inputs, target)`` pairs; the reference loss is
    ``sum_b w_b * ref_loss(logits_b, target_b)`` with ``w_b = n_b / N`` (examples) for
    ``reduction="mean"`` and ``w_b = 1`` for ``"sum"`` (GPT-2, whose ``ref_loss`` divides its token
    sum by the dataset's token count): the convention of ``curvscope.testing.dense``.
    """

    model: nn.Module
    loss_fn: Any
    batches: list
    ref_batches: list
    ref_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    reduction: str
    reference: str  # "dense" or "fd"

    @property
    def weights(self) -> list[float]:
        sizes = [int(y.shape[0]) for _, y in self.ref_batches]
        return [1.0 if self.reduction == "sum" else n / sum(sizes) for n in sizes]


def _split(batch: dict) -> tuple[dict, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]


def _padded_tokens(sizes: list[int], length: int, vocab: int, seed: int, first: int = 0) -> list[dict]:
    """Dict batches of right-padded token sequences (pad id 0, at least 3 real tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        ids = torch.randint(first, vocab, (n, length), generator=g)
        lengths = torch.randint(3, length + 1, (n,), generator=g)
        lengths[0] = length
        mask = torch.arange(length)[None, :] < lengths[:, None]
        out.append({"input_ids": ids.masked_fill(~mask, 0), "attention_mask": mask.long()})
    return out


def _classification_labels(batches: list[dict], classes: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{**b, "labels": torch.randint(0, classes, (len(b["input_ids"]),), generator=g)}
            for b in batches]


def gpt2_family() -> Family:
    """GPT2LMHeadModel (tied embeddings), padded sequences, labels -100 at padding, CausalLMLoss."""
    transformers = _require(import_transformers)
    config = transformers.GPT2Config(vocab_size=11, n_positions=6, n_embd=4, n_layer=1, n_head=2,
                                     initializer_range=0.4, attn_pdrop=0.0, resid_pdrop=0.0,
                                     embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                     tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    batches = _padded_tokens([3, 3, 2], 6, 11, seed=1, first=1)
    batches = [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)}
               for b in batches]
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

    def ref_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # HF's convention written out: position t predicts token t + 1; mean over all counted tokens
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum") / tokens

    return Family(model, cs.CausalLMLoss(), batches, [_split(b) for b in batches], ref_loss, "sum",
                  "dense")


def bert_eager_family() -> Family:
    """The same BERT with transformers' "eager" attention (written-out softmax, no SDPA)."""
    return bert_family("eager")


def bert_family(attention: str = "sdpa") -> Family:
    """BertForSequenceClassification, padded dict batches with attention_mask, CrossEntropyLoss."""
    transformers = _require(import_transformers)
    config = transformers.BertConfig(attn_implementation=attention, vocab_size=12, hidden_size=4,
                                     num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=8,
                                     max_position_embeddings=6, type_vocab_size=1, num_labels=3,
                                     initializer_range=0.4, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).double().eval()
    assert model.config._attn_implementation == attention
    batches = _classification_labels(_padded_tokens([4, 4, 3], 6, 12, seed=2, first=1), 3, seed=3)
    ref = [_split(b) for b in batches]
    return Family(model, nn.CrossEntropyLoss(), batches, ref, nn.CrossEntropyLoss(),
                  "mean", "dense")


def hf_vit_family() -> Family:
    """ViTForImageClassification on 8 x 8 two-channel images, dict batches with pixel_values."""
    transformers = _require(import_transformers)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=2, hidden_size=4,
                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                                    num_labels=3, initializer_range=0.4, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).double().eval()
    g = torch.Generator().manual_seed(4)
    batches = [{"pixel_values": torch.randn(n, 2, 8, 8, generator=g, dtype=F64),
                "labels": torch.randint(0, 3, (n,), generator=g)} for n in (4, 4, 2)]
    ref = [_split(b) for b in batches]
    return Family(model, nn.CrossEntropyLoss(), batches, ref, nn.CrossEntropyLoss(),
                  "mean", "dense")


def _images(sizes: list[int], channels: int, side: int, classes: int, seed: int) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, channels, side, side, generator=g, dtype=F64),
             torch.randint(0, classes, (n,), generator=g)) for n in sizes]


def timm_vit_family() -> Family:
    """timm's vit_tiny_patch16_224 shrunk to 8 x 8 images, patch 4, one block of width 16."""
    timm = _require(import_timm)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4,
                              in_chans=2, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
                              num_classes=3).double().eval()
    assert model.blocks[0].attn.fused_attn  # timm calls F.scaled_dot_product_attention
    with torch.no_grad():  # timm initialises the head and the position embedding near zero
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    batches = _images([4, 4, 3], 2, 8, 3, seed=5)
    return Family(model, nn.CrossEntropyLoss(), batches, batches, nn.CrossEntropyLoss(),
                  "mean", "fd")


def torchvision_resnet_family() -> Family:
    """torchvision's ResNet-18 layout at width 2 (examples/torchvision_resnet.py), eval-mode BN."""
    _require(import_torchvision)
    sys.path.insert(0, str(EXAMPLES))  # as `curvscope run` / `python FILE` see it: _synthetic.py beside
    try:
        narrow_resnet18 = runpy.run_path(str(EXAMPLES / "torchvision_resnet.py"))["narrow_resnet18"]
    finally:
        sys.path.remove(str(EXAMPLES))
    torch.manual_seed(0)
    model = narrow_resnet18(2, 3).double()
    batches = _images([3, 3, 2], 3, 16, 3, seed=6)
    with torch.no_grad():  # running statistics and affine BatchNorm that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        model.train()
        model(torch.cat([x for x, _ in batches]))
    model.eval()
    return Family(model, nn.CrossEntropyLoss(), batches, batches, nn.CrossEntropyLoss(),
                  "mean", "fd")


class EncoderClassifier(nn.Module):
    """Linear embedding, position embedding, nn.TransformerEncoderLayer (batch_first), mean, head."""

    def __init__(self, features: int = 3, width: int = 6, length: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.pos = nn.Parameter(0.3 * torch.randn(length, width))
        self.encoder = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=8, dropout=0.1,
                                                  batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x) + self.pos).mean(dim=1))


def encoder_family() -> Family:
    """nn.TransformerEncoderLayer classifier in eval mode (where PyTorch takes its fast path)."""
    torch.manual_seed(0)
    model = EncoderClassifier().double().eval()
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(n, 5, 3, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g))
               for n in (4, 4, 3)]
    return Family(model, nn.CrossEntropyLoss(), batches, batches, nn.CrossEntropyLoss(),
                  "mean", "dense")


class RawAttention(nn.Module):
    """``F.scaled_dot_product_attention`` on ``[B, heads, T, d]`` tensors (causal), then a head."""

    def __init__(self, features: int = 4, heads: int = 2, dim: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.heads, self.dim = heads, dim
        self.qkv = nn.Linear(features, 3 * heads * dim)
        self.head = nn.Linear(heads * dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [n, heads, t, dim]
        return self.head(torch.tanh(out.transpose(1, 2).reshape(n, t, -1)).mean(dim=1))


def raw_sdpa_family() -> Family:
    torch.manual_seed(0)
    model = RawAttention().double()
    g = torch.Generator().manual_seed(8)
    batches = [(torch.randn(n, 6, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g))
               for n in (4, 4, 2)]
    return Family(model, nn.CrossEntropyLoss(), batches, batches, nn.CrossEntropyLoss(),
                  "mean", "dense")


FAMILIES = {
    "hf-gpt2-causal-lm": gpt2_family,
    "hf-bert-classifier": bert_family,
    "hf-bert-eager-attention": bert_eager_family,
    "hf-vit-classifier": hf_vit_family,
    "timm-vit": timm_vit_family,
    "torchvision-resnet": torchvision_resnet_family,
    "nn-transformer-encoder": encoder_family,
    "raw-sdpa": raw_sdpa_family,
}


# ----------------------------------------------------------------------------- references
def _logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def _call(model: nn.Module, params: dict[str, torch.Tensor], inputs: Any) -> torch.Tensor:
    if isinstance(inputs, dict):
        return _logits(functional_call(model, params, (), dict(inputs)))
    return _logits(functional_call(model, params, (inputs,)))


def _unflatten(model: nn.Module, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    named = list(model.named_parameters())
    pieces = theta.split([p.numel() for _, p in named])
    return {n: t.reshape(p.shape) for (n, p), t in zip(named, pieces)}


def _theta(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def full_gradient(fam: Family, theta: torch.Tensor) -> torch.Tensor:
    """The gradient of the dataset loss at ``theta`` by plain autograd (math attention)."""
    theta = theta.detach().clone().requires_grad_(True)
    params = _unflatten(fam.model, theta)
    with math_attention(), torch.enable_grad():
        total = sum(w * fam.ref_loss(_call(fam.model, params, x), y)
                    for (x, y), w in zip(fam.ref_batches, fam.weights))
        (g,) = torch.autograd.grad(total, theta)
    return g.detach()


def fd_hessian_product(fam: Family, V: torch.Tensor,
                       steps: tuple[float, ...] = (1e-2, 1e-3, 1e-4, 1e-5)) -> tuple[torch.Tensor, float]:
    """``H V`` by central differences of the full-data gradient, with a step study per column.

    For each column the estimates at consecutive steps are compared; the pair that agrees best
    gives the column (its smaller step) and its disagreement is the reference's error estimate.
    Returns the reference and the largest such disagreement over the columns.
    """
    theta0 = _theta(fam.model)
    columns, worst = [], 0.0
    for v in V.T:
        u = v / v.norm()
        est = [(full_gradient(fam, theta0 + h * u) - full_gradient(fam, theta0 - h * u)) / (2 * h)
               for h in steps]
        diffs = [rel_err(est[i + 1], est[i]) for i in range(len(est) - 1)]
        best = min(range(len(diffs)), key=diffs.__getitem__)
        columns.append(est[best + 1] * v.norm())
        worst = max(worst, diffs[best])
    return torch.stack(columns, dim=1), worst


def jvp_ggn_product(fam: Family, V: torch.Tensor) -> torch.Tensor:
    """``sum_b w_b J_b^T H_b J_b V``: J by torch.func.jvp / vjp, the loss Hessian H_b in output
    space by forward-over-reverse autograd of the reference loss (no closed forms)."""
    theta0 = _theta(fam.model)
    out = torch.zeros_like(V)
    with math_attention():
        for (x, y), w in zip(fam.ref_batches, fam.weights):
            def f(th: torch.Tensor, x: Any = x) -> torch.Tensor:
                return _call(fam.model, _unflatten(fam.model, th), x)

            z, vjp_fn = torch.func.vjp(f, theta0)
            loss_grad = torch.func.grad(lambda zz, y=y: fam.ref_loss(zz, y))
            for j in range(V.shape[1]):
                _, Jv = torch.func.jvp(f, (theta0,), (V[:, j],))
                _, HJv = torch.func.jvp(loss_grad, (z.detach(),), (Jv,))
                out[:, j] += w * vjp_fn(HJv)[0]
    return out


def dense_args(fam: Family) -> tuple:
    return fam.model, fam.ref_loss, fam.ref_batches


# ----------------------------------------------------------------------------- (a), (b), (c)
@pytest.fixture(scope="module")
def cache() -> dict:
    """One family build and one dense Hessian per family for the three checks."""
    return {}


def _family(name: str, cache: dict) -> tuple[Family, dict]:
    if name not in cache:
        fam = FAMILIES[name]()
        P = sum(p.numel() for p in fam.model.parameters())
        assert (P <= 1500) == (fam.reference == "dense"), P
        entry: dict[str, Any] = {"P": P}
        if fam.reference == "dense":
            with math_attention():
                entry["H"] = dense_hessian(*dense_args(fam), reduction=fam.reduction)
        cache[name] = (fam, entry)
    return cache[name]


def _V(P: int) -> torch.Tensor:
    return torch.randn(P, 3, dtype=F64, generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("name", FAMILIES)
def test_hessian_product_matches_an_independent_reference(name, cache):
    fam, entry = _family(name, cache)
    H = cs.HessianOperator(cs.Problem(fam.model, fam.loss_fn, fam.batches))
    assert H.shape == (entry["P"], entry["P"])
    V = _V(entry["P"])
    HV = H @ V
    if fam.reference == "dense":
        expected = entry["H"] @ V
        # the dense reference itself, against finite differences on one column
        fd, fd_err = fd_hessian_product(fam, V[:, :1])
        ref_err = rel_err(expected[:, :1], fd)
        assert fd_err < 1e-6 and ref_err < 1e-7, (fd_err, ref_err)
    else:
        expected, ref_err = fd_hessian_product(fam, V)
        assert ref_err < 1e-8, f"the finite-difference steps disagree by {ref_err:.1e}"
    err = rel_err(HV, expected)
    print(f"{name}: P={entry['P']} H@V rel err {err:.2e} (reference {fam.reference}, "
          f"checked against {'finite differences' if fam.reference == 'dense' else 'the next step'}: "
          f"{ref_err:.1e})")
    assert err <= RTOL
    assert float(HV.norm()) > 0


@pytest.mark.parametrize("name", FAMILIES)
def test_ggn_product_matches_an_independent_reference(name, cache):
    fam, entry = _family(name, cache)
    G = cs.GGNOperator(cs.Problem(fam.model, fam.loss_fn, fam.batches))
    V = _V(entry["P"])
    GV = G @ V
    if fam.reference == "dense":
        with math_attention():
            expected = dense_ggn(*dense_args(fam), reduction=fam.reduction) @ V
    else:
        expected = jvp_ggn_product(fam, V)
    err = rel_err(GV, expected)
    print(f"{name}: G@V rel err {err:.2e}")
    assert err <= RTOL
    assert float((V * GV).sum(0).min()) > 0  # PSD: v^T G v > 0 for these random directions


@pytest.mark.parametrize("name", FAMILIES)
def test_top_eigenpairs_converge_with_measured_residuals(name, cache):
    fam, entry = _family(name, cache)
    H = cs.HessianOperator(cs.Problem(fam.model, fam.loss_fn, fam.batches))
    res = cs.eigsh(H, 5, which="LA", generator=torch.Generator().manual_seed(0))
    assert res.all_converged, res
    assert res.eigenvectors is not None
    lam, Q = res.eigenvalues, res.eigenvectors
    # residuals measured again, against the reference where there is a dense one
    AQ = entry["H"] @ Q if "H" in entry else H @ Q
    resid = (AQ - Q * lam).norm(dim=0)
    tol = res.tol * lam.abs()
    print(f"{name}: top-5 {[f'{x:.6g}' for x in lam.tolist()]}, relative residuals "
          f"{(resid / lam.abs()).max():.1e} (tol {res.tol:.1e})")
    assert bool((res.residual_norms <= tol).all())
    assert bool((resid <= 10 * tol).all())
    assert bool((lam[:-1] >= lam[1:]).all())
    if "H" in entry:
        expected = torch.linalg.eigvalsh(entry["H"]).flip(0)[:5]
        assert float((lam - expected).abs().max()) <= 1e-8 * float(expected.abs().max())


# ----------------------------------------------------------------------------- the run files
EXAMPLE_FILES = {
    "hf_bert": import_transformers,
    "hf_gpt2": import_transformers,
    "timm_vit": import_timm,
    "torchvision_resnet": import_torchvision,
    "transformer_encoder": None,
}


# the quickest one (about 20 s) runs by default, so that CI sees every run file's shared helpers
# (examples/_synthetic.py) import; the others (50-75 s each) are slow
@pytest.mark.parametrize("example", [
    pytest.param(name, marks=[] if name == "transformer_encoder" else pytest.mark.slow)
    for name in EXAMPLE_FILES])
def test_example_runs_end_to_end(example, tmp_path, capsys):
    """``curvscope run examples/<example>.py --budget small``: exit 0, a result.json."""
    if EXAMPLE_FILES[example] is not None:
        _require(EXAMPLE_FILES[example])
    threads = torch.get_num_threads()
    try:
        code = cli_main(["run", str(EXAMPLES / f"{example}.py"), "--budget", "small", "--threads",
                         "1", "--no-progress", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr()
    assert code == 0, printed.err
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["info"]["num_params"] > 1000
    assert (tmp_path / "report.html").is_file()


# ----------------------------------------------------------------------------- third-party imports
def test_matching_torchvision_rule():
    assert matching_torchvision("2.13.0+cpu") == "torchvision==0.28.*"
    assert matching_torchvision("2.4.1") == "torchvision==0.19.*"
    assert matching_torchvision("2.14.0.dev20260101+cu130") == "torchvision==0.29.*"
    with pytest.raises(ValueError, match="torch 2.x"):
        matching_torchvision("1.13.1")


def test_installed_torchvision_matches_torch():
    tv = _require(import_torchvision)
    wanted = matching_torchvision().removeprefix("torchvision==").removesuffix("*")
    assert tv.__version__.startswith(wanted), (tv.__version__, torch.__version__)
    block = tv.models.resnet.BasicBlock(4, 4).double().eval()  # the pure-Python models work
    assert block(torch.randn(1, 4, 5, 5, dtype=F64)).shape == (1, 4, 5, 5)


def _run_python(code: str, tmp_path: Path, pythonpath: Path | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (``pythonpath`` first on its path); its last line is JSON."""
    src = str(Path(cs.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(p) for p in (pythonpath, src) if p])}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


_PROBE = """
    import json, warnings
    import torch
    try:
        import torchvision  # noqa: F401
        plain = None
    except Exception as err:
        plain = f"{type(err).__name__}: {err}"
    from curvscope.testing import import_torchvision
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tv = import_torchvision()
        again = import_torchvision()
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    print(json.dumps({"plain": plain, "notes": notes, "same": tv is again,
                      "extra": EXTRA}))
"""


def test_import_torchvision_in_a_fresh_interpreter(tmp_path):
    """The installed torchvision: a CUDA build beside a CPU torch is repaired, with one warning."""
    _require(import_torchvision)
    code = _PROBE.replace("EXTRA", "[type(tv.models.resnet18(num_classes=2)).__name__, "
                                   "hasattr(torch.ops.torchvision, 'nms')]")
    out = _run_python(code, tmp_path)
    assert out["same"] and out["extra"][0] == "ResNet"
    if out["plain"] is not None:  # PyPI's CUDA torchvision beside the CPU torch (this venv)
        assert "torchvision::nms does not exist" in out["plain"], out["plain"]
        assert len(out["notes"]) == 1, out["notes"]
        assert "nms" in out["notes"][0] and "cannot run" in out["notes"][0]
        assert out["extra"][1]
    else:  # a torchvision whose ops load: nothing to repair, nothing to say
        assert out["notes"] == []


def _fake_torchvision(root: Path, missing: str) -> Path:
    """A stand-in torchvision that imports a submodule, then fails like PyPI's beside a CPU torch."""
    pkg = root / "fake" / "torchvision"
    pkg.mkdir(parents=True)
    (pkg / "half.py").write_text("import builtins\nbuiltins.half_imports = getattr(builtins, "
                                 "'half_imports', 0) + 1\n")
    (pkg / "__init__.py").write_text(textwrap.dedent(f"""
        import torch
        from torchvision import half  # noqa: F401
        if not hasattr(torch.ops.torchvision, {missing!r}):
            raise RuntimeError("operator torchvision::{missing} does not exist")
        __version__ = "0.0.fake"
    """))
    return root / "fake"


def test_import_torchvision_defines_the_schemas_purges_and_warns_once(tmp_path):
    code = _PROBE.replace("EXTRA", "[__import__('builtins').half_imports, tv.__version__, "
                                   "hasattr(torch.ops.torchvision, 'qnms')]")
    out = _run_python(code, tmp_path, pythonpath=_fake_torchvision(tmp_path, "nms"))
    assert out["plain"] == "RuntimeError: operator torchvision::nms does not exist"
    # the submodule ran twice: in the plain import (a failed import leaves it in sys.modules) and
    # after the purge; without the purge the retry would reuse the half-imported module
    assert out["extra"] == [2, "0.0.fake", True]
    assert out["same"] and len(out["notes"]) == 1
    assert "torchvision::nms, torchvision::qnms" in out["notes"][0]


def test_import_torchvision_reports_an_op_it_cannot_define(tmp_path):
    code = """
        import json
        from curvscope.testing import import_torchvision
        try:
            import_torchvision()
            print(json.dumps({"error": None}))
        except ImportError as err:
            print(json.dumps({"error": str(err)}))
    """
    out = _run_python(code, tmp_path, pythonpath=_fake_torchvision(tmp_path, "roi_align"))
    assert out["error"] is not None
    assert "torchvision::roi_align does not exist" in out["error"] and "pip install" in out["error"]


def test_import_errors_say_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    with pytest.raises(ImportError, match=r"torchvision is not installed.*torchvision==0\.\d+"):
        import_torchvision()
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="timm is not installed"):
        import_timm()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="transformers is not installed"):
        import_transformers()


def test_import_timm_needs_torchvision(monkeypatch):
    _require(import_timm)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match="timm needs torchvision: torchvision is not installed"):
        import_timm()

