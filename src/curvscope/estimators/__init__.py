"""Stochastic estimators: traces, diagonals, Frobenius norms and spectral densities (SLQ)."""

from curvscope.estimators.diagonal import DiagonalEstimate, hutchinson_diagonal, xdiag
from curvscope.estimators.slq import SpectralDensity, slq
from curvscope.estimators.trace import (
    TraceEstimate,
    hutchinson_block_traces,
    hutchinson_frobenius,
    hutchinson_trace,
    hutchpp_trace,
    xtrace,
)
from curvscope.linops._probes import random_probes

__all__ = [
    "DiagonalEstimate",
    "SpectralDensity",
    "TraceEstimate",
    "hutchinson_block_traces",
    "hutchinson_diagonal",
    "hutchinson_frobenius",
    "hutchinson_trace",
    "hutchpp_trace",
    "random_probes",
    "slq",
    "xdiag",
    "xtrace",
]
