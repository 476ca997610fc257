"""DICOM series: list, choose, sort along the slice normal, rescale, check geometry.

Policy (documented in the user guide's DICOM page):

* Slices are sorted by their position along the slice normal (row x column cosines),
  increasing: ``k`` is that rank, the order SimpleITK's series reader uses.
* Rescale slope/intercept are applied per slice (``HU`` for CT). Integer results stay
  integers (int16/int32), anything else becomes float32.
* **Gantry tilt** (slice positions not along the normal) is refused by default; with
  ``allow_tilt=True`` the series loads on its exact, sheared grid (no resampling).
* **Missing slices / non-uniform spacing** (gaps that differ by more than 1 % or
  0.01 mm) are refused: one affine cannot describe such a stack without resampling.
* Several images at the same position (echoes, phases, b-values, repeats in one series): the
  series holds several volumes, the same number at every position; ``volume_index`` picks one
  (images at a position ordered by TemporalPositionIdentifier, AcquisitionNumber, EchoNumbers,
  TriggerTime, InstanceNumber), and without it the error says how many there are.
* Enhanced (multi-frame) objects are read from their per-frame functional groups.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DicomSeriesError, GeometryError, Medsam3dError, VolumeIOError
from ..volume import LPS_TO_RAS, Volume
from .dicom_values import display_window, instance_uid, pixel_array, rescale, vector

log = logging.getLogger(__name__)

NON_IMAGE_MODALITIES = {"RTSTRUCT", "SEG", "PR", "KO", "SR", "RTPLAN", "RTDOSE", "REG", "DOC"}
SPACING_RTOL = 0.01
SPACING_ATOL = 0.01  # mm
TILT_TOL_DEG = 0.1


@dataclass
class DicomSeries:
    """One series found in a folder (headers only)."""

    uid: str
    modality: str
    description: str
    files: list[Path] = field(default_factory=list)
    frames: int = 0
    rows: int | None = None
    columns: int | None = None

    @property
    def is_image(self) -> bool:
        return self.modality not in NON_IMAGE_MODALITIES and self.rows is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "series_uid": self.uid,
            "modality": self.modality,
            "description": self.description,
            "files": len(self.files),
            "frames": self.frames,
            "rows": self.rows,
            "columns": self.columns,
        }

    def summary(self) -> str:
        size = f"{self.columns}x{self.rows}x{self.frames}" if self.is_image else f"{len(self.files)} file(s)"
        return f"{self.uid} [{self.modality}] '{self.description}' {size}"


def _dcmread(path: Path, header_only: bool = True):
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=header_only)
    except (pydicom.errors.InvalidDicomError, EOFError, OSError, ValueError, TypeError, AttributeError):
        return None


def list_dicom_series(folder: str | Path) -> list[DicomSeries]:
    """List the series of every DICOM file below ``folder`` (non-DICOM files are skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeIOError(f"expected a DICOM folder, found {'a file' if folder.exists() else 'nothing'} at {folder}")
    series: dict[str, DicomSeries] = {}
    skipped = 0
    malformed: list[str] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.upper() == "DICOMDIR":
            continue
        ds = _dcmread(path)
        uid = getattr(ds, "SeriesInstanceUID", None) if ds is not None else None
        if uid is None:
            skipped += 1
            continue
        try:  # pydicom converts values on access: a malformed one (IS '1A') raises here
            size = (int(ds.Rows), int(ds.Columns), int(getattr(ds, "NumberOfFrames", 1) or 1)) if "Rows" in ds else None
        except (ValueError, TypeError) as exc:
            malformed.append(f"{path} ({exc})")
            continue
        entry = series.get(str(uid))
        if entry is None:
            entry = series[str(uid)] = DicomSeries(
                uid=str(uid),
                modality=str(getattr(ds, "Modality", "")),
                description=str(getattr(ds, "SeriesDescription", "")),
            )
        entry.files.append(path)
        if size is not None:
            entry.rows, entry.columns = size[:2]
            entry.frames += size[2]
    if skipped:
        log.info("%d non-DICOM file(s) skipped in %s", skipped, folder)
    if malformed:  # a missing slice is then caught by the spacing check of the stack
        log.warning("%d DICOM file(s) with malformed image size values skipped in %s, first: %s",
                    len(malformed), folder, malformed[0])
    return list(series.values())


def load_dicom(folder: str | Path, series_uid: str | None = None, *, allow_tilt: bool = False,
               volume_index: int | None = None) -> Volume:
    """Load one image series of a DICOM folder as a :class:`Volume`.

    With several image series, ``series_uid`` must name one (the error lists them). A series
    holding several volumes (several images at each slice position) needs ``volume_index``.
    """
    folder = Path(folder)
    all_series = list_dicom_series(folder)
    images = [s for s in all_series if s.is_image]
    if series_uid is not None:
        chosen = [s for s in all_series if s.uid == series_uid]
        if not chosen:
            listing = "; ".join(s.summary() for s in images) or "none"
            raise DicomSeriesError(
                f"expected series {series_uid} in {folder}, found only: {listing}; pass one of these UIDs"
            )
        if not chosen[0].is_image:
            raise DicomSeriesError(
                f"expected an image series, found a {chosen[0].modality} series {series_uid}; choose an image series"
            )
        series = chosen[0]
    elif not images:
        raise DicomSeriesError(
            f"expected at least one DICOM image series in {folder}, found "
            f"{len(all_series)} series and no images ({', '.join(s.modality for s in all_series) or 'no DICOM files'}); "
            "point to the folder that holds the image slices"
        )
    elif len(images) > 1:
        listing = "; ".join(s.summary() for s in images)
        raise DicomSeriesError(
            f"expected one image series in {folder}, found {len(images)}: {listing}; "
            "choose one with --series UID (series_uid=...)"
        )
    else:
        series = images[0]

    datasets = [_dcmread(p, header_only=False) for p in series.files]
    datasets = [d for d in datasets if d is not None and "PixelData" in d]
    if not datasets:
        raise DicomSeriesError(f"expected pixel data in series {series.uid}, found none; the files may be truncated")
    try:
        if len(datasets) == 1 and int(getattr(datasets[0], "NumberOfFrames", 1) or 1) > 1:
            if volume_index is not None:
                raise DicomSeriesError(f"expected --volume (volume_index) only with a series of single-frame files "
                                       f"holding several volumes, found an enhanced multi-frame object in {folder}; "
                                       "drop --volume")
            from .dicom_multiframe import load_multiframe

            volume = load_multiframe(datasets[0], allow_tilt=allow_tilt)
        else:
            datasets = _one_volume(datasets, volume_index, f"series {series.uid}")
            volume = _load_single_frames(datasets, allow_tilt=allow_tilt)
    except Medsam3dError:
        raise
    except (ValueError, TypeError) as exc:  # a header value pydicom cannot convert (DS 'abc', IS '1A')
        raise DicomSeriesError(
            f"expected well-formed header values in series {series.uid} of {folder}, found one that cannot be read "
            f"({type(exc).__name__}: {str(exc)[:120]}); fix or remove the offending file"
        ) from None
    first = datasets[0]
    if volume_index is not None:
        volume.meta["volume_index"] = int(volume_index)
    volume.meta.update(
        source=str(folder),
        format="dicom",
        series_uid=series.uid,
        modality=str(getattr(first, "Modality", "")) or None,
        series_description=series.description,
        patient_position=str(getattr(first, "PatientPosition", "")) or None,
        study_uid=str(getattr(first, "StudyInstanceUID", "")) or None,
        frame_of_reference_uid=str(getattr(first, "FrameOfReferenceUID", "")) or None,
    )
    log.info("loaded DICOM series %s: %r", series.uid, volume)
    return volume


# ---------------------------------------------------------------------- single-frame stacks
def _volume_key(ds) -> tuple[float, ...]:
    """Order of the images at one slice position: time point, acquisition, echo, trigger, instance."""
    def number(name: str) -> float:
        value = getattr(ds, name, None)
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0] if len(value) else None
        try:
            return float(value) if value not in (None, "") else 0.0
        except (TypeError, ValueError):
            return 0.0

    return tuple(number(n) for n in ("TemporalPositionIdentifier", "AcquisitionNumber", "EchoNumbers",
                                     "TriggerTime", "InstanceNumber"))


