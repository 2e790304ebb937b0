"""Formatting of numbers for logs, tables and messages: one set of helpers for every module."""

from __future__ import annotations

import math
from typing import Any


def finite(x: Any) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt_ppl(x: Any, missing: str = "n/a") -> str:
    """A perplexity with two decimals; ``missing`` for None, NaN or infinity."""
    return f"{x:.2f}" if finite(x) else missing


def fmt_seconds(s: Any, missing: str = "n/a") -> str:
    """A duration in seconds, minutes or hours, whichever reads best."""
    if not finite(s):
        return missing
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def fmt_value(v: Any) -> str:
    """A setting as a table shows it: "–" for None, yes/no, short floats."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def fmt_bytes(n: float) -> str:
    """A byte count with a binary prefix (KiB, MiB, GiB)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
