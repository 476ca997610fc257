"""Values read out of DICOM data sets: vectors, pixels with their rescale, UIDs, the display window.

Shared by the readers of single-frame series (:mod:`.dicom`), enhanced multi-frame images
(:mod:`.dicom_multiframe`) and DICOM SEG (:mod:`.dicomseg`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import DicomSeriesError, VolumeIOError


def vector(ds, name: str, n: int) -> np.ndarray:
    value = getattr(ds, name, None)
    if value is None or len(value) != n:
        raise DicomSeriesError(
            f"expected {name} with {n} values in {getattr(ds, 'filename', 'a slice')}, found {value!r}; "
            "the series lacks geometry and cannot be placed in patient space"
        )
    return np.array([float(v) for v in value], dtype=np.float64)


def pixel_array(ds) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # decoders raise many types
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        name = getattr(syntax, "name", str(syntax))
        detail = " ".join(str(exc).split())[:100]
        if getattr(syntax, "is_compressed", True):
            hint = "install pylibjpeg, pylibjpeg-openjpeg and pylibjpeg-libjpeg, or check the file is complete"
        else:  # nothing to decode: the pixel data does not match the header
            hint = "the file is truncated or its header (rows, columns, bits, frames) is corrupt: re-export it"
        raise VolumeIOError(
            f"expected decodable pixel data in {getattr(ds, 'filename', 'a DICOM file')}, found transfer syntax "
            f"'{name}' that could not be decoded ({type(exc).__name__}: {detail}); {hint}"
        ) from None


def rescale(pixels: np.ndarray, slopes: Sequence[float], intercepts: Sequence[float]) -> np.ndarray:
    """Apply per-slice rescale; keep integers when the result is integral."""
    slopes = np.asarray(slopes, dtype=np.float64)
    intercepts = np.asarray(intercepts, dtype=np.float64)
    integral = np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts))
    if np.all(slopes == 1) and np.all(intercepts == 0):
        out = pixels
    else:
        out = pixels.astype(np.float64) * slopes[None, None, :] + intercepts[None, None, :]
    if integral and np.issubdtype(pixels.dtype, np.integer):
        lo, hi = (float(out.min()), float(out.max())) if out.size else (0.0, 0.0)
        for dtype in (np.int16, np.int32):
            if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
                return out.astype(dtype)
        return out.astype(np.int64)
    return out.astype(np.float32)


def instance_uid(ds, key: str = "SOPInstanceUID") -> str:
    """``SOPInstanceUID`` (or ``SOPClassUID``), from the file meta where the data set leaves it empty."""
    value = str(getattr(ds, key, "") or "")
    meta = getattr(ds, "file_meta", None)
    if value or meta is None:
        return value
    return str(getattr(meta, "MediaStorage" + key, "") or "")


def display_window(ds) -> dict[str, float] | None:
    try:
        center, width = ds.WindowCenter, ds.WindowWidth
    except AttributeError:
        return None
    first = lambda v: float(v[0]) if hasattr(v, "__len__") and not isinstance(v, str) else float(v)  # noqa: E731
    return {"center": first(center), "width": first(width)}
