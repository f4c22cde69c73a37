"""Tests of the dense float64 ground truth (curvscope.testing.dense) and the tiny problems."""

import warnings

import pytest
import torch
from torch import nn

from curvscope.testing import dense as dense_mod
from curvscope.testing import (
    dense_empirical_fisher,
    dense_ggn,
    dense_gradient,
    dense_gradient_covariance,
    dense_hessian,
    dense_hessian_checked,
    dense_jacobian,
    dense_loss,
    flat_params,
    gaussian_blobs,
    per_example_gradients,
    tiny_cnn,
    tiny_hf_model,
    tiny_mlp,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny problems: one intra-op thread is faster and robust to CPU oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a, b):
    scale = max(a.norm().item(), b.norm().item())
    return 0.0 if scale == 0 else (a - b).norm().item() / scale


def cat_batches(batches):
    return [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]


def data_of(batches):
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


PROBLEMS = {
    "mlp-classification": lambda: tiny_mlp("classification"),
    "mlp-regression": lambda: tiny_mlp("regression"),
    "mlp-binary": lambda: tiny_mlp("binary", reduction="sum"),
    "mlp-relu": lambda: tiny_mlp(activation="relu"),
    "cnn-eval": lambda: tiny_cnn(),
    "cnn-nobn-tanh": lambda: tiny_cnn(batchnorm=False, activation="tanh"),
    "hf": lambda: tiny_hf_model(),
}


def args_of(p):
    return p.model, p.loss_fn, p.split_batches()


# ---------- flat_params


def test_flat_params_order_selection_and_copy():
    model = tiny_mlp().model
    model[2].bias.requires_grad_(False)
    names, theta = flat_params(model)
    assert names == ["0.weight", "0.bias", "2.weight"]
    assert theta.dtype == F64 and theta.shape == (4 * 6 + 6 + 6 * 3,)
    assert torch.equal(
        theta, torch.cat([model[0].weight.reshape(-1), model[0].bias, model[2].weight.reshape(-1)])
    )
    theta.zero_()  # a copy
    assert model[0].weight.abs().sum() > 0
    names, theta = flat_params(model, ["2.bias", "0.bias"])
    assert names == ["2.bias", "0.bias"] and torch.equal(
        theta, torch.cat([model[2].bias, model[0].bias])
    )
    with pytest.raises(KeyError):
        flat_params(model, ["nope"])


# ---------- closed forms


@pytest.mark.parametrize("batch_sizes", [(5, 5, 3), (13,)])
def test_linear_regression_mse_sum_closed_form(batch_sizes):
    torch.manual_seed(0)
    d_in, d_out = 4, 3
    model = nn.Linear(d_in, d_out).double()
    X, Y = torch.randn(13, d_in, dtype=F64), torch.randn(13, d_out, dtype=F64)
    batches = list(zip(X.split(list(batch_sizes)), Y.split(list(batch_sizes)), strict=True))
    loss_fn = nn.MSELoss(reduction="sum")
    N, eye = X.shape[0], torch.eye(d_out, dtype=F64)
    # theta = [vec_rowmajor(W) (index o*d_in + j), b]
    H_ww = 2 * torch.kron(eye, X.T @ X)
    H_wb = 2 * torch.kron(eye, X.sum(0).reshape(-1, 1))  # [d_out*d_in, d_out]
    H_bb = 2 * N * eye
    H_expected = torch.cat([torch.cat([H_ww, H_wb], 1), torch.cat([H_wb.T, H_bb], 1)], 0)
    assert H_wb.shape == (d_out * d_in, d_out)
    for method in ("autograd", "jacfwd"):
        H = dense_hessian(model, loss_fn, batches, reduction="sum", method=method)
        assert rel(H, H_expected) < 1e-13
    assert (
        rel(dense_hessian(model, loss_fn, batches, reduction="sum", method="fd"), H_expected) < 1e-8
    )
    assert rel(dense_ggn(model, loss_fn, batches, reduction="sum"), H_expected) < 1e-13
    # loss, gradient and per-example gradients in closed form
    with torch.no_grad():
        R = model(X) - Y
    assert dense_loss(model, loss_fn, batches, reduction="sum") == pytest.approx(
        (R**2).sum().item(), rel=1e-13
    )
    g_expected = torch.cat([2 * (R.T @ X).reshape(-1), 2 * R.sum(0)])
    assert rel(dense_gradient(model, loss_fn, batches, reduction="sum"), g_expected) < 1e-13
    G = per_example_gradients(model, loss_fn, batches)
    G_expected = torch.cat([2 * (R[:, :, None] * X[:, None, :]).reshape(N, -1), 2 * R], 1)
    assert rel(G, G_expected) < 1e-13
    # Jacobian of the flattened output z[i*d_out + o] = W[o] . x_i + b[o]
    # d z[i, o] / d W[p, j] = eye[o, p] * X[i, j]
    J_w = torch.einsum("op,ij->iopj", eye, X).reshape(N * d_out, d_out * d_in)
    J_expected = torch.cat([J_w, eye.repeat(N, 1)], 1)
    J = torch.cat(dense_jacobian(model, batches))
    assert rel(J, J_expected) < 1e-14


