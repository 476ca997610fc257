"""SimpleITK bridge (NRRD, MHA, and any format ITK reads): LPS <-> RAS in one audited pair."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GeometryError, VolumeIOError
from ..volume import LPS_TO_RAS, Volume
from ._atomic import atomic_path

log = logging.getLogger(__name__)


def from_sitk(image, meta: dict[str, Any] | None = None) -> Volume:
    """Convert a ``SimpleITK.Image`` (LPS) to a :class:`Volume` (RAS), exactly."""
    if image.GetDimension() != 3:
        raise GeometryError(f"expected a 3D image, found a {image.GetDimension()}D one; give a single 3D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise GeometryError(
            f"expected a scalar image, found {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "give a single-channel volume"
        )
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (k, j, i) -> (i, j, k)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = image.GetOrigin()
    return Volume(np.ascontiguousarray(array), LPS_TO_RAS @ lps, meta or {})


def to_sitk(volume: Volume):
    """Convert a :class:`Volume` to a ``SimpleITK.Image`` (LPS), exactly."""
    import SimpleITK as sitk

    array = volume.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    lps = LPS_TO_RAS @ volume.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    return image


def read_sitk(path: str | Path, meta: dict[str, Any] | None = None) -> Volume:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "ERROR" in line or "Could not" in line), first[-1] if first else "")
        raise VolumeIOError(
            f"expected a readable image at {path}, found a file ITK cannot read ({detail.strip()[:160]}); "
            "check that the file is complete and in NRRD/MHA/NIfTI format"
        ) from None
    info = {"source": str(path), "format": Path(path).suffix.lstrip(".").lower()}
    info.update(meta or {})
    for key in ("modality",):
        if image.HasMetaDataKey(key):
            info.setdefault(key, image.GetMetaData(key))
    return from_sitk(image, info)


def write_sitk(volume: Volume, path: str | Path, *, compress: bool = True) -> None:
    import SimpleITK as sitk

    image = to_sitk(volume)
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), compress)
        except RuntimeError as exc:
            raise VolumeIOError(f"could not write {path}: {str(exc).strip().splitlines()[-1][:160]}") from None
    log.info("wrote %s", path)
