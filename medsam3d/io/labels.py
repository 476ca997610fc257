"""Small helpers shared by the label-map writers."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..volume import Volume

# Slicer's "GenericAnatomyColors"-like palette (0..1 RGB), cycled by label value
_PALETTE = [
    (0.50, 0.68, 0.50), (0.94, 0.84, 0.57), (0.69, 0.48, 0.39), (0.44, 0.72, 0.83),
    (0.85, 0.40, 0.31), (0.56, 0.33, 0.69), (0.91, 0.61, 0.15), (0.36, 0.56, 0.79),
]


def default_color(value: int) -> tuple[float, float, float]:
    return _PALETTE[(int(value) - 1) % len(_PALETTE)]


def label_values(array: np.ndarray) -> list[int]:
    values = np.unique(array)
    return [int(v) for v in values if v != 0]


def segment_table(labels: Volume) -> dict[int, dict[str, Any]]:
    """Label value -> name/colour for every value present (meta first, defaults after)."""
    known = labels.segments
    table = {}
    for value in sorted(set(label_values(labels.array)) | set(int(k) for k in known)):
        info = dict(known.get(value, {}))
        info.setdefault("name", f"label {value}")
        info.setdefault("color", default_color(value))
        table[value] = info
    return table


def label_dtype(array: np.ndarray) -> np.dtype:
    if array.size == 0:
        return np.dtype(np.uint8)
    lo, hi = int(array.min()), int(array.max())
    if lo < 0:
        return np.dtype(np.int16) if hi < 2**15 and lo >= -(2**15) else np.dtype(np.int32)
    return np.dtype(np.uint8) if hi < 256 else np.dtype(np.uint16) if hi < 65536 else np.dtype(np.uint32)
