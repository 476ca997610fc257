"""Enhanced multi-frame DICOM images (one file, every slice a frame): their grid from the
per-frame functional groups, read with the same checks as a stack of single-frame files
(:func:`medsam3d.io.dicom.load_dicom` calls :func:`load_multiframe`)."""

from __future__ import annotations

import numpy as np

from ..errors import GeometryError, VolumeIOError
from ..volume import Volume
from .dicom import _stack_geometry
from .dicom_values import instance_uid, pixel_array, rescale


def _group(frame, shared, sequence: str, attr: str):
    for source in (frame, shared):
        if source is not None and sequence in source:
            item = getattr(source, sequence)[0]
            if attr in item:
                return getattr(item, attr)
    return None


def load_multiframe(ds, *, allow_tilt: bool) -> Volume:
    where = f"multi-frame object {getattr(ds, 'SOPInstanceUID', '?')}"
    frames = list(getattr(ds, "PerFrameFunctionalGroupsSequence", []))
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    n = int(ds.NumberOfFrames)
    if len(frames) != n:
        raise VolumeIOError(f"expected {n} per-frame functional groups in {where}, found {len(frames)}")
    positions, orientations, slopes, intercepts = [], [], [], []
    spacing = None
    for frame in frames:
        pos = _group(frame, shared, "PlanePositionSequence", "ImagePositionPatient")
        iop = _group(frame, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        ps = _group(frame, shared, "PixelMeasuresSequence", "PixelSpacing")
        if pos is None or iop is None or ps is None:
            raise GeometryError(f"expected plane position, orientation and pixel spacing for every frame of {where}")
        positions.append([float(v) for v in pos])
        orientations.append([float(v) for v in iop])
        spacing = np.array([float(v) for v in ps])
        slopes.append(float(_group(frame, shared, "PixelValueTransformationSequence", "RescaleSlope") or 1))
        intercepts.append(float(_group(frame, shared, "PixelValueTransformationSequence", "RescaleIntercept") or 0))
    orientations_arr = np.array(orientations)
    if not np.allclose(orientations_arr, orientations_arr[0], atol=1e-4):
        raise GeometryError(f"expected one frame orientation in {where}, found several; split the object by stack")
    thickness = float(_group(frames[0], shared, "PixelMeasuresSequence", "SliceThickness") or 1.0)
    order, affine = _stack_geometry(
        np.array(positions), orientations_arr[0, :3], orientations_arr[0, 3:], spacing,
        thickness=thickness, allow_tilt=allow_tilt, where=where,
    )
    pixels = pixel_array(ds)  # (frames, rows, cols)
    if pixels.ndim != 3:
        raise VolumeIOError(f"expected grey-level frames in {where}, found pixel data of shape {pixels.shape}")
    pixels = pixels[order].transpose(1, 2, 0)  # (rows, cols, k)
    array = rescale(pixels, [slopes[i] for i in order], [intercepts[i] for i in order]).transpose(1, 0, 2)
    meta = {
        "dicom_files": [str(ds.filename)],
        "frame_order": order.tolist(),
        "sop_instance_uids": [instance_uid(ds)],
        "rescale": {"slope": slopes[0], "intercept": intercepts[0]},
        "window": None,
    }
    return Volume(np.ascontiguousarray(array), affine, meta)
