"""Embedded default problems: no downloads, seeded, small enough to train in seconds on a CPU."""

from curvscope.zoo._gaussian_mixture import ZooProblem, gaussian_mixture

__all__ = ["ZooProblem", "gaussian_mixture"]
