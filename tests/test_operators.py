"""Every curvature operator and option against dense float64 ground truth (curvscope.testing)."""

import copy
import warnings

import pytest
import torch
from torch import nn

import curvscope as cs
from conftest import rel_err
from curvscope.testing import (
    dense_empirical_fisher,
    dense_ggn,
    dense_gradient_covariance,
    dense_hessian,
    dense_hessian_checked,
    dense_jacobian,
    tiny_cnn,
    tiny_hf_model,
    tiny_mlp,
)

RTOL = 1e-10  # exact products in float64

def _layernorm_mlp():
    """LayerNorm after a bias: where torch 2.13's jacfwd(jacrev) Hessian is wrong (DESIGN.md)."""
    tp = tiny_mlp("classification")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tp.model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
        with torch.no_grad():
            tp.model[1].weight.add_(0.3 * torch.randn(6, dtype=torch.float64))
    return tp


CASES = {
    "mlp-ce-mean": lambda: tiny_mlp("classification"),
    "mlp-ce-sum": lambda: tiny_mlp("classification", reduction="sum"),
    "mlp-mse-mean": lambda: tiny_mlp("regression"),
    "mlp-mse-sum": lambda: tiny_mlp("regression", reduction="sum"),
    "mlp-bce-mean": lambda: tiny_mlp("binary"),
    "cnn-bn": lambda: tiny_cnn(),
    "cnn-nobn-tanh": lambda: tiny_cnn(batchnorm=False, activation="tanh"),
    "hf-dict": lambda: tiny_hf_model(),
    "mlp-layernorm": _layernorm_mlp,
}


def _problem(tp, **kw):
    return cs.Problem(tp.model, tp.loss_fn, tp.batches, **kw)


def _dense_args(tp):
    return tp.model, tp.loss_fn, tp.split_batches()


