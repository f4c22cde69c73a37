"""The main job's exact path (dense H and G from products, eigh) against the iterative path and
an independent dense Hessian (one double-backward product per unit vector)."""

import pytest
import torch

import curvscope as cs
from curvscope._diagnostics import Cost
from curvscope.analysis.spectrum import (
    EXACT_MAX_PARAMS,
    analyze,
    exact_is_cheaper,
    planned_columns,
)
from curvscope.estimators.slq import SpectralDensity
from curvscope.solvers.dense import dense_spectrum, eigenpairs
from curvscope.testing import tiny_cnn, tiny_mlp

F64 = torch.float64


def _problem(make=tiny_cnn):
    tp = make()
    return cs.Problem(tp.model, tp.loss_fn, tp.batches)


def _independent_dense(make=tiny_cnn) -> torch.Tensor:
    H = cs.HessianOperator(_problem(make), engine="double_backward").to_dense()
    return (H + H.T) / 2


@pytest.fixture(scope="module")
def both():
    return {exact: analyze(_problem(), budget="small", exact=exact, seed=3)
            for exact in (True, False)}


def test_exact_and_iterative_paths_agree(both):
    ex, it = both[True], both[False]
    assert ex.info["method"] == "exact" and it.info["method"] == "iterative"
    assert ex.density.exact and not it.density.exact
    k = 8
    assert torch.allclose(ex.top.eigenvalues[:k], it.top.eigenvalues[:k], rtol=1e-8, atol=1e-10)
    assert torch.allclose(ex.bottom.eigenvalues[:3], it.bottom.eigenvalues[:3], rtol=1e-6,
                          atol=1e-8)
    assert ex.outliers.count == it.outliers.count
    assert torch.allclose(ex.ggn_top.eigenvalues[:k], it.ggn_top.eigenvalues[:k], rtol=1e-8,
                          atol=1e-10)
    # the SLQ trace is an estimate: within 4 standard errors of the exact one
    tr_it, se_it = it.trace()
    assert abs(tr_it - ex.trace()[0]) <= 4 * se_it + 1e-9
    # SLQ's bounds enclose the spectrum (Ritz values are inside it, the bounds outside)
    for a, b in ((ex.density, it.density), (ex.residual_density, it.residual_density)):
        width = a.bounds[1] - a.bounds[0]
        assert b.bounds[0] <= a.bounds[0] + 1e-8 * width
        assert b.bounds[1] >= a.bounds[1] - 1e-8 * width


def test_exact_path_equals_an_independent_dense_hessian(both):
    ex = both[True]
    M = _independent_dense()
    lam = torch.linalg.eigvalsh(M)
    assert ex.trace() == (pytest.approx(float(torch.trace(M)), rel=1e-12), 0.0)
    assert ex.trace_interval() == (pytest.approx(float(torch.trace(M)), rel=1e-12), 0.0)
    assert torch.allclose(ex.density.nodes[0], lam, rtol=1e-10, atol=1e-12)
    neg = float((lam < -ex.density.zero_tol).to(F64).mean())
    assert ex.density.negative_fraction()[0] == pytest.approx(neg, abs=1e-15)
    assert ex.density.negative_fraction()[1] == 0.0  # exact: no standard error
    # the bulk is the spectrum without the outliers; residuals were measured with products
    if ex.outliers.count:
        assert ex.bulk_density.nodes.shape[1] == lam.numel() - ex.outliers.count
    assert bool((ex.top.residual_norms <= 1e-10 * float(lam.abs().max())).all())
    assert ex.top.cost.num_matvecs >= lam.numel()  # the dense matrix took P columns


def test_dense_eigenpairs_have_measured_residuals():
    """eigenpairs() measures ||A v - l v|| with a product: a spectrum of the wrong operator
    (here 2 H) shows residuals of the size of l, not rounding."""
    H = cs.HessianOperator(_problem(tiny_mlp))
    spec = dense_spectrum(H)
    good = eigenpairs(H, spec, 5, "LA")
    assert float(good.residual_norms.max()) <= 1e-10 * float(spec.eigenvalues.abs().max())
    wrong = eigenpairs(2.0 * H, spec, 5, "LA")
    assert torch.allclose(wrong.residual_norms, good.eigenvalues.abs(), rtol=1e-8)
    low = eigenpairs(H, spec, 3, "SA")
    assert low.which == "SA" and bool((low.eigenvalues[1:] >= low.eigenvalues[:-1]).all())


