"""Plain, JSON-ready descriptions of volumes and results (used by the CLI and reports)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .volume import Volume


def describe_volume(volume: Volume) -> dict[str, Any]:
    """Geometry and intensity summary of a volume (``medsam3d info``)."""
    array = volume.array
    finite = array[np.isfinite(array)] if np.issubdtype(array.dtype, np.floating) else array
    meta = volume.meta
    info: dict[str, Any] = {
        "source": meta.get("source"),
        "format": meta.get("format"),
        "shape": list(volume.shape),
        "spacing": [round(s, 6) for s in volume.spacing],
        "origin": [round(o, 4) for o in volume.origin],
        "axcodes": "".join(volume.axcodes),
        "affine": [[round(float(v), 6) for v in row] for row in volume.affine],
        "oblique": volume.is_oblique,
        "voxel_volume_mm3": round(volume.voxel_volume_mm3, 6),
        "dtype": str(array.dtype),
        "intensity_range": [float(finite.min()), float(finite.max())] if finite.size else None,
        "modality": meta.get("modality"),
    }
    for key in ("series_uid", "series_description", "patient_position", "rescale", "window", "affine_source"):
        if meta.get(key) not in (None, ""):
            info[key] = meta[key]
    return info
