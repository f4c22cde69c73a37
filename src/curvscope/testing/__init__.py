"""Testing utilities: dense float64 ground truth (`dense`), tiny seeded problems (`problems`) and
imports of torchvision / timm / transformers that work beside a CPU-only torch (`_thirdparty`).
"""

from ._thirdparty import import_timm, import_torchvision, import_transformers, matching_torchvision
from .dense import (
    dense_empirical_fisher,
    dense_ggn,
    dense_gradient,
    dense_gradient_covariance,
    dense_hessian,
    dense_hessian_checked,
    dense_jacobian,
    dense_loss,
    flat_params,
    per_example_gradients,
)
from .problems import (
    TinyHFClassifier,
    TinyHFOutput,
    TinyProblem,
    gaussian_blobs,
    tiny_cnn,
    tiny_hf_model,
    tiny_mlp,
)
from .spectra import PlantedOperator, planted_matrix

__all__ = [
    "flat_params",
    "dense_loss",
    "dense_gradient",
    "dense_hessian",
    "dense_hessian_checked",
    "dense_jacobian",
    "dense_ggn",
    "per_example_gradients",
    "dense_empirical_fisher",
    "dense_gradient_covariance",
    "PlantedOperator",
    "planted_matrix",
    "TinyProblem",
    "TinyHFOutput",
    "TinyHFClassifier",
    "tiny_mlp",
    "tiny_cnn",
    "tiny_hf_model",
    "gaussian_blobs",
    "import_torchvision",
    "import_timm",
    "import_transformers",
    "matching_torchvision",
]
