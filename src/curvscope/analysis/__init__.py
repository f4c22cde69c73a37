"""Analyses of curvature results: class structure, outliers vs bulk, overlaps."""

from curvscope.analysis.class_structure import ClassStructure, class_structure

__all__ = ["ClassStructure", "class_structure"]
