"""A tiny character-level transformer trained on the Zen of Python (it ships with Python).

Data: the Zen of Python (PEP 20), the rot13-encoded string ``s`` of the standard-library module
``this``, read from its source without importing it (importing ``this`` prints the poem). Its
856 characters are cut into windows of ``context + 1`` characters (stride ``stride``):
``inputs = window[:-1]``, ``targets = window[1:]``, both ``LongTensor[n, T]``. The poem is too
short to generalise from, so there is no held-out data by default (``test_fraction`` holds out
its tail anyway: a model that memorised the rest does worse there than a uniform guess).

Model: a GPT-style decoder: token and learned position embeddings, ``num_layers`` pre-LayerNorm
blocks (causal multi-head self-attention, GELU MLP), a final LayerNorm and a linear head to the
vocabulary; output logits ``[n, T, V]``. Attention is written out,
``softmax(Q K^T / sqrt(d_head) + causal mask) V``, instead of
``F.scaled_dot_product_attention``: the fused kernels of the latter (flash, memory-efficient,
cuDNN) have no double-backward and no forward-mode AD, so Hessian-vector products through them
fail.

Loss: :class:`SequenceCrossEntropy`, the mean cross-entropy over all ``n * T`` next-character
predictions of a batch. Every window has the same length ``T``, so weighting a batch by its
number of sequences ``target.shape[0]`` (the default of :class:`curvscope.Problem`) gives
exactly the mean over all tokens of the data set.

References:
    A. Vaswani et al., "Attention is all you need", NeurIPS 2017; A. Radford et al., "Language
    models are unsupervised multitask learners" (GPT-2), 2019; T. Peters, "PEP 20 - The Zen of
    Python", 2004.
"""

from __future__ import annotations

import ast
import codecs
import contextlib
import importlib
import importlib.util
import io
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvscope.zoo._base import (
    ZooProblem,
    check_float_dtype,
    check_positive_int,
    evaluate,
    seeded,
    split_batches,
    train,
)

__all__ = ["CharTransformer", "SequenceCrossEntropy", "char_transformer", "zen_of_python"]


def zen_of_python() -> str:
    """The Zen of Python (856 characters), decoded from the stdlib module ``this``.

    The module's source is parsed rather than imported (importing ``this`` prints the poem);
    if the source is not available (a frozen interpreter) the module is imported with its
    output captured.

    Example:
        >>> zen_of_python().splitlines()[0]
        'The Zen of Python, by Tim Peters'
    """
    encoded = None
    with contextlib.suppress(Exception):
        spec = importlib.util.find_spec("this")
        source = spec.loader.get_source("this") if spec and spec.loader else None  # type: ignore[attr-defined]
        if source:
            for node in ast.parse(source).body:
                if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                        and any(isinstance(t, ast.Name) and t.id == "s" for t in node.targets)):
                    encoded = node.value.value
    if not isinstance(encoded, str):
        with contextlib.redirect_stdout(io.StringIO()):
            encoded = importlib.import_module("this").s
    return codecs.decode(encoded, "rot13")


