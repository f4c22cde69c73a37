"""A run file for `curvscope run examples/small_cnn.py`: a small CNN on class-structured images.

The contract (see `curvscope run --help`): define model(), loss() and data() factories; optionally
test_data(), problem_options() and checkpoints(). Everything here is seeded and self-contained.
"""

import torch
from torch import nn

NUM_CLASSES, SIZE, N_TRAIN, N_TEST = 4, 10, 256, 128


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(NUM_CLASSES, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % NUM_CLASSES
    x = patterns[y] + 0.8 * torch.randn(n, 1, SIZE, SIZE, generator=g)
    return x, y


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 64) -> list:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def model() -> nn.Module:
    """Conv - BatchNorm - ReLU - pool - linear, trained for a few hundred steps."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * (SIZE // 2) ** 2, NUM_CLASSES))
    x, y = _images(N_TRAIN, seed=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def loss() -> nn.Module:
    return nn.CrossEntropyLoss()


def data() -> list:
    return _batches(*_images(N_TRAIN, seed=1))


def test_data() -> list:
    return _batches(*_images(N_TEST, seed=2))
