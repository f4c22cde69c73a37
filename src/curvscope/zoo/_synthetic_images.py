"""A small CNN with BatchNorm on class-structured synthetic images.

Data: each class ``c`` has a smooth mean pattern ``m_c`` (a ``channels x 4 x 4`` Gaussian grid
upsampled bilinearly to ``size x size`` and scaled to unit root-mean-square); an image of class
``c`` is ``m_c`` rolled by a random shift of up to ``max_shift`` pixels in each direction, plus
independent Gaussian pixel noise of standard deviation ``noise``. The random shifts make the
task one for a convolutional network (a linear classifier on the pixels does worse); the noise
keeps it from being trivial.

Model: ``conv3x3(c1)-BN-ReLU-maxpool2 -> conv3x3(c2)-BN-ReLU-maxpool2 -> linear(C)``, trained in
train mode and returned in eval mode (BatchNorm uses its running statistics).

This is a synthetic stand-in for the image-classification settings of Papyan (2019, 2020),
where class structure in the data shows in the outliers of the Hessian spectrum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
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

__all__ = ["synthetic_images_cnn"]


def _class_patterns(num_classes: int, channels: int, size: int, g: torch.Generator,
                    dtype: torch.dtype) -> Tensor:
    coarse = torch.randn(num_classes, channels, 4, 4, generator=g, dtype=torch.float64)
    fine = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    fine = fine - fine.mean(dim=(1, 2, 3), keepdim=True)
    fine = fine / fine.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    return fine.to(dtype)


def _sample(patterns: Tensor, per_class: int, noise: float, max_shift: int,
            g: torch.Generator) -> tuple[Tensor, Tensor]:
    C = patterns.shape[0]
    y = torch.arange(C).repeat_interleave(per_class)
    X = patterns[y].clone()
    if max_shift:
        shifts = torch.randint(-max_shift, max_shift + 1, (len(y), 2), generator=g)
        for i in range(len(y)):
            X[i] = torch.roll(X[i], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2))
    X = X + noise * torch.randn(X.shape, generator=g, dtype=X.dtype)
    perm = torch.randperm(len(y), generator=g)
    return X[perm], y[perm]


def synthetic_images_cnn(
    num_classes: int = 10,
    *,
    channels: int = 1,
    size: int = 12,
    n_per_class: int = 100,
    n_test_per_class: int = 50,
    noise: float = 1.0,
    max_shift: int = 2,
    conv_channels: tuple[int, int] = (8, 16),
    steps: int = 300,
    lr: float = 1e-2,
    train_batch_size: int = 64,
    batch_size: int = 500,
    checkpoint_steps: Sequence[int] = (0,),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> ZooProblem:
    """A small CNN with BatchNorm trained on class-structured synthetic images (eval mode).

    Images ``[channels, size, size]`` (default ``1 x 12 x 12``): a smooth class pattern of unit
    RMS, randomly shifted by up to ``max_shift`` pixels (circularly), plus Gaussian noise of
    standard deviation ``noise`` per pixel. The model is
    ``conv3x3(c1)-BN-ReLU-pool -> conv3x3(c2)-BN-ReLU-pool -> linear``, trained by minibatch Adam
    (``steps`` steps, well under a second on a CPU) and returned in eval mode. With the
    defaults: 2746 parameters, training accuracy 100 %, held-out accuracy about 97 % (a
    logistic regression on the pixels: about 75-80 %).

    Args:
        num_classes: ``C >= 2``.
        channels: image channels (``3`` for colour-like images).
        size: image side, a multiple of 4 (two 2x2 poolings).
        n_per_class: training images per class.
        n_test_per_class: held-out images per class (``0``: no ``test_batches``).
        noise: pixel noise standard deviation (the patterns have unit RMS).
        max_shift: largest random shift of a pattern, in pixels.
        conv_channels: ``(c1, c2)``, the channels of the two convolutions.
        steps: Adam steps.
        lr: Adam's learning rate.
        train_batch_size: minibatch size during training.
        batch_size: size of the batches in ``batches`` / ``test_batches``.
        checkpoint_steps: steps at which to save ``state_dict`` copies (the final state is
            always saved last).
        dtype: floating dtype of the data and the model.
        seed: seeds the data, the initialisation and the minibatch order. The global RNG is not
            touched.

    Returns:
        A :class:`ZooProblem` (``input_shape == (channels, size, size)``).

    Raises:
        ValueError: bad sizes (``size`` not a positive multiple of 4, ``num_classes < 2``, ...).
    """
    check_positive_int("num_classes", num_classes, 2)
    for name, value in (("channels", channels), ("n_per_class", n_per_class),
                        ("steps", steps), ("train_batch_size", train_batch_size),
                        ("batch_size", batch_size)):
        check_positive_int(name, value)
    check_positive_int("n_test_per_class", n_test_per_class, 0)
    check_positive_int("max_shift", max_shift, 0)
    check_positive_int("size", size, 4)
    if size % 4:
        raise ValueError(f"size must be a multiple of 4 (two 2x2 poolings), got {size}.")
    if len(conv_channels) != 2:
        raise ValueError(f"conv_channels must be a pair (c1, c2), got {conv_channels!r}.")
    c1, c2 = (check_positive_int("conv_channels", c) for c in conv_channels)
    dtype = check_float_dtype(dtype)
    g = torch.Generator().manual_seed(seed)
    patterns = _class_patterns(num_classes, channels, size, g, dtype)
    X, y = _sample(patterns, n_per_class, noise, max_shift, g)
    with seeded(seed):
        model = nn.Sequential(
            nn.Conv2d(channels, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * (size // 4) ** 2, num_classes),
        ).to(dtype)
    loss_fn = nn.CrossEntropyLoss()
    checkpoints = train(model, loss_fn, X, y, steps=steps, lr=lr,
                               batch_size=train_batch_size, generator=g,
                               checkpoint_steps=checkpoint_steps)
    batches = split_batches(X, y, batch_size)
    train_loss, train_acc = evaluate(model, loss_fn, batches)
    test_batches = test_loss = test_acc = None
    if n_test_per_class:
        Xt, yt = _sample(patterns, n_test_per_class, noise, max_shift, g)
        test_batches = split_batches(Xt, yt, batch_size)
        test_loss, test_acc = evaluate(model, loss_fn, test_batches)
    return ZooProblem(
        f"synthetic_images_cnn(C={num_classes})", model, loss_fn, batches, num_classes,
        train_loss, train_acc,
        test_batches=test_batches, test_loss=test_loss, test_accuracy=test_acc,
        checkpoints=checkpoints, input_shape=(channels, size, size),
        description=(
            f"{num_classes} classes of synthetic {channels}x{size}x{size} images (smooth class "
            f"pattern, shifts up to {max_shift} px, noise {noise}); CNN conv({c1})-BN-ReLU-pool-"
            f"conv({c2})-BN-ReLU-pool-linear trained by minibatch Adam, in eval mode."
        ),
        metadata={"seed": seed, "noise": noise, "max_shift": max_shift, "lr": lr,
                  "steps": steps, "patterns": patterns},
    )
