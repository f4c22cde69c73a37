"""A run file: torchvision's ResNet-18, width-reduced, on class-structured synthetic images.

    curvscope run examples/torchvision_resnet.py --budget small --threads 1

torchvision's ``ResNet`` with the ResNet-18 layout (``BasicBlock``, ``[2, 2, 2, 2]``) and its stem,
at 1/16 of its widths (stages of 4, 8, 16, 32 channels instead of 64 ... 512; random
initialisation, nothing is downloaded), trained for 18 Adam steps in train mode (to a loss of
about 0.07; trained to zero loss, the Hessian would vanish), its BatchNorm running statistics
then recomputed for the final weights, and analysed in eval mode. torchvision fixes the widths of
a ``BasicBlock`` ResNet (``width_per_group`` is for ``Bottleneck`` blocks only), so
:func:`narrow_resnet18` sets up torchvision's ``ResNet`` at a smaller width and builds the stages
with torchvision's own ``_make_layer``; the forward pass, module names and initialisation rule are
torchvision's. Trained in float32, analysed in float64.

PyPI's torchvision is built for CUDA; :func:`curvscope.testing.import_torchvision` makes its
pure-Python parts (the models) import beside a CPU-only torch. Needs the torchvision that matches
the installed torch (``make venv`` installs it).
"""

import torch
from _synthetic import batches, class_images, train
from torch import nn

from curvscope.testing import import_torchvision

NUM_CLASSES, SIZE, WIDTH, N_TRAIN, N_TEST, BATCH = 4, 16, 4, 100, 64, 48


def narrow_resnet18(width: int, num_classes: int) -> nn.Module:
    """ResNet-18 of torchvision with stage widths ``width * (1, 2, 4, 8)`` (torchvision: 64)."""
    resnet = import_torchvision().models.resnet

    class NarrowResNet(resnet.ResNet):
        """torchvision's ``ResNet.__init__`` with ``64`` replaced by ``width`` (and 128, 256, 512)."""

        def __init__(self) -> None:
            nn.Module.__init__(self)
            self._norm_layer = nn.BatchNorm2d
            self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.layer1 = self._make_layer(resnet.BasicBlock, width, 2)
            self.layer2 = self._make_layer(resnet.BasicBlock, 2 * width, 2, stride=2)
            self.layer3 = self._make_layer(resnet.BasicBlock, 4 * width, 2, stride=2)
            self.layer4 = self._make_layer(resnet.BasicBlock, 8 * width, 2, stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(8 * width, num_classes)
            for m in self.modules():  # torchvision's initialisation rule
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

    return NarrowResNet()


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return class_images(n, seed, NUM_CLASSES, SIZE, noise=1.5)


def _batches(x: torch.Tensor, y: torch.Tensor) -> list:
    return batches(x, y, BATCH)


def model() -> nn.Module:
    """About 45k parameters, trained for 18 steps (train-mode BatchNorm), returned in eval mode."""
    torch.manual_seed(0)
    net = narrow_resnet18(WIDTH, NUM_CLASSES)
    x, y = _images(N_TRAIN, seed=1)
    train(net, x, y, steps=18, lr=3e-3)
    x = x.float()
    with torch.no_grad():  # running statistics of the final weights ("precise BN"), as eval uses them
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a cumulative average: one pass over all the images
        net(x)
    return net.double().eval()


def loss() -> nn.Module:
    return nn.CrossEntropyLoss()


def data() -> list:
    return _batches(*_images(N_TRAIN, seed=1))


def test_data() -> list:
    return _batches(*_images(N_TEST, seed=2))
