"""SimpleITK bridge (NRRD, MHA, and any format ITK reads): LPS <-> RAS in one audited pair."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GeometryError, VolumeIOError
from ..volume import LPS_TO_RAS, Volume
from ._atomic import atomic_path
from ._guard import check_claimed_size, choose_volume, header_data_bytes, utf8_readable, utf8_writable

log = logging.getLogger(__name__)


def from_sitk(image, meta: dict[str, Any] | None = None) -> Volume:
    """Convert a ``SimpleITK.Image`` (LPS) to a :class:`Volume` (RAS), exactly."""
    if image.GetDimension() != 3:
        raise GeometryError(f"expected a 3D image, found a {image.GetDimension()}D one; medsam3d needs a single "
                            "3D volume (a stack of slices)")
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


def _itemsize(pixel_id: int) -> int:
    """Bytes per component of a SimpleITK pixel type ("16-bit signed integer", "complex of 32-bit float")."""
    import re

    import SimpleITK as sitk

    text = sitk.GetPixelIDValueAsString(pixel_id)
    bits = re.search(r"(\d+)-bit", text)
    size = int(bits.group(1)) // 8 if bits else 8
    return size * (2 if "complex" in text else 1)


def _itk_error(path, exc: RuntimeError) -> VolumeIOError:
    lines = str(exc).strip().splitlines()
    detail = next((line for line in lines if "ERROR" in line or "Could not" in line), lines[-1] if lines else "")
    return VolumeIOError(
        f"expected a readable image at {path}, found a file ITK cannot read ({detail.strip()[:160]}); "
        "check that the file is complete and in NRRD/MHA/NIfTI format"
    )


def read_sitk(path: str | Path, meta: dict[str, Any] | None = None, *, volume_index: int | None = None,
              labels: bool = False) -> Volume:
    """Read a NRRD/MHA (any format ITK reads) as a :class:`Volume`: the header first (dimension, size
    checked before any voxel is allocated), then the voxels; a 4D file or one with several components
    per voxel gives the volume ``volume_index``."""
    import SimpleITK as sitk

    path = Path(path)
    with utf8_readable(path) as name:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise _itk_error(path, exc) from None
        size = tuple(int(n) for n in reader.GetSize())
        components = int(reader.GetNumberOfComponents())
        if len(size) > 4 or (len(size) == 4 and size[3] > 1 and components > 1):
            raise GeometryError(f"expected a 3D image, found {len(size)} dimensions ({'x'.join(map(str, size))}) "
                                f"with {components} components per voxel in {path}; give a single 3D volume")
        volumes, what = (size[3], "volumes") if len(size) == 4 else (components, "components per voxel")
        index = choose_volume(path, size, volumes, volume_index, labels=labels, what=what)
        itemsize = _itemsize(reader.GetPixelID())
        data_bytes, compression = header_data_bytes(path)
        loaded = size[:3] if len(size) == 4 else size
        check_claimed_size(path, size + ((components,) if components > 1 else ()), itemsize, data_bytes=data_bytes,
                           compression=compression, loaded=loaded + ((components,) if components > 1 else ()))
        if len(size) == 4:  # read the one volume only; the 4th axis is collapsed (direction: the 3x3 block)
            reader.SetExtractIndex([0, 0, 0, index or 0])
            reader.SetExtractSize([size[0], size[1], size[2], 0])
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise _itk_error(path, exc) from None
    if components > 1:
        image = sitk.VectorIndexSelectionCast(image, index)
    info = {"source": str(path), "format": path.suffix.lstrip(".").lower()}
    if index is not None:
        info["volume_index"] = index
    info.update(meta or {})
    for key in ("modality",):
        if image.HasMetaDataKey(key):
            info.setdefault(key, image.GetMetaData(key))
    return from_sitk(image, info)


def write_sitk(volume: Volume, path: str | Path, *, compress: bool = True) -> None:
    import SimpleITK as sitk

    image = to_sitk(volume)
    with atomic_path(path) as tmp, utf8_writable(tmp) as name:
        try:
            sitk.WriteImage(image, name, compress)
        except RuntimeError as exc:
            raise VolumeIOError(f"could not write {path}: {str(exc).strip().splitlines()[-1][:160]}") from None
    log.info("wrote %s", path)
