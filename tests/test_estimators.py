"""Trace and diagonal estimators: exactness, calibrated error bars, costs, determinism, errors."""

import json
import math

import pytest
import torch

import curvscope as cs
from conftest import rel_err
from curvscope.estimators.diagonal import DiagonalEstimate, hutchinson_diagonal, xdiag
from curvscope.estimators.trace import (
    TraceEstimate,
    hutchinson_block_traces,
    hutchinson_frobenius,
    hutchinson_trace,
    hutchpp_trace,
    xtrace,
)
from curvscope.linops import DenseOperator, DiagonalOperator, LinearOperator, LowRankOperator
from curvscope.linops._probes import random_probes
from curvscope.testing import dense_hessian, tiny_mlp

F64 = torch.float64
EXACT = 1e-10  # relative error of estimators that are exact in exact arithmetic
NUM_SEEDS = 40


def gen(seed):
    return torch.Generator().manual_seed(seed)


def planted(eigenvalues, seed=0):
    """``Q diag(l) Q^T`` with a seeded random orthogonal ``Q`` ([n, n] dense, symmetric)."""
    n = eigenvalues.numel()
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=F64))[0]
    M = (Q * eigenvalues) @ Q.T
    return (M + M.T) / 2


def low_rank(n, eigenvalues, seed=0):
    V = torch.linalg.qr(torch.randn(n, len(eigenvalues), generator=gen(seed), dtype=F64))[0]
    lam = torch.tensor(eigenvalues, dtype=F64)
    return LowRankOperator(V, lam), (V * lam) @ V.T


PSD_RANK5 = [5.0, 4.0, 3.0, 2.0, 0.5]
INDEF_RANK5 = [5.0, -4.0, 3.0, -2.0, 1e-3]


def signed_decay(n=200):
    j = torch.arange(1, n + 1, dtype=F64)
    return 10 * j**-1.5 * torch.where(j % 2 == 0, -1.0, 1.0)


# ----------------------------------------------------------------------------- exactness
def test_hutchinson_trace_and_diagonal_exact_on_diagonal_matrix():
    d = torch.randn(30, generator=gen(1), dtype=F64)
    A = DiagonalOperator(d)
    est = hutchinson_trace(A, 5, generator=gen(2))
    assert abs(est.value - float(d.sum())) <= EXACT * float(d.abs().sum())
    assert est.std_error <= EXACT * float(d.abs().sum())
    diag = hutchinson_diagonal(A, 5, generator=gen(2))
    assert rel_err(diag.diagonal, d) < EXACT
    assert float(diag.std_error.max()) <= EXACT * float(d.abs().max())


def test_block_traces_exact_on_diagonal_matrix():
    d = torch.randn(20, generator=gen(3), dtype=F64)
    blocks = {"a": slice(0, 7), "b": slice(7, 8), "c": slice(8, 20), "empty": slice(5, 5)}
    est = hutchinson_block_traces(DiagonalOperator(d), blocks, 4, generator=gen(4))
    assert list(est) == list(blocks)
    for name, s in blocks.items():
        assert abs(est[name].value - float(d[s].sum())) <= EXACT * float(d.abs().sum())
        assert est[name].std_error <= EXACT * float(d.abs().sum())


@pytest.mark.parametrize("eigenvalues", [PSD_RANK5, INDEF_RANK5], ids=["psd", "indefinite"])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian", "sphere"])
@pytest.mark.parametrize(
    "fn, num_matvecs",
    [(hutchpp_trace, 15), (hutchpp_trace, 30), (xtrace, 12), (xtrace, 31)],
    ids=["hutchpp-s=rank", "hutchpp", "xtrace-k=rank+1", "xtrace-odd"],
)
def test_low_rank_trace_is_exact(fn, num_matvecs, distribution, eigenvalues):
    A, M = low_rank(60, eigenvalues)
    tr = float(M.trace())
    est = fn(A, num_matvecs, distribution=distribution, generator=gen(5))
    scale = sum(abs(x) for x in eigenvalues)
    assert abs(est.value - tr) <= EXACT * scale
    assert est.std_error <= EXACT * scale


