"""Slicer ``.seg.nrrd`` label maps (names, colours) through slicerio."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import VolumeIOError, require
from ..volume import LPS_TO_RAS, Volume
from ._atomic import atomic_path
from .labels import default_color, label_dtype, segment_table

log = logging.getLogger(__name__)


def write_seg_nrrd(labels: Volume, path: str | Path) -> None:
    """Write a label map as a Slicer segmentation (one layer, one segment per label value)."""
    slicerio = require("slicerio", ".seg.nrrd output")
    voxels = np.asarray(labels.array).astype(label_dtype(labels.array))
    segments = []
    for value, info in segment_table(labels).items():
        segments.append({
            "id": f"Segment_{value}",
            "labelValue": int(value),
            "layer": 0,
            "name": info["name"],
            "color": [float(c) for c in info["color"]],
        })
    segmentation = {"voxels": voxels, "ijkToLPS": LPS_TO_RAS @ labels.affine, "segments": segments,
                    "containedRepresentationNames": ["Binary labelmap"]}
    with atomic_path(path) as tmp:
        slicerio.write_segmentation(str(tmp), segmentation)
    log.info("wrote %s (%d segments)", path, len(segments))


def read_seg_nrrd(path: str | Path) -> Volume:
    """Read a ``.seg.nrrd``; overlapping layers are refused (one label per voxel expected)."""
    slicerio = require("slicerio", ".seg.nrrd input")
    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as exc:
        raise VolumeIOError(
            f"expected a Slicer .seg.nrrd at {path}, found a file slicerio cannot read ({exc}); check the file"
        ) from None
    voxels = np.asarray(seg["voxels"])
    if voxels.ndim == 4:
        raise VolumeIOError(
            f"expected a single-layer segmentation in {path}, found {voxels.shape[0]} overlapping layers; "
            "export it from Slicer as a label map or collapse the layers"
        )
    segments = {int(s["labelValue"]): {"name": s.get("name", f"label {s['labelValue']}"),
                                       "color": tuple(s.get("color", default_color(int(s["labelValue"]))))}
                for s in seg["segments"]}
    affine = LPS_TO_RAS @ np.asarray(seg["ijkToLPS"], dtype=np.float64)
    return Volume(voxels, affine, {"source": str(path), "format": "seg.nrrd", "segments": segments})
