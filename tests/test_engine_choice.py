"""engine="auto" chooses a kernel by a timed trial: every kernel gives the same product, the
choice is recorded, replayed when planted, and restored from a checkpoint."""

import pytest
import torch

import curvscope as cs
from curvscope.curvature._engine_choice import agreed_choice, column_bucket
from curvscope.linops import DenseOperator
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


def test_loop_is_timed_on_a_sample_and_extrapolated():
    from curvscope.curvature._engine_choice import LOOP_SAMPLE, loop_seconds

    # one backward with the graph + first column = 3 s, each further column 2/3 s
    assert loop_seconds(3.0, 2.0, 4, 10) == pytest.approx(3.0 + 9 * 2.0 / 3)
    assert loop_seconds(3.0, 2.0, 4, 4) == pytest.approx(5.0)  # all columns timed: no estimate
    assert loop_seconds(3.0, 0.0, 1, 1) == 3.0
    problem = _problem("mlp")
    H = cs.HessianOperator(problem)
    H @ torch.randn(problem.num_params, 16, dtype=torch.float64)
    record = H.engine_choices[H._choice_key(16)]
    assert record["timed_columns"] == {"double_backward_loop": LOOP_SAMPLE,
                                       "double_backward_batched": 16, "forward_over_reverse": 16}


def test_loop_chosen_after_a_sampled_trial_gives_every_column(monkeypatch):
    """When the loop wins a trial that timed it on 4 of 16 columns, the other 12 are computed
    after it and the product is the dense one (float64, 1e-12)."""
    import importlib

    ops = importlib.import_module("curvscope.curvature._operators")
    monkeypatch.setattr(ops, "choose", lambda mean: "double_backward_loop")
    problem = _problem("cnn")
    H = cs.HessianOperator(problem)
    X = torch.randn(problem.num_params, 16, generator=torch.Generator().manual_seed(5),
                    dtype=torch.float64)
    out = H @ X
    assert H.engine_choices[H._choice_key(16)]["engine"] == "double_backward_loop"
    dense = cs.HessianOperator(_problem("cnn"), engine="double_backward").to_dense() @ X
    assert float((out - dense).norm() / dense.norm()) <= 1e-12
    assert float((out[:, 4:] - dense[:, 4:]).norm() / dense[:, 4:].norm()) <= 1e-12


def test_measured_seconds_per_column_come_from_the_trial_and_a_forced_engine_has_none():
    problem = _problem("cnn")
    H = cs.HessianOperator(problem)
    assert not H.engine_choices
    per_column = H.measured_seconds_per_column(4)  # no product yet: a trial on the first batch
    record = H.engine_choices[H._choice_key(4)]
    assert per_column == record["mean_seconds_per_column"] > 0
    assert per_column == record["seconds_per_column"][record["engine"]]  # one process: its own
    H @ torch.randn(problem.num_params, 5, dtype=torch.float64)  # same bucket: no new trial
    assert H.engine_choices[H._choice_key(5)] is record
    assert cs.HessianOperator(_problem("cnn"), engine="double_backward") \
        .measured_seconds_per_column(4) is None


def test_eigsh_takes_blocks_on_a_cpu_only_when_they_pay():
    from curvscope.solvers.eigsh import BLOCK_COLUMN_FACTOR, CPU_BLOCK, default_block_size

    class Timed:
        def __init__(self, device, one, block):
            self.device, self.cost = torch.device(device), {1: one, CPU_BLOCK: block}

        def measured_seconds_per_column(self, k):
            return self.cost[k]

    assert default_block_size(Timed("cpu", 1.0, 0.5), 20) == CPU_BLOCK
    assert default_block_size(Timed("cpu", 1.0, 1.01 / BLOCK_COLUMN_FACTOR), 20) == 1
    assert default_block_size(Timed("cpu", 1.0, None), 20) == 1  # not measured: one column
    assert default_block_size(Timed("cpu", 1.0, 0.5), CPU_BLOCK - 1) == 1  # k below the block
    assert default_block_size(Timed("meta", 1.0, 2.0), 20) == 8  # accelerators: min(k, 8)
    assert default_block_size(Timed("meta", 1.0, 2.0), 3) == 3
    dense = DenseOperator(torch.eye(3, dtype=torch.float64))
    assert default_block_size(dense, 20) == 1  # an operator that cannot measure


