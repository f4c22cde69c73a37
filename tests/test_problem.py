"""The data contract: no side effects on the user's model, clear errors, the determinism probe."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvscope as cs
from curvscope.testing import tiny_cnn, tiny_hf_model, tiny_mlp

OPERATORS = {
    "hessian-fwd": lambda p: cs.HessianOperator(p),
    "hessian-db": lambda p: cs.HessianOperator(p, engine="double_backward"),
    "ggn": cs.GGNOperator,
    "residual": cs.ResidualOperator,
    "ef": cs.EmpiricalFisherOperator,
    "cov": cs.GradientCovarianceOperator,
    "mc-fisher": lambda p: cs.FisherMCOperator(p, generator=torch.Generator().manual_seed(0)),
}


def _snapshot(model):
    return {
        "training": [m.training for m in model.modules()],
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "buffer_names": [n for n, _ in model.named_buffers()],
    }


def _assert_same(before, after):
    assert before["training"] == after["training"], "training flags changed"
    assert before["requires_grad"] == after["requires_grad"], "requires_grad changed"
    assert before["buffer_names"] == after["buffer_names"], "buffers added or removed"
    for n, p in before["params"].items():
        assert torch.equal(p, after["params"][n]), f"parameter {n} changed"
    for n, g in before["grads"].items():
        other = after["grads"][n]
        assert (g is None and other is None) or torch.equal(g, other), f".grad of {n} changed"
    for n, b in before["buffers"].items():
        assert torch.equal(b, after["buffers"][n]), f"buffer {n} changed"


@pytest.mark.parametrize("user_mode", ["train", "eval"])
@pytest.mark.parametrize("mode", ["eval", "batch_stats"])
@pytest.mark.parametrize("op", OPERATORS)
def test_model_is_untouched(op, mode, user_mode):
    """Training flag, BatchNorm buffers (running stats, num_batches_tracked), .grad, parameters."""
    tp = tiny_cnn()
    model = tp.model
    model.train(user_mode == "train")
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)  # a user's gradient, kept
    before = _snapshot(model)
    problem = cs.Problem(model, tp.loss_fn, tp.batches, mode=mode, check_determinism=True)
    A = OPERATORS[op](problem)
    A @ torch.randn(A.shape[0], 3, dtype=torch.float64)
    problem.loss_and_gradient()
    _assert_same(before, _snapshot(model))


def test_model_is_restored_when_a_product_fails():
    tp = tiny_cnn()
    model = tp.model.train()
    before = _snapshot(model)
    problem = cs.Problem(model, tp.loss_fn, tp.batches, mode="batch_stats")
    H = cs.HessianOperator(problem)

    def broken(*_):
        raise RuntimeError("boom")

    problem.batch_loss = broken
    with pytest.raises(RuntimeError, match="boom"):
        H @ torch.zeros(H.shape[0], dtype=torch.float64)
    _assert_same(before, _snapshot(model))
    assert H.active_engine == "auto"  # a user error is not an engine failure


def test_modes_set_batchnorm_and_dropout_as_documented():
    seen = {}

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.bn = nn.BatchNorm1d(3)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            seen["bn"], seen["drop"] = self.bn.training, self.drop.training
            seen["stats"] = self.bn.running_mean is not None
            return self.drop(self.bn(self.lin(x)))

    tp = tiny_mlp("classification")
    model = Probe().double().train()
    cs.Problem(model, tp.loss_fn, tp.batches, mode="eval")
    assert seen == {"bn": False, "drop": False, "stats": True}
    cs.Problem(model, tp.loss_fn, tp.batches, mode="batch_stats")
    assert seen == {"bn": True, "drop": False, "stats": False}
    assert model.training and model.bn.running_mean is not None


# ------------------------------------------------------------------------------ bad input


def test_empty_data():
    tp = tiny_mlp()
    with pytest.raises(ValueError, match="data is empty"):
        cs.Problem(tp.model, tp.loss_fn, [])


def test_one_shot_iterator_and_non_iterable_data():
    tp = tiny_mlp()
    with pytest.raises(TypeError, match="one-shot iterator"):
        cs.Problem(tp.model, tp.loss_fn, (b for b in tp.batches))
    with pytest.raises(TypeError, match="DataLoader or a list of batches"):
        cs.Problem(tp.model, tp.loss_fn, tp.batches[0][0])
    with pytest.raises(TypeError, match="DataLoader or a list of batches"):
        cs.Problem(tp.model, tp.loss_fn, 3)


def test_wrong_model_and_loss_types():
    tp = tiny_mlp()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        cs.Problem(lambda x: x, tp.loss_fn, tp.batches)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        cs.Problem(tp.model, "cross_entropy", tp.batches)


def test_loss_that_is_not_a_scalar():
    tp = tiny_mlp()
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        cs.Problem(tp.model, nn.CrossEntropyLoss(reduction="none"), tp.batches)
    with pytest.raises(ValueError, match="must return a scalar tensor, got \\(5,\\)"):
        cs.Problem(tp.model, lambda out, y: F.cross_entropy(out, y, reduction="none"), tp.batches)


def test_contradicting_reduction():
    tp = tiny_mlp()
    with pytest.raises(ValueError, match="contradicts the loss module's reduction='mean'"):
        cs.Problem(tp.model, nn.CrossEntropyLoss(), tp.batches, reduction="sum")


def test_nan_loss_and_nan_gradients():
    tp = tiny_mlp()
    bad = [(x.clone(), y) for x, y in tp.batches]
    bad[0][0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="loss on the first batch is nan"):
        cs.Problem(tp.model, tp.loss_fn, bad)

    def sqrt_loss(out, y):  # finite value, infinite gradient at 0
        return torch.sqrt((out * 0).sum() ** 2) + F.cross_entropy(out, y)

    with pytest.raises(ValueError, match="gradient on the first batch is not finite"):
        cs.Problem(tp.model, sqrt_loss, tp.batches)


def test_parameters_that_do_not_require_grad():
    tp = tiny_mlp()
    tp.model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\['0.weight'\] have requires_grad=False"):
        cs.Problem(tp.model, tp.loss_fn, tp.batches, params=["0.weight", "0.bias"])
    # the default selection leaves them out
    assert "0.weight" not in cs.Problem(tp.model, tp.loss_fn, tp.batches).param_space.names
    for p in tp.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        cs.Problem(tp.model, tp.loss_fn, tp.batches)


def test_unused_parameters():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.spare = nn.Linear(4, 3)

        def forward(self, x):
            return self.used(x)

    tp = tiny_mlp()
    model = WithSpare().double()
    with pytest.raises(ValueError, match=r"\['spare.weight', 'spare.bias'\] do not influence"):
        cs.Problem(model, tp.loss_fn, tp.batches)
    cs.Problem(model, tp.loss_fn, tp.batches, params="^used")  # the documented fix works


def test_mismatched_vector_shapes_and_dtypes():
    tp = tiny_mlp()
    H = cs.HessianOperator(cs.Problem(tp.model, tp.loss_fn, tp.batches))
    P = H.shape[0]
    expected = rf"expects a vector \[{P}\] or a matrix \[{P}, k\], got shape \({P + 1},\)"
    with pytest.raises(ValueError, match=expected):
        H @ torch.zeros(P + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="has dtype torch.float64, got an input of dtype torch.float32"):
        H @ torch.zeros(P)
    with pytest.raises(TypeError, match="torch.Tensor inputs, got list"):
        H @ [0.0] * P
    with pytest.raises(ValueError, match="ParamSpace|expected a flat vector"):
        H.problem.param_space.split(torch.zeros(P - 1))


def test_data_on_another_device_or_dtype_than_the_model():
    tp = tiny_mlp()
    meta = [(x.to("meta"), y.to("meta")) for x, y in tp.batches]
    with pytest.raises(ValueError, match="inputs are on meta but the model's parameters are on cpu"):
        cs.Problem(tp.model, tp.loss_fn, meta)
    single = [(x.float(), y) for x, y in tp.batches]
    with pytest.raises(ValueError,
                       match="inputs have dtype torch.float32 but the parameters have torch.float64"):
        cs.Problem(tp.model, tp.loss_fn, single)
    # the documented fix
    p = cs.Problem(tp.model, tp.loss_fn, single, move_batches=True)
    assert p.num_data == 13


def test_bad_batch_formats():
    tp = tiny_mlp()
    triples = [(x, y, y) for x, y in tp.batches]
    with pytest.raises(TypeError, match="tuple of length 3.*batch_fn="):
        cs.Problem(tp.model, tp.loss_fn, triples)
    hf = tiny_hf_model()
    renamed = [{("label" if k == "labels" else k): v for k, v in b.items()} for b in hf.batches]
    with pytest.raises(TypeError, match="needs the key 'labels'.*got keys"):
        cs.Problem(hf.model, hf.loss_fn, renamed)


def test_model_that_fails_on_the_batch_and_loss_that_does_not_fit():
    tp = tiny_mlp()
    wide = [(torch.cat([x, x], 1), y) for x, y in tp.batches]
    with pytest.raises(ValueError, match="the model failed on the first batch"):
        cs.Problem(tp.model, tp.loss_fn, wide)
    with pytest.raises(ValueError, match="the loss failed on the first batch"):
        cs.Problem(tp.model, nn.CrossEntropyLoss(), [(x, y + 10) for x, y in tp.batches])


def test_model_output_without_logits():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return {"scores": self.lin(x)}

    tp = tiny_mlp()
    with pytest.raises(TypeError, match="`logits` tensor; pass output_fn="):
        cs.Problem(Weird().double(), tp.loss_fn, tp.batches)


def test_bad_options():
    tp = tiny_mlp()
    with pytest.raises(ValueError, match="mode must be one of"):
        cs.Problem(tp.model, tp.loss_fn, tp.batches, mode="train")
    with pytest.raises(ValueError, match="num_data must be a positive int"):
        cs.Problem(tp.model, tp.loss_fn, tp.batches, num_data=0)
    with pytest.raises(TypeError, match="accumulate_dtype must be a floating dtype"):
        cs.Problem(tp.model, tp.loss_fn, tp.batches, accumulate_dtype=torch.int64)
    p = cs.Problem(tp.model, tp.loss_fn, tp.batches)
    with pytest.raises(ValueError, match="engine must be one of"):
        cs.HessianOperator(p, engine="magic")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        cs.GGNOperator(p, chunk_size=0)
    with pytest.raises(TypeError, match="needs a curvscope.Problem"):
        cs.HessianOperator(tp.model)


def test_class_without_examples():
    tp = tiny_mlp()
    p = cs.Problem(tp.model, tp.loss_fn, tp.batches)
    with pytest.raises(ValueError, match="no examples \\(class 7\\)"):
        p.restrict_to_class(7)


# ------------------------------------------------------------------------------ determinism


def test_determinism_probe_passes_on_deterministic_data():
    tp = tiny_cnn()
    cs.Problem(tp.model, tp.loss_fn, tp.batches, check_determinism=True, mode="batch_stats")


def _loader(tp, **kw):
    X = torch.cat([x for x, _ in tp.batches])
    y = torch.cat([t for _, t in tp.batches])
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4, **kw)


def test_shuffling_alone_is_harmless_for_per_example_losses_in_eval_mode():
    """The mean over all examples does not depend on their order: the probe accepts it."""
    tp = tiny_mlp()
    torch.manual_seed(0)
    cs.Problem(tp.model, tp.loss_fn, _loader(tp, shuffle=True), check_determinism=True)


def test_determinism_probe_names_shuffling_and_drop_last():
    tp = tiny_mlp()
    torch.manual_seed(1)
    with pytest.raises(RuntimeError, match="shuffling: build the DataLoader with shuffle=False.*"
                                           "drop_last=True"):
        cs.Problem(tp.model, tp.loss_fn, _loader(tp, shuffle=True, drop_last=True),
                   check_determinism=True)
    cs.Problem(tp.model, tp.loss_fn, _loader(tp, drop_last=True), check_determinism=True)


def test_determinism_probe_names_augmentation():
    tp = tiny_mlp()

    class Augmented(torch.utils.data.Dataset):
        transform = staticmethod(lambda x: x + 0.1 * torch.randn_like(x))

        def __init__(self, X, y):
            self.X, self.y = X, y

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.transform(self.X[i]), self.y[i]

    X = torch.cat([x for x, _ in tp.batches])
    y = torch.cat([t for _, t in tp.batches])
    loader = torch.utils.data.DataLoader(Augmented(X, y), batch_size=5)
    with pytest.raises(RuntimeError, match="data augmentation"):
        cs.Problem(tp.model, tp.loss_fn, loader, check_determinism=True)


def test_determinism_probe_names_dropout():
    class AlwaysDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.drop = nn.Dropout(0.5)  # switched off by curvscope ...

        def forward(self, x):
            return F.dropout(self.lin(x), 0.5, training=True)  # ... but this is not

    tp = tiny_mlp()
    with pytest.raises(RuntimeError, match="Dropout"):
        cs.Problem(AlwaysDropout().double(), tp.loss_fn, tp.batches, check_determinism=True)


def test_determinism_probe_names_train_mode_batchnorm_with_shuffling():
    tp = tiny_cnn(batch_sizes=(4, 3, 3))
    X = torch.cat([x for x, _ in tp.batches])
    y = torch.cat([t for _, t in tp.batches])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4,
                                         shuffle=True)
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="train-mode BatchNorm"):
        cs.Problem(tp.model, tp.loss_fn, loader, mode="batch_stats", check_determinism=True)


def test_problem_facts_and_repr():
    tp = tiny_hf_model()
    p = cs.Problem(tp.model, tp.loss_fn, tp.batches)
    assert p.num_data == 8 and p.num_params == sum(q.numel() for q in tp.model.parameters())
    assert p.device == torch.device("cpu") and p.dtype == torch.float64
    text = repr(p)
    assert "N=8" in text and "reduction='mean'" in text and "TinyHFClassifier" in text
    loss, grad = p.loss_and_gradient()
    from curvscope.testing import dense_gradient, dense_loss

    assert abs(float(loss) - dense_loss(tp.model, tp.loss_fn, tp.split_batches())) < 1e-12
    assert torch.allclose(grad, dense_gradient(tp.model, tp.loss_fn, tp.split_batches()),
                          rtol=1e-10, atol=1e-14)


def test_progress_bar_over_batches(capsys):
    tp = tiny_mlp()
    p = cs.Problem(tp.model, tp.loss_fn, tp.batches, progress=True)
    H = cs.HessianOperator(p)
    H @ torch.zeros(H.shape[0], dtype=torch.float64)
    assert "data pass" in capsys.readouterr().err


def test_deepcopy_of_problem_model_is_not_needed():
    """Two Problems on one model give identical products (no hidden state on the model)."""
    tp = tiny_cnn()
    a = cs.HessianOperator(cs.Problem(tp.model, tp.loss_fn, tp.batches)).to_dense()
    b = cs.HessianOperator(cs.Problem(copy.deepcopy(tp.model), tp.loss_fn, tp.batches)).to_dense()
    assert torch.equal(a, b)
