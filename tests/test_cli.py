"""The command line: demo, run, report, compare; one-line errors with exit codes; partial results."""

import json
import pathlib
import re
import textwrap

import pytest
import torch

from curvscope.analysis.formatting import with_error
from curvscope.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main
from curvscope.report import load_bundle

FAST = ["--budget", "small", "--no-progress", "-k", "12"]


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--classes", "4", "--out", str(out), *FAST]) == EXIT_OK
    return out


def test_demo_writes_a_complete_bundle(demo_bundle, capsys):
    names = {p.name for p in demo_bundle.iterdir()}
    assert {"result.json", "arrays.npz", "report.html"} <= names
    # a finished run leaves neither partial results nor resumable stages behind
    assert "partial.json" not in names and "stages" not in names
    assert any(n.endswith(".png") for n in names)
    doc = json.loads((demo_bundle / "result.json").read_text())
    assert doc["schema_version"] >= 1
    prov = doc["provenance"]
    for key in ("torch", "seed"):
        assert key in json.dumps(prov)
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
    doc = json.loads((tmp_path / "compare.json").read_text())
    rows = doc["rows"]
    assert rows["outliers"][0] == rows["outliers"][1]
    assert doc["differences"] == [] and "note:" not in table  # like for like: nothing to say
    # the same figure as the bundle's own report: the trace with its 95 % interval
    tr = load_bundle(demo_bundle).key_numbers.trace
    told = with_error(tr.value, tr.interval_95)
    assert rows["trace"][0] == f"{told} (95%)" + ("" if tr.resolved else ", unresolved")
    assert told in (tmp_path / "compare.html").read_text()
    assert told in " ".join(load_bundle(demo_bundle).summary)


def test_compare_says_when_models_data_or_dtypes_differ(demo_bundle, tmp_path, capsys):
    path = _write(tmp_path, RUN_FILE.format(loss="nn.CrossEntropyLoss()"))
    other = tmp_path / "other"
    assert main(["run", str(path), "--out", str(other), "--dtype", "float32", *FAST]) == EXIT_OK
    capsys.readouterr()
    assert main(["compare", str(demo_bundle), str(other), "--out", str(tmp_path)]) == EXIT_OK
    printed = capsys.readouterr().out
    differences = json.loads((tmp_path / "compare.json").read_text())["differences"]
    assert any(d.startswith("Different models") for d in differences), differences
    assert any(d.startswith("Different data") for d in differences)
    assert any(d.startswith("Different dtypes: torch.float64 vs torch.float32") for d in differences)
    assert printed.splitlines()[0].startswith("note: Different models")
    assert "Different models" in (tmp_path / "compare.html").read_text()


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
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == expected_code
    assert lines, "nothing on stderr"
    # one line for the error; before it, at most one-line notes (warnings) of the run
    notes, err = lines[:-1], lines[-1]
    assert all(re.match(r"^curvscope \w+: note: \w+: ", n) for n in notes), lines
    assert "Traceback" not in "\n".join(lines)
    assert re.search(pattern, err), lines


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
    _one_line_error(capsys, code, EXIT_USAGE, r"MSELoss compares output and target element by element "
                    r"and needs a target of the output's shape \[16, 3\], got target \[16\].*for "
                    "class labels use nn.CrossEntropyLoss")
    path = _write(tmp_path, RUN_FILE.format(loss="'cross_entropy'"))
    code = main(["run", str(path), "--out", str(tmp_path / "o"), *FAST])
    _one_line_error(capsys, code, EXIT_USAGE, r"loss\(\) must return a callable loss")


def test_failure_mid_run_keeps_partial_results(tmp_path, capsys, monkeypatch):
    """A failure after the first stages: exit 1, one line, and partial.json holds what was done."""
    # (--method iterative throughout: the failures are injected into SLQ, which the dense path of
    # a small model never calls)
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
    code = main(["run", str(path), "--out", str(out), *FAST, "--method", "iterative"])
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


