"""Checks of the user's input that torch itself lets through silently (or explains badly).

* :func:`check_target_shape`: an element-wise built-in loss (MSE, L1, smooth L1, Huber, BCE) given
  an output and a target of different shapes broadcasts them, e.g. output ``[N, 1]`` and target
  ``[N]`` to ``[N, N]``: the loss compares every output with every target and is silently wrong.
  Cross-entropy with class indices needs the target ``[N]`` for an output ``[N, C]`` and
  ``[N, d1, ...]`` for ``[N, C, d1, ...]``.
* :func:`check_not_meta`: parameters on the ``meta`` device have shapes but no values.

Only the recognised built-in losses (modules whose ``forward`` is torch's own, the functionals, and
``functools.partial`` of a functional with keyword arguments only) are checked: a user's own loss
function (a lambda, a wrapper) may reshape as it likes and is never inspected.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (module class, functional, name of the functional) of the element-wise losses
_ELEMENTWISE: tuple[tuple[type[nn.Module], Callable[..., Tensor], str], ...] = (
    (nn.MSELoss, F.mse_loss, "F.mse_loss"),
    (nn.L1Loss, F.l1_loss, "F.l1_loss"),
    (nn.SmoothL1Loss, F.smooth_l1_loss, "F.smooth_l1_loss"),
    (nn.HuberLoss, F.huber_loss, "F.huber_loss"),
    (nn.BCEWithLogitsLoss, F.binary_cross_entropy_with_logits, "F.binary_cross_entropy_with_logits"),
    (nn.BCELoss, F.binary_cross_entropy, "F.binary_cross_entropy"),
)
# the losses over class indices along dim 1
_CLASS_INDEX: tuple[tuple[type[nn.Module], Callable[..., Tensor], str], ...] = (
    (nn.CrossEntropyLoss, F.cross_entropy, "F.cross_entropy"),
    (nn.NLLLoss, F.nll_loss, "F.nll_loss"),
)


def _builtin(loss_fn: Any, table: Iterable[tuple[type[nn.Module], Callable[..., Tensor], str]]) -> str | None:
    """The display name of ``loss_fn`` when it is one of ``table``'s built-ins, else ``None``."""
    fn = loss_fn
    if isinstance(fn, functools.partial) and not fn.args:  # partial(F.cross_entropy, weight=w)
        fn = fn.func
    for cls, functional, name in table:
        if isinstance(fn, cls) and type(fn).forward is cls.forward:  # not a subclass's own forward
            return cls.__name__
        if fn is functional:
            return name
    return None


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _reshape_call(shape: tuple[int, ...]) -> str:
    """``reshape(-1, 1)`` for a per-example shape ``[N, 1]``; ``reshape(-1)`` for ``[N]``."""
    if not shape:
        return "reshape(())"
    return "reshape(" + ", ".join(["-1", *map(str, shape[1:])]) + ")"


def check_target_shape(loss_fn: Any, output: Any, target: Any) -> None:
    """Refuse a target whose shape does not fit the output for a recognised built-in loss.

    Element-wise losses (``nn.MSELoss`` / ``F.mse_loss``, ``L1Loss``, ``SmoothL1Loss``,
    ``HuberLoss``, ``BCEWithLogitsLoss``, ``BCELoss`` and their functionals) need the target to
    have exactly the output's shape. ``CrossEntropyLoss`` / ``NLLLoss`` (and functionals) with an
    integer target need one class index per position: target ``[N]`` for output ``[N, C]``,
    ``[N, d1, ...]`` for ``[N, C, d1, ...]``, ``[]`` for ``[C]``; a floating target of
    cross-entropy is class probabilities of the output's shape. Any other loss is not checked.

    Raises:
        ValueError: the shapes do not fit; the message names both shapes and the fix.
    """
    if not isinstance(output, Tensor) or not isinstance(target, Tensor):
        return
    name = _builtin(loss_fn, _ELEMENTWISE)
    if name is not None:
        _check_elementwise(name, output, target)
        return
    name = _builtin(loss_fn, _CLASS_INDEX)
    if name is not None and output.ndim >= 1:
        _check_class_index(name, output, target)


