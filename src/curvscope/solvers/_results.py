"""Frozen result objects of the eigensolvers, with their diagnostics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvscope._diagnostics import Cost


class ConvergenceWarning(UserWarning):
    """An iterative method stopped before every wanted quantity met its tolerance."""


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs ``A v_i = l_i v_i`` with their certificates.

    Attributes:
        eigenvalues: ``[k]``, in the order asked for (``LA``: descending; ``SA``: ascending;
            ``LM``: by descending magnitude; ``BE``: descending).
        eigenvectors: ``[n, k]`` orthonormal columns (``None`` when not kept).
        residual_norms: ``[k]``, ``||A v_i - l_i v_i||`` measured with true products.
        converged: ``[k]`` bool, ``residual_norms <= tol * |l_i|`` (see the solver).
        method: which algorithm.
        tol: the relative residual tolerance.
        num_iters: iterations (restarts, power steps) taken.
        cost: products, data passes and wall time.
        error_estimate: a-posteriori error of a sketch (``||A - A_hat||_F`` estimate) or ``None``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residual_norms: Tensor
    converged: Tensor
    method: str
    which: str
    tol: float
    num_iters: int
    cost: Cost
    error_estimate: float | None = None

    @property
    def k(self) -> int:
        """Number of eigenpairs."""
        return int(self.eigenvalues.numel())

    @property
    def relative_residuals(self) -> Tensor:
        """``||A v - l v|| / |l|``."""
        return self.residual_norms / self.eigenvalues.abs().clamp_min(torch.finfo(
            self.eigenvalues.dtype).tiny)

    @property
    def all_converged(self) -> bool:
        """Whether every pair met the tolerance."""
        return bool(self.converged.all())

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers for JSON (eigenvectors left out: save them with numpy)."""
        return {
            "method": self.method, "which": self.which, "tol": self.tol, "k": self.k,
            "eigenvalues": self.eigenvalues.tolist(),
            "residual_norms": self.residual_norms.tolist(),
            "converged": self.converged.tolist(), "num_iters": self.num_iters,
            "error_estimate": self.error_estimate, **self.cost.to_dict(),
        }

    def __str__(self) -> str:
        head = (f"{self.method}: {self.k} eigenpairs ({self.which}), "
                f"{int(self.converged.sum())}/{self.k} converged to {self.tol:g}, "
                f"{self.cost.num_matvecs} products, {self.cost.num_data_passes} data passes, "
                f"{self.cost.wall_time:.2f} s")
        rows = [f"  {i + 1:4d} {float(lam): .8e}  res {float(r):.1e}"
                for i, (lam, r) in enumerate(zip(self.eigenvalues, self.residual_norms))]
        return "\n".join([head, *rows])


@dataclass(frozen=True)
class LanczosResult:
    """Lanczos tridiagonalisations of several start vectors run in lockstep.

    For probe ``l`` the ``m`` steps give ``A Q_l = Q_l T_l + beta_m q_{m+1} e_m^T`` with
    ``T_l = tridiag(beta[l], alpha[l], beta[l])``.

    Attributes:
        alpha: ``[p, m]`` diagonals.
        beta: ``[p, m]`` off-diagonals; ``beta[:, j]`` couples steps ``j`` and ``j+1``; the last
            column is the residual norm ``beta_m`` (used for spectral bounds).
        start_norms: ``[p]`` norms of the (unnormalised) start vectors.
        basis: ``[p, m, n]`` Lanczos vectors when kept (``basis="device"`` or ``"host"``).
        reorth: the reorthogonalisation used.
        cost: products, data passes and wall time.
    """

    alpha: Tensor
    beta: Tensor
    start_norms: Tensor
    basis: Tensor | None
    reorth: str
    cost: Cost

    @property
    def num_probes(self) -> int:
        """Number of start vectors ``p``."""
        return int(self.alpha.shape[0])

    @property
    def num_iters(self) -> int:
        """Number of steps ``m``."""
        return int(self.alpha.shape[1])

    def tridiagonals(self) -> Tensor:
        """``[p, m, m]`` float64 tridiagonal matrices ``T_l`` on the host."""
        a = self.alpha.detach().to("cpu", torch.float64)
        b = self.beta.detach().to("cpu", torch.float64)[:, :-1]
        return torch.diag_embed(a) + torch.diag_embed(b, 1) + torch.diag_embed(b, -1)

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Ritz values ``[p, m]`` (ascending) and eigenvectors ``[p, m, m]`` of each ``T_l``.

        A small dense problem, solved in float64 on the host on purpose.
        """
        theta, S = torch.linalg.eigh(self.tridiagonals())
        return theta, S
