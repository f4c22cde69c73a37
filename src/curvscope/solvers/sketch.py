"""Sketched eigendecompositions for many eigenpairs (``k`` in the hundreds or thousands).

``sketch_eigh`` (Halko, Martinsson, Tropp 2011, Alg. 4.4 + 5.3): a Gaussian test matrix
``Omega [n, l]`` with ``l = k + oversample``; ``Y = A Omega``; ``q`` power iterations
``Y <- A orth(Y)``; ``Q = orth(Y)``; the Rayleigh-Ritz step ``B = Q^T (A Q)`` and
``B = S diag(theta) S^T`` give ``A ~ (Q S) diag(theta) (Q S)^T``. Keeping ``A Q`` makes every
Ritz residual a measured one at no extra product. Power iterations matter: the error of the
plain sketch (``q = 0``, what skerch does) decays only with the spectrum's tail.

``nystrom_eigh`` (Tropp, Yurtsever, Udell, Cevher 2017, stabilised Nystrom): for PSD operators
only, ``A ~ Y (Omega^T Y)^+ Y^T`` from one pass of products; refused on operators not tagged PSD.

Both measure in column blocks of ``block_size`` to bound memory, and estimate the error a
posteriori from ``num_test`` held-out Gaussian vectors ``g``:
``||A - A_hat||_F^2 ~ mean ||(A - A_hat) g||^2`` (Martinsson & Tropp 2020, Sec. 12.5; used by
Fernandez et al. 2025).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from curvscope._checkpoint import Checkpointer, generator_digest, tensor_digest
from curvscope._diagnostics import Counted
from curvscope.estimators._probes import check_generator, random_probes
from curvscope.solvers._results import EigenResult
from curvscope.solvers.eigsh import WHICH, select
from curvscope.solvers.lanczos import check_symmetric


class _StagedProducts:
    """The sketch's sequence of blocked products ``A @ X_s``, resumable block by block.

    A checkpoint holds the stage in progress, its finished columns, and the output of the last
    finished stage; every later stage's input is a deterministic function of that output, so a
    resumed run skips the finished stages (returning placeholders the caller discards) and redoes
    only the missing columns.
    """

    def __init__(self, counted: Counted, block_size: int | None, ckpt: Checkpointer) -> None:
        self.counted, self.block_size, self.ckpt = counted, block_size, ckpt
        self.saved = ckpt.load() or {}
        self.stage = 0
        self.last_output: Tensor | None = None
        if self.saved:
            counted.num_matvecs = self.saved["num_matvecs"]
            counted.num_products = self.saved["num_products"]

    def __call__(self, X: Tensor) -> Tensor:
        stage = self.stage
        self.stage += 1
        saved_stage = self.saved.get("stage", 0)
        if stage < saved_stage - 1:
            return torch.zeros_like(X)  # a finished stage whose output is not needed any more
        if stage == saved_stage - 1:
            return self.saved["previous"].to(X.device)
        done = self.saved["partial"].to(X.device) if stage == saved_stage and self.saved else \
            X.new_zeros(X.shape[0], 0)
        width = self.block_size or X.shape[1]
        parts = [done]
        for i in range(done.shape[1], X.shape[1], width):
            parts.append(self.counted @ X[:, i : i + width])
            if self.ckpt.due(self.counted.num_products):
                self.ckpt.save({"stage": stage, "partial": torch.cat(parts, 1).cpu(),
                                "previous": self.last_output,
                                "num_matvecs": self.counted.num_matvecs,
                                "num_products": self.counted.num_products})
        out = torch.cat(parts, 1)
        self.last_output = out.cpu()
        return out


def _check_sketch_args(A: object, k: int, oversample: int, block_size: int | None,
                       num_test: int, generator: object, who: str) -> int:
    check_symmetric(A, who)
    check_generator(generator)
    n = A.shape[0]  # type: ignore[attr-defined]
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, n={n}], got {k!r}.")
    if not isinstance(oversample, int) or oversample < 0:
        raise ValueError(f"oversample must be a non-negative int, got {oversample!r}.")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}.")
    if not isinstance(num_test, int) or num_test < 0:
        raise ValueError(f"num_test must be a non-negative int, got {num_test!r}.")
    return min(k + oversample, n)


def _aposteriori_error(counted: Counted, U: Tensor, theta: Tensor, num_test: int,
                       block_size: int | None, generator: torch.Generator | None) -> float | None:
    """``sqrt(mean_j ||(A - U diag(theta) U^T) g_j||^2)``: an estimate of ``||A - A_hat||_F``."""
    if num_test == 0:
        return None
    G = random_probes(U.shape[0], num_test, distribution="gaussian", dtype=U.dtype,
                      device=U.device, generator=generator)
    E = counted.matmat_blocked(G, block_size) - U @ (theta.unsqueeze(1) * (U.T @ G))
    return float((E.norm(dim=0) ** 2).mean().sqrt())


def sketch_eigh(
    A: object,
    k: int,
    *,
    which: str = "LM",
    oversample: int = 10,
    num_power_iters: int = 2,
    block_size: int | None = None,
    num_test: int = 10,
    generator: torch.Generator | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 10,
) -> EigenResult:
    """``k`` eigenpairs from a randomised range finder with power iterations (HMT).

    Args:
        A: symmetric operator ``[n, n]`` (indefinite is fine).
        k: number of eigenpairs.
        which: which Ritz values to keep (``LM`` by default, the sketch's natural order, or
            ``LA`` / ``SA`` / ``BE``) picks them among the ``k + oversample`` Ritz values.
        oversample: extra sketch columns.
        num_power_iters: ``q``; each costs ``k + oversample`` products.
        block_size: columns per product (bounds memory; default all at once).
        num_test: held-out vectors for the a-posteriori error estimate (``result.error_estimate``).
        generator: explicit randomness.
        checkpoint: file to save the measurements to every ``checkpoint_every`` products; a
            rerun resumes where the last one stopped (see :func:`~curvscope.eigsh`).
        checkpoint_every: products between saves.

    Returns:
        :class:`EigenResult` (``method="sketch"``) with measured residuals; ``converged`` marks
        pairs with relative residual below ``sqrt(eps)``. Cost: ``(q + 2)(k + oversample) +
        num_test`` products. Exact (to rounding) when ``rank(A) <= k + oversample``.

    Example:
        >>> import torch
        >>> from curvscope.linops import LowRankOperator
        >>> V, _ = torch.linalg.qr(torch.randn(50, 3, dtype=torch.float64))
        >>> A = LowRankOperator(V, torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64))
        >>> res = sketch_eigh(A, 3, generator=torch.Generator().manual_seed(0))
        >>> [round(x, 10) for x in res.eigenvalues.tolist()]
        [3.0, -2.0, 1.0]
    """
    width = _check_sketch_args(A, k, oversample, block_size, num_test, generator, "sketch_eigh")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}.")
    if not isinstance(num_power_iters, int) or num_power_iters < 0:
        raise ValueError(f"num_power_iters must be a non-negative int, got {num_power_iters!r}.")
    counted = Counted(A)  # type: ignore[arg-type]
    n, dtype, device = counted.A.shape[0], counted.A.dtype, counted.A.device
    gen_digest = generator_digest(generator)
    Omega = random_probes(n, width, distribution="gaussian", dtype=dtype, device=device,
                          generator=generator)
    apply = _StagedProducts(counted, block_size, Checkpointer(checkpoint, checkpoint_every, {
        "algorithm": "sketch_eigh", "n": n, "width": width, "q": num_power_iters,
        "block_size": block_size, "dtype": str(dtype), "start": tensor_digest(Omega),
        "generator": gen_digest,
    }))
    Y = apply(Omega)
    for _ in range(num_power_iters):
        Q, _ = torch.linalg.qr(Y)
        Y = apply(Q)
    Q, _ = torch.linalg.qr(Y)
    AQ = apply(Q)
    B = (Q.T @ AQ).to("cpu", torch.float64)
    theta, S = torch.linalg.eigh((B + B.T) / 2)
    want = select(theta, k, which)
    S_w = S[:, want].to(dtype=dtype, device=device)
    U, AU = Q @ S_w, AQ @ S_w
    theta_w = theta[want].to(dtype=dtype, device=device)
    res = (AU - U * theta_w).norm(dim=0)
    tol = torch.finfo(dtype).eps ** 0.5
    converged = res <= tol * theta_w.abs()
    error = _aposteriori_error(counted, U, theta_w, num_test, block_size, generator)
    return EigenResult(theta_w, U, res, converged, "sketch", which, tol, num_power_iters,
                       counted.cost(), error)


def _indefinite_nystrom(Y: Tensor, core: Tensor) -> tuple[Tensor, Tensor]:
    """``Y core^+ Y^T`` for a symmetric, possibly indefinite core: eigenpairs by magnitude."""
    lam_c, W = torch.linalg.eigh((core + core.T) / 2)
    keep = lam_c.abs() > lam_c.abs().max() * torch.finfo(core.dtype).eps * core.shape[0]
    Q, R = torch.linalg.qr(Y @ W[:, keep])
    M = R @ torch.diag(1.0 / lam_c[keep]) @ R.T
    theta, S = torch.linalg.eigh((M + M.T) / 2)
    order = torch.argsort(theta.abs(), descending=True)
    return Q @ S[:, order], theta[order]


def nystrom_eigh(
    A: object,
    k: int,
    *,
    oversample: int = 10,
    block_size: int | None = None,
    num_test: int = 10,
    generator: torch.Generator | None = None,
    allow_indefinite: bool = False,
) -> EigenResult:
    """``k`` top eigenpairs of a PSD operator by the stabilised Nystrom approximation.

    ``Y = A Omega``, shift ``nu = eps ||Y||``, ``C = chol(Omega^T (Y + nu Omega))``,
    ``B = (Y + nu Omega) C^{-1}``, ``B = U Sigma V^T``, eigenvalues ``max(Sigma^2 - nu, 0)``.
    One round of ``k + oversample`` products; the residuals cost ``k`` more.

    Raises:
        ValueError: ``A`` is not tagged PSD (Nystrom is wrong for indefinite matrices, e.g. a
            Hessian); pass ``allow_indefinite=True`` to run anyway with a warning.

    References:
        J. Tropp, A. Yurtsever, M. Udell, V. Cevher, "Fixed-rank approximation of a positive-
        semidefinite matrix from streaming data", NeurIPS 2017.
    """
    width = _check_sketch_args(A, k, oversample, block_size, num_test, generator, "nystrom_eigh")
    if not A.is_psd:  # type: ignore[attr-defined]
        message = ("nystrom_eigh needs a positive semi-definite operator (a GGN or Fisher); this "
                   "one is not tagged psd, and the Nystrom approximation of an indefinite matrix "
                   "(e.g. a Hessian) is wrong. Use sketch_eigh or eigsh instead.")
        if not allow_indefinite:
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    counted = Counted(A)  # type: ignore[arg-type]
    n, dtype, device = counted.A.shape[0], counted.A.dtype, counted.A.device
    Omega, _ = torch.linalg.qr(random_probes(n, width, distribution="gaussian", dtype=dtype,
                                             device=device, generator=generator))
    Y = counted.matmat_blocked(Omega, block_size)
    nu = torch.finfo(dtype).eps * float(Y.norm())
    Y_nu = Y + nu * Omega
    core = Omega.T @ Y_nu
    try:
        C = torch.linalg.cholesky((core + core.T) / 2, upper=True)
    except torch.linalg.LinAlgError as err:
        if not allow_indefinite:
            raise ValueError(
                "nystrom_eigh: the sketch's core matrix Omega^T A Omega is not positive definite, "
                "so the operator is not PSD in practice; use sketch_eigh or eigsh."
            ) from err
        U_all, lam = _indefinite_nystrom(Y, core)
    else:
        B = torch.linalg.solve_triangular(C, Y_nu, upper=True, left=False)
        U_all, sigma, _ = torch.linalg.svd(B, full_matrices=False)
        lam = torch.clamp(sigma**2 - nu, min=0.0)
    U, theta = U_all[:, :k], lam[:k]
    AU = counted.matmat_blocked(U, block_size)
    res = (AU - U * theta).norm(dim=0)
    tol = torch.finfo(dtype).eps ** 0.5
    converged = res <= tol * theta.abs()
    error = _aposteriori_error(counted, U, theta, num_test, block_size, generator)
    return EigenResult(theta, U, res, converged, "nystrom", "LA", tol, 0, counted.cost(), error)