def _one_volume(datasets: list, volume_index: int | None, where: str) -> list:
    """The slices of one volume of a series that holds several (the same number of images at each
    slice position), or every slice of a series that holds one; otherwise one line."""
    try:
        iop = vector(datasets[0], "ImageOrientationPatient", 6)
        positions = np.stack([vector(ds, "ImagePositionPatient", 3) for ds in datasets])
    except Medsam3dError:
        if volume_index is not None:
            raise
        return datasets  # the geometry checks say what is missing
    depth = positions @ np.cross(iop[:3], iop[3:])
    order = np.argsort(depth, kind="stable")
    groups: list[list[int]] = []
    for index in order:
        if groups and abs(depth[index] - depth[groups[-1][0]]) < 1e-4:
            groups[-1].append(int(index))
        else:
            groups.append([int(index)])
    sizes = sorted({len(g) for g in groups})
    if sizes == [1]:
        if volume_index is not None:
            raise DicomSeriesError(f"expected --volume (volume_index) only with a series holding several volumes, "
                                   f"found one volume in {where}; drop --volume")
        return datasets
    if len(sizes) > 1:
        raise GeometryError(
            f"expected the same number of images at every slice position in {where}, found {sizes[0]} at some and "
            f"{sizes[-1]} at others; the series holds several volumes and is incomplete: export it again"
        )
    n = sizes[0]
    if volume_index is None:
        raise DicomSeriesError(
            f"expected one image per slice position in {where}, found {n} volumes ({n} images at each of "
            f"{len(groups)} positions: echoes, phases or repeats); choose one with --volume N, N in 0..{n - 1} "
            "(volume_index=N in Python), or split the series"
        )
    if not 0 <= int(volume_index) < n:
        raise DicomSeriesError(f"expected --volume within 0..{n - 1} for the {n} volumes of {where}, found "
                               f"{volume_index}")
    return [sorted((datasets[i] for i in group), key=_volume_key)[int(volume_index)] for group in groups]


