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

import atexit
import datetime
import logging
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import Tensor

SHARDING = ("round_robin", "local")

logger = logging.getLogger(__name__)


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


def ensure_process_group(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Initialise the process group from torchrun's environment when the script did not.

    Under ``torchrun --nproc_per_node=W`` (``WORLD_SIZE`` > 1 and ``RANK`` set) with no process
    group, every rank would otherwise run the whole job alone; this initialises the group with
    :func:`init_from_env` (one warning per rank says so) so that the ranks share the batches.
    Without torchrun's environment, or with a group already initialised, it changes nothing.

    Returns:
        ``(rank, world_size)``; ``(0, 1)`` in one process.

    Raises:
        RuntimeError: the environment asks for several ranks but the group cannot be initialised.
    """
    if dist.is_available() and dist.is_initialized():
        return world()
    raw = os.environ.get("WORLD_SIZE")
    if raw is None or "RANK" not in os.environ:
        return 0, 1
    try:
        size = int(raw)
    except ValueError:
        raise RuntimeError(
            f"WORLD_SIZE must be an integer (torchrun sets it), got {raw!r}; launch with "
            "torchrun --nproc_per_node=N your_script.py, or unset WORLD_SIZE for one process."
        ) from None
    if size <= 1:
        return 0, 1
    rank = os.environ["RANK"]
    try:
        if not dist.is_available():
            raise RuntimeError("this torch build has no torch.distributed")
        result = init_from_env(backend, timeout_s=timeout_s)
    except Exception as err:  # noqa: BLE001 - any failure of the rendezvous is reported the same way
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(
            f"the environment says this is rank {rank} of WORLD_SIZE={size} (torchrun), but "
            "torch.distributed is not initialised and initialising it from the environment "
            f"failed ({type(err).__name__}: {first}); call torch.distributed.init_process_group() "
            "(or curvscope.distributed.init_from_env()) at the top of the script, or run one "
            "process without torchrun."
        ) from err
    message = (
        f"curvscope initialised torch.distributed from the environment (rank {result[0]} of "
        f"{result[1]}, backend {dist.get_backend()}): the script did not call "
        "init_process_group(); batches are sharded over the ranks."
    )
    logger.info(message)
    warnings.warn(message, stacklevel=3)
    atexit.register(_tear_down_the_group_we_made, dist.group.WORLD)
    return result


def _tear_down_the_group_we_made(group: object) -> None:
    """Destroy, at exit, the process group :func:`ensure_process_group` initialised.

    The script never asked for the group, so it will not destroy it; left to interpreter
    finalisation, gloo's worker threads can abort the process ("terminate called without an
    active exception", SIGABRT, exit code -6) after the results are written. On a clean exit the
    ranks first meet at a barrier so that no rank tears down while another still talks to it; after
    an uncaught exception (``sys.last_value`` is set) the barrier is skipped, since the other ranks
    may never reach it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.group.WORLD is not group:
        return  # the script destroyed it, or made another one itself
    try:
        if not hasattr(sys, "last_value"):
            dist.barrier()
        dist.destroy_process_group()
    except Exception as err:  # noqa: BLE001 - exiting anyway; say why the teardown failed
        logger.warning("curvscope: destroying the process group at exit failed: %s", err)


__all__ = [
    "SHARDING",
    "DistributedTimeoutError",
    "all_reduce_sum",
    "ensure_process_group",
    "init_from_env",
    "is_active",
    "world",
]
