"""Result bundles: a :class:`~curvscope.analysis.spectrum.SpectrumAnalysis` on disk, and back.

A bundle is a folder with

* ``result.json``: ``schema_version``, ``provenance`` (versions, machine, time, peak memory, seed,
  dtype, sizes, budgets, total cost), the ``summary`` sentences, the ``key_numbers`` shown in the
  report (:func:`~curvscope.analysis.key_numbers.key_numbers`, each with its error bar or
  residual), every part of the analysis and every ``extras`` section as its state (dataclasses
  field by field, :mod:`curvscope.report._codec`; arrays as references, a short 1-D one with its
  values), the list of ``plots`` and an ``arrays`` manifest (key, dtype and shape of every array
  in ``arrays.npz``);
* ``arrays.npz``: the arrays, bit for bit in their own dtype (eigenvalues, eigenvectors, residual
  norms, SLQ nodes and weights, the class-structure Gram matrix, projections, weights and counts,
  the arrays of the extras);
* one PNG per plot (when matplotlib is installed) and ``report.html``, a self-contained page.

Every file is written atomically (a temporary file in the same folder, then :func:`os.replace`),
and ``result.json`` is written last: a folder without it is an unfinished bundle.
:func:`load_bundle` rebuilds the analysis and the sections (every result object, by walking the
same state back; tensors from the npz) and checks the schema version and the arrays against the
manifest. Provenance lives in :mod:`curvscope.report.provenance`.

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

import dataclasses
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from curvscope._atomic import atomic_file, write_atomic
from curvscope.analysis.key_numbers import KeyNumbers, key_numbers, total_cost
from curvscope.analysis.sections import SECTION_TYPES
from curvscope.analysis.spectrum import SpectrumAnalysis
from curvscope.report._codec import (
    Arrays,
    CodecError,
    from_document,
    jsonable,
    restore,
    to_document,
)
from curvscope.report.provenance import provenance

logger = logging.getLogger(__name__)

__all__ = [
    "SCHEMA_VERSION",
    "BundleError",
    "LoadedBundle",
    "bundle_dict",
    "load_bundle",
    "provenance",
    "save_bundle",
]

#: Version of the layout of ``result.json`` / ``arrays.npz``; :func:`load_bundle` reads only this.
#: 2: every part and section as its dataclass state (1: hand-written encoders per part).
SCHEMA_VERSION = 2
RESULT_FILE = "result.json"
ARRAYS_FILE = "arrays.npz"
HTML_FILE = "report.html"
KIND = "curvscope.SpectrumAnalysis"
PLOTS_SKIPPED = "skipped: matplotlib missing (pip install 'curvscope[plot]')"
_SECTION_CLASSES = tuple(set(SECTION_TYPES.values()))


class BundleError(ValueError):
    """A bundle that cannot be read: unknown schema version, corrupted or inconsistent files."""


_provenance = provenance  # the functions below have a ``provenance`` argument


# ----------------------------------------------------------------------------- write
def _check_extras(extras: Any) -> dict[str, Any]:
    if not isinstance(extras, dict):
        raise TypeError(f"extras must be a dict of sections, got {type(extras).__name__}.")
    for name, section in extras.items():
        if not isinstance(section, (dict, *_SECTION_CLASSES)):
            raise TypeError(f"extras[{name!r}] must be a section (a dict of JSON-able values "
                            "and arrays, or one of curvscope.analysis.sections.SECTION_TYPES), "
                            f"got {type(section).__name__}.")
    return extras


def _run_provenance(analysis: SpectrumAnalysis, extra: dict[str, Any] | None) -> dict[str, Any]:
    info = analysis.info
    cost = total_cost(analysis)
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
    if extra:
        prov.update(extra)
    return prov


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
        provenance: entries that override / add to the gathered
            :func:`~curvscope.report.provenance.provenance` (e.g. one gathered at the start of a
            run, or the analysis wall time measured by the caller).
        extras: further sections, ``{name: section}``: the section classes of
            :mod:`curvscope.analysis.sections`, or dicts whose tensors and numpy arrays anywhere
            inside go to the npz.
        eigenvectors: save the eigenvectors (``[P, k]`` each; set ``False`` for huge models).
    """
    if not isinstance(analysis, SpectrumAnalysis):
        raise TypeError(f"expected a SpectrumAnalysis (from curvscope.analysis.spectrum.analyze), "
                        f"got {type(analysis).__name__}.")
    extras = _check_extras(extras or {})
    arrays = Arrays()
    skip = frozenset() if eigenvectors else frozenset({"eigenvectors"})
    parts = {f.name: to_document(getattr(analysis, f.name), f.name, arrays, skip)
             for f in dataclasses.fields(analysis) if f.name != "info"}
    doc = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "provenance": jsonable(_run_provenance(analysis, provenance)),
        "summary": analysis.summary(),
        "key_numbers": jsonable(key_numbers(analysis).to_dict()),
        "info": to_document(dict(analysis.info), "info", arrays),
        "analysis": parts,
        "extras": {str(name): to_document(section, f"extras.{name}", arrays)
                   for name, section in extras.items()},
        "arrays": arrays.manifest,
    }
    return doc, arrays.arrays


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
        provenance: entries that override / add to the gathered provenance.
        extras: further sections ``{name: section}`` (sample-size or checkpoint sweeps, train vs
            test, mask overlaps, ... from :mod:`curvscope.analysis`, or a dict of JSON-able
            values with tensors / numpy arrays anywhere inside, saved in the npz). A dict with
            ``x`` and ``top_eigenvalues`` is a sweep and gets a plot
            (:func:`~curvscope.report.plots.plot_sweep`).
        plots: draw the PNG plots (skipped, with a logged warning, without matplotlib).
        eigenvectors: save the eigenvectors in the npz.
        dpi: resolution of the PNGs.

    Returns:
        ``{"result": .., "arrays": .., "report": .., <plot name>: ..}`` paths of the files written.

    Raises:
        TypeError: ``analysis`` is not a SpectrumAnalysis, or an extras value cannot be saved.
    """
    out = Path(out_dir)
    doc, arrays = bundle_dict(analysis, provenance=provenance, extras=extras,
                              eigenvectors=eigenvectors)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    with atomic_file(out / ARRAYS_FILE) as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    paths["arrays"] = out / ARRAYS_FILE
    images: dict[str, bytes] = {}
    if plots:
        try:
            from curvscope.report.plots import render_pngs
            images = render_pngs(analysis, extras or {}, dpi=dpi)
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


# ----------------------------------------------------------------------------- read
@dataclass(frozen=True)
class LoadedBundle:
    """A bundle read back by :func:`load_bundle`.

    Attributes:
        analysis: the rebuilt :class:`~curvscope.analysis.spectrum.SpectrumAnalysis`.
        provenance: the provenance dict.
        extras: the extras sections: the section classes as they were, a caller's dicts as
            dicts, arrays put back (tensors or numpy arrays, as saved).
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
    key_numbers: KeyNumbers
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
        try:
            out[key] = restore(arr, spec)
        except CodecError as err:
            raise BundleError(str(err)) from err
    return out


