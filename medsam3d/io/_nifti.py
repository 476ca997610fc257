"""nibabel bridge (NIfTI-1/2): the affine is used verbatim, the sform/qform choice logged."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GeometryError, VolumeIOError
from ..volume import Volume
from ._atomic import atomic_path

log = logging.getLogger(__name__)


def from_nibabel(image, meta: dict[str, Any] | None = None) -> Volume:
    """Convert a nibabel spatial image to a :class:`Volume`, exactly (array and affine)."""
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise GeometryError(
            f"expected a 3D image, found shape {data.shape}; split 4D series into single volumes first"
        )
    return Volume(np.ascontiguousarray(data), np.asarray(image.affine, dtype=np.float64), meta or {})


def to_nibabel(volume: Volume):
    """Convert a :class:`Volume` to a ``nibabel.Nifti1Image`` (sform and qform, code 1 = scanner)."""
    import nibabel as nib

    array = volume.array.astype(np.uint8) if volume.array.dtype == np.bool_ else volume.array
    image = nib.Nifti1Image(array, volume.affine)
    image.set_sform(volume.affine, code=1)
    image.set_qform(volume.affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return image


def read_nifti(path: str | Path) -> Volume:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        affine_source = _affine_source(image.header)
        volume = from_nibabel(image, {"source": str(path), "format": "nifti", "affine_source": affine_source})
    except (nib.filebasedimages.ImageFileError, EOFError, OSError, ValueError, Exception) as exc:
        if isinstance(exc, GeometryError):
            raise
        raise VolumeIOError(
            f"expected a readable NIfTI file at {path}, found one nibabel cannot read "
            f"({type(exc).__name__}: {str(exc)[:120]}); check that the file is complete"
        ) from None
    log.info("read %s (affine from %s)", path, affine_source)
    return volume


def _affine_source(header) -> str:
    """Which header field nibabel took the affine from (sform wins when its code is set)."""
    try:
        sform_code = int(header["sform_code"])
        qform_code = int(header["qform_code"])
    except (KeyError, TypeError, ValueError):
        return "header"
    if sform_code > 0:
        return f"sform (code {sform_code})"
    if qform_code > 0:
        return f"qform (code {qform_code})"
    log.warning("NIfTI has neither sform nor qform set: nibabel falls back to the zooms only")
    return "zooms (no sform/qform)"


def write_nifti(volume: Volume, path: str | Path) -> None:
    import nibabel as nib

    image = to_nibabel(volume)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    log.info("wrote %s", path)
