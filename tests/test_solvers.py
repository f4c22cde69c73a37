"""Eigensolvers with certificates: planted spectra, exactness, ghosts, costs, warm starts, errors.

Every check is on eigenvalues and measured residuals ``||A v - l v||`` (never raw eigenvectors).
The bound behind the tolerances: for a symmetric ``A``, any unit ``v`` and any scalar ``theta``,
some eigenvalue of ``A`` lies within ``||A v - theta v||`` of ``theta``. So a pair reported
converged (``||A v - theta v|| <= tol * |theta|``) is within ``tol * |theta|`` of an eigenvalue, and
when the wanted eigenvalues are separated by more than that, of the planted one.
"""

import math
import warnings

import pytest
import torch

import curvscope as cs
from curvscope.linops import (
    PSD,
    SYMMETRIC,
    DenseOperator,
    DiagonalOperator,
    LowRankOperator,
)
from curvscope.solvers import (
    ConvergenceError,
    ConvergenceWarning,
    EigenResult,
    eigsh,
    lanczos,
    power_iteration,
    subspace_iteration,
)
from curvscope.solvers.sketch import nystrom_eigh, sketch_eigh
from curvscope.testing import (
    PlantedOperator,
    dense_ggn,
    dense_hessian,
    planted_matrix,
    tiny_cnn,
    tiny_mlp,
)

F64 = torch.float64
EPS = torch.finfo(F64).eps
TOL = math.sqrt(EPS)  # the solvers' default relative residual tolerance in float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- planted spectra
def dense_planted(eigenvalues, seed=0):
    """``Q diag(l) Q^T`` with a Haar-random orthogonal ``Q`` (dense, for small ``n``)."""
    return DenseOperator(planted_matrix(eigenvalues, seed))


def spectrum(kind, n, seed=0):
    """Outliers (separated, or with near-degenerate pairs ``10, 10 + 1e-6``) on both sides of a
    uniform bulk in ``[-1, 1]``."""
    outliers = {
        "separated": [50.0, 30.0, 20.0, 15.0, 12.0, -40.0, -25.0, -18.0, -14.0],
        "clustered": [10.0 + 1e-6, 10.0, 6.0, 4.0, -8.0 - 1e-6, -8.0, -5.0, -3.0],
    }[kind]
    out = torch.tensor(outliers, dtype=F64)
    bulk = 2 * torch.rand(n - out.numel(), generator=gen(seed), dtype=F64) - 1
    return torch.cat([out, bulk])


def expected(l, k, which):
    """The wanted planted eigenvalues in report order (independent of the library's ``select``)."""
    desc = torch.sort(l, descending=True).values
    if which == "LA":
        return desc[:k]
    if which == "SA":
        return torch.sort(l).values[:k]
    if which == "LM":
        return l[torch.argsort(l.abs(), descending=True)[:k]]
    top = (k + 1) // 2
    return torch.cat([desc[:top], desc[desc.numel() - (k - top):]])


def measured_residuals(A, res):
    V = res.eigenvectors
    return (A @ V - V * res.eigenvalues).norm(dim=0)


def check_certified(A, res, want, *, anorm, require_converged=True):
    """Reported residuals are the measured ones; converged pairs meet the tolerance; every value
    is within its residual of the planted one (the symmetric residual bound)."""
    assert isinstance(res, EigenResult)
    k = want.numel()
    assert res.eigenvalues.shape == (k,) and res.eigenvalues.dtype == F64
    assert res.residual_norms.shape == (k,) and res.converged.shape == (k,)
    assert res.converged.dtype == torch.bool
    V = res.eigenvectors
    assert V.shape == (A.shape[0], k)
    slack = 1e3 * EPS * anorm  # rounding in a product with A and in the recombined images
    torch.testing.assert_close(V.norm(dim=0), torch.ones(k, dtype=F64), rtol=0, atol=1e-10)
    measured = measured_residuals(A, res)
    assert (res.residual_norms - measured).abs().max() <= slack, (res.residual_norms, measured)
    if require_converged:
        assert res.all_converged, res
    conv = res.converged
    bound = res.tol * res.eigenvalues.abs()
    assert (measured[conv] <= bound[conv] + slack).all(), (measured, bound)
    # eigenvalue error <= residual (exact for unit v), and so <= tol * |l| when converged
    err = (res.eigenvalues - want).abs()
    assert (err <= measured + slack).all(), (res.eigenvalues, want, measured)
    assert (err[conv] <= res.tol * want[conv].abs() + slack).all()


# sizes: dense 200; matrix-free 3000; matrix-free 10^5 in a separate (cheap, k small) test
OPERATORS = {
    "dense200": lambda kind: dense_planted(spectrum(kind, 200), seed=1),
    "free3000": lambda kind: PlantedOperator(spectrum(kind, 3000), seed=2),
}


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
@pytest.mark.parametrize("kind", ["separated", "clustered"])
@pytest.mark.parametrize("size", OPERATORS)
def test_eigsh_planted_spectrum(size, kind, which):
    A = OPERATORS[size](kind)
    l = spectrum(kind, A.shape[0])
    k = 4
    res = eigsh(A, k, which=which, generator=gen(3))
    assert res.which == which and res.tol == TOL
    check_certified(A, res, expected(l, k, which), anorm=float(l.abs().max()))
    if kind == "clustered":  # the pair 10, 10 + 1e-6 (or -8, -8 - 1e-6) is resolved, not merged
        assert torch.diff(torch.sort(res.eigenvalues).values).min() > 0.5e-6


