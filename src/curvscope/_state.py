"""A result as plain state and back: frozen dataclasses walked field by field.

:func:`to_state` turns a curvscope result (``EigenResult``, ``SpectralDensity``, ``Cost``,
``ClassStructure``, ... and any nesting of them in dicts, lists and tuples) into tensors, numbers,
strings, dicts and lists, which ``torch.save`` writes and ``torch.load(weights_only=True)`` reads
without executing code; :func:`from_state` builds the objects again. A dataclass is named by its
``module:qualname`` and rebuilt only when it is a dataclass of this package, so a state file can
never make the loader import or construct anything else.

The stage store of a resumable analysis (:mod:`curvscope._stages`) saves each finished stage this
way, and a result bundle (:mod:`curvscope.report.bundle`) writes the same state as JSON, its arrays
sent to an npz by the ``array`` hook; a new result type needs nothing here, only to be a dataclass.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import Tensor

DATACLASS = "__dataclass__"
TUPLE = "__tuple__"
#: The key of an array reference (written by an ``array`` hook, read back by a ``lookup``).
ARRAY = "__array__"
RESERVED = (DATACLASS, TUPLE, ARRAY)
PACKAGE = "curvscope"

ArrayHook = Callable[[Any, str], Any]  # (tensor or numpy array, its path) -> what is written
FieldFilter = Callable[[Any, dataclasses.Field], bool]  # (object, field) -> write it?


def _host(value: Any, where: str) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    raise TypeError(f"{where}: a numpy array cannot be saved as state; give a tensor.")


def to_state(obj: Any, where: str = "result", *, array: ArrayHook = _host,
             keep: FieldFilter | None = None) -> Any:
    """``obj`` as tensors, numbers, strings, ``None``, dicts (string keys) and lists.

    Args:
        obj: a result (any nesting of dataclasses, dicts, lists and tuples).
        where: the path of ``obj``; every value's path extends it (``top.eigenvalues``).
        array: what a tensor or numpy array becomes, given it and its path (default: the tensor
            on the host; numpy arrays refused).
        keep: which dataclass fields to write (the others are written as ``None``).

    Raises:
        TypeError: a value that is none of these nor a dataclass (the field's path is named), or
            a dict with a reserved key (``__dataclass__``, ``__tuple__``, ``__array__``).
    """
    if isinstance(obj, (Tensor, np.ndarray)):
        return array(obj, where)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()

    def walk(value: Any, path: str) -> Any:
        return to_state(value, path, array=array, keep=keep)

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        fields = {f.name: walk(getattr(obj, f.name), f"{where}.{f.name}")
                  if keep is None or keep(obj, f) else None for f in dataclasses.fields(obj)}
        return {DATACLASS: f"{cls.__module__}:{cls.__qualname__}", **fields}
    if isinstance(obj, tuple):
        return {TUPLE: [walk(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [walk(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"{where}: dict keys must be strings to be saved.")
        reserved = [k for k in obj if k in RESERVED]
        if reserved:
            raise TypeError(f"{where}: the keys {reserved} are reserved; rename them.")
        return {k: walk(v, f"{where}.{k}") for k, v in obj.items()}
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be saved; give tensors, arrays, "
                    "numbers, strings, lists, dicts or dataclasses.")


def from_state(state: Any, where: str = "result", *,
               lookup: Callable[[dict[str, Any], str], Any] | None = None) -> Any:
    """The objects :func:`to_state` was given, rebuilt.

    Args:
        state: what :func:`to_state` returned (or its JSON).
        where: the path of ``state``, for the error messages.
        lookup: the array an ``{"__array__": ...}`` reference stands for (given the reference
            and its path); needed when ``to_state`` had an ``array`` hook that wrote references.

    Raises:
        ValueError: a dataclass name outside this package, or one that no longer exists, or a
            dataclass whose required fields are missing (named).
    """
    def walk(value: Any, path: str) -> Any:
        return from_state(value, path, lookup=lookup)

    if isinstance(state, list):
        return [walk(v, f"{where}[{i}]") for i, v in enumerate(state)]
    if not isinstance(state, dict):
        return state
    if ARRAY in state:
        if lookup is None:
            raise ValueError(f"{where}: an array reference, and no arrays to look it up in.")
        return lookup(state, where)
    if TUPLE in state:
        return tuple(walk(v, f"{where}[{i}]") for i, v in enumerate(state[TUPLE]))
    if DATACLASS not in state:
        return {k: walk(v, f"{where}.{k}") for k, v in state.items()}
    cls = _dataclass(state[DATACLASS])
    values = {k: walk(v, f"{where}.{k}") for k, v in state.items() if k != DATACLASS}
    return _build(cls, values, where)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where} has the fields {unknown}, which {cls.__name__} of this "
                         "curvscope does not have; it was written by another version.")
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where} lacks {missing[0]!r} (a {cls.__name__} needs "
                         f"{', '.join(map(repr, missing))}); the file is corrupted or was written "
                         "by another program.")
    return cls(**values)


def _dataclass(name: str) -> type:
    module, _, qualname = str(name).partition(":")
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        raise ValueError(f"state names {name!r}, not a {PACKAGE} dataclass; refusing to build it.")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"state names {name!r}, which this curvscope does not have "
                         f"({err}); the state was written by another version.") from err
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise ValueError(f"state names {name!r}, which is not a dataclass.")
    return obj
