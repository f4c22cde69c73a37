"""Extreme eigenpairs of a symmetric operator, certified by true residuals.

:func:`eigsh` runs block Lanczos with thick restarts (Wu & Simon 2000; Stathopoulos, Saad & Wu
1998 for the block form). The basis ``Q [n, s]`` and its image ``A Q`` are kept together, so the
projected matrix ``H = Q^T A Q`` and the Ritz residuals ``A y - theta y = (A Q) s - theta Q s``
cost no extra products: every reported residual is a measured one. Each expansion multiplies one
block ``[n, b]`` — a single pass over the data for a curvature operator. At a restart the
``num_keep`` best Ritz vectors replace the basis (their images are recombined, not recomputed)
and the expansion continues from the last Krylov block, which is orthogonal to all of them.

A pair is converged when ``||A v - l v|| <= max(tol |l|, max(tol sqrt(eps), 100 eps)
||A||_est, atol)``: relative to the eigenvalue, except for eigenvalues indistinguishable from zero
at the working precision, which are measured against the spectral norm (:func:`zero_floor`).

:func:`power_iteration` (deflated, PyHessian's method) and :func:`subspace_iteration`
(randomised block power with Rayleigh-Ritz, Halko-Martinsson-Tropp) are there for comparison.

References:
    K. Wu, H. Simon, "Thick-restart Lanczos method for large symmetric eigenvalue problems",
    SIAM J. Matrix Anal. Appl. 22 (2000).  Z. Yao, A. Gholami, K. Keutzer, M. Mahoney,
    "PyHessian: neural networks through the lens of the Hessian" (2020).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import Tensor

from curvscope._checkpoint import Checkpointer, generator_digest, tensor_digest
from curvscope._diagnostics import Counted
from curvscope.linops._base import LinearOperator
from curvscope.linops._checks import check_symmetric
from curvscope.linops._orthogonal import cgs2, cgs2_checked
from curvscope.linops._probes import check_generator, random_probes
from curvscope.solvers._results import ConvergenceWarning, EigenResult

WHICH = ("LA", "SA", "LM", "BE")
#: Operators up to this size get a full basis by default (exact after one cycle).
SMALL_N = 400


class ConvergenceError(RuntimeError):
    """Raised with ``strict=True`` when not every pair converged; ``.result`` holds them."""

    def __init__(self, message: str, result: EigenResult) -> None:
        super().__init__(message)
        self.result = result


def _default_tol(dtype: torch.dtype) -> float:
    return math.sqrt(torch.finfo(dtype).eps)


#: The smallest residual, in units of ``eps ||A||``, asked of a pair whose eigenvalue is near
#: zero: one product's own rounding is 3-7 ``eps ||A||`` on the zoo's nets (measured as
#: ``||H(3v)/3 - H v|| / ||H v||``), and a Krylov basis accumulates some more.
ZERO_RESIDUAL = 100.0


def zero_floor(tol: float, dtype: torch.dtype, anorm: float | Tensor) -> float:
    """The absolute residual below which a pair counts as converged whatever its eigenvalue:
    ``max(tol sqrt(eps), ZERO_RESIDUAL eps) ||A||``. Eigenvalues below about ``sqrt(eps)
    ||A||`` cannot meet a relative tolerance; in float32 ``tol sqrt(eps) ||A||`` alone would
    be below the products' rounding.
    """
    eps = torch.finfo(dtype).eps
    return max(tol * math.sqrt(eps), ZERO_RESIDUAL * eps) * float(anorm)


def product_noise(A: LinearOperator, generator: torch.Generator | None = None) -> float:
    """The products' own relative rounding, measured: ``||A(3v)/3 - A v|| / ||A v||`` for a
    random ``v`` (one product of two columns). Scaling by 3 (not a power of 2) changes every
    rounding on the way; the difference is the noise any tolerance must stay above.
    """
    n = A.shape[0]
    v = random_probes(n, 1, dtype=A.dtype, device=A.device, generator=generator)
    Y = A @ torch.cat([v, 3 * v], 1)
    scale = float(Y[:, 0].norm())
    return float((Y[:, 1] / 3 - Y[:, 0]).norm()) / scale if scale > 0 else 0.0


def _check_common(A: object, k: int, which: str, who: str) -> None:
    check_symmetric(A, who)
    assert isinstance(A, LinearOperator)
    n = A.shape[0]
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, n={n}], got {k!r}.")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}.")


def select(theta: Tensor, count: int, which: str) -> Tensor:
    """Indices of the ``count`` wanted values of ``theta`` (ascending input), in report order.

    ``LA`` descending, ``SA`` ascending, ``LM`` by descending magnitude, ``BE`` alternating
    between the top and the bottom (more from the top when ``count`` is odd), reported descending.
    """
    m = theta.numel()
    count = min(count, m)
    if which == "LA":
        return torch.argsort(theta, descending=True)[:count]
    if which == "SA":
        return torch.argsort(theta)[:count]
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True)[:count]
    order = torch.argsort(theta, descending=True)
    top = (count + 1) // 2
    idx = torch.cat([order[:top], order[m - (count - top):]]) if count - top else order[:top]
    return idx[torch.argsort(theta[idx], descending=True)]


#: The block a CPU eigsh tries when its operator can measure its products' cost.
CPU_BLOCK = 4
#: How much cheaper per column a ``CPU_BLOCK``-column product must be for blocks to pay: block
#: Lanczos needs more columns (top-20 to 1e-3 on a width-8 ResNet-18: 144 vs 108; top-10 to
#: 1e-6 on the Gaussian-mixture MLP: 76 vs 34) but spends less per column on Gram-Schmidt.
#: Measured end to end on one CPU core: the ResNet's products cost 1.7x less per column in
#: blocks of 4 and eigsh ran 1.2x faster; the MLP's 2.4x less and both ran alike.
BLOCK_COLUMN_FACTOR = 1.2


def default_block_size(A: LinearOperator, k: int) -> int:
    """The block ``eigsh`` uses unless told: ``min(k, 8)`` on an accelerator, where a batched
    product of ``b`` columns costs far less than ``b`` products; on a CPU ``CPU_BLOCK`` when the
    operator measures (``measured_seconds_per_column``, e.g. a Hessian with ``engine="auto"``)
    that a product of that many columns costs per column less than ``1 / BLOCK_COLUMN_FACTOR``
    of a single one, and 1 otherwise (single-vector Lanczos needs the fewest columns).
    """
    if A.device.type != "cpu":
        return min(k, 8)
    measure = getattr(A, "measured_seconds_per_column", None)
    if measure is None or k < CPU_BLOCK:
        return 1
    one, block = measure(1), measure(CPU_BLOCK)
    if one is None or block is None:
        return 1
    return CPU_BLOCK if block * BLOCK_COLUMN_FACTOR < one else 1


#: A block whose QR factor ``R`` is at most this ill-conditioned needs no Gram-Schmidt pass
#: after its QR (what is left along the basis stays below ``10 eps``).
QR_SAFE_CONDITION = 10.0


def _orthonormalize(X: Tensor, Q: Tensor, generator: torch.Generator | None) -> Tensor:
    """Orthonormal columns spanning ``X`` minus its part in ``span(Q)``; rank-deficient columns
    are replaced by random directions orthogonal to ``Q`` and to the others.

    On a CPU the second Gram-Schmidt pass runs only where the first cancelled (the DGKS test),
    and the final pass that guards the QR (``Q_x = X R^{-1}`` multiplies what is left along
    ``Q`` by up to ``cond(R)``) only when ``cond(R) > QR_SAFE_CONDITION``: a single column is
    only scaled, a well-conditioned block stays orthogonal to ``Q`` to working precision.
    """
    cpu = X.device.type == "cpu"
    orthogonal = False
    if cpu:
        X, orthogonal = cgs2_checked(X, Q)
        if orthogonal and X.shape[1] == 1:
            norm = X.norm()
            if bool(norm > 0):
                return X / norm
    else:
        X = cgs2(X, Q)
    Qx, R = torch.linalg.qr(X)
    if orthogonal and X.shape[1] > 0 and bool(torch.linalg.cond(R) <= QR_SAFE_CONDITION):
        return Qx  # what is left along Q grew by at most cond(R): still rounding
    diag = R.diagonal().abs()
    scale = X.norm(dim=0).max().clamp_min(torch.finfo(X.dtype).tiny)
    weak = diag <= 1e3 * torch.finfo(X.dtype).eps * scale
    if bool(weak.any()):
        fresh = random_probes(X.shape[0], int(weak.sum()), distribution="gaussian",
                              dtype=X.dtype, device=X.device, generator=generator)
        keep = Qx[:, ~weak]
        fresh = cgs2(cgs2(fresh, Q), keep)
        Qf, _ = torch.linalg.qr(fresh)
        Qx = torch.cat([keep, Qf], dim=1)
    return cgs2(Qx, Q)


def eigsh(
    A: LinearOperator,
    k: int,
    *,
    which: str = "LA",
    tol: float | None = None,
    atol: float = 0.0,
    max_iters: int = 200,
    block_size: int | None = None,
    num_vectors: int | None = None,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    strict: bool = False,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 10,
) -> EigenResult:
    """``k`` extreme eigenpairs of a symmetric operator by thick-restart block Lanczos.

    Args:
        A: symmetric operator ``[n, n]``.
        k: number of eigenpairs.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest, ``"LM"`` largest magnitude,
            ``"BE"`` both ends (``ceil(k/2)`` from the top, the rest from the bottom).
        tol: relative residual tolerance (default ``sqrt(eps)`` of the dtype: ``1.5e-8`` in
            float64, ``3.5e-4`` in float32).
        atol: absolute residual tolerance: a pair also converges when ``||A v - l v|| <= atol``
            (use ``atol = 1e-4 * ||A||`` for eigenvalues near zero, where a relative tolerance
            asks for more than the spectrum's scale can give).
        max_iters: maximum number of restarts.
        block_size: ``b``, columns per product (default :func:`default_block_size`: ``min(k,
            8)`` on accelerators; on CPUs 4 where the operator measures that 4-column products
            pay for the extra columns block Lanczos needs, else 1).
        num_vectors: basis size before a restart (default ``max(2k + 2b, 20)``, capped at ``n``).
        v0: warm start ``[n]`` or ``[n, j]`` (e.g. eigenvectors of a previous step).
        generator: explicit randomness for the start block.
        strict: raise :class:`ConvergenceError` instead of warning when not all converge.
        checkpoint: a file to save the state to every ``checkpoint_every`` products
            (atomically); when it exists the run resumes from it, with the same result as an
            uninterrupted run. A file from another run or a damaged one raises
            :class:`~curvscope.CheckpointError`.
        checkpoint_every: products between saves.

    Returns:
        :class:`~curvscope.solvers.EigenResult` with measured residual norms and a converged mask.

    Example:
        >>> import torch
        >>> from curvscope.linops import DiagonalOperator
        >>> A = DiagonalOperator(torch.linspace(-1, 5, 100, dtype=torch.float64))
        >>> res = eigsh(A, 3, generator=torch.Generator().manual_seed(0))
        >>> [round(x, 6) for x in res.eigenvalues.tolist()], res.all_converged
        ([5.0, 4.939394, 4.878788], True)
    """
    _check_common(A, k, which, "eigsh")
    check_generator(generator)
    n = A.shape[0]
    tol = _default_tol(A.dtype) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}.")
    b = default_block_size(A, k) if block_size is None else block_size
    if not isinstance(b, int) or not 1 <= b <= n:
        raise ValueError(f"block_size must be an int in [1, n={n}], got {block_size!r}.")
    m = max(2 * k + 2 * b, 20) if num_vectors is None else num_vectors
    if num_vectors is None and n <= SMALL_N:
        m = n  # small problems: one full Krylov space, exact in one cycle
    m = min(m, n)
    if m < min(k + b, n):
        raise ValueError(f"num_vectors must be at least k + block_size = {k + b}, got {m}.")
    keep = min(max(k + (m - k) // 2, k), m - b) if m < n else m
    counted = Counted(A)
    gen_digest = generator_digest(generator)
    dtype, device = A.dtype, A.device
    basis = _Basis(n, m + b, dtype, device)  # Q and A Q, filled block by block
    if v0 is not None:
        if not isinstance(v0, Tensor) or v0.shape[0] != n or v0.ndim not in (1, 2):
            raise ValueError(f"v0 must be a tensor [{n}] or [{n}, j], got "
                             f"{getattr(v0, 'shape', type(v0).__name__)}.")
        X = v0.reshape(n, -1).to(dtype=dtype, device=device)
    else:
        X = random_probes(n, b, distribution="gaussian", dtype=dtype, device=device,
                          generator=generator)
    X = _orthonormalize(X, basis.Q, generator)
    anorm = torch.zeros((), dtype=torch.float64)
    restarts = 0
    check_early = v0 is not None  # a warm start may already hold the answer: check after 1 block
    ckpt = Checkpointer(checkpoint, checkpoint_every, {
        "algorithm": "eigsh", "n": n, "k": k, "which": which, "tol": tol, "atol": atol,
        "block_size": b, "num_vectors": m, "dtype": str(dtype), "start": tensor_digest(X),
        "generator": gen_digest,
    }, operator=A)
    state = ckpt.load()
    if state is not None:
        basis.reset(state["Q"].to(device), state["AQ"].to(device))
        X = state["X"].to(device)
        anorm, restarts, check_early = state["anorm"], state["restarts"], state["check_early"]
        if generator is not None:
            generator.set_state(state["generator"])
        counted.restore(state)
    history: list[float] = []
    stagnated = False
    while True:
        while basis.size < m and X.shape[1] > 0 and not (check_early and basis.size >= k):
            # whole blocks only (the basis may pass m by less than b): a truncated block would
            # lose part of the Krylov continuation that a thick restart relies on
            X = X[:, : n - basis.size]
            AX = counted @ X
            basis.append(X, AX)
            X = _orthonormalize(AX, basis.Q, generator)[:, :b] if basis.size < n else X[:, :0]
            if ckpt.due(counted.num_products):
                ckpt.save({"Q": basis.Q.cpu(), "AQ": basis.AQ.cpu(), "X": X.cpu(),
                           "anorm": anorm,
                           "restarts": restarts, "check_early": check_early,
                           "generator": None if generator is None else generator.get_state(),
                           **counted.counters()})
        Q, AQ = basis.Q, basis.AQ
        H = (Q.T @ AQ).to("cpu", torch.float64)
        theta, S = torch.linalg.eigh((H + H.T) / 2)
        anorm = torch.maximum(anorm, theta.abs().max())
        want = select(theta, k, which)
        S_w = S[:, want].to(dtype=dtype, device=device)
        Y, AY = Q @ S_w, AQ @ S_w
        theta_w = theta[want].to(dtype=dtype, device=device)
        res = (AY - Y * theta_w).norm(dim=0)
        allowed = torch.clamp(tol * theta_w.abs(), min=max(atol, zero_floor(tol, dtype, anorm)))
        converged = res <= allowed
        done = bool(converged.all()) or Q.shape[1] >= n
        worst = float((res / allowed.clamp_min(1e-300)).max())
        history.append(worst)
        if _stagnated(history):
            stagnated = True
            break
        if check_early and not done:
            check_early = False  # not yet: expand the basis as usual, no restart
            continue
        if done or restarts >= max_iters:
            break
        restarts += 1
        kept = select(theta, keep, which)
        S_k = S[:, kept].to(dtype=dtype, device=device)
        basis.reset(Q @ S_k, AQ @ S_k)
        # X (the next Krylov block) is orthogonal to the old basis, hence to the kept Ritz vectors
    result = EigenResult(theta_w, Y, res, converged, "lanczos", which, tol, restarts,
                         counted.cost())
    return _finish(result, strict, stagnated, float(anorm), _ritz_gaps(theta, want))


def _ritz_gaps(theta: Tensor, want: Tensor) -> Tensor:
    """Each wanted Ritz value's distance to the nearest other Ritz value (``inf`` alone)."""
    if theta.numel() < 2:
        return torch.full((want.numel(),), math.inf, dtype=theta.dtype)
    d = (theta[want, None] - theta[None, :]).abs()
    d[torch.arange(want.numel()), want] = math.inf
    return d.min(dim=1).values


class _Basis:
    """The Krylov basis ``Q`` and ``A Q`` in preallocated ``[n, capacity]`` buffers, grown block
    by block (concatenating copied the whole basis at every block: 15 % of an eigsh on a CPU).
    """

    def __init__(self, n: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        self._Q = torch.empty(n, capacity, dtype=dtype, device=device)
        self._AQ = torch.empty(n, capacity, dtype=dtype, device=device)
        self.size = 0

    @property
    def Q(self) -> Tensor:
        return self._Q[:, : self.size]

    @property
    def AQ(self) -> Tensor:
        return self._AQ[:, : self.size]

    def append(self, X: Tensor, AX: Tensor) -> None:
        j, b = self.size, X.shape[1]
        self._Q[:, j : j + b] = X
        self._AQ[:, j : j + b] = AX
        self.size = j + b

    def reset(self, Q: Tensor, AQ: Tensor) -> None:
        """Replace the basis by ``Q`` and ``A Q`` (new tensors, e.g. the kept Ritz vectors)."""
        self.size = Q.shape[1]
        self._Q[:, : self.size] = Q
        self._AQ[:, : self.size] = AQ


STAGNATION_WINDOW = 8


def _stagnated(history: list[float]) -> bool:
    """No progress: the worst residual (in units of its tolerance) of the last
    ``STAGNATION_WINDOW`` restarts is no better than 0.9 x the best before them.

    This happens when the tolerance is below what the operator's precision allows (e.g. 1e-6 for
    float32 products, whose own rounding noise is about that size).
    """
    w = STAGNATION_WINDOW
    if len(history) < 2 * w:
        return False
    return min(history[-w:]) > 0.9 * min(history[:-w])


#: A wanted Ritz value closer than this fraction of ``||A||`` to another is in a cluster.
CLUSTER_GAP = 1e-2


def _stall_reason(result: EigenResult, anorm: float | None, gaps: Tensor | None) -> str:
    """Why restarted Lanczos stopped improving. ``gaps``: each wanted Ritz value's distance to
    the nearest other Ritz value of the basis. Well separated values that stall are limited by
    the products' precision; values in a cluster (gap below ``CLUSTER_GAP ||A||``) converge
    slowly whatever the precision, and their residual still bounds each one's error (for
    symmetric ``A`` and a unit ``y``, some eigenvalue lies within ``||A y - theta y||`` of
    ``theta``). Without ``anorm`` and ``gaps`` the stall is put down to the precision.
    """
    precision = (f"stopped after {result.num_iters} restarts without progress: the tolerance is "
                 "probably below the precision of the products (use a larger tol, or float64 via "
                 "Problem(accumulate_dtype=torch.float64) and a float64 model)")
    if not anorm or gaps is None:
        return precision
    stuck = ~result.converged
    worst = float(result.residual_norms[stuck].max())
    gap = float(gaps.to(result.residual_norms.device)[stuck].min())
    if gap > CLUSTER_GAP * anorm:
        return precision
    return (f"stopped after {result.num_iters} restarts without progress: these eigenvalues "
            f"are clustered (gaps down to {gap:.2g}, {gap / anorm:.1e} of ||A||), which slows "
            "restarted Lanczos whatever the precision; ask for fewer pairs or a larger basis "
            f"(num_vectors), or read each eigenvalue as +- its residual norm (up to {worst:.2g}), "
            "which bounds its distance to an eigenvalue of A")


def _finish(result: EigenResult, strict: bool, stagnated: bool = False,
            anorm: float | None = None, gaps: Tensor | None = None) -> EigenResult:
    if result.all_converged:
        return result
    bad = int((~result.converged).sum())
    if stagnated:
        why = _stall_reason(result, anorm, gaps)
    else:
        why = f"in {result.num_iters} iterations; raise max_iters or tol"
    worst = float(result.relative_residuals[~result.converged].max())
    message = (f"{result.method}: {bad} of {result.k} eigenpairs did not reach the relative "
               f"residual {result.tol:g} (worst of those {worst:.2e}); {why}.")
    if strict:
        raise ConvergenceError(message, result)
    warnings.warn(message, ConvergenceWarning, stacklevel=3)
    return result


def power_iteration(
    A: LinearOperator,
    k: int = 1,
    *,
    tol: float | None = None,
    max_iters: int = 1000,
    generator: torch.Generator | None = None,
    strict: bool = False,
) -> EigenResult:
    """``k`` largest-magnitude eigenpairs by deflated power iteration (PyHessian's method).

    Each pair iterates ``v <- (I - V V^T) A v / ||.||`` against the pairs already found and stops
    on the residual ``||A v - (v^T A v) v|| <= tol * |v^T A v|`` (PyHessian stops on a relative
    change of the Rayleigh quotient instead). One product per iteration: ``O(k * iters)`` passes.
    """
    _check_common(A, k, "LM", "power_iteration")
    check_generator(generator)
    n = A.shape[0]
    tol = _default_tol(A.dtype) if tol is None else float(tol)
    counted = Counted(A)
    V = torch.zeros(n, 0, dtype=A.dtype, device=A.device)
    vals, res_list, conv, iters = [], [], [], 0
    for _ in range(k):
        v = cgs2(random_probes(n, 1, distribution="gaussian", dtype=A.dtype, device=A.device,
                                generator=generator), V)
        v = v / v.norm()
        lam, r = torch.zeros((), dtype=A.dtype), torch.full((), float("inf"), dtype=A.dtype)
        for _ in range(max_iters):
            iters += 1
            w = counted @ v
            lam = (v * w).sum()
            r = (w - lam * v).norm()
            if bool(r <= tol * lam.abs()):
                break
            w = cgs2(w, V)
            v = w / w.norm().clamp_min(torch.finfo(A.dtype).tiny)
        vals.append(lam)
        res_list.append(r)
        conv.append(bool(r <= tol * lam.abs()))
        V = torch.cat([V, v], 1)
    eig = torch.stack(vals)
    order = torch.argsort(eig.abs(), descending=True)
    result = EigenResult(eig[order], V[:, order], torch.stack(res_list)[order],
                         torch.tensor(conv)[order], "power", "LM", tol, iters, counted.cost())
    return _finish(result, strict)


def subspace_iteration(
    A: LinearOperator,
    k: int,
    *,
    oversample: int = 10,
    tol: float | None = None,
    max_iters: int = 200,
    generator: torch.Generator | None = None,
    strict: bool = False,
) -> EigenResult:
    """``k`` largest-magnitude eigenpairs by randomised subspace iteration with Rayleigh-Ritz.

    ``X <- orth(A X)`` on a block of ``k + oversample`` columns (one product per iteration), with
    the Ritz pairs of ``X^T A X`` checked on their measured residuals. Converges at the rate
    ``|l_{k+p+1} / l_k|`` per iteration.
    """
    _check_common(A, k, "LM", "subspace_iteration")
    check_generator(generator)
    n = A.shape[0]
    tol = _default_tol(A.dtype) if tol is None else float(tol)
    counted = Counted(A)
    width = min(k + oversample, n)
    X, _ = torch.linalg.qr(random_probes(n, width, distribution="gaussian", dtype=A.dtype,
                                         device=A.device, generator=generator))
    it = 0
    while True:
        it += 1
        AX = counted @ X
        H = (X.T @ AX).to("cpu", torch.float64)
        theta, S = torch.linalg.eigh((H + H.T) / 2)
        want = select(theta, k, "LM")
        S_w = S[:, want].to(A.dtype).to(A.device)
        Y, AY = X @ S_w, AX @ S_w
        theta_w = theta[want].to(dtype=A.dtype, device=A.device)
        res = (AY - Y * theta_w).norm(dim=0)
        converged = res <= tol * theta_w.abs()
        if bool(converged.all()) or it >= max_iters:
            break
        X, _ = torch.linalg.qr(AX)
    result = EigenResult(theta_w, Y, res, converged, "subspace", "LM", tol, it, counted.cost())
    return _finish(result, strict)
