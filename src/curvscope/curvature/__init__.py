"""Problems (model + loss + data) and the curvature operators built on them."""

from curvscope.curvature._operators import (
    CombinedCurvatureOperator,
    CurvatureOperator,
    EmpiricalFisherOperator,
    EngineFallbackWarning,
    FisherMCOperator,
    GGNOperator,
    GradientCovarianceOperator,
    HessianOperator,
    ResidualOperator,
)
from curvscope.curvature._param_space import ParamSpace, select_parameters
from curvscope.curvature._problem import Batch, Problem

__all__ = [
    "Batch",
    "CombinedCurvatureOperator",
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "EngineFallbackWarning",
    "FisherMCOperator",
    "GGNOperator",
    "GradientCovarianceOperator",
    "HessianOperator",
    "ParamSpace",
    "Problem",
    "ResidualOperator",
    "select_parameters",
]
