"""Result bundles: a :class:`~curvscope.analysis.spectrum.SpectrumAnalysis` on disk, and back.

A bundle is a folder with

* ``result.json``: ``schema_version``, ``provenance`` (versions, machine, time, peak memory, seed,
  dtype, sizes, budgets, total cost), the ``summary`` sentences, the ``key_numbers`` shown in the
  report (each with its error bar or residual), every part of the analysis as its ``to_dict()``
  (small lists only), the ``extras`` sections, the list of ``plots`` and an ``arrays`` manifest
  (key, dtype and shape of every array in ``arrays.npz``);
* ``arrays.npz``: the arrays, bit for bit in their own dtype (eigenvalues, eigenvectors, residual
  norms, SLQ nodes and weights, the class-structure Gram matrix, projections, weights, counts and
  embeddings, the arrays of the extras);
* one PNG per plot (when matplotlib is installed) and ``report.html``, a self-contained page.

Every file is written atomically (a temporary file in the same folder, then :func:`os.replace`),
and ``result.json`` is written last: a folder without it is an unfinished bundle.
:func:`load_bundle` rebuilds the analysis (every result object, tensors from the npz) and checks
the schema version and the arrays against the manifest.

Example:
    >>> import tempfile, torch
    >>> import curvscope as cs
    >>> from curvscope.analysis.spectrum import analyze
    >>> from curvscope.testing import tiny_mlp
    >>> tp = tiny_mlp()
    >>> a = analyze(cs.Problem(tp.model, tp.loss_fn, tp.batches), budget="small", k=4)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = save_bundle(a, d, plots=False)
    ...     b = load_bundle(d)
    >>> torch.equal(b.analysis.top.eigenvalues, a.top.eigenvalues)
    True
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
import platform
import sys
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from curvscope._atomic import atomic_file, write_atomic
from curvscope._diagnostics import Cost
from curvscope.analysis.class_structure import TERMS, ClassStructure
from curvscope.analysis.outliers import OutlierSplit, PowerLawFit
from curvscope.analysis.spectrum import SpectrumAnalysis
from curvscope.estimators.slq import SpectralDensity
from curvscope.solvers._results import EigenResult

logger = logging.getLogger(__name__)

__all__ = [
    "SCHEMA_VERSION",
    "BundleError",
    "LoadedBundle",
    "load_bundle",
    "provenance",
    "save_bundle",
]

#: Version of the layout of ``result.json`` / ``arrays.npz``; :func:`load_bundle` reads only this.
SCHEMA_VERSION = 1
RESULT_FILE = "result.json"
ARRAYS_FILE = "arrays.npz"
HTML_FILE = "report.html"
KIND = "curvscope.SpectrumAnalysis"
#: Lists longer than this are cut in ``result.json`` (the full data are in ``arrays.npz``).
MAX_JSON_LIST = 1000
PLOTS_SKIPPED = "skipped: matplotlib missing (pip install 'curvscope[plot]')"

_EIGEN_PARTS = ("top", "bottom", "ggn_top")
_DENSITY_PARTS = ("density", "bulk_density", "ggn_density", "residual_density")


class BundleError(ValueError):
    """A bundle that cannot be read: unknown schema version, corrupted or inconsistent files."""


# ----------------------------------------------------------------------------- provenance
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _peak_host_memory() -> int | None:
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
    host_peak = _peak_host_memory()
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


_provenance = provenance  # the functions below have a ``provenance`` argument


# ----------------------------------------------------------------------------- arrays
class _Arrays:
    """Collects arrays for the npz and the manifest that describes them."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.manifest: dict[str, dict[str, Any]] = {}

    def add(self, key: str, value: Tensor | np.ndarray) -> str:
        if key in self.arrays:
            raise ValueError(f"duplicate array key {key!r}")  # pragma: no cover - internal
        if isinstance(value, Tensor):
            t = value.detach().cpu()
            container, dtype = "torch", str(t.dtype)
            if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
                t = t.to(torch.float32)
            arr = t.numpy()
        else:
            arr = np.asarray(value)
            container, dtype = "numpy", str(arr.dtype)
            if arr.dtype == object:
                raise TypeError(f"array {key!r} has dtype object; only numeric arrays can be saved.")
        self.arrays[key] = arr
        self.manifest[key] = {"dtype": dtype, "shape": list(arr.shape), "container": container}
        return key


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise BundleError(f"unknown torch dtype {name!r} in the arrays manifest.")
    return dtype


