"""Tiny seeded test problems (float64 by default) for checking curvature code.

Every factory returns a :class:`TinyProblem`; data are split into batches of
*unequal* sizes (``batch_sizes``). The global RNG state is left untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "TinyProblem",
    "TinyHFOutput",
    "TinyHFClassifier",
    "tiny_mlp",
    "tiny_cnn",
    "tiny_hf_model",
    "gaussian_blobs",
]


def _identity(batch: Any) -> Any:
    return batch


@dataclass
class TinyProblem:
    """A model, its loss module and data.

    Attributes:
        model: the ``nn.Module``.
        loss_fn: loss module, called as ``loss_fn(output, target)``, with reduction ``reduction``.
        batches: list of batches, each ``(inputs, target)`` (or a dict for :func:`tiny_hf_model`).
        reduction: ``"mean"`` or ``"sum"``, the reduction of ``loss_fn``.
        num_classes: number of classes (``None`` for regression).
        split: maps a batch to ``(inputs, target)``; identity for tuple batches.
    """

    model: nn.Module
    loss_fn: nn.Module
    batches: list
    reduction: str
    num_classes: int | None
    split: Callable[[Any], tuple[Any, Tensor]] = field(default=_identity)

    def split_batches(self) -> list[tuple[Any, Tensor]]:
        """``[split(b) for b in batches]``: the batches as ``(inputs, target)`` tuples."""
        return [self.split(b) for b in self.batches]


def _chunks(tensors: Sequence[Tensor], batch_sizes: Sequence[int]) -> list[tuple[Tensor, ...]]:
    return list(zip(*(t.split(list(batch_sizes)) for t in tensors), strict=True))


def _balanced_labels(n: int, num_classes: int, g: torch.Generator) -> Tensor:
    if n < num_classes:
        raise ValueError(
            f"need at least {num_classes} examples for every class to be present, got {n}"
        )
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


_ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
}


def gaussian_blobs(
    num_classes: int = 3,
    *,
    n_per_class: int = 4,
    dim: int = 4,
    dtype=torch.float64,
    seed: int = 0,
    separation=4.0,
) -> tuple[Tensor, Tensor]:
    """Shuffled mixture of isotropic unit Gaussians with well separated means.

    Class means are ``separation`` times random unit vectors (orthonormal if dim >= num_classes).

    Returns:
        ``(X, y)``: ``X`` of shape ``[num_classes * n_per_class, dim]`` and int64 labels ``y``.
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(
        torch.randn(max(dim, num_classes), max(dim, num_classes), generator=g, dtype=torch.float64)
    )
    means = separation * nn.functional.normalize(q[:num_classes, :dim], dim=1)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    X = means[y] + 0.5 * torch.randn(len(y), dim, generator=g, dtype=torch.float64)
    perm = torch.randperm(len(y), generator=g)
    return X[perm].to(dtype), y[perm]


def tiny_mlp(
    kind: str = "classification",
    *,
    dtype=torch.float64,
    seed: int = 0,
    batch_sizes: Sequence[int] = (5, 5, 3),
    in_dim: int = 4,
    hidden: int = 6,
    out_dim: int = 3,
    activation: str = "tanh",
    reduction: str = "mean",
) -> TinyProblem:
    """Linear(in_dim, hidden) - activation - Linear(hidden, out_dim).

    ``kind``: ``"classification"`` (CrossEntropyLoss, int64 targets in ``[0, out_dim)``, every class
    present), ``"regression"`` (MSELoss, targets ``[n, out_dim]``) or ``"binary"``
    (BCEWithLogitsLoss, float {0, 1} targets ``[n, out_dim]``). ``activation`` is one of
    tanh, relu, sigmoid, gelu, softplus.
    """
    _check_reduction(reduction)
    n = sum(batch_sizes)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(in_dim, hidden), _ACTIVATIONS[activation](), nn.Linear(hidden, out_dim)
        )
    model = model.to(dtype)
    X = torch.randn(n, in_dim, generator=g, dtype=torch.float64)
    loss_fn: nn.Module
    num_classes: int | None
    if kind == "classification":
        y = _balanced_labels(n, out_dim, g)
        X = X + 2.0 * torch.randn(out_dim, in_dim, generator=g, dtype=torch.float64)[y]
        loss_fn, num_classes = nn.CrossEntropyLoss(reduction=reduction), out_dim
    elif kind == "regression":
        W = torch.randn(in_dim, out_dim, generator=g, dtype=torch.float64)
        y = (torch.sin(X @ W) + 0.1 * torch.randn(n, out_dim, generator=g, dtype=torch.float64)).to(
            dtype
        )
        loss_fn, num_classes = nn.MSELoss(reduction=reduction), None
    elif kind == "binary":
        y = torch.randint(0, 2, (n, out_dim), generator=g).to(dtype)
        loss_fn, num_classes = nn.BCEWithLogitsLoss(reduction=reduction), out_dim
    else:
        raise ValueError(f"kind must be 'classification', 'regression' or 'binary', got {kind!r}")
    return TinyProblem(
        model, loss_fn, _chunks([X.to(dtype), y], batch_sizes), reduction, num_classes
    )