# ----------------------------------------------------------------------------- bad input (issue 9)
HELPER_RUN_FILE = """
import sys
from pathlib import Path

import torch
from torch import nn

import curvscope_helper_beside_run_file as helper  # a module beside the run file

HERE = Path(__file__).parent  # __file__ is set, as under `python FILE`

if __name__ == "__main__":
    raise SystemExit("the run file must not run as __main__")

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

def loss():
    return nn.CrossEntropyLoss()

def data():
    import curvscope_helper_imported_late  # imported while the factory runs, after loading
    x, y = helper.make_data(int((HERE / "n.txt").read_text()))
    return [(x[:16], y[:16]), (x[16:], y[16:])]
"""


def test_run_file_is_imported_like_python_file(tmp_path, capsys):
    """Its folder is on sys.path while it loads and while the factories run; __file__ is set."""
    import sys

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "curvscope_helper_beside_run_file.py").write_text(textwrap.dedent("""
        import torch

        def make_data(n):
            g = torch.Generator().manual_seed(1)
            return torch.randn(n, 4, generator=g), torch.arange(n) % 3
    """))
    (folder / "curvscope_helper_imported_late.py").write_text("")
    (folder / "n.txt").write_text("30")
    path = folder / "user_model.py"
    path.write_text(textwrap.dedent(HELPER_RUN_FILE))
    out = tmp_path / "out"
    code = main(["run", str(path), "--out", str(out), *FAST])
    assert code == EXIT_OK, capsys.readouterr().err
    assert load_bundle(out).analysis.info["num_data"] == 30
    assert str(folder) not in sys.path  # restored after the command


def test_failure_before_any_stage_does_not_mention_partial_results(tmp_path, capsys, monkeypatch):

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash before the first stage\nsecond line of detail")

    monkeypatch.setattr("curvscope.study.analyze", crash)
    path = _write(tmp_path, RUN_FILE.format(loss="nn.CrossEntropyLoss()"))
    out = tmp_path / "o"
    out.mkdir()
    (out / "partial.json").write_text("{}")  # an older run's file: not this run's results
    code = main(["run", str(path), "--out", str(out), *FAST])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_FAILED
    assert err == "curvscope run: failed: RuntimeError: simulated crash before the first stage"


def test_failure_after_a_stage_names_the_partial_file(tmp_path, capsys, monkeypatch):
    import curvscope.analysis.spectrum as spectrum

    def failing_slq(*args, **kwargs):
        raise RuntimeError("simulated crash in the density")

    monkeypatch.setattr(spectrum, "slq", failing_slq)
    path = _write(tmp_path, RUN_FILE.format(loss="nn.CrossEntropyLoss()"))
    out = tmp_path / "o"
    code = main(["run", str(path), "--out", str(out), *FAST, "--method", "iterative"])
    _one_line_error(capsys, code, EXIT_FAILED, "^curvscope run: failed: RuntimeError: simulated crash in "
                    f"the density; partial results are kept in {re.escape(str(out / 'partial.json'))}"
                    f", the finished stages in {re.escape(str(out / 'stages'))}: the same command "
                    "continues from them$")
    assert {"top", "bottom"} <= set(json.loads((out / "partial.json").read_text())["stages_done"])


DEEP_TORCH_ERROR = """
import torch
from torch import nn
from torch.autograd.function import once_differentiable


class Square(torch.autograd.Function):  # old-style: no setup_context, so no torch.func
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return Square.apply(self.lin(x))


def model():
    torch.manual_seed(0)
    return Net()


def loss():
    return nn.CrossEntropyLoss()


def data():
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(1))
    y = torch.arange(30) % 3
    return [(x[:16], y[:16]), (x[16:], y[16:])]
"""


def test_an_error_from_deep_inside_torch_is_one_line(tmp_path, capsys):
    """torch's own error from a transform (curvscope may wrap it): exit 1, one line, no traceback."""
    path = _write(tmp_path, DEEP_TORCH_ERROR)
    out = tmp_path / "o"
    code = main(["run", str(path), "--out", str(out), "--budget", "small", "--no-progress", "-k", "3"])
    _one_line_error(capsys, code, EXIT_FAILED,
                    r"^curvscope run: failed: \w+: .*In order to use an autograd.Function "
                    r"with functorch transforms .*; partial results are kept in "
                    f"{re.escape(str(out / 'partial.json'))}, the finished stages in "
                    f"{re.escape(str(out / 'stages'))}: the same command continues from them$")


