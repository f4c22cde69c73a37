"""ResNet-18 (He et al. 2016), written here so that no torchvision is needed, and the W1 workload.

:func:`resnet18` builds the same network as ``torchvision.models.resnet18(num_classes=C)``:
the same modules under the same names (a torchvision ``state_dict`` loads into it and back), the
same initialisation rule (Kaiming-normal ``fan_out`` convolutions, BatchNorm weight 1 / bias 0,
PyTorch's default ``Linear``), the same forward pass. With ``width=64`` and ``C = 10`` it has
11,181,642 parameters. ``width`` scales every layer's channels (``width/64`` of torchvision's), for
cost-vs-size sweeps from about 0.2M (``width=16``) to 100M+ parameters (``width=192``).

:func:`synthetic_images_resnet18` is the team's reference workload W1 (``shared/bench/
baselines.md``): the network at initialisation, in eval mode, on ``n`` class-structured synthetic
``3 x 32 x 32`` images (a Gaussian class mean per class plus ``noise`` times Gaussian noise),
cross-entropy, batches of 256.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvscope.zoo._base import (
    ZooProblem,
    check_float_dtype,
    check_positive_int,
    evaluate,
    seeded,
    split_batches,
)

__all__ = ["BasicBlock", "ResNet", "resnet18", "synthetic_images_resnet18"]


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))``, torchvision's names."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with :class:`BasicBlock` s (``layers`` blocks per stage), torchvision's layout."""

    def __init__(self, layers: tuple[int, int, int, int] = (2, 2, 2, 2), num_classes: int = 1000,
                 width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(width, width, layers[0], 1)
        self.layer2 = self._stage(width, 2 * width, layers[1], 2)
        self.layer3 = self._stage(2 * width, 4 * width, layers[2], 2)
        self.layer4 = self._stage(4 * width, 8 * width, layers[3], 2)
        c = 8 * width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(c_in, c_out, stride),
                             *(BasicBlock(c_out, c_out) for _ in range(blocks - 1)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, *, width: int = 64, in_channels: int = 3) -> ResNet:
    """The ResNet-18 of torchvision (``width=64``), or the same network ``width/64`` as wide.

    Parameters: ``11,176,512 + 513 * num_classes`` at ``width=64`` (11,181,642 for 10 classes);
    they grow as ``width**2``.

    Example:
        >>> m = resnet18(10)
        >>> sum(p.numel() for p in m.parameters())
        11181642
    """
    check_positive_int("num_classes", num_classes)
    check_positive_int("width", width)
    return ResNet((2, 2, 2, 2), num_classes, width, in_channels)


def synthetic_images_resnet18(
    num_classes: int = 10,
    *,
    n: int = 2048,
    batch_size: int = 256,
    noise: float = 0.5,
    size: int = 32,
    width: int = 64,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> ZooProblem:
    """Workload W1: ResNet-18 at initialisation (eval mode) on class-structured synthetic images.

    Image ``i`` of class ``y_i = i mod C`` (then shuffled) is ``m_{y_i} + noise * e_i`` with class
    means ``m_c`` and ``e_i`` standard Gaussian ``3 x size x size``. Not trained: the issue's
    reference figures are at initialisation, where a ResNet's Hessian is already dominated by
    class structure (its loss is about ``log C``).

    Args:
        num_classes: ``C >= 2``.
        n: number of images.
        batch_size: images per batch (the last batch may be shorter).
        noise: standard deviation of the per-pixel noise around the class mean.
        size: image side (32 in W1; anything >= 1 works, the network pools adaptively).
        width: channels of the first stage (64: torchvision's ResNet-18, 11.2M parameters).
        dtype: floating dtype of the data and the model.
        seed: seeds the data and the initialisation; the global RNG is not touched.

    Returns:
        A :class:`ZooProblem` (``input_shape == (3, size, size)``, one checkpoint: step 0).
    """
    check_positive_int("num_classes", num_classes, 2)
    for name, value in (("n", n), ("batch_size", batch_size), ("size", size), ("width", width)):
        check_positive_int(name, value)
    dtype = check_float_dtype(dtype)
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, 3, size, size, generator=g)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    X = (means[y] + noise * torch.randn(n, 3, size, size, generator=g)).to(dtype)
    with seeded(seed):
        model = resnet18(num_classes, width=width).to(dtype).eval()
    loss_fn = nn.CrossEntropyLoss()
    batches = split_batches(X, y, batch_size)
    train_loss, train_acc = evaluate(model, loss_fn, batches)
    params = sum(p.numel() for p in model.parameters())
    return ZooProblem(
        f"synthetic_images_resnet18(C={num_classes}, width={width})", model, loss_fn, batches,
        num_classes, train_loss, train_acc,
        checkpoints=[(0, {k: v.detach().clone() for k, v in model.state_dict().items()})],
        input_shape=(3, size, size),
        description=(
            f"W1: ResNet-18 (torchvision layout, width {width}, {params:,} parameters) at "
            f"initialisation, eval mode, on {n} synthetic 3x{size}x{size} images in {num_classes} "
            f"classes (class means + {noise} x Gaussian noise), batches of {batch_size}."
        ),
        metadata={"seed": seed, "noise": noise, "width": width},
    )
