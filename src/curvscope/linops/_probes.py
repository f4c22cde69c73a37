"""Random probe vectors on an operator's device and dtype, from an explicit generator."""

from __future__ import annotations

import torch
from torch import Tensor

DISTRIBUTIONS = ("rademacher", "gaussian", "sphere")


def random_probes(
    n: int,
    k: int,
    *,
    distribution: str = "rademacher",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``k`` random vectors of length ``n`` as the columns of an ``[n, k]`` tensor.

    ``rademacher``: entries +-1; ``gaussian``: standard normal; ``sphere``: uniform on the sphere
    of radius ``sqrt(n)`` (so ``E[z z^T] = I`` for all three). Drawn on the generator's device
    (CPU by default) and moved, so a CPU generator gives the same numbers for every device.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
    if n < 1 or k < 0:
        raise ValueError(f"expected n >= 1 and k >= 0, got n={n}, k={k}.")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if distribution == "rademacher":
        Z = torch.randint(0, 2, (n, k), generator=generator, device=gen_device).to(torch.float64)
        Z = 2 * Z - 1
    else:
        Z = torch.randn(n, k, generator=generator, device=gen_device, dtype=torch.float64)
        if distribution == "sphere":
            Z = Z * (n**0.5 / Z.norm(dim=0, keepdim=True).clamp_min(1e-300))
    return Z.to(dtype=dtype, device=device)


def check_generator(generator: object) -> None:
    """Raise a clear ``TypeError`` unless ``generator`` is ``None`` or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}; use "
            "torch.Generator().manual_seed(0)."
        )