def test_the_exact_path_is_chosen_when_it_takes_fewer_products():
    small = planned_columns(4, 40, 16, 5, papyan=True)
    assert exact_is_cheaper(183, small, papyan=True)
    assert not exact_is_cheaper(EXACT_MAX_PARAMS + 1, 10**9, papyan=True)
    assert not exact_is_cheaper(2000, small, papyan=True)  # 4000 columns > the small plan
    default = planned_columns(10, 80, 30, 5, papyan=True)  # 3 densities x 800 + the solves
    # the bottom pairs: 2.5 bases of 60 vectors (bottom_basis)
    assert default == 3 * 800 + 2 * (4 * 30 + 20) + 150
    assert exact_is_cheaper(1400, default, papyan=True)  # 2 x 1400 dense columns <= 2830
    assert not exact_is_cheaper(1450, default, papyan=True)
    a = analyze(_problem(tiny_mlp), budget="small")  # 51 parameters: exact by default
    plan = a.info["method_plan"]
    assert a.info["method"] == "exact" and "timed products" in a.info["method_reason"]
    assert 0 < plan["exact_s"] <= plan["iterative_s"]
    assert set(plan["seconds_per_column"]) == {"1", "4", "64"}
    assert all(v > 0 for v in plan["seconds_per_column"].values())
    assert any("exact" in s for s in a.summary())
    # the estimate follows the timings: dense columns 1000x dearer make the iterative path win
    from curvscope.analysis.spectrum import planned_split, timed_plan

    class Timed:
        def estimated_seconds_per_column(self, k):
            return {1: 1e-3, 4: 4e-4, 64: 1.0}[k]

    split = planned_split(4, 40, 16, 5, papyan=True)
    slow = timed_plan(Timed(), 183, split, 4, papyan=True)
    assert slow["exact_s"] > slow["iterative_s"]
    assert slow["iterative_s"] == pytest.approx(split[0] * 4e-4 + split[1] * 1e-3)


def test_an_exact_density_round_trips_through_a_bundle(both, tmp_path):
    from curvscope.report import load_bundle, save_bundle

    save_bundle(both[True], tmp_path)
    back = load_bundle(tmp_path).analysis
    assert back.density.exact and back.info["method"] == "exact"
    assert back.trace_interval() == both[True].trace_interval()
    assert torch.equal(back.density.nodes, both[True].density.nodes)


def test_an_exact_density_counts_every_eigenvalue_once():
    lam = torch.tensor([-1.0, 0.0, 2.0, 3.0], dtype=F64)
    d = SpectralDensity.from_eigenvalues(lam, Cost(0, 0, 0, 0.0), zero_tol=1e-9)
    assert d.num_probes == 1 and d.dimension == 4 and d.bounds == (-1.0, 3.0)
    assert float(d.weights.sum()) == pytest.approx(1.0)
    assert d.negative_fraction() == (0.25, 0.0) and d.near_zero_fraction() == (0.25, 0.0)
    assert d.trace_function(lambda t: t) == (pytest.approx(4.0), 0.0)
    with pytest.raises(ValueError, match="at least one eigenvalue"):
        SpectralDensity.from_eigenvalues(lam[:0], Cost(0, 0, 0, 0.0))


def test_the_plan_is_announced_before_any_stage():
    seen = []
    a = analyze(_problem(tiny_mlp), budget="small", on_stage=lambda name, done: seen.append(
        (name, dict(done.get("plan", {})))))
    assert seen[0][0] == "plan" and [n for n, _ in seen[1:4]] == ["top", "bottom", "density"]
    plan = seen[0][1]
    assert plan["method"] == a.info["method"] == "exact"
    P, k, C = a.info["num_params"], a.info["k"], a.info["num_classes"]
    # H and G, P columns each, the residuals of H's top k and bottom 5 and of G's top k, and
    # eigsh for the within-class scatter's top C eigenvalues
    assert [(s["name"], s["columns"]) for s in plan["stages"]] == [
        ("dense_H", P + k + 5), ("dense_G", P + k), ("classes", 4 * C + 20)]
    assert plan["product_columns"] == 2 * P + 2 * k + 5 + 4 * C + 20
    assert plan["estimated_seconds"] == pytest.approx(sum(s["seconds"] for s in plan["stages"]))
    assert plan["estimated_seconds"] > a.info["method_plan"]["exact_s"]  # the dense part only