def test_interrupt_names_the_partial_file_only_when_written(tmp_path, capsys, monkeypatch):
    import curvscope.analysis.spectrum as spectrum

    path = _write(tmp_path, RUN_FILE.format(loss="nn.CrossEntropyLoss()"))

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("curvscope.study.analyze", interrupt)
    code = main(["run", str(path), "--out", str(tmp_path / "a"), *FAST])
    assert code == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "curvscope run: interrupted"
    monkeypatch.undo()
    monkeypatch.setattr(spectrum, "slq", interrupt)  # after the top and bottom stages
    code = main(["run", str(path), "--out", str(tmp_path / "b"), *FAST, "--method", "iterative"])
    assert code == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == (
        f"curvscope run: interrupted; partial results are in {tmp_path / 'b' / 'partial.json'}, "
        f"the finished stages in {tmp_path / 'b' / 'stages'}: the same command continues from them")


@pytest.mark.parametrize("k", ["0", "-3"])
@pytest.mark.parametrize("command", ["demo", "run"])
def test_non_positive_k_is_bad_usage(tmp_path, capsys, command, k):
    path = _write(tmp_path, RUN_FILE.format(loss="nn.CrossEntropyLoss()"))
    target = [] if command == "demo" else [str(path)]
    code = main([command, *target, "--out", str(tmp_path / "o"), "--no-progress", "-k", k])
    _one_line_error(capsys, code, EXIT_USAGE,
                    rf"^curvscope {command}: error: -k must be at least 1 \(the number of top "
                    rf"eigenpairs\), got {k}; omit it for the default \(2C \+ 10 for C classes\)\.$")
    assert not (tmp_path / "o").exists()  # refused before any work


def test_model_on_the_meta_device_is_bad_usage(tmp_path, capsys):
    body = RUN_FILE.format(loss="nn.CrossEntropyLoss()").replace(
        "nn.Linear(8, 3))", "nn.Linear(8, 3)).to('meta')")
    path = _write(tmp_path, body)
    code = main(["run", str(path), "--out", str(tmp_path / "o"), *FAST])
    _one_line_error(capsys, code, EXIT_USAGE,
                    r"^curvscope run: error: the model's tensors \['0.weight', '0.bias', '2.weight', "
                    r"'2.bias'\] are on the meta device \(shapes only, no values\).*"
                    r"model.to_empty\(device='cpu'\)")


def _shape(sentence: str) -> str:
    """A README sample sentence as a pattern: every number a wildcard, '...' anything."""
    number = r"-?\d[\d,]*(?:\.\d+)?(?:e[-+]\d+)?"
    parts = re.split(number, sentence.replace("...", "\0"))
    pattern = number.join(re.escape(p) for p in parts)
    return pattern.replace(re.escape("\0"), ".*")


def test_readme_sample_is_what_the_demo_says(demo_bundle):
    """The README's sample summary is the demo's summary sentence for sentence, numbers aside."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    sample = re.search(r"```\nplan: .*?\ngaussian_mixture\(C=10\).*?```", readme,
                       flags=re.S).group(0)
    told = [line[4:] for line in sample.splitlines() if line.startswith("  - ")]
    # the plan printed before the products: every stage the analysis ran, in its words
    planned = re.findall(r"^  (\w+): [\d,]+ columns, [\d,]+ passes, ~\d+ s$", sample, flags=re.M)
    ran = [r["name"] for r in load_bundle(demo_bundle).analysis.info["progress"]
           if r["state"] != "unplanned"]
    assert planned[:len(ran)] == ran and planned[len(ran):] == ["checkpoint_sweep", "test"]
    analysis_lines = [t for t in told if not re.match(r"(checkpoints|mask overlap|test): ", t)]
    summary = load_bundle(demo_bundle).summary
    assert len(analysis_lines) == len(summary)
    for line, said in zip(analysis_lines, summary):
        assert re.fullmatch(_shape(line), said), (line, said)
