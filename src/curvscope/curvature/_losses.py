"""Output-space curvature of the loss: closed-form Hessians and Fisher samples for CE, MSE, BCE.

For a batch with outputs ``z`` and the user's loss ``l(z, y)``, the Gauss-Newton matrix needs
``H_l = d^2 l / dz^2``. For the three standard losses it has a closed form, with ``r`` the
reduction factor (``1`` for ``sum``; ``1/n_terms`` for ``mean``):

* cross-entropy (softmax over dim 1): ``H_l = r * blockdiag(diag(p) - p p^T)``, ``p = softmax(z)``,
  ``n_terms`` = number of targets not equal to ``ignore_index``;
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


@dataclass(frozen=True)
class LossKind:
    """A recognised loss: its name and the parameters the closed forms need."""

    name: str  # "cross_entropy" | "mse" | "bce" | "other"
    ignore_index: int = -100


def recognise_loss(loss_fn: Callable[..., Tensor], target: Any) -> LossKind:
    """Recognise CE / MSE / BCE-with-logits (module or functional) with default options.

    Losses with class weights, label smoothing, ``pos_weight`` or soft targets are ``other``
    (handled exactly by automatic differentiation instead of a closed form).
    """
    if isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy:
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


def reduction_factor(kind: LossKind, reduction: str, z: Tensor, target: Tensor) -> float:
    """``r``: 1 for ``sum``, ``1 / n_terms`` for ``mean`` (see the module docstring)."""
    if reduction == "sum":
        return 1.0
    if kind.name == "cross_entropy":
        n_terms = int((target != kind.ignore_index).sum())
        return 1.0 / max(n_terms, 1)
    return 1.0 / z.numel()


def _ce_valid(kind: LossKind, z: Tensor, target: Tensor) -> Tensor:
    """``[n, 1, ...]`` mask of the positions that count (target != ignore_index)."""
    return (target != kind.ignore_index).unsqueeze(1).to(z.dtype)


def loss_hessian_product(
    loss_fn: Callable[..., Tensor], kind: LossKind, reduction: str, z: Tensor, target: Any,
    U: Tensor,
) -> Tensor:
    """``H_l U`` for ``U`` of shape ``[k, *z.shape]`` (the Hessian of ``loss_fn(., target)`` at ``z``)."""
    if kind.name == "other":
        return _autodiff_loss_hessian_product(loss_fn, z, target, U)
    r = reduction_factor(kind, reduction, z, target)
    if kind.name == "cross_entropy":
        p = torch.softmax(z, dim=1)
        HU = p * U - p * (p * U).sum(dim=2, keepdim=True)  # dim 2 of [k, n, C, ...] is C
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
        p = torch.softmax(z, dim=1)
        C = z.shape[1]
        flat_p = p.movedim(1, -1).reshape(-1, C)
        y = torch.multinomial(flat_p, 1, generator=generator).reshape(*p.movedim(1, -1).shape[:-1])
        onehot = F.one_hot(y, C).to(z.dtype).movedim(-1, 1)
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
