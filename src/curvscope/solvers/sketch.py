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
from curvscope.linops._checks import check_symmetric
from curvscope.linops._probes import check_generator, random_probes
from curvscope.solvers._results import EigenResult
from curvscope.solvers._tall import STORAGE, TallMatrix, sync
from curvscope.solvers.eigsh import WHICH, select


class _InPlaceProducts:
    """The sketch's product stages ``X <- A X`` (in place, column block by column block), and
    its last stage ``Z = A X``, resumable block by block.

    A checkpoint holds the stage in progress, how many of its columns are done, the tall
    matrices as they are (finished columns hold products, the rest their inputs), the
    generator's state and the counters; the orthonormalisations between stages are
    deterministic functions of that, so a resumed run redoes nothing but the missing columns.
    """

    def __init__(self, counted: Counted, block_size: int | None, ckpt: Checkpointer,
                 generator: torch.Generator | None) -> None:
        self.counted, self.block_size, self.ckpt, self.generator = (counted, block_size, ckpt,
                                                                    generator)
        self.saved = ckpt.load() or {}
        self.stage = 0

    def restore(self, X: TallMatrix, Z: TallMatrix | None) -> bool:
        """Load a checkpoint's matrices into ``X`` / ``Z``; whether there was one."""
        if not self.saved:
            return False
        X.data.copy_(self.saved["X"])
        if Z is not None and self.saved.get("Z") is not None:
            Z.data.copy_(self.saved["Z"])
        self.counted.restore(self.saved)
        if self.generator is not None:
            self.generator.set_state(self.saved["generator"])
        return True

    def orthonormalize(self, X: TallMatrix) -> None:
        """:func:`orthonormalize_` before the next stage, unless the checkpoint shows that stage
        begun (then ``X`` was restored after this orthonormalisation and must not get another).
        """
        if self.stage > self.saved.get("stage", -1):
            orthonormalize_(X, self.generator)

    def __call__(self, X: TallMatrix, out: TallMatrix) -> None:
        """``out <- A X`` column block by column block (``out`` may be ``X``)."""
        stage = self.stage
        self.stage += 1
        saved_stage = self.saved.get("stage", -1)
        if stage < saved_stage:
            return  # finished before the checkpoint: its result is in the restored matrices
        start = self.saved["done"] if stage == saved_stage else 0
        width = self.block_size or X.cols
        for i in range(start, X.cols, width):
            stop = min(i + width, X.cols)
            out.set_columns(i, self.counted @ X.columns(i, stop))
            if self.ckpt.due(self.counted.num_products):
                sync(X.device)
                self.ckpt.save({
                    "stage": stage, "done": stop, "X": X.data.cpu(),
                    "Z": None if out is X else out.data.cpu(),
                    "generator": None if self.generator is None else self.generator.get_state(),
                    **self.counted.counters()})


def orthonormalize_(X: TallMatrix, generator: torch.Generator | None) -> None:
    """Orthonormal columns in place, by SVQB (Stathopoulos & Wu 2002) on the float64 Gram matrix.

    ``D = diag(X^T X)^{-1/2}``, ``D X^T X D = W diag(lam) W^T``, ``X <- X D W diag(lam)^{-1/2}``.
    The Gram matrix and the update are computed in float64 over streamed row blocks (so ``X`` may
    be far larger than the device) and rounded once to the storage dtype. The loss of
    orthogonality of one pass is about ``eps_64 * kappa^2`` (the Gram matrix's rounding, with
    ``kappa^2 = max lam / min lam``) plus ``eps`` (the final rounding): one pass is enough for
    float32 storage unless ``kappa > ~7e4``; float64 storage takes a second pass (CholeskyQR2's
    "twice is enough") unless ``kappa^2 <= 10``. Directions with
    ``lam <= l * max(eps^2, eps_64) * max(lam)`` are numerically absent (the operator has rank
    below ``l``, or ``X`` is rounding noise there): they are refilled with fresh Gaussian vectors
    and orthonormalised by another pass, the way Householder QR completes a basis.
    """
    eps, eps64 = torch.finfo(X.dtype).eps, torch.finfo(torch.float64).eps
    tiny = torch.finfo(torch.float64).tiny
    floor = X.cols * max(eps**2, eps64)
    for _ in range(4):  # 1 or 2 passes, 1 more after a refill; the cap guards against loops
        G = X.gram()
        d = torch.diagonal(G)
        scale = torch.where(d > 0, d.rsqrt(), torch.zeros_like(d))
        lam, W = torch.linalg.eigh(scale[:, None] * G * scale[None, :])
        absent = lam <= floor * lam.max().clamp_min(tiny)
        T = scale[:, None] * W / lam.clamp_min(tiny).sqrt()
        T[:, absent] = 0.0
        X.right_multiply_(T)
        refill = torch.nonzero(absent).flatten().tolist()
        if refill:
            X.fill_gaussian(refill, generator)
            continue
        kappa2 = float(lam.max() / lam.min())
        if eps64 * kappa2 <= 10 * eps:  # this pass was accurate to the storage precision
            return


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


