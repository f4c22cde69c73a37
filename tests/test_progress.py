"""Progress in product columns against the run's plan, and the time left (curvscope._progress)."""

import pytest
import torch

import curvscope as cs
from curvscope._progress import (
    Progress,
    StagePlan,
    counting_products,
    plan_lines,
    progress_line,
)
from curvscope._stages import StageStore
from curvscope.analysis.spectrum import analyze, estimated_seconds
from curvscope.testing import tiny_cnn, tiny_mlp


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_time_left_is_the_plan_scaled_by_the_speed_so_far():
    clock, seen = FakeClock(), []
    p = Progress(seen.append, clock=clock)
    p.set_plan([StagePlan("a", 100, 10, 10.0), StagePlan("b", 50, 5, 30.0),
                StagePlan("gradients", None)])
    assert seen[-1].eta_s is None and seen[-1].planned == 150 and seen[-1].stages_planned == 3
    p.begin("a")
    clock.t += 5.0
    p.add(50)  # half of a's 10 planned seconds in 5 s: the run is at the plan's speed / 1
    u = seen[-1]
    assert (u.stage, u.stage_columns, u.stage_planned, u.columns) == ("a", 50, 100, 50)
    assert u.eta_s == pytest.approx((40.0 - 5.0) * 5.0 / 5.0)
    clock.t += 15.0
    p.add(50)
    p.end("a")  # a took 20 s for a planned 10: twice as slow as planned
    assert seen[-1].eta_s == pytest.approx(30.0 * 20.0 / 10.0)
    assert seen[-1].stages_done == 1 and seen[-1].stage is None
    p.begin("b")
    p.add(80)  # beyond b's plan: the fraction stops at 1, the columns are still counted
    assert seen[-1].stage_columns == 80 and seen[-1].eta_s == pytest.approx(0.0)
    p.end("b")
    summary = {r["name"]: r for r in p.summary()}
    assert summary["a"]["done_columns"] == 100 and summary["a"]["done_seconds"] == 20.0
    assert summary["a"]["done_passes"] == 2 and summary["b"]["done_passes"] == 1
    assert summary["b"]["done_columns"] == 80 and summary["gradients"]["state"] == "pending"


def test_a_stage_read_back_counts_as_done_but_not_in_the_speed():
    clock, seen = FakeClock(), []
    p = Progress(seen.append, clock=clock)
    p.set_plan([StagePlan("a", 100, 10, 30.0), StagePlan("b", 100, 10, 10.0)])
    p.resumed("a")
    assert seen[-1].stages_done == 1 and seen[-1].eta_s is None  # no speed measured yet
    p.begin("b")
    clock.t += 2.0
    p.add(50)  # 5 planned seconds of b in 2 s; a's 30 read back in no time must not count
    assert seen[-1].eta_s == pytest.approx(5.0 * 2.0 / 5.0)


def test_without_timed_products_the_columns_stand_in_for_seconds():
    clock, seen = FakeClock(), []
    p = Progress(seen.append, clock=clock)
    p.set_plan([StagePlan("a", 100, 10, None), StagePlan("b", 300, 10, None)])
    p.begin("a")
    clock.t += 4.0
    p.add(100)
    assert seen[-1].eta_s == pytest.approx(300 * 4.0 / 100)


def test_another_name_takes_the_plans_place_and_unplanned_stages_are_kept_apart():
    p = Progress()
    p.set_plan([StagePlan("density", 40, 4, 1.0, also=("bulk_density",))])
    p.begin("bulk_density")
    p.add(40)
    p.end("bulk_density")
    p.begin("extra")
    p.add(7)
    p.end("extra")
    rows = {r["name"]: r for r in p.summary()}
    assert rows["density"]["done_columns"] == 40 and rows["density"]["state"] == "done"
    assert rows["extra"] == {**rows["extra"], "done_columns": 7, "state": "unplanned"}


