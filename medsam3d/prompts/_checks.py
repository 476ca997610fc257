"""Checks of the values in a prompt (numbers, voxel indices) and the short form of a bad value that
a prompt error quotes."""

from __future__ import annotations

import math
from typing import Any

from ..errors import PromptError


def _short(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters (a prompt error stays one readable line)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # deeply nested data, an integer too long to print
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _numbers(value: Any, n: int, what: str) -> list[float]:
    """``n`` finite numbers (not booleans, not NaN or infinite), or one line saying what was found."""
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise PromptError(f"expected {what} as a list of {n} numbers, found {_short(value)}")
    if any(isinstance(v, bool) for v in value):
        raise PromptError(f"expected {what} as numbers, found a true/false value in {_short(value)}")
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer too large for a float
        raise PromptError(f"expected {what} as numbers, found {_short(value)}") from None
    if not all(math.isfinite(v) for v in out):
        raise PromptError(f"expected {what} as finite numbers, found {_short(value)}")
    return out


def _int_list(value: Any, n: int, what: str) -> list[int]:
    out = _numbers(value, n, what)
    if any(v != round(v) for v in out):
        raise PromptError(f"expected integer voxel indices in {what}, found {_short(value)}; "
                          "use box_ras for millimetres")
    return [int(v) for v in out]

