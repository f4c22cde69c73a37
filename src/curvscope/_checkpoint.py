"""Resumable long runs: atomic, checksummed, fingerprinted checkpoints of an algorithm's state.

A checkpoint file is ``MAGIC | header length (8 bytes) | header JSON | payload``; the payload is
``torch.save`` of the state (tensors, numbers, generator states), the header holds the format
version, a fingerprint of the run (algorithm, sizes, options, a hash of the start vectors and of
the generator) and the payload's SHA-256. Files are written to a temporary name and renamed, so a
run killed at any instant (SIGKILL included) leaves either the previous checkpoint or the new one.

Loading checks everything: a wrong magic, header or checksum raises :class:`CheckpointCorruptedError`;
a fingerprint that differs from the current run's raises :class:`CheckpointMismatchError`. A checkpoint
is never silently used for another run. Under ``torch.distributed`` each rank keeps its own
file (``PATH.rank<r>``).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from curvscope._atomic import write_atomic
from curvscope._diagnostics import engine_choices, problems_under, restore_engine_choices
from curvscope.distributed import world

MAGIC = b"CURVSCOPE-CKPT\n"
VERSION = 1
ENGINE_KEY = "_engine_choices"  # the kernels engine="auto" chose, saved beside the state


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used."""


class CheckpointCorruptedError(CheckpointError):
    """The file is damaged (truncated, overwritten, checksum mismatch)."""


class CheckpointMismatchError(CheckpointError):
    """The file belongs to a different run (other algorithm, sizes, options or inputs)."""


def tensor_digest(*tensors: Tensor | None) -> str:
    """SHA-256 of tensors' bytes (on the host), for fingerprints."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        data = t.detach().to("cpu").clone(memory_format=torch.contiguous_format).reshape(-1)
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def generator_digest(generator: torch.Generator | None) -> str:
    """Digest of a generator's state (``"none"`` without one)."""
    return "none" if generator is None else tensor_digest(generator.get_state())


class Checkpointer:
    """Saves an algorithm's state every ``every`` steps to ``path`` and restores it on restart.

    Args:
        path: the checkpoint file (``None``: no checkpointing, every method is a no-op).
        every: save after every ``every``-th step.
        fingerprint: JSON-able description of the run; must match to resume.
    """

    def __init__(self, path: str | Path | None, every: int, fingerprint: dict[str, Any],
                 operator: object = None) -> None:
        if every < 1:
            raise ValueError(f"checkpoint_every must be a positive int, got {every!r}.")
        self.path = None if path is None else Path(path)
        rank, size = world()
        if self.path is not None and size > 1:  # under torchrun: one file per rank
            self.path = self.path.with_name(f"{self.path.name}.rank{rank}")
        self.every = every
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        # the product kernels engine="auto" chose travel with the state: a resumed run takes
        # the same ones, so it is bitwise the run that was interrupted
        self._problems = [] if operator is None else problems_under(operator)

    @property
    def enabled(self) -> bool:
        """Whether a path was given."""
        return self.path is not None

    def load(self) -> dict[str, Any] | None:
        """The saved state of this run, or ``None`` when there is no checkpoint file."""
        if self.path is None or not self.path.exists():
            return None
        header, payload = self._read()
        if header.get("fingerprint") != self.fingerprint:
            theirs, ours = header.get("fingerprint", {}), self.fingerprint
            diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise CheckpointMismatchError(
                f"{self.path} belongs to another run (differs in {diff}); use another checkpoint "
                "path, or delete it to start afresh."
            )
        state = torch.load(io.BytesIO(payload), weights_only=True)
        restore_engine_choices(self._problems, state.pop(ENGINE_KEY, None))
        return state

    def restore_choices(self) -> bool:
        """Put the kernel choices and timings saved in the file back into the Problems, whatever
        run the file's fingerprint names, without using its state.

        For a caller that reads the fingerprint's ingredients from those timings: a solver that
        picks the shape of its products from measured costs (:func:`~curvscope.eigsh`'s block)
        makes the choice the interrupted run made, and then matches its checkpoint. ``False``
        when there is no readable file.
        """
        if self.path is None or not self.path.is_file():
            return False
        try:
            _, payload = self._read()
            state = torch.load(io.BytesIO(payload), weights_only=True)
        except CheckpointError:
            return False
        restore_engine_choices(self._problems, state.get(ENGINE_KEY))
        return True

    def _read(self) -> tuple[dict[str, Any], bytes]:
        """The file's header and payload, checked for damage and format version."""
        assert self.path is not None
        raw = self.path.read_bytes()
        if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 8:
            raise CheckpointCorruptedError(f"{self.path} is not a curvscope checkpoint (bad header); "
                                      "delete it to start afresh.")
        pos = len(MAGIC)
        size = int.from_bytes(raw[pos : pos + 8], "little")
        try:
            header = json.loads(raw[pos + 8 : pos + 8 + size])
        except ValueError as err:
            raise CheckpointCorruptedError(f"{self.path}: unreadable header ({err}); delete it to start "
                                      "afresh.") from err
        payload = raw[pos + 8 + size :]
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            raise CheckpointCorruptedError(f"{self.path}: checksum mismatch (truncated or modified); "
                                      "delete it to start afresh.")
        if header.get("version") != VERSION:
            raise CheckpointMismatchError(f"{self.path}: checkpoint format {header.get('version')}, "
                                     f"this curvscope writes {VERSION}.")
        return header, payload

    def due(self, step: int) -> bool:
        """Whether ``step`` (1-based count of steps done) is a save point."""
        return self.path is not None and step % self.every == 0

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically (temporary file, fsync, rename)."""
        if self.path is None:
            return
        buffer = io.BytesIO()
        if self._problems:
            state = {**state, ENGINE_KEY: engine_choices(self._problems)}
        torch.save(state, buffer)
        payload = buffer.getvalue()
        header = json.dumps({"version": VERSION, "fingerprint": self.fingerprint,
                             "sha256": hashlib.sha256(payload).hexdigest()}).encode()
        write_atomic(self.path, MAGIC + len(header).to_bytes(8, "little") + header + payload)
