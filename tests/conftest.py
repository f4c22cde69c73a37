import pytest
import torch

# Tiny problems gain nothing from threads, and oversubscribed OpenMP threads are very slow on the
# shared 2-core machines.
torch.set_num_threads(1)

EPS64 = torch.finfo(torch.float64).eps


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error ||a - b|| / max(||b||, tiny)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
