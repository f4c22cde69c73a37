"""Tolerances follow the dtype and the products' measured noise: no ConvergenceWarning for a
float32 model whose eigenpairs are as good as float32 allows, and null-space pairs judged
against ||H||, not against their own (zero) eigenvalue."""

import warnings

import pytest
import torch

import curvscope as cs
from curvscope.analysis.spectrum import TOP_TOL, analyze, top_tolerance
from curvscope.linops import DenseOperator
from curvscope.solvers._results import ConvergenceWarning
from curvscope.solvers.eigsh import ZERO_RESIDUAL, eigsh, product_noise, zero_floor
from curvscope.testing import tiny_cnn


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype,low,high", [(torch.float64, 1e-17, 1e-13),
                                            (torch.float32, 1e-9, 1e-5)])
def test_product_noise_is_the_rounding_of_the_dtype(dtype, low, high):
    tp = tiny_cnn(dtype=dtype)
    H = cs.HessianOperator(cs.Problem(tp.model, tp.loss_fn, tp.batches))
    noise = product_noise(H, _gen(0))
    assert low <= noise <= high
    assert top_tolerance(noise) == max(TOP_TOL, 30 * noise)


def test_null_space_pairs_converge_against_the_norm_in_float32():
    """A float32 operator of rank 20 in 60 dimensions: eigsh for 30 pairs returns 10 null-space
    pairs. Their residuals are float32 rounding (~1e-7 ||A||), far above tol sqrt(eps) ||A||
    (the old floor): they count as converged, and no warning is raised."""
    g = _gen(1)
    U = torch.linalg.qr(torch.randn(60, 20, generator=g, dtype=torch.float64))[0]
    M = (U * torch.linspace(1, 10, 20, dtype=torch.float64)) @ U.T
    A32 = DenseOperator(((M + M.T) / 2).float(), tags={"symmetric"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = eigsh(A32, 30, tol=1e-6, generator=_gen(2))
    assert res.all_converged
    null = res.eigenvalues.abs() < 1e-3
    assert int(null.sum()) == 10
    floor = zero_floor(1e-6, torch.float32, 10.0)
    assert floor == pytest.approx(ZERO_RESIDUAL * torch.finfo(torch.float32).eps * 10.0)
    assert float(res.residual_norms[null].max()) <= floor
    # and the rule is no looser than the old one in float64, where the rounding allows it
    assert zero_floor(1e-6, torch.float64, 1.0) <= 1e3 * torch.finfo(torch.float64).eps


def test_a_float32_cnn_analysis_raises_no_spurious_warning():
    """The digits CNN in float32 (the iterative path): before the tolerance followed the
    products' noise, eigsh stalled at 1e-6 and every run ended in ConvergenceWarnings."""
    from curvscope.zoo import digits_cnn

    zoo = digits_cnn(channels=(4, 8), steps=100)
    problem = cs.Problem(zoo.model, zoo.loss_fn, zoo.batches)
    assert problem.dtype == torch.float32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        a = analyze(problem, budget="small", exact=False, papyan=False, classes=False)
    assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert a.top.all_converged and a.info["tol"] > TOP_TOL
    assert not a.info["notes"]  # the bottom solve did not warn either
    assert 1e-9 < a.info["product_noise"] < 1e-5
