"""Analyses of curvature results: the main job, class structure, outliers vs bulk, overlaps, sweeps."""

from curvscope.analysis.class_structure import ClassStructure, class_structure
from curvscope.analysis.outliers import (
    OutlierSplit,
    PowerLawFit,
    find_outliers,
    fit_power_law,
    mask_overlap,
    subspace_overlap,
    top_magnitude_mask,
)
from curvscope.analysis.spectrum import SpectrumAnalysis, analyze
from curvscope.analysis.sweeps import checkpoint_sweep, first_per_class, sample_size_sweep

__all__ = [
    "ClassStructure",
    "OutlierSplit",
    "PowerLawFit",
    "SpectrumAnalysis",
    "analyze",
    "checkpoint_sweep",
    "class_structure",
    "find_outliers",
    "first_per_class",
    "fit_power_law",
    "mask_overlap",
    "sample_size_sweep",
    "subspace_overlap",
    "top_magnitude_mask",
]
