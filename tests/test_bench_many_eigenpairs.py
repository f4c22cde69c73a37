"""CI-sized run of benchmarks/bench_many_eigenpairs.py: the script works end to end and what it
reports is consistent (counts, an independent eigsh check, the JSON it writes)."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark, run_benchmark
from curvscope import zoo


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_many_eigenpairs")


@pytest.mark.parametrize("storage", ["host", "disk"])
def test_tiny_run_is_consistent(bench, tmp_path, storage, capsys):
    out = tmp_path / "many.json"
    row = run_benchmark(bench, ["--preset", "tiny", "--k", "12", "--oversample", "8",
                                "--power-iters", "4", "--check-top", "3", "--images", "32",
                                "--storage", storage, "--out", str(out)])
    saved = json.loads(out.read_text())["row"]
    assert saved["params"] == row["params"] == sum(
        p.numel() for p in zoo.resnet18(10, width=4).parameters())
    assert saved["sketch_products"] == (4 + 2) * (12 + 8) + 10  # (q + 2)(k + p) + test vectors
    assert saved["storage"] == storage and len(saved["top_eigenvalues"]) == 10
    # the sketch's largest three agree with eigsh's certified ones
    assert saved["eigsh_top_converged"] == 3
    assert saved["top_check_max_rel_diff"] < 1e-2
    assert 0 < saved["aposteriori_error_rel"] < 1.5
    assert saved["residual_rel_all"]["median"] <= saved["residual_rel_all"]["max"]
    assert not saved["target"]["applies"]
    printed = capsys.readouterr().out
    assert "a-posteriori" in printed and "n/a at this size" in printed
