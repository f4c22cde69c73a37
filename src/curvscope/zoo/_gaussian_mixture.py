"""The Gaussian-mixture classifier of Sagun et al. (2017).

Inputs ``x in R^d`` (``d = 100``) drawn from ``C`` Gaussian classes ``x = mu_c + sigma * eps``
with random class means ``mu_c ~ N(0, I_d / d) * separation``; an MLP ``d -> 30 -> 30 -> C`` with
tanh activations trained with cross-entropy.

References:
    L. Sagun, U. Evci, V. U. Guney, Y. Dauphin, L. Bottou, "Empirical analysis of the Hessian of
    over-parametrized neural networks", ICLR workshop 2018 (arXiv:1706.04454).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class ZooProblem:
    """A ready problem: model, loss, batches, and facts about it."""

    name: str
    model: nn.Module
    loss_fn: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    num_classes: int
    train_loss: float
    train_accuracy: float


def gaussian_mixture(
    num_classes: int = 10,
    *,
    input_dim: int = 100,
    hidden: int = 30,
    n_per_class: int = 100,
    batch_size: int = 250,
    separation: float = 3.0,
    noise: float = 1.0,
    train_steps: int = 300,
    lr: float = 1e-2,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> ZooProblem:
    """Build and train Sagun et al.'s Gaussian-mixture MLP (inputs ``R^100``, two hidden layers of 30).

    Training is full-batch Adam for ``train_steps`` steps (about a second on a CPU).

    Returns:
        A :class:`ZooProblem` whose ``batches`` cover ``num_classes * n_per_class`` examples.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, input_dim, generator=g, dtype=dtype) * (
        separation / input_dim**0.5
    )
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    X = means[y] + noise / input_dim**0.5 * torch.randn(len(y), input_dim, generator=g, dtype=dtype)
    perm = torch.randperm(len(y), generator=g)
    X, y = X[perm], y[perm]
    torch_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)  # nn.Linear initialisation; the caller's global RNG is restored
        model = nn.Sequential(
            nn.Linear(input_dim, hidden), nn.Tanh(),
            nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, num_classes),
        ).to(dtype)
    finally:
        torch.random.set_rng_state(torch_state)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(train_steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    with torch.no_grad():
        logits = model(X)
        train_loss = float(loss_fn(logits, y))
        accuracy = float((logits.argmax(1) == y).double().mean())
    batches = [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]
    return ZooProblem(f"gaussian_mixture(C={num_classes})", model, loss_fn, batches, num_classes,
                      train_loss, accuracy)
