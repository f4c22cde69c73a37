"""Linear operators over flat tensors: the base class, structured operators and composition."""

from curvscope.linops._base import (
    PSD,
    SYMMETRIC,
    IdentityOperator,
    LinearOperator,
    ProductOperator,
    SumOperator,
)
from curvscope.linops._compose import RestrictedOperator
from curvscope.linops._structured import DenseOperator, DiagonalOperator, LowRankOperator

__all__ = [
    "PSD",
    "SYMMETRIC",
    "DenseOperator",
    "DiagonalOperator",
    "IdentityOperator",
    "LinearOperator",
    "LowRankOperator",
    "ProductOperator",
    "RestrictedOperator",
    "SumOperator",
]
