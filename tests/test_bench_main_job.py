"""CI-sized run of benchmarks/bench_main_job.py: the smallest size takes the exact path, the
demo's size is recorded with its plan, and what the row reports is consistent (data passes read
from the Problem, stage times adding up to the analysis). Timings are only checked to be
positive: benchmarks are not timed tests."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark, run_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_main_job")


def test_sizes_are_the_parameter_counts_they_name(bench):
    for name, (d, h) in bench.SIZES.items():
        if name != "demo":
            assert 0.7 < bench._num_params(d, h) / float(name) < 1.5, name
    assert bench._num_params(*bench.SIZES["demo"]) == 4270  # what `curvscope demo` analyses


def test_smallest_size_row(bench, tmp_path):
    result = run_benchmark(bench, ["--sizes", "1e2", "--budget", "small", "--no-isolate",
                                   "--out", str(tmp_path)])
    (row,) = result["rows"]
    problem, _ = bench.make_problem("1e2", bench.torch.float64)
    assert row["num_params"] == problem.num_params == bench._num_params(*bench.SIZES["1e2"])
    assert row["method"] == "exact"  # 114 parameters: dense matrices and eigh are cheaper
    assert row["gradient_s"] > 0 and row["analysis_s"] > 0 and row["planned_s"] > 0
    assert row["analysis_xg"] == pytest.approx(row["analysis_s"] / row["gradient_s"])
    # the stages are timed in sequence: together no longer than the whole analysis
    assert "plan" in row["stages_s"] and sum(row["stages_s"].values()) <= row["analysis_s"] * 1.01
    # the exact path multiplies identity blocks: at least P columns for H (and P for G)
    assert row["product_columns"] >= row["num_params"] and row["data_passes"] >= 1
    # the plan the run stated, every stage: the exact path's dense columns are known exactly
    # (P + k + 5 for H and P + k for G), the class stage adds eigsh for C = 10 pairs
    k = 2 * 10 + 10
    P = row["num_params"]
    assert row["planned_columns"] == 2 * P + 2 * k + 5 + 4 * 10 + 20
    assert row["counted_columns"] >= 2 * P + 2 * k + 5 and row["planned_passes"] > 0
    assert row["eta_at_quarter_s"] is not None and row["eta_at_quarter_s"] >= 0
    assert 0 <= row["left_at_quarter_s"] <= row["analysis_s"]
    saved = json.loads((tmp_path / "bench_main_job_cpu.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))


def test_a_row_that_runs_out_of_time_is_recorded_not_raised(bench, tmp_path):
    result = run_benchmark(bench, ["--sizes", "1e2", "--timeout", "0.01", "--out", str(tmp_path)])
    (row,) = result["rows"]
    assert row["error"].startswith("timed out") and row["num_params"] == 114
