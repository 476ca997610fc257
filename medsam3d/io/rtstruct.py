"""RTSTRUCT -> label map on the referenced image's grid.

Each closed planar contour is mapped into the image's voxel space through the exact
affine, assigned to the slice it lies on and filled with the even-odd rule (a contour
inside another makes a hole), keeping the voxels whose centre is inside the polygon.
ROIs get label values 1, 2, ... in the order of the StructureSetROISequence.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import GeometryError, VolumeIOError
from ..volume import LPS_TO_RAS, Volume
from .labels import label_dtype

log = logging.getLogger(__name__)


def _find_rtstruct(path: Path) -> Path:
    if path.is_file():
        return path
    import pydicom

    for candidate in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(str(candidate), stop_before_pixels=True, specific_tags=["Modality"])
        except Exception:
            continue
        if getattr(ds, "Modality", "") == "RTSTRUCT":
            return candidate
    raise VolumeIOError(f"expected an RTSTRUCT file in {path}, found none; point to the RS*.dcm file")


def load_rtstruct(path: str | Path, reference: Volume, *, rois: Sequence[str] | None = None) -> Volume:
    """Rasterise the contours of an RTSTRUCT onto ``reference``'s grid."""
    import pydicom

    path = _find_rtstruct(Path(path))
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:
        raise VolumeIOError(f"expected a readable RTSTRUCT at {path}, found an unreadable file "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); re-export it") from None
    if getattr(ds, "Modality", "") != "RTSTRUCT":
        raise VolumeIOError(f"expected an RTSTRUCT, found Modality '{getattr(ds, 'Modality', '')}' in {path}")
    try:
        return _rasterise(ds, path, reference, rois)
    except (AttributeError, KeyError, IndexError, ValueError, TypeError) as exc:  # a missing or malformed element
        if isinstance(exc, GeometryError):
            raise
        raise VolumeIOError(f"expected a well-formed RTSTRUCT at {path}, found a missing or malformed element "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); re-export it") from None


def _rasterise(ds, path: Path, reference: Volume, rois: Sequence[str] | None) -> Volume:
    from skimage.draw import polygon2mask

    ref_for = reference.meta.get("frame_of_reference_uid")
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    wanted = [n for n in names if rois is None or names[n] in rois]
    if rois is not None and len(wanted) != len(rois):
        missing = sorted(set(rois) - {names[n] for n in wanted})
        raise VolumeIOError(f"expected ROIs {missing} in {path}, found only {sorted(names.values())}")
    for roi in ds.StructureSetROISequence:
        roi_for = str(getattr(roi, "ReferencedFrameOfReferenceUID", ""))
        if ref_for and roi_for and roi_for != ref_for:
            raise GeometryError(
                f"expected ROI '{roi.ROIName}' in the image's frame of reference {ref_for}, found {roi_for}; "
                "load the image series this RTSTRUCT was drawn on"
            )
    labels = np.zeros(reference.shape, dtype=np.int32)
    inv = np.linalg.inv(LPS_TO_RAS @ reference.affine)  # LPS mm -> ijk
    segments = {}
    value_of = {number: value for value, number in enumerate(wanted, start=1)}
    colors = {}
    for roi_contour in getattr(ds, "ROIContourSequence", []):
        number = int(roi_contour.ReferencedROINumber)
        if number not in names:
            raise VolumeIOError(f"expected each ROI contour of {path} to reference an ROI of its structure set "
                                f"({sorted(names)}), found ROI number {number}; the RTSTRUCT is inconsistent: "
                                "re-export it")
        if number not in value_of:
            continue
        if "ROIDisplayColor" in roi_contour:
            colors[number] = tuple(float(c) / 255 for c in roi_contour.ROIDisplayColor)
        per_slice: dict[int, np.ndarray] = {}
        for contour in getattr(roi_contour, "ContourSequence", []):
            kind = str(getattr(contour, "ContourGeometricType", "CLOSED_PLANAR"))
            if kind not in ("CLOSED_PLANAR",):
                log.warning("skipping a %s contour of ROI %s", kind, names[number])
                continue
            points = np.asarray(contour.ContourData, dtype=np.float64)
            if points.size % 3 or points.size < 9 or not np.all(np.isfinite(points)):
                raise VolumeIOError(f"expected contours of ROI '{names[number]}' in {path} as x, y, z triples of "
                                    f"finite numbers (3 points at least), found {points.size} values; re-export it")
            points = points.reshape(-1, 3)
            ijk = points @ inv[:3, :3].T + inv[:3, 3]
            k_float = ijk[:, 2]
            k = int(np.round(k_float.mean()))
            if np.ptp(k_float) > 0.1:
                raise GeometryError(
                    f"expected contours of ROI '{names[number]}' to lie in image slices, found one spanning "
                    f"{np.ptp(k_float):.2f} slices; the RTSTRUCT does not match this image's slice orientation"
                )
            if not 0 <= k < reference.shape[2]:
                log.warning("contour of ROI %s at slice %.2f lies outside the image", names[number], k_float.mean())
                continue
            mask = polygon2mask(reference.shape[:2], ijk[:, :2])
            per_slice[k] = per_slice[k] ^ mask if k in per_slice else mask
        for k, mask in per_slice.items():
            labels[:, :, k][mask] = value_of[number]
    for number, value in value_of.items():
        segments[value] = {"name": names[number], "color": colors.get(number, (1.0, 0.0, 0.0))}
    return Volume(labels.astype(label_dtype(labels)), reference.affine,
                  {"source": str(path), "format": "rtstruct", "segments": segments})
