"""torchrun --nproc_per_node=2 (gloo, CPU) gives the same results as one process."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import curvscope as cs
from curvscope.testing import tiny_mlp

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_distributed_worker.py")
RTOL = 1e-10


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out, mode="ok", timeout=120):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(out), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return proc, time.perf_counter() - start


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc, _ = _torchrun(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def one_process():
    sys.path.insert(0, str(WORKER.parent))
    from _distributed_worker import compute

    tp = tiny_mlp("classification", batch_sizes=(5, 5, 3, 4, 2))
    torch.set_num_threads(1)
    return compute(cs.Problem(tp.model, tp.loss_fn, tp.batches))


def _rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("key", ["HV", "GV", "covV", "top", "loss", "grad", "gram", "nodes",
                                 "weights", "sharded_alpha", "sharded_beta", "sketch_values",
                                 "sketch_residuals", "sketch_error"])
def test_two_ranks_equal_one_process(two_ranks, one_process, key):
    assert two_ranks[0]["num_data"] == one_process["num_data"] == 19
    assert _rel(two_ranks[0][key], one_process[key]) < RTOL


@pytest.mark.parametrize("key", ["HV", "top", "nodes", "weights", "sharded_alpha",
                                 "sketch_values", "sketch_error"])
def test_krylov_scalars_agree_on_every_rank(two_ranks, key):
    assert torch.equal(two_ranks[0][key], two_ranks[1][key])


def test_sharded_sketch_keeps_no_whole_eigenvectors(two_ranks, one_process):
    """Sharded across ranks no rank holds the eigenvectors; in one process it is the device."""
    assert not two_ranks[0]["sketch_vectors_kept"] and not two_ranks[1]["sketch_vectors_kept"]
    assert one_process["sketch_vectors_kept"]


def test_a_failing_rank_is_a_clear_error_not_a_hang(tmp_path):
    proc, seconds = _torchrun(tmp_path, "fail")
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stderr
    assert seconds < 90


def test_a_hanging_rank_times_out_with_a_clear_error(tmp_path):
    proc, seconds = _torchrun(tmp_path, "hang", timeout=150)
    assert proc.returncode != 0
    assert "another rank probably failed or hangs" in proc.stderr
    assert seconds < 100


def test_single_process_helpers_are_no_ops():
    from curvscope import distributed

    assert distributed.world() == (0, 1) and not distributed.is_active()
    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.ones(3))
    with pytest.raises(RuntimeError, match="torchrun"):
        if "RANK" not in os.environ:
            distributed.init_from_env()
    tp = tiny_mlp()
    with pytest.raises(ValueError, match="shard must be one of"):
        cs.Problem(tp.model, tp.loss_fn, tp.batches, shard="bogus")
