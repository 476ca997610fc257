"""Reading and writing medical volumes and label maps.

``load(path)`` reads NIfTI (and its .hdr/.img pairs), MGH, NRRD, MHA/MHD or a DICOM folder
into a :class:`~medsam3d.Volume`; ``load_labels(path)`` reads a label map and refuses an image;
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
from ._guard import check_path
from ._nifti import from_nibabel, read_nifti, to_nibabel, write_nifti
from ._sitk import from_sitk, read_sitk, to_sitk, write_sitk
from .dicom import DicomSeries, list_dicom_series, load_dicom
from .rtstruct import load_rtstruct

log = logging.getLogger(__name__)

__all__ = [
    "DicomSeries", "as_volume", "check_output", "from_nibabel", "from_sitk", "list_dicom_series", "load",
    "load_dicom", "load_labels", "check_label_values", "MAX_LABELS", "load_rtstruct", "save", "to_nibabel",
    "to_sitk", "IMAGE_SUFFIXES", "LABEL_SUFFIXES",
]

NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".mgz", ".mgh")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIBABEL_SUFFIXES + ITK_SUFFIXES
LABEL_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".seg.nrrd", ".dcm")


def _as_path(path: Any, what: str = "an image file or DICOM folder") -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise VolumeIOError(f"expected a path to {what}, found {type(path).__name__}")
    if isinstance(path, str) and "\x00" in path:
        raise VolumeIOError(f"expected a path to {what}, found one with a NUL character")
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


def image_format(path: Path) -> str | None:
    """The reader a file's name asks for: ``seg.nrrd``, ``nibabel`` (NIfTI, its .hdr/.img pairs,
    MGH) or ``itk`` (NRRD, MetaImage); None for any other name (a DICOM file, or unknown)."""
    name = path.name.lower()
    if name.endswith((".seg.nrrd", ".seg.nhdr")):
        return "seg.nrrd"
    if name.endswith(NIBABEL_SUFFIXES):
        return "nibabel"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    return None


_FORMAT_NAMES = {"seg.nrrd": "Slicer segmentation", "nibabel": "NIfTI/MGH", "itk": "NRRD/MetaImage"}


def load(path: str | Path, *, series_uid: str | None = None, allow_tilt: bool = False,
         volume_index: int | None = None) -> Volume:
    """Load an image file or a DICOM folder (or one DICOM file's series) as a Volume.

    Files: NIfTI (``.nii``, ``.nii.gz``, ``.hdr``/``.img`` pairs), MGH (``.mgz``, ``.mgh``), NRRD
    (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``), Slicer ``.seg.nrrd``, or a DICOM file.
    ``series_uid`` picks a series of a DICOM folder (refused for other files); ``volume_index``
    picks one volume of a 4D file or of a DICOM series holding several (echoes, phases: required
    there, the error says how many; refused for a single volume). The size a header claims is
    checked before any voxel is read.
    """
    return _load(path, series_uid=series_uid, allow_tilt=allow_tilt, volume_index=volume_index)


def _load(path: str | Path, *, series_uid: str | None = None, allow_tilt: bool = False,
          volume_index: int | None = None, labels: bool = False) -> Volume:
    what = "a label map file, DICOM SEG or RTSTRUCT" if labels else "an image file or DICOM folder"
    path = _as_path(path, what)
    info = check_path(path, what)
    if path.is_dir():
        volume = load_dicom(path, series_uid=series_uid, allow_tilt=allow_tilt, volume_index=volume_index)
        return _checked_intensities(volume, path)
    if info.st_size == 0:
        raise VolumeIOError(f"expected {what} at {path}, found an empty file; re-export or re-copy it")
    kind = image_format(path)
    if kind is None and _is_dicom(path):
        return _checked_intensities(load_dicom(path.parent, series_uid=series_uid or _series_of(path),
                                               allow_tilt=allow_tilt, volume_index=volume_index), path)
    if series_uid is not None:
        raise VolumeIOError(f"expected --series (series_uid) only with a DICOM folder or file, found the "
                            f"{_FORMAT_NAMES.get(kind, 'non-DICOM')} file {path.name}, which holds one series; "
                            "drop --series")
    if kind == "seg.nrrd":
        from ._guard import check_claimed_size, header_data_bytes, nrrd_claim
        from .segnrrd import read_seg_nrrd

        _no_volume_index(volume_index, path)
        claim = nrrd_claim(path)
        if claim is not None:  # slicerio (pynrrd) would decompress and allocate whatever the header says
            data_bytes, compression = header_data_bytes(path)
            check_claimed_size(path, claim[0], claim[1], data_bytes=data_bytes, compression=compression)
        return read_seg_nrrd(path)
    if kind == "nibabel":
        volume = read_nifti(path, volume_index=volume_index, labels=labels)
    elif kind == "itk":
        volume = read_sitk(path, volume_index=volume_index, labels=labels)
    else:
        raise VolumeIOError(
            f"expected a NIfTI (.nii/.nii.gz/.hdr+.img), MGH (.mgz), NRRD (.nrrd), MetaImage (.mha/.mhd) file or "
            f"a DICOM folder, found '{path.name}'; convert the file or point to its DICOM folder"
        )
    return volume if labels else _checked_intensities(volume, path)


def _no_volume_index(volume_index: int | None, path: Path) -> None:
    if volume_index is not None:
        raise VolumeIOError(f"expected --volume (volume_index) only with a 4D file or a DICOM series holding "
                            f"several volumes, found the Slicer segmentation {path.name}; drop --volume")


def _checked_intensities(volume: Volume, path: Path) -> Volume:
    """Refuse an image whose voxels are all NaN or infinite (nothing to show or segment); some are
    allowed ("no data" outside a field of view: the engine and ``measure`` set them aside)."""
    import numpy as np

    array = volume.array
    if array.size and np.issubdtype(array.dtype, np.inexact):
        sample = array.ravel()[:: max(1, array.size // 4096)]
        if not np.isfinite(sample).any() and not np.isfinite(array).any():
            raise VolumeIOError(f"expected an image with finite intensities in {path}, found every voxel NaN or "
                                "infinite; check the file (a failed export or conversion?)")
    return volume


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _series_of(path: Path) -> str | None:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types on a corrupt header
        raise VolumeIOError(f"expected a readable DICOM file at {path}, found a corrupt header "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); re-export or re-copy it"
                            ) from None
    return str(getattr(ds, "SeriesInstanceUID", "")) or None


#: more distinct values than a label map holds, unless its format is a segmentation format
MAX_LABELS = 255
MAX_LABEL_VALUE = 2**32 - 1  # the label writers store uint8, uint16 or uint32
_SEGMENTATION_FORMATS = ("seg.nrrd", "dicom-seg", "rtstruct")


def load_labels(path: str | Path, reference: Volume | None = None, *, max_labels: int | None = MAX_LABELS) -> Volume:
    """Load a label map (NIfTI, NRRD, MHA, MGH, .seg.nrrd, DICOM SEG or RTSTRUCT).

    With ``reference`` the label map must lie on its grid (DICOM SEG and RTSTRUCT are
    rasterised onto it). The same voxels stored with other axis directions are put on it
    exactly (see :func:`medsam3d.volume.on_grid`); any other mismatch raises
    :class:`~medsam3d.errors.GeometryError`.

    The voxels are checked to be a label map, not an image: whole numbers >= 0 (NaN, infinite,
    fractional and negative values are refused) and, unless the file is a segmentation format
    (``.seg.nrrd``, DICOM SEG, RTSTRUCT), at most ``max_labels`` distinct non-zero values
    (None: no limit; the CLI's ``--max-labels N``).
    """
    path = _as_path(path, "a label map file, DICOM SEG or RTSTRUCT")
    if max_labels is not None and (isinstance(max_labels, bool) or not isinstance(max_labels, int) or max_labels < 1):
        raise Medsam3dError(f"expected max_labels as a whole number >= 1 or None (no limit), found {max_labels!r}")
    check_path(path, "a label map file, DICOM SEG or RTSTRUCT")
    if path.is_file() and image_format(path) is None and _is_dicom(path):
        import pydicom

        try:
            modality = getattr(pydicom.dcmread(str(path), stop_before_pixels=True), "Modality", "")
        except Exception as exc:  # pydicom raises many types on a corrupt header
            raise VolumeIOError(f"expected a readable DICOM file at {path}, found a corrupt header "
                                f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); re-export it") from None
        if modality in ("SEG", "RTSTRUCT"):
            if reference is None:
                raise VolumeIOError(f"expected the referenced image series to read a {modality} file, found none; "
                                    "pass the image (--image)")
            if modality == "SEG":
                from .dicomseg import read_dicom_seg

                return read_dicom_seg(path, reference)
            return load_rtstruct(path, reference)
        found = f"Modality '{modality}'" if modality else "no Modality (a truncated or corrupt file?)"
        raise VolumeIOError(f"expected a DICOM SEG or RTSTRUCT file at {path}, found a DICOM file with {found}; "
                            "give the segmentation (DICOM SEG, RTSTRUCT or a label map file), not an image slice")
    labels = _load(path, labels=True)
    labels = check_label_values(labels, path, max_labels=max_labels)
    if reference is not None:
        labels = on_grid(labels, reference)  # the same voxels stored with other axis directions are reoriented
    return labels


def check_label_values(labels: Volume, path: Any, *, max_labels: int | None = MAX_LABELS) -> Volume:
    """``labels`` with integer voxels, or one line saying why they are not a label map (they look
    like an image): NaN or infinite, fractional or negative values, or more than ``max_labels``
    distinct non-zero values where the format is not a segmentation format."""
    import numpy as np

    values = labels.array
    image_hint = ("it looks like an image, not a label map: give the segmentation file")
    if values.dtype == np.bool_:
        return labels.with_array(values.astype(np.uint8))
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise VolumeIOError(f"expected integer label values in {path}, found {values.dtype} voxels; {image_hint}")
    if not np.issubdtype(values.dtype, np.integer):
        finite = np.isfinite(values)
        if not finite.all():
            raise VolumeIOError(f"expected integer label values in {path}, found {int(values.size - finite.sum())} "
                                f"NaN or infinite voxel(s); {image_hint}")
        if not np.all(values == np.round(values)):
            raise VolumeIOError(f"expected integer label values in {path}, found fractional values "
                                f"(range {float(values.min()):g}..{float(values.max()):g}); {image_hint}")
    lo = values.min() if values.size else 0
    hi = values.max() if values.size else 0
    if lo < 0:
        raise VolumeIOError(f"expected label values >= 0 in {path}, found values down to {lo:g} "
                            f"(range {lo:g}..{hi:g}); {image_hint}")
    if hi > MAX_LABEL_VALUE:
        raise VolumeIOError(f"expected label values up to {MAX_LABEL_VALUE} (32 bits) in {path}, found up to {hi:g}; "
                            f"{image_hint}")
    if not np.issubdtype(values.dtype, np.integer):
        values = values.astype(np.uint8 if hi < 256 else np.uint16 if hi < 65536 else np.uint32)
        labels = labels.with_array(values)
    if max_labels is not None and labels.meta.get("format") not in _SEGMENTATION_FORMATS and int(hi) > max_labels:
        count = _count_labels(values, int(hi))
        if count > max_labels:
            raise VolumeIOError(
                f"expected at most {max_labels} labels in the label map {path}, found {count} (distinct non-zero "
                f"values, up to {int(hi)}); {image_hint}, or, if it really holds that many labels, raise the "
                "limit with --max-labels N (max_labels=None in Python)")
    return labels


def _count_labels(values, hi: int) -> int:
    """Distinct non-zero values (linear time where the range allows a histogram)."""
    import numpy as np

    if hi < 1 << 24:
        return int(np.count_nonzero(np.bincount(values.ravel().astype(np.int64, copy=False), minlength=1)[1:]))
    return int(np.count_nonzero(np.unique(values)))


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
