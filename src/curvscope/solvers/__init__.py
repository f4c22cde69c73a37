"""Eigensolvers for symmetric operators: Lanczos, thick-restart block Lanczos, power and subspace
iteration, sketched eigendecompositions; every result carries residuals and costs.
"""

from curvscope.solvers._results import ConvergenceWarning, EigenResult, LanczosResult
from curvscope.solvers.eigsh import ConvergenceError, eigsh, power_iteration, subspace_iteration
from curvscope.solvers.lanczos import lanczos
from curvscope.solvers.sketch import nystrom_eigh, sketch_eigh

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "EigenResult",
    "LanczosResult",
    "eigsh",
    "lanczos",
    "nystrom_eigh",
    "power_iteration",
    "sketch_eigh",
    "subspace_iteration",
]
