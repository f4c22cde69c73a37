"""Results to JSON plus arrays and back: the state walk of :mod:`curvscope._state`, with arrays
sent to the bundle's ``arrays.npz``.

A result is written as its state (:func:`curvscope._state.to_state`: dataclasses field by field,
named by class), every tensor or numpy array replaced by a reference
``{"__array__": key, "dtype": .., "shape": ..}`` (a short 1-D array also shows its ``values``,
for people reading the file) and kept bit for bit in its own dtype in :class:`Arrays`. Reading
(:func:`from_document`) walks the same state back, so a field added to a result class, or a new
section class, is saved and read with no code here.

Example:
    >>> import torch
    >>> from curvscope._diagnostics import Cost
    >>> from curvscope.solvers._results import EigenResult
    >>> r = EigenResult(torch.tensor([2.0, 1.0]), None, torch.zeros(2),
    ...                 torch.ones(2, dtype=torch.bool), "lanczos", "LA", 1e-8, 3, Cost(10, 10, 10, 0.1))
    >>> arrays = Arrays()
    >>> doc = to_document(r, "top", arrays)
    >>> doc["eigenvalues"]["__array__"], doc["eigenvalues"]["values"], doc["method"]
    ('top.eigenvalues', [2.0, 1.0], 'lanczos')
    >>> back = from_document(doc, arrays.restored(), "top")
    >>> torch.equal(back.eigenvalues, r.eigenvalues) and back.cost == r.cost
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from curvscope._state import ARRAY, from_state, to_state

__all__ = ["Arrays", "CodecError", "from_document", "jsonable", "restore", "to_document"]

#: 1-D arrays up to this length also show their values in the JSON.
MAX_JSON_VALUES = 1000


class CodecError(ValueError):
    """A document that does not rebuild (a missing field or array, an unknown class or dtype)."""


class Arrays:
    """The arrays of a document and the manifest that describes them (dtype, shape, container)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.manifest: dict[str, dict[str, Any]] = {}

    def add(self, key: str, value: Tensor | np.ndarray) -> str:
        """Keep ``value`` under ``key`` (``key#2``, ... when taken); returns the key used."""
        base, n = key, 1
        while key in self.arrays:
            n += 1
            key = f"{base}#{n}"
        if isinstance(value, Tensor):
            t = value.detach().cpu()
            container, dtype = "torch", str(t.dtype)
            if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
                t = t.to(torch.float32)
            arr = t.numpy()
        else:
            arr = np.asarray(value)
            container, dtype = "numpy", str(arr.dtype)
            if arr.dtype == object:
                raise TypeError(f"array {key!r} has dtype object; only numeric arrays can be saved.")
        self.arrays[key] = arr
        self.manifest[key] = {"dtype": dtype, "shape": list(arr.shape), "container": container}
        return key

    def reference(self, value: Tensor | np.ndarray, key: str) -> dict[str, Any]:
        """Keep ``value`` and return what the JSON shows in its place."""
        key = self.add(key, value)
        spec = self.manifest[key]
        ref: dict[str, Any] = {ARRAY: key, "dtype": spec["dtype"], "shape": spec["shape"]}
        if len(spec["shape"]) == 1 and spec["shape"][0] <= MAX_JSON_VALUES:
            ref["values"] = self.arrays[key].tolist()
        return ref

    def restored(self) -> dict[str, Tensor | np.ndarray]:
        """The arrays as they come back from a file (tensors in their torch dtype)."""
        return {k: restore(a, self.manifest[k]) for k, a in self.arrays.items()}


def restore(arr: np.ndarray, spec: Mapping[str, Any]) -> Tensor | np.ndarray:
    """An array read from the npz, as it was saved (a tensor of its torch dtype, or numpy)."""
    if spec["container"] == "numpy":
        return arr
    name = str(spec["dtype"])
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise CodecError(f"unknown torch dtype {name!r} in the arrays manifest.")
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.to(dtype) if t.dtype != dtype else t


def jsonable(obj: Any) -> Any:
    """Plain JSON types from a dict of figures (numbers, tensors' scalars, tuples as lists,
    dtypes, devices and paths as strings): for the document's own entries, which are read as
    plain JSON (provenance, key numbers), not rebuilt.
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON; give numbers, strings, lists, "
                    "dicts, or arrays (tensors / numpy arrays go to arrays.npz).")


def _saved_field(obj: Any, f: dataclasses.Field, skip: frozenset[str]) -> bool:
    """A field goes to the bundle unless it is named in ``skip`` or says
    ``metadata={"bundle": False}`` (a ``[P, n]`` work array kept for resume only).
    """
    return f.name not in skip and f.metadata.get("bundle", True)


def to_document(obj: Any, key: str, arrays: Arrays, skip: frozenset[str] = frozenset()) -> Any:
    """``obj``'s state as JSON values, its arrays added to ``arrays`` under dotted keys from
    ``key`` (dataclass fields named in ``skip`` are written as ``None``).

    Raises:
        TypeError: a value that cannot be saved (its path is named).
    """
    return to_state(obj, key, array=lambda value, where: arrays.reference(value, where),
                    keep=lambda o, f: _saved_field(o, f, skip))


def from_document(doc: Any, arrays: Mapping[str, Any], where: str) -> Any:
    """The object :func:`to_document` wrote, its arrays taken from ``arrays``.

    Raises:
        CodecError: a missing array, field or class (named).
    """
    def lookup(ref: dict[str, Any], path: str) -> Any:
        try:
            return arrays[ref[ARRAY]]
        except KeyError:
            raise CodecError(f"{path}: the array {ref[ARRAY]!r} is missing.") from None

    try:
        return from_state(doc, where, lookup=lookup)
    except CodecError:
        raise
    except (ValueError, TypeError) as err:
        raise CodecError(str(err)) from err
