"""Small classifiers of scikit-learn's bundled handwritten digits (no download).

Data: ``sklearn.datasets.load_digits``: 1797 grey-scale images of 8x8 pixels (values 0..16,
scaled here to [0, 1]) of the digits 0-9, from the UCI "Optical Recognition of Handwritten
Digits" data set; shipped inside scikit-learn, so nothing is downloaded. A seeded random split
keeps 25 % of the images as held-out ``test_batches``.

Models: an MLP ``64 -> 32 -> 10`` with tanh (smooth, so the Hessian has a non-zero residual
``H = Hessian - G`` beside the Gauss-Newton part), and a small CNN
``conv3x3(8)-BN-ReLU-maxpool-conv3x3(16)-BN-ReLU-maxpool-linear`` returned in eval mode.

Both need scikit-learn: ``pip install 'curvscope[zoo]'``.

Reference:
    E. Alpaydin, C. Kaynak, "Optical recognition of handwritten digits", UCI Machine Learning
    Repository (1998).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvscope.zoo._base import (
    ZooProblem,
    check_float_dtype,
    check_positive_int,
    evaluate,
    seeded,
    split_batches,
    train,
)

__all__ = ["digits_cnn", "digits_mlp", "load_digits_tensors"]

_EXTRA = "pip install 'curvscope[zoo]'"


def _sklearn_load_digits() -> Callable[..., Any]:
    try:
        datasets = importlib.import_module("sklearn.datasets")
    except ImportError as err:
        raise ImportError(
            "the digits problems need scikit-learn, which ships the 8x8 digits data set; "
            f"install it with: {_EXTRA} (or pip install scikit-learn)."
        ) from err
    return datasets.load_digits


def load_digits_tensors(
    *, test_fraction: float = 0.25, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits as tensors ``(X_train, y_train, X_test, y_test)``.

    ``X`` has shape ``[n, 1, 8, 8]`` with values in ``[0, 1]``; ``y`` is ``int64`` in ``0..9``.
    The split is a random permutation drawn from ``seed``.

    Raises:
        ImportError: scikit-learn is not installed (``pip install 'curvscope[zoo]'``).
        ValueError: ``test_fraction`` outside ``[0, 1)``.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}.")
    dtype = check_float_dtype(dtype)
    images, labels = _sklearn_load_digits()(return_X_y=True)
    X = torch.as_tensor(images, dtype=torch.float64).reshape(-1, 1, 8, 8).div(16.0).to(dtype)
    y = torch.as_tensor(labels, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(y))
    test, tr = perm[:n_test], perm[n_test:]
    return X[tr], y[tr], X[test], y[test]


def _build(
    kind: str,
    make_model: Callable[[], nn.Module],
    *,
    flatten: bool,
    steps: int,
    lr: float,
    train_batch_size: int,
    batch_size: int,
    test_fraction: float,
    checkpoint_steps: Sequence[int],
    dtype: torch.dtype,
    seed: int,
    description: str,
) -> ZooProblem:
    for name, value in (("steps", steps), ("train_batch_size", train_batch_size),
                        ("batch_size", batch_size)):
        check_positive_int(name, value)
    X, y, Xt, yt = load_digits_tensors(test_fraction=test_fraction, dtype=dtype, seed=seed)
    if flatten:
        X, Xt = X.flatten(1), Xt.flatten(1)
    with seeded(seed):
        model = make_model().to(dtype)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed + 1)
    checkpoints = train(model, loss_fn, X, y, steps=steps, lr=lr,
                               batch_size=train_batch_size, generator=g,
                               checkpoint_steps=checkpoint_steps)
    batches = split_batches(X, y, batch_size)
    train_loss, train_acc = evaluate(model, loss_fn, batches)
    test_batches = test_loss = test_acc = None
    if len(yt):
        test_batches = split_batches(Xt, yt, batch_size)
        test_loss, test_acc = evaluate(model, loss_fn, test_batches)
    return ZooProblem(
        kind, model, loss_fn, batches, 10, train_loss, train_acc,
        test_batches=test_batches, test_loss=test_loss, test_accuracy=test_acc,
        checkpoints=checkpoints, input_shape=tuple(X.shape[1:]),
        description=description,
        metadata={"seed": seed, "lr": lr, "steps": steps, "train_batch_size": train_batch_size,
                  "test_fraction": test_fraction},
    )


def digits_mlp(
    *,
    hidden: int = 32,
    steps: int = 600,
    lr: float = 1e-2,
    train_batch_size: int = 64,
    batch_size: int = 512,
    test_fraction: float = 0.25,
    checkpoint_steps: Sequence[int] = (0,),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> ZooProblem:
    """An MLP ``64 -> hidden -> 10`` (tanh) trained on scikit-learn's 8x8 digits.

    Inputs are the flattened images ``[n, 64]`` (pixels in ``[0, 1]``); 1348 training and 449
    held-out images. Training: ``steps`` Adam steps on minibatches of ``train_batch_size``
    (about a second on a CPU). With the defaults: 2410 parameters, training accuracy 100 %,
    held-out accuracy about 97 %.

    Args:
        hidden: width of the hidden layer.
        steps: Adam steps.
        lr: Adam's learning rate.
        train_batch_size: minibatch size during training.
        batch_size: size of the batches in ``batches`` / ``test_batches``.
        test_fraction: fraction of the 1797 images held out.
        checkpoint_steps: steps at which to save ``state_dict`` copies (the final state is
            always saved last).
        dtype: floating dtype of the data and the model.
        seed: seeds the split, the initialisation and the minibatch order. The global RNG is
            not touched.

    Returns:
        A :class:`ZooProblem` (``input_shape == (64,)``).

    Raises:
        ImportError: scikit-learn is not installed (``pip install 'curvscope[zoo]'``).
    """
    check_positive_int("hidden", hidden)
    return _build(
        "digits_mlp",
        lambda: nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)),
        flatten=True, steps=steps, lr=lr, train_batch_size=train_batch_size,
        batch_size=batch_size, test_fraction=test_fraction, checkpoint_steps=checkpoint_steps,
        dtype=dtype, seed=seed,
        description=(f"scikit-learn 8x8 digits (flattened, 10 classes); MLP 64-{hidden}-10 "
                     "with tanh, trained by minibatch Adam."),
    )


def digits_cnn(
    *,
    channels: tuple[int, int] = (8, 16),
    steps: int = 300,
    lr: float = 1e-2,
    train_batch_size: int = 64,
    batch_size: int = 512,
    test_fraction: float = 0.25,
    checkpoint_steps: Sequence[int] = (0,),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> ZooProblem:
    """A small CNN with BatchNorm trained on scikit-learn's 8x8 digits, returned in eval mode.

    ``conv3x3(c1)-BN-ReLU-maxpool2 -> conv3x3(c2)-BN-ReLU-maxpool2 -> linear(4 c2 -> 10)``
    on images ``[n, 1, 8, 8]`` (pixels in ``[0, 1]``); 1348 training and 449 held-out images.
    Training: ``steps`` Adam steps on minibatches of ``train_batch_size`` in train mode (batch
    statistics); the model is returned in eval mode, so BatchNorm uses its running statistics
    (the default ``mode="eval"`` of :class:`curvscope.Problem`). With the defaults: 1946
    parameters, training accuracy 100 %, held-out accuracy about 98 %.

    Args:
        channels: ``(c1, c2)``, the channels of the two convolutions.
        steps: Adam steps.
        lr: Adam's learning rate.
        train_batch_size: minibatch size during training.
        batch_size: size of the batches in ``batches`` / ``test_batches``.
        test_fraction: fraction of the 1797 images held out.
        checkpoint_steps: steps at which to save ``state_dict`` copies (the final state is
            always saved last).
        dtype: floating dtype of the data and the model.
        seed: seeds the split, the initialisation and the minibatch order. The global RNG is
            not touched.

    Returns:
        A :class:`ZooProblem` (``input_shape == (1, 8, 8)``).

    Raises:
        ImportError: scikit-learn is not installed (``pip install 'curvscope[zoo]'``).
    """
    if len(channels) != 2:
        raise ValueError(f"channels must be a pair (c1, c2), got {channels!r}.")
    c1, c2 = (check_positive_int("channels", c) for c in channels)
    return _build(
        "digits_cnn",
        lambda: nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(4 * c2, 10),
        ),
        flatten=False, steps=steps, lr=lr, train_batch_size=train_batch_size,
        batch_size=batch_size, test_fraction=test_fraction, checkpoint_steps=checkpoint_steps,
        dtype=dtype, seed=seed,
        description=(f"scikit-learn 8x8 digits (10 classes); CNN conv({c1})-BN-ReLU-pool-"
                     f"conv({c2})-BN-ReLU-pool-linear, trained by minibatch Adam, in eval mode."),
    )