def _check_elementwise(name: str, output: Tensor, target: Tensor) -> None:
    if target.shape == output.shape:
        return
    out, tgt = tuple(output.shape), tuple(target.shape)
    try:
        joint = f"torch would broadcast the pair to {list(torch.broadcast_shapes(out, tgt))}: a wrong loss"
    except RuntimeError:
        joint = "the shapes do not even broadcast"
    if out[:-1] == tgt and out[-1:] == (1,):
        fix = ("squeeze the output with output_fn=lambda out: out.squeeze(-1), or give the target "
               "the output's shape in batch_fn (target.view_as(output), i.e. target.unsqueeze(-1))")
    elif output.numel() == target.numel():
        fix = (f"give the target the output's shape in batch_fn (target.view_as(output), i.e. "
               f"target.{_reshape_call(out)}), or reshape the output with output_fn")
    else:
        fix = ("give the target the output's shape (for class labels use nn.CrossEntropyLoss, or "
               "one-hot encode them with F.one_hot(target, C).to(output.dtype))")
    raise ValueError(
        f"{name} compares output and target element by element and needs a target of the output's "
        f"shape {_shape(output)}, got target {_shape(target)} ({joint}); {fix}."
    )


def _check_class_index(name: str, output: Tensor, target: Tensor) -> None:
    out, tgt = tuple(output.shape), tuple(target.shape)
    if target.is_floating_point() and name in ("CrossEntropyLoss", "F.cross_entropy"):
        if tgt != out:
            raise ValueError(
                f"{name} reads a floating target as class probabilities of the output's shape "
                f"{_shape(output)}, got target {_shape(target)}; pass class indices as an integer "
                "tensor (target.long()) or probabilities of the output's shape."
            )
        return
    expected = out[:1] + out[2:] if len(out) >= 2 else ()
    if tgt == expected:
        return
    if tgt == expected + (1,):
        fix = "drop the trailing 1 with target.squeeze(-1) in batch_fn"
    elif tgt == out:
        fix = ("the target looks one-hot: pass class indices (target.argmax(1)) or, for "
               "cross-entropy, probabilities (target.float())")
    elif len(out) >= 3 and tgt == out[:-1]:
        fix = ("the classes must be dim 1, not the last dim: move them with "
               "output_fn=lambda out: out.movedim(-1, 1) (out.logits.movedim(-1, 1) for a "
               "HuggingFace-style output)")
    elif target.numel() == math.prod(expected):
        fix = f"reshape it with target.{_reshape_call(expected)} in batch_fn"
    else:
        fix = "give one class index per output row (and per position for [N, C, d1, ...] outputs)"
    want = "[]" if not expected else str(list(expected))
    raise ValueError(
        f"{name} with class-index targets needs target {want} for output {_shape(output)} "
        f"([N, C] -> [N], [N, C, d1, ...] -> [N, d1, ...]), got target {_shape(target)}; {fix}."
    )


def check_not_meta(model: nn.Module) -> None:
    """Refuse a model whose parameters or buffers are on the ``meta`` device (no values).

    Raises:
        ValueError: naming the meta tensors and the fix (``model.to_empty(device=...)``, then load
            the weights).
    """
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if not meta:
        return
    shown = meta if len(meta) <= 4 else [*meta[:3], f"... ({len(meta)} in all)"]
    raise ValueError(
        f"the model's tensors {shown} are on the meta device (shapes only, no values), expected "
        "real tensors; materialise the model with model.to_empty(device='cpu') (or 'cuda') and "
        "then load its weights with model.load_state_dict(...), or build it on a real device."
    )


__all__ = ["check_not_meta", "check_target_shape"]