@pytest.mark.parametrize("eigenvalues", [PSD_RANK5, INDEF_RANK5], ids=["psd", "indefinite"])
def test_xdiag_exact_at_low_rank(eigenvalues):
    A, M = low_rank(60, eigenvalues)
    est = xdiag(A, 12, generator=gen(6))  # k = 6 > rank 5
    assert rel_err(est.diagonal, M.diag()) < EXACT
    assert float(est.std_error.max()) <= EXACT * float(M.diag().abs().max())


def test_full_budget_is_exact_on_full_rank_matrix():
    """Hutch++ with s >= n sketches everything; improved XTrace with k = n rescales the single
    remaining direction exactly (a wrong rescaling factor fails here)."""
    M = planted(torch.linspace(-3, 5, 8, dtype=F64), seed=7)
    A, tr = DenseOperator(M), float(M.trace())
    assert abs(hutchpp_trace(A, 30, generator=gen(0)).value - tr) <= EXACT * 5
    assert abs(xtrace(A, 16, generator=gen(0)).value - tr) <= EXACT * 5


def _leave_one_out_bases(M, Omega):
    """Brute force: the projector onto orth(A Omega_{-i}) for every i, by separate QRs."""
    Y = M @ Omega
    for i in range(Omega.shape[1]):
        Qi = torch.linalg.qr(torch.cat([Y[:, :i], Y[:, i + 1 :]], dim=1))[0]
        yield Qi @ Qi.T


@pytest.mark.parametrize("distribution", ["sphere", "rademacher"])
def test_xtrace_matches_its_definition(distribution):
    """t_i = tr(P_i A) + c_i u_i^T A u_i with P_i from an explicit QR of A Omega_{-i}."""
    n, k = 12, 4
    M = planted(torch.randn(n, generator=gen(8), dtype=F64), seed=8)
    est = xtrace(DenseOperator(M), 2 * k, distribution=distribution, generator=gen(9))
    Omega = random_probes(n, k, distribution=distribution, generator=gen(9))
    expected = []
    for i, P in enumerate(_leave_one_out_bases(M, Omega)):
        u = Omega[:, i] - P @ Omega[:, i]
        c = (n - k + 1) / float(u @ u) if distribution == "sphere" else 1.0
        expected.append(float((P @ M).trace()) + c * float(u @ M @ u))
    assert rel_err(est.samples, torch.tensor(expected, dtype=F64)) < 1e-10
    assert est.value == pytest.approx(sum(expected) / k, rel=1e-10)


def test_xdiag_matches_its_definition():
    """d_i = diag(P_i A) + w_i * (I - P_i) A w_i with P_i from an explicit QR of A Omega_{-i}."""
    n, k = 12, 4
    M = planted(torch.randn(n, generator=gen(10), dtype=F64), seed=10)
    est = xdiag(DenseOperator(M), 2 * k, generator=gen(11))
    Omega = random_probes(n, k, distribution="rademacher", generator=gen(11))
    D = torch.stack([(P @ M).diag() + Omega[:, i] * (M @ Omega[:, i] - P @ M @ Omega[:, i])
                     for i, P in enumerate(_leave_one_out_bases(M, Omega))], dim=1)
    assert rel_err(est.diagonal, D.mean(1)) < 1e-10
    assert rel_err(est.std_error, D.std(1) / math.sqrt(k)) < 1e-10


