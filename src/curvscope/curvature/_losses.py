"""Output-space curvature of the loss: closed-form Hessians and Fisher samples for CE, MSE, BCE.

For a batch with outputs ``z`` and the user's loss ``l(z, y)``, the Gauss-Newton matrix needs
``H_l = d^2 l / dz^2``. For the three standard losses it has a closed form, with ``r`` the
reduction factor (``1`` for ``sum``; ``1/n_terms`` for ``mean``):

* cross-entropy (softmax over the class dimension: dim 1 for ``nn.CrossEntropyLoss``, the last
  one for :class:`TokenCrossEntropyLoss` / :class:`CausalLMLoss`):
  ``H_l = r * blockdiag(diag(p) - p p^T)``, ``p = softmax(z)``, ``n_terms`` = number of targets
  not equal to ``ignore_index``. For a causal LM the logits at position ``t`` predict the token at
  ``t + 1`` (the shift of HuggingFace's ``labels=`` convention), so the last position has no
  target and its block is zero. The product costs ``O(k * tokens * V)``: nothing of size ``V^2``
  is ever formed, whatever the vocabulary;
* mean squared error ``sum (z - y)^2``: ``H_l = 2 r I``, ``n_terms = z.numel()``;
* binary cross-entropy with logits: ``H_l = r * diag(s (1 - s))``, ``s = sigmoid(z)``,
  ``n_terms = z.numel()``.

Any other loss falls back to automatic differentiation of the loss with respect to ``z`` only.

The Monte-Carlo Fisher needs the gradients of the negative log-likelihood ``g = d(-log p(y|z))/dz``
at targets sampled from the model's predictive distribution, with ``E[g g^T] = H_l / r``:
``p - onehot(y)`` with ``y ~ Cat(p)``; ``sqrt(2) * eps`` with ``eps ~ N(0, I)`` for the squared
error; ``s - y`` with ``y ~ Bernoulli(s)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvscope.curvature._nested import default_batch_size_fn


@dataclass(frozen=True)
class LossKind:
    """A recognised loss: its name and the parameters the closed forms need."""

    name: str  # "cross_entropy" | "mse" | "bce" | "model_output" | "other"
    ignore_index: int = -100
    class_dim: int = 1  # cross-entropy: the dimension of the classes in the logits
    shift: int = 0  # cross-entropy: logits at position t predict the target at t + shift (dim 1)


class TokenCrossEntropyLoss(nn.Module):
    """Cross-entropy over tokens: logits ``[n, T, V]`` (classes last), integer targets ``[n, T]``.

    .. math:: \\ell = \\frac{1}{n_{terms}} \\sum_{i,t:\\,y_{i,t+s} \\ne ignore}
              -\\log \\mathrm{softmax}(z_{i,t})[y_{i,t+s}]

    with ``s = 1`` when ``shift`` (causal language modelling: the logits at position ``t`` predict
    token ``t + 1``, HuggingFace's ``labels=`` convention, so ``labels`` may simply be the input ids
    with ``-100`` at padding) and ``s = 0`` otherwise (token classification, masked LM).
    ``n_terms`` is the number of targets that count. With reduction ``mean``,
    :class:`curvscope.Problem` weights each batch by its ``n_terms`` (its default ``batch_size_fn``
    counts them), so the operators are the curvature of the mean over all counted tokens of the
    whole dataset, however the padding differs between batches. Recognised by the Gauss-Newton
    and Fisher operators: their output-space products are in closed form, ``O(tokens * V)``.

    Args:
        ignore_index: target value that does not count (padding, prompt tokens).
        shift: compare ``logits[:, :-1]`` with ``target[:, 1:]``.
        reduction: ``"mean"`` or ``"sum"``.

    Example:
        >>> z = torch.zeros(2, 4, 5)
        >>> y = torch.tensor([[1, 2, 3, -100], [0, 1, -100, -100]])
        >>> round(float(CausalLMLoss()(z, y)), 6)  # 3 counted tokens, each log(5)
        1.609438
    """

    def __init__(self, ignore_index: int = -100, shift: bool = False,
                 reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
        self.ignore_index, self.shift, self.reduction = ignore_index, bool(shift), reduction

    def aligned(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and targets that face each other (shifted by one position for a causal LM)."""
        if logits.ndim != target.ndim + 1 or logits.shape[:-1] != target.shape:
            raise ValueError(
                f"{type(self).__name__} expects logits [n, T, V] and integer targets [n, T], got "
                f"{tuple(logits.shape)} and {tuple(target.shape)}; pass output_fn= to take the "
                "logits of the model's output."
            )
        if self.shift:
            return logits[:, :-1], target[:, 1:]
        return logits, target

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """The loss of logits ``[n, T, V]`` against targets ``[n, T]``."""
        z, y = self.aligned(logits, target)
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1),
                               reduction=self.reduction, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, shift={self.shift}, reduction={self.reduction!r}"


