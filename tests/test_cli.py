"""The command line: demo, run, report, compare; one-line errors with exit codes; partial results."""

import json
import re
import textwrap

import pytest
import torch

from curvscope.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from curvscope.report import load_bundle

FAST = ["--budget", "small", "--no-progress", "-k", "12"]


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--classes", "4", "--out", str(out), *FAST]) == EXIT_OK
    return out


def test_demo_writes_a_complete_bundle(demo_bundle, capsys):
    names = {p.name for p in demo_bundle.iterdir()}
    assert {"result.json", "arrays.npz", "report.html", "partial.json"} <= names
    assert any(n.endswith(".png") for n in names)
    doc = json.loads((demo_bundle / "result.json").read_text())
    assert doc["schema_version"] >= 1
    prov = doc["provenance"]
    for key in ("torch", "seed"):
        assert key in json.dumps(prov)
    partial = json.loads((demo_bundle / "partial.json").read_text())
    assert {"top", "density", "bundle"} <= set(partial["stages_done"])
    bundle = load_bundle(demo_bundle)
    a = bundle.analysis
    # 4 classes: C or C - 1 outliers (softmax), carried by G
    assert a.outliers.count in (3, 4, 5)
    assert a.overlap_hessian_ggn > 0.9
    assert {"checkpoints", "mask_overlap", "test"} <= set(bundle.extras)


def test_report_redraws_from_the_bundle_without_the_model(demo_bundle, tmp_path, capsys):
    out = tmp_path / "redrawn"
    assert main(["report", str(demo_bundle), "--out", str(out)]) == EXIT_OK
    original = load_bundle(demo_bundle).analysis
    redrawn = load_bundle(out).analysis
    assert torch.equal(original.top.eigenvalues, redrawn.top.eigenvalues)
    assert torch.equal(original.density.nodes, redrawn.density.nodes)
    assert (out / "report.html").stat().st_size > 10_000


def test_compare_two_bundles(demo_bundle, tmp_path, capsys):
    assert main(["compare", str(demo_bundle), str(demo_bundle), "--out", str(tmp_path)]) == EXIT_OK
    table = capsys.readouterr().out
    assert "outliers" in table and "trace" in table
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert rows["outliers"][0] == rows["outliers"][1]


RUN_FILE = """
import torch
from torch import nn

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

def loss():
    return {loss}

def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=g)
    y = torch.arange(30) % 3
    return [(x[:16], y[:16]), (x[16:], y[16:])]
"""


def _write(tmp_path, body):
    path = tmp_path / "user_model.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_run_a_user_file(tmp_path, capsys):
    path = _write(tmp_path, RUN_FILE.format(loss="nn.CrossEntropyLoss()"))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--dtype", "float64", *FAST]) == EXIT_OK
    assert load_bundle(out).analysis.info["num_params"] == 4 * 8 + 8 + 8 * 3 + 3


def test_run_the_shipped_example(tmp_path, capsys):
    out = tmp_path / "cnn"
    code = main(["run", "examples/small_cnn.py", "--out", str(out), *FAST])
    assert code == EXIT_OK
    assert "test" in load_bundle(out).extras


def _one_line_error(capsys, code, expected_code, pattern):
    err = capsys.readouterr().err.strip()
    assert code == expected_code
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert re.search(pattern, err), err


def test_missing_run_file(tmp_path, capsys):
    code = main(["run", str(tmp_path / "nope.py"), "--out", str(tmp_path / "o"), *FAST])
    _one_line_error(capsys, code, EXIT_USAGE, "not found; expected a Python file defining")


def test_factory_that_raises(tmp_path, capsys):
    path = _write(tmp_path, RUN_FILE.format(loss="nn.CrossEntropyLoss()").replace(
        "torch.manual_seed(0)", "raise RuntimeError('no weights here')"))
    code = main(["run", str(path), "--out", str(tmp_path / "o"), *FAST])
    _one_line_error(capsys, code, EXIT_USAGE, r"model\(\) raised RuntimeError: no weights here")


def test_file_without_factories(tmp_path, capsys):
    path = _write(tmp_path, "x = 1\n")
    code = main(["run", str(path), "--out", str(tmp_path / "o"), *FAST])
    _one_line_error(capsys, code, EXIT_USAGE, r"must define model\(\), loss\(\), data\(\)")


def test_wrong_loss_type(tmp_path, capsys):
    path = _write(tmp_path, RUN_FILE.format(loss="nn.MSELoss()"))
    code = main(["run", str(path), "--out", str(tmp_path / "o"), *FAST])
    _one_line_error(capsys, code, EXIT_USAGE, "the loss failed on the first batch")
    path = _write(tmp_path, RUN_FILE.format(loss="'cross_entropy'"))
    code = main(["run", str(path), "--out", str(tmp_path / "o"), *FAST])
    _one_line_error(capsys, code, EXIT_USAGE, r"loss\(\) must return a callable loss")


def test_failure_mid_run_keeps_partial_results(tmp_path, capsys, monkeypatch):
    """A failure after the first stages: exit 1, one line, and partial.json holds what was done."""
    import curvscope.analysis.spectrum as spectrum

    real_slq = spectrum.slq
    calls = {"n": 0}

    def failing_slq(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash in the second density")
        return real_slq(*args, **kwargs)

    monkeypatch.setattr(spectrum, "slq", failing_slq)
    path = _write(tmp_path, RUN_FILE.format(loss="nn.CrossEntropyLoss()"))
    out = tmp_path / "o"
    code = main(["run", str(path), "--out", str(out), *FAST])
    _one_line_error(capsys, code, EXIT_FAILED, "simulated crash")
    partial = json.loads((out / "partial.json").read_text())
    assert {"top", "bottom", "density"} <= set(partial["stages_done"])
    assert len(partial["top"]["eigenvalues"]) == 12


def test_bad_bundle_for_report_and_compare(tmp_path, capsys):
    code = main(["report", str(tmp_path / "missing")])
    _one_line_error(capsys, code, EXIT_USAGE, "missing|not found|No such")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "result.json").write_text("{not json")
    code = main(["compare", str(tmp_path / "broken"), str(tmp_path / "broken")])
    _one_line_error(capsys, code, EXIT_USAGE, ".")


def test_bad_device_and_classes(tmp_path, capsys):
    code = main(["demo", "--classes", "1", "--out", str(tmp_path), *FAST])
    _one_line_error(capsys, code, EXIT_USAGE, "--classes must be at least 2")
    if not torch.cuda.is_available():
        path = _write(tmp_path, RUN_FILE.format(loss="nn.CrossEntropyLoss()"))
        code = main(["run", str(path), "--device", "cuda", "--out", str(tmp_path / "o"), *FAST])
        _one_line_error(capsys, code, EXIT_USAGE, "torch sees no GPU")
