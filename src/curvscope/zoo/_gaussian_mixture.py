"""The Gaussian-mixture classifier of Sagun et al. (2017), tuned to show Papyan's outliers.

Data: ``C`` Gaussian classes in ``R^d`` (``d = 100``): ``x = mu_c + (noise / sqrt(d)) * eps``,
``eps ~ N(0, I_d)``, with random class means ``mu_c ~ N(0, I_d) * separation / sqrt(d)`` (so
``||mu_c|| ~ separation`` and ``E||x - mu_c||^2 = noise^2``), balanced classes.

Model: the MLP ``d -> 30 -> 30 -> C`` of Sagun et al. with ReLU activations, trained with
cross-entropy by full-batch Adam until the training loss reaches ``target_loss`` (0.05): low, but
not vanishing, so the softmax is not saturated and the Hessian has not collapsed to zero.

Why these settings. The noise (3) is larger than the separation of the means (1): per example the
data are noisy, but the classes are linearly separable in expectation (the means differ by about
``1.4`` along a direction where the noise has standard deviation ``0.3``). The trained Hessian then
shows the picture of Sagun et al. and Papyan clearly: a bulk near zero and ``C - 1`` outliers
(the class-mean gradient directions, which span ``C - 1`` dimensions because the softmax
cross-entropy gradient sums to zero over the classes; Papyan counts "about C"), separated from
the bulk by a factor 3 to 5 in eigenvalue (measured for C = 3 to 20 over several seeds; for
C = 2 there are two outliers). With ReLU the second derivatives of the
activations vanish, so the residual ``H - G`` comes only from products of weights of different
layers; it is small, and ``tr H = tr G`` exactly (the ReLU identity), but ``H != G`` (the top
eigenvalues differ by about 0.5 %): the outliers are Papyan's class and cross-class structure
of ``G``. Tanh (``activation="tanh"``) keeps a residual ``H`` but
shows the outliers less sharply (gap about 1.5 to 1.8). With separation larger than the noise,
or trained to vanishing loss, the gap blurs.

References:
    L. Sagun, U. Evci, V. U. Guney, Y. Dauphin, L. Bottou, "Empirical analysis of the Hessian of
    over-parametrized neural networks", ICLR workshop 2018 (arXiv:1706.04454).
    V. Papyan, "Measurements of three-level hierarchical structure in the outliers in the
    spectrum of deepnet Hessians", ICML 2019 (arXiv:1901.08244); V. Papyan, "Traces of
    class/cross-class structure pervade deep learning spectra", JMLR 2020 (arXiv:2008.11865).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from curvscope.zoo._base import (
    ZooProblem,
    check_float_dtype,
    check_positive_int,
    evaluate,
    seeded,
    split_batches,
    train,
)

__all__ = ["ZooProblem", "gaussian_mixture"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def gaussian_mixture(
    num_classes: int = 10,
    *,
    input_dim: int = 100,
    hidden: int = 30,
    activation: str = "relu",
    n_per_class: int = 100,
    n_test_per_class: int = 100,
    batch_size: int = 250,
    separation: float = 1.0,
    noise: float = 3.0,
    target_loss: float = 0.05,
    max_steps: int = 2000,
    lr: float = 1e-3,
    checkpoint_steps: Sequence[int] = (0, 10, 30, 100),
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> ZooProblem:
    """Build and train Sagun et al.'s Gaussian-mixture MLP (``R^100 -> 30 -> 30 -> C``, ReLU).

    The data are ``C`` balanced Gaussian classes ``x = mu_c + noise / sqrt(d) * eps`` with
    ``mu_c ~ N(0, I) * separation / sqrt(d)``; training is full-batch Adam (learning rate
    ``lr``) until the training cross-entropy is at most ``target_loss``, or ``max_steps``
    (about 150 steps for ``C = 5`` and 300 for ``C = 10``; well under a second on a CPU). The
    trained Hessian has ``C - 1`` outliers (up to ``C``, Papyan's count) well separated from the
    bulk: ``lambda_{C-1} / lambda_C`` is about 3 to 5 for ``C = 5`` and ``C = 10``.

    Args:
        num_classes: ``C >= 2``.
        input_dim: ``d``.
        hidden: width of both hidden layers.
        activation: ``"relu"`` (default; ``tr H = tr G`` and a small residual) or ``"tanh"``.
        n_per_class: training examples per class.
        n_test_per_class: held-out examples per class (``0``: no ``test_batches``).
        batch_size: size of the batches in ``batches`` / ``test_batches`` (training itself is
            full-batch).
        separation: scale of the class means (``||mu_c|| ~ separation``).
        noise: scale of the within-class noise (``E||x - mu_c||^2 = noise^2``).
        target_loss: stop training at this training loss (``0`` to always run ``max_steps``).
        max_steps: the most Adam steps.
        lr: Adam's learning rate.
        checkpoint_steps: steps at which to save ``state_dict`` copies (steps past the end of
            training are skipped; the final state is always saved last).
        dtype: floating dtype of the data and the model (float64 by default: dense ground truth
            and tight symmetry checks).
        seed: seeds the data, the initialisation and training. The global RNG is not touched.

    Returns:
        A :class:`ZooProblem` with ``batches`` covering ``C * n_per_class`` examples, held-out
        ``test_batches`` from the same mixture, and ``checkpoints`` along training.

    Raises:
        ValueError: ``num_classes < 2``, unknown ``activation``, or non-positive sizes.
        TypeError: ``dtype`` is not a floating dtype.

    Example:
        >>> zp = gaussian_mixture(5)
        >>> zp.num_params, zp.train_accuracy, zp.train_loss <= 0.05
        (4115, 1.0, True)
    """
    check_positive_int("num_classes", num_classes, 2)
    for name, value in (("input_dim", input_dim), ("hidden", hidden), ("n_per_class", n_per_class),
                        ("batch_size", batch_size), ("max_steps", max_steps)):
        check_positive_int(name, value)
    check_positive_int("n_test_per_class", n_test_per_class, 0)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}.")
    dtype = check_float_dtype(dtype)
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, input_dim, generator=g, dtype=dtype) * (
        separation / input_dim**0.5
    )

    def sample(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(num_classes).repeat_interleave(per_class)
        X = means[y] + noise / input_dim**0.5 * torch.randn(len(y), input_dim, generator=g,
                                                             dtype=dtype)
        perm = torch.randperm(len(y), generator=g)
        return X[perm], y[perm]

    X, y = sample(n_per_class)
    act = _ACTIVATIONS[activation]
    with seeded(seed):  # nn.Linear initialisation; the caller's global RNG is restored
        model = nn.Sequential(
            nn.Linear(input_dim, hidden), act(),
            nn.Linear(hidden, hidden), act(),
            nn.Linear(hidden, num_classes),
        ).to(dtype)
    loss_fn = nn.CrossEntropyLoss()
    checkpoints = train(model, loss_fn, X, y, steps=max_steps, lr=lr, batch_size=None,
                               generator=g, checkpoint_steps=checkpoint_steps,
                               target_loss=target_loss)
    batches = split_batches(X, y, batch_size)
    train_loss, train_acc = evaluate(model, loss_fn, batches)
    test_batches = test_loss = test_acc = None
    if n_test_per_class:
        Xt, yt = sample(n_test_per_class)
        test_batches = split_batches(Xt, yt, batch_size)
        test_loss, test_acc = evaluate(model, loss_fn, test_batches)
    return ZooProblem(
        f"gaussian_mixture(C={num_classes})", model, loss_fn, batches, num_classes,
        train_loss, train_acc,
        test_batches=test_batches, test_loss=test_loss, test_accuracy=test_acc,
        checkpoints=checkpoints, input_shape=(input_dim,),
        description=(
            f"{num_classes} Gaussian classes in R^{input_dim} (separation {separation}, noise "
            f"{noise}); MLP {input_dim}-{hidden}-{hidden}-{num_classes} ({activation}) trained by "
            f"full-batch Adam to cross-entropy {train_loss:.3g} (Sagun et al. 2017)."
        ),
        metadata={"seed": seed, "separation": separation, "noise": noise,
                  "activation": activation, "lr": lr, "target_loss": target_loss,
                  "means": means},
    )