def _get(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise BundleError(f"{RESULT_FILE}: {where} lacks {key!r}; the file is corrupted or was "
                          "written by another program.")
    return d[key]


def _check_version(doc: dict[str, Any], json_path: Path) -> None:
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        hint = ("written by a newer curvscope: upgrade curvscope" if isinstance(version, int)
                and version > SCHEMA_VERSION else
                "written by an older curvscope: run the analysis again to write it anew"
                if isinstance(version, int) and 0 < version < SCHEMA_VERSION else
                "not a curvscope bundle, or a corrupted one")
        raise BundleError(f"{json_path} has schema_version {version!r}; this curvscope reads "
                          f"version {SCHEMA_VERSION} ({hint}).")
    if doc.get("kind", KIND) != KIND:
        raise BundleError(f"{json_path} holds a {doc.get('kind')!r}, expected {KIND!r}.")


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
    _check_version(doc, json_path)
    manifest = _get(doc, "arrays", "the document")
    if not npz_path.is_file():
        raise FileNotFoundError(f"{npz_path} does not exist: the bundle in {folder} is incomplete.")
    A = _read_npz(npz_path, manifest)
    parts = _get(doc, "analysis", "the document")
    for name in ("top", "bottom", "density"):
        _get(parts, name, "analysis")
    try:
        analysis = SpectrumAnalysis(
            info=from_document(_get(doc, "info", "the document"), A, "info"),
            **{name: from_document(value, A, name) for name, value in parts.items()})
        extras = {name: from_document(section, A, f"extras.{name}")
                  for name, section in doc.get("extras", {}).items()}
    except CodecError as err:
        raise BundleError(f"{json_path}: {err}") from err
    except TypeError as err:
        raise BundleError(f"{json_path}: the analysis cannot be rebuilt ({err}); the file is "
                          "corrupted.") from err
    return LoadedBundle(analysis, doc.get("provenance", {}), extras, list(doc.get("summary", [])),
                        KeyNumbers.from_dict(doc.get("key_numbers")), doc.get("plots", []),
                        folder, doc)