def _restore(arr: np.ndarray, spec: dict[str, Any]) -> Tensor | np.ndarray:
    if spec["container"] == "numpy":
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr))
    dtype = _torch_dtype(spec["dtype"])
    return t.to(dtype) if t.dtype != dtype else t


# ----------------------------------------------------------------------------- JSON helpers
def _jsonable(obj: Any) -> Any:
    """Plain JSON types from numbers, tensors' scalars, tuples and paths."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON; give numbers, strings, lists, "
                    "dicts, or arrays (tensors / numpy arrays go to arrays.npz).")


def _cut(values: list[Any], note: dict[str, Any], key: str) -> list[Any]:
    if len(values) > MAX_JSON_LIST:
        note[key] = len(values)
        return values[:MAX_JSON_LIST]
    return values


def _pair(fn: Callable[[], tuple[float, float]]) -> dict[str, float]:
    value, se = fn()
    return {"value": value, "std_error": se}


# ----------------------------------------------------------------------------- encode
def _encode_eigen(r: EigenResult, name: str, arrays: _Arrays, eigenvectors: bool) -> dict[str, Any]:
    arrays.add(f"{name}.eigenvalues", r.eigenvalues)
    arrays.add(f"{name}.residual_norms", r.residual_norms)
    arrays.add(f"{name}.converged", r.converged)
    if r.eigenvectors is not None and eigenvectors:
        arrays.add(f"{name}.eigenvectors", r.eigenvectors)
    d = r.to_dict()
    note: dict[str, Any] = {}
    for key in ("eigenvalues", "residual_norms", "converged"):
        d[key] = _cut(d[key], note, key)
    d["relative_residuals"] = _cut(r.relative_residuals.tolist(), note, "relative_residuals")
    d["eigenvectors"] = ("saved" if r.eigenvectors is not None and eigenvectors
                         else "not kept" if r.eigenvectors is None else "not saved")
    if note:
        d["truncated_lengths"] = note
    return d


def _encode_density(s: SpectralDensity, name: str, arrays: _Arrays) -> dict[str, Any]:
    arrays.add(f"{name}.nodes", s.nodes)
    arrays.add(f"{name}.weights", s.weights)
    arrays.add(f"{name}.deflated", s.deflated)
    d = s.to_dict()
    del d["nodes"], d["weights"]  # [p, m] each: in the npz
    d["deflated"] = _cut(d["deflated"], d.setdefault("truncated_lengths", {}), "deflated")
    if not d["truncated_lengths"]:
        del d["truncated_lengths"]
    d["trace"] = _pair(lambda: s.trace_function(lambda t: t))
    d["negative_fraction"] = _pair(s.negative_fraction)
    d["negative_mass"] = _pair(s.negative_mass)
    return d


def _encode_classes(c: ClassStructure, arrays: _Arrays) -> dict[str, Any]:
    arrays.add("classes.gram", c.gram)
    arrays.add("classes.class_weights", c.class_weights)
    arrays.add("classes.class_counts", c.class_counts)
    if c.projections is not None:
        arrays.add("classes.projections", c.projections)
    arrays.add("classes.embedding", c.embedding("class_means"))
    arrays.add("classes.embedding_pairs", c.embedding("pairs"))
    d = c.to_dict()
    note: dict[str, Any] = {}
    d["spectra"] = {t: _cut(v, note, t) for t, v in d["spectra"].items()}
    if note:
        d["spectra_truncated_lengths"] = note
    d["projections"] = "saved" if c.projections is not None else "none"
    d["vectors"] = "not saved" if c.vectors is not None else "not kept"
    return d


def _total_cost(a: SpectrumAnalysis) -> dict[str, Any]:
    parts: dict[str, Cost] = {}
    for name in (*_EIGEN_PARTS, *_DENSITY_PARTS):
        part = getattr(a, name)
        if part is not None:
            parts[name] = part.cost
    if a.classes is not None:
        parts["classes"] = a.classes.cost
    total = {
        "num_matvecs": sum(c.num_matvecs for c in parts.values()),
        "num_products": sum(c.num_products for c in parts.values()),
        "num_data_passes": sum(c.num_data_passes for c in parts.values()),
        "wall_time_s": sum(c.wall_time for c in parts.values()),
        "wall_time_source": "sum of the parts' costs",
    }
    return {"total": total, "parts": {k: c.to_dict() for k, c in parts.items()}}


def _trace_numbers(a: SpectrumAnalysis) -> dict[str, Any]:
    """The trace with its standard error and the 95 % interval every view shows; ``resolved``
    is false when the interval is wider than the value (the sign is not even known).
    """
    value, se = a.trace()
    _, half = a.trace_interval(0.95)
    return {"value": value, "std_error": se, "interval_95": half,
            "exact": bool(a.density.exact), "resolved": bool(half < abs(value))}


def _key_numbers(a: SpectrumAnalysis) -> dict[str, Any]:
    """The numbers the report shows, each with its error bar or residual (no arrays)."""
    kn: dict[str, Any] = {
        "trace": _trace_numbers(a),
        "negative_fraction": _pair(lambda: a.negative_part()["clearly_negative"]),
        "near_zero_fraction": _pair(lambda: a.negative_part()["near_zero"]),
        "resolution": a.density.resolution(),
        "negative_mass": _pair(lambda: a.negative_part()["mass"]),
        "method": a.info.get("method", "iterative"),
        "spectrum_bounds": list(a.density.bounds),
        "largest_eigenvalue": {"value": float(a.top.eigenvalues[0]),
                               "residual_norm": float(a.top.residual_norms[0])}
        if a.top.k else None,
        "smallest_eigenvalue": {"value": float(a.bottom.eigenvalues.min()),
                                "residual_norm": float(a.bottom.residual_norms[
                                    int(a.bottom.eigenvalues.argmin())])}
        if a.bottom.k else None,
        "top_converged": f"{int(a.top.converged.sum())}/{a.top.k}",
        "bottom_converged": f"{int(a.bottom.converged.sum())}/{a.bottom.k}",
        "outliers": a.outliers.to_dict(),
        "bulk_power_law": None if a.bulk_power_law is None else a.bulk_power_law.to_dict(),
        "overlap_hessian_ggn": a.overlap_hessian_ggn,
        "ggn_above_edge": a.ggn_above_edge(),
    }
    for name in ("bulk_density", "ggn_density", "residual_density"):
        s: SpectralDensity | None = getattr(a, name)
        if s is not None:
            value, se = s.trace_function(lambda t: t)
            kn[f"{name}_trace"] = {"value": value, "std_error": se}
            kn[f"{name}_bounds"] = list(s.bounds)
    if a.classes is not None:
        kn["class_overlaps"] = dict(a.class_overlaps)
        kn["class_outliers"] = dict(a.class_outliers)
        kn["class_traces"] = {t: a.classes.trace(t) for t in TERMS}
    return kn


def _encode_extras(extras: dict[str, Any], arrays: _Arrays) -> dict[str, Any]:
    counter = iter(range(1 << 62))

    def walk(obj: Any, where: str) -> Any:
        if isinstance(obj, (Tensor, np.ndarray)):
            key = arrays.add(f"extras.{next(counter)}", obj)
            return {"__array__": key}
        if isinstance(obj, dict):
            if "__array__" in obj:
                raise ValueError(f"extras {where}: the key '__array__' is reserved.")
            return {str(k): walk(v, f"{where}.{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        try:
            return _jsonable(obj)
        except TypeError as err:
            raise TypeError(f"extras {where}: {err}") from None

    if not isinstance(extras, dict):
        raise TypeError(f"extras must be a dict of sections, got {type(extras).__name__}.")
    out = {}
    for name, section in extras.items():
        if not isinstance(section, dict):
            raise TypeError(f"extras[{name!r}] must be a dict (a JSON-able section with arrays), "
                            f"got {type(section).__name__}.")
        out[str(name)] = walk(section, str(name))
    return out


def _decode_extras(obj: Any, arrays: Mapping[str, Any]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return arrays[obj["__array__"]]
        return {k: _decode_extras(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_extras(v, arrays) for v in obj]
    return obj


def bundle_dict(
    analysis: SpectrumAnalysis,
    *,
    provenance: dict[str, Any] | None = None,
    extras: dict[str, Any] | None = None,
    eigenvectors: bool = True,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The JSON document and the npz arrays of a bundle (what :func:`save_bundle` writes).

    Args:
        analysis: the result of :func:`~curvscope.analysis.spectrum.analyze`.
        provenance: entries that override / add to the gathered :func:`provenance` (e.g. one
            gathered at the start of a run, or the analysis wall time measured by the caller).
        extras: further sections, ``{name: dict}``; tensors and numpy arrays anywhere inside go
            to the npz.
        eigenvectors: save the eigenvectors (``[P, k]`` each; set ``False`` for huge models).
    """
    if not isinstance(analysis, SpectrumAnalysis):
        raise TypeError(f"expected a SpectrumAnalysis (from curvscope.analysis.spectrum.analyze), "
                        f"got {type(analysis).__name__}.")
    arrays = _Arrays()
    parts: dict[str, Any] = {}
    for name in _EIGEN_PARTS:
        r = getattr(analysis, name)
        parts[name] = None if r is None else _encode_eigen(r, name, arrays, eigenvectors)
    for name in _DENSITY_PARTS:
        s = getattr(analysis, name)
        parts[name] = None if s is None else _encode_density(s, name, arrays)
    parts["outliers"] = analysis.outliers.to_dict()
    parts["bulk_power_law"] = (None if analysis.bulk_power_law is None
                               else analysis.bulk_power_law.to_dict())
    parts["overlap_hessian_ggn"] = analysis.overlap_hessian_ggn
    parts["classes"] = None if analysis.classes is None else _encode_classes(analysis.classes,
                                                                              arrays)
    parts["class_overlaps"] = dict(analysis.class_overlaps)
    parts["class_outliers"] = dict(analysis.class_outliers)
    parts["class_within"] = dict(analysis.class_within)
    info = analysis.info
    cost = _total_cost(analysis)
    prov = _provenance()
    prov.update({
        "seed": info.get("seed"), "dtype": info.get("dtype"), "device": info.get("device"),
        "num_params": info.get("num_params"), "num_data": info.get("num_data"),
        "data_unit": info.get("data_unit", "examples"),
        "num_classes": info.get("num_classes"),
        "budgets": {"budget": info.get("budget"), "k": info.get("k"),
                    "num_probes": info.get("num_probes"), "num_iters": info.get("num_iters"),
                    "outlier_threshold": analysis.outliers.threshold},
        "matrix_products": cost["total"], "costs": cost["parts"],
        "wall_time_s": cost["total"]["wall_time_s"],
    })
    if provenance:
        prov.update(provenance)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "provenance": _jsonable(prov),
        "summary": analysis.summary(),
        "key_numbers": _key_numbers(analysis),
        "info": _jsonable(dict(info)),
        "analysis": parts,
        "extras": _encode_extras(extras or {}, arrays),
    }
    doc["arrays"] = arrays.manifest
    return _jsonable(doc), arrays.arrays


