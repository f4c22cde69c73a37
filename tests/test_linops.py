"""Tests of curvscope.linops against dense float64 algebra."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from curvscope.linops import (
    PSD,
    SYMMETRIC,
    DenseOperator,
    DiagonalOperator,
    IdentityOperator,
    LinearOperator,
    LowRankOperator,
    ProductOperator,
    RestrictedOperator,
    SumOperator,
)

F64 = torch.float64
EPS = torch.finfo(F64).eps
RTOL = 100 * EPS
N = 7


# ----------------------------------------------------------------------------- helpers
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=gen(seed))


def sym(n: int, seed: int) -> torch.Tensor:
    M = randn(n, n, seed=seed)
    return (M + M.T) / 2


def spd(n: int, seed: int) -> torch.Tensor:
    G = randn(n, n, seed=seed)
    return G @ G.T / n + 0.1 * torch.eye(n, dtype=F64)


def orthonormal(n: int, r: int, seed: int) -> torch.Tensor:
    Q, _ = torch.linalg.qr(randn(n, r, seed=seed))
    return Q


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(a.norm().item(), b.norm().item())
    return 0.0 if scale == 0 else (a - b).norm().item() / scale


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    err = rel(a, b)
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.3e}"


def assert_matches_dense(op: LinearOperator, M: torch.Tensor, seed: int = 100) -> None:
    """``op @ v``, ``op @ V``, ``matvec``, ``matmat`` and ``to_dense`` all match ``M``."""
    m, n = M.shape
    assert op.shape == (m, n)
    assert op.dtype == M.dtype
    v = randn(n, seed=seed)
    V = randn(n, 3, seed=seed + 1)
    v0, V0 = v.clone(), V.clone()
    out_v = op @ v
    out_V = op @ V
    assert out_v.shape == (m,)
    assert out_V.shape == (m, 3)
    assert_close(out_v, M @ v)
    assert_close(out_V, M @ V)
    assert_close(op.matvec(v), M @ v)
    assert_close(op.matmat(V), M @ V)
    # the inputs are never modified in place
    assert torch.equal(v, v0) and torch.equal(V, V0)
    # columns of a matrix product equal the vector products
    for j in range(3):
        assert_close(out_V[:, j], op @ V[:, j].contiguous())
    assert_close(op.to_dense(), M)


# ----------------------------------------------------------------------------- structured
def test_dense_operator_matches_dense_square_and_rectangular():
    M = randn(N, N, seed=1)
    assert_matches_dense(DenseOperator(M), M)
    R = randn(4, 6, seed=2)
    A = DenseOperator(R)
    assert A.shape == (4, 6)
    assert_matches_dense(A, R)
    assert A.tags == frozenset()


def test_dense_operator_to_dense_round_trip_is_exact():
    M = randn(N, N, seed=3)
    A = DenseOperator(M)
    assert torch.equal(A.to_dense(), M)
    assert torch.equal(DenseOperator(A.to_dense()).to_dense(), M)


def test_dense_operator_detects_symmetry():
    S = sym(N, seed=4)
    assert DenseOperator(S).is_symmetric
    assert DenseOperator(S).tags == frozenset({SYMMETRIC})  # psd is never guessed
    assert not DenseOperator(spd(N, seed=5)).is_psd
    # rounding-level asymmetry still counts as symmetric
    G = randn(N, N, seed=6)
    S2 = G @ G.T * 1e3
    S2[0, 1] = S2[0, 1] * (1 + 4 * EPS)
    assert DenseOperator(S2).is_symmetric
    # a genuinely non-symmetric matrix is not, at scales >= 1
    for scale in (1.0, 1e6):
        M = scale * randn(N, N, seed=7)
        assert not DenseOperator(M).is_symmetric
    # rectangular matrices are never symmetric
    assert not DenseOperator(randn(3, 4, seed=8)).is_symmetric


def test_dense_operator_explicit_tags_override_detection():
    A = DenseOperator(spd(N, seed=9), tags={SYMMETRIC, PSD})
    assert A.is_symmetric and A.is_psd
    B = DenseOperator(sym(N, seed=10), tags=set())
    assert B.tags == frozenset()


def test_dense_operator_symmetry_detection_is_scale_invariant():
    M = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=F64)
    assert not DenseOperator(M).is_symmetric
    assert not DenseOperator(1e-15 * M).is_symmetric  # tagged symmetric today


def test_diagonal_operator_matches_dense_and_tags():
    d = randn(N, seed=11).abs() + 0.1
    A = DiagonalOperator(d)
    assert_matches_dense(A, torch.diag(d))
    assert torch.equal(A.to_dense(), torch.diag(d))
    assert A.is_symmetric and A.is_psd
    d_neg = d.clone()
    d_neg[3] = -1e-12
    B = DiagonalOperator(d_neg)
    assert B.is_symmetric and not B.is_psd
    assert_matches_dense(B, torch.diag(d_neg))
    # zeros are allowed in a psd diagonal
    d_zero = d.clone()
    d_zero[2] = 0.0
    assert DiagonalOperator(d_zero).is_psd


def test_low_rank_operator_matches_dense_and_tags():
    V = orthonormal(N, 3, seed=12)
    lam = torch.tensor([3.0, 1.0, 0.5], dtype=F64)
    A = LowRankOperator(V, lam)
    dense = V @ torch.diag(lam) @ V.T
    assert_matches_dense(A, dense)
    assert A.is_symmetric and A.is_psd
    lam_neg = torch.tensor([3.0, -1.0, 0.5], dtype=F64)
    B = LowRankOperator(V, lam_neg)
    assert_matches_dense(B, V @ torch.diag(lam_neg) @ V.T)
    assert B.is_symmetric and not B.is_psd
    C = LowRankOperator(V, torch.tensor([0.0, 0.0, 2.0], dtype=F64))
    assert C.is_psd
    # non-orthonormal V is fine too: V diag(l) V^T
    W = randn(N, 2, seed=13)
    lw = torch.tensor([2.0, -0.5], dtype=F64)
    assert_matches_dense(LowRankOperator(W, lw), W @ torch.diag(lw) @ W.T)


def test_identity_operator():
    I = IdentityOperator(N, dtype=F64, device="cpu")
    assert I.shape == (N, N)
    assert I.is_symmetric and I.is_psd
    assert_matches_dense(I, torch.eye(N, dtype=F64))
    v = randn(N, seed=14)
    out = I @ v
    assert torch.equal(out, v)
    out.add_(1.0)  # the output does not alias the input
    assert torch.equal(v, randn(N, seed=14))


def test_identity_operator_in_a_sum_does_not_modify_the_input():
    I = IdentityOperator(N, dtype=F64, device="cpu")
    v = randn(N, seed=15)
    v0 = v.clone()
    out = (I + I + 2.0 * I) @ v
    assert torch.equal(v, v0)
    assert_close(out, 4.0 * v0)


def test_repr_mentions_class_shape_and_tags():
    r = repr(DiagonalOperator(torch.ones(3, dtype=F64)))
    assert "DiagonalOperator" in r and "(3, 3)" in r and "psd" in r and "symmetric" in r


# ----------------------------------------------------------------------------- composition
def _ops():
    Ma, Mb = spd(N, seed=20), spd(N, seed=21)
    return DenseOperator(Ma, tags={SYMMETRIC, PSD}), Ma, DenseOperator(Mb, tags={SYMMETRIC, PSD}), Mb


def test_sum_difference_and_scalars_match_dense():
    A, Ma, B, Mb = _ops()
    cases = {
        "A+B": (A + B, Ma + Mb),
        "A-B": (A - B, Ma - Mb),
        "2.5*A": (2.5 * A, 2.5 * Ma),
        "A*2.5": (A * 2.5, 2.5 * Ma),
        "A/2": (A / 2, Ma / 2),
        "-A": (-A, -Ma),
        "A*tensor": (A * torch.tensor(3.0), 3.0 * Ma),
        "(A+B)-0.5*A": ((A + B) - 0.5 * A, 0.5 * Ma + Mb),
        "-(A-B)": (-(A - B), Mb - Ma),
    }
    for name, (op, M) in cases.items():
        assert isinstance(op, SumOperator), name
        assert_matches_dense(op, M)


def test_nested_sums_are_flattened():
    A, _, B, _ = _ops()
    C = DiagonalOperator(torch.ones(N, dtype=F64))
    op = (A + B) - 2.0 * C
    assert len(op.operators) == 3
    assert op.coefficients == [1.0, 1.0, -2.0]


@pytest.mark.parametrize("s", [0.0, 0.7, -1.3])
def test_shift_matches_dense(s):
    A, Ma, _, _ = _ops()
    assert_matches_dense(A.shift(s), Ma - s * torch.eye(N, dtype=F64))


def test_composition_tags():
    A, _, B, _ = _ops()
    S = DenseOperator(sym(N, seed=22))  # symmetric, not psd
    G = DenseOperator(randn(N, N, seed=23))  # no tags
    both = frozenset({SYMMETRIC, PSD})
    assert (A + B).tags == both
    assert (2.5 * A).tags == both
    assert (A * 2.5).tags == both
    assert (A / 2).tags == both
    assert (0.0 * A).tags == both
    assert (A - B).tags == frozenset({SYMMETRIC})
    assert (-A).tags == frozenset({SYMMETRIC})
    assert (A + S).tags == frozenset({SYMMETRIC})
    assert (A + G).tags == frozenset()
    neg = -A
    neg_neg = -neg  # coefficients multiply: (-1) * (-1) >= 0
    assert neg_neg.tags == both
    assert A.shift(0.5).tags == frozenset({SYMMETRIC})
    assert A.shift(-0.5).tags == both
    assert A.deflate(orthonormal(N, 2, seed=24), torch.ones(2, dtype=F64)).tags == frozenset({SYMMETRIC})
    assert (A @ B).tags == frozenset()  # products are never tagged implicitly


def test_deflate_matches_dense():
    A, Ma, _, _ = _ops()
    V = orthonormal(N, 2, seed=25)
    lam = torch.tensor([1.5, -0.25], dtype=F64)
    assert_matches_dense(A.deflate(V, lam), Ma - V @ torch.diag(lam) @ V.T)


def test_deflating_top_eigenpairs_removes_exactly_those_eigenvalues():
    n = 12
    Q = orthonormal(n, n, seed=26)
    lam = torch.tensor([50.0, 20.0, 9.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.0, 0.5, 0.25, -1.0], dtype=F64)
    A = DenseOperator(Q @ torch.diag(lam) @ Q.T)
    r = 3
    D = A.deflate(Q[:, :r], lam[:r])
    got = torch.linalg.eigvalsh(D.to_dense())
    expected = torch.sort(torch.cat([lam[r:], torch.zeros(r, dtype=F64)])).values
    err = (got - expected).abs().max().item()
    assert err <= 100 * n * EPS * lam.abs().max().item(), err
    # the deflated directions are now in the null space
    assert (D @ Q[:, :r]).norm().item() <= 100 * n * EPS * lam.abs().max().item()
    # the remaining eigenpairs are untouched
    assert_close(D @ Q[:, r:], Q[:, r:] * lam[r:], rtol=1000 * EPS)


INDEX_CASES = {
    "list": ([5, 0, 3], [5, 0, 3]),
    "slice": (slice(1, 6, 2), [1, 3, 5]),
    "slice-open": (slice(None, 3), [0, 1, 2]),
    "bool-mask": (torch.tensor([True, False, True, False, False, True, True]), [0, 2, 5, 6]),
    "bool-list": ([False, True, True, False, False, False, True], [1, 2, 6]),
    "int64-tensor": (torch.tensor([6, 2, 4, 1]), [6, 2, 4, 1]),
    "int32-tensor": (torch.tensor([4, 0], dtype=torch.int32), [4, 0]),
    "all": (list(range(N)), list(range(N))),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_restrict_matches_principal_submatrix(case):
    index, expected_idx = INDEX_CASES[case]
    M = randn(N, N, seed=30)  # non-symmetric: catches P A P^T vs P^T A P mix-ups
    R = DenseOperator(M).restrict(index)
    assert isinstance(R, RestrictedOperator)
    idx = torch.tensor(expected_idx)
    assert torch.equal(R.index.cpu().long(), idx)
    assert_matches_dense(R, M[idx][:, idx])


def test_restrict_keeps_tags():
    A, Ma, _, _ = _ops()
    assert A.restrict([0, 2]).tags == frozenset({SYMMETRIC, PSD})
    S = DenseOperator(sym(N, seed=31))
    assert S.restrict(slice(0, 3)).tags == frozenset({SYMMETRIC})
    G = DenseOperator(randn(N, N, seed=32))
    assert G.restrict([1]).tags == frozenset()
    # restriction of a composite operator
    op = (A - 0.5 * A.shift(1.0)).restrict([6, 1, 3])
    idx = torch.tensor([6, 1, 3])
    dense = Ma - 0.5 * (Ma - torch.eye(N, dtype=F64))
    assert_matches_dense(op, dense[idx][:, idx])
    assert op.tags == frozenset({SYMMETRIC})
    # restriction of a restriction
    RR = A.restrict([1, 3, 5, 6]).restrict([3, 0])
    assert_matches_dense(RR, Ma[[6, 1]][:, [6, 1]])
    assert RR.tags == frozenset({SYMMETRIC, PSD})


def test_product_operator_matches_dense():
    Ma, Mb = randn(4, 6, seed=33), randn(6, 3, seed=34)
    P = DenseOperator(Ma) @ DenseOperator(Mb)
    assert isinstance(P, ProductOperator)
    assert P.shape == (4, 3)
    assert_matches_dense(P, Ma @ Mb)
    A, MA, B, MB = _ops()
    assert_matches_dense(A @ B, MA @ MB)
    D = DiagonalOperator(randn(N, seed=35))
    assert_matches_dense(A @ D @ B, MA @ torch.diag(D.d) @ MB)


def test_mixed_structured_operators_combine():
    A, Ma, _, _ = _ops()
    d = randn(N, seed=36)
    V = orthonormal(N, 2, seed=37)
    lam = torch.tensor([2.0, 0.5], dtype=F64)
    op = (
        0.3 * A + DiagonalOperator(d) - LowRankOperator(V, lam) + IdentityOperator(N, dtype=F64, device="cpu")
    )
    dense = 0.3 * Ma + torch.diag(d) - V @ torch.diag(lam) @ V.T + torch.eye(N, dtype=F64)
    assert_matches_dense(op, dense)


def test_float32_operator_matches_float32_dense():
    M = spd(N, seed=38).float()
    A = DenseOperator(M)
    v = torch.randn(N, generator=gen(39))
    out = A.shift(0.5) @ v
    assert out.dtype == torch.float32
    ref = (M.double() - 0.5 * torch.eye(N, dtype=F64)) @ v.double()
    assert rel(out.double(), ref) <= 100 * torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------- scipy
def test_to_scipy_matvec_and_matmat():
    sla = pytest.importorskip("scipy.sparse.linalg")
    M = sym(N, seed=40)
    S = DenseOperator(M).to_scipy()
    assert isinstance(S, sla.LinearOperator)
    assert S.shape == (N, N)
    assert S.dtype == np.float64
    Mn = M.numpy()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(N)
    X = rng.standard_normal((N, 4))
    for got, ref in [
        (S.matvec(x), Mn @ x),
        (S @ x, Mn @ x),
        (S.matmat(X), Mn @ X),
        (S @ X, Mn @ X),
        (S.rmatvec(x), Mn.T @ x),
        (S.matvec(x.reshape(N, 1)), Mn @ x.reshape(N, 1)),
        (S.matvec(x.astype(np.float32)), Mn @ x.astype(np.float32).astype(np.float64)),
        (S @ np.asfortranarray(X), Mn @ X),
    ]:
        assert isinstance(got, np.ndarray)
        assert got.shape == ref.shape
        assert got.dtype == np.float64
        assert np.linalg.norm(got - ref) <= RTOL * np.linalg.norm(ref)


def test_to_scipy_nonsymmetric_has_no_adjoint():
    pytest.importorskip("scipy.sparse.linalg")
    S = DenseOperator(randn(4, 6, seed=41)).to_scipy()
    assert S.shape == (4, 6)
    x = np.ones(6)
    assert S.matvec(x).shape == (4,)
    with pytest.raises(NotImplementedError, match="adjoint"):
        S.rmatvec(np.ones(4))


def test_to_scipy_float32_dtype():
    pytest.importorskip("scipy.sparse.linalg")
    S = DiagonalOperator(torch.arange(1.0, 4.0)).to_scipy()
    assert S.dtype == np.float32
    out = S.matvec(np.ones(3))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([1.0, 2.0, 3.0], dtype=np.float32))


def test_to_scipy_accepts_negative_stride_arrays():
    pytest.importorskip("scipy.sparse.linalg")
    M = sym(N, seed=42)
    S = DenseOperator(M).to_scipy()
    x = np.arange(float(N))
    X = np.arange(3.0 * N).reshape(N, 3)
    np.testing.assert_allclose(S.matvec(x[::-1]), M.numpy() @ x[::-1], rtol=RTOL)
    np.testing.assert_allclose(S.matmat(X[:, ::-1]), M.numpy() @ X[:, ::-1], rtol=RTOL)


def test_to_scipy_eigsh_recovers_planted_top_eigenvalues():
    sla = pytest.importorskip("scipy.sparse.linalg")
    n, k = 50, 5
    Q = orthonormal(n, n, seed=43)
    lam = torch.linspace(-3.0, 1.0, n, dtype=F64)
    lam[-k:] = torch.tensor([4.0, 5.5, 7.0, 9.0, 12.0], dtype=F64)
    A = DenseOperator(Q @ torch.diag(lam) @ Q.T)
    assert A.is_symmetric
    vals = sla.eigsh(A.to_scipy(), k=k, which="LA", return_eigenvectors=False)
    got = np.sort(vals)
    expected = np.sort(lam.numpy())[-k:]
    assert np.max(np.abs(got - expected) / np.abs(expected)) <= 1e-10


# ----------------------------------------------------------------------------- errors
def test_matmul_rejects_non_tensor_input():
    A = DenseOperator(sym(N, seed=50))
    with pytest.raises(TypeError, match=r"DenseOperator multiplies torch\.Tensor inputs, got list"):
        A @ ([1.0] * N)
    with pytest.raises(TypeError, match="got ndarray"):
        A @ np.ones(N)
    with pytest.raises(TypeError, match="got float"):
        A.matvec(1.0)


@pytest.mark.parametrize(
    "shape",
    [(N + 1,), (N, 3, 1), (N - 1, 2), (), (1, N)],
    ids=["n+1", "n,k,1", "n-1,k", "scalar", "row"],
)
def test_matmul_rejects_wrong_shapes(shape):
    A = DiagonalOperator(torch.ones(N, dtype=F64))
    msg = re.escape(f"expects a vector [{N}] or a matrix [{N}, k], got shape {shape}")
    with pytest.raises(ValueError, match=msg):
        A @ torch.zeros(shape, dtype=F64)


def test_matvec_and_matmat_reject_the_other_rank():
    A = DenseOperator(sym(N, seed=51))
    with pytest.raises(ValueError, match=re.escape(f"matvec expects a vector [{N}], got ({N}, 2)")):
        A.matvec(torch.zeros(N, 2, dtype=F64))
    with pytest.raises(ValueError, match=re.escape(f"matmat expects a matrix [{N}, k], got ({N},)")):
        A.matmat(torch.zeros(N, dtype=F64))


def test_matmul_rejects_wrong_dtype():
    A = DenseOperator(sym(N, seed=52))
    with pytest.raises(ValueError, match=r"has dtype torch\.float64, got an input of dtype torch\.float32"):
        A @ torch.zeros(N)
    with pytest.raises(ValueError, match="dtype torch.int64"):
        A @ torch.zeros(N, dtype=torch.int64)
    B = DiagonalOperator(torch.ones(N))
    with pytest.raises(ValueError, match=r"has dtype torch\.float32, got an input of dtype torch\.float64"):
        B @ torch.zeros(N, 2, dtype=F64)


def test_adding_operators_of_different_shapes_fails():
    A = DiagonalOperator(torch.ones(N, dtype=F64))
    B = DiagonalOperator(torch.ones(N + 1, dtype=F64))
    msg = re.escape(f"cannot add operators of shapes [({N}, {N}), ({N + 1}, {N + 1})]")
    with pytest.raises(ValueError, match=msg):
        A + B
    with pytest.raises(ValueError, match="cannot add operators of shapes"):
        A - B
    with pytest.raises(ValueError, match="cannot add operators of shapes"):
        DenseOperator(randn(3, 4, seed=53)).shift(1.0)


def test_combining_operators_of_different_dtypes_fails():
    A = DiagonalOperator(torch.ones(N, dtype=F64))
    B = DiagonalOperator(torch.ones(N, dtype=torch.float32))
    with pytest.raises(ValueError, match="same device and dtype"):
        A + B
    with pytest.raises(ValueError, match="same device and dtype"):
        A @ B
    with pytest.raises(ValueError, match="same device and dtype"):
        A.deflate(torch.eye(N, 1), torch.ones(1))


def test_adding_a_non_operator_fails():
    A = DiagonalOperator(torch.ones(N, dtype=F64))
    with pytest.raises(TypeError):
        A + torch.eye(N, dtype=F64)
    with pytest.raises(TypeError):
        A * "2"
    with pytest.raises(TypeError):
        A * torch.ones(2)


def test_product_of_incompatible_shapes_fails():
    A = DenseOperator(randn(4, 6, seed=54))
    with pytest.raises(ValueError, match=re.escape("cannot multiply operators of shapes (4, 6) and (4, 6)")):
        A @ A


def test_to_dense_refuses_above_max_entries():
    A = DiagonalOperator(torch.ones(N, dtype=F64))
    with pytest.raises(ValueError, match=f"{N} x {N} matrix \\({N * N:,} entries\\).*max_entries=48"):
        A.to_dense(max_entries=N * N - 1)
    assert A.to_dense(max_entries=N * N).shape == (N, N)  # exactly at the limit is fine
    big = IdentityOperator(10_000, dtype=F64, device="cpu")
    with pytest.raises(ValueError, match="above the limit"):
        big.to_dense()  # 1e8 entries > the 5e7 default: refused before allocating


@pytest.mark.parametrize(
    ("index", "match"),
    [
        ([0, N], "out of range"),
        ([-1, 2], "out of range"),
        (torch.tensor([N + 3]), "out of range"),
        ([1, 2, 1], "duplicates"),
        (torch.tensor([3, 3]), "duplicates"),
        ([0.0, 1.0], "integer"),
        (torch.tensor([0.0, 2.0]), "integer"),
        (torch.tensor([[0, 1]]), "integer"),
        (torch.tensor(2), "integer"),
        (torch.tensor([True, False]), re.escape(f"boolean mask must have shape [{N}], got (2,)")),
    ],
    ids=[
        "too-large",
        "negative",
        "tensor-too-large",
        "dup-list",
        "dup-tensor",
        "float-list",
        "float-tensor",
        "2d",
        "0d",
        "short-mask",
    ],
)
def test_restrict_rejects_bad_indices(index, match):
    A = DenseOperator(sym(N, seed=55))
    with pytest.raises(ValueError, match=match):
        A.restrict(index)


def test_restrict_rejects_non_square_operator():
    with pytest.raises(ValueError, match=re.escape("restriction needs a square operator, got shape (3, 4)")):
        DenseOperator(randn(3, 4, seed=56)).restrict([0])


@pytest.mark.parametrize(
    ("V", "lam"),
    [
        (torch.zeros(N, 2, dtype=F64), torch.zeros(3, dtype=F64)),
        (torch.zeros(N, dtype=F64), torch.zeros(1, dtype=F64)),
        (torch.zeros(N, 2, dtype=F64), torch.zeros(2, 1, dtype=F64)),
        (torch.zeros(N, 2, 1, dtype=F64), torch.zeros(2, dtype=F64)),
    ],
    ids=["r-mismatch", "V-1d", "lam-2d", "V-3d"],
)
def test_low_rank_rejects_mismatched_shapes(V, lam):
    with pytest.raises(ValueError, match=r"expected V \[n, r\] and eigenvalues \[r\], got"):
        LowRankOperator(V, lam)


def test_low_rank_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="must share dtype and device"):
        LowRankOperator(torch.zeros(N, 2, dtype=F64), torch.zeros(2, dtype=torch.float32))


def test_dense_operator_rejects_non_matrices():
    with pytest.raises(ValueError, match=re.escape("M must be a matrix [m, n], got shape (2, 3, 4)")):
        DenseOperator(torch.zeros(2, 3, 4, dtype=F64))
    with pytest.raises(ValueError, match=re.escape("got shape (3,)")):
        DenseOperator(torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match=re.escape("d must be a vector [n], got shape (3, 3)")):
        DiagonalOperator(torch.zeros(3, 3, dtype=F64))


@pytest.mark.parametrize(
    "build",
    [
        lambda: DenseOperator(torch.eye(3, dtype=torch.int64)),
        lambda: DiagonalOperator(torch.ones(3, dtype=torch.int32)),
        lambda: DiagonalOperator(torch.ones(3, dtype=torch.bool)),
        lambda: LowRankOperator(torch.ones(3, 1, dtype=torch.int64), torch.ones(1, dtype=F64)),
        lambda: LowRankOperator(torch.ones(3, 1, dtype=F64), torch.ones(1, dtype=torch.int64)),
    ],
    ids=["dense-int", "diag-int", "diag-bool", "lowrank-V-int", "lowrank-l-int"],
)
def test_structured_constructors_reject_integer_tensors(build):
    with pytest.raises(TypeError, match="must be floating point, got dtype torch"):
        build()


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: DenseOperator([[1.0, 0.0], [0.0, 1.0]]), "M"),
        (lambda: DiagonalOperator(np.ones(3)), "d"),
        (lambda: LowRankOperator(np.ones((3, 1)), torch.ones(1, dtype=F64)), "V"),
        (lambda: LowRankOperator(torch.ones(3, 1, dtype=F64), [1.0]), "eigenvalues"),
    ],
    ids=["dense-list", "diag-numpy", "lowrank-V-numpy", "lowrank-l-list"],
)
def test_structured_constructors_reject_non_tensors(build, name):
    with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor"):
        build()


def test_sum_operator_constructor_errors():
    A = DiagonalOperator(torch.ones(N, dtype=F64))
    with pytest.raises(ValueError, match="at least one operator"):
        SumOperator([])
    with pytest.raises(ValueError, match="got 2 operators but 1 coefficients"):
        SumOperator([A, A], coefficients=[1.0])


def test_base_operator_rejects_negative_shape_and_has_no_matmat():
    with pytest.raises(ValueError, match="shape must be non-negative"):
        LinearOperator((-1, 2), dtype=F64, device="cpu")
    op = LinearOperator((2, 2), dtype=F64, device="cpu")
    with pytest.raises(NotImplementedError):
        op @ torch.zeros(2, dtype=F64)


def test_children_lead_the_cost_accounting_to_every_problem_underneath():
    """``LinearOperator.children()`` is how Counted finds the Problems a composed operator reads:
    a sum over two Problems counts a pass of each, H - G (one combined pass), a deflated, a
    restricted and a scaled Hessian one; an operator that wraps another without declaring it a
    child is a leaf, and its products are not counted as data passes."""
    import curvscope as cs
    from curvscope._diagnostics import Counted, problems_under
    from curvscope.testing import tiny_mlp

    tp = tiny_mlp()
    problem = cs.Problem(tp.model, tp.loss_fn, tp.batches)
    other = cs.Problem(tp.model, tp.loss_fn, tp.batches[:1])
    H, G, H2 = cs.HessianOperator(problem), cs.GGNOperator(problem), cs.HessianOperator(other)
    V = torch.linalg.qr(torch.randn(problem.num_params, 2, dtype=torch.float64))[0]
    cases = [(H + H2, [problem, other]), (H - G, [problem]),
             (H.deflate(V, torch.ones(2, dtype=torch.float64)), [problem]),
             (H.restrict(slice(0, 5)), [problem]), (2.0 * H, [problem])]

    class Hidden(LinearOperator):
        def __init__(self, A):
            super().__init__(A.shape, dtype=A.dtype, device=A.device, tags=A.tags)
            self.inner = A

        def _matmat(self, X):
            return self.inner @ X

    class Declared(Hidden):
        def children(self):
            return (self.inner,)

    cases += [(Hidden(H), []), (Declared(H), [problem])]
    for op, problems in cases:
        assert {id(p) for p in problems_under(op)} == {id(p) for p in problems}, op
        counted = Counted(op)
        counted @ torch.randn(op.shape[1], 3, dtype=torch.float64)
        assert counted.cost().num_data_passes == len(problems), op
