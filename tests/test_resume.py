"""Resumable runs: SIGKILL mid-way, start again, same result bitwise; bad checkpoints refused."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import curvscope as cs
from curvscope._checkpoint import Checkpointer

WORKER = Path(__file__).with_name("_resume_worker.py")
sys.path.insert(0, str(WORKER.parent))
from _resume_worker import run  # noqa: E402


def _kill_mid_run(kind, ckpt, out, delay=0.15):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(WORKER), kind, str(ckpt), str(out), str(delay)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(2 * delay)  # a little past the first checkpoint
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()


def _saved_engine_choices(path):
    """The ``engine="auto"`` choices stored in a checkpoint file (read without a fingerprint)."""
    from curvscope._checkpoint import ENGINE_KEY, MAGIC

    raw = path.read_bytes()
    size = int.from_bytes(raw[len(MAGIC) : len(MAGIC) + 8], "little")
    payload = raw[len(MAGIC) + 8 + size :]
    return torch.load(io.BytesIO(payload), weights_only=True)[ENGINE_KEY]


@pytest.mark.parametrize("kind", ["slq", "eigsh"])
def test_sigkill_then_resume_gives_the_uninterrupted_result_bitwise(kind, tmp_path):
    ckpt, out = tmp_path / f"{kind}.ckpt", tmp_path / "out.pt"
    _kill_mid_run(kind, ckpt, out)
    saved = Checkpointer(ckpt, 1, {}).path
    assert saved.exists()
    # the killed run's kernel choices (its trials' timings included) are in its checkpoint; the
    # uninterrupted run it is compared with takes the same ones (a fresh trial may pick another
    # kernel where two cost the same, which changes the last bits)
    choices = _saved_engine_choices(saved)
    assert choices and all(rec["engine"] in cs.HESSIAN_KERNELS for rec in choices.values())
    reference = run(kind, None, engine_choices=choices)
    # the same command again: resumes from the checkpoint and finishes
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(WORKER), kind, str(ckpt), str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = torch.load(out)
    assert resumed["engines"] == choices  # restored, not timed again
    for key, value in reference.items():
        if key != "engines":
            assert torch.equal(resumed[key], value), key


def test_resumed_run_skips_the_work_already_done(tmp_path):
    tp = cs.testing.tiny_mlp("classification")
    H = cs.HessianOperator(cs.Problem(tp.model, tp.loss_fn, tp.batches))
    ckpt = tmp_path / "l.ckpt"
    full = cs.lanczos(H, 20, num_probes=2, generator=torch.Generator().manual_seed(1),
                      checkpoint=ckpt, checkpoint_every=5)
    assert full.cost.num_matvecs == 40
    # the final state is saved too: running again costs no product and gives the same numbers
    before = H.num_matvecs
    again = cs.lanczos(H, 20, num_probes=2, generator=torch.Generator().manual_seed(1),
                       checkpoint=ckpt, checkpoint_every=5)
    assert H.num_matvecs == before
    assert torch.equal(again.alpha, full.alpha) and torch.equal(again.beta, full.beta)


def test_corrupted_checkpoint_is_detected(tmp_path):
    tp = cs.testing.tiny_mlp("classification")
    H = cs.HessianOperator(cs.Problem(tp.model, tp.loss_fn, tp.batches))
    ckpt = tmp_path / "c.ckpt"
    cs.slq(H, 2, 10, generator=torch.Generator().manual_seed(0), checkpoint=ckpt)
    raw = bytearray(ckpt.read_bytes())
    raw[-10] ^= 0xFF  # flip bits in the payload
    ckpt.write_bytes(bytes(raw))
    with pytest.raises(cs.CheckpointCorruptedError, match="checksum mismatch"):
        cs.slq(H, 2, 10, generator=torch.Generator().manual_seed(0), checkpoint=ckpt)
    ckpt.write_bytes(b"garbage")
    with pytest.raises(cs.CheckpointCorruptedError, match="not a curvscope checkpoint"):
        cs.slq(H, 2, 10, generator=torch.Generator().manual_seed(0), checkpoint=ckpt)
    ckpt.write_bytes(bytes(raw[:40]))  # truncated inside the header
    with pytest.raises(cs.CheckpointCorruptedError):
        cs.slq(H, 2, 10, generator=torch.Generator().manual_seed(0), checkpoint=ckpt)


@pytest.mark.parametrize("change", ["num_iters", "seed", "probes", "algorithm"])
def test_mismatched_checkpoint_is_refused(tmp_path, change):
    tp = cs.testing.tiny_mlp("classification")
    H = cs.HessianOperator(cs.Problem(tp.model, tp.loss_fn, tp.batches))
    ckpt = tmp_path / "m.ckpt"
    cs.slq(H, 2, 10, generator=torch.Generator().manual_seed(0), checkpoint=ckpt)
    args = {"num_probes": 2, "num_iters": 10, "seed": 0}
    if change == "algorithm":
        with pytest.raises(cs.CheckpointMismatchError, match="belongs to another run"):
            cs.eigsh(H, 3, generator=torch.Generator().manual_seed(0), checkpoint=ckpt)
        return
    args[change if change != "probes" else "num_probes"] += 1
    with pytest.raises(cs.CheckpointMismatchError, match="belongs to another run"):
        cs.slq(H, args["num_probes"], args["num_iters"],
               generator=torch.Generator().manual_seed(args["seed"]), checkpoint=ckpt)


def test_checkpoint_writes_are_atomic(tmp_path):
    tp = cs.testing.tiny_mlp("classification")
    H = cs.HessianOperator(cs.Problem(tp.model, tp.loss_fn, tp.batches))
    cs.slq(H, 2, 12, generator=torch.Generator().manual_seed(0), checkpoint=tmp_path / "a.ckpt",
           checkpoint_every=2)
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]  # no temporary files left
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
        Checkpointer(tmp_path / "b.ckpt", 0, {})


class _InterruptError(Exception):
    pass


@pytest.mark.parametrize("kind, product", [
    ("sketch", 4), ("sketch", 11), ("sketch-host", 11), ("sketch-disk", 16),
    ("class_structure", None)])
def test_sketch_and_class_structure_resume(kind, product, tmp_path, monkeypatch):
    """Interrupted inside product ``product`` (an exception stands in for SIGKILL), then
    resumed. The sketch has 4 products a stage (15 columns in blocks of 4): product 4 is in the
    first stage, 11 in the third (after two orthonormalisations), 16 in the last (``A Q``)."""
    from _resume_worker import run_more
    from curvscope.curvature import _operators

    reference = run_more(kind, None)
    ckpt = tmp_path / f"{kind}.ckpt"
    calls = {"n": 0}
    real = _operators.CurvatureOperator._accumulate

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if product and calls["n"] == 5 * (product - 1) + 2:  # 5 batches a product
            raise _InterruptError
        return real(self, *args, **kwargs)

    if kind == "class_structure":
        mod = sys.modules["curvscope.analysis.class_structure"]

        real_cot = mod._cotangents
        seen = {"n": 0}

        def flaky_cot(*args, **kwargs):
            seen["n"] += 1
            if seen["n"] == 3:
                raise _InterruptError
            return real_cot(*args, **kwargs)

        monkeypatch.setattr(mod, "_cotangents", flaky_cot)
    else:
        monkeypatch.setattr(_operators.CurvatureOperator, "_accumulate", flaky)
    # the reference's kernels replayed (a fresh engine="auto" trial may pick another kernel
    # where two cost the same, which changes the last bits)
    pinned = reference.pop("engines", None)
    with pytest.raises(_InterruptError):
        run_more(kind, ckpt, engine_choices=pinned)
    assert ckpt.exists()
    monkeypatch.undo()
    resumed = run_more(kind, ckpt, engine_choices=pinned)
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key
