"""Stochastic Lanczos quadrature: the spectral density of a symmetric operator.

For a probe ``v`` (``||v|| = 1``), ``m`` Lanczos steps give ``T = S diag(theta) S^T``; the nodes
``theta_k`` and weights ``tau_k = S_{1k}^2`` (``sum_k tau_k = 1``) form the ``m``-point Gauss
quadrature of the measure ``mu_v = sum_i (u_i^T v)^2 delta_{lambda_i}``, exact for polynomials
of degree ``< 2m``. Averaging over ``p`` probes estimates the spectral density
``phi(t) = (1/n) sum_i delta(t - lambda_i)``:

.. math:: \\hat\\phi_\\sigma(t) = \\frac{1}{p} \\sum_l \\sum_k \\tau_k^{(l)}
          g_\\sigma(t - \\theta_k^{(l)}), \\qquad
          g_\\sigma(x) = \\frac{e^{-x^2 / 2\\sigma^2}}{\\sqrt{2\\pi}\\sigma}

and ``tr f(A) ~ (n/p) sum_l sum_k tau_k f(theta_k)``.

Default broadening (Lin, Saad, Yang 2016; Papyan 2020): on the spectral interval ``[a, b]``
widened by 5 %, with half-width ``d = (b - a)/2``, ``sigma = d * h / sqrt(8 ln kappa)`` with
``h = 2/(m - 1)`` and ``kappa = 3``: a Gaussian of the resolution ``m`` nodes can support.

References:
    L. Lin, Y. Saad, C. Yang, "Approximating spectral densities of large matrices", SIAM Review
    58 (2016).  S. Ubaru, J. Chen, Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
    quadrature", SIAM J. Matrix Anal. Appl. 38 (2017).  B. Ghorbani, S. Krishnan, Y. Xiao, "An
    investigation into neural net optimization via Hessian eigenvalue density", ICML 2019.
    V. Papyan, "Traces of class/cross-class structure pervade deep learning spectra", JMLR 2020.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from curvscope._diagnostics import Cost
from curvscope.linops._base import SYMMETRIC, LinearOperator
from curvscope.linops._checks import check_symmetric
from curvscope.linops._orthogonal import cgs2
from curvscope.solvers._results import EigenResult
from curvscope.solvers.lanczos import lanczos, start_vectors

DEFAULT_KAPPA = 3.0
DEFAULT_MARGIN = 0.05


@dataclass(frozen=True)
class SpectralDensity:
    """Gauss quadrature nodes and weights of ``p`` probes: a spectral density with error bars.

    Attributes:
        nodes: ``[p, m]`` Ritz values (float64, host).
        weights: ``[p, m]`` quadrature weights, real, each row sums to 1.
        dimension: ``n`` (minus the deflated directions when outliers were removed).
        bounds: ``(lower, upper)`` bounds on the spectrum from the Ritz values and residuals.
        deflated: eigenvalues removed before the run (``[k]``; empty when none).
        reorth: Lanczos reorthogonalisation used.
        cost: products, data passes and wall time.
        zero_tol: nodes within this distance of 0 count as zero, neither negative nor positive
            (``1e3 eps ||A||`` in the operator's precision: a null space's Ritz values are
            rounding noise of either sign).
        exact: every eigenvalue, from a dense ``eigh`` (:meth:`from_eigenvalues`).
        known_eigenvalues: the last ``r`` nodes of every probe are eigenvalues computed apart
            (the deflated outliers put back by :meth:`with_deflated`), weight ``1/n`` each; the
            first ``m`` are the quadrature's.
    """

    nodes: Tensor
    weights: Tensor
    dimension: int
    bounds: tuple[float, float]
    deflated: Tensor
    reorth: str
    cost: Cost
    zero_tol: float = 0.0
    exact: bool = False
    known_eigenvalues: int = 0

    @classmethod
    def from_eigenvalues(cls, eigenvalues: Tensor, cost: Cost, *, deflated: Tensor | None = None,
                         zero_tol: float = 0.0) -> SpectralDensity:
        """The exact spectral measure ``(1/n) sum_i delta_{lambda_i}`` of known eigenvalues
        (e.g. from :func:`~curvscope.solvers.dense.dense_spectrum`): one "probe" whose nodes
        are every eigenvalue with weight ``1/n``; standard errors are zero and the resolution
        is ``zero_tol`` (the products' rounding), not a quadrature's width.
        """
        lam = eigenvalues.detach().to("cpu", torch.float64).sort().values
        n = lam.numel()
        if n == 0:
            raise ValueError("an exact spectral density needs at least one eigenvalue.")
        gone = torch.empty(0, dtype=torch.float64) if deflated is None else \
            deflated.detach().to("cpu", torch.float64)
        return cls(lam[None], torch.full((1, n), 1.0 / n, dtype=torch.float64), n,
                   (float(lam[0]), float(lam[-1])), gone, "exact (dense eigh)", cost,
                   zero_tol=zero_tol, exact=True)

    def with_deflated(self) -> SpectralDensity:
        """The density of the whole operator from this density of its bulk and the deflated
        eigenvalues.

        The bulk is ``A`` on the orthogonal complement of ``r`` eigenvectors (dimension
        ``n - r``), so ``spec(A) = spec(bulk) + {lambda_1 .. lambda_r}`` and, exactly,

        .. math:: \\mu_A = \\tfrac{n - r}{n}\\,\\mu_{bulk}
                  + \\tfrac{1}{n} \\sum_{i \\le r} \\delta_{\\lambda_i}

        (up to the eigenpairs' residuals). Every probe gets the ``r`` eigenvalues as nodes of
        weight ``1/n``: they add no variance, where an undeflated run would have to find each
        outlier among its Ritz values. One SLQ run then gives both densities; the whole density
        costs no products of its own (its ``cost`` is zero: they are the bulk run's).
        """
        r = int(self.deflated.numel())
        if r == 0:
            return self
        n = self.dimension + r
        p = self.num_probes
        lam = self.deflated.to(torch.float64).sort().values
        nodes = torch.cat([self.nodes, lam.expand(p, r)], dim=1)
        weights = torch.cat([self.weights * (self.dimension / n),
                             torch.full((p, r), 1.0 / n, dtype=torch.float64)], dim=1)
        bounds = (min(self.bounds[0], float(lam[0])), max(self.bounds[1], float(lam[-1])))
        return dataclasses.replace(self, nodes=nodes, weights=weights, dimension=n, bounds=bounds,
                                   deflated=torch.zeros(0, dtype=torch.float64),
                                   known_eigenvalues=self.known_eigenvalues + r,
                                   cost=Cost(0, 0, 0, 0.0))

    def _negative(self) -> Tensor:
        return self.nodes < -self.zero_tol

    def _se(self, per_probe: Tensor) -> Tensor:
        """Standard error over probes (zero for an exact density)."""
        if self.exact:
            return torch.zeros_like(per_probe[0])
        return _std_error(per_probe)

    @property
    def num_probes(self) -> int:
        """Number of probes ``p``."""
        return int(self.nodes.shape[0])

    @property
    def num_iters(self) -> int:
        """Lanczos steps ``m`` per probe (the quadrature's nodes, without known eigenvalues)."""
        return int(self.nodes.shape[1]) - self.known_eigenvalues

    # ------------------------------------------------------------ density
    def default_sigma(self, scale: str = "linear", kappa: float = DEFAULT_KAPPA) -> float:
        """Lin-Saad-Yang width ``d * (2 / (m - 1)) / sqrt(8 ln kappa)`` on the chosen axis."""
        lo, hi = self._axis_range(scale)
        d = (hi - lo) / 2
        h = 2.0 / max(self.num_iters - 1, 1)
        return max(d * h / math.sqrt(8 * math.log(kappa)), 1e-300)

    def log_floor(self) -> float:
        """Floor added to ``|lambda|`` on the log axis: ``1e-6`` of the spectral radius."""
        return 1e-6 * max(abs(self.bounds[0]), abs(self.bounds[1]), 1e-300)

    def _axis_range(self, scale: str, eps: float | None = None) -> tuple[float, float]:
        eps = self.log_floor() if eps is None else eps
        lo, hi = self.bounds
        if scale == "linear":
            width = hi - lo if hi > lo else max(abs(hi), 1.0)
            return lo - DEFAULT_MARGIN * width, hi + DEFAULT_MARGIN * width
        mags = self.nodes.abs()[self.weights > 0]
        top = max(abs(lo), abs(hi)) + eps
        bottom = float(mags.min()) + eps if mags.numel() else eps
        lo_log, hi_log = math.log10(bottom), math.log10(top)
        pad = DEFAULT_MARGIN * max(hi_log - lo_log, 1.0)
        return lo_log - pad, hi_log + pad

    def grid(self, num: int = 1024, *, scale: str = "linear") -> Tensor:
        """``num`` evenly spaced points over the bounds widened by 5 % (``log10`` axis for log)."""
        lo, hi = self._axis_range(_check_scale(scale))
        return torch.linspace(lo, hi, num, dtype=torch.float64)

    def evaluate(
        self,
        grid: Tensor | None = None,
        *,
        sigma: float | None = None,
        scale: str = "linear",
        part: str = "both",
        eps: float | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The broadened density on a grid, with its standard error across probes.

        Args:
            grid: points (default :meth:`grid`); on the ``log10 |lambda|`` axis when
                ``scale="log"``.
            sigma: Gaussian width in the axis' units (default :meth:`default_sigma`).
            scale: ``"linear"`` (density of ``lambda``) or ``"log"`` (density of
                ``log10(|lambda| + eps)``, Papyan 2020).
            part: ``"both"``, ``"positive"`` (non-negative: ``lambda >= -zero_tol``) or
                ``"negative"`` (``lambda < -zero_tol``) eigenvalues; the others get weight zero,
                and the two parts add up to the whole.
            eps: floor added to ``|lambda|`` on the log axis (default :meth:`log_floor`).

        Returns:
            ``(grid, density, std_error)``; ``density`` integrates to the probability mass of
            the part (1 for ``both``) over a wide enough grid.
        """
        scale = _check_scale(scale)
        if part not in ("both", "positive", "negative"):
            raise ValueError(f"part must be 'both', 'positive' or 'negative', got {part!r}.")
        grid = self.grid(scale=scale) if grid is None else grid.to(torch.float64).cpu()
        sigma = self.default_sigma(scale) if sigma is None else float(sigma)
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}.")
        eps = self.log_floor() if eps is None else eps
        x = self.nodes if scale == "linear" else torch.log10(self.nodes.abs() + eps)
        w = self.weights
        if part == "positive":
            w = w * ~self._negative()
        elif part == "negative":
            w = w * self._negative()
        z = (grid.view(1, 1, -1) - x.unsqueeze(-1)) / sigma
        per_probe = (w.unsqueeze(-1) * torch.exp(-0.5 * z**2)).sum(1) / (sigma * math.sqrt(2 * math.pi))
        mean = per_probe.mean(0)
        std_error = self._se(per_probe)
        return grid, mean, std_error

    # ------------------------------------------------------------ functionals
    def trace_function(self, f: Callable[[Tensor], Tensor]) -> tuple[float, float]:
        """``tr f(A) ~ n * mean_l sum_k tau_k f(theta_k)`` and its standard error over probes."""
        per_probe = self.dimension * (self.weights * f(self.nodes)).sum(1)
        return float(per_probe.mean()), float(self._se(per_probe))

    def moment(self, j: int) -> tuple[float, float]:
        """``tr(A^j) / n`` and its standard error (exact per probe for ``j < 2m``)."""
        per_probe = (self.weights * self.nodes**j).sum(1)
        return float(per_probe.mean()), float(self._se(per_probe))

    def negative_fraction(self, threshold: float | None = None) -> tuple[float, float]:
        """Fraction of eigenvalues below ``-threshold`` (default ``zero_tol``), with its
        standard error over probes.

        SLQ represents a cluster of eigenvalues at zero by nodes near zero, on either side; use
        ``threshold=resolution()`` to count only eigenvalues clearly below zero, and
        :meth:`near_zero_fraction` for the rest.
        """
        t = self.zero_tol if threshold is None else float(threshold)
        per_probe = (self.weights * (self.nodes < -t)).sum(1)
        return float(per_probe.mean()), float(self._se(per_probe))

    def near_zero_fraction(self, threshold: float | None = None) -> tuple[float, float]:
        """Fraction of eigenvalues within ``+-threshold`` of zero (default: :meth:`resolution`)."""
        t = self.resolution() if threshold is None else float(threshold)
        per_probe = (self.weights * (self.nodes.abs() <= t)).sum(1)
        return float(per_probe.mean()), float(self._se(per_probe))

    def resolution(self) -> float:
        """The scale below which the quadrature cannot resolve eigenvalues: the default width
        (an exact density: ``zero_tol``, the products' rounding).
        """
        if self.exact:
            return self.zero_tol
        return self.default_sigma("linear")

    def negative_mass(self) -> tuple[float, float]:
        """``sum_{lambda<0} |lambda| / sum |lambda|``: the share of spectral mass that is negative."""
        neg = (self.weights * self.nodes.abs() * self._negative()).sum(1)
        tot = (self.weights * self.nodes.abs()).sum(1).clamp_min(1e-300)
        per_probe = neg / tot
        return float(per_probe.mean()), float(self._se(per_probe))

    def cdf(self, t: Tensor) -> Tensor:
        """The quadrature's spectral distribution function ``F(t) = mean_l sum_{theta<=t} tau``."""
        t = t.to(torch.float64).cpu()
        inside = (self.nodes.unsqueeze(-1) <= t.view(1, 1, -1)).to(torch.float64)
        return (self.weights.unsqueeze(-1) * inside).sum(1).mean(0)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers for JSON."""
        return {
            "nodes": self.nodes.tolist(), "weights": self.weights.tolist(),
            "dimension": self.dimension, "bounds": list(self.bounds),
            "deflated": self.deflated.tolist(), "reorth": self.reorth,
            "num_probes": self.num_probes, "num_iters": self.num_iters,
            "zero_tol": self.zero_tol, "exact": self.exact,
            "known_eigenvalues": self.known_eigenvalues, **self.cost.to_dict(),
        }


def _std_error(per_probe: Tensor) -> Tensor:
    p = per_probe.shape[0]
    if p < 2:
        return torch.full_like(per_probe[0], float("nan"))
    return per_probe.std(0, unbiased=True) / math.sqrt(p)


def _check_scale(scale: str) -> str:
    if scale not in ("linear", "log"):
        raise ValueError(f"scale must be 'linear' or 'log', got {scale!r}.")
    return scale


class _ComplementOperator(LinearOperator):
    """``P A P`` with ``P = I - V V^T``: ``A`` on the orthogonal complement of ``span(V)``."""

    def __init__(self, A: LinearOperator, V: Tensor) -> None:
        super().__init__(A.shape, dtype=A.dtype, device=A.device, tags={SYMMETRIC})
        self.A, self.V = A, V

    def children(self) -> tuple[LinearOperator, ...]:
        return (self.A,)

    def project(self, X: Tensor) -> Tensor:
        return cgs2(X, self.V)

    def _matmat(self, X: Tensor) -> Tensor:
        return self.project(self.A @ self.project(X))


def slq(
    A: LinearOperator,
    num_probes: int = 10,
    num_iters: int = 80,
    *,
    reorth: str = "full",
    distribution: str = "rademacher",
    deflate: EigenResult | None = None,
    basis: str = "device",
    generator: torch.Generator | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 10,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature with ``num_probes`` probes in lockstep.

    Args:
        A: symmetric operator ``[n, n]``.
        num_probes: ``p`` (each Lanczos step is one product with ``p`` columns).
        num_iters: ``m`` Lanczos steps (capped at ``n``).
        reorth: ``"full"`` (default), ``"partial"`` or ``"none"`` (see :func:`lanczos`).
        distribution: probe distribution.
        deflate: eigenpairs to remove first (e.g. the top-k outliers from :func:`eigsh`): the
            density is then that of the bulk, ``A`` restricted to the orthogonal complement of
            their eigenvectors (dimension ``n - k``).
        basis: where the Lanczos vectors live (``"device"``, ``"host"``, ``"none"``).
        generator: explicit randomness.
        checkpoint: file for resumable runs (see :func:`~curvscope.lanczos`).
        checkpoint_every: Lanczos steps between saves.

    Returns:
        :class:`SpectralDensity`.

    Example:
        >>> import torch
        >>> from curvscope.linops import DiagonalOperator
        >>> A = DiagonalOperator(torch.arange(10.0, dtype=torch.float64))
        >>> d = slq(A, 4, 10, generator=torch.Generator().manual_seed(0))
        >>> round(d.trace_function(lambda t: t)[0], 8)  # Rademacher probes: exact on diagonals
        45.0
    """
    check_symmetric(A, "slq")
    n = A.shape[0]
    op: LinearOperator = A
    deflated = torch.zeros(0, dtype=torch.float64)
    dimension = n
    if deflate is not None:
        if not isinstance(deflate, EigenResult) or deflate.eigenvectors is None:
            raise TypeError("deflate must be an EigenResult with eigenvectors (from eigsh).")
        V = deflate.eigenvectors.to(dtype=A.dtype, device=A.device)
        op = _ComplementOperator(A, V)
        deflated = deflate.eigenvalues.detach().to("cpu", torch.float64)
        dimension = n - V.shape[1]
    m = min(num_iters, dimension)
    V0 = start_vectors(A, None, num_probes, distribution, generator)
    if isinstance(op, _ComplementOperator):
        V0 = op.project(V0)
    result = lanczos(op, m, v0=V0, reorth=reorth, basis=basis, generator=generator,
                     checkpoint=checkpoint, checkpoint_every=checkpoint_every)
    theta, S = result.ritz()
    weights = S[:, 0, :] ** 2
    beta_m = result.beta[:, -1].to("cpu", torch.float64).abs()
    eps = torch.finfo(A.dtype).eps
    # Nodes with negligible weight are rounding artefacts (e.g. the null space of the deflated
    # operator, or zero blocks after a breakdown without reorthogonalisation): they carry no
    # mass and must not widen the bounds. Genuine extreme nodes weigh ~1/n.
    support = weights > 1e-3 * math.sqrt(eps) / dimension
    low = theta - beta_m.unsqueeze(1) * S[:, -1, :].abs()
    high = theta + beta_m.unsqueeze(1) * S[:, -1, :].abs()
    lower = float(low[support].min())
    upper = float(high[support].max())
    zero_tol = 1e3 * eps * max(abs(lower), abs(upper))
    return SpectralDensity(theta, weights, dimension, (lower, upper), deflated, reorth,
                           result.cost, zero_tol)