def test_hutchpp_matches_its_definition():
    """Sketch S then probes G from the same generator; tr(Q^T A Q) + Hutchinson on the rest."""
    n, m = 40, 12  # s = 4, q = 4, r = 4
    M = planted(torch.randn(n, generator=gen(12), dtype=F64), seed=12)
    est = hutchpp_trace(DenseOperator(M), m, generator=gen(13))
    g = gen(13)
    S = random_probes(n, 4, generator=g)
    G = random_probes(n, 4, generator=g)
    Q = torch.linalg.qr(M @ S)[0]
    P = torch.eye(n, dtype=F64) - Q @ Q.T
    expected = float((Q.T @ M @ Q).trace()) + ((P @ G) * (M @ P @ G)).sum(0)
    assert rel_err(est.samples, expected) < 1e-10
    assert est.num_probes == 4


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("fn", [hutchinson_trace, hutchpp_trace, xtrace, hutchinson_frobenius])
def test_error_bars_cover_the_truth(fn):
    """On a planted indefinite decaying spectrum, truth within 2 std errors in >= 85% of seeds,
    and the mean over seeds is unbiased within 3 standard errors of the mean.

    (XTrace's leave-one-out error is optimistic on some spectra: 600 seeds on PSD power laws gave
    81-87% coverage at 2 sigma; here it covers ~93%.)
    """
    lam = signed_decay()
    A = DenseOperator(planted(lam))
    truth = float((lam**2).sum()) if fn is hutchinson_frobenius else float(lam.sum())
    ests = [fn(A, 60, generator=gen(s)) for s in range(NUM_SEEDS)]
    covered = sum(abs(e.value - truth) <= 2 * e.std_error for e in ests)
    assert covered >= 0.85 * NUM_SEEDS
    values = torch.tensor([e.value for e in ests], dtype=F64)
    assert abs(float(values.mean()) - truth) <= 3 * float(values.std()) / math.sqrt(NUM_SEEDS)


def test_hutchpp_and_xtrace_beat_hutchinson_on_fast_decay():
    j = torch.arange(1, 201, dtype=F64)
    lam = j**-2.0
    A, tr = DenseOperator(planted(lam, seed=1)), float(lam.sum())

    def mean_abs_error(fn):
        return sum(abs(fn(A, 60, generator=gen(s)).value - tr) for s in range(NUM_SEEDS)) / NUM_SEEDS

    hutch = mean_abs_error(hutchinson_trace)
    assert mean_abs_error(hutchpp_trace) < 0.1 * hutch
    assert mean_abs_error(xtrace) < 0.1 * hutch


@pytest.mark.parametrize("fn", [hutchinson_diagonal, xdiag])
def test_diagonal_error_bars_cover_the_truth(fn):
    M = planted(signed_decay())
    A, d = DenseOperator(M), M.diag()
    covered = torch.stack([((e.diagonal - d).abs() <= 2 * e.std_error).double().mean()
                           for e in (fn(A, 60, generator=gen(s)) for s in range(20))])
    assert float(covered.mean()) >= 0.85


def test_xdiag_beats_hutchinson_diagonal_on_fast_decay():
    j = torch.arange(1, 201, dtype=F64)
    M = planted(j**-2.0, seed=2)
    A, d = DenseOperator(M), M.diag()
    hutch = sum(rel_err(hutchinson_diagonal(A, 60, generator=gen(s)).diagonal, d) for s in range(10))
    x = sum(rel_err(xdiag(A, 60, generator=gen(s)).diagonal, d) for s in range(10))
    assert x < 0.1 * hutch


# ----------------------------------------------------------------------------- real network
@pytest.fixture(scope="module")
def mlp_hessian():
    tp = tiny_mlp()
    H = cs.HessianOperator(cs.Problem(tp.model, tp.loss_fn, tp.batches))
    return H, dense_hessian(tp.model, tp.loss_fn, tp.batches)


def test_hutchinson_on_network_hessian_within_error_bar(mlp_hessian):
    """The reported 99% interval (Student t over the probes) covers the dense trace in at least
    95% of seeds (200 seeds gave 100% at 3 standard errors, 94% at 2)."""
    H, Hd = mlp_hessian
    tr = float(Hd.trace())
    ests = [hutchinson_trace(H, 20, generator=gen(s)) for s in range(NUM_SEEDS)]
    covered = sum(e.interval(0.99)[0] <= tr <= e.interval(0.99)[1] for e in ests)
    assert covered >= 0.95 * NUM_SEEDS
    lo, hi = ests[0].interval(0.95)
    assert hi - lo < ests[0].interval(0.99)[1] - ests[0].interval(0.99)[0]
    assert all(e.cost.num_data_passes == 1 for e in ests)


