"""nibabel bridge (NIfTI-1/2, .hdr/.img pairs, MGH): the affine is used verbatim, the sform/qform choice logged."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GeometryError, Medsam3dError, VolumeIOError
from ..volume import Volume
from ._atomic import atomic_path
from ._guard import check_claimed_size, choose_volume

log = logging.getLogger(__name__)


def from_nibabel(image, meta: dict[str, Any] | None = None, *, volume_index: int | None = None) -> Volume:
    """Convert a nibabel spatial image to a :class:`Volume`, exactly (array and affine).

    A 4D image gives the volume ``volume_index`` (required: the error says how many there are).
    """
    shape = tuple(int(n) for n in image.shape)
    extra = [n for n in shape[3:] if n != 1]
    if len(extra) > 1:
        raise GeometryError(f"expected a 3D image, found shape {shape} with {len(shape) - 3} dimensions beyond the "
                            "third (volumes and components); give a single 3D volume")
    where = (meta or {}).get("source", "the image")
    labels = bool((meta or {}).get("labels", False))
    index = choose_volume(where, shape, extra[0] if extra else 1, volume_index, labels=labels)
    if len(shape) > 3:
        slicer = (slice(None),) * 3 + tuple(0 if n == 1 else index for n in shape[3:])
        data = np.asanyarray(image.dataobj[slicer])
    else:
        data = np.asanyarray(image.dataobj)
    if not data.dtype.isnative:  # big-endian files: native order, the same values
        data = data.astype(data.dtype.newbyteorder("="))
    info = {k: v for k, v in (meta or {}).items() if k != "labels"}
    if index is not None:
        info["volume_index"] = index
    return Volume(np.ascontiguousarray(data), np.asarray(image.affine, dtype=np.float64), info)


def to_nibabel(volume: Volume):
    """Convert a :class:`Volume` to a ``nibabel.Nifti1Image`` (sform and qform, code 1 = scanner)."""
    import nibabel as nib

    array = volume.array.astype(np.uint8) if volume.array.dtype == np.bool_ else volume.array
    image = nib.Nifti1Image(array, volume.affine)
    image.set_sform(volume.affine, code=1)
    image.set_qform(volume.affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return image


_NIFTI_CLASSES = ("Nifti1Image", "Nifti2Image", "Nifti1Pair", "Nifti2Pair")
_COMPRESSION = {".gz": "gzip", ".mgz": "gzip", ".bz2": "bzip2", ".zst": "other"}


def read_nifti(path: str | Path, *, volume_index: int | None = None, labels: bool = False) -> Volume:
    """Read a NIfTI-1/2 file (``.nii``, ``.nii.gz``, a ``.hdr``/``.img`` pair) or an MGH volume
    (``.mgz``, ``.mgh``) with nibabel; the affine is nibabel's (sform, qform, MGH vox2ras)."""
    import nibabel as nib

    path = Path(path)
    try:
        image = nib.load(str(path))  # the header only; voxels are read below
    except Exception as exc:  # nibabel raises many types on a broken header
        raise VolumeIOError(
            f"expected a readable NIfTI/MGH file at {path}, found one nibabel cannot read "
            f"({type(exc).__name__}: {_one_line(exc)}); check that the file is complete"
        ) from None
    kind = type(image).__name__
    if kind == "MGHImage":
        fmt, affine_source = "mgh", "vox2ras (MGH)"
    elif kind in _NIFTI_CLASSES:
        fmt, affine_source = "nifti", _affine_source(image.header, warn=False)
    else:
        found = "an Analyze 7.5 header (no NIfTI magic)" if "Analyze" in kind else f"a {kind}"
        raise VolumeIOError(f"expected a NIfTI or MGH file at {path}, found {found}, which does not record the "
                            "patient's orientation; convert it to NIfTI with the tool that wrote it")
    data_file = Path(image.file_map["image"].filename)
    if data_file != path and not data_file.exists():
        raise VolumeIOError(f"expected the voxel file {data_file.name} beside the header {path}, found none; "
                            "copy the .hdr and .img files together")
    proxy = image.dataobj
    compression = _COMPRESSION.get(data_file.suffix.lower())
    try:
        data_bytes = data_file.stat().st_size - (0 if compression else int(getattr(proxy, "offset", 0)))
    except OSError:
        data_bytes = None
    shape = tuple(int(n) for n in image.shape)
    scaled = float(getattr(proxy, "slope", 1.0)) != 1.0 or float(getattr(proxy, "inter", 0.0)) != 0.0
    itemsize = np.dtype(proxy.dtype).itemsize
    check_claimed_size(path, shape, itemsize, data_bytes=data_bytes, compression=compression,
                       loaded=shape[:3], loaded_itemsize=8 if scaled else itemsize)
    try:
        volume = from_nibabel(image, {"source": str(path), "format": fmt, "affine_source": affine_source,
                                      "labels": labels}, volume_index=volume_index)
    except Medsam3dError:
        raise
    except Exception as exc:  # truncated or corrupt voxel data
        raise VolumeIOError(
            f"expected a readable {fmt.upper() if fmt == 'mgh' else 'NIfTI'} file at {path}, found voxel data "
            f"nibabel cannot read ({type(exc).__name__}: {_one_line(exc)}); check that the file is complete"
        ) from None
    if affine_source.startswith("zooms"):
        log.warning("NIfTI %s has neither sform nor qform set: nibabel falls back to the zooms only", path.name)
    log.info("read %s (affine from %s)", path, affine_source)
    return volume


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:120]


def _affine_source(header, warn: bool = True) -> str:
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
    if warn:
        log.warning("NIfTI has neither sform nor qform set: nibabel falls back to the zooms only")
    return "zooms (no sform/qform)"


def write_nifti(volume: Volume, path: str | Path) -> None:
    import nibabel as nib

    image = to_nibabel(volume)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    log.info("wrote %s", path)