class CausalLMLoss(TokenCrossEntropyLoss):
    """Next-token cross-entropy of a causal LM: :class:`TokenCrossEntropyLoss` with ``shift=True``.

    The same loss as HuggingFace's ``model(input_ids, labels=labels).loss`` (mean over the tokens
    whose shifted label is not ``ignore_index``), as a function of the logits, so that the
    Gauss-Newton matrix has its closed form.
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__(ignore_index=ignore_index, shift=True, reduction=reduction)


class ModelOutputLoss:
    """The model's own loss: ``model(**inputs, labels=target).loss`` (HuggingFace style).

    With this loss, :class:`curvscope.Problem` passes the labels to the model with the inputs and
    takes the ``loss`` of its output, so the Hessian is that of the model's own objective. The
    Gauss-Newton and Fisher operators need the loss as a function of the logits: use
    :class:`CausalLMLoss` (the same objective for a causal LM) or ``nn.CrossEntropyLoss()`` there.

    Args:
        label_key: the keyword under which the model takes the labels.
        tokens: how the batch weights count the model's loss terms: ``"auto"`` (shifted tokens
            for a causal LM, recognised by its class name ``...ForCausalLM`` / ``...LMHeadModel``;
            non-ignored labels for labels of two or more dimensions; examples otherwise),
            ``"shifted"``, ``"labels"`` (labels not equal to ``ignore_index``) or ``"examples"``.
        ignore_index: the label value the model's loss ignores.
    """

    TOKENS = ("auto", "shifted", "labels", "examples")

    def __init__(self, label_key: str = "labels", tokens: str = "auto",
                 ignore_index: int = -100) -> None:
        if tokens not in self.TOKENS:
            raise ValueError(f"tokens must be one of {self.TOKENS}, got {tokens!r}.")
        self.label_key, self.tokens, self.ignore_index = label_key, tokens, ignore_index

    def __call__(self, output: Any, target: Any) -> Tensor:
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if not isinstance(loss, Tensor):
            raise TypeError(
                f"ModelOutputLoss takes the model's own loss, but the model returned "
                f"{type(output).__name__} without a `loss` tensor; check that the model computes a "
                f"loss when called with {self.label_key}=..., or pass a loss of the logits instead."
            )
        return loss

    def counting(self, model: nn.Module) -> str:
        """The rule for counting loss terms (``tokens`` with ``"auto"`` resolved for ``model``)."""
        if self.tokens != "auto":
            return self.tokens
        name = type(model).__name__
        return "shifted" if name.endswith(("ForCausalLM", "LMHeadModel")) else "auto"

    def __repr__(self) -> str:
        return f"ModelOutputLoss(label_key={self.label_key!r}, tokens={self.tokens!r})"


def recognise_loss(loss_fn: Callable[..., Tensor], target: Any) -> LossKind:
    """Recognise CE / MSE / BCE-with-logits (module or functional) with default options.

    Losses with class weights, label smoothing, ``pos_weight`` or soft targets are ``other``
    (handled exactly by automatic differentiation instead of a closed form).
    """
    if isinstance(loss_fn, TokenCrossEntropyLoss):
        if isinstance(target, Tensor) and not target.is_floating_point():
            return LossKind("cross_entropy", loss_fn.ignore_index, class_dim=-1,
                            shift=int(loss_fn.shift))
    elif isinstance(loss_fn, ModelOutputLoss):
        return LossKind("model_output", loss_fn.ignore_index)
    elif isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy:
        plain = not isinstance(loss_fn, nn.CrossEntropyLoss) or (
            loss_fn.weight is None and loss_fn.label_smoothing == 0.0
        )
        if plain and isinstance(target, Tensor) and not target.is_floating_point():
            ignore = loss_fn.ignore_index if isinstance(loss_fn, nn.CrossEntropyLoss) else -100
            return LossKind("cross_entropy", ignore)
    elif isinstance(loss_fn, nn.MSELoss) or loss_fn is F.mse_loss:
        return LossKind("mse")
    elif isinstance(loss_fn, nn.BCEWithLogitsLoss) or loss_fn is F.binary_cross_entropy_with_logits:
        if not isinstance(loss_fn, nn.BCEWithLogitsLoss) or (
            loss_fn.weight is None and loss_fn.pos_weight is None
        ):
            return LossKind("bce")
    return LossKind("other")


def count_loss_terms(loss_fn: Callable[..., Any], target: Any, model: nn.Module | None = None) -> int:
    """``n_b``: the number of terms a ``mean`` loss averages over, for the batch weights.

    Cross-entropy (``nn.CrossEntropyLoss``, ``F.cross_entropy``, :class:`TokenCrossEntropyLoss`):
    the targets not equal to ``ignore_index`` (after the shift of a causal LM), so that batches
    with different numbers of counted tokens (padding) are weighted exactly. The model's own loss
    (:class:`ModelOutputLoss`): by its ``tokens`` rule. Every other loss: ``target.shape[0]``.
    """
    countable = isinstance(target, Tensor) and target.device.type != "meta"  # meta: no values
    if countable and not target.is_floating_point() and target.ndim >= 1:
        if isinstance(loss_fn, ModelOutputLoss):
            rule = loss_fn.counting(model) if model is not None else loss_fn.tokens
            if rule == "shifted":
                return int((target[:, 1:] != loss_fn.ignore_index).sum())
            if rule == "labels" or (rule == "auto" and target.ndim >= 2):
                return int((target != loss_fn.ignore_index).sum())
            return int(target.shape[0])
        kind = recognise_loss(loss_fn, target)
        if kind.name == "cross_entropy":
            counted = target[:, kind.shift:] if kind.shift else target
            return int((counted != kind.ignore_index).sum())
    return default_batch_size_fn(target)


def reduction_factor(kind: LossKind, reduction: str, z: Tensor, target: Tensor) -> float:
    """``r``: 1 for ``sum``, ``1 / n_terms`` for ``mean`` (see the module docstring)."""
    if reduction == "sum":
        return 1.0
    if kind.name == "cross_entropy":
        n_terms = int(_ce_valid(kind, z, target).sum())
        return 1.0 / max(n_terms, 1)
    return 1.0 / z.numel()


def _ce_valid(kind: LossKind, z: Tensor, target: Tensor) -> Tensor:
    """Mask of the logit positions that count, shaped like ``z`` with the class dim of size 1.

    Position ``t`` counts when its target (``target[:, t + shift]``) is not ``ignore_index``; with
    a shift the last ``shift`` positions have no target and never count.
    """
    valid = target != kind.ignore_index
    if kind.shift:
        pad = valid.new_zeros(valid.shape[0], kind.shift, *valid.shape[2:])
        valid = torch.cat([valid[:, kind.shift:], pad], dim=1)
    return valid.unsqueeze(kind.class_dim).to(z.dtype)


def loss_hessian_product(
    loss_fn: Callable[..., Tensor], kind: LossKind, reduction: str, z: Tensor, target: Any,
    U: Tensor,
) -> Tensor:
    """``H_l U`` for ``U`` of shape ``[k, *z.shape]`` (the Hessian of ``loss_fn(., target)`` at ``z``)."""
    if kind.name == "model_output":
        raise ValueError(
            "the Gauss-Newton and Fisher matrices need the loss as a function of the model's "
            "output, but ModelOutputLoss uses the loss the model computes itself; pass the same "
            "objective of the logits instead (curvscope.CausalLMLoss() for a causal LM, "
            "nn.CrossEntropyLoss() for a classifier)."
        )
    if kind.name == "other":
        return _autodiff_loss_hessian_product(loss_fn, z, target, U)
    r = reduction_factor(kind, reduction, z, target)
    if kind.name == "cross_entropy":
        p = torch.softmax(z, dim=kind.class_dim)
        dim = kind.class_dim + 1 if kind.class_dim >= 0 else kind.class_dim  # in [k, *z.shape]
        HU = p * U - p * (p * U).sum(dim=dim, keepdim=True)
        return r * HU * _ce_valid(kind, z, target)
    if kind.name == "mse":
        return (2.0 * r) * U
    s = torch.sigmoid(z)
    return r * (s * (1 - s)) * U


def _autodiff_loss_hessian_product(
    loss_fn: Callable[..., Tensor], z: Tensor, target: Any, U: Tensor
) -> Tensor:
    """``H_l U`` by reverse-over-reverse autodiff of the loss alone (output space is small).

    Reverse mode twice works for every loss with a double-backward, including those whose
    backward has no forward-mode rule (``huber_loss`` in torch 2.13).
    """
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(zz, target), zz, create_graph=True)
        if not g.requires_grad:  # a loss linear in z: zero Hessian
            return torch.zeros_like(U)
        (HU,) = torch.autograd.grad(g, zz, grad_outputs=U, is_grads_batched=True,
                                    allow_unused=True, materialize_grads=True)
    return HU.detach()


def sample_nll_gradients(
    kind: LossKind, z: Tensor, target: Any, generator: torch.Generator
) -> Tensor:
    """One Monte-Carlo sample of ``g = d(-log p(y|z))/dz`` with ``y`` drawn from the model.

    ``E[g g^T]`` is the loss Hessian with reduction ``sum`` (``H_l / r``), per example.
    """
    if kind.name == "cross_entropy":
        p = torch.softmax(z, dim=kind.class_dim)
        last = p.movedim(kind.class_dim, -1)
        C = last.shape[-1]
        y = torch.multinomial(last.reshape(-1, C), 1, generator=generator).reshape(last.shape[:-1])
        onehot = F.one_hot(y, C).to(z.dtype).movedim(-1, kind.class_dim)
        return (p - onehot) * _ce_valid(kind, z, target)
    if kind.name == "mse":
        eps = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        return math.sqrt(2.0) * eps
    if kind.name == "bce":
        s = torch.sigmoid(z)
        y = torch.bernoulli(s, generator=generator)
        return s - y
    raise ValueError(
        "the Monte-Carlo Fisher needs a likelihood: it supports cross-entropy, MSE and "
        "BCE-with-logits losses (default options); use the GGN or the empirical Fisher for others."
    )