# ----------------------------------------------------------------------------- save
def save_bundle(
    analysis: SpectrumAnalysis,
    out_dir: str | os.PathLike[str],
    *,
    provenance: dict[str, Any] | None = None,
    extras: dict[str, Any] | None = None,
    plots: bool = True,
    eigenvectors: bool = True,
    dpi: int = 110,
) -> dict[str, Path]:
    """Write a bundle (``result.json``, ``arrays.npz``, PNG plots, ``report.html``) to ``out_dir``.

    Args:
        analysis: the result of :func:`~curvscope.analysis.spectrum.analyze`.
        out_dir: the folder (created when missing; files of the same names are replaced).
        provenance: entries that override / add to the gathered :func:`provenance`.
        extras: further sections ``{name: dict}`` (sample-size or checkpoint sweeps, train vs
            test, mask overlaps, ...): JSON-able values, with tensors / numpy arrays anywhere
            inside (saved in the npz). A section with ``x`` and ``top_eigenvalues`` is a sweep
            and gets a plot (:func:`~curvscope.report.plots.plot_sweep`).
        plots: draw the PNG plots (skipped, with a logged warning, without matplotlib).
        eigenvectors: save the eigenvectors in the npz.
        dpi: resolution of the PNGs.

    Returns:
        ``{"result": .., "arrays": .., "report": .., <plot name>: ..}`` paths of the files written.

    Raises:
        TypeError: ``analysis`` is not a SpectrumAnalysis, or an extras value cannot be saved.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc, arrays = bundle_dict(analysis, provenance=provenance, extras=extras,
                              eigenvectors=eigenvectors)
    paths: dict[str, Path] = {}
    with atomic_file(out / ARRAYS_FILE) as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    paths["arrays"] = out / ARRAYS_FILE
    images: dict[str, bytes] = {}
    if plots:
        try:
            from curvscope.report.plots import render_pngs
            images = render_pngs(analysis, _decode_extras(doc["extras"], arrays), dpi=dpi)
        except ImportError as err:
            logger.warning("plots skipped: %s", err)
            doc["plots"] = PLOTS_SKIPPED
        else:
            for name, png in images.items():
                write_atomic(out / f"{name}.png", png)
                paths[name] = out / f"{name}.png"
            doc["plots"] = [f"{name}.png" for name in images]
    else:
        doc["plots"] = "skipped: plots=False"
    from curvscope.report.html import render_html

    page = render_html(doc, images)
    write_atomic(out / HTML_FILE, page.encode("utf-8"))
    paths["report"] = out / HTML_FILE
    text = json.dumps(doc, indent=1, allow_nan=True)
    write_atomic(out / RESULT_FILE, text.encode("utf-8"))  # last: marks the bundle complete
    paths["result"] = out / RESULT_FILE
    return paths


# ----------------------------------------------------------------------------- load
@dataclass(frozen=True)
class LoadedBundle:
    """A bundle read back by :func:`load_bundle`.

    Attributes:
        analysis: the rebuilt :class:`~curvscope.analysis.spectrum.SpectrumAnalysis`.
        provenance: the provenance dict.
        extras: the extras sections, arrays put back (tensors or numpy arrays, as saved).
        summary: the summary sentences as saved.
        key_numbers: the key numbers shown in the report.
        plots: the plot file names, or why they were skipped.
        path: the bundle folder.
        document: the whole ``result.json``.
    """

    analysis: SpectrumAnalysis
    provenance: dict[str, Any]
    extras: dict[str, Any]
    summary: list[str]
    key_numbers: dict[str, Any]
    plots: list[str] | str
    path: Path
    document: dict[str, Any] = field(repr=False)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise BundleError(f"{path} is not UTF-8 text ({err}); the bundle is corrupted.") from err
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise BundleError(f"{path} is not valid JSON ({err}); the bundle is corrupted or was "
                          "edited by hand. Write it again with save_bundle.") from err
    if not isinstance(doc, dict):
        raise BundleError(f"{path} holds a JSON {type(doc).__name__}, expected an object.")
    return doc


def _read_npz(path: Path, manifest: dict[str, Any]) -> dict[str, Tensor | np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = set(npz.files)
            missing = sorted(set(manifest) - found)
            if missing:
                raise BundleError(f"{path} lacks the arrays {missing} listed in {RESULT_FILE}; "
                                  "the two files do not belong together or the npz is corrupted.")
            raw = {key: npz[key] for key in manifest}
    except BundleError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as err:
        raise BundleError(f"cannot read {path}: {type(err).__name__}: {err}. The file is truncated "
                          "or corrupted; write the bundle again with save_bundle.") from err
    out: dict[str, Tensor | np.ndarray] = {}
    for key, spec in manifest.items():
        arr = raw[key]
        if list(arr.shape) != list(spec["shape"]):
            raise BundleError(f"array {key!r} in {path} has shape {list(arr.shape)}, the manifest "
                              f"says {spec['shape']}.")
        out[key] = _restore(arr, spec)
    return out


def _get(d: dict[str, Any], key: str, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise BundleError(f"{RESULT_FILE}: {where} lacks {key!r}; the file is corrupted or was "
                          "written by another program.")
    return d[key]


def _cost(d: dict[str, Any], where: str) -> Cost:
    return Cost(int(_get(d, "num_matvecs", where)), int(_get(d, "num_products", where)),
                int(_get(d, "num_data_passes", where)), float(_get(d, "wall_time", where)),
                dict(d.get("engines") or {}))


def _more_fields(cls: type, d: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` plus the result's further plain fields found in its ``to_dict()``.

    (Fields with defaults added to a result class later, such as ``SpectralDensity.zero_tol``.)
    """
    out = dict(given)
    for f in fields(cls):
        if f.name not in out and f.name in d:
            out[f.name] = d[f.name]
    return out