@pytest.mark.parametrize("which", ["LA", "LM"])
def test_eigsh_planted_spectrum_matrix_free_1e5(which):
    n = 100_000
    A = PlantedOperator(spectrum("separated", n), num_reflections=2, seed=4)
    res = eigsh(A, 2, which=which, generator=gen(5))
    check_certified(A, res, expected(A.eigenvalues, 2, which), anorm=50.0)


@pytest.mark.parametrize("tol", [None, 1e-11])
def test_eigsh_tolerance_bounds_eigenvalue_error(tol):
    """Eigenvalue error <= residual <= tol |l|: tightening tol tightens the error."""
    A = OPERATORS["dense200"]("clustered")
    l = spectrum("clustered", 200)
    res = eigsh(A, 4, which="LA", tol=tol, generator=gen(6))
    want = expected(l, 4, "LA")
    check_certified(A, res, want, anorm=10.0)
    t = TOL if tol is None else tol
    assert res.tol == t
    assert ((res.eigenvalues - want).abs() <= 10 * t * want.abs()).all()


def test_power_iteration_planted_spectrum():
    # LM order: 50, -40, 30; deflated power stops each pair on its own residual
    A = OPERATORS["free3000"]("separated")
    l = A.eigenvalues
    res = power_iteration(A, 1, generator=gen(7))
    check_certified(A, res, expected(l, 1, "LM"), anorm=50.0)
    with warnings.catch_warnings():
        # later pairs inherit the earlier pairs' residuals through the deflation; what matters
        # here is that the certificates are honest, converged or not
        warnings.simplefilter("ignore", ConvergenceWarning)
        res3 = power_iteration(A, 3, max_iters=300, generator=gen(7))
    assert res3.method == "power" and res3.which == "LM"
    check_certified(A, res3, expected(l, 3, "LM"), anorm=50.0, require_converged=False)
    assert bool(res3.converged[0])
    assert ((res3.eigenvalues - expected(l, 3, "LM")).abs() <= 10 * TOL * 50.0).all()


@pytest.mark.parametrize("kind", ["separated", "clustered"])
@pytest.mark.parametrize("size", OPERATORS)
def test_subspace_iteration_planted_spectrum(size, kind):
    A = OPERATORS[size](kind)
    l = spectrum(kind, A.shape[0])
    res = subspace_iteration(A, 4, generator=gen(8))
    assert res.method == "subspace"
    check_certified(A, res, expected(l, 4, "LM"), anorm=float(l.abs().max()))


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
@pytest.mark.parametrize("size", OPERATORS)
def test_sketch_eigh_with_power_iterations_planted_spectrum(size, which):
    # outliers 50..12 and -40..-14 over a bulk in [-1, 1]: each power iteration shrinks the
    # residual of the pair l by about |l| / 1 (the bulk edge)
    A = OPERATORS[size]("separated")
    l = spectrum("separated", A.shape[0])
    res = sketch_eigh(A, 4, which=which, oversample=6, num_power_iters=8, generator=gen(9))
    assert res.method == "sketch" and res.which == which and res.tol == TOL
    check_certified(A, res, expected(l, 4, which), anorm=50.0)
    assert res.error_estimate is not None and res.error_estimate > 0


def test_sketch_eigh_without_power_iterations_is_honest():
    """q = 0 (what skerch does) on a heavy bulk: inaccurate, but the residuals say so."""
    A = OPERATORS["free3000"]("separated")
    res = sketch_eigh(A, 4, num_power_iters=0, generator=gen(10))
    check_certified(A, res, expected(A.eigenvalues, 4, "LM"), anorm=50.0,
                    require_converged=False)
    assert not res.all_converged
    better = sketch_eigh(A, 4, num_power_iters=4, generator=gen(10))
    assert (better.residual_norms < res.residual_norms).all()