def _check_matches(op, expected, *, psd=False):
    """matmat (all columns), matvec (one column), symmetry and PSD against a dense matrix."""
    P = expected.shape[0]
    assert op.shape == (P, P)
    dense = op.to_dense()
    assert dense.dtype == torch.float64
    assert rel_err(dense, expected) < RTOL
    v = torch.randn(P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert rel_err(op @ v, expected @ v) < RTOL
    assert rel_err(dense, dense.T) < RTOL
    assert op.is_symmetric
    if psd:
        assert op.is_psd
        eig = torch.linalg.eigvalsh(expected)
        assert eig.min() >= -RTOL * eig.abs().max()
        assert torch.linalg.eigvalsh(dense).min() >= -RTOL * eig.abs().max()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("engine", cs.curvature._operators.EXACT_HESSIAN_ENGINES)
def test_hessian_matches_dense(case, engine):
    tp = CASES[case]()
    H = cs.HessianOperator(_problem(tp), engine=engine)
    with warnings.catch_warnings():  # the reference warns when torch's jacfwd(jacrev) is wrong
        warnings.simplefilter("ignore")
        expected = dense_hessian_checked(*_dense_args(tp), reduction=tp.reduction)
    if case == "mlp-mse-mean" and engine == "forward_over_reverse":
        # torch 2.13: forward-over-reverse through F.mse_loss(reduction="mean") raises
        # "ZeroTensors are immutable"; the operator must notice, say so, and fall back.
        with pytest.warns(cs.EngineFallbackWarning, match="double_backward"):
            _check_matches(H, expected)
        assert H.active_engine == "double_backward"
    else:
        _check_matches(H, expected)
        assert H.active_engine == engine


@pytest.mark.parametrize("case", CASES)
def test_ggn_matches_dense(case):
    tp = CASES[case]()
    G = cs.GGNOperator(_problem(tp))
    _check_matches(G, dense_ggn(*_dense_args(tp), reduction=tp.reduction), psd=True)


@pytest.mark.parametrize("case", CASES)
def test_residual_is_hessian_minus_ggn(case):
    tp = CASES[case]()
    args = _dense_args(tp)
    expected = dense_hessian(*args, reduction=tp.reduction) - dense_ggn(*args, reduction=tp.reduction)
    R = cs.ResidualOperator(_problem(tp))
    dense = R.to_dense()
    assert rel_err(dense, expected) < RTOL * 10
    assert R.is_symmetric and not R.is_psd


@pytest.mark.parametrize("case", ["mlp-ce-mean", "mlp-bce-mean", "cnn-bn", "hf-dict"])
@pytest.mark.parametrize("engine", [*cs.curvature._operators.EXACT_HESSIAN_ENGINES,
                                    "finite_difference"])
def test_residual_with_every_engine_is_hessian_minus_ggn(case, engine):
    """The residual is the Hessian of the loss linearised in the output: every Hessian engine
    gives H - G (finite differences to their own accuracy), in one product per column."""
    tp = CASES[case]()
    args = _dense_args(tp)
    expected = dense_hessian(*args, reduction=tp.reduction) - dense_ggn(*args, reduction=tp.reduction)
    R = cs.ResidualOperator(_problem(tp), engine=engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cs.EngineFallbackWarning)
        dense = R.to_dense()
    assert rel_err(dense, expected) < (1e-6 if engine == "finite_difference" else RTOL * 10)
    P = expected.shape[0]
    assert R.num_matvecs == P and R.num_data_passes == 1


def test_residual_vanishes_for_a_linear_model():
    """A linear model's outputs are linear in theta: the residual H - G is exactly zero."""
    tp = tiny_mlp("classification")
    model = nn.Linear(4, 3).double()
    R = cs.ResidualOperator(cs.Problem(model, tp.loss_fn, tp.batches))
    assert R.to_dense().abs().max() < 1e3 * torch.finfo(torch.float64).eps


@pytest.mark.parametrize("case", ["mlp-ce-mean", "mlp-ce-sum", "mlp-mse-mean", "mlp-bce-mean", "hf-dict"])
def test_empirical_fisher_and_covariance_match_dense(case):
    tp = CASES[case]()
    args = _dense_args(tp)
    p = _problem(tp)
    _check_matches(cs.EmpiricalFisherOperator(p), dense_empirical_fisher(*args, reduction=tp.reduction),
                   psd=True)
    _check_matches(cs.GradientCovarianceOperator(p), dense_gradient_covariance(*args), psd=True)


def _dense_mc_fisher(op, tp):
    """F = sum_b w_b r_b J_b^T (1/S sum_s blockdiag_i g_si g_si^T) J_b from the operator's samples."""
    model, loss_fn, batches = _dense_args(tp)
    N = sum(int(t.shape[0]) for _, t in batches)
    jacs = dense_jacobian(model, batches)
    F = 0
    for b, ((x, y), J) in enumerate(zip(batches, jacs)):
        with torch.no_grad():
            z = model(x)
        n = z.shape[0]
        w = n / N if tp.reduction == "mean" else 1.0
        r = (1.0 / (n if isinstance(loss_fn, nn.CrossEntropyLoss) else z.numel())
             if tp.reduction == "mean" else 1.0)
        Ji = J.reshape(n, -1, J.shape[-1])  # [n, outputs per example, P]
        for g in op.nll_gradient_samples(b, z, y):
            gi = torch.einsum("no,nop->np", g.reshape(n, -1), Ji)  # per-example J_i^T g_i
            F = F + w * r / op.mc_samples * gi.T @ gi
    return F


@pytest.mark.parametrize("case", ["mlp-ce-mean", "mlp-ce-sum", "mlp-mse-mean", "mlp-bce-mean"])
def test_mc_fisher_matches_dense_with_the_same_samples(case):
    tp = CASES[case]()
    F = cs.FisherMCOperator(_problem(tp), mc_samples=3, generator=torch.Generator().manual_seed(0))
    _check_matches(F, _dense_mc_fisher(F, tp), psd=True)
    # a fixed matrix: the same samples on every product
    v = torch.randn(F.shape[0], dtype=torch.float64)
    assert torch.equal(F @ v, F @ v)


@pytest.mark.parametrize("case", ["mlp-ce-mean", "mlp-mse-sum", "mlp-bce-mean"])
def test_mc_fisher_converges_to_ggn(case):
    """E[F] = G: with many samples the Monte-Carlo Fisher approaches the Gauss-Newton matrix."""
    tp = CASES[case]()
    p = _problem(tp)
    G = cs.GGNOperator(p).to_dense()
    errs = [rel_err(cs.FisherMCOperator(p, mc_samples=s, generator=torch.Generator().manual_seed(3))
                    .to_dense(), G) for s in (10, 1000)]
    assert errs[1] < 0.1
    assert errs[1] < errs[0] / 3  # ~ 1/sqrt(S): a factor 10 expected, 3 is safe


def test_mc_fisher_seed_and_generator():
    tp = tiny_mlp("classification")
    p = _problem(tp)
    a = cs.FisherMCOperator(p, generator=torch.Generator().manual_seed(5)).to_dense()
    b = cs.FisherMCOperator(p, generator=torch.Generator().manual_seed(5)).to_dense()
    c = cs.FisherMCOperator(p, generator=torch.Generator().manual_seed(6)).to_dense()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_mc_fisher_rejects_losses_without_a_likelihood():
    tp = tiny_mlp("regression")
    p = cs.Problem(tp.model, nn.L1Loss(), tp.batches)
    F = cs.FisherMCOperator(p, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="supports cross-entropy, MSE and BCE"):
        F @ torch.zeros(F.shape[0], dtype=torch.float64)
    with pytest.raises(ValueError, match="mc_samples must be a positive int"):
        cs.FisherMCOperator(p, mc_samples=0)


def test_ggn_of_a_loss_without_closed_form_uses_autodiff():
    """Huber loss: no closed form; the loss Hessian comes from autodiff and still matches."""
    tp = tiny_mlp("regression")
    loss = nn.HuberLoss(delta=0.3)
    G = cs.GGNOperator(cs.Problem(tp.model, loss, tp.batches))
    _check_matches(G, dense_ggn(tp.model, loss, tp.batches), psd=True)


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(label_smoothing=0.1),
                                  nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5],
                                                                          dtype=torch.float64))])
