"""Shared machinery of the zoo: the :class:`ZooProblem` record, seeded training, evaluation.

Every builder in the zoo

* draws its data from an explicit ``torch.Generator`` and initialises its model inside
  ``torch.random.fork_rng``, so the caller's global random state is exactly as it was;
* trains with Adam on the CPU for a fixed, seeded schedule (deterministic for a seed on a given
  machine and torch version);
* returns the model with its parameters' ``.grad`` cleared, in eval mode (BatchNorm uses its
  running statistics), and the training batches the loss is defined over.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

Batches = list[tuple[Tensor, Tensor]]


@dataclass
class ZooProblem:
    """A ready problem: a trained model, its loss, its data, and facts about it.

    Attributes:
        name: e.g. ``"gaussian_mixture(C=10)"``.
        model: the trained ``nn.Module``, in eval mode, on the CPU.
        loss_fn: the criterion, reduction ``"mean"``.
        batches: training batches ``(inputs, target)``; the empirical risk is the mean of the
            loss over all their examples (what :class:`curvscope.Problem` measures).
        num_classes: number of classes (the vocabulary size for a language model).
        train_loss: mean loss over ``batches`` of the trained model (eval mode).
        train_accuracy: fraction of correct argmax predictions over ``batches`` (per token for
            a language model).
        test_batches: held-out batches from the same distribution (``None`` if there are none).
        test_loss, test_accuracy: the same measures on ``test_batches``.
        checkpoints: ``(step, state_dict)`` pairs saved along training (step ``0`` is the
            initialisation; the last pair is the trained model), the format of
            :func:`curvscope.analysis.checkpoint_sweep` and of the CLI. Load one with
            :meth:`model_at`; :attr:`checkpoint_steps` lists the steps.
        input_shape: the shape of one input example (without the batch dimension).
        description: what the data and the model are, in a sentence or two.
        metadata: anything else worth keeping (seed, hyperparameters, the vocabulary, ...).
    """

    name: str
    model: nn.Module
    loss_fn: nn.Module
    batches: Batches
    num_classes: int
    train_loss: float
    train_accuracy: float
    test_batches: Batches | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None
    checkpoints: list[tuple[int, dict[str, Tensor]]] = field(default_factory=list)
    input_shape: tuple[int, ...] | None = None
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        """Number of trainable parameter entries of the model."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def checkpoint_steps(self) -> list[int]:
        """The optimiser steps at which ``checkpoints`` were saved."""
        return [step for step, _ in self.checkpoints]

    @property
    def num_train(self) -> int:
        """Number of training examples (sequences for a language model)."""
        return sum(int(y.shape[0]) for _, y in self.batches)

    def problem(self, *, test: bool = False, **kwargs: Any) -> Any:
        """A :class:`curvscope.Problem` on the training (or, with ``test=True``, held-out) data.

        Keyword arguments are passed on to :class:`curvscope.Problem`.

        Raises:
            ValueError: ``test=True`` on a problem without held-out data.
        """
        from curvscope.curvature import Problem

        data = self.batches
        if test:
            if self.test_batches is None:
                raise ValueError(f"{self.name} has no held-out data; use test=False.")
            data = self.test_batches
        return Problem(self.model, self.loss_fn, data, **kwargs)

    def model_at(self, index: int) -> nn.Module:
        """A copy of the model with the parameters of ``checkpoints[index]`` (in eval mode).

        Raises:
            IndexError: no such checkpoint.
        """
        if not -len(self.checkpoints) <= index < len(self.checkpoints):
            raise IndexError(
                f"checkpoint index {index} out of range: {len(self.checkpoints)} checkpoints at "
                f"steps {self.checkpoint_steps}."
            )
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.checkpoints[index][1])
        return model.eval()


# ---------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global CPU generator for the duration, then restore the caller's state.

    Used around ``nn.Module`` construction (its initialisers draw from the global generator).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """Check an integer argument, with a message naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


def check_float_dtype(dtype: Any) -> torch.dtype:
    """Check a floating dtype argument."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float64), got {dtype!r}.")
    return dtype


def split_batches(X: Tensor, y: Tensor, batch_size: int) -> Batches:
    """Consecutive batches ``(X[i:i+b], y[i:i+b])`` (the last one may be shorter)."""
    return [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, int(y.shape[0]), batch_size)]


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the model's ``state_dict``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    X: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int | None,
    generator: torch.Generator,
    checkpoint_steps: Sequence[int] = (),
    target_loss: float | None = None,
    weight_decay: float = 0.0,
) -> list[tuple[int, dict[str, Tensor]]]:
    """Adam for ``steps`` steps on ``(X, y)``, in train mode; returns ``(step, state_dict)`` pairs.

    ``batch_size=None`` is full-batch training; otherwise minibatches are drawn without
    replacement (a fresh permutation from ``generator`` every epoch). With ``target_loss``
    (full batch only), training stops at the first step whose loss is at most ``target_loss``.
    The final state is always the last checkpoint. ``.grad`` is cleared and the model is left
    in eval mode.
    """
    wanted = set(checkpoint_steps)
    checkpoints: list[tuple[int, dict[str, Tensor]]] = []
    n = int(y.shape[0])
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    order = torch.empty(0, dtype=torch.long)
    pos = 0
    step = 0
    while True:
        if step in wanted:
            checkpoints.append((step, snapshot(model)))
        if step >= steps:
            break
        if batch_size is None or batch_size >= n:
            xb, yb = X, y
        else:
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=generator), 0
            idx = order[pos : pos + batch_size]
            pos += batch_size
            xb, yb = X[idx], y[idx]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        if target_loss is not None and float(loss.detach()) <= target_loss:
            break
        loss.backward()
        opt.step()
        step += 1
    if not checkpoints or checkpoints[-1][0] != step:
        checkpoints.append((step, snapshot(model)))
    for p in model.parameters():
        p.grad = None
    model.eval()
    return checkpoints


def evaluate(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
             batches: Batches) -> tuple[float, float]:
    """Mean loss (batches weighted by ``target.shape[0]``, as in :class:`curvscope.Problem`)
    and argmax accuracy (over every target entry) of ``model`` in its current mode.
    """
    total = correct = count = 0.0
    n_total = 0
    with torch.no_grad():
        for x, y in batches:
            out = model(x)
            n = int(y.shape[0])
            total += float(loss_fn(out, y)) * n
            n_total += n
            correct += float((out.argmax(-1) == y).sum())
            count += y.numel()
    return total / n_total, correct / count
