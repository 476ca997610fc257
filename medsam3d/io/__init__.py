"""Reading and writing medical volumes and label maps.

``load(path)`` reads NIfTI, NRRD, MHA/MHD or a DICOM folder into a :class:`~medsam3d.Volume`;
``save(labels, path, reference=...)`` writes a label map as NIfTI, NRRD/MHA, Slicer
``.seg.nrrd`` or DICOM SEG, atomically, on exactly the reference's grid.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..errors import Medsam3dError, VolumeIOError
from ..volume import Volume, on_grid
from ._atomic import check_output_path, full_suffix
from ._nifti import from_nibabel, read_nifti, to_nibabel, write_nifti
from ._sitk import from_sitk, read_sitk, to_sitk, write_sitk
from .dicom import DicomSeries, list_dicom_series, load_dicom
from .rtstruct import load_rtstruct

log = logging.getLogger(__name__)

__all__ = [
    "DicomSeries", "as_volume", "check_output", "from_nibabel", "from_sitk", "list_dicom_series", "load",
    "load_dicom", "load_labels", "load_rtstruct", "save", "to_nibabel", "to_sitk", "IMAGE_SUFFIXES", "LABEL_SUFFIXES",
]

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".seg.nrrd", ".dcm")


def _as_path(path: Any, what: str = "an image file or DICOM folder") -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise VolumeIOError(f"expected a path to {what}, found {type(path).__name__}")
    return Path(path)


def as_volume(value: Any, *, labels: bool = False, reference: Volume | None = None) -> Volume:
    """A :class:`Volume` as given, or loaded from a path (``labels``: with :func:`load_labels` onto
    ``reference``); anything else (an array, None) is refused with one line."""
    if isinstance(value, Volume):
        return on_grid(value, reference) if labels and reference is not None else value
    if isinstance(value, (str, os.PathLike)):
        return load_labels(value, reference) if labels else load(value)
    what = "a label map" if labels else "an image"
    raise Medsam3dError(f"expected a medsam3d.Volume or a path to {what}, found {type(value).__name__}; "
                        "wrap an array with its affine as Volume(array, affine) or load a file with medsam3d.load")


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise VolumeIOError(f"expected an image file or DICOM folder at {path}, found nothing; check the path")


def load(path: str | Path, *, series_uid: str | None = None, allow_tilt: bool = False) -> Volume:
    """Load a NIfTI/NRRD/MHA file or a DICOM folder (or one DICOM file's series) as a Volume."""
    path = _as_path(path)
    _check_exists(path)
    if path.is_dir():
        return load_dicom(path, series_uid=series_uid, allow_tilt=allow_tilt)
    suffix = full_suffix(path)
    if path.stat().st_size == 0:
        raise VolumeIOError(f"expected an image file at {path}, found an empty file; re-export or re-copy it")
    if suffix == ".seg.nrrd":
        from .segnrrd import read_seg_nrrd

        return read_seg_nrrd(path)
    if suffix in (".nii", ".nii.gz"):
        return read_nifti(path)
    if suffix in (".nrrd", ".nhdr", ".mha", ".mhd"):
        return read_sitk(path)
    if _is_dicom(path):
        return load_dicom(path.parent, series_uid=series_uid or _series_of(path), allow_tilt=allow_tilt)
    raise VolumeIOError(
        f"expected a NIfTI (.nii/.nii.gz), NRRD (.nrrd), MHA (.mha) file or a DICOM folder, found '{path.name}'; "
        "convert the file or point to its DICOM folder"
    )


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _series_of(path: Path) -> str | None:
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    return str(getattr(ds, "SeriesInstanceUID", "")) or None


def load_labels(path: str | Path, reference: Volume | None = None) -> Volume:
    """Load a label map (NIfTI, NRRD, .seg.nrrd, DICOM SEG or RTSTRUCT).

    With ``reference`` the label map must lie on its grid (DICOM SEG and RTSTRUCT are
    rasterised onto it). The same voxels stored with other axis directions are put on it
    exactly (see :func:`medsam3d.volume.on_grid`); any other mismatch raises
    :class:`~medsam3d.errors.GeometryError`.
    """
    path = _as_path(path, "a label map file, DICOM SEG or RTSTRUCT")
    _check_exists(path)
    if path.is_file() and _is_dicom(path):
        import pydicom

        modality = getattr(pydicom.dcmread(str(path), stop_before_pixels=True), "Modality", "")
        if modality in ("SEG", "RTSTRUCT"):
            if reference is None:
                raise VolumeIOError(f"expected the referenced image series to read a {modality} file, found none; "
                                    "pass the image (--image)")
            if modality == "SEG":
                from .dicomseg import read_dicom_seg

                return read_dicom_seg(path, reference)
            return load_rtstruct(path, reference)
    labels = load(path)
    import numpy as np

    if not np.issubdtype(labels.array.dtype, np.integer):
        values = labels.array
        if not np.all(values == np.round(values)):
            raise VolumeIOError(f"expected integer label values in {path}, found non-integer voxels; "
                                "give a label map, not an image")
        labels = labels.with_array(values.astype(np.int32))
    if reference is not None:
        labels = on_grid(labels, reference)  # the same voxels stored with other axis directions are reoriented
    return labels


def check_output(path: str | Path, *, reference: Volume | None = None) -> None:
    """Refuse, before any work, a label-map path :func:`save` could not write.

    Checks the suffix and the folder and, for DICOM SEG (``.dcm``) given the ``reference``, that
    it is a DICOM series; so a long segmentation does not end in an error at its last step.
    """
    suffix = full_suffix(path)
    if suffix not in LABEL_SUFFIXES:
        raise VolumeIOError(f"expected an output ending in {', '.join(LABEL_SUFFIXES)} (.dcm: DICOM SEG), "
                            f"found '{Path(path).name}'")
    check_output_path(path)
    if suffix == ".dcm" and reference is not None:
        from .dicomseg import check_seg_source

        check_seg_source(reference)


def save(labels: Volume, path: str | Path, *, reference: Volume | None = None) -> Path:
    """Write ``labels`` to ``path``; the format follows the suffix.

    ``.nii``/``.nii.gz`` (NIfTI), ``.nrrd``/``.mha`` (ITK), ``.seg.nrrd`` (Slicer segmentation
    with names and colours) or ``.dcm`` (DICOM SEG; needs the DICOM ``reference`` series).
    The write is atomic: on failure no file is left behind.
    """
    path = _as_path(path, "an output file")
    if not isinstance(labels, Volume):
        raise Medsam3dError(f"expected a medsam3d.Volume to save, found {type(labels).__name__}; wrap an array "
                            "with its affine as Volume(array, affine), or image.with_array(array) on an image's grid")
    suffix = full_suffix(path)
    if reference is not None:
        reference.check_same_grid(labels)
    if suffix in (".nii", ".nii.gz"):
        write_nifti(labels, path)
    elif suffix == ".seg.nrrd":
        from .segnrrd import write_seg_nrrd

        write_seg_nrrd(labels, path)
    elif suffix in (".nrrd", ".mha"):
        write_sitk(labels, path)
    elif suffix == ".dcm":
        from .dicomseg import write_dicom_seg

        write_dicom_seg(labels, path, reference)
    else:
        raise VolumeIOError(
            f"expected an output ending in .nii.gz, .nii, .nrrd, .mha, .seg.nrrd or .dcm (DICOM SEG), found '{path.name}'"
        )
    return path