def test_block_traces_on_network_hessian(mlp_hessian):
    H, Hd = mlp_hessian
    blocks = H.param_space.blocks()
    within, total = 0, 0
    for s in range(20):
        per_block = hutchinson_block_traces(H, blocks, 20, generator=gen(s))
        full = hutchinson_trace(H, 20, generator=gen(s))
        assert sum(e.value for e in per_block.values()) == pytest.approx(full.value, rel=1e-12)
        for name, sl in blocks.items():
            err = abs(per_block[name].value - float(Hd[sl, sl].trace()))
            within += err <= 3 * per_block[name].std_error
            total += 1
    assert within >= 0.95 * total


def test_diagonal_on_network_hessian(mlp_hessian):
    H, Hd = mlp_hessian
    est = hutchinson_diagonal(H, 30, generator=gen(0))
    z = (est.diagonal - Hd.diag()) / est.std_error.clamp_min(1e-300)
    assert float((z.abs() <= 3).double().mean()) >= 0.9
    sums = est.block_sums(H.param_space.blocks())
    assert sum(sums.values()) == pytest.approx(est.trace, rel=1e-12)


@pytest.mark.parametrize("fn, calls", [(hutchinson_trace, 1), (hutchinson_frobenius, 1),
                                       (hutchinson_diagonal, 1), (hutchpp_trace, 2),
                                       (xtrace, 2), (xdiag, 2)])
def test_data_passes_on_network_hessian(mlp_hessian, fn, calls):
    H, _ = mlp_hessian
    cost = fn(H, 12, generator=gen(0)).cost
    assert (cost.num_matvecs, cost.num_products, cost.num_data_passes) == (12, calls, calls)


# ----------------------------------------------------------------------------- costs
def _block_traces(A, m, **kw):
    return hutchinson_block_traces(A, {"a": slice(0, 10), "b": slice(10, 30)}, m, **kw)["b"]


COST_CASES = [
    # fn, num_matvecs, block_size, expected (num_matvecs, num_products)
    (hutchinson_trace, 10, None, (10, 1)),
    (hutchinson_trace, 10, 3, (10, 4)),
    (hutchinson_frobenius, 10, None, (10, 1)),
    (_block_traces, 10, 4, (10, 3)),
    (hutchinson_diagonal, 10, None, (10, 1)),
    (hutchpp_trace, 3, None, (3, 2)),     # s = q = r = 1
    (hutchpp_trace, 4, None, (4, 2)),     # s = q = 1, r = 2 (one probe kept for Hutchinson)
    (hutchpp_trace, 10, None, (10, 2)),   # S then [Q, (I - QQ^T) G]
    (hutchpp_trace, 10, 3, (10, 4)),      # ceil(4/3) + ceil(6/3)
    (xtrace, 10, None, (10, 2)),          # Omega then Q
    (xtrace, 11, None, (10, 2)),          # odd budget: products come in pairs
    (xtrace, 10, 2, (10, 6)),
    (xdiag, 10, None, (10, 2)),
]


@pytest.mark.parametrize("fn, m, block_size, expected", COST_CASES)
def test_costs_are_counted_exactly(fn, m, block_size, expected):
    A = DenseOperator(planted(torch.randn(30, generator=gen(14), dtype=F64)))
    cost = fn(A, m, block_size=block_size, generator=gen(0)).cost
    assert (cost.num_matvecs, cost.num_products) == expected
    assert cost.num_data_passes == 0  # a dense operator reads no data
    assert cost.wall_time >= 0


def test_hutchpp_spends_the_budget_when_sketch_exceeds_n():
    A = DenseOperator(planted(torch.randn(5, generator=gen(15), dtype=F64)))
    est = hutchpp_trace(A, 30, generator=gen(0))  # s = 10 > n: q = 5, r = 15
    assert est.cost.num_matvecs == 30
    assert est.num_probes == 15


def test_hutchpp_keeps_a_hutchinson_probe_at_m4():
    """ceil(4/3) = 2 sketch vectors would leave no probe (a biased tr(Q^T A Q)); s = 1."""
    A = DenseOperator(planted(torch.randn(30, generator=gen(20), dtype=F64)))
    est = hutchpp_trace(A, 4, generator=gen(0))
    assert est.num_probes == 2 and math.isfinite(est.value) and math.isfinite(est.std_error)