@pytest.mark.parametrize("block", [1, 4])
def test_eigsh_with_the_measured_block_equals_dense(block, monkeypatch):
    """Whichever block the measurement picks, the top eigenpairs of the CNN's Hessian are the
    dense ones (the block forced both ways through the rule's threshold)."""
    import importlib

    es = importlib.import_module("curvscope.solvers.eigsh")
    monkeypatch.setattr(es, "BLOCK_COLUMN_FACTOR", 1e9 if block == 1 else 0.0)
    problem = _problem("cnn")
    H = cs.HessianOperator(problem)
    assert es.CPU_BLOCK == 4 and es.default_block_size(H, 6) == block
    res = cs.eigsh(H, 6, tol=1e-10, generator=torch.Generator().manual_seed(0))
    dense = torch.linalg.eigvalsh(cs.HessianOperator(_problem("cnn"),
                                                     engine="double_backward").to_dense())
    top = dense.flip(0)[:6]
    assert torch.allclose(res.eigenvalues.sort(descending=True).values, top,
                          rtol=1e-8, atol=1e-10 * float(top.abs().max()))


def test_problem_engine_choices_replay_a_run_without_trials(monkeypatch):
    """Problem(engine_choices=result.cost.engines) takes those kernels: no trial, same bits."""
    first = _problem("mlp")
    H = cs.HessianOperator(first)
    X = torch.randn(first.num_params, 5, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    before = H @ X
    key = H._choice_key(5)
    tp = tiny_mlp()
    replay = cs.Problem(tp.model, tp.loss_fn, tp.batches, engine_choices=first.engine_choices)
    assert replay.engine_choices == first.engine_choices
    assert replay.engine_choices is not first.engine_choices  # a copy: the runs stay apart
    H2 = cs.HessianOperator(replay)
    monkeypatch.setattr(type(H2), "_engine_trial", lambda *a, **k: pytest.fail("a trial ran"))
    assert torch.equal(H2 @ X, before)
    assert replay.engine_choices[key]["engine"] == first.engine_choices[key]["engine"]


@pytest.mark.parametrize("make", [cs.GGNOperator, cs.EmpiricalFisherOperator])
def test_any_curvature_operator_measures_its_products_once_per_bucket(make):
    """Operators without kernel trials time one product on the first batch; the figure is kept
    in the Problem's choices (hence in results and checkpoints), and eigsh's block follows it."""
    from curvscope.solvers.eigsh import CPU_BLOCK, default_block_size

    problem = _problem("mlp")
    G = make(problem)
    one = G.measured_seconds_per_column(1)
    record = problem.engine_choices[G._choice_key(1)]
    assert one == record["mean_seconds_per_column"] > 0 and record["columns"] == 1
    assert G._choice_key(1).split("[")[0] == (G._choice_name or type(G).__name__)
    assert G.measured_seconds_per_column(1) == one  # cached: not timed again
    assert G.num_matvecs == 0  # the timing products are not the operator's
    for per_column, block in ((one / 2, CPU_BLOCK), (one, 1)):
        problem.engine_choices[G._choice_key(CPU_BLOCK)] = {
            **record, "columns": CPU_BLOCK, "mean_seconds_per_column": per_column}
        assert default_block_size(G, 20) == block
    assert all(key.split("[")[0] not in ("hessian", "residual") for key in problem.engine_choices)


def test_an_interrupted_stage_gets_the_interrupted_runs_timings_back(tmp_path):
    """A solver's in-stage checkpoint carries the timings it chose its block from: a resumed
    stage puts them back before it starts, so the solver chooses the same block (and matches its
    checkpoint) even though fresh timings could differ."""
    from curvscope._checkpoint import Checkpointer
    from curvscope._stages import StageStore

    problem = _problem("mlp")
    G = cs.GGNOperator(problem)
    G.measured_seconds_per_column(1)
    key = G._choice_key(1)
    store = StageStore(tmp_path, {"run": 1}, G)
    Checkpointer(store.inside("ggn_top"), 1, {"solver": "any"}, G).save({"step": 3})
    fresh = _problem("mlp")  # the new process: no timings
    seen = {}
    resumed = StageStore(tmp_path, {"run": 1}, cs.GGNOperator(fresh))
    resumed.run("ggn_top", lambda inside: seen.update(fresh.engine_choices))
    assert seen[key] == problem.engine_choices[key]
    # a stage with no interrupted checkpoint starts with the Problem as it is
    other = _problem("mlp")
    StageStore(tmp_path / "b", {"run": 2}, cs.GGNOperator(other)).run(
        "ggn_top", lambda inside: seen.update(n=len(other.engine_choices)))
    assert seen["n"] == 0