@pytest.mark.parametrize("storage", ["host", "disk"])
def test_sketch_eigh_off_device_storage_streams_and_agrees(monkeypatch, storage):
    """Host / disk tall matrices, streamed in small row blocks, give the device answer."""
    import importlib

    tall = importlib.import_module("curvscope.solvers._tall")
    A = OPERATORS["free3000"]("separated")
    l = spectrum("separated", A.shape[0])
    dev = sketch_eigh(A, 5, which="LA", num_power_iters=8, block_size=5, generator=gen(31))
    monkeypatch.setattr(tall, "STREAM_BYTES", 8 * 16 * 100)  # 100 rows of all 15 columns
    blocks = []
    rows = tall.TallMatrix._rows

    def recording(self):
        out = rows(self)
        blocks.append(8 * self.cols * max(r.stop - r.start for r in out))
        return out

    monkeypatch.setattr(tall.TallMatrix, "_rows", recording)
    off = sketch_eigh(A, 5, which="LA", num_power_iters=8, block_size=5, generator=gen(31),
                      storage=storage)
    assert max(blocks) <= 8 * 16 * 100 and len(blocks) > 10  # float64 bytes per row block
    check_certified(A, off, expected(l, 5, "LA"), anorm=50.0)
    torch.testing.assert_close(off.eigenvalues, dev.eigenvalues, rtol=1e-13, atol=0)
    signs = torch.sign((off.eigenvectors * dev.eigenvectors).sum(0))
    torch.testing.assert_close(off.eigenvectors * signs, dev.eigenvectors, rtol=0, atol=1e-10)
    assert off.cost.num_matvecs == dev.cost.num_matvecs == 10 * 15 + 10
    assert abs(off.error_estimate - dev.error_estimate) <= 1e-10 * dev.error_estimate


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("cond", [1e2, 1e6])
def test_orthonormalize_ill_conditioned_tall_matrix(dtype, cond):
    """SVQB on float64 Gram matrices: orthonormal to working precision and the same range, even
    at condition numbers where CholeskyQR in the storage precision breaks down."""
    from curvscope.solvers._tall import TallMatrix
    from curvscope.solvers.sketch import orthonormalize_

    n, w = 500, 12
    U = torch.linalg.qr(torch.randn(n, w, generator=gen(1), dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(w, w, generator=gen(2), dtype=F64))[0]
    Y = U @ torch.diag(torch.logspace(0, -math.log10(cond), w, dtype=F64)) @ V.T
    X = TallMatrix(n, w, dtype, torch.device("cpu"))
    X.set_columns(0, Y.to(dtype))
    orthonormalize_(X, gen(3))
    Q = X.view().to(F64)
    eps = torch.finfo(dtype).eps
    assert (Q.T @ Q - torch.eye(w, dtype=F64)).abs().max() <= 20 * eps
    # the range is kept: every direction of Y to within its precision relative to its size
    assert (U - Q @ (Q.T @ U)).norm() <= 1e2 * eps * cond


def test_orthonormalize_refills_missing_directions():
    """A rank-3 input of 8 columns: the 3 directions are kept, 5 fresh ones complete the basis."""
    from curvscope.solvers._tall import TallMatrix
    from curvscope.solvers.sketch import orthonormalize_

    n = 300
    B = torch.randn(n, 3, generator=gen(4), dtype=F64)
    Y = torch.cat([B, B @ torch.randn(3, 4, generator=gen(5), dtype=F64),
                   torch.zeros(n, 1, dtype=F64)], 1)
    X = TallMatrix(n, 8, F64, torch.device("cpu"))
    X.set_columns(0, Y)
    orthonormalize_(X, gen(6))
    Q = X.view()
    assert (Q.T @ Q - torch.eye(8, dtype=F64)).abs().max() <= 1e-14
    assert (B - Q @ (Q.T @ B)).norm() <= 1e-12 * B.norm()


def _psd_decaying(n, seed):
    l = torch.zeros(n, dtype=F64)
    l[:30] = 100.0 * 0.1 ** torch.arange(30, dtype=F64)  # 100, 10, 1, ..., below eps * 100
    l[30:] = 1e-30 * torch.rand(n - 30, generator=gen(seed), dtype=F64)
    return l


@pytest.mark.parametrize("size", [300, 3000])
def test_nystrom_eigh_planted_psd(size):
    l = _psd_decaying(size, seed=11)
    A = dense_planted(l, seed=12) if size <= 300 else PlantedOperator(l, seed=12)
    if isinstance(A, DenseOperator):
        A = DenseOperator(A.M, tags={SYMMETRIC, PSD})
    assert A.is_psd
    res = nystrom_eigh(A, 4, oversample=16, generator=gen(13))
    assert res.method == "nystrom"
    check_certified(A, res, expected(l, 4, "LA"), anorm=100.0)


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("reorth", ["full", "partial"])
@pytest.mark.parametrize("n", [50, 100])
def test_lanczos_n_steps_recovers_every_eigenvalue(n, reorth):
    M = torch.randn(n, n, generator=gen(n), dtype=F64)
    M = (M + M.T) / 2
    res = lanczos(DenseOperator(M), n, reorth=reorth, generator=gen(1))
    theta, S = res.ritz()
    exact = torch.linalg.eigvalsh(M)
    scale = exact.abs().max()
    assert theta.shape == (1, n) and theta.dtype == F64
    assert (theta[0] - exact).abs().max() <= 1e-10 * scale
    # full: orthonormal to working precision; partial: semi-orthogonal (Simon: sqrt(eps))
    Q = res.basis[0]
    loss = (Q @ Q.T - torch.eye(n, dtype=F64)).abs().max()
    assert loss <= (1e3 * n * EPS if reorth == "full" else math.sqrt(EPS))


def test_sketch_eigh_exact_at_low_rank():
    n, lam = 400, torch.tensor([9.0, -7.0, 5.0, -3.0, 2.0, 1.0, -0.5, 0.25], dtype=F64)
    V = torch.linalg.qr(torch.randn(n, 8, generator=gen(14), dtype=F64))[0]
    A = LowRankOperator(V, lam)
    for k, over in [(8, 0), (5, 3), (3, 10)]:  # rank 8 <= k + oversample
        res = sketch_eigh(A, k, oversample=over, num_power_iters=0, generator=gen(15))
        by_mag = lam[torch.argsort(lam.abs(), descending=True)]
        assert (res.eigenvalues - by_mag[:k]).abs().max() <= 100 * EPS * 9.0
        assert res.residual_norms.max() <= 100 * EPS * 9.0
        assert res.all_converged
        # the a-posteriori error is that of the rank-k truncation: ||dropped eigenvalues||_2
        dropped = float(by_mag[k:].norm())
        if k == 8:
            assert res.error_estimate <= 1e3 * EPS * 9.0
        else:  # a 10-sample estimate of ||E||_F: right to within a factor 2
            assert dropped / 2 <= res.error_estimate <= 2 * dropped
    assert res.cost.num_matvecs == 2 * (3 + 10) + 10  # (q + 2)(k + oversample) + num_test


def test_nystrom_eigh_exact_at_low_psd_rank():
    n, lam = 400, torch.tensor([9.0, 7.0, 5.0, 3.0, 1e-3], dtype=F64)
    V = torch.linalg.qr(torch.randn(n, 5, generator=gen(16), dtype=F64))[0]
    A = LowRankOperator(V, lam)
    assert A.is_psd
    res = nystrom_eigh(A, 5, oversample=2, generator=gen(17))
    assert (res.eigenvalues - lam).abs().max() <= 1e3 * EPS * 9.0
    assert res.residual_norms.max() <= 1e3 * EPS * 9.0
    assert res.error_estimate <= 1e4 * EPS * 9.0


def _indefinite_rank3():
    V = torch.linalg.qr(torch.randn(50, 3, generator=gen(18), dtype=F64))[0]
    return LowRankOperator(V, torch.tensor([3.0, -2.0, 1.0], dtype=F64))


def test_nystrom_refuses_operator_not_tagged_psd():
    A = _indefinite_rank3()
    assert not A.is_psd
    with pytest.raises(ValueError, match="positive semi-definite"):
        nystrom_eigh(A, 2, generator=gen(0))
    # a dense matrix is never guessed PSD, even when it is: refused, or run with a warning
    lam = torch.tensor([4.0, 2.0, 1.0, 0.0, 0.0, 0.0], dtype=F64)
    Q = torch.linalg.qr(torch.randn(6, 6, generator=gen(19), dtype=F64))[0]
    B = DenseOperator((Q * lam) @ Q.T, tags={SYMMETRIC})
    with pytest.raises(ValueError, match="not tagged psd"):
        nystrom_eigh(B, 2)
    with pytest.warns(UserWarning, match="positive semi-definite"):
        res = nystrom_eigh(B, 3, oversample=1, allow_indefinite=True, generator=gen(0))
    assert (res.eigenvalues - lam[:3]).abs().max() <= 1e3 * EPS * 4.0


def test_nystrom_allow_indefinite_runs_with_warning():
    """Y (Omega^T A Omega)^+ Y^T is exact at low rank even for an indefinite A."""
    A = _indefinite_rank3()
    with pytest.warns(UserWarning, match="positive semi-definite"):
        res = nystrom_eigh(A, 2, allow_indefinite=True, generator=gen(0))
    assert isinstance(res, EigenResult) and res.k == 2
    assert torch.isfinite(res.eigenvalues).all() and torch.isfinite(res.residual_norms).all()
    assert torch.allclose(res.eigenvalues, torch.tensor([3.0, -2.0], dtype=F64), atol=1e-10)
    with pytest.raises(ValueError, match="not positive definite"):
        nystrom_eigh(DenseOperator(A.to_dense(), tags={"symmetric", "psd"}), 2,
                     generator=gen(0))


# ----------------------------------------------------------------------------- many pairs, ghosts
def _many_outliers(n, k, seed):
    top = torch.linspace(20.0, 5.0, k, dtype=F64)
    bulk = 2 * torch.rand(n - k, generator=gen(seed), dtype=F64) - 1
    return torch.cat([top, bulk])


@pytest.mark.parametrize("n,k", [(2000, 40), (3000, 200)])
def test_eigsh_many_pairs_no_ghosts(n, k):
    l = _many_outliers(n, k, seed=k)
    A = PlantedOperator(l, seed=k)
    res = eigsh(A, k, generator=gen(19))
    want = l[:k]  # already descending
    check_certified(A, res, want, anorm=20.0)
    # distinct beyond tolerance: no value is reported twice
    gaps = -torch.diff(res.eigenvalues)
    assert gaps.min() > 10 * TOL * 20.0
    # and the eigenvectors are orthonormal (a ghost would be a near-copy)
    V = res.eigenvectors
    assert (V.T @ V - torch.eye(k, dtype=F64)).abs().max() <= 1e-10


def _count_near(theta, value, tol):
    return int(((theta - value).abs() <= tol * abs(value)).sum())


def test_lanczos_without_reorthogonalisation_has_ghosts():
    """hessian-eigenthings' default (plain Lanczos) reports copies of the top eigenvalue; full
    and partial reorthogonalisation report it once."""
    l = _many_outliers(2000, 40, seed=40)
    A = PlantedOperator(l, seed=40)
    m = 120
    counts = {}
    for reorth in ["none", "full", "partial"]:
        res = lanczos(A, m, reorth=reorth, generator=gen(20))
        theta = res.ritz()[0][0]
        counts[reorth] = [_count_near(theta, float(v), 1e-8) for v in l[:3]]
    assert counts["none"][0] >= 2, counts  # ghost copies of the top eigenvalue
    assert counts["full"] == [1, 1, 1], counts
    assert counts["partial"] == [1, 1, 1], counts


# ----------------------------------------------------------------------------- breakdown
REPEATED = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0], dtype=F64)


