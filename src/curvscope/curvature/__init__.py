"""Problems (model + loss + data) and the curvature operators built on them."""

from curvscope.curvature._attention import AttentionBackendWarning
from curvscope.curvature._engine_choice import HESSIAN_KERNELS
from curvscope.curvature._losses import CausalLMLoss, ModelOutputLoss, TokenCrossEntropyLoss
from curvscope.curvature._operators import (
    CombinedCurvatureOperator,
    CurvatureOperator,
    CurvatureProductError,
    EmpiricalFisherOperator,
    EngineFallbackWarning,
    EngineMismatchWarning,
    FisherMCOperator,
    GGNOperator,
    GradientCovarianceOperator,
    HessianOperator,
    ResidualOperator,
)
from curvscope.curvature._param_space import ParamSpace, select_parameters
from curvscope.curvature._problem import Batch, Problem

__all__ = [
    "HESSIAN_KERNELS",
    "AttentionBackendWarning",
    "Batch",
    "CausalLMLoss",
    "CurvatureProductError",
    "EngineMismatchWarning",
    "ModelOutputLoss",
    "TokenCrossEntropyLoss",
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
