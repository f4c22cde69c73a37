"""Import torchvision, timm and transformers beside a CPU-only torch.

PyPI's torchvision wheel links ``libtorch_cuda``; beside the CPU build of torch its compiled
extension does not load, and ``import torchvision`` then fails in ``torchvision/_meta_registrations``
with ``RuntimeError: operator torchvision::nms does not exist`` (it registers fake kernels for the
``nms`` and ``qnms`` ops unconditionally). Every model, every transform and the rest of the
pure-Python package would work. timm imports torchvision, and so does transformers whenever
torchvision is installed, so both fail the same way.

:func:`import_torchvision` defines the two missing op schemas (schemas only, no kernels), purges the
half-imported torchvision modules from ``sys.modules`` and imports again, warning once that it did.
The detection ops (``nms``, ``roi_align``, ``roi_pool``, ``deform_conv2d``, ...) cannot run after
that; the CPU torchvision from the PyTorch index has them all.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import warnings
from types import ModuleType

import torch

__all__ = ["import_timm", "import_torchvision", "import_transformers", "matching_torchvision"]

# the ops whose fake kernels torchvision registers whether or not its extension loaded
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")
# the definitions live as long as this Library object: keep it for the life of the process
_library: torch.library.Library | None = None
_warned = False


def matching_torchvision(torch_version: str | None = None) -> str:
    """The pip requirement of the torchvision that matches a torch: torch 2.X <-> torchvision 0.(X+15).

    Args:
        torch_version: e.g. ``"2.13.0+cpu"``; default the installed torch.

    Returns:
        e.g. ``"torchvision==0.28.*"``.

    Raises:
        ValueError: not a torch 2.x version (the rule is only known for those).
    """
    version = torch_version or torch.__version__
    parts = version.split("+")[0].split(".")
    if len(parts) < 2 or parts[0] != "2" or not parts[1].isdigit():
        raise ValueError(f"no known torchvision for torch {version!r}: the rule torch 2.X <-> "
                         "torchvision 0.(X+15) covers torch 2.x only.")
    return f"torchvision==0.{int(parts[1]) + 15}.*"


def _install_hint() -> str:
    try:
        requirement = matching_torchvision()
    except ValueError:
        requirement = "torchvision (the release matching your torch)"
    return (f"install the one that matches torch {torch.__version__}: pip install '{requirement}' "
            "(add --index-url https://download.pytorch.org/whl/cpu for the CPU build), or run "
            "`make venv`")


def _purge(package: str) -> None:
    """Drop ``package`` and its submodules from ``sys.modules`` (a failed import leaves some)."""
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]


def _define_missing_schemas() -> list[str]:
    """Define the op schemas of :data:`_SCHEMAS` that torch does not know; return their names."""
    global _library
    defined = []
    for name, schema in _SCHEMAS.items():
        if hasattr(torch.ops.torchvision, name):
            continue
        if _library is None:
            _library = torch.library.Library("torchvision", "FRAGMENT")
        _library.define(schema)
        defined.append(f"torchvision::{name}")
    return defined


def _not_installed(package: str, err: ModuleNotFoundError) -> bool:
    return err.name == package or sys.modules.get(package, ...) is None


def import_torchvision() -> ModuleType:
    """Import torchvision; beside a CPU torch, define the op schemas its CUDA build lacks.

    When ``import torchvision`` fails with ``operator torchvision::nms does not exist`` (PyPI's
    wheel, built for CUDA, beside the CPU torch), the ``nms`` and ``qnms`` schemas are defined
    without kernels, the half-imported torchvision modules are removed from ``sys.modules`` and
    the import is retried. The first time this happens a ``UserWarning`` says so: models and
    transforms work, the detection ops (``nms``, ``roi_align``, ...) cannot run.

    Returns:
        The ``torchvision`` module.

    Raises:
        ImportError: torchvision is not installed, or fails to import for another reason (the
            message has the original error and the install command for the matching release).
    """
    global _warned
    defined: list[str] = []
    while True:
        try:
            module = importlib.import_module("torchvision")
            break
        except ModuleNotFoundError as err:
            if _not_installed("torchvision", err):
                raise ImportError(f"torchvision is not installed; {_install_hint()}.") from err
            raise ImportError(f"torchvision failed to import: {err}; {_install_hint()}.") from err
        except RuntimeError as err:
            match = _MISSING_OP.search(str(err))
            if defined or match is None or match.group(1) not in _SCHEMAS:
                raise ImportError(
                    f"torchvision failed to import: {str(err).strip().splitlines()[0]}; its compiled "
                    f"ops do not fit torch {torch.__version__}: {_install_hint()}."
                ) from err
            _purge("torchvision")
            defined = _define_missing_schemas()
            if not defined:  # the schemas exist, yet the import failed: nothing more to do here
                raise ImportError(f"torchvision failed to import: {err}; {_install_hint()}.") from err
    if defined and not _warned:
        _warned = True
        warnings.warn(
            f"torchvision {getattr(module, '__version__', '?')}'s compiled ops do not load beside "
            f"torch {torch.__version__} (a CUDA build of torchvision next to a CPU torch); "
            f"curvscope.testing.import_torchvision defined the op schemas {', '.join(defined)} "
            "without kernels so that the models and transforms import. The nms / roi_align / "
            "roi_pool / deform_conv2d ops cannot run; for them install the CPU torchvision from "
            "the PyTorch index.",
            UserWarning,
            stacklevel=2,
        )
    return module


def import_timm() -> ModuleType:
    """Import timm, through :func:`import_torchvision` (timm imports torchvision).

    Returns:
        The ``timm`` module.

    Raises:
        ImportError: timm or torchvision is not installed, or either fails to import.
    """
    if importlib.util.find_spec("timm") is None:
        raise ImportError("timm is not installed; pip install 'timm>=1.0' (after the torchvision "
                          "that matches your torch, which it needs; `make venv` installs both).")
    try:
        import_torchvision()
    except ImportError as err:
        raise ImportError(f"timm needs torchvision: {err}") from err
    if "timm" not in sys.modules:
        _purge("timm")  # submodules left behind by an earlier failed import
    return importlib.import_module("timm")


def import_transformers() -> ModuleType:
    """Import transformers so that its models load: through :func:`import_torchvision` when
    torchvision is installed (transformers then imports it on the way to any model class).

    Returns:
        The ``transformers`` module.

    Raises:
        ImportError: transformers is not installed, or torchvision is installed but cannot be
            imported.
    """
    if importlib.util.find_spec("transformers") is None:
        raise ImportError("transformers is not installed; pip install 'transformers>=4.46' (or "
                          "the project's extra: pip install -e '.[real]').")
    if importlib.util.find_spec("torchvision") is not None:
        try:
            import_torchvision()
        except ImportError as err:
            raise ImportError(f"transformers imports the installed torchvision, which fails: {err}") from err
    return importlib.import_module("transformers")