@pytest.mark.parametrize("reorth,basis", [("full", "device"), ("full", "host"),
                                          ("partial", "device")])
def test_lanczos_breakdown_on_repeated_eigenvalues(reorth, basis):
    """The Krylov space of diag(1,1,2,2,3,3) has dimension 3: beta vanishes at step 3 and the
    run continues from a fresh orthogonal direction, so 6 steps still give every eigenvalue."""
    A = DiagonalOperator(REPEATED)
    res = lanczos(A, 6, reorth=reorth, basis=basis, generator=gen(21))
    assert torch.isfinite(res.alpha).all() and torch.isfinite(res.beta).all()
    assert res.beta[0, 2].abs() <= 100 * EPS * 3.0  # the breakdown
    theta, S = res.ritz()
    assert (theta[0] - REPEATED).abs().max() <= 1e-12
    w = S[:, 0, :] ** 2
    # the start vector's measure only sees 1, 2, 3 (a third each for a Rademacher probe)
    for value in (1.0, 2.0, 3.0):
        assert abs(float(w[0][(theta[0] - value).abs() < 1e-8].sum()) - 1 / 3) <= 1e-12


def test_lanczos_breakdown_without_reorth_or_basis():
    A = DiagonalOperator(REPEATED)
    res = lanczos(A, 6, reorth="none", basis="none", num_probes=3, generator=gen(22))
    assert res.basis is None
    assert torch.isfinite(res.alpha).all() and torch.isfinite(res.beta).all()
    theta, S = res.ritz()
    w = S[:, 0, :] ** 2
    torch.testing.assert_close(w.sum(1), torch.ones(3, dtype=F64), rtol=0, atol=1e-12)
    for p in range(3):  # nodes with weight are exactly the eigenvalues; the rest weigh nothing
        seen = theta[p][w[p] > 1e-12]
        torch.testing.assert_close(seen, torch.tensor([1.0, 2.0, 3.0], dtype=F64), rtol=0,
                                   atol=1e-12)