def test_block_traces_share_one_cost():
    A = DenseOperator(planted(torch.randn(30, generator=gen(16), dtype=F64)))
    est = hutchinson_block_traces(A, {"a": slice(0, 10), "b": slice(10, 30)}, 7)
    assert est["a"].cost is est["b"].cost
    assert est["a"].cost.num_matvecs == 7


# ----------------------------------------------------------------------------- determinism, dtype
ALL = [hutchinson_trace, hutchpp_trace, xtrace, hutchinson_frobenius, hutchinson_diagonal, xdiag]


def _values(result):
    return result.diagonal if isinstance(result, DiagonalEstimate) else result.samples


@pytest.mark.parametrize("fn", ALL)
def test_seeded_generator_is_deterministic(fn):
    A = DenseOperator(planted(torch.randn(30, generator=gen(17), dtype=F64)))
    a, b, c = (fn(A, 10, generator=gen(s)) for s in (1, 1, 2))
    assert torch.equal(_values(a), _values(b))
    assert not torch.equal(_values(a), _values(c))


@pytest.mark.parametrize("fn", ALL)
def test_float32_operator(fn):
    A64, M = low_rank(40, INDEF_RANK5)
    A = DenseOperator(M.float())
    result = fn(A, 14, generator=gen(0))  # k = 7 > rank for xtrace / xdiag, s = 5 for hutchpp
    values = _values(result)
    assert values.dtype == torch.float32 and values.device == A.device
    if isinstance(result, DiagonalEstimate):
        assert result.std_error.dtype == torch.float32
        if fn is xdiag:
            assert rel_err(result.diagonal.double(), M.diag()) < 1e-4
    elif fn in (hutchpp_trace, xtrace):
        assert result.value == pytest.approx(float(M.trace()), abs=1e-4 * 14)
    assert math.isfinite(result.trace if isinstance(result, DiagonalEstimate) else result.value)


@pytest.mark.gpu
@pytest.mark.parametrize("fn", ALL)
def test_cuda_operator_matches_cpu(fn):
    M = planted(torch.randn(30, generator=gen(18), dtype=F64))
    cpu = fn(DenseOperator(M), 10, generator=gen(3))
    cuda = fn(DenseOperator(M.cuda()), 10, generator=gen(3))  # CPU generator: same probes
    assert _values(cuda).device.type == "cuda"
    assert rel_err(_values(cuda).cpu(), _values(cpu)) < 1e-10


def test_single_probe_has_nan_error():
    A = DenseOperator(planted(torch.randn(10, generator=gen(19), dtype=F64)))
    assert math.isnan(hutchinson_trace(A, 1).std_error)
    assert math.isnan(xtrace(A, 2).std_error)
    assert torch.isnan(hutchinson_diagonal(A, 1).std_error).all()


# ----------------------------------------------------------------------------- result objects
def test_trace_estimate_to_dict_and_str():
    A, _ = low_rank(30, PSD_RANK5)
    est = hutchpp_trace(A, 21, generator=gen(0))
    assert isinstance(est, TraceEstimate)
    d = est.to_dict()
    json.dumps(d)
    assert d["method"] == "hutchpp" and d["num_matvecs"] == 21 and d["num_products"] == 2
    assert isinstance(d["value"], float) and len(d["samples"]) == est.num_probes
    text = str(est)
    assert text.startswith("tr = 14.5") and "; hutchpp, 21 products)" in text
    assert "95% interval [" in text
    assert str(hutchinson_frobenius(A, 3)).startswith("||A||_F^2 = ")


def test_diagonal_estimate_to_dict_block_sums_and_str():
    d = torch.arange(1.0, 7.0, dtype=F64)
    est = hutchinson_diagonal(DiagonalOperator(d), 4, generator=gen(0))
    assert est.block_sums({"x": slice(0, 2), "y": slice(2, 6)}) == pytest.approx(
        {"x": 3.0, "y": 18.0})
    assert est.trace == pytest.approx(21.0)
    out = est.to_dict()
    json.dumps(out)
    assert out["diagonal"] == pytest.approx(d.tolist()) and out["num_matvecs"] == 4
    assert "diagonal" not in est.to_dict(include_values=False)
    assert "(hutchinson, 4 products)" in str(est)
    with pytest.raises(ValueError, match="unit-step slice"):
        est.block_sums({"x": slice(0, 9)})


