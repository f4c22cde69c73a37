"""Tall matrices ``X [n, l]`` (``n`` parameters, ``l`` up to thousands of columns) that may not fit
on the compute device: kept on the device, in host memory (pinned on CUDA) or in a memory-mapped
file, and worked on in blocks streamed to the device.

A sketch of 1000 eigenpairs of an 11M-parameter network is a 45 GB float32 matrix; two of them do
not fit on an 80 GB GPU next to the model. Everything the randomised eigensolvers need is a
product with a block of columns, or a sum over row blocks (Gram matrices ``X^T Y``, right
products ``X T``, column norms), so the device only ever holds one block.

Storage is transposed (``[l, n]``): a column block is contiguous (products), a row block is ``l``
contiguous runs (streamed sums). Row blocks are worked on in float64, so Gram matrices and the
right products that orthonormalise are exact to float64 rounding whatever the storage dtype.
Reads from host memory are asynchronous (pinned); writes back are blocking, so host memory is
never rewritten while a copy from it is queued.
"""

from __future__ import annotations

import tempfile

import torch
from torch import Tensor

from curvscope import distributed

#: Where a tall matrix may live.
STORAGE = ("device", "host", "disk", "sharded")
#: Bytes of float64 work per streamed row block.
STREAM_BYTES = 256 * 2**20


