"""engine="auto" chooses a kernel by a timed trial: every kernel gives the same product, the
choice is recorded, replayed when planted, and restored from a checkpoint."""

import pytest
import torch

import curvscope as cs
from curvscope.curvature._engine_choice import agreed_choice, column_bucket
from curvscope.testing import tiny_cnn, tiny_mlp


def _problem(name):
    tp = {"mlp": tiny_mlp, "cnn": tiny_cnn}[name]()
    return cs.Problem(tp.model, tp.loss_fn, tp.batches)


def _pin(problem, H, k, kernel):
    problem.engine_choices[H._choice_key(k)] = {
        "engine": kernel, "seconds_per_column": {"planted": "by the test"}, "columns": k,
        "examples": 0, "peak_extra_bytes": None}


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("k", [1, 5, 16])
def test_every_kernel_and_auto_give_the_same_product_float64(name, k):
    problem = _problem(name)
    assert problem.dtype == torch.float64
    X = torch.randn(problem.num_params, k, generator=torch.Generator().manual_seed(k),
                    dtype=torch.float64)
    products = {}
    for kernel in cs.HESSIAN_KERNELS:
        if k == 1 and kernel == "double_backward_batched":
            continue
        fresh = _problem(name)
        H = cs.HessianOperator(fresh)
        _pin(fresh, H, k, kernel)
        products[kernel] = H @ X
        assert H.engine_choices[H._choice_key(k)]["engine"] == kernel  # no trial: the pinned one
    auto = cs.HessianOperator(problem)
    products["auto"] = auto @ X
    record = auto.engine_choices[auto._choice_key(k)]
    assert record["engine"] in cs.HESSIAN_KERNELS and record["columns"] == k
    timings = [v for v in record["seconds_per_column"].values() if isinstance(v, float)]
    assert timings and all(t > 0 for t in timings)
    # the dense Hessian (one product per unit vector, an independent route) times X
    dense = cs.HessianOperator(_problem(name), engine="double_backward").to_dense() @ X
    for kernel, out in products.items():
        gap = float((out - dense).norm() / dense.norm())
        assert gap <= 1e-12, (kernel, gap)


def test_trial_excludes_a_kernel_that_disagrees(monkeypatch):
    problem = _problem("mlp")
    H = cs.HessianOperator(problem)
    real = type(H)._trial_kernel

    def wrong_forward_mode(self, name, ctx, V):
        out = real(self, name, ctx, V)
        if name == "forward_over_reverse":
            return {n: 1.01 * t for n, t in out.items()}
        return out

    monkeypatch.setattr(type(H), "_trial_kernel", wrong_forward_mode)
    H @ torch.randn(problem.num_params, 16, dtype=torch.float64)
    record = H.engine_choices[H._choice_key(16)]
    assert str(record["seconds_per_column"]["forward_over_reverse"]).startswith("disagrees")
    assert record["engine"] != "forward_over_reverse"


def test_choice_is_in_the_cost_and_restored_from_a_checkpoint(tmp_path):
    ckpt = tmp_path / "lanczos.ckpt"
    problem = _problem("mlp")
    H = cs.HessianOperator(problem)
    _pin(problem, H, 2, "forward_over_reverse")
    first = cs.lanczos(H, 12, num_probes=2, generator=torch.Generator().manual_seed(3),
                       checkpoint=ckpt, checkpoint_every=4)
    assert first.cost.engines[H._choice_key(2)]["engine"] == "forward_over_reverse"
    assert first.cost.to_dict()["engines"] == first.cost.engines
    # a fresh process would have an empty table; the checkpoint puts the choice back
    again = _problem("mlp")
    H2 = cs.HessianOperator(again)
    second = cs.lanczos(H2, 12, num_probes=2, generator=torch.Generator().manual_seed(3),
                        checkpoint=ckpt, checkpoint_every=4)
    assert again.engine_choices == problem.engine_choices
    assert again.engine_choices[H2._choice_key(2)]["seconds_per_column"] == {
        "planted": "by the test"}
    assert torch.equal(second.alpha, first.alpha) and torch.equal(second.beta, first.beta)


def test_buckets_and_the_loop_margin():
    assert [column_bucket(k) for k in (1, 2, 3, 4, 7, 8, 16, 31, 32, 100)] == [
        "1", "2-3", "2-3", "4-7", "4-7", "8-15", "16-31", "16-31", "32+", "32+"]
    cpu = torch.device("cpu")
    assert agreed_choice({"double_backward_loop": 1.05, "forward_over_reverse": 1.0}, cpu) \
        == "double_backward_loop"
    assert agreed_choice({"double_backward_loop": 1.5, "forward_over_reverse": 1.0}, cpu) \
        == "forward_over_reverse"
    assert agreed_choice({"double_backward_loop": "failed: x",
                          "double_backward_batched": 2.0}, cpu) == "double_backward_batched"
    assert agreed_choice({"double_backward_loop": "failed: x"}, cpu) is None
