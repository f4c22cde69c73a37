"""Cost accounting shared by every algorithm: products, data passes, wall time.

Algorithms wrap their operator in :class:`Counted`, which counts the columns multiplied
(``num_matvecs``) and the calls (``num_products``); the passes over the data are read from the
Problems underneath the operator (``num_data_passes`` of each distinct Problem), so a composed
operator such as ``H - G`` or a deflated Hessian is accounted exactly.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvscope.linops._base import LinearOperator


def problems_under(op: object) -> list[object]:
    """The distinct :class:`~curvscope.Problem` objects an operator reads data from."""
    found: dict[int, object] = {}
    stack = [op]
    while stack:
        node = stack.pop()
        problem = getattr(node, "problem", None)
        if problem is not None and hasattr(problem, "num_data_passes"):
            found[id(problem)] = problem
        children = getattr(node, "children", None)
        stack.extend(children() if callable(children) else ())
    return list(found.values())


@dataclass(frozen=True)
class Cost:
    """What an algorithm spent: columns multiplied, product calls, data passes, seconds.

    ``engines`` holds the product kernels ``engine="auto"`` chose for the Problems underneath
    (key: operator, block, dtype, device and column bucket; value: the kernel and the trial's
    seconds per column), as they stood when the algorithm finished.
    """

    num_matvecs: int
    num_products: int
    num_data_passes: int
    wall_time: float
    engines: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON."""
        return {"num_matvecs": self.num_matvecs, "num_products": self.num_products,
                "num_data_passes": self.num_data_passes, "wall_time": self.wall_time,
                "engines": copy.deepcopy(self.engines)}


def engine_choices(problems: list[object]) -> dict[str, Any]:
    """The ``engine="auto"`` choices of the given Problems, merged (deep copies)."""
    merged: dict[str, Any] = {}
    for p in problems:
        merged.update(copy.deepcopy(getattr(p, "engine_choices", {})))
    return merged


def restore_engine_choices(problems: list[object], choices: dict[str, Any] | None) -> None:
    """Put saved choices back into the Problems (a resumed run takes the same kernels)."""
    for p in problems:
        table = getattr(p, "engine_choices", None)
        if table is not None and choices:
            table.update(copy.deepcopy(choices))


class CostMeter:
    """Counts products and reads the data passes of the given Problems since construction."""

    def __init__(self, problems: list[object], device: torch.device | None = None) -> None:
        self.num_matvecs = 0
        self.num_products = 0
        self._device = device
        self._problems = problems
        self._passes0 = sum(p.num_data_passes for p in problems)  # type: ignore[attr-defined]
        self._t0 = time.perf_counter()

    def add(self, num_columns: int) -> None:
        """Record one product of ``num_columns`` columns."""
        self.num_products += 1
        self.num_matvecs += num_columns

    def counters(self) -> dict[str, Any]:
        """The counts so far (products, columns, data passes, seconds), for a checkpoint."""
        return {"num_matvecs": self.num_matvecs, "num_products": self.num_products,
                "num_data_passes": sum(p.num_data_passes for p in self._problems)  # type: ignore[attr-defined]
                - self._passes0, "wall_time": time.perf_counter() - self._t0}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue the counts of :meth:`counters` saved by an interrupted run, so a resumed
        result's cost is the whole result's (older checkpoints lack passes and seconds).
        """
        self.num_matvecs, self.num_products = state["num_matvecs"], state["num_products"]
        now = sum(p.num_data_passes for p in self._problems)  # type: ignore[attr-defined]
        self._passes0 = now - int(state.get("num_data_passes", 0))
        self._t0 = time.perf_counter() - float(state.get("wall_time", 0.0))

    def cost(self) -> Cost:
        """The cost so far (synchronises an accelerator once, for an honest wall time)."""
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        passes = sum(p.num_data_passes for p in self._problems) - self._passes0  # type: ignore[attr-defined]
        return Cost(self.num_matvecs, self.num_products, passes, time.perf_counter() - self._t0,
                    engine_choices(self._problems))


class Counted(CostMeter):
    """``A`` with counters: use ``counted @ X`` inside algorithms, then :meth:`cost`."""

    def __init__(self, A: LinearOperator) -> None:
        if not isinstance(A, LinearOperator):
            raise TypeError(
                f"expected a curvscope LinearOperator, got {type(A).__name__}; wrap a matrix with "
                "curvscope.linops.DenseOperator(M)."
            )
        self.A = A
        super().__init__(problems_under(A), A.device)

    def children(self) -> tuple[LinearOperator, ...]:
        return (self.A,)

    def __matmul__(self, X: Tensor) -> Tensor:
        self.add(1 if X.ndim == 1 else X.shape[1])
        return self.A @ X

    def matmat_blocked(self, X: Tensor, block_size: int | None) -> Tensor:
        """``A @ X`` with at most ``block_size`` columns per product (all at once for ``None``):
        bounds the memory of a wide product at the cost of more passes over the data.
        """
        k = X.shape[1]
        if block_size is None or k <= block_size:
            return self @ X
        return torch.cat([self @ X[:, i : i + block_size] for i in range(0, k, block_size)], 1)
