"""How a figure with an error bar is written, the same way in every sentence, table and file.

A value is rounded to the last digit its error bar resolves: the error keeps two significant
digits and the value stops at the same decimal place (the convention of the Particle Data Group
and of most physics journals), so ``49.55 +- 11`` is written ``50 +- 11`` and ``16.1283 +-
0.0021`` is written ``16.1283 +- 0.0021``. The summary, the report's headline and key table, the
sections and ``curvscope compare`` all call :func:`with_error`, so one figure reads the same
everywhere.
"""

from __future__ import annotations

import math

__all__ = ["rounded_to_error", "with_error"]

_FIXED_RANGE = (1e-3, 1e5)
#: A value in the fixed range keeps fixed notation while its error needs at most this many
#: decimals (``0.97207 +- 0.00062``, not ``9.7207e-01 +- 6.2e-04``).
MAX_FIXED_DECIMALS = 6


def _fixed(x: float) -> bool:
    return x == 0 or _FIXED_RANGE[0] <= abs(x) < _FIXED_RANGE[1]


def rounded_to_error(value: float, error: float | None, digits: int = 4) -> tuple[str, str]:
    """``(value, error)`` as text, the value rounded to the error's second significant digit.

    Without a usable error (``None``, zero, not finite) the value keeps ``digits`` significant
    digits and the error is ``""``. Values outside ``[1e-3, 1e5)``, and values whose error needs
    more than :data:`MAX_FIXED_DECIMALS` decimals, are written in scientific notation with as
    many mantissa digits as the error resolves (at least one).
    """
    if not math.isfinite(value):
        return str(value), ""
    if error is None or not math.isfinite(error) or error <= 0:
        text = f"{value:.{digits}g}" if _fixed(value) else f"{value:.{digits - 1}e}"
        return text, ""
    last = math.floor(math.log10(error)) - 1          # decimal exponent of the error's 2nd digit
    err_text = f"{error:.2g}" if _fixed(error) else f"{error:.1e}"
    if _fixed(value) and (_fixed(error) or last >= -MAX_FIXED_DECIMALS):
        if last < 0:
            return f"{value:.{-last}f}", f"{error:.{-last}f}"
        step = 10.0 ** last
        return f"{round(value / step) * step:.0f}", f"{round(error / step) * step:.0f}"
    exponent = math.floor(math.log10(abs(value))) if value != 0 else last
    return f"{value:.{max(exponent - last, 1)}e}", err_text


def with_error(value: float, error: float | None, unit: str = "+-") -> str:
    """``"50 +- 11"``: :func:`rounded_to_error` joined by ``unit`` (``"+-"`` or ``"±"``)."""
    v, e = rounded_to_error(value, error if error is not None else math.nan)
    return f"{v} {unit} {e}" if e else v
