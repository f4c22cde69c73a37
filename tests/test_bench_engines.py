"""A CI-sized run of benchmarks/bench_engines.py (``--size tiny``: the Gaussian mixture in float64
and the BatchNorm CNN in float32, k = 1 and 4): every kernel is timed, the kernels agree with the
double-backward loop, and auto's recorded choice is one of the kernels."""

from __future__ import annotations

import json

import pytest

import curvscope as cs
from conftest import load_benchmark, run_benchmark

bench = load_benchmark("bench_engines")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "engines.json"
    rc = run_benchmark(bench, ["--size", "tiny", "--out", str(out)])
    data = json.loads(out.read_text())
    data["rc"] = rc
    return data


def _timed_rows(result):
    return [r for r in result["rows"] if "seconds_per_column" in r]


def test_every_kernel_and_auto_has_a_row_per_model_and_k(result):
    assert result["args"]["columns"] == [1, 4]
    models = {r["key"] for r in result["rows"]}
    assert models == {"gmm", "cnn_bn"}
    cells = {(r["key"], r["kernel"], r["k"]) for r in _timed_rows(result)}
    for key in models:
        for k in (1, 4):
            for kernel in (*cs.HESSIAN_KERNELS, "auto"):
                if kernel == "double_backward_batched" and k == 1:
                    continue  # one batched column is the loop
                assert (key, kernel, k) in cells, (key, kernel, k)


def test_float64_kernels_agree_with_the_loop_and_nothing_failed(result):
    rows = [r for r in _timed_rows(result) if r["kernel"] != "curvlinops"]
    f64 = [r for r in rows if r["dtype"] == "float64"]
    assert f64, "the tiny run has a float64 model"
    for r in f64:
        assert r["rel_diff_to_loop"] <= 1e-12, r
    for r in rows:
        assert r["rel_diff_to_loop"] <= bench.TOL[r["dtype"]], r
        assert r["status"] == "ok", r
    assert result["rc"] == 0


def test_times_are_positive_and_in_gradients(result):
    for r in _timed_rows(result):
        assert r["gradient_seconds"] > 0
        assert r["seconds_per_column"] > 0, r
        assert r["gradients_per_column"] == pytest.approx(r["seconds_per_column"]
                                                          / r["gradient_seconds"])
        assert r["bound_gradients_per_column"] == pytest.approx(1 / r["k"])
        assert len(r["times"]) == result["args"]["repeats"]


def test_auto_records_one_of_the_kernels_and_the_summary_covers_every_cell(result):
    autos = [r for r in _timed_rows(result) if r["kernel"] == "auto"]
    assert len(autos) == 4
    for r in autos:
        assert r["chosen"] in cs.HESSIAN_KERNELS, r
        assert isinstance(r["trial"], dict) and r["chosen"] in r["trial"], r
        assert r["first_product_overhead_seconds"] == pytest.approx(
            r["auto_first_product_seconds"] - r["seconds_per_column"] * r["k"])
    assert {(s["key"], s["k"]) for s in result["summary"]} == {(r["key"], r["k"]) for r in autos}
    assert all(s["fastest"] in cs.HESSIAN_KERNELS for s in result["summary"])
    assert result["machine"]["torch"]


def test_a_wrong_kernel_is_marked_fail(monkeypatch, tmp_path):
    """The correctness check can fail: a forward-over-reverse kernel off by 1e-9 fails float64."""
    from curvscope.curvature._operators import HessianOperator

    real = HessianOperator._forward_over_reverse_or_fallback

    def perturbed(self, ctx, V):
        return {n: t * (1 + 1e-9) for n, t in real(self, ctx, V).items()}

    monkeypatch.setattr(HessianOperator, "_forward_over_reverse_or_fallback", perturbed)
    out = tmp_path / "engines.json"
    rc = run_benchmark(bench, ["--models", "gmm", "--columns", "1", "--repeats", "1",
                               "--no-curvlinops", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    (bad,) = [r for r in rows if r["kernel"] == "forward_over_reverse"]
    assert bad["status"] == "FAIL" and bad["rel_diff_to_loop"] > 1e-12
    assert rc == 1


def test_a_model_that_cannot_be_built_is_a_skipped_row(monkeypatch, tmp_path):
    def broken():
        raise ImportError("no module named 'nothing'")

    monkeypatch.setitem(bench.BUILDERS, "gmm", broken)
    out = tmp_path / "engines.json"
    assert run_benchmark(bench, ["--models", "gmm", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "skipped" and "nothing" in row["reason"]
