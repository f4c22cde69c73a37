"""Reports are views of results: a JSON + npz bundle with provenance, plots, one HTML page.

* :func:`save_bundle` / :func:`load_bundle`: a :class:`~curvscope.analysis.spectrum.SpectrumAnalysis`
  to a folder (``result.json``, ``arrays.npz``, PNG plots, ``report.html``) and back, exactly.
* :func:`provenance`: versions, machine, time and peak memory of a run.
* ``plot_*``: :class:`matplotlib.figure.Figure` objects (matplotlib is optional:
  ``pip install 'curvscope[plot]'``; it is imported only when a plot is drawn).
* :func:`render_html`: the self-contained page of a bundle.

No numerics live here: every number is computed by the analysis and only formatted.
"""

from curvscope.report.bundle import (
    SCHEMA_VERSION,
    BundleError,
    LoadedBundle,
    bundle_dict,
    load_bundle,
    provenance,
    save_bundle,
)
from curvscope.report.html import render_html
from curvscope.report.plots import (
    plot_class_structure,
    plot_density,
    plot_embedding,
    plot_sweep,
    plot_top_eigenvalues,
)

__all__ = [
    "SCHEMA_VERSION",
    "BundleError",
    "LoadedBundle",
    "bundle_dict",
    "load_bundle",
    "plot_class_structure",
    "plot_density",
    "plot_embedding",
    "plot_sweep",
    "plot_top_eigenvalues",
    "provenance",
    "render_html",
    "save_bundle",
]
