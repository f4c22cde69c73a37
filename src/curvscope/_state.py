"""A result as plain state and back: frozen dataclasses walked field by field.

:func:`to_state` turns a curvscope result (``EigenResult``, ``SpectralDensity``, ``Cost``,
``ClassStructure``, ... and any nesting of them in dicts, lists and tuples) into tensors, numbers,
strings, dicts and lists, which ``torch.save`` writes and ``torch.load(weights_only=True)`` reads
without executing code; :func:`from_state` builds the objects again. A dataclass is named by its
``module:qualname`` and rebuilt only when it is a dataclass of this package, so a state file can
never make the loader import or construct anything else.

The stage store of a resumable analysis (:mod:`curvscope._stages`) saves each finished stage this
way; a new result type needs nothing here, only to be a dataclass.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from torch import Tensor

DATACLASS = "__dataclass__"
TUPLE = "__tuple__"
PACKAGE = "curvscope"


def to_state(obj: Any) -> Any:
    """``obj`` as tensors, numbers, strings, ``None``, dicts (string keys) and lists.

    Raises:
        TypeError: a value that is none of these nor a dataclass (the field's path is named).
    """
    return _encode(obj, "result")


def _encode(obj: Any, where: str) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        fields = {f.name: _encode(getattr(obj, f.name), f"{where}.{f.name}")
                  for f in dataclasses.fields(obj)}
        return {DATACLASS: f"{cls.__module__}:{cls.__qualname__}", **fields}
    if isinstance(obj, tuple):
        return {TUPLE: [_encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"{where}: dict keys must be strings to be saved.")
        return {k: _encode(v, f"{where}.{k}") for k, v in obj.items()}
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be saved as state.")


def from_state(state: Any) -> Any:
    """The objects :func:`to_state` was given, rebuilt.

    Raises:
        ValueError: a dataclass name outside this package, or one that no longer exists.
    """
    if isinstance(state, list):
        return [from_state(v) for v in state]
    if not isinstance(state, dict):
        return state
    if TUPLE in state:
        return tuple(from_state(v) for v in state[TUPLE])
    if DATACLASS not in state:
        return {k: from_state(v) for k, v in state.items()}
    cls = _dataclass(state[DATACLASS])
    return cls(**{k: from_state(v) for k, v in state.items() if k != DATACLASS})


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