def _aposteriori_error(counted: Counted, U: Tensor | TallMatrix, theta: Tensor, num_test: int,
                       block_size: int | None, generator: torch.Generator | None) -> float | None:
    """``sqrt(mean_j ||(A - U diag(theta) U^T) g_j||^2)``: an estimate of ``||A - A_hat||_F``."""
    if num_test == 0:
        return None
    n, dtype, device = counted.A.shape[0], counted.A.dtype, counted.A.device
    G = random_probes(n, num_test, distribution="gaussian", dtype=dtype, device=device,
                      generator=generator)
    AG = counted.matmat_blocked(G, block_size)
    if isinstance(U, TallMatrix):
        approx = U.matmul(theta.to(torch.float64).unsqueeze(1) * U.t_matmul(G)).to(dtype)
    else:
        approx = U @ (theta.unsqueeze(1) * (U.T @ G))
    return float(((AG - approx).norm(dim=0) ** 2).mean().sqrt())


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
    storage: str = "device",
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
        storage: where the two ``n x (k + oversample)`` matrices live: ``"device"`` (the
            operator's), ``"host"`` (CPU memory, pinned on CUDA) or ``"disk"`` (memory-mapped
            temporary files). Off the device, they are streamed to it a column block (products)
            or a 256 MiB row block (Gram matrices, updates) at a time, so device memory holds
            one product plus one block: 1000 eigenpairs of an 11M-parameter net (2 x 45 GB in
            float32) on an 80 GB GPU. The eigenvectors are returned where they were stored.
            ``"sharded"`` (under ``torchrun``): each rank keeps 1/W of the rows on its device,
            Gram matrices are all-reduced; results equal one process's, and ``eigenvectors`` is
            ``None`` (no rank holds them whole).

    Memory: two tall matrices, worked on in place (``Y``, then ``Q``, then ``U``; ``A Q``, then
    ``A U``); orthonormalisation by SVQB on float64 Gram matrices (:func:`orthonormalize_`).

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
    if storage not in STORAGE:
        raise ValueError(f"storage must be one of {STORAGE}, got {storage!r}.")
    counted = Counted(A)  # type: ignore[arg-type]
    n, dtype, device = counted.A.shape[0], counted.A.dtype, counted.A.device
    X = TallMatrix(n, width, dtype, device, storage)
    Z = TallMatrix(n, width, dtype, device, storage)
    X.fill_gaussian(list(range(width)), generator)
    apply = _InPlaceProducts(counted, block_size, Checkpointer(checkpoint, checkpoint_every, {
        "algorithm": "sketch_eigh", "n": n, "width": width, "q": num_power_iters,
        "block_size": block_size, "dtype": str(dtype), "start": tensor_digest(X.data[0]),
        "generator": generator_digest(generator),
    }, operator=counted.A), generator)
    apply.restore(X, Z)
    apply(X, X)  # Y = A Omega
    for _ in range(num_power_iters):
        apply.orthonormalize(X)
        apply(X, X)  # Y = A orth(Y)
    apply.orthonormalize(X)  # Q
    apply(X, Z)  # A Q
    B = X.gram(Z).cpu()
    theta, S = torch.linalg.eigh((B + B.T) / 2)
    want = select(theta, k, which)
    X.right_multiply_(S[:, want])  # U = Q S
    Z.right_multiply_(S[:, want])  # A U
    theta_w = theta[want].to(dtype=dtype, device=device)
    res = X.column_residual_norms(Z, theta_w).to(dtype)
    del Z
    tol = torch.finfo(dtype).eps ** 0.5
    converged = res <= tol * theta_w.abs()
    error = _aposteriori_error(counted, X, theta_w, num_test, block_size, generator)
    sync(device)
    return EigenResult(theta_w, X.view(), res, converged, "sketch", which, tol, num_power_iters,
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
