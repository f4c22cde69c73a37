"""A run file: a shrunk timm Vision Transformer on class-structured synthetic images.

    curvscope run examples/timm_vit.py --budget small --threads 1

timm's ``vit_tiny_patch16_224`` architecture, shrunk through ``timm.create_model`` arguments (16 x 16
images, 4 x 4 patches, 2 blocks of width 24 with 2 heads; random initialisation, nothing is
downloaded), trained for a few dozen Adam steps on images that are a class pattern plus noise.
timm's attention calls ``F.scaled_dot_product_attention`` (its fused path); curvscope takes the
second derivatives on SDPA's math path. Trained in float32, analysed in float64.

timm imports torchvision: :func:`curvscope.testing.import_timm` makes PyPI's torchvision (built for
CUDA) import beside a CPU-only torch. Needs ``pip install timm`` and the torchvision that matches
the installed torch (``make venv`` installs both).
"""

import torch
from _synthetic import batches, class_images, train
from torch import nn

from curvscope.testing import import_timm

NUM_CLASSES, SIZE, N_TRAIN, N_TEST, BATCH = 4, 16, 100, 64, 48


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return class_images(n, seed, NUM_CLASSES, SIZE, noise=0.8)


def _batches(x: torch.Tensor, y: torch.Tensor) -> list:
    return batches(x, y, BATCH)


def model() -> nn.Module:
    """ViT with 2 blocks of width 24: about 16k parameters, trained for 40 steps."""
    timm = import_timm()
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES,
                            img_size=SIZE, patch_size=4, embed_dim=24, depth=2, num_heads=2)
    train(net, *_images(N_TRAIN, seed=1), steps=40, lr=2e-3)
    return net.double().eval()


def loss() -> nn.Module:
    return nn.CrossEntropyLoss()


def data() -> list:
    return _batches(*_images(N_TRAIN, seed=1))


def test_data() -> list:
    return _batches(*_images(N_TEST, seed=2))
