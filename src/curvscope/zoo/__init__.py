"""Embedded default problems: no downloads, seeded, small enough to train in seconds on a CPU.

Each builder returns a :class:`ZooProblem` (a trained model in eval mode, its loss, its training
batches, held-out batches where the data allow, checkpoints along training, and facts about it)
and leaves torch's global random state untouched.

============================  =======  ====================================================
name                          params   data and model
============================  =======  ====================================================
``gaussian_mixture``          4,270    Sagun et al.'s Gaussian mixture (R^100, C = 10);
                                       MLP 100-30-30-C, ReLU, float64
``digits_mlp``                2,410    scikit-learn's 8x8 digits; MLP 64-32-10, tanh
``digits_cnn``                1,946    scikit-learn's 8x8 digits; CNN with BatchNorm
``synthetic_images_cnn``      2,746    shifted class patterns + noise, 1x12x12; CNN with BN
``char_transformer``          12,557   Zen of Python, next character; 1-layer transformer
``synthetic_images_resnet18`` 11.2M    workload W1: torchvision's ResNet-18 (written here, no
                                       torchvision needed) at initialisation, 2048 synthetic
                                       3x32x32 images; not trained (seconds to build)
============================  =======  ====================================================

The digits problems need scikit-learn (``pip install 'curvscope[zoo]'``); :func:`available`
says which problems can be built here.

Example:
    >>> import curvscope as cs
    >>> from curvscope import zoo
    >>> zp = zoo.load("gaussian_mixture", num_classes=5)
    >>> P = cs.Problem(zp.model, zp.loss_fn, zp.batches)
    >>> P.num_params, P.num_data
    (4115, 500)
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from typing import Any

from curvscope.zoo._base import ZooProblem
from curvscope.zoo._char_transformer import (
    CharTransformer,
    SequenceCrossEntropy,
    char_transformer,
    zen_of_python,
)
from curvscope.zoo._digits import digits_cnn, digits_mlp, load_digits_tensors
from curvscope.zoo._gaussian_mixture import gaussian_mixture
from curvscope.zoo._resnet import ResNet, resnet18, synthetic_images_resnet18
from curvscope.zoo._synthetic_images import synthetic_images_cnn

__all__ = [
    "PROBLEMS",
    "CharTransformer",
    "ResNet",
    "SequenceCrossEntropy",
    "ZooProblem",
    "available",
    "char_transformer",
    "digits_cnn",
    "digits_mlp",
    "gaussian_mixture",
    "load",
    "load_digits_tensors",
    "resnet18",
    "synthetic_images_cnn",
    "synthetic_images_resnet18",
    "zen_of_python",
]

#: The builders, by name.
PROBLEMS: dict[str, Callable[..., ZooProblem]] = {
    "gaussian_mixture": gaussian_mixture,
    "digits_mlp": digits_mlp,
    "digits_cnn": digits_cnn,
    "synthetic_images_cnn": synthetic_images_cnn,
    "char_transformer": char_transformer,
    "synthetic_images_resnet18": synthetic_images_resnet18,
}

#: Optional dependencies: problem name -> (import name, the extra that installs it).
REQUIREMENTS: dict[str, tuple[str, str]] = {
    "digits_mlp": ("sklearn", "pip install 'curvscope[zoo]'"),
    "digits_cnn": ("sklearn", "pip install 'curvscope[zoo]'"),
}


def available() -> dict[str, bool]:
    """Every problem's name, and whether its optional dependency is installed.

    Example:
        >>> sorted(available())[:2]
        ['char_transformer', 'digits_cnn']
        >>> available()["gaussian_mixture"]
        True
    """
    return {name: name not in REQUIREMENTS or _installed(REQUIREMENTS[name][0]) for name in PROBLEMS}


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def load(name: str, **kwargs: Any) -> ZooProblem:
    """Build and train the problem ``name`` (see :data:`PROBLEMS`) with the builder's ``kwargs``.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: an unknown name (the message lists the known ones).
        ImportError: the problem's optional dependency is missing (the message names the extra).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str (one of {sorted(PROBLEMS)}), got {type(name).__name__}.")
    if name not in PROBLEMS:
        raise ValueError(f"unknown zoo problem {name!r}; expected one of {sorted(PROBLEMS)}.")
    return PROBLEMS[name](**kwargs)