def test_ggn_of_cross_entropy_variants(loss):
    tp = tiny_mlp("classification")
    G = cs.GGNOperator(cs.Problem(tp.model, loss, tp.batches))
    _check_matches(G, dense_ggn(tp.model, loss, tp.batches), psd=True)


def test_cross_entropy_ignore_index():
    """Targets equal to ignore_index drop out of the loss and of its closed-form Hessian."""
    tp = tiny_mlp("classification")
    batches = [(x, y.clone()) for x, y in tp.batches]
    batches[0][1][1] = -100
    batches[2][1][0] = -100
    G = cs.GGNOperator(cs.Problem(tp.model, tp.loss_fn, batches,
                                  batch_size_fn=lambda y: int((y != -100).sum())))
    # ground truth: the same examples removed
    kept = [(x[y != -100], y[y != -100]) for x, y in batches]
    _check_matches(G, dense_ggn(tp.model, tp.loss_fn, kept), psd=True)


# ------------------------------------------------------------------------------ options


@pytest.mark.parametrize("engine", cs.curvature._operators.EXACT_HESSIAN_ENGINES)
def test_batch_stats_mode_matches_dense_train_mode_batchnorm(engine):
    tp = tiny_cnn()
    train_copy = copy.deepcopy(tp.model).train()
    expected = dense_hessian(train_copy, tp.loss_fn, tp.batches)
    H = cs.HessianOperator(_problem(tp, mode="batch_stats"), engine=engine)
    _check_matches(H, expected)
    # and it differs from eval mode (the running statistics are non-trivial)
    eval_H = dense_hessian(tp.model, tp.loss_fn, tp.batches)
    assert rel_err(expected, eval_H) > 1e-3
    G = cs.GGNOperator(_problem(tp, mode="batch_stats"))
    _check_matches(G, dense_ggn(train_copy, tp.loss_fn, tp.batches), psd=True)


@pytest.mark.parametrize("selection", [["2.weight"], r"^0\.", "modules"])
def test_parameter_selection_is_the_principal_submatrix(selection):
    tp = tiny_mlp("classification")
    model = tp.model
    if selection == "modules":
        selection = [model[0]]
    names = list(cs.curvature.select_parameters(model, selection))
    full = dense_hessian(*_dense_args(tp))
    _, theta = cs.testing.flat_params(model)
    offsets = {}
    start = 0
    for n, p in model.named_parameters():
        offsets[n] = torch.arange(start, start + p.numel())
        start += p.numel()
    idx = torch.cat([offsets[n] for n in names])
    expected = full[idx][:, idx]
    # both ways: a Problem over the block, and block() of an operator over everything
    H_block = cs.HessianOperator(_problem(tp, params=selection))
    _check_matches(H_block, expected)
    H = cs.HessianOperator(_problem(tp))
    _check_matches(H.block(selection), expected)
    _check_matches(H.restrict(idx), expected)
    assert rel_err(cs.GGNOperator(_problem(tp)).block(selection).to_dense(),
                   dense_ggn(*_dense_args(tp), param_names=names)) < RTOL


def test_block_outside_the_problem_parameters_is_rejected():
    tp = tiny_mlp("classification")
    H = cs.HessianOperator(_problem(tp, params=["0.weight"]))
    with pytest.raises(ValueError, match="not among the Problem's parameters"):
        H.block(["2.bias"])