def test_logistic_regression_bce_mean_closed_form():
    X, y = gaussian_blobs(2, n_per_class=7, dim=3, seed=1)
    torch.manual_seed(1)
    model = nn.Linear(3, 1).double()
    Y = y.to(F64)[:, None]
    batches = list(zip(X.split([6, 5, 3]), Y.split([6, 5, 3]), strict=True))
    loss_fn = nn.BCEWithLogitsLoss()
    Xt = torch.cat([X, torch.ones(len(X), 1, dtype=F64)], 1)  # [weight (1x3 -> 3), bias]
    with torch.no_grad():
        s = torch.sigmoid(model(X))[:, 0]
    N = len(X)
    H_expected = Xt.T @ ((s * (1 - s))[:, None] * Xt) / N
    assert rel(dense_hessian(model, loss_fn, batches), H_expected) < 1e-13
    assert rel(dense_hessian_checked(model, loss_fn, batches), H_expected) < 1e-13
    assert rel(dense_ggn(model, loss_fn, batches), H_expected) < 1e-13
    G_expected = (s - y.to(F64))[:, None] * Xt
    assert rel(per_example_gradients(model, loss_fn, batches), G_expected) < 1e-13
    assert (
        rel(dense_empirical_fisher(model, loss_fn, batches), G_expected.T @ G_expected / N) < 1e-13
    )
    assert rel(dense_gradient(model, loss_fn, batches), G_expected.mean(0)) < 1e-13


# ---------- method agreement


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_autograd_jacfwd_fd_agree_and_symmetric(name):
    p = PROBLEMS[name]()
    H = dense_hessian(*args_of(p), reduction=p.reduction)
    H_fw = dense_hessian(*args_of(p), reduction=p.reduction, method="jacfwd")
    H_fd = dense_hessian(*args_of(p), reduction=p.reduction, method="fd")
    assert H.dtype == F64 and H.shape == (flat_params(p.model)[1].numel(),) * 2
    assert H.norm() > 0
    assert rel(H, H.T) < 1e-13
    assert rel(H, H_fw) < 1e-12
    assert rel(H, H_fd) < 1e-7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(dense_hessian_checked(*args_of(p), reduction=p.reduction), H)


def test_train_mode_batchnorm_autograd_matches_fd():
    """Batch-statistics BN: autograd agrees with finite differences (jacfwd may not)."""
    p = tiny_cnn()
    p.model.train()
    H = dense_hessian(*args_of(p))
    assert rel(H, H.T) < 1e-13
    assert rel(H, dense_hessian(*args_of(p), method="fd")) < 1e-7
    assert rel(H, dense_hessian(*args_of(tiny_cnn()))) > 1e-3  # differs from eval mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch forward-mode bug for affine batch_norm (see report)
        assert torch.equal(dense_hessian_checked(*args_of(p)), H)


def _layernorm_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(7, 3, dtype=F64), torch.tensor([0, 1, 1, 0, 1, 0, 0])
    return model, nn.CrossEntropyLoss(), [(X[:4], y[:4]), (X[4:], y[4:])]


def test_checked_layernorm_returns_autograd_and_warns_iff_jacfwd_is_wrong():
    args = _layernorm_problem()
    H = dense_hessian(*args)
    assert rel(H, dense_hessian(*args, method="fd")) < 1e-7
    jacfwd_ok = rel(H, dense_hessian(*args, method="jacfwd")) < 1e-9
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        H_checked = dense_hessian_checked(*args)
    assert torch.equal(H_checked, H)
    assert (len(caught) == 0) == jacfwd_ok
    if caught:
        assert "jacfwd" in str(caught[0].message)