def _stack_geometry(
    positions: np.ndarray, row_cos: np.ndarray, col_cos: np.ndarray, pixel_spacing: np.ndarray,
    *, thickness: float | None, allow_tilt: bool, where: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Sort positions along the normal, check the stack, return (order, affine RAS)."""
    normal = np.cross(row_cos, col_cos)
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    positions = positions[order]
    depth = depth[order]
    n = len(positions)
    if n > 1:
        gaps = np.diff(depth)
        if np.any(np.abs(gaps) < 1e-4):
            dup = int(np.sum(np.abs(gaps) < 1e-4))
            raise GeometryError(
                f"expected one image per slice position in {where}, found {dup} duplicate position(s); "
                "the series holds several volumes (echoes, phases or repeats): split it first"
            )
        step = (positions[-1] - positions[0]) / (n - 1)
        distances = np.linalg.norm(np.diff(positions, axis=0), axis=1)
        median = float(np.median(distances))
        bad = np.abs(distances - median) > max(SPACING_ATOL, SPACING_RTOL * median)
        if np.any(bad):
            where_bad = ", ".join(f"between slices {i} and {i + 1}: {distances[i]:.3f} mm" for i in np.flatnonzero(bad)[:3])
            raise GeometryError(
                f"expected evenly spaced slices in {where} (median {median:.3f} mm), found {where_bad}; "
                "slices are missing or spacing is non-uniform: export the complete series or resample it"
            )
        cos_angle = abs(float(step @ normal)) / float(np.linalg.norm(step))
        tilt = float(np.degrees(np.arccos(min(1.0, cos_angle))))
        if tilt > TILT_TOL_DEG and not allow_tilt:
            raise GeometryError(
                f"expected slices stacked along their normal in {where}, found a gantry tilt of {tilt:.2f} degrees; "
                "load with allow_tilt=True (--allow-tilt) to keep the exact sheared grid, or resample the series"
            )
        if tilt > TILT_TOL_DEG:
            log.warning("gantry tilt of %.2f degrees: using the exact sheared grid", tilt)
    else:
        step = normal * (thickness or 1.0)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * pixel_spacing[1]  # i = column index, moves along the row direction
    affine_lps[:3, 1] = col_cos * pixel_spacing[0]  # j = row index, moves along the column direction
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    return order, LPS_TO_RAS @ affine_lps


def _load_single_frames(datasets: list, *, allow_tilt: bool) -> Volume:
    first = datasets[0]
    where = f"series {getattr(first, 'SeriesInstanceUID', '?')}"
    iop = vector(first, "ImageOrientationPatient", 6)
    for ds in datasets[1:]:
        other = vector(ds, "ImageOrientationPatient", 6)
        if not np.allclose(other, iop, atol=1e-4):
            raise GeometryError(
                f"expected one slice orientation in {where}, found {iop.round(4).tolist()} and "
                f"{other.round(4).tolist()}; the folder mixes planes (e.g. a localizer): choose the axial series"
            )
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise GeometryError(
                f"expected every slice of {where} to be {first.Columns}x{first.Rows}, found {ds.Columns}x{ds.Rows}"
            )
    row_cos, col_cos = iop[:3], iop[3:]
    positions = np.stack([vector(ds, "ImagePositionPatient", 3) for ds in datasets])
    spacing = vector(first, "PixelSpacing", 2)
    thickness = float(getattr(first, "SpacingBetweenSlices", 0) or getattr(first, "SliceThickness", 0) or 1.0)
    order, affine = _stack_geometry(
        positions, row_cos, col_cos, spacing, thickness=thickness, allow_tilt=allow_tilt, where=where
    )
    datasets = [datasets[i] for i in order]
    pixels = np.stack([pixel_array(ds) for ds in datasets], axis=-1)  # (rows, cols, k)
    if pixels.ndim != 3:
        raise VolumeIOError(f"expected grey-level slices in {where}, found pixel arrays of shape {pixels.shape[:-1]}")
    slopes = [float(getattr(ds, "RescaleSlope", 1) or 1) for ds in datasets]
    intercepts = [float(getattr(ds, "RescaleIntercept", 0) or 0) for ds in datasets]
    array = rescale(pixels, slopes, intercepts).transpose(1, 0, 2)  # (i=col, j=row, k)
    meta = {
        "dicom_files": [str(ds.filename) for ds in datasets],
        "sop_instance_uids": [instance_uid(ds) for ds in datasets],
        "rescale": {"slope": slopes[0], "intercept": intercepts[0], "per_slice": len(set(slopes)) > 1 or len(set(intercepts)) > 1},
        "window": display_window(first),
        "slice_thickness": float(getattr(first, "SliceThickness", 0) or 0) or None,
    }
    return Volume(np.ascontiguousarray(array), affine, meta)