def _decode_eigen(d: dict[str, Any], name: str, A: dict[str, Any]) -> EigenResult:
    err = d.get("error_estimate", None)
    return EigenResult(**_more_fields(EigenResult, d, dict(
        eigenvalues=A[f"{name}.eigenvalues"], eigenvectors=A.get(f"{name}.eigenvectors"),
        residual_norms=A[f"{name}.residual_norms"], converged=A[f"{name}.converged"],
        method=str(_get(d, "method", name)), which=str(_get(d, "which", name)),
        tol=float(_get(d, "tol", name)), num_iters=int(_get(d, "num_iters", name)),
        cost=_cost(d, name), error_estimate=None if err is None else float(err),
    )))


def _decode_density(d: dict[str, Any], name: str, A: dict[str, Any]) -> SpectralDensity:
    lo, hi = _get(d, "bounds", name)
    return SpectralDensity(**_more_fields(SpectralDensity, d, dict(
        nodes=A[f"{name}.nodes"], weights=A[f"{name}.weights"],
        dimension=int(_get(d, "dimension", name)), bounds=(float(lo), float(hi)),
        deflated=A[f"{name}.deflated"], reorth=str(_get(d, "reorth", name)),
        cost=_cost(d, name),
    )))


def _decode_classes(d: dict[str, Any], A: dict[str, Any]) -> ClassStructure:
    sketch = d.get("sketch_dim")
    return ClassStructure(**_more_fields(ClassStructure, d, dict(
        num_classes=int(_get(d, "num_classes", "classes")),
        class_weights=A["classes.class_weights"], class_counts=A["classes.class_counts"],
        gram=A["classes.gram"], mode=str(_get(d, "mode", "classes")),
        sketch_dim=None if sketch is None else int(sketch),
        projections=A.get("classes.projections"), vectors=None, cost=_cost(d, "classes"),
    )))


