"""curvscope: the curvature of deep-network losses at full scale.

Build a :class:`Problem` from a model, a loss and data, then a curvature operator on it
(:class:`HessianOperator`, :class:`GGNOperator`, :class:`FisherMCOperator`,
:class:`EmpiricalFisherOperator`, :class:`GradientCovarianceOperator`, :func:`ResidualOperator`):
symmetric linear operators over the flat parameter vector, ``A @ V`` for ``V`` of shape ``[P, k]``
in one pass over the data.
"""

from curvscope import linops
from curvscope.curvature import (
    CombinedCurvatureOperator,
    CurvatureOperator,
    EmpiricalFisherOperator,
    EngineFallbackWarning,
    FisherMCOperator,
    GGNOperator,
    GradientCovarianceOperator,
    HessianOperator,
    ParamSpace,
    Problem,
    ResidualOperator,
)
from curvscope.linops import LinearOperator

__version__ = "0.1.0"

__all__ = [
    # problem
    "ParamSpace",
    "Problem",
    # operators
    "CombinedCurvatureOperator",
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "EngineFallbackWarning",
    "FisherMCOperator",
    "GGNOperator",
    "GradientCovarianceOperator",
    "HessianOperator",
    "LinearOperator",
    "ResidualOperator",
    "linops",
    "__version__",
]