@pytest.mark.parametrize("reorth", ["full", "partial", "none"])
def test_lanczos_host_basis_equals_device_basis(reorth):
    A = dense_planted(spectrum("separated", 200), seed=23)
    dev = lanczos(A, 40, reorth=reorth, basis="device", num_probes=2, generator=gen(24))
    host = lanczos(A, 40, reorth=reorth, basis="host", num_probes=2, generator=gen(24))
    assert host.basis.device.type == "cpu"
    torch.testing.assert_close(host.alpha, dev.alpha, rtol=0, atol=1e-13)
    torch.testing.assert_close(host.beta, dev.beta, rtol=0, atol=1e-13)
    torch.testing.assert_close(host.basis, dev.basis, rtol=0, atol=1e-13)
    disk = lanczos(A, 40, reorth=reorth, basis="disk", num_probes=2, generator=gen(24))
    assert torch.equal(disk.alpha, host.alpha) and torch.equal(disk.basis, host.basis)
    if reorth == "none":
        none = lanczos(A, 40, reorth="none", basis="none", num_probes=2, generator=gen(24))
        torch.testing.assert_close(none.alpha, dev.alpha, rtol=0, atol=1e-13)


@pytest.mark.parametrize("basis", ["host", "disk"])
def test_off_device_basis_is_streamed_in_chunks(monkeypatch, basis):
    """A host / disk basis reaches the device a few vectors at a time (bounded device memory),
    and the chunked CGS2 gives the whole-basis answer."""
    import importlib

    lz = importlib.import_module("curvscope.solvers.lanczos")

    A = dense_planted(spectrum("separated", 200), seed=23)
    dev = lanczos(A, 40, basis="device", num_probes=2, generator=gen(24))
    monkeypatch.setattr(lz, "STREAM_BYTES", 3 * 2 * 200 * 8)  # 3 vectors of 2 probes, float64
    widest = []
    coefficients = lz._coefficients

    def recording(Q, W):
        widest.append(Q.shape[1])
        return coefficients(Q, W)

    monkeypatch.setattr(lz, "_coefficients", recording)
    res = lanczos(A, 40, basis=basis, num_probes=2, generator=gen(24))
    assert max(widest) == 3 and len(widest) > 40 * 2
    torch.testing.assert_close(res.alpha, dev.alpha, rtol=0, atol=1e-13)
    torch.testing.assert_close(res.beta, dev.beta, rtol=0, atol=1e-13)
    torch.testing.assert_close(res.basis, dev.basis, rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------- tiny networks
def _net(name):
    tp = {"mlp": tiny_mlp, "cnn": tiny_cnn}[name]()
    batches = tp.split_batches()
    problem = cs.Problem(tp.model, tp.loss_fn, tp.batches)
    return tp, batches, problem


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def net(request):
    tp, batches, problem = _net(request.param)
    Hd = dense_hessian(tp.model, tp.loss_fn, batches)
    Gd = dense_ggn(tp.model, tp.loss_fn, batches)
    return problem, Hd, Gd


def test_eigsh_hessian_top10_matches_dense(net):
    problem, Hd, _ = net
    exact = torch.linalg.eigvalsh(Hd)
    H = cs.HessianOperator(problem)
    res = eigsh(H, 10, which="LA", tol=1e-10, generator=gen(25))
    want = torch.flip(exact, [0])[:10]
    assert res.all_converged
    assert ((res.eigenvalues - want).abs() <= 1e-8 * want.abs()).all(), (res.eigenvalues, want)
    V = res.eigenvectors  # the certificate, with the dense Hessian
    measured = (Hd @ V - V * res.eigenvalues).norm(dim=0)
    assert (res.residual_norms - measured).abs().max() <= 1e3 * EPS * float(exact.abs().max())


def test_eigsh_hessian_both_ends_matches_dense(net):
    problem, Hd, _ = net
    exact = torch.linalg.eigvalsh(Hd)
    res = eigsh(cs.HessianOperator(problem), 6, which="BE", tol=1e-10, generator=gen(26))
    want = torch.cat([torch.flip(exact[-3:], [0]), torch.flip(exact[:3], [0])])
    assert res.all_converged
    assert ((res.eigenvalues - want).abs() <= 1e-8 * want.abs()).all(), (res.eigenvalues, want)
    assert (res.eigenvalues[3:] < 0).all()  # the Hessian's negative end


def test_eigsh_ggn_top5_matches_dense(net):
    problem, _, Gd = net
    exact = torch.linalg.eigvalsh(Gd)
    G = cs.GGNOperator(problem)
    res = eigsh(G, 5, which="LA", tol=1e-10, generator=gen(27))
    want = torch.flip(exact, [0])[:5]
    assert res.all_converged
    assert ((res.eigenvalues - want).abs() <= 1e-8 * want.abs()).all(), (res.eigenvalues, want)


# ----------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("k", [1, 3, 8])
def test_lanczos_lockstep_probes_cost_one_data_pass_per_step(k):
    _, _, problem = _net("mlp")
    H = cs.HessianOperator(problem)
    m = 6
    res = lanczos(H, m, num_probes=k, generator=gen(28))
    assert res.cost.num_data_passes == m
    assert res.cost.num_products == m
    assert res.cost.num_matvecs == m * k
    assert res.alpha.shape == (k, m) and res.beta.shape == (k, m)


@pytest.mark.parametrize("block_size", [1, 3, 5])
def test_eigsh_block_products_are_data_passes(block_size):
    _, _, problem = _net("mlp")
    H = cs.HessianOperator(problem)
    res = eigsh(H, 5, block_size=block_size, num_vectors=20, generator=gen(29))
    c = res.cost
    assert c.num_data_passes == c.num_products  # one block product, one pass over the data
    assert c.num_matvecs == block_size * c.num_products  # every product is a whole block
    assert c.num_products > 0 and c.wall_time > 0


def test_full_reorthogonalisation_does_not_call_item(monkeypatch):
    A = dense_planted(spectrum("separated", 200), seed=30)
    calls = {"item": 0, "tolist": 0}
    item, tolist = torch.Tensor.item, torch.Tensor.tolist

    def counting_item(self, *args, **kwargs):
        calls["item"] += 1
        return item(self, *args, **kwargs)

    def counting_tolist(self, *args, **kwargs):
        calls["tolist"] += 1
        return tolist(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    assert torch.ones(1).item() == 1.0 and calls["item"] == 1  # the wrapper is live
    calls["item"] = 0
    res = lanczos(A, 60, num_probes=4, reorth="full", generator=gen(31))
    assert res.num_iters == 60
    assert calls == {"item": 0, "tolist": 0}


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_selective_second_pass_is_as_orthogonal_as_cgs2(dtype, monkeypatch):
    """The DGKS test skips the second Gram-Schmidt pass on most Lanczos steps and the basis is
    as orthogonal as with both passes on every step (a cluster at the top makes the run converge,
    so cancelling steps occur too)."""
    import importlib

    lz = importlib.import_module("curvscope.solvers.lanczos")
    l = torch.cat([torch.linspace(0, 1, 290, dtype=F64), 50 + 1e-6 * torch.arange(10.0)])
    A = DenseOperator(planted_matrix(l, 40).to(dtype), tags={"symmetric"})
    eps = torch.finfo(dtype).eps

    def loss_of(res):
        Q = res.basis.to(F64)
        eye = torch.eye(Q.shape[1], dtype=F64)
        return float((Q @ Q.transpose(1, 2) - eye).abs().max())

    second_passes = {"run": 0, "skipped": 0}
    cancelled = lz.cancelled

    def counting(W, before):
        out = cancelled(W, before)
        second_passes["run" if out else "skipped"] += 1
        return out

    monkeypatch.setattr(lz, "cancelled", counting)
    selective = lanczos(A, 120, num_probes=3, generator=gen(41))
    assert second_passes["skipped"] > 2 * second_passes["run"]  # most steps: one pass
    monkeypatch.setattr(lz, "cancelled", lambda W, before: True)
    both = lanczos(A, 120, num_probes=3, generator=gen(41))
    assert loss_of(both) <= 100 * eps
    assert loss_of(selective) <= max(4 * loss_of(both), 50 * eps)
    assert torch.allclose(selective.ritz()[0][:, -10:], both.ritz()[0][:, -10:], rtol=10 * eps)


def test_selective_pass_reorthogonalises_a_cancelling_vector():
    """A vector almost inside span(Q): one pass leaves rounding-size components along Q (relative
    to what is left), the DGKS test sees the cancellation and runs the second pass."""
    from curvscope.solvers.lanczos import _project_out

    n, j = 2000, 30
    Q = torch.linalg.qr(torch.randn(n, j, generator=gen(42)))[0].T.contiguous()[None]  # [1, j, n]
    inside = Q[0].T @ torch.randn(j, 1, generator=gen(43))
    W = inside + 1e-9 * torch.randn(n, 1, generator=gen(44))
    once = W - Q[0].T @ (Q[0] @ W)
    out = _project_out(W, Q, selective=True)
    rel = lambda X: float((Q[0] @ X).norm() / X.norm())  # noqa: E731
    assert rel(once) > 1e3 * torch.finfo(torch.float32).eps  # one pass is not enough here
    assert rel(out) <= 10 * torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------- warm start
def test_eigsh_warm_start_with_exact_eigenvectors():
    l = spectrum("separated", 3000)
    A = PlantedOperator(l, seed=32)
    k = 4
    order = torch.argsort(l, descending=True)[:k]
    cold = eigsh(A, k, generator=gen(33))
    warm = eigsh(A, k, v0=A.eigenvectors(order.tolist()), generator=gen(33))
    check_certified(A, warm, l[order], anorm=50.0)
    assert warm.num_iters == 0  # no restart
    assert warm.cost.num_products == 1  # certified after the warm block itself
    assert warm.cost.num_matvecs == k
    assert warm.cost.num_products <= cold.cost.num_products
    assert warm.residual_norms.max() <= 1e3 * EPS * 50.0  # exact vectors: residual at rounding


# ----------------------------------------------------------------------------- convergence reports
def _hard():
    # a tight cluster at the top of a dense bulk: one restart cannot reach tol = 1e-14
    l = torch.linspace(0.0, 1.0, 2000, dtype=F64)
    return PlantedOperator(l, seed=34)


def test_strict_raises_convergence_error_with_result():
    A = _hard()
    with pytest.raises(ConvergenceError, match="did not reach the relative residual") as info:
        eigsh(A, 3, tol=1e-14, max_iters=1, strict=True, generator=gen(35))
    result = info.value.result
    assert isinstance(result, EigenResult) and result.k == 3
    assert not result.all_converged
    assert result.num_iters == 1
    measured = measured_residuals(A, result)
    assert (result.residual_norms - measured).abs().max() <= 1e3 * EPS
    assert (measured[~result.converged] > 1e-14 * result.eigenvalues[~result.converged].abs()).all()


def test_not_strict_warns_and_returns():
    A = _hard()
    with pytest.warns(ConvergenceWarning, match="raise max_iters or tol"):
        res = eigsh(A, 3, tol=1e-14, max_iters=1, generator=gen(35))
    assert not res.all_converged
    with pytest.warns(ConvergenceWarning):
        power_iteration(A, 1, tol=1e-14, max_iters=3, generator=gen(36))
    with pytest.warns(ConvergenceWarning):
        subspace_iteration(A, 2, tol=1e-14, max_iters=2, generator=gen(37))
    with pytest.raises(ConvergenceError):
        subspace_iteration(A, 2, tol=1e-14, max_iters=2, strict=True, generator=gen(37))


# ----------------------------------------------------------------------------- error paths
NONSYM = DenseOperator(torch.arange(16, dtype=F64).reshape(4, 4))
SYM = DiagonalOperator(torch.arange(1.0, 11.0, dtype=F64))


@pytest.mark.parametrize("call", [
    lambda: lanczos(NONSYM, 2),
    lambda: eigsh(NONSYM, 1),
    lambda: power_iteration(NONSYM, 1),
    lambda: subspace_iteration(NONSYM, 1),
    lambda: sketch_eigh(NONSYM, 1),
])
def test_non_symmetric_operator_is_refused(call):
    assert not NONSYM.is_symmetric
    with pytest.raises(ValueError, match="symmetric operator"):
        call()


def test_non_operator_is_refused():
    with pytest.raises(TypeError, match="LinearOperator"):
        lanczos(torch.eye(3, dtype=F64), 2)
    with pytest.raises(TypeError, match="LinearOperator"):
        eigsh(torch.eye(3, dtype=F64), 1)


@pytest.mark.parametrize("k", [0, 11, -1, 2.0])
def test_k_out_of_range(k):
    for solver in (eigsh, power_iteration, subspace_iteration, sketch_eigh):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, n=10\]"):
            solver(SYM, k)


@pytest.mark.parametrize("which", ["la", "XX", "LR", None])
def test_which_invalid(which):
    with pytest.raises(ValueError, match="which must be one of"):
        eigsh(SYM, 2, which=which)
    with pytest.raises(ValueError, match="which must be one of"):
        sketch_eigh(SYM, 2, which=which)


def test_lanczos_argument_errors():
    with pytest.raises(ValueError, match=r"num_iters must be an int in \[1, n=10\]"):
        lanczos(SYM, 11)
    with pytest.raises(ValueError, match="num_iters"):
        lanczos(SYM, 0)
    with pytest.raises(ValueError, match="reorth must be one of"):
        lanczos(SYM, 3, reorth="selective")
    with pytest.raises(ValueError, match="basis must be one of"):
        lanczos(SYM, 3, basis="tape")
    for reorth in ("full", "partial"):
        with pytest.raises(ValueError, match="needs the Lanczos vectors"):
            lanczos(SYM, 3, reorth=reorth, basis="none")
    with pytest.raises(ValueError, match=r"v0 must have shape \[10\] or \[10, p\]"):
        lanczos(SYM, 3, v0=torch.ones(9, dtype=F64))
    with pytest.raises(ValueError, match="v0 must have shape"):
        lanczos(SYM, 3, v0=torch.ones(10, 2, 1, dtype=F64))
    with pytest.raises(ValueError, match="zero column"):
        lanczos(SYM, 3, v0=torch.zeros(10, dtype=F64))
    with pytest.raises(TypeError, match="v0 must be a torch.Tensor"):
        lanczos(SYM, 3, v0=[1.0] * 10)
    with pytest.raises(ValueError, match="num_probes must be a positive int"):
        lanczos(SYM, 3, num_probes=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        lanczos(SYM, 3, generator=0)


def test_eigsh_argument_errors():
    with pytest.raises(ValueError, match=r"v0 must be a tensor \[10\] or \[10, j\]"):
        eigsh(SYM, 2, v0=torch.ones(9, dtype=F64))
    with pytest.raises(ValueError, match="tol must be positive"):
        eigsh(SYM, 2, tol=0.0)
    with pytest.raises(ValueError, match="block_size must be an int"):
        eigsh(SYM, 2, block_size=0)
    with pytest.raises(ValueError, match="num_vectors must be at least"):
        eigsh(SYM, 2, block_size=2, num_vectors=3)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        eigsh(SYM, 2, generator=1)


def test_sketch_argument_errors():
    with pytest.raises(ValueError, match="oversample must be a non-negative int"):
        sketch_eigh(SYM, 2, oversample=-1)
    with pytest.raises(ValueError, match="num_power_iters must be a non-negative int"):
        sketch_eigh(SYM, 2, num_power_iters=-1)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        sketch_eigh(SYM, 2, block_size=0)
    with pytest.raises(ValueError, match="num_test must be a non-negative int"):
        nystrom_eigh(SYM, 2, num_test=-1)


def test_small_n_edge_cases():
    """k = n and a basis that fills the whole space: exact answers, no restart loop."""
    A = DiagonalOperator(torch.tensor([3.0, -1.0, 2.0], dtype=F64))
    res = eigsh(A, 3, which="LA", generator=gen(38))
    torch.testing.assert_close(res.eigenvalues, torch.tensor([3.0, 2.0, -1.0], dtype=F64))
    assert res.all_converged
    res = eigsh(A, 1, which="SA", generator=gen(38))
    torch.testing.assert_close(res.eigenvalues, torch.tensor([-1.0], dtype=F64))


def test_eigsh_stops_when_the_tolerance_is_below_the_products_precision():
    """Products with relative noise 1e-7 cannot certify 1e-12: stop early, say why."""
    n = 120
    A0 = planted_dense_for_noise(n)

    class Noisy(cs.linops.LinearOperator):
        def __init__(self):
            super().__init__((n, n), dtype=F64, device="cpu", tags={"symmetric"})
            self.g = torch.Generator().manual_seed(0)

        def _matmat(self, X):
            out = A0 @ X
            return out + 1e-7 * out.norm() * torch.randn(out.shape, generator=self.g, dtype=F64)

    with pytest.warns(ConvergenceWarning, match="without progress"):
        res = eigsh(Noisy(), 3, tol=1e-12, num_vectors=20, max_iters=500, generator=gen(0))
    assert res.num_iters < 100  # did not burn the 500 restarts
    assert (res.eigenvalues - torch.tensor([30.0, 20.0, 10.0], dtype=F64)).abs().max() < 1e-4


def planted_dense_for_noise(n):
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(1), dtype=F64))
    lam = torch.cat([torch.tensor([30.0, 20.0, 10.0], dtype=F64),
                     torch.rand(n - 3, generator=gen(2), dtype=F64)])
    return Q @ torch.diag(lam) @ Q.T


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("spread", [1.0, 1e6])  # cond(R) ~ 1 (the QR's pass skipped) and 1e6
def test_block_orthonormalisation_stays_orthogonal_to_the_basis(dtype, spread):
    """eigsh's _orthonormalize skips the post-QR Gram-Schmidt pass only when cond(R) is small;
    either way the new block is orthonormal and orthogonal to Q to working precision."""
    from curvscope.solvers.eigsh import _orthonormalize

    n, j, b = 3000, 40, 4
    Q = torch.linalg.qr(torch.randn(n, j, generator=gen(45), dtype=F64))[0].to(dtype)
    X = torch.randn(n, b, generator=gen(46), dtype=F64)
    X[:, 1] = X[:, 0] + X[:, 1] / spread  # nearly dependent columns: an ill-conditioned R
    X = X.to(dtype)
    for cols in (X, X[:, :1]):
        out = _orthonormalize(cols, Q, gen(47)).to(F64)
        eps = torch.finfo(dtype).eps
        assert float((Q.to(F64).T @ out).abs().max()) <= 20 * eps
        assert float((out.T @ out - torch.eye(out.shape[1], dtype=F64)).abs().max()) <= 20 * eps