@pytest.mark.parametrize("op_name", ["hessian", "ggn", "residual", "ef"])
def test_restriction_to_one_class(op_name):
    tp = tiny_mlp("classification")
    make = {"hessian": cs.HessianOperator, "ggn": cs.GGNOperator, "residual": cs.ResidualOperator,
            "ef": cs.EmpiricalFisherOperator}[op_name]
    dense = {"hessian": dense_hessian, "ggn": dense_ggn,
             "residual": lambda *a: dense_hessian(*a) - dense_ggn(*a),
             "ef": dense_empirical_fisher}[op_name]
    op = make(_problem(tp))
    for c in range(3):
        sub = [(x[y == c], y[y == c]) for x, y in tp.batches if (y == c).any()]
        expected = dense(tp.model, tp.loss_fn, sub)
        restricted = op.restrict_to_class(c)
        assert restricted.problem.num_data == sum(len(y) for _, y in sub)
        assert rel_err(restricted.to_dense(), expected) < RTOL * 10
        assert rel_err(make(_problem(tp).restrict_to_class(c)).to_dense(), expected) < RTOL * 10


def test_float64_accumulation_of_a_float32_model():
    tp64 = tiny_mlp("classification")
    tp32 = tiny_mlp("classification", dtype=torch.float32)
    expected = dense_hessian(*_dense_args(tp64))
    H32 = cs.HessianOperator(_problem(tp32))
    assert H32.dtype == torch.float32
    H = cs.HessianOperator(_problem(tp32, accumulate_dtype=torch.float64))
    assert H.dtype == torch.float64
    dense = H.to_dense()
    assert dense.dtype == torch.float64
    assert rel_err(dense, expected) < 1e-5  # float32 products, float64 sums
    assert rel_err(H32.to_dense().double(), expected) < 1e-5


def test_float32_products_follow_the_parameters():
    tp = tiny_cnn(dtype=torch.float32)
    G = cs.GGNOperator(_problem(tp))
    v = torch.randn(G.shape[0])
    out = G @ v
    assert out.dtype == torch.float32 and out.device == v.device
    expected = dense_ggn(*_dense_args(tp))
    assert rel_err(out.double(), expected @ v.double()) < 1e-5


def test_combined_operators_share_one_pass():
    tp = tiny_mlp("classification")
    p = _problem(tp)
    H, G, E = cs.HessianOperator(p), cs.GGNOperator(p), cs.EmpiricalFisherOperator(p)
    combo = (H - G) + E
    assert isinstance(combo, cs.CombinedCurvatureOperator)
    before = p.num_data_passes
    out = combo.to_dense()
    assert p.num_data_passes - before == 1
    args = _dense_args(tp)
    expected = dense_hessian(*args) - dense_ggn(*args) + dense_empirical_fisher(*args)
    assert rel_err(out, expected) < RTOL * 10
    assert (G + E).is_psd and not combo.is_psd


# ------------------------------------------------------------------------------ data contract


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("make", [cs.HessianOperator, cs.GGNOperator, cs.EmpiricalFisherOperator,
                                  cs.GradientCovarianceOperator])
def test_short_last_batch_equals_one_big_batch(reduction, make):
    uneven = tiny_mlp("classification", reduction=reduction, batch_sizes=(6, 6, 1))
    X = torch.cat([x for x, _ in uneven.batches])
    y = torch.cat([t for _, t in uneven.batches])
    one = make(cs.Problem(uneven.model, uneven.loss_fn, [(X, y)])).to_dense()
    split = make(cs.Problem(uneven.model, uneven.loss_fn, uneven.batches)).to_dense()
    assert rel_err(split, one) < RTOL
    if make is cs.HessianOperator and reduction == "mean":
        # weighting batches equally (hessian-eigenthings 1.0) is measurably wrong here
        equal = sum(
            dense_hessian(uneven.model, uneven.loss_fn, [b]) for b in uneven.batches
        ) / len(uneven.batches)
        assert rel_err(equal, one) > 1e-2


def test_dataloader_with_unequal_last_batch():
    tp = tiny_mlp("classification", batch_sizes=(13,))
    X, y = tp.batches[0]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4)
    H = cs.HessianOperator(cs.Problem(tp.model, tp.loss_fn, loader))
    assert H.problem.num_data == 13
    _check_matches(H, dense_hessian(tp.model, tp.loss_fn, [(X, y)]))


