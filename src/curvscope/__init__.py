"""curvscope: the curvature of deep-network losses at full scale.

Build a :class:`Problem` from a model, a loss and data, then a curvature operator on it
(:class:`HessianOperator`, :class:`GGNOperator`, :class:`FisherMCOperator`,
:class:`EmpiricalFisherOperator`, :class:`GradientCovarianceOperator`, :func:`ResidualOperator`):
symmetric linear operators over the flat parameter vector, ``A @ V`` for ``V`` of shape ``[P, k]``
in one pass over the data. The main job in one call: :func:`run_study` (what ``curvscope run``
does: :func:`analyze`, the further sections, :func:`save_bundle`; resumable).
"""

from curvscope import linops
from curvscope._checkpoint import CheckpointCorruptedError, CheckpointError, CheckpointMismatchError
from curvscope.curvature import (
    HESSIAN_KERNELS,
    AttentionBackendWarning,
    CausalLMLoss,
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
    ModelOutputLoss,
    ParamSpace,
    Problem,
    ResidualOperator,
    TokenCrossEntropyLoss,
)
from curvscope.estimators import (
    DiagonalEstimate,
    SpectralDensity,
    TraceEstimate,
    hutchinson_block_traces,
    hutchinson_diagonal,
    hutchinson_frobenius,
    hutchinson_trace,
    hutchpp_trace,
    slq,
    xdiag,
    xtrace,
)
from curvscope.linops import LinearOperator
from curvscope.solvers import (
    ConvergenceError,
    ConvergenceWarning,
    EigenResult,
    LanczosResult,
    eigsh,
    lanczos,
    power_iteration,
    subspace_iteration,
)
from curvscope.solvers.sketch import nystrom_eigh, sketch_eigh

__version__ = "0.1.0"

# the main job (problem -> analysis -> report), as the CLI runs it
from curvscope._progress import ProgressUpdate, StagePlan  # noqa: E402
from curvscope.analysis.spectrum import SpectrumAnalysis, analyze  # noqa: E402
from curvscope.report.bundle import load_bundle, save_bundle  # noqa: E402
from curvscope.study import Study, StudyMismatchError, run_study  # noqa: E402

__all__ = [
    # the main job
    "ProgressUpdate",
    "SpectrumAnalysis",
    "StagePlan",
    "Study",
    "StudyMismatchError",
    "analyze",
    "load_bundle",
    "run_study",
    "save_bundle",
    # problem
    "ParamSpace",
    "Problem",
    # losses
    "CausalLMLoss",
    "ModelOutputLoss",
    "TokenCrossEntropyLoss",
    # warnings and errors of the products
    "AttentionBackendWarning",
    "CurvatureProductError",
    "EngineMismatchWarning",
    # operators
    "CombinedCurvatureOperator",
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "EngineFallbackWarning",
    "HESSIAN_KERNELS",
    "FisherMCOperator",
    "GGNOperator",
    "GradientCovarianceOperator",
    "HessianOperator",
    "LinearOperator",
    "ResidualOperator",
    "linops",
    # solvers
    "eigsh",
    "lanczos",
    "nystrom_eigh",
    "power_iteration",
    "sketch_eigh",
    "subspace_iteration",
    # estimators
    "hutchinson_block_traces",
    "hutchinson_diagonal",
    "hutchinson_frobenius",
    "hutchinson_trace",
    "hutchpp_trace",
    "slq",
    "xdiag",
    "xtrace",
    # resumable runs
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointMismatchError",
    # results
    "ConvergenceError",
    "ConvergenceWarning",
    "DiagonalEstimate",
    "EigenResult",
    "LanczosResult",
    "SpectralDensity",
    "TraceEstimate",
    "__version__",
]