def test_eigsh_says_when_a_stall_is_a_cluster_not_the_precision():
    """The smallest eigenvalues of a trained net sit in the bulk's cluster near zero: with the
    default basis eigsh stalls far above float64's precision; the warning says why, each value
    is within its residual of a true eigenvalue, and the analysis's larger basis converges."""
    from curvscope.analysis.spectrum import bottom_basis

    n = 1500
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(1), dtype=F64))
    lam = torch.cat([torch.linspace(-0.01, 0.01, 1400, dtype=F64),
                     torch.linspace(0.02, 1.5, 100, dtype=F64)])
    A = cs.linops.DenseOperator(Q @ torch.diag(lam) @ Q.T)
    opts = {"which": "SA", "tol": 1e-6, "atol": 1.5e-3, "max_iters": 40}
    with pytest.warns(ConvergenceWarning, match="clustered") as caught:
        res = eigsh(A, 5, generator=gen(2), **opts)
    assert "below the precision" not in str(caught[0].message) and not res.all_converged
    # Krylov-Weinstein: some eigenvalue within ||Ay - theta y|| of each Ritz value
    dist = (res.eigenvalues[:, None] - lam[None, :]).abs().min(dim=1).values
    assert bool((dist <= res.residual_norms + 1e-12).all())
    wide = eigsh(A, 5, num_vectors=bottom_basis(5, n), generator=gen(2), **opts)
    assert wide.all_converged and wide.cost.num_matvecs < 2 * res.cost.num_matvecs
    assert (wide.eigenvalues - lam[:5]).abs().max() < 1.5e-3