def test_dict_batches_through_a_dataloader():
    tp = tiny_hf_model()
    loader = torch.utils.data.DataLoader(tp.batches, batch_size=None)  # already batched dicts
    H = cs.HessianOperator(cs.Problem(tp.model, tp.loss_fn, loader))
    _check_matches(H, dense_hessian_checked(*_dense_args(tp)))


def test_custom_batch_and_output_functions():
    """A batch given as (target, inputs) and a model returning a dict: both adapted by the user."""
    tp = tiny_mlp("classification")

    class DictOut(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return {"scores": self.inner(x)}

    model = DictOut(tp.model)
    swapped = [(y, x) for x, y in tp.batches]
    H = cs.HessianOperator(cs.Problem(model, tp.loss_fn, swapped, batch_fn=lambda b: (b[1], b[0]),
                                      output_fn=lambda out: out["scores"]))
    _check_matches(H, dense_hessian(*_dense_args(tp)))


def test_functional_loss_and_explicit_reduction():
    tp = tiny_mlp("classification", reduction="sum")
    H = cs.HessianOperator(cs.Problem(
        tp.model, lambda out, y: nn.functional.cross_entropy(out, y, reduction="sum"), tp.batches,
        reduction="sum"))
    _check_matches(H, dense_hessian(*_dense_args(tp), reduction="sum"))


class _CountingData:
    """A re-iterable list of batches that counts passes."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


@pytest.mark.parametrize("make", [cs.HessianOperator, cs.GGNOperator, cs.ResidualOperator,
                                  cs.EmpiricalFisherOperator, cs.GradientCovarianceOperator])
def test_one_data_pass_per_product_whatever_k(make):
    tp = tiny_mlp("classification")
    data = _CountingData(tp.batches)
    op = make(cs.Problem(tp.model, tp.loss_fn, data))
    op @ torch.zeros(op.shape[0], dtype=torch.float64)  # warm-up (covariance: mean gradient)
    P = op.shape[0]
    for k in (1, 7, P):
        before = data.passes
        op @ torch.randn(P, k, dtype=torch.float64)
        assert data.passes - before == 1, f"k={k}"


def test_counters_and_chunking():
    tp = tiny_mlp("classification")
    p = _problem(tp)
    H = cs.HessianOperator(p, chunk_size=4)
    V = torch.randn(H.shape[0], 10, dtype=torch.float64)
    out = H @ V
    assert H.num_matvecs == 10 and H.num_data_passes == 1
    assert rel_err(out, cs.HessianOperator(p) @ V) < RTOL


def test_engines_agree_on_a_float32_cnn():
    tp = tiny_cnn(dtype=torch.float32)
    p = _problem(tp)
    V = torch.randn(p.num_params, 3)
    a = cs.HessianOperator(p, engine="double_backward") @ V
    b = cs.HessianOperator(p, engine="forward_over_reverse") @ V
    assert rel_err(a, b) < 1e-5


def test_to_scipy_products():
    sla = pytest.importorskip("scipy.sparse.linalg")
    tp = tiny_mlp("classification")
    H = cs.HessianOperator(_problem(tp))
    expected = dense_hessian(*_dense_args(tp))
    top = sla.eigsh(H.to_scipy(), k=3, which="LA", return_eigenvectors=False)
    assert rel_err(torch.tensor(sorted(top)), torch.linalg.eigvalsh(expected)[-3:]) < 1e-10


def test_out_of_memory_shrinks_columns_then_splits_batches(monkeypatch):
    """Simulated OOM for more than 2 columns or more than 2 examples: the product still equals
    the dense one (column chunks, then batch halves with weights n_s / N)."""
    tp = tiny_mlp("classification", batch_sizes=(6, 5, 2))
    H = cs.HessianOperator(_problem(tp), engine="double_backward")
    real = cs.HessianOperator._batch_product

    def limited(self, ctx, V):
        k = next(iter(V.values())).shape[0]
        if k > 2 or ctx.batch.size > 2:
            raise torch.OutOfMemoryError("simulated")
        return real(self, ctx, V)

    monkeypatch.setattr(cs.HessianOperator, "_batch_product", limited)
    V = torch.randn(H.shape[0], 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = H @ V
    assert H.chunk_size == 1  # columns shrink first (5 -> 2 -> 1), then the batches split
    assert rel_err(out, dense_hessian(*_dense_args(tp)) @ V) < RTOL
    Hb = cs.HessianOperator(_problem(tiny_cnn(), mode="batch_stats"))
    with pytest.raises(RuntimeError, match="forbids splitting"):
        Hb @ torch.zeros(Hb.shape[0], dtype=torch.float64)
