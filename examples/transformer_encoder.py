"""A run file: a classifier built on ``nn.TransformerEncoderLayer``, on synthetic sequences.

    curvscope run examples/transformer_encoder.py --budget small --threads 1

Plain PyTorch: a linear embedding of 8 features per position, a learned position embedding, one
``nn.TransformerEncoderLayer`` (``batch_first=True``, width 32, 2 heads), mean pooling and a
linear head; trained for a few dozen Adam steps on sequences whose class decides a pattern over
positions and features, then analysed in eval mode. In eval mode the layer would take PyTorch's
fused fast path (``_transformer_encoder_layer_fwd``, no derivatives) whenever no input needs a
gradient, and its attention calls ``F.scaled_dot_product_attention``; curvscope turns the fast path
off and takes second derivatives on SDPA's math path. Trained in float32, analysed in float64.
"""

import torch
from _synthetic import batches, train
from torch import nn

NUM_CLASSES, LENGTH, FEATURES, WIDTH, N_TRAIN, N_TEST, BATCH = 4, 8, 8, 32, 128, 64, 48


class EncoderClassifier(nn.Module):
    """``head(mean_t(encoder(embed(x) + pos)))`` for ``x`` of shape ``[n, LENGTH, FEATURES]``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, WIDTH)
        self.pos = nn.Parameter(0.1 * torch.randn(LENGTH, WIDTH))
        self.encoder = nn.TransformerEncoderLayer(WIDTH, nhead=2, dim_feedforward=2 * WIDTH,
                                                  dropout=0.1, batch_first=True)
        self.head = nn.Linear(WIDTH, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x) + self.pos).mean(dim=1))


def _sequences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence ``i`` of class ``i mod C``: its class pattern ``[LENGTH, FEATURES]`` plus noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(NUM_CLASSES, LENGTH, FEATURES, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % NUM_CLASSES
    x = patterns[y] + 1.5 * torch.randn(n, LENGTH, FEATURES, generator=g)
    return x.double(), y


def _batches(x: torch.Tensor, y: torch.Tensor) -> list:
    return batches(x, y, BATCH)


def model() -> nn.Module:
    """About 9k parameters, trained for 40 steps (with dropout), returned in eval mode."""
    torch.manual_seed(0)
    net = EncoderClassifier()
    train(net, *_sequences(N_TRAIN, seed=1), steps=40, lr=3e-3)
    return net.double().eval()


def loss() -> nn.Module:
    return nn.CrossEntropyLoss()


def data() -> list:
    return _batches(*_sequences(N_TRAIN, seed=1))


def test_data() -> list:
    return _batches(*_sequences(N_TEST, seed=2))