def sync(device: torch.device) -> None:
    """Wait for queued work on ``device`` (non-blocking copies into host memory included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _host_tensor(rows: int, cols: int, dtype: torch.dtype, pin: bool) -> Tensor:
    """Host memory, pinned where asked and possible (pinning tens of GB can fail: then pageable,
    which is slower to stream but otherwise the same).
    """
    if pin:
        try:
            return torch.empty(rows, cols, dtype=dtype, pin_memory=True)
        except RuntimeError:
            pass
    return torch.empty(rows, cols, dtype=dtype)


class TallMatrix:
    """``X [n, width]`` stored as ``X^T`` on the compute ``device``, in host memory or on disk,
    or sharded: under ``torchrun`` each rank keeps the rows ``[lo, hi)`` (1/W of the
    coordinates) on its device; Gram matrices and norms are all-reduced partial sums, a column
    block is all-gathered (as a sum of zero-padded slices) for a product, right products are
    local. With one process ``"sharded"`` is ``"device"``.

    ``cols`` is the number of live columns (``width`` at first; a right product may shrink it).
    """

    def __init__(self, n: int, width: int, dtype: torch.dtype, device: torch.device,
                 storage: str = "device") -> None:
        if storage not in STORAGE:
            raise ValueError(f"storage must be one of {STORAGE}, got {storage!r}.")
        self.n, self.cols, self.dtype, self.device, self.storage = n, width, dtype, device, storage
        self.lo, self.hi = 0, n
        if storage == "sharded":
            rank, size = distributed.world()
            self.lo, self.hi = round(rank * n / size), round((rank + 1) * n / size)
        if storage in ("device", "sharded"):
            self.data = torch.empty(width, self.hi - self.lo, dtype=dtype, device=device)
        elif storage == "host":
            self.data = _host_tensor(width, n, dtype, pin=device.type == "cuda")
        else:  # a temporary file, unlinked when this object goes; the mapping outlives it
            self._file = tempfile.NamedTemporaryFile(prefix="curvscope-sketch-", suffix=".bin")
            self.data = torch.from_file(self._file.name, shared=True, size=width * n,
                                        dtype=dtype).view(width, n)

    @property
    def sharded(self) -> bool:
        """Whether the rows are split across ranks."""
        return self.storage == "sharded" and distributed.is_active()

    def _rows(self) -> list[slice]:
        """Row blocks of the stored rows (local indices)."""
        local = self.hi - self.lo
        step = max(1, STREAM_BYTES // (8 * max(self.cols, 1)))
        return [slice(r, min(r + step, local)) for r in range(0, local, step)]

    def _global(self, rows: slice) -> slice:
        return slice(self.lo + rows.start, self.lo + rows.stop)

    def _reduce(self, t: Tensor) -> Tensor:
        return distributed.all_reduce_sum(t) if self.sharded else t

    def _row_block(self, rows: slice) -> Tensor:
        """``X[rows, :cols]^T`` on the device in float64: ``[cols, len(rows)]``."""
        return self.data[: self.cols, rows].to(self.device, torch.float64, non_blocking=True)

    def columns(self, start: int, stop: int) -> Tensor:
        """``X[:, start:stop]`` on the device (``[n, stop - start]``), whole on every rank."""
        if not self.sharded:
            return self.data[start:stop].to(self.device, non_blocking=True).T
        full = torch.zeros(self.n, stop - start, dtype=self.dtype, device=self.device)
        full[self.lo : self.hi] = self.data[start:stop].T
        return distributed.all_reduce_sum(full)

    def set_columns(self, start: int, block: Tensor) -> None:
        """``X[:, start:start + b] = block`` (``block [n, b]`` on the device, the same on every
        rank when sharded: each keeps its rows).
        """
        local = block[self.lo : self.hi]
        self.data[start : start + block.shape[1]].copy_(local.T)  # blocking into host memory

    def fill_gaussian(self, columns: list[int], generator: torch.Generator | None) -> None:
        """Standard Gaussian entries in the given columns, drawn on the generator's device in
        float64, one column after another (the numbers do not depend on storage or blocks).
        """
        gen_device = generator.device if generator is not None else torch.device("cpu")
        sync(self.device)  # no queued copy may still be reading these columns
        for c in columns:
            z = torch.randn(self.n, generator=generator, device=gen_device, dtype=torch.float64)
            self.data[c].copy_(z[self.lo : self.hi].to(self.dtype))

    def gram(self, other: TallMatrix | None = None) -> Tensor:
        """``X^T Y`` (``Y = other``, default ``X``) in float64 on the device, ``[cols, cols_Y]``."""
        Y = self if other is None else other
        acc = torch.zeros(self.cols, Y.cols, dtype=torch.float64, device=self.device)
        for rows in self._rows():
            Xr = self._row_block(rows)
            acc += Xr @ (Xr if other is None else Y._row_block(rows)).T
        return self._reduce(acc)

    def t_matmul(self, M: Tensor) -> Tensor:
        """``X^T M`` for ``M [n, t]`` on the device, in float64."""
        acc = torch.zeros(self.cols, M.shape[1], dtype=torch.float64, device=self.device)
        for rows in self._rows():
            acc += self._row_block(rows) @ M[self._global(rows)].to(torch.float64)
        return self._reduce(acc)

    def matmul(self, C: Tensor) -> Tensor:
        """``X C`` for ``C [cols, t]`` (small), on the device in float64: ``[n, t]``."""
        out = torch.zeros(self.n, C.shape[1], dtype=torch.float64, device=self.device)
        C = C.to(self.device, torch.float64)
        for rows in self._rows():
            out[self._global(rows)] = self._row_block(rows).T @ C
        return self._reduce(out)

    def right_multiply_(self, T: Tensor) -> None:
        """``X <- X T`` in place for ``T [cols, m]``, ``m <= cols``; row block by row block, in
        float64 and rounded once to the storage dtype.
        """
        T = T.to(self.device, torch.float64)
        m = T.shape[1]
        for rows in self._rows():
            block = (T.T @ self._row_block(rows)).to(self.dtype)
            self.data[:m, rows].copy_(block)  # blocking: the next block may reuse this memory
        self.cols = m

    def column_residual_norms(self, other: TallMatrix, theta: Tensor) -> Tensor:
        """``||Y[:, i] - theta_i X[:, i]||`` for ``Y = other`` (the measured residuals)."""
        acc = torch.zeros(self.cols, dtype=torch.float64, device=self.device)
        t = theta.to(self.device, torch.float64).unsqueeze(1)
        for rows in self._rows():
            acc += (other._row_block(rows) - t * self._row_block(rows)).pow(2).sum(1)
        return self._reduce(acc).sqrt()

    def view(self) -> Tensor | None:
        """``X[:, :cols]`` as an ``[n, cols]`` tensor where it is stored (no copy); ``None`` when
        sharded across ranks (no rank holds it whole).
        """
        return None if self.sharded else self.data[: self.cols].T
