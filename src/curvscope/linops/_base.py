"""The linear-operator base class: flat tensors in, flat tensors out.

Every curvature matrix in curvscope is a :class:`LinearOperator` over the flat parameter vector.
Subclasses implement one hook, :meth:`LinearOperator._matmat`, which maps ``X`` of shape
``[n, k]`` to ``A X`` of shape ``[m, k]``; the public ``A @ x`` validates the input once and
accepts vectors ``[n]`` and matrices ``[n, k]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, overload

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    import scipy.sparse.linalg

SYMMETRIC = "symmetric"
PSD = "psd"

#: Above this many entries ``to_dense`` refuses (pass ``max_entries`` to override).
DEFAULT_MAX_DENSE_ENTRIES = 50_000_000


def canonical_device(device: torch.device | str) -> torch.device:
    """``torch.device`` with an explicit index for accelerators (``cuda`` -> ``cuda:0``), so that
    devices compare equal to those of tensors.
    """
    device = torch.device(device)
    if device.type != "cpu" and device.index is None and device.type != "meta":
        return torch.empty(0, device=device).device
    return device


class LinearOperator:
    """A matrix-free linear map ``R^n -> R^m`` on one device and dtype.

    Attributes:
        shape: ``(m, n)``.
        dtype: dtype of inputs and outputs.
        device: device of inputs and outputs.
        tags: a frozenset of structural facts, e.g. ``{"symmetric", "psd"}``.

    Subclasses implement :meth:`_matmat` only. Composition (``+``, ``-``, scalar ``*``,
    :meth:`shift`, :meth:`deflate`, :meth:`restrict`) builds new operators lazily.

    Example:
        >>> import torch
        >>> from curvscope.linops import DenseOperator
        >>> A = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
        >>> (A @ torch.tensor([1.0, 0.0])).tolist()
        [2.0, 1.0]
        >>> (A.shift(1.0) @ torch.tensor([1.0, 0.0])).tolist()
        [1.0, 1.0]
    """

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        tags: frozenset[str] | set[str] | tuple[str, ...] = frozenset(),
    ) -> None:
        m, n = (int(s) for s in shape)
        if m < 0 or n < 0:
            raise ValueError(f"shape must be non-negative, got {shape}.")
        self.shape: tuple[int, int] = (m, n)
        self.dtype: torch.dtype = dtype
        self.device: torch.device = canonical_device(device)
        self.tags: frozenset[str] = frozenset(tags)

    # ----------------------------------------------------------------- the one hook
    def _matmat(self, X: Tensor) -> Tensor:
        """Return ``A @ X`` for ``X`` of shape ``[n, k]`` (validated); subclasses implement it."""
        raise NotImplementedError

    def children(self) -> tuple[LinearOperator, ...]:
        """The operators this one multiplies through (none for a leaf).

        The cost accounting (:class:`~curvscope._diagnostics.Counted`) walks them to find the
        Problems whose data passes a product makes, and checkpoints to find the product kernels
        ``engine="auto"`` chose; an operator built on others overrides this.
        """
        return ()

    # ----------------------------------------------------------------- properties
    @property
    def is_symmetric(self) -> bool:
        """Whether the operator is tagged symmetric."""
        return SYMMETRIC in self.tags

    @property
    def is_psd(self) -> bool:
        """Whether the operator is tagged positive semi-definite."""
        return PSD in self.tags

    def __repr__(self) -> str:
        tags = ",".join(sorted(self.tags)) or "-"
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, "
            f"device={self.device}, tags={tags})"
        )

    # ----------------------------------------------------------------- products
    def _check_input(self, X: Tensor) -> None:
        if not isinstance(X, Tensor):
            raise TypeError(
                f"{type(self).__name__} multiplies torch.Tensor inputs, got {type(X).__name__}; "
                "convert with torch.as_tensor(x)."
            )
        n = self.shape[1]
        if X.ndim not in (1, 2) or X.shape[0] != n:
            raise ValueError(
                f"{type(self).__name__} of shape {self.shape} expects a vector [{n}] or a matrix "
                f"[{n}, k], got shape {tuple(X.shape)}."
            )
        if X.dtype != self.dtype:
            raise ValueError(
                f"{type(self).__name__} has dtype {self.dtype}, got an input of dtype {X.dtype}; "
                f"cast it with x.to({self.dtype})."
            )
        if X.device != self.device:
            raise ValueError(
                f"{type(self).__name__} lives on {self.device}, got an input on {X.device}; "
                f"move it with x.to('{self.device}')."
            )

    @overload
    def __matmul__(self, X: LinearOperator) -> LinearOperator: ...

    @overload
    def __matmul__(self, X: Tensor) -> Tensor: ...

    def __matmul__(self, X: Tensor | LinearOperator) -> Tensor | LinearOperator:
        """``A @ x`` for ``x`` of shape ``[n]`` or ``[n, k]``; ``A @ B`` for an operator ``B``."""
        if isinstance(X, LinearOperator):
            return ProductOperator(self, X)
        self._check_input(X)
        if X.ndim == 1:
            return self._matmat(X.unsqueeze(1)).squeeze(1)
        return self._matmat(X)

    def matvec(self, x: Tensor) -> Tensor:
        """``A @ x`` for a vector ``x`` of shape ``[n]``."""
        if isinstance(x, Tensor) and x.ndim != 1:
            raise ValueError(f"matvec expects a vector [{self.shape[1]}], got {tuple(x.shape)}.")
        return self @ x

    def matmat(self, X: Tensor) -> Tensor:
        """``A @ X`` for a matrix ``X`` of shape ``[n, k]``."""
        if isinstance(X, Tensor) and X.ndim != 2:
            raise ValueError(f"matmat expects a matrix [{self.shape[1]}, k], got {tuple(X.shape)}.")
        return self @ X

    # ----------------------------------------------------------------- conversions
    def to_dense(self, *, max_entries: int = DEFAULT_MAX_DENSE_ENTRIES) -> Tensor:
        """Materialize ``A`` as a dense ``[m, n]`` tensor by multiplying the identity.

        Raises:
            ValueError: if ``m * n`` exceeds ``max_entries``.
        """
        m, n = self.shape
        if m * n > max_entries:
            raise ValueError(
                f"to_dense() would form a {m} x {n} matrix ({m * n:,} entries) above the limit "
                f"max_entries={max_entries:,}; use matrix-free algorithms, or raise max_entries."
            )
        return self @ torch.eye(n, dtype=self.dtype, device=self.device)

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """Wrap as a ``scipy.sparse.linalg.LinearOperator`` (numpy in, numpy out).

        Inputs are converted to this operator's dtype and device, results back to numpy on the
        host. Requires scipy (``pip install 'curvscope[scipy]'``).
        """
        try:
            import scipy.sparse.linalg as sla
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("to_scipy() needs scipy: pip install 'curvscope[scipy]'") from err
        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype

        def matmat(X: Any) -> Any:
            X_t = torch.from_numpy(np.array(X, copy=True)).to(dtype=self.dtype, device=self.device)
            return (self @ X_t).detach().cpu().numpy()

        adjoint = self if self.is_symmetric else None

        def rmatmat(X: Any) -> Any:
            if adjoint is None:
                raise NotImplementedError("the adjoint of a non-symmetric operator is not defined")
            return matmat(X)

        return sla.LinearOperator(
            self.shape,
            matvec=lambda x: matmat(x.reshape(-1, 1)).reshape(-1),
            rmatvec=lambda x: rmatmat(x.reshape(-1, 1)).reshape(-1),
            matmat=matmat,
            rmatmat=rmatmat,
            dtype=np_dtype,
        )

    # ----------------------------------------------------------------- algebra
    def __add__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator([self, other])

    def __sub__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator([self, other], coefficients=[1.0, -1.0])

    def __mul__(self, alpha: float) -> LinearOperator:
        if isinstance(alpha, Tensor) and alpha.numel() == 1:
            alpha = float(alpha)
        if not isinstance(alpha, (int, float)):
            return NotImplemented
        return SumOperator([self], coefficients=[float(alpha)])

    __rmul__ = __mul__

    def __truediv__(self, alpha: float) -> LinearOperator:
        if isinstance(alpha, Tensor) and alpha.numel() == 1:
            alpha = float(alpha)
        if not isinstance(alpha, (int, float)):
            return NotImplemented
        return self * (1.0 / alpha)

    def __neg__(self) -> LinearOperator:
        return self * -1.0

    def shift(self, sigma: float) -> LinearOperator:
        """Return ``A - sigma * I``."""
        return SumOperator(
            [self, IdentityOperator(self.shape[0], dtype=self.dtype, device=self.device)],
            coefficients=[1.0, -float(sigma)],
        )

    def deflate(self, V: Tensor, eigenvalues: Tensor) -> LinearOperator:
        """Return ``A - V diag(eigenvalues) V^T`` (removes known eigenpairs ``(l_j, v_j)``).

        Args:
            V: orthonormal columns ``[n, r]``.
            eigenvalues: ``[r]``.
        """
        from curvscope.linops._structured import LowRankOperator

        return self - LowRankOperator(V, eigenvalues)

    def restrict(self, index: Tensor | slice | list[int]) -> LinearOperator:
        """Return the principal submatrix ``A[index][:, index] = P^T A P``.

        ``P`` selects the coordinates in ``index`` (a slice, a list of ints, or an integer
        tensor). Curvature operators override :meth:`block` to restrict cheaply to parameters.
        """
        from curvscope.linops._compose import RestrictedOperator

        return RestrictedOperator(self, index)


class IdentityOperator(LinearOperator):
    """The identity ``I_n``."""

    def __init__(self, n: int, *, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__((n, n), dtype=dtype, device=device, tags={SYMMETRIC, PSD})

    def _matmat(self, X: Tensor) -> Tensor:
        return X.clone()


def _check_compatible(ops: list[LinearOperator]) -> None:
    first = ops[0]
    for op in ops[1:]:
        if op.dtype != first.dtype or op.device != first.device:
            raise ValueError(
                f"cannot combine operators on {first.device}/{first.dtype} and "
                f"{op.device}/{op.dtype}; build them with the same device and dtype."
            )


class SumOperator(LinearOperator):
    """``sum_i c_i A_i``; tags: symmetric if all are, psd if all are and every ``c_i >= 0``."""

    operators: list[LinearOperator]
    coefficients: list[float]

    def __init__(self, operators: list[LinearOperator], coefficients: list[float] | None = None):
        if not operators:
            raise ValueError("SumOperator needs at least one operator.")
        coefficients = [1.0] * len(operators) if coefficients is None else list(coefficients)
        if len(coefficients) != len(operators):
            raise ValueError(
                f"got {len(operators)} operators but {len(coefficients)} coefficients."
            )
        # flatten nested sums so that (A + B) - C is one node
        flat_ops: list[LinearOperator] = []
        flat_coefs: list[float] = []
        for op, c in zip(operators, coefficients):
            if type(op) is SumOperator:
                flat_ops += op.operators
                flat_coefs += [c * ci for ci in op.coefficients]
            else:
                flat_ops.append(op)
                flat_coefs.append(float(c))
        shapes = {op.shape for op in flat_ops}
        if len(shapes) != 1:
            raise ValueError(f"cannot add operators of shapes {sorted(shapes)}.")
        _check_compatible(flat_ops)
        tags: set[str] = set()
        if all(op.is_symmetric for op in flat_ops):
            tags.add(SYMMETRIC)
            if all(op.is_psd for op in flat_ops) and all(c >= 0 for c in flat_coefs):
                tags.add(PSD)
        super().__init__(flat_ops[0].shape, dtype=flat_ops[0].dtype, device=flat_ops[0].device,
                         tags=tags)
        self.operators = flat_ops
        self.coefficients = flat_coefs

    def children(self) -> tuple[LinearOperator, ...]:
        return tuple(self.operators)

    def _matmat(self, X: Tensor) -> Tensor:
        out: Tensor | None = None
        for op, c in zip(self.operators, self.coefficients):
            term = op @ X
            out = c * term if out is None else out.add_(term, alpha=c)
        assert out is not None
        return out


class ProductOperator(LinearOperator):
    """``A B``; symmetric only if tagged explicitly by the caller."""

    def __init__(self, A: LinearOperator, B: LinearOperator) -> None:
        if A.shape[1] != B.shape[0]:
            raise ValueError(f"cannot multiply operators of shapes {A.shape} and {B.shape}.")
        _check_compatible([A, B])
        super().__init__((A.shape[0], B.shape[1]), dtype=A.dtype, device=A.device)
        self.A, self.B = A, B

    def children(self) -> tuple[LinearOperator, ...]:
        return (self.A, self.B)

    def _matmat(self, X: Tensor) -> Tensor:
        return self.A @ (self.B @ X)