def tiny_cnn(
    *,
    batchnorm: bool = True,
    dtype=torch.float64,
    seed: int = 0,
    batch_sizes: Sequence[int] = (4, 4, 2),
    num_classes: int = 3,
    activation: str = "relu",
    reduction: str = "mean",
) -> TinyProblem:
    """Conv2d(1, 3, 3) [+ BatchNorm2d(3)] - act - Flatten - Linear(48, num_classes), 1x6x6 inputs.

    CrossEntropyLoss; ``P = 183`` with batchnorm (177 without) for 3 classes. The BatchNorm
    running statistics are made non-trivial (a few no-grad forward passes in train mode on
    shifted data) and the model is returned in **eval** mode, so eval mode and batch-statistics
    (``model.train()``) differ. ``activation``: "relu" or "tanh".
    """
    _check_reduction(reduction)
    n = sum(batch_sizes)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Conv2d(1, 3, 3)]
        layers += [nn.BatchNorm2d(3)] if batchnorm else []
        layers += [_ACTIVATIONS[activation](), nn.Flatten(), nn.Linear(3 * 4 * 4, num_classes)]
        model = nn.Sequential(*layers).to(dtype)
    if batchnorm:
        model.train()
        with torch.no_grad():
            for _ in range(5):
                model(
                    1.5 * torch.randn(8, 1, 6, 6, generator=g, dtype=torch.float64).to(dtype) + 0.7
                )
        with torch.no_grad():  # non-trivial affine parameters too
            bn = model[1]
            assert isinstance(bn, nn.BatchNorm2d)
            bn.weight.copy_(1.0 + 0.3 * torch.randn(3, generator=g, dtype=torch.float64))
            bn.bias.copy_(0.2 * torch.randn(3, generator=g, dtype=torch.float64))
    model.eval()
    y = _balanced_labels(n, num_classes, g)
    X = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    X = X + torch.randn(num_classes, 1, 6, 6, generator=g, dtype=torch.float64)[y]
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    return TinyProblem(
        model, loss_fn, _chunks([X.to(dtype), y], batch_sizes), reduction, num_classes
    )


@dataclass
class TinyHFOutput:
    """HuggingFace-style model output (attribute and ``["logits"]`` access)."""

    logits: Tensor

    def __getitem__(self, key: str) -> Tensor:
        """Return ``getattr(self, key)`` (dict-style access, as for HF outputs)."""
        return getattr(self, key)


class TinyHFClassifier(nn.Module):
    """Embedding - masked mean-pool - Linear head; ``forward(input_ids, attention_mask=None)``."""

    def __init__(self, vocab: int = 7, dim: int = 5, num_classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> TinyHFOutput:
        """Return logits ``head(masked_mean(embed(input_ids)))`` of shape ``[n, num_classes]``."""
        e = self.embed(input_ids)  # [n, T, dim]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        m = attention_mask.to(e.dtype).unsqueeze(-1)
        pooled = (e * m).sum(1) / m.sum(1).clamp_min(1.0)
        return TinyHFOutput(logits=self.head(pooled))


def _hf_split(batch: dict) -> tuple[dict, Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]


def tiny_hf_model(
    *,
    dtype=torch.float64,
    seed: int = 0,
    batch_sizes: Sequence[int] = (3, 3, 2),
    vocab: int = 7,
    seq_len: int = 4,
    num_classes: int = 3,
    dim: int = 5,
    reduction: str = "mean",
) -> TinyProblem:
    """HuggingFace-style classifier (:class:`TinyHFClassifier`) with dict batches.

    ``batches`` are dicts ``{"input_ids": [n, T], "attention_mask": [n, T], "labels": [n]}`` (int64,
    right padding with id 0, at least one unmasked token per row); ``split`` turns one into
    ``(inputs_dict, labels)``. CrossEntropyLoss; the model returns a :class:`TinyHFOutput`.
    """
    _check_reduction(reduction)
    n = sum(batch_sizes)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyHFClassifier(vocab, dim, num_classes).to(dtype)
    lengths = torch.randint(1, seq_len + 1, (n,), generator=g)
    mask = (torch.arange(seq_len) < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (n, seq_len), generator=g) * mask
    labels = _balanced_labels(n, num_classes, g)
    batches = [
        {"input_ids": i, "attention_mask": m, "labels": y}
        for i, m, y in _chunks([ids, mask, labels], batch_sizes)
    ]
    return TinyProblem(
        model, nn.CrossEntropyLoss(reduction=reduction), batches, reduction, num_classes, _hf_split
    )