# ----------------------------------------------------------------------------- errors
class _NoProducts(LinearOperator):
    """Fails if multiplied: argument errors must come before any product is spent."""

    def __init__(self, shape=(10, 10), tags=("symmetric",)):
        super().__init__(shape, dtype=F64, device="cpu", tags=tags)

    def _matmat(self, X):
        raise AssertionError("an invalid call spent a product")


def _call(fn, A, m, **kw):
    if fn is hutchinson_block_traces:
        return fn(A, {"all": slice(0, A.shape[0])}, m, **kw)
    return fn(A, m, **kw)


ALL_FNS = ALL + [hutchinson_block_traces]
MINIMUM = {hutchpp_trace: 3, xtrace: 2, xdiag: 2}


@pytest.mark.parametrize("fn", ALL_FNS)
def test_non_operator_is_a_type_error(fn):
    with pytest.raises(TypeError, match="LinearOperator"):
        _call(fn, torch.eye(3, dtype=F64), 4)


@pytest.mark.parametrize("fn", ALL_FNS)
def test_non_square_operator_is_a_value_error(fn):
    with pytest.raises(ValueError, match="square"):
        _call(fn, _NoProducts((10, 8)), 6)
    with pytest.raises(ValueError, match="non-empty"):
        _call(fn, _NoProducts((0, 0)), 6)


@pytest.mark.parametrize("fn", ALL_FNS)
def test_too_few_matvecs_names_the_minimum(fn):
    minimum = MINIMUM.get(fn, 1)
    with pytest.raises(ValueError, match=f"num_matvecs >= {minimum}"):
        _call(fn, _NoProducts(), minimum - 1)


@pytest.mark.parametrize("fn", ALL_FNS)
@pytest.mark.parametrize("bad", [4.0, True, "4"])
def test_non_int_matvecs_is_a_type_error(fn, bad):
    with pytest.raises(TypeError, match="num_matvecs must be an int"):
        _call(fn, _NoProducts(), bad)


@pytest.mark.parametrize("fn", ALL_FNS)
@pytest.mark.parametrize("bad", [0, 1234, "seed", torch.tensor(0)])
def test_non_generator_is_a_type_error(fn, bad):
    with pytest.raises(TypeError, match="torch.Generator"):
        _call(fn, _NoProducts(), 6, generator=bad)


@pytest.mark.parametrize("fn", [f for f in ALL_FNS if f is not xdiag])
def test_unknown_distribution_is_a_value_error(fn):
    with pytest.raises(ValueError, match="distribution must be one of"):
        _call(fn, _NoProducts(), 6, distribution="uniform")


@pytest.mark.parametrize("fn", ALL_FNS)
def test_bad_block_size(fn):
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        _call(fn, _NoProducts(), 6, block_size=0)
    with pytest.raises(TypeError, match="block_size must be a positive int"):
        _call(fn, _NoProducts(), 6, block_size=2.0)


@pytest.mark.parametrize("fn", [xtrace, xdiag])
def test_more_than_2n_matvecs_is_a_value_error(fn):
    with pytest.raises(ValueError, match="num_matvecs <= 20"):
        fn(_NoProducts(), 22)


def test_xdiag_needs_a_symmetric_operator():
    with pytest.raises(ValueError, match="symmetric"):
        xdiag(_NoProducts(tags=()), 6)


@pytest.mark.parametrize("blocks, error, match", [
    ([slice(0, 3)], TypeError, "mapping"),
    ({"a": (0, 3)}, TypeError, "must be a slice"),
    ({"a": slice(0, 11)}, ValueError, "inside"),
    ({"a": slice(0, 10, 2)}, ValueError, "unit-step"),
    ({"a": slice(-1, 3)}, ValueError, "inside"),
])
def test_bad_blocks(blocks, error, match):
    with pytest.raises(error, match=match):
        hutchinson_block_traces(_NoProducts(), blocks, 4)
