"""Where and when a result was computed: versions, machine (no host name), time, peak memory."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import sys
from typing import Any

import numpy as np
import torch

__all__ = ["peak_host_memory", "provenance"]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def peak_host_memory() -> int | None:
    """Peak resident memory of this process in bytes (``ru_maxrss``: KiB on Linux, bytes on
    macOS), or ``None`` where :mod:`resource` does not exist (Windows).
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return rss if sys.platform == "darwin" else rss * 1024


def provenance(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where and when a result was computed: versions, machine (no host name), time, peak memory.

    Peak memory is ``torch.cuda.max_memory_allocated()`` when CUDA is available, else the peak
    resident memory of the process (``getrusage(RUSAGE_SELF).ru_maxrss``) in bytes; the source is
    recorded in ``peak_memory_source``. ``extra`` entries are added last (and win).

    Example:
        >>> p = provenance({"seed": 0})
        >>> p["seed"], "torch" in p["versions"], "node" in p["machine"]
        (0, True, False)
    """
    import curvscope

    cuda = torch.cuda.is_available()
    machine: dict[str, Any] = {
        "system": platform.system(), "release": platform.release(),
        "platform": platform.platform(), "architecture": platform.machine(),
        "processor": platform.processor() or None, "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(), "cuda_available": cuda,
    }
    if cuda:
        machine["cuda_devices"] = [torch.cuda.get_device_name(i)
                                   for i in range(torch.cuda.device_count())]
    host_peak = peak_host_memory()
    out: dict[str, Any] = {
        "versions": {
            "curvscope": curvscope.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "matplotlib": _version("matplotlib"),
        },
        "machine": machine,
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if cuda else host_peak,
        "peak_memory_source": ("torch.cuda.max_memory_allocated" if cuda
                               else "getrusage(RUSAGE_SELF).ru_maxrss"),
        "peak_host_memory_bytes": host_peak,
    }
    if extra:
        out.update(extra)
    return out
