"""Small statistics helpers: Student-t quantiles for confidence intervals from few probes."""

from __future__ import annotations

import math

# two-sided 95% and 99% quantiles t_{df, 1 - alpha/2} for df = 1..30
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_T99 = (63.657, 9.925, 5.841, 4.604, 4.032, 3.707, 3.499, 3.355, 3.250, 3.169, 3.106, 3.055,
        3.012, 2.977, 2.947, 2.921, 2.898, 2.878, 2.861, 2.845, 2.831, 2.819, 2.807, 2.797,
        2.787, 2.779, 2.771, 2.763, 2.756, 2.750)


def student_t_quantile(level: float, df: int) -> float:
    """Two-sided quantile ``t`` with ``P(|T_df| <= t) = level`` for ``level`` 0.95 or 0.99.

    Tabulated for ``df <= 30``; above, the normal quantile with the first Cornish-Fisher
    correction ``z + (z^3 + z) / (4 df)``. ``df < 1`` gives ``inf`` (no interval from one probe).

    Example:
        >>> student_t_quantile(0.95, 9)
        2.262
    """
    if level not in (0.95, 0.99):
        raise ValueError(f"level must be 0.95 or 0.99, got {level}.")
    if df < 1:
        return math.inf
    table = _T95 if level == 0.95 else _T99
    if df <= len(table):
        return table[df - 1]
    z = 1.959964 if level == 0.95 else 2.575829
    return z + (z**3 + z) / (4 * df)