class SequenceCrossEntropy(nn.Module):
    """Cross-entropy over the tokens of sequences: logits ``[n, T, V]``, targets ``[n, T]``.

    ``loss = (1 / n_terms) sum_{i, t} -log softmax(z_{i,t})[y_{i,t}]`` with reduction ``mean``
    (``n_terms`` = the targets not equal to ``ignore_index``; ``n * T`` when there are none), or
    the plain sum with reduction ``sum``. It flattens to ``F.cross_entropy(z.reshape(-1, V),
    y.reshape(-1))``. (It is deliberately not an ``nn.CrossEntropyLoss``, which puts the classes
    in dimension 1; curvscope handles its output-space Hessian by automatic differentiation.)

    With equal-length sequences and no ignored targets, :class:`curvscope.Problem`'s default
    batch weights ``n_b / N`` (``n_b`` = sequences in batch ``b``) make the empirical risk the
    mean over all tokens. With ignored targets, pass
    ``batch_size_fn=lambda y: int((y != -100).sum())`` to the Problem.

    Args:
        reduction: ``"mean"`` or ``"sum"``.
        ignore_index: target value that does not count.

    Raises:
        ValueError: a reduction other than ``"mean"`` or ``"sum"``; logits and targets whose
            shapes do not match (``[n, T, V]`` and ``[n, T]``).

    Example:
        >>> z = torch.zeros(2, 3, 4)
        >>> round(float(SequenceCrossEntropy()(z, torch.zeros(2, 3, dtype=torch.long))), 6)
        1.386294
    """

    def __init__(self, reduction: str = "mean", ignore_index: int = -100) -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
        self.reduction = reduction
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """The loss of logits ``[n, T, V]`` against targets ``[n, T]``."""
        if logits.ndim != target.ndim + 1 or logits.shape[:-1] != target.shape:
            raise ValueError(
                f"expected logits [n, T, V] and targets [n, T], got {tuple(logits.shape)} and "
                f"{tuple(target.shape)}."
            )
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                               reduction=self.reduction, ignore_index=self.ignore_index)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on the math path: ``softmax(Q K^T / sqrt(d_h) + M) V``.

    Written out (no ``F.scaled_dot_product_attention``) so that double-backward and forward-mode
    AD, hence Hessian-vector products, work.
    """

    mask: Tensor

    def __init__(self, d_model: int, num_heads: int, context: int) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        mask = torch.ones(context, context, dtype=torch.bool).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``x [n, T, d] -> [n, T, d]``."""
        n, T, d = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.reshape(n, T, h, d // h).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
        scores = scores.masked_fill(self.mask[:T, :T], float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(n, T, d))


class _Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_ff: int, context: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, num_heads, context)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A GPT-style decoder: ``LongTensor[n, T]`` of token ids ``->`` logits ``[n, T, V]``.

    Token and learned position embeddings, ``num_layers`` pre-LayerNorm blocks (causal
    math-path attention, GELU MLP of width ``d_ff``), a final LayerNorm and a linear head.

    Args:
        vocab_size: ``V``.
        context: the longest sequence ``T``.
        d_model: embedding width.
        num_heads: attention heads (dividing ``d_model``).
        num_layers: transformer blocks.
        d_ff: hidden width of the MLPs.
    """

    positions: Tensor

    def __init__(self, vocab_size: int, context: int, *, d_model: int = 32, num_heads: int = 2,
                 num_layers: int = 1, d_ff: int = 64) -> None:
        super().__init__()
        self.context = context
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(*(_Block(d_model, num_heads, d_ff, context)
                                      for _ in range(num_layers)))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.register_buffer("positions", torch.arange(context), persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        """Token ids ``[n, T]`` (``T <= context``) to next-token logits ``[n, T, V]``."""
        T = idx.shape[-1]
        if T > self.context:
            raise ValueError(f"sequence length {T} exceeds the context {self.context}.")
        x = self.tok_emb(idx) + self.pos_emb(self.positions[:T])
        return self.head(self.ln_f(self.blocks(x)))


def _windows(ids: Tensor, context: int, stride: int) -> tuple[Tensor, Tensor]:
    starts = range(0, len(ids) - context, stride)
    w = torch.stack([ids[s : s + context + 1] for s in starts])
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def char_transformer(
    *,
    context: int = 32,
    d_model: int = 32,
    num_heads: int = 2,
    num_layers: int = 1,
    d_ff: int = 64,
    stride: int = 2,
    test_fraction: float = 0.0,
    steps: int = 500,
    lr: float = 1e-2,
    train_batch_size: int = 32,
    batch_size: int = 128,
    checkpoint_steps: Sequence[int] = (0,),
    text: str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> ZooProblem:
    """A tiny character-level transformer trained for next-character prediction.

    The text (default: the Zen of Python, :func:`zen_of_python`) is encoded over its sorted
    character set; its first ``1 - test_fraction`` is cut into windows of ``context + 1``
    characters every ``stride`` characters (inputs: the first ``context``, targets: the last
    ``context``), the rest (if any) into held-out windows. The :class:`CharTransformer` is trained by
    minibatch Adam for ``steps`` steps (a few seconds on one CPU core) with
    :class:`SequenceCrossEntropy`. With the defaults: vocabulary 45, 12,557 parameters, 412
    training windows of 32 characters, training loss about 0.15 nats per character and
    next-character accuracy about 95 % (the model memorises much of the poem; the loss cannot
    reach zero because the first characters of a window have little context).

    ``cs.Problem(zp.model, zp.loss_fn, zp.batches)`` works as is: batches are
    ``(LongTensor[n, T], LongTensor[n, T])`` pairs, and the default batch size
    ``target.shape[0]`` (sequences) weights batches correctly because all windows have the same
    length.

    Args:
        context: ``T``, the window length.
        d_model: embedding width of the :class:`CharTransformer`.
        num_heads: attention heads (dividing ``d_model``).
        num_layers: transformer blocks.
        d_ff: hidden width of the MLPs.
        stride: characters between the starts of consecutive training windows.
        test_fraction: fraction of the text (at its end) held out (default none: the Zen is
            too short to generalise from).
        steps: Adam steps.
        lr: Adam's learning rate.
        train_batch_size: windows per training minibatch.
        batch_size: windows per batch in ``batches`` / ``test_batches``.
        checkpoint_steps: steps at which to save ``state_dict`` copies (the final state is
            always saved last).
        text: another text to train on (at least ``context + 2`` characters).
        dtype: floating dtype of the model (float32; float64 for tight checks).
        seed: seeds the initialisation and the minibatch order. The global RNG is not touched.

    Returns:
        A :class:`ZooProblem` with ``num_classes`` the vocabulary size, accuracy per character,
        and ``metadata["vocab"]`` the characters in id order.

    Raises:
        ValueError: bad sizes, or a text too short for one window.
    """
    for name, value in (("context", context), ("d_model", d_model), ("num_heads", num_heads),
                        ("num_layers", num_layers), ("d_ff", d_ff), ("stride", stride),
                        ("steps", steps), ("train_batch_size", train_batch_size),
                        ("batch_size", batch_size)):
        check_positive_int(name, value)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}.")
    dtype = check_float_dtype(dtype)
    source = "the Zen of Python" if text is None else "a given text"
    text = zen_of_python() if text is None else text
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}.")
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(ch) for ch in text], dtype=torch.long)
    n_train_chars = len(ids) - round(test_fraction * len(ids))
    if n_train_chars < context + 1:
        raise ValueError(
            f"the training text has {n_train_chars} characters, fewer than context + 1 = "
            f"{context + 1}; use a longer text or a shorter context."
        )
    X, y = _windows(ids[:n_train_chars], context, stride)
    with seeded(seed):
        model = CharTransformer(len(vocab), context, d_model=d_model, num_heads=num_heads,
                                num_layers=num_layers, d_ff=d_ff).to(dtype)
    loss_fn = SequenceCrossEntropy()
    g = torch.Generator().manual_seed(seed)
    checkpoints = train(model, loss_fn, X, y, steps=steps, lr=lr,
                               batch_size=train_batch_size, generator=g,
                               checkpoint_steps=checkpoint_steps)
    batches = split_batches(X, y, batch_size)
    train_loss, train_acc = evaluate(model, loss_fn, batches)
    test_batches = test_loss = test_acc = None
    test_ids = ids[n_train_chars:]
    if len(test_ids) >= context + 1:
        Xt, yt = _windows(test_ids, context, stride)
        test_batches = split_batches(Xt, yt, batch_size)
        test_loss, test_acc = evaluate(model, loss_fn, test_batches)
    return ZooProblem(
        "char_transformer", model, loss_fn, batches, len(vocab), train_loss, train_acc,
        test_batches=test_batches, test_loss=test_loss, test_accuracy=test_acc,
        checkpoints=checkpoints, input_shape=(context,),
        description=(
            f"character-level language model on {source} "
            f"({len(vocab)} characters, windows of {context}); transformer with {num_layers} "
            f"layer(s), d_model {d_model}, {num_heads} heads, math-path causal attention."
        ),
        metadata={"seed": seed, "vocab": "".join(vocab), "lr": lr, "steps": steps,
                  "stride": stride},
    )