def test_every_curvature_product_is_reported_once_with_its_columns():
    tp = tiny_mlp("classification")
    problem = cs.Problem(tp.model, tp.loss_fn, tp.batches)
    got: list[int] = []
    V = torch.randn(problem.num_params, 3, dtype=torch.float64)
    H, G = cs.HessianOperator(problem), cs.GGNOperator(problem)
    with counting_products(got.append):
        H @ V
        G @ V[:, 0]
        (H + 2 * G) @ V[:, :2]  # a sum of two operators: two products
        with counting_products(got.append):  # nested listeners both hear each product
            G @ V
    H @ V  # outside: nobody listens
    assert got == [3, 1, 2, 2, 3, 3]


def test_a_stage_store_reports_its_stages_and_read_backs(tmp_path):
    p = Progress()
    p.set_plan([StagePlan("one", 2, 1, None), StagePlan("two", 2, 1, None)])
    store = StageStore(tmp_path, {"run": 1}, progress=p)
    with counting_products(p.add):
        store.run("one", lambda _: p.add(2) or 1)
    again = Progress()
    again.set_plan(p.plan)
    StageStore(tmp_path, {"run": 1}, progress=again).run("one", lambda _: 1 / 0)
    assert [r["state"] for r in p.summary()] == ["done", "pending"]
    assert [r["state"] for r in again.summary()] == ["resumed", "pending"]


@pytest.mark.parametrize("exact", [True, False])
def test_the_analysis_plan_against_what_its_stages_took(exact):
    """The exact path's planned columns are exact; the iterative stages' counted columns are the
    solvers' own costs; every update is monotone and ends with nothing left."""
    tp = tiny_cnn()
    problem = cs.Problem(tp.model, tp.loss_fn, tp.batches)
    seen, stages = [], {}

    def on_stage(name, done):
        if name == "plan":
            stages.update({s["name"]: s for s in done["plan"]["stages"]})

    a = analyze(problem, budget="small", exact=exact, seed=1, on_stage=on_stage,
                on_progress=seen.append)
    rows = {r["name"]: r for r in a.info["progress"]}
    assert set(stages) <= set(rows) and all(rows[n]["state"] == "done" for n in stages)
    P, k = problem.num_params, a.info["k"]
    if exact:
        assert rows["dense_H"]["columns"] == rows["dense_H"]["done_columns"] == P + k + 5
        assert rows["dense_G"]["columns"] == rows["dense_G"]["done_columns"] == P + k
        assert rows["dense_H"]["done_columns"] == a.top.cost.num_matvecs + 5
        assert rows["dense_H"]["done_passes"] == rows["dense_H"]["passes"]  # blocks + 2
    else:
        assert rows["top"]["done_columns"] == a.top.cost.num_matvecs
        assert rows["top"]["done_passes"] == a.top.cost.num_products
        assert rows["density"]["done_passes"] == rows["density"]["passes"] == 40
        assert rows["bottom"]["done_columns"] == a.bottom.cost.num_matvecs
        assert rows["ggn_top"]["done_columns"] == a.ggn_top.cost.num_matvecs
        density = "bulk_density" if a.outliers.count else "density"
        assert rows["density"]["also"] == ["bulk_density"]
        assert rows["density"]["done_columns"] == rows["density"]["columns"] == 4 * 40
        assert rows["residual_density"]["done_columns"] == 4 * 40, density
        # G's stages are planned from G's own timed products, H's and H - G's from H's
        timed = a.info["method_plan"]
        g = timed["ggn_seconds_per_column"]
        assert g and set(g) == set(timed["seconds_per_column"])
        assert stages["ggn_density"]["seconds"] == pytest.approx(estimated_seconds(g, 160, 4))
        for name in ("density", "residual_density"):
            assert stages[name]["seconds"] == pytest.approx(
                estimated_seconds(timed["seconds_per_column"], 160, 4))
    columns = [u.columns for u in seen]
    assert columns == sorted(columns) and columns[-1] == sum(r["done_columns"] for r in rows.values())
    assert seen[-1].eta_s == pytest.approx(0.0) and seen[-1].stages_done == len(stages)
    assert all(u.eta_s is None or u.eta_s >= 0 for u in seen)


