"""Finite-difference curvature products: for models whose first derivative is all that exists.

Fused attention kernels (flash attention on a GPU, and on the CPU), custom
``torch.autograd.Function`` s without a differentiable backward, and other kernels with a
gradient but no second derivative stop every exact engine. Central differences of the gradient
need first derivatives only:

.. math::

    D(h) v = \\frac{g(\\theta + h v) - g(\\theta - h v)}{2 h} = H v + \\frac{h^2}{6} g'''[v, v, v]
             + O(h^4),

and Richardson's extrapolation ``R = (4 D(h/2) - D(h)) / 3 = H v + O(h^4)`` removes the ``h^2``
term. The same formulas with the model's output ``f`` in place of ``g`` give Jacobian products
``J v`` from forward passes alone, so Gauss-Newton products ``J^T H_l J v`` keep their closed-form
loss Hessians.

Step: ``h = c * eps^(1/3) * s / ||v||`` with ``c = 0.3``, where ``eps`` is the dtype's machine
epsilon and ``s = max(||theta||, sqrt(P) / 10)`` the scale of the parameters (the floor serves
parameters at zero, such as biases at initialisation): the parameter vector moves by a relative
``c * eps^(1/3)`` (2e-6 in float64, 1.5e-3 in float32), which balances the truncation error
``O(h^2)`` against the rounding error ``O(eps / h)``. The same exponent serves Richardson: the
larger optimum of a smooth model (``eps^(1/5)``) crosses the kinks of ReLU / max-pool networks,
where a gradient jumps and every finite difference is wrong by ``O(1)`` (measured in the step
study). The step is the same on every batch, so the product over the data is the finite
difference of the full-data gradient.

Measured (``benchmarks/bench_finite_difference.py``, relative error against the exact float64
product, default step): about 1e-10 in float64 on every zoo model, ReLU nets included; 5e-5 to
2e-4 in float32 on smooth models (tanh, GELU, attention); O(1) in float32 on ReLU nets, where no
step avoids both the kinks and the rounding, and the error estimate says so.

Error estimate, per column, the sum of two parts:

* truncation (with Richardson): ``t = ||D(h/2) - D(h)|| / 3`` is the error of the central
  difference at ``h/2``, the ``h^2`` term. The extrapolated value's error is the ``h^4`` term;
  assuming the Taylor terms fall geometrically (ratio ``t / ||R||``), it is about
  ``t^2 / ||R||``; :func:`richardson_truncation` returns ``TRUNCATION_SAFETY`` times that (never
  more than ``10 t``), which also covers the kink crossings of piecewise-linear networks, where
  the ``h^2`` model fails;
* rounding: ``ROUNDING * eps * (||g_+|| + ||g_-||) / (2 h)`` for each evaluation (in quadrature
  over batches), with the weights of the extrapolation.

Without Richardson only the rounding part is available: the truncation error is not estimated.
Both parts are checked against the exact engines on the zoo in float32 and float64
(``benchmarks/bench_finite_difference.py``, ``tests/test_finite_difference.py``).

References:
    J. Nocedal, S. Wright, "Numerical Optimization", 2nd ed., Sec. 8.1 (finite-difference
    Hessian-vector products).  L. F. Richardson, "The deferred approach to the limit", 1927.
    B. A. Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

STEP_SCALE = 0.3  # c in h = c eps^(1/3) s / ||v||: the step study in benchmarks/bench_finite_difference.py
ROUNDING = 30.0  # rounding error of one gradient, in units of eps * ||g|| (measured: about 8)
TRUNCATION_SAFETY = 10.0  # the Richardson truncation estimate errs on the safe side by this factor


def fd_steps(theta_norm: float, num_params: int, norms: list[float],
             dtype: torch.dtype) -> list[float]:
    """Steps ``h_j`` for columns of norms ``||v_j||`` (host floats: the kernels loop over them)."""
    eps = torch.finfo(dtype).eps
    scale = max(theta_norm, math.sqrt(num_params) / 10.0)
    tiny = torch.finfo(torch.float64).tiny
    return [STEP_SCALE * eps ** (1.0 / 3.0) * scale / max(n, tiny) for n in norms]


def central_differences(fn: Callable[[float], Tensor], h: float, richardson: bool,
                        eps: float) -> tuple[Tensor, Tensor | None, Tensor]:
    """Central difference of ``fn`` (``fn(t)`` = the quantity at ``theta + t v``) at step ``h``.

    Returns:
        ``(value, truncation_vector, rounding)``: the (extrapolated) derivative; ``D(h/2) - D(h)``
        with Richardson (``None`` without), whose norm over the data / 3 estimates the truncation
        error; and the squared rounding error estimate of this evaluation (a 0-d float64 tensor,
        on the device: no host sync).
    """
    plus, minus = fn(h), fn(-h)
    coarse = (plus - minus) / (2 * h)
    rounding = (ROUNDING * eps * (_norm(plus) + _norm(minus)) / (2 * h)) ** 2
    if not richardson:
        return coarse, None, rounding
    plus2, minus2 = fn(h / 2), fn(-h / 2)
    fine = (plus2 - minus2) / h
    rounding_fine = (ROUNDING * eps * (_norm(plus2) + _norm(minus2)) / h) ** 2
    value = (4 * fine - coarse) / 3
    return value, fine - coarse, (16 * rounding_fine + rounding) / 9


def richardson_truncation(t: Tensor, norms: Tensor) -> Tensor:
    """Truncation estimate of the extrapolated value from ``t = ||D(h/2) - D(h)|| / 3`` (``[k]``)."""
    ratio = (t / norms.clamp_min(torch.finfo(torch.float64).tiny)).clamp(max=1.0)
    return TRUNCATION_SAFETY * t * ratio


def _norm(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64).norm()


__all__ = [
    "ROUNDING",
    "STEP_SCALE",
    "TRUNCATION_SAFETY",
    "central_differences",
    "fd_steps",
    "richardson_truncation",
]
