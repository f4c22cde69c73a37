"""ParamSpace: the map between flat vectors ``[P]`` / ``[P, k]`` and per-parameter tensors."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ParamSpace:
    """Names, shapes and offsets of the selected parameters, flattened in a fixed order.

    A flat vector ``v`` of length ``P = sum_i numel_i`` holds parameter ``i`` in
    ``v[offsets[i] : offsets[i] + numels[i]]``, reshaped to ``shapes[i]`` (row-major).

    Example:
        >>> import torch
        >>> space = ParamSpace(("w", "b"), ((2, 3), (2,)), torch.float64, torch.device("cpu"))
        >>> space.size
        8
        >>> parts = space.split(torch.arange(8.0, dtype=torch.float64))
        >>> parts["b"].tolist()
        [6.0, 7.0]
        >>> space.join(parts).tolist() == list(range(8))
        True
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def from_tensors(cls, params: Mapping[str, Tensor]) -> ParamSpace:
        """Build from an ordered ``{name: tensor}`` dict (all on one device and dtype)."""
        if not params:
            raise ValueError(
                "no parameters selected: expected at least one trainable parameter; check "
                "`params=` or that some parameters have requires_grad=True."
            )
        tensors = list(params.values())
        dtypes = {t.dtype for t in tensors}
        devices = {t.device for t in tensors}
        if len(dtypes) > 1 or len(devices) > 1:
            groups: dict[str, list[str]] = {}
            for name, t in params.items():
                groups.setdefault(f"{t.dtype} on {t.device}", []).append(name)
            where = "; ".join(f"{k}: {v if len(v) <= 3 else [*v[:2], f'... ({len(v)} in all)']}"
                              for k, v in groups.items())
            raise ValueError(
                f"all selected parameters must share one dtype and device, got dtypes "
                f"{sorted(map(str, dtypes))} and devices {sorted(map(str, devices))} ({where}); "
                "convert the model with model.to(dtype=..., device=...)."
            )
        return cls(tuple(params), tuple(tuple(t.shape) for t in tensors), tensors[0].dtype,
                   tensors[0].device)

    # ------------------------------------------------------------------ sizes
    @property
    def numels(self) -> tuple[int, ...]:
        """Number of entries of each parameter."""
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each parameter in the flat vector."""
        out, acc = [], 0
        for n in self.numels:
            out.append(acc)
            acc += n
        return tuple(out)

    @property
    def size(self) -> int:
        """Total number of entries ``P``."""
        return sum(self.numels)

    def __len__(self) -> int:
        return len(self.names)

    # ------------------------------------------------------------------ conversions
    def split(self, v: Tensor) -> dict[str, Tensor]:
        """Flat ``[P]`` -> ``{name: [*shape]}``, or ``[P, k]`` -> ``{name: [k, *shape]}`` (views)."""
        self._check_flat(v)
        out = {}
        for name, shape, off, n in zip(self.names, self.shapes, self.offsets, self.numels):
            part = v[off : off + n]
            out[name] = part.reshape(shape) if v.ndim == 1 else part.T.reshape(v.shape[1], *shape)
        return out

    def join(self, tensors: dict[str, Tensor] | Sequence[Tensor], *, batched: bool = False) -> Tensor:
        """Inverse of :meth:`split`: ``{name: [*shape]}`` -> ``[P]``; with ``batched=True``
        ``{name: [k, *shape]}`` -> ``[P, k]``.
        """
        parts = [tensors[n] for n in self.names] if isinstance(tensors, dict) else list(tensors)
        if len(parts) != len(self.names):
            raise ValueError(f"expected {len(self.names)} tensors, got {len(parts)}.")
        if batched:
            return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1).T
        return torch.cat([p.reshape(-1) for p in parts])

    def _check_flat(self, v: Tensor) -> None:
        if not isinstance(v, Tensor):
            raise TypeError(f"expected a torch.Tensor of shape [{self.size}], got {type(v).__name__}.")
        if v.ndim not in (1, 2) or v.shape[0] != self.size:
            raise ValueError(
                f"expected a flat vector [{self.size}] or matrix [{self.size}, k] over the "
                f"parameters {self._short_names()}, got shape {tuple(v.shape)}."
            )

    def _short_names(self) -> str:
        names = list(self.names)
        return str(names) if len(names) <= 4 else f"[{names[0]!r}, ..., {names[-1]!r}]"

    # ------------------------------------------------------------------ blocks
    def index_of(self, sub: ParamSpace) -> Tensor:
        """Indices into this flat vector of the entries of the sub-space ``sub``."""
        lookup = dict(zip(self.names, zip(self.offsets, self.numels)))
        missing = [n for n in sub.names if n not in lookup]
        if missing:
            raise ValueError(f"parameters {missing} are not in this space {self._short_names()}.")
        return torch.cat([torch.arange(lookup[n][0], lookup[n][0] + lookup[n][1])
                          for n in sub.names]).to(self.device)

    def blocks(self) -> dict[str, slice]:
        """``{name: slice}`` of each parameter in the flat vector."""
        return {n: slice(o, o + k) for n, o, k in zip(self.names, self.offsets, self.numels)}


def select_parameters(
    model: nn.Module,
    selection: None | str | Iterable[str] | re.Pattern | nn.Module | Iterable[nn.Module],
) -> dict[str, nn.Parameter]:
    """Resolve a parameter selection into an ordered ``{name: parameter}`` dict.

    Args:
        model: the model.
        selection: ``None`` (all parameters with ``requires_grad``), a list of names, a compiled
            regex or a regex string (``re.search`` on names), a submodule, or a list of submodules.

    Raises:
        ValueError: unknown names, a regex or module that matches nothing, or selected parameters
            that do not require grad.
        TypeError: a selection of an unsupported type.
    """
    named = dict(model.named_parameters())
    if selection is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
        if not chosen:
            raise ValueError(
                "the model has no parameter with requires_grad=True; pass `params=` naming the "
                "parameters to analyse, or enable their gradients."
            )
        return chosen
    if isinstance(selection, (str, re.Pattern)):
        pattern = re.compile(selection)
        chosen = {n: p for n, p in named.items() if pattern.search(n)}
        if not chosen:
            raise ValueError(
                f"the regex {pattern.pattern!r} matches no parameter name; names are "
                f"{list(named)[:8]}{'...' if len(named) > 8 else ''}."
            )
    elif isinstance(selection, nn.Module) or (
        isinstance(selection, (list, tuple)) and selection and
        all(isinstance(m, nn.Module) for m in selection)
    ):
        modules = [selection] if isinstance(selection, nn.Module) else list(selection)
        own = {id(m) for m in model.modules()}
        foreign = [type(m).__name__ for m in modules if id(m) not in own]
        if foreign:
            raise ValueError(
                f"modules {foreign} are not submodules of the model; pass modules of the model "
                "itself (e.g. model.layer1)."
            )
        ids = {id(p) for m in modules for p in m.parameters()}
        chosen = {n: p for n, p in named.items() if id(p) in ids}
        if not chosen:
            raise ValueError("the given modules hold no parameter of the model; pass submodules "
                             "of the model itself.")
    elif isinstance(selection, Iterable):
        names = list(selection)
        if not all(isinstance(n, str) for n in names):
            raise TypeError(
                "params must be None, a regex, a list of parameter names or a list of modules; "
                f"got a list of {sorted({type(n).__name__ for n in names})}."
            )
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ValueError(
                f"unknown parameter names {unknown}; the model has {list(named)[:8]}"
                f"{'...' if len(named) > 8 else ''}."
            )
        chosen = {n: named[n] for n in named if n in set(names)}
    else:
        raise TypeError(
            "params must be None, a regex, a list of parameter names or a list of modules; got "
            f"{type(selection).__name__}."
        )
    frozen = [n for n, p in chosen.items() if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"selected parameters {frozen} have requires_grad=False; enable it with "
            "p.requires_grad_(True) or leave them out of `params=`."
        )
    return chosen