def test_the_plan_and_the_progress_in_words():
    lines = plan_lines("iterative", [StagePlan("top", 84, 84, 9.0),
                                     StagePlan("density", 800, 80, 120.0),
                                     StagePlan("classes", None)])
    assert lines[0] == ("plan: iterative path, about 884 product columns in 164 data passes, "
                        "estimated 2 min from timed products")
    assert lines[1:] == ["  top: 84 columns, 84 passes, ~9 s",
                         "  density: 800 columns, 80 passes, ~2 min",
                         "  classes: no curvature products"]
    p = Progress(clock=FakeClock())
    p.begin("plan")
    assert progress_line(p.update()) == "plan: timing products"
    p.end("plan")
    p.set_plan([StagePlan("top", 84, 84, 9.0)])
    p.begin("top")
    assert progress_line(p.update()) == "top 0/84 · 0/84 columns"


def test_a_whole_products_seconds_are_the_first_batchs_scaled_by_the_data():
    tp = tiny_mlp("classification", batch_sizes=(5, 5, 3))
    problem = cs.Problem(tp.model, tp.loss_fn, tp.batches)
    H = cs.HessianOperator(problem)
    for k in (1, 4):
        first = H.measured_seconds_per_column(k)
        assert H.estimated_seconds_per_column(k) == pytest.approx(first * 13 / 5)
    assert cs.HessianOperator(problem, engine="double_backward").estimated_seconds_per_column(1) \
        is None


def test_a_stage_that_needs_more_columns_than_planned_does_not_make_the_run_look_slow():
    """The bottom eigenpairs inside the bulk often take several times their planned columns at
    the planned speed per column: the time left for the other stages stays as planned."""
    clock, seen = FakeClock(), []
    p = Progress(seen.append, clock=clock)
    p.set_plan([StagePlan("bottom", 10, 10, 10.0), StagePlan("density", 10, 1, 10.0)])
    p.begin("bottom")
    for _ in range(30):  # three times the plan, one planned second per column
        clock.t += 1.0
        p.add(1)
    assert seen[-1].eta_s == pytest.approx(10.0)  # bottom may still go on; density is 10 s
    p.end("bottom")
    assert seen[-1].eta_s == pytest.approx(10.0)


def test_the_study_plans_its_checkpoint_sweep_and_test_analysis():
    from curvscope.study import study_stages, with_stages

    plan = {"k": 30, "solve_block": 4, "seconds_per_column": {"1": 0.01, "4": 0.004, "10": 0.002},
            "stages": [StagePlan("top", 140, 35, 0.56).to_dict()], "method": "iterative"}
    sweep, test = study_stages(plan, checkpoints=5, test_share=0.5)
    # min(k, 20) = 20 pairs: 4 x 20 + 20 = 100 columns per checkpoint, in blocks of 4
    assert (sweep.name, sweep.columns, sweep.passes) == ("checkpoint_sweep", 500, 125)
    assert sweep.seconds == pytest.approx(500 * 0.004)
    # the test analysis: noise 2, top 100, bottom (one pair) 50, SLQ 4 x 40; half the data
    assert (test.name, test.columns) == ("test", 2 + 100 + 50 + 160)
    assert test.seconds == pytest.approx(((100 + 50) * 0.01 + 162 * 0.004) * 0.5)
    both = with_stages(plan, [sweep, test])
    assert [s["name"] for s in both["stages"]] == ["top", "checkpoint_sweep", "test"]
    assert both["product_columns"] == 140 + 500 + 312
    assert both["estimated_seconds"] == pytest.approx(0.56 + sweep.seconds + test.seconds)
    assert study_stages(plan, checkpoints=0, test_share=None) == []
