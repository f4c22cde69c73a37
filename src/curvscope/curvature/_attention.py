"""Attention kernels and second derivatives: the switch to the math path of SDPA.

``F.scaled_dot_product_attention`` dispatches to fused kernels (flash, memory-efficient, cuDNN;
on the CPU too) that have a first derivative but no second one and no forward-mode rule, so every
exact Hessian or Gauss-Newton product of a model that uses them fails ("derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"). The math backend
computes the same function from ``softmax(Q K^T / sqrt(d) + M) V`` with ordinary, twice
differentiable ops. The eval-mode fast path of ``nn.TransformerEncoderLayer`` /
``nn.MultiheadAttention`` (``aten::_transformer_encoder_layer_fwd``, taken when no input needs a
gradient, as in forward-mode products) has no derivative at all, and with a padding mask it
returns zeros at padded positions where the ordinary path returns values.

So curvscope runs every product with the fast path off (always: it changes no value the user's
training sees, and makes every pass compute the same function), and its exact second-order
products (the Hessian engines and forward-mode Jacobian products) with SDPA restricted to the math
backend, when ``attention="auto"`` (the default) or ``"math"``. With ``"native"`` the kernels are
left as they are: use that with ``engine="finite_difference"``, which needs first derivatives only.

Cost: the math path materialises the attention weights ``[B, heads, T_q, T_k]`` of every attention
call and keeps them for the backward passes; :func:`probe_attention` measures the calls of one
forward so that curvscope can say how much that is, once, when it switches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ATTENTION_MODES = ("auto", "math", "native")

# aten kernels behind F.scaled_dot_product_attention that have no double backward / forward AD
_FUSED_SDPA = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)
_FAST_PATH = ("_transformer_encoder_layer_fwd", "_native_multi_head_attention")


class AttentionBackendWarning(UserWarning):
    """curvscope runs this model's attention on the math SDPA path for second derivatives."""


@dataclass
class AttentionProbe:
    """What one forward of the model does with attention kernels.

    Attributes:
        fused_calls: ``(kernel, query shape, key shape)`` of every fused SDPA call.
        fast_path_calls: names of fast-path kernels called (eval-mode Transformer layers).
    """

    fused_calls: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    fast_path_calls: list[str] = field(default_factory=list)

    @property
    def uses_fused_attention(self) -> bool:
        """Whether a fused SDPA kernel (no second derivative) ran."""
        return bool(self.fused_calls)

    def math_weights_bytes(self, itemsize: int) -> int:
        """Bytes of the attention weights ``[B, h, T_q, T_k]`` the math path stores per forward.

        Two tensors of that size per call (the scores and their softmax) are kept for the backward.
        """
        total = 0
        for _, q, k in self.fused_calls:
            batch = 1
            for d in q[:-2]:
                batch *= d
            total += 2 * batch * q[-2] * k[-2] * itemsize
        return total

    def describe(self, itemsize: int) -> str:
        """One clause: the calls, their shapes and the memory the math path adds."""
        n = len(self.fused_calls)
        _, q, k = self.fused_calls[0]
        mib = self.math_weights_bytes(itemsize) / 2**20
        return (f"{n} fused scaled_dot_product_attention call(s) per forward (query {list(q)}, key "
                f"{list(k)}); the math path keeps their attention weights, about {mib:.3g} MiB more "
                "per batch of this size")


class _AttentionRecorder(TorchDispatchMode):
    """Records fused SDPA and fast-path kernels (a dispatch mode sees them however deeply nested)."""

    def __init__(self) -> None:
        super().__init__()
        self.probe = AttentionProbe()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        if any(k in name for k in _FUSED_SDPA) and len(args) >= 2:
            self.probe.fused_calls.append((name, tuple(args[0].shape), tuple(args[1].shape)))
        elif any(k in name for k in _FAST_PATH):
            self.probe.fast_path_calls.append(name)
        return func(*args, **(kwargs or {}))


def probe_attention(run: Callable[[Any], Any]) -> AttentionProbe:
    """The attention kernels of one forward: ``run(recorder)`` runs it under the recording mode
    (native kernels; :meth:`curvscope.Problem.forward_first_batch`).
    """
    recorder = _AttentionRecorder()
    run(recorder)
    return recorder.probe


@contextlib.contextmanager
def fast_path_disabled() -> Iterator[None]:
    """``torch.backends.mha`` fast path off for the duration (restored afterwards)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):  # pragma: no cover - old torch
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


@contextlib.contextmanager
def product_context(mode: str, second_order: bool) -> Iterator[None]:
    """The kernel settings of one curvature product.

    Args:
        mode: ``"auto"`` / ``"math"``: SDPA on its math backend for second-order products;
            ``"native"``: kernels untouched.
        second_order: whether the product differentiates twice or in forward mode (exact
            engines); finite-difference products need first derivatives only.
    """
    with fast_path_disabled():
        if second_order and mode != "native":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                yield
        else:
            yield


__all__ = [
    "ATTENTION_MODES",
    "AttentionBackendWarning",
    "AttentionProbe",
    "fast_path_disabled",
    "probe_attention",
    "product_context",
]
