"""Resumable analyses: each finished stage on disk, each running stage's solver checkpoint beside it.

A :class:`StageStore` is a folder. :meth:`StageStore.run` returns a stage's saved result when the
folder has it, and otherwise computes it, handing the computation a path for its in-stage
checkpoint (the ``checkpoint=`` of :func:`~curvscope.eigsh`, :func:`~curvscope.slq`,
:func:`~curvscope.class_structure`), then saves the result (:mod:`curvscope._state`, through the
atomic, checksummed :class:`~curvscope._checkpoint.Checkpointer`) and drops the in-stage file. A
run killed at any instant (SIGKILL included) and started again with the same arguments therefore
redoes at most the unfinished part of one stage, and, since every stage draws its random numbers
from its own seeded generator and the kernels ``engine="auto"`` chose travel in every file, ends
with the result an uninterrupted run gives.

The folder is tied to one run by a fingerprint (the model's parameters, the data, the options):
a store opened with another fingerprint refuses with :class:`~curvscope.CheckpointMismatchError`
before anything is read, so a changed model, data set or option never continues an old run.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from curvscope._checkpoint import Checkpointer, tensor_digest
from curvscope._progress import Progress
from curvscope._state import from_state, to_state

RUN_FILE = "run.fingerprint"


class StageStore:
    """The finished stages of one run in ``directory``.

    Args:
        directory: the folder (created on the first save); ``None``: nothing is saved, every
            stage is computed (no in-stage checkpoints either).
        fingerprint: JSON-able description of the run; must match the folder's to reuse it.
        operator: an operator over the run's Problem: the ``engine="auto"`` kernel choices are
            saved with every stage and restored from it.
    """

    def __init__(self, directory: str | Path | None, fingerprint: Mapping[str, Any] | None = None,
                 operator: object = None, progress: Progress | None = None) -> None:
        self.progress = progress
        self.directory = None if directory is None else Path(directory)
        self.fingerprint = dict(fingerprint or {})
        self.operator = operator
        self.resumed: list[str] = []  # stages read back, in order
        self.computed: list[str] = []  # stages computed by this run
        if self.directory is None:
            return
        run = Checkpointer(self.directory / RUN_FILE, 1, self.fingerprint, operator)
        if run.load() is None:  # raises CheckpointMismatchError for another run's folder
            run.save({})

    def _file(self, name: str) -> Checkpointer:
        path = None if self.directory is None else self.directory / f"{name}.stage"
        return Checkpointer(path, 1, {**self.fingerprint, "stage": name}, self.operator)

    def inside(self, name: str) -> Path | None:
        """The in-stage checkpoint path of stage ``name`` (``None`` without a folder)."""
        return None if self.directory is None else self.directory / f"{name}.inside"

    def sub(self, name: str, fingerprint: Mapping[str, Any], operator: object = None
            ) -> StageStore:
        """A store for a nested run (e.g. the test-data analysis) in a subfolder."""
        folder = None if self.directory is None else self.directory / name
        return StageStore(folder, {**self.fingerprint, **fingerprint, "sub": name}, operator)

    def run(self, name: str, compute: Callable[[Path | None], Any]) -> Any:
        """Stage ``name``'s result: read back when saved, else ``compute(inside_path)`` and save."""
        file = self._file(name)
        state = file.load()
        if state is not None:
            self.resumed.append(name)
            if self.progress is not None:
                self.progress.resumed(name)
            return from_state(state["result"])
        if self.progress is not None:
            self.progress.begin(name)
        inside = self.inside(name)
        if inside is not None:
            # an interrupted stage: its solver's checkpoint names the product shapes it chose
            # from timed products; the same timings make the resumed solver choose them again
            Checkpointer(inside, 1, {}, self.operator).restore_choices()
        result = compute(inside)
        self.computed.append(name)
        if self.directory is not None:
            file.save({"result": to_state(result)})
            for stale in self.directory.glob(f"{name}.inside*"):  # the rank files too
                stale.unlink(missing_ok=True)
        if self.progress is not None:
            self.progress.end(name)
        return result

    def describe_resume(self) -> str | None:
        """A sentence on what was read back (``None`` when nothing was)."""
        if not self.resumed:
            return None
        return (f"resumed from {self.directory}: {len(self.resumed)} finished stage(s) read back "
                f"({', '.join(self.resumed)}); the rest computed")

    def clear(self) -> None:
        """Delete the folder (a finished run leaves nothing behind)."""
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def problem_fingerprint(problem: Any) -> dict[str, Any]:
    """What identifies a Problem's curvature: the selected parameters' names, shapes and values,
    every batch's tensors (one pass over the data, not counted as a curvature pass), the loss,
    ``N``, reduction, mode, dtype and device type.
    """
    params = problem.parameters()
    data = hashlib.sha256()
    passes = problem.num_data_passes
    try:
        for batch in problem.batches():
            for t in _tensors((batch.inputs, batch.target)):
                data.update(tensor_digest(t).encode())
            data.update(repr((batch.size, batch.weight)).encode())
    finally:
        problem.num_data_passes = passes
    loss = problem.loss_fn
    return {
        "parameters": {n: list(p.shape) for n, p in params.items()},
        "parameter_values": tensor_digest(*[params[n] for n in sorted(params)]),
        "data": data.hexdigest(), "num_data": problem.num_data,
        "loss": getattr(loss, "__qualname__", type(loss).__qualname__),
        "loss_options": repr(sorted((k, repr(v)) for k, v in vars(loss).items()
                                    if not k.startswith("_"))) if hasattr(loss, "__dict__")
        else "",
        "reduction": problem.reduction, "mode": problem.mode, "dtype": str(problem.dtype),
        "device": torch.device(problem.device).type,
    }
