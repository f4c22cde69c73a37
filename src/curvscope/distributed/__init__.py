"""Data-parallel curvature on ``torch.distributed`` (torchrun; NCCL on GPUs, gloo on CPUs).

Every rank runs the same algorithm on the same vectors; a curvature product sums its rank's
batches and all-reduces the result, so each rank holds the same ``A @ V`` and the Krylov scalars
agree everywhere (the probes come from the same seeded generator on every rank). The data are
sharded round-robin by batch index (``shard="round_robin"``: every rank is given the same batches
and keeps batches ``rank, rank + W, ...``) or are already rank-local (``shard="local"``).

A rank that fails or hangs makes the others fail with :class:`DistributedTimeoutError` after the
process group's timeout instead of hanging (set it with ``init_process_group(timeout=...)`` or
:func:`init_from_env`).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import Tensor

SHARDING = ("round_robin", "local")


class DistributedTimeoutError(RuntimeError):
    """A collective did not complete: another rank failed or hangs."""


def is_active() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    if not is_active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over the ranks in place (no-op in one process); a failure names the cause."""
    if not is_active():
        return t
    try:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    except (RuntimeError, dist.DistBackendError) as err:
        rank, size = world()
        raise DistributedTimeoutError(
            f"rank {rank}/{size}: all_reduce of a {tuple(t.shape)} tensor failed "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); another rank "
            "probably failed or hangs. Check its log; the timeout is set by "
            "init_process_group(timeout=...)."
        ) from err
    return t


def init_from_env(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Initialise the process group from torchrun's environment; return ``(rank, world_size)``.

    ``backend`` defaults to NCCL when CUDA is available, gloo otherwise. On CUDA each rank uses
    the device ``LOCAL_RANK``.
    """
    if "RANK" not in os.environ:
        raise RuntimeError("init_from_env needs torchrun's environment (RANK, WORLD_SIZE, ...); "
                           "launch with: torchrun --nproc_per_node=N your_script.py")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return world()


__all__ = [
    "SHARDING",
    "DistributedTimeoutError",
    "all_reduce_sum",
    "init_from_env",
    "is_active",
    "world",
]