def test_checked_fallback_and_failures(monkeypatch):
    p = tiny_mlp()
    H = dense_hessian(*args_of(p))
    methods = dense_mod._HESSIAN_METHODS
    orig = dict(methods)
    monkeypatch.setitem(methods, "jacfwd", lambda s: orig["jacfwd"](s) * (1 + 1e-6))
    with pytest.warns(RuntimeWarning, match="jacfwd"):
        assert torch.equal(dense_hessian_checked(*args_of(p)), H)
    monkeypatch.setitem(methods, "fd", lambda s: orig["fd"](s) * 1.01)
    with pytest.raises(RuntimeError, match="finite differences"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense_hessian_checked(*args_of(p))
    monkeypatch.setitem(
        methods, "autograd", lambda s: orig["autograd"](s) + torch.triu(torch.ones(51, 51), 1)
    )
    with pytest.raises(RuntimeError, match="asymmetric"):
        dense_hessian_checked(*args_of(p))


# ---------- GGN


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_ggn_symmetric_psd(name):
    p = PROBLEMS[name]()
    G = dense_ggn(*args_of(p), reduction=p.reduction)
    assert G.dtype == F64 and rel(G, G.T) < 1e-13
    ev = torch.linalg.eigvalsh(G)
    assert ev.min() > -1e-12 * ev.max() and ev.max() > 0


def test_ggn_equals_hessian_for_linear_model_ce():
    X, y = gaussian_blobs(3, n_per_class=4, dim=4, seed=3)
    torch.manual_seed(3)
    model = nn.Linear(4, 3).double()
    for reduction in ("mean", "sum"):
        batches = list(zip(X.split([5, 5, 2]), y.split([5, 5, 2]), strict=True))
        args = (model, nn.CrossEntropyLoss(reduction=reduction), batches)
        H = dense_hessian(*args, reduction=reduction)
        assert rel(dense_ggn(*args, reduction=reduction), H) < 1e-13


def test_ggn_diagonal_equals_hessian_diagonal_for_relu_net_ce():
    """ReLU MLP: each output is linear in every single parameter, so diag(H) = diag(G)."""
    p = tiny_mlp(activation="relu", hidden=8)
    H, G = dense_hessian(*args_of(p)), dense_ggn(*args_of(p))
    assert rel(torch.diagonal(H), torch.diagonal(G)) < 1e-12
    assert abs(H.trace() - G.trace()) < 1e-12 * G.trace().abs()
    assert rel(H, G) > 1e-2  # but the off-diagonal residual is not zero


# ---------- gradients, EF, covariance


@pytest.mark.parametrize("name", ["mlp-classification", "mlp-regression", "cnn-eval", "hf"])
def test_empirical_fisher_and_covariance_consistency(name):
    p = PROBLEMS[name]()
    args = args_of(p)
    G = per_example_gradients(*args)
    N = sum(len(y) for _, y in p.split_batches())
    assert G.shape == (N, flat_params(p.model)[1].numel())
    # per-example losses average to the dataset loss (mean) -> gradients too
    assert rel(G.mean(0), dense_gradient(*args)) < 1e-12
    F_mean = dense_empirical_fisher(*args)
    F_sum = dense_empirical_fisher(*args, reduction="sum")
    assert rel(F_mean, G.T @ G / N) < 1e-13
    assert rel(F_sum, N * F_mean) < 1e-13
    C = dense_gradient_covariance(*args)
    gbar = G.mean(0)
    assert rel(C, F_mean - torch.outer(gbar, gbar)) < 1e-10
    assert rel(C, C.T) < 1e-14 and torch.linalg.eigvalsh(C).min() > -1e-12 * C.norm()


def test_per_example_gradients_sum_reduction_and_single_example_loop():
    p = tiny_mlp("binary", reduction="sum")
    args = args_of(p)
    G = per_example_gradients(*args)
    assert rel(G.sum(0), dense_gradient(*args, reduction="sum")) < 1e-12
    X, Y = data_of(p.batches)
    for i in (0, 7, 12):  # independently: one batch with one example
        assert rel(G[i], dense_gradient(p.model, p.loss_fn, [(X[i : i + 1], Y[i : i + 1])])) < 1e-14


def test_dense_loss_matches_direct_evaluation():
    for reduction in ("mean", "sum"):
        p = tiny_mlp("regression", reduction=reduction)
        X, Y = data_of(p.batches)
        with torch.no_grad():
            full = nn.MSELoss(reduction=reduction)(p.model(X), Y).item()
        assert dense_loss(*args_of(p), reduction=reduction) == pytest.approx(full, rel=1e-13)


# ---------- unequal batches


@pytest.mark.parametrize("kind", ["classification", "regression"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_unequal_batches_match_single_batch(kind, reduction):
    p = tiny_mlp(kind, reduction=reduction, batch_sizes=(5, 5, 3))
    one = cat_batches(p.batches)
    for fn in (dense_hessian, dense_ggn, dense_empirical_fisher):
        assert (
            rel(
                fn(*args_of(p), reduction=reduction),
                fn(p.model, p.loss_fn, one, reduction=reduction),
            )
            < 1e-13
        )
    g1, g2 = (
        dense_gradient(*args_of(p), reduction=reduction),
        dense_gradient(p.model, p.loss_fn, one, reduction=reduction),
    )
    assert rel(g1, g2) < 1e-13
    if reduction == "mean":
        # the n_b/N weighting matters: a plain average of per-batch Hessians differs
        naive = sum(dense_hessian(p.model, p.loss_fn, [b]) for b in p.batches) / len(p.batches)
        assert rel(naive, dense_hessian(p.model, p.loss_fn, one)) > 1e-3


# ---------- parameter subsets, dtypes, inputs


def test_param_subset_is_submatrix():
    p = tiny_cnn(batchnorm=True)
    names, theta = flat_params(p.model)
    sizes = [p_.numel() for p_ in p.model.parameters()]
    offsets = dict(zip(names, torch.tensor([0] + sizes[:-1]).cumsum(0).tolist(), strict=True))
    sub = ["4.weight", "1.weight"]
    idx = torch.cat(
        [
            torch.arange(offsets[n], offsets[n] + dict(p.model.named_parameters())[n].numel())
            for n in sub
        ]
    )
    for fn in (dense_hessian, dense_ggn, dense_empirical_fisher):
        full = fn(*args_of(p))
        assert rel(fn(*args_of(p), param_names=sub), full[idx][:, idx]) < 1e-13
    assert (
        rel(dense_gradient(*args_of(p), param_names=sub), dense_gradient(*args_of(p))[idx]) < 1e-14
    )


def test_float32_model_is_evaluated_in_float64():
    p32 = tiny_mlp(dtype=torch.float32)
    H32 = dense_hessian(*args_of(p32))
    m64 = p32.model.double()  # .double() mutates p32.model, so do it after
    batches64 = [(x.double(), y) for x, y in p32.batches]
    assert H32.dtype == F64
    assert rel(H32, dense_hessian(m64, p32.loss_fn, batches64)) < 1e-14


class _TwoInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, a, scale):
        return {"logits": torch.tanh(self.lin(a)) * scale}  # scale [2] is shared (not sliced)


def test_tuple_and_dict_inputs_and_dict_output():
    torch.manual_seed(0)
    model = _TwoInput().double()
    a, scale, y = (
        torch.randn(5, 3, dtype=F64),
        torch.tensor([1.5, -0.5], dtype=F64),
        torch.tensor([0, 1, 1, 0, 1]),
    )
    loss_fn = nn.CrossEntropyLoss()
    H_tuple = dense_hessian(model, loss_fn, [((a, scale), y)])
    H_dict = dense_hessian(model, loss_fn, [({"a": a, "scale": scale}, y)])
    assert torch.equal(H_tuple, H_dict)
    assert rel(H_tuple, dense_hessian(model, loss_fn, [((a, scale), y)], method="fd")) < 1e-7
    G = per_example_gradients(model, loss_fn, [({"a": a, "scale": scale}, y)])
    assert rel(G[3], dense_gradient(model, loss_fn, [((a[3:4], scale), y[3:4])])) < 1e-14


# ---------- the model is untouched


def _snapshot(model):
    return {
        "modes": [m.training for m in model.modules()],
        "params": {
            n: (p.detach().clone(), p.dtype, p.requires_grad) for n, p in model.named_parameters()
        },
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
    }


def _assert_same(s1, s2):
    assert s1["modes"] == s2["modes"]
    for key in ("params", "grads", "buffers"):
        assert s1[key].keys() == s2[key].keys()
        for n in s1[key]:
            a, b = s1[key][n], s2[key][n]
            if isinstance(a, tuple):
                assert torch.equal(a[0], b[0]) and a[1:] == b[1:], n
            elif a is None:
                assert b is None, n
            else:
                assert torch.equal(a, b) and a.dtype == b.dtype, n


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_model_untouched(mode):
    p = tiny_cnn(dtype=torch.float32)
    getattr(p.model, mode)()
    p.model[0].weight.grad = torch.ones_like(p.model[0].weight)  # one grad set, the others None
    p.model[1].bias.requires_grad_(False)
    loss_state = {k: v.clone() for k, v in p.loss_fn.state_dict().items()}
    calls = [
        lambda: flat_params(p.model),
        lambda: dense_loss(*args_of(p)),
        lambda: dense_gradient(*args_of(p)),
        lambda: dense_hessian(*args_of(p)),
        lambda: dense_hessian(*args_of(p), method="jacfwd"),
        lambda: dense_hessian(*args_of(p), method="fd", param_names=["4.bias"]),
        lambda: dense_hessian_checked(*args_of(p), param_names=["1.weight", "4.bias"]),
        lambda: dense_jacobian(p.model, p.split_batches()),
        lambda: dense_ggn(*args_of(p)),
        lambda: per_example_gradients(*args_of(p)),
        lambda: dense_empirical_fisher(*args_of(p)),
        lambda: dense_gradient_covariance(*args_of(p)),
    ]
    before = _snapshot(p.model)
    batches_before = [(x.clone(), y.clone()) for x, y in p.batches]
    for call in calls:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = call()
        for t in out if isinstance(out, (list, tuple)) else [out]:
            assert not isinstance(t, torch.Tensor) or t.dtype == F64
        _assert_same(before, _snapshot(p.model))
    for (x0, y0), (x1, y1) in zip(batches_before, p.batches, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and x1.dtype == torch.float32
    assert all(torch.equal(v, p.loss_fn.state_dict()[k]) for k, v in loss_state.items())


def test_requires_grad_false_params_are_fixed_but_used():
    p = tiny_mlp()
    p.model[0].weight.requires_grad_(False)
    names, _ = flat_params(p.model)
    H = dense_hessian(*args_of(p))
    assert H.shape == (6 + 18 + 3,) * 2
    full = dense_hessian(*args_of(p), param_names=["0.weight", "0.bias", "2.weight", "2.bias"])
    assert rel(H, full[24:, 24:]) < 1e-14 and names == ["0.bias", "2.weight", "2.bias"]


# ---------- problems


def test_problem_factories():
    state = torch.random.get_rng_state()
    p = tiny_mlp("classification", batch_sizes=(5, 5, 3))
    assert [len(y) for _, y in p.batches] == [5, 5, 3]
    assert set(torch.cat([y for _, y in p.batches]).tolist()) == {0, 1, 2} and p.num_classes == 3
    assert p.batches[0][0].dtype == F64 and p.loss_fn.reduction == "mean" and p.reduction == "mean"
    r = tiny_mlp("regression", reduction="sum")
    assert (
        r.batches[0][1].shape == (5, 3) and r.num_classes is None and r.loss_fn.reduction == "sum"
    )
    b = tiny_mlp("binary")
    assert set(torch.cat([y for _, y in b.batches]).unique().tolist()) <= {0.0, 1.0}
    assert isinstance(b.loss_fn, nn.BCEWithLogitsLoss)
    assert torch.equal(tiny_mlp().batches[0][0], p.batches[0][0])  # seeded
    assert not torch.equal(tiny_mlp(seed=1).batches[0][0], p.batches[0][0])
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched

    c = tiny_cnn()
    assert not c.model.training and sum(q.numel() for q in c.model.parameters()) < 400
    x = c.batches[0][0]
    assert x.shape == (4, 1, 6, 6) and [len(y) for _, y in c.batches] == [4, 4, 2]
    bn = c.model[1]
    assert not torch.allclose(bn.running_mean, torch.zeros(3, dtype=F64)) and not torch.allclose(
        bn.running_var, torch.ones(3, dtype=F64)
    )
    with torch.no_grad():
        out_eval = c.model(x)
        c.model.train()
        out_train = c.model(x)
    assert (out_eval - out_train).abs().max() > 1e-2

    h = tiny_hf_model()
    batch = h.batches[0]
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape == (
        3,
        4,
    )
    inputs, target = h.split(batch)
    assert set(inputs) == {"input_ids", "attention_mask"} and torch.equal(target, batch["labels"])
    assert (torch.cat([b["attention_mask"] for b in h.batches]).sum(1) >= 1).all()
    assert h.model(**inputs).logits.shape == (3, 3)
    assert p.split(p.batches[0]) is p.batches[0]

    X, y = gaussian_blobs(3, n_per_class=4, dim=4, seed=0)
    assert X.shape == (12, 4) and X.dtype == F64 and torch.bincount(y).tolist() == [4, 4, 4]


def test_hf_padding_is_ignored():
    """Token ids at masked positions do not matter: the Hessian only sees unmasked tokens."""
    h = tiny_hf_model()
    batches = h.split_batches()
    changed = []
    for inputs, y in batches:
        ids = inputs["input_ids"].clone()
        ids[inputs["attention_mask"] == 0] = 3
        changed.append(({**inputs, "input_ids": ids}, y))
    assert (torch.cat([i["attention_mask"] for i, _ in batches]) == 0).any()
    assert (
        rel(dense_hessian(h.model, h.loss_fn, batches), dense_hessian(h.model, h.loss_fn, changed))
        < 1e-14
    )
