"""`curvscope run --out DIR` killed (SIGKILL) at any point and started again: it continues from
the finished stages and the in-stage checkpoints, says so, and ends with the bundle an
uninterrupted run writes (bitwise, CPU, float64); a changed run file is refused with the fix.

The run file is user code: its loss counts its own calls and SIGKILLs the process at the call
named by ``KILL_AT`` (no hook in curvscope). Its kernels are pinned from a first run's choices
(``Problem(engine_choices=...)``) so that two uninterrupted runs are bitwise equal too.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

RUN_FILE = """
import atexit, json, os, signal
import torch
from torch import nn

CALLS = [0]
KILL_AT = int(os.environ.get("KILL_AT", "0"))


def _report():
    if os.environ.get("COUNT_FILE"):
        with open(os.environ["COUNT_FILE"], "w") as f:
            f.write(str(CALLS[0]))


atexit.register(_report)


class CountingCE(nn.CrossEntropyLoss):
    def forward(self, output, target):
        CALLS[0] += 1
        if CALLS[0] == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(output, target)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def loss():
    return CountingCE()


def _split(seed, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.arange(n) % 3
    return [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]


def data():
    return _split(1, 36)


def test_data():
    return _split(2, 24)


def checkpoints():
    m = model()
    return [(0, {k: v * 0.5 for k, v in m.state_dict().items()}), (10, m.state_dict())]


def problem_options():
    pin = os.environ.get("PIN")
    return {"engine_choices": json.load(open(pin))} if pin else {}
"""

ARGS = ["--budget", "small", "--no-progress", "-k", "6", "--threads", "1", "--seed", "3"]


def _curvscope(path, out, *extra, env=None):
    cmd = [sys.executable, "-m", "curvscope", "run", str(path), "--out", str(out), *ARGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONHASHSEED": "0", **(env or {})})


def _engines(doc):
    """Every kernel choice recorded in a bundle's result.json."""
    found = {}

    def walk(obj):
        if isinstance(obj, dict):
            if isinstance(obj.get("engines"), dict):
                found.update(obj["engines"])
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(doc)
    return found


def _arrays(out):
    with np.load(out / "arrays.npz") as z:
        return {k: z[k].copy() for k in z.files}


def _numbers(out):
    """result.json without the wall times, costs' timings and provenance (they differ), and
    without the plan-vs-done progress rows (what this process computed: a resumed run read some
    stages back)."""
    doc = json.loads((out / "result.json").read_text())

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items()
                    if k not in ("provenance", "wall_time", "engines", "seconds_per_column",
                                 "method_plan", "method_reason", "wall_time_total",
                                 "progress")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip(doc)


@pytest.fixture(scope="module")
def pinned(tmp_path_factory):
    """The run file, its kernels pinned, and an uninterrupted run (and its loss-call count)."""
    root = tmp_path_factory.mktemp("resume")
    path = root / "user_run.py"
    path.write_text(textwrap.dedent(RUN_FILE))
    first = _curvscope(path, root / "first", "--method", "iterative")
    assert first.returncode == 0, first.stderr
    pin = root / "pin.json"
    pin.write_text(json.dumps(_engines(json.loads((root / "first" / "result.json").read_text()))))
    count = root / "count.txt"
    ref = _curvscope(path, root / "ref", "--method", "iterative",
                     env={"PIN": str(pin), "COUNT_FILE": str(count)})
    assert ref.returncode == 0, ref.stderr
    return path, pin, root / "ref", int(count.read_text())


def _kill_and_resume(pinned, tmp_path, fractions):
    """Kill the run after each fraction of its loss calls, resume it, compare with the
    uninterrupted run bitwise; returns the sets of stages done at the kills."""
    path, pin, ref, calls = pinned
    stages_seen = set()
    for i, frac in enumerate(fractions):
        out = tmp_path / f"killed{i}"
        killed = _curvscope(path, out, "--method", "iterative",
                            env={"PIN": str(pin), "KILL_AT": str(max(1, int(frac * calls)))})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert not (out / "result.json").exists()
        partial = out / "partial.json"
        stages_seen.add(tuple(json.loads(partial.read_text())["stages_done"])
                        if partial.exists() else ())
        finished_before = sorted(p.name for p in (out / "stages").rglob("*.stage"))
        again = _curvscope(path, out, "--method", "iterative", env={"PIN": str(pin)})
        assert again.returncode == 0, again.stderr
        if len(finished_before) > 1:  # more than the run's fingerprint: it says it resumed
            assert "resumed:" in again.stdout, again.stdout
        # the same bundle as the uninterrupted run, bitwise
        a, b = _arrays(ref), _arrays(out)
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key]), key
        assert _numbers(ref) == _numbers(out)
        # a finished run leaves no stages and no partial results behind
        assert not (out / "stages").exists() and not (out / "partial.json").exists()
    return stages_seen


def test_sigkill_early_midway_and_late_then_resume_equals_an_uninterrupted_run(pinned, tmp_path):
    stages_seen = _kill_and_resume(pinned, tmp_path, (0.05, 0.5, 0.98))
    # before the first stage finished, inside the run, and in the last stage
    assert len(stages_seen) == 3, stages_seen


@pytest.mark.slow
def test_sigkill_at_each_stage_then_resume_equals_an_uninterrupted_run(pinned, tmp_path):
    stages_seen = _kill_and_resume(pinned, tmp_path, (0.05, 0.25, 0.5, 0.7, 0.9, 0.98))
    # the kills fell into different stages (before the first one, inside, and late)
    assert len(stages_seen) >= 4, stages_seen


def test_exact_path_resumes_after_sigkill(pinned, tmp_path):
    path, pin, _, _ = pinned
    ref = _curvscope(path, tmp_path / "ref", "--method", "exact", env={"PIN": str(pin)})
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    # the dense H takes P / 64 + 1 data passes of 2 batches; kill inside the dense G
    killed = _curvscope(path, out, "--method", "exact", env={"PIN": str(pin), "KILL_AT": "9"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    again = _curvscope(path, out, "--method", "exact", env={"PIN": str(pin)})
    assert again.returncode == 0, again.stderr
    a, b = _arrays(tmp_path / "ref"), _arrays(out)
    assert all(np.array_equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_a_changed_run_file_is_refused_with_the_fix(pinned, tmp_path):
    path, pin, _, calls = pinned
    out = tmp_path / "o"
    killed = _curvscope(path, out, "--method", "iterative",
                        env={"PIN": str(pin), "KILL_AT": str(calls // 2)})
    assert killed.returncode == -signal.SIGKILL
    changed = tmp_path / "user_run.py"
    changed.write_text(path.read_text().replace("manual_seed(0)", "manual_seed(5)"))
    # the folder's stages belong to the other run file's run: refused, with the fix
    refused = _curvscope(changed, out, "--method", "iterative", env={"PIN": str(pin)})
    assert refused.returncode == 2, refused.stderr
    err = refused.stderr.strip().splitlines()[-1]
    assert "holds the stages of another run" in err and "--fresh" in err, err
    assert "Traceback" not in refused.stderr
    fresh = _curvscope(changed, out, "--method", "iterative", "--fresh", env={"PIN": str(pin)})
    assert fresh.returncode == 0, fresh.stderr
    assert "resumed:" not in fresh.stdout
