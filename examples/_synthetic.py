"""What the example run files share: class-structured synthetic data and a short training loop.

A run file may import a module beside it (``curvscope run`` puts the file's folder on the path,
as ``python FILE`` would); a copy of a run file needs this file too.
"""

import torch
from torch import nn


def class_images(n: int, seed: int, num_classes: int, size: int,
                 noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Image ``i`` of class ``i mod C``: its class pattern (smooth, 3 channels) plus noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    patterns = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    y = torch.arange(n) % num_classes
    x = patterns[y] + noise * torch.randn(n, 3, size, size, generator=g)
    return x.double(), y


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list:
    """``(x, y)`` in consecutive batches of ``size`` (the last one may be shorter)."""
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    """Full-batch Adam on the cross-entropy, in float32 and train mode (the caller switches back)."""
    x = x.float()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
