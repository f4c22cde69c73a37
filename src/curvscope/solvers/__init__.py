"""Eigensolvers for symmetric operators: Lanczos, thick-restart block Lanczos, power and subspace
iteration, sketched eigendecompositions; every result carries residuals and costs."""

from curvscope.solvers._results import ConvergenceWarning, EigenResult, LanczosResult
from curvscope.solvers.eigsh import ConvergenceError, eigsh, power_iteration, subspace_iteration
from curvscope.solvers.lanczos import lanczos

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "EigenResult",
    "LanczosResult",
    "eigsh",
    "lanczos",
    "power_iteration",
    "subspace_iteration",
]