def load_bundle(path: str | os.PathLike[str]) -> LoadedBundle:
    """Read a bundle written by :func:`save_bundle` (the folder, or its ``result.json``).

    Returns:
        :class:`LoadedBundle` with the rebuilt analysis (every result object; tensors from the
        npz in their saved dtype), provenance, extras and summary.

    Raises:
        FileNotFoundError: the folder, ``result.json`` or ``arrays.npz`` does not exist.
        BundleError: an unknown ``schema_version``, a file that does not parse, or arrays that
            are missing or do not match the manifest.
    """
    p = Path(path)
    folder = p.parent if p.name == RESULT_FILE else p
    if not folder.is_dir():
        raise FileNotFoundError(f"no bundle folder at {folder}: expected a folder written by "
                                "curvscope.report.save_bundle.")
    json_path, npz_path = folder / RESULT_FILE, folder / ARRAYS_FILE
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path} does not exist: {folder} is not a bundle, or "
                                "save_bundle did not finish (it writes result.json last).")
    doc = _read_json(json_path)
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        hint = ("written by a newer curvscope: upgrade curvscope" if isinstance(version, int)
                and version > SCHEMA_VERSION else "not a curvscope bundle, or a corrupted one")
        raise BundleError(f"{json_path} has schema_version {version!r}; this curvscope reads "
                          f"version {SCHEMA_VERSION} ({hint}).")
    if doc.get("kind", KIND) != KIND:
        raise BundleError(f"{json_path} holds a {doc.get('kind')!r}, expected {KIND!r}.")
    manifest = _get(doc, "arrays", "the document")
    if not npz_path.is_file():
        raise FileNotFoundError(f"{npz_path} does not exist: the bundle in {folder} is incomplete.")
    A = _read_npz(npz_path, manifest)
    parts = _get(doc, "analysis", "the document")
    try:
        top = _decode_eigen(_get(parts, "top", "analysis"), "top", A)
        bottom = _decode_eigen(_get(parts, "bottom", "analysis"), "bottom", A)
        ggn_d = parts.get("ggn_top")
        ggn_top = None if ggn_d is None else _decode_eigen(ggn_d, "ggn_top", A)
        dens = {name: None if parts.get(name) is None else _decode_density(parts[name], name, A)
                for name in _DENSITY_PARTS}
        density = dens["density"]
        if density is None:
            raise BundleError(f"{json_path}: the analysis has no density.")
        outliers = OutlierSplit(**_get(parts, "outliers", "analysis"))
        pl = parts.get("bulk_power_law")
        power = None if pl is None else PowerLawFit(**pl)
        cls_d = parts.get("classes")
        classes = None if cls_d is None else _decode_classes(cls_d, A)
        overlap = parts.get("overlap_hessian_ggn")
        analysis = SpectrumAnalysis(
            dict(_get(doc, "info", "the document")), top, bottom, density, dens["bulk_density"],
            outliers, power, ggn_top, dens["ggn_density"], dens["residual_density"],
            None if overlap is None else float(overlap), classes,
            {k: float(v) for k, v in parts.get("class_overlaps", {}).items()},
            {k: int(v) for k, v in parts.get("class_outliers", {}).items()},
            dict(parts.get("class_within", {})),
        )
    except KeyError as err:
        raise BundleError(f"{npz_path} lacks the array {err}; the bundle is corrupted.") from err
    except (TypeError, ValueError) as err:
        if isinstance(err, BundleError):
            raise
        raise BundleError(f"{json_path}: a part of the analysis cannot be rebuilt ({err}); the "
                          "file is corrupted.") from err
    extras = _decode_extras(doc.get("extras", {}), A)
    return LoadedBundle(analysis, doc.get("provenance", {}), extras, list(doc.get("summary", [])),
                        doc.get("key_numbers", {}), doc.get("plots", []), folder, doc)
