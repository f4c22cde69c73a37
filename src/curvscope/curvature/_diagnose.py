"""Where a curvature product failed: the module that calls the kernel torch's error names.

Autograd reports a missing derivative by the name of an aten kernel
(``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
implemented``), which says nothing about the user's model. :func:`locate_failure` runs one
forward on the first batch under a dispatch mode that records, for every aten kernel, the module
that was executing when it was called, and matches the kernel of the message against them.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

_OP_PATTERNS = (
    r"aten::(\w+)", r"with (\w+) that does not support", r"for (\w+) is not implemented",
)


def failing_kernel(err: BaseException) -> str | None:
    """The aten kernel an autograd error names, without ``_backward`` / overload suffixes."""
    text = str(err)
    for pattern in _OP_PATTERNS:
        match = re.search(pattern, text)
        if match:
            name = match.group(1)
            return re.sub(r"_backward$", "", name)
    return None


class _KernelsByModule(TorchDispatchMode):
    """Records ``kernel name -> innermost module (path, type)`` during a forward."""

    def __init__(self, stack: list[tuple[str, str]]) -> None:
        super().__init__()
        self.stack = stack
        self.seen: dict[str, tuple[str, str]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func).split(".")[1] if str(func).startswith("aten.") else str(func)
        if self.stack and name not in self.seen:
            self.seen[name] = self.stack[-1]
        return func(*args, **(kwargs or {}))


def locate_failure(problem: Any, err: BaseException) -> str:
    """``"MultiheadAttention 'encoder.layers.0.self_attn' (kernel ...)"``, or a plain description.

    Never raises: a failure to locate gives a description of the kernel alone.
    """
    kernel = failing_kernel(err)
    if "autograd.Function" in str(err) or "once_differentiable" in str(err):
        return "a custom torch.autograd.Function of the model"
    if kernel is None:
        return f"the model {type(problem.model).__name__}"
    try:
        found = _find_module(problem, kernel)
    except Exception:  # noqa: BLE001 - diagnosis is best effort
        found = None
    if found is None:
        return f"kernel {kernel} of the model {type(problem.model).__name__}"
    path, kind = found
    return f"{kind} {path!r} (kernel {kernel})"


def _find_module(problem: Any, kernel: str) -> tuple[str, str] | None:
    names = {m: n for n, m in problem.model.named_modules()}
    stack: list[tuple[str, str]] = []

    def enter(module: nn.Module, args: Any) -> None:
        stack.append((names.get(module, "?") or "(root)", type(module).__name__))

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if stack:
            stack.pop()

    recorder = _KernelsByModule(stack)
    pre = nn.modules.module.register_module_forward_pre_hook(enter)
    post = nn.modules.module.register_module_forward_hook(leave)
    try:
        if not problem.forward_first_batch(recorder):
            return None
    finally:
        pre.remove()
        post.remove()
    for name, where in recorder.seen.items():
        if name == kernel or name.startswith(kernel) or kernel.startswith(name):
            return where
    return None


__all__ = ["failing_kernel", "locate_failure"]
