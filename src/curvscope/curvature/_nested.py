"""Nested batches: the tensors inside tensors, dicts, tuples and lists, and the default batch size."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import Tensor


def tensors_of(obj: Any) -> Iterator[Tensor]:
    """Every tensor inside ``obj`` (tensors, mappings, tuples, lists), depth first."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from tensors_of(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from tensors_of(v)


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    return obj


def default_batch_size_fn(target: Any) -> int:
    """Number of examples in a batch: the first dimension of the target tensor."""
    for t in tensors_of(target):
        if t.ndim == 0:
            return 1
        return int(t.shape[0])
    raise TypeError(
        f"cannot infer the batch size from a target of type {type(target).__name__}; pass "
        "batch_size_fn=lambda target: n to the Problem."
    )


__all__ = ["default_batch_size_fn"]
