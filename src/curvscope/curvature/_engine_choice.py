"""Choosing the cheapest exact product engine by a timed trial, once per problem and shape.

The same Hessian product ``H V`` can be computed by several exact kernels whose costs differ by
an order of magnitude depending on the model, the device, the dtype and the number ``k`` of
columns (measured on a width-8 ResNet-18 on one CPU core, in gradients per column: the
double-backward loop 2.6 for one column and 1.6 for 16; the vmapped forward-over-reverse 8.9
for one and 0.7 for 33). No fixed rule picks the cheapest everywhere, so ``engine="auto"``
measures instead: on the first batch of the first product with ``k`` columns in a given *bucket*
(1, 2-3, 4-7, 8-15, 16-31, 32 and more), every candidate kernel computes that batch's
contribution once and is timed (the double-backward loop, whose cost is linear in the columns,
on its first :data:`LOOP_SAMPLE` columns, extrapolated by :func:`loop_seconds`); the fastest one
is used from then on, and the trial's own result is the product (no work is thrown away but the
losers'); the double-backward loop, which needs
the least memory, is kept unless another kernel is more than 10 % faster. Candidates whose
outputs differ from the double-backward loop's (the kernel that ``auto`` verifies against finite
differences) by more than rounding are excluded, so a kernel with a silently wrong rule is never chosen.

The choices live in :attr:`Problem.engine_choices` (shared with the problems derived from it by
``restrict_to_class`` / ``restrict_examples``), are reported in every result's ``cost.engines``
and are saved in every checkpoint: a resumed run takes the same kernels and is bitwise the same.
Two *fresh* runs time their own trials and may choose differently where two kernels cost about
the same (their products then differ by rounding); to replay a run's kernels exactly, put its
choices back before the first product: ``problem.engine_choices.update(result.cost.engines)``,
or force one with ``HessianOperator(engine=...)``.
Under ``torch.distributed`` the per-rank timings are summed over the ranks before the choice, so
every rank takes the same kernel.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from curvscope import distributed

#: Hessian kernels ``auto`` chooses between (the names recorded in results and checkpoints).
HESSIAN_KERNELS = ("double_backward_loop", "double_backward_batched", "forward_over_reverse")

#: Largest relative difference between two exact kernels' outputs, in units of ``sqrt(eps)``,
#: that is still rounding (float32: 3.5e-4 x 10; float64: 1.5e-8 x 10).
AGREEMENT = 10.0


#: The double-backward loop is kept unless another kernel is faster by more than this factor.
LOOP_MARGIN = 1.1

#: Columns the double-backward loop is timed on in a trial (the rest are extrapolated).
LOOP_SAMPLE = 4


def column_bucket(k: int) -> str:
    """The bucket of a column count whose kernels share one trial: ``"1"``, ``"2-3"``, ...,
    ``"32+"`` (per-column costs change little within a factor of two of ``k``).
    """
    if k <= 1:
        return "1"
    low = 1 << (k.bit_length() - 1)
    return "32+" if low >= 32 else f"{low}-{2 * low - 1}"


def choice_key(operator: str, names: tuple[str, ...], all_names: tuple[str, ...],
               dtype: torch.dtype, device: torch.device, k: int) -> str:
    """Key of one choice: operator, parameter block, dtype, device and column bucket."""
    block = "all" if names == all_names else f"{len(names)} tensors from {names[0]}"
    return f"{operator}[{block}] {str(dtype).replace('torch.', '')} {device.type} k={column_bucket(k)}"


def candidates(k: int) -> tuple[str, ...]:
    """The kernels worth a trial for ``k`` columns (a batched backward of one column is the loop)."""
    return tuple(c for c in HESSIAN_KERNELS if k > 1 or c != "double_backward_batched")


def loop_seconds(first: float, rest: float, sampled: int, k: int) -> float:
    """Seconds of the double-backward loop over ``k`` columns from a trial on ``sampled``.

    The loop's cost is linear in the columns: one backward that keeps its graph plus the first
    column (``first``, timed alone), then one backward per further column (``rest`` for the
    next ``sampled - 1``): ``first + (k - 1) rest / (sampled - 1)``. Timing the loop on four
    columns instead of all ``k`` keeps a trial at ``k = 33`` from costing a whole extra product.
    """
    if sampled <= 1 or k <= 1:
        return first * max(k, 1)
    return first + (k - 1) * rest / (sampled - 1)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``(fn(), seconds)``, synchronising an accelerator before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def peak_memory_start(device: torch.device) -> int | None:
    """Reset the accelerator's peak-memory counter; the bytes in use now (``None`` on a CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return int(torch.cuda.memory_allocated(device))


def peak_memory_extra(device: torch.device, start: int | None) -> int | None:
    """Bytes above ``start`` at the peak since :func:`peak_memory_start` (``None`` on a CPU)."""
    if start is None:
        return None
    return int(torch.cuda.max_memory_allocated(device)) - start


def relative_gap(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||``, the norms accumulated in float64 (the difference of two close
    numbers is exact in their own dtype, so no float64 copies of the operands are made).
    """
    a, b = a.detach(), b.detach()
    gap = torch.linalg.vector_norm(a - b, dtype=torch.float64)
    return float(gap / torch.linalg.vector_norm(b, dtype=torch.float64).clamp_min(1e-300))


def agreed_seconds(seconds: Mapping[str, float | str], device: torch.device) -> dict[str, float]:
    """Every kernel's seconds per column averaged over the ranks (one process: its own), a
    kernel that failed on some rank infinite: the same figures on every rank, so that choices
    made from them (the kernel, :func:`~curvscope.solvers.eigsh`'s block) agree.
    """
    inf = float("inf")
    values = torch.tensor([v if isinstance(v, float) else inf for v in seconds.values()],
                          dtype=torch.float64, device=device)
    finite = torch.isfinite(values)
    values = torch.where(finite, values, torch.full_like(values, 1e30))
    distributed.all_reduce_sum(values)
    ranks = distributed.world()[1]
    return {name: (float(v) / ranks if float(v) < 1e30 else inf)
            for name, v in zip(seconds, values.tolist())}


def agreed_choice(seconds: Mapping[str, float | str], device: torch.device) -> str | None:
    """The fastest kernel by every rank's mean seconds per column (:func:`agreed_seconds`),
    except that the double-backward loop (the least memory, one column at a time) is kept when
    it is within :data:`LOOP_MARGIN` of the fastest: near-ties would otherwise flip from run to
    run with the machine's noise.

    Returns ``None`` when no kernel ran on some rank.
    """
    return choose(agreed_seconds(seconds, device))


def choose(mean: Mapping[str, float]) -> str | None:
    """:func:`agreed_choice` from already agreed seconds per column."""
    if not mean:
        return None
    best = min(mean, key=mean.__getitem__)
    if mean[best] == float("inf"):
        return None
    loop = mean.get("double_backward_loop")
    if loop is not None and loop <= LOOP_MARGIN * mean[best]:
        return "double_backward_loop"
    return best


def describe(record: Mapping[str, Any]) -> str:
    """One line: the kernel chosen and the trial's seconds per column."""
    parts = []
    for name, value in record["seconds_per_column"].items():
        parts.append(f"{name} {value:.3g} s" if isinstance(value, float) else f"{name} {value}")
    return f"{record['engine']} ({', '.join(parts)} per column, {record['columns']} columns)"
