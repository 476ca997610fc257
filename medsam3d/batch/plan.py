"""Plan a manifest from a PACS export: one row per image series that could hold a lesion.

The export is walked at any depth; files without extension, several series in one folder
and RTSTRUCT / DICOM SEG files beside the images are fine, and files that are not DICOM are
skipped quietly. Only headers are read (``pydicom.dcmread(stop_before_pixels=True,
force=False)``: a file without the DICOM preamble is not taken for DICOM).

**Which series become rows.** An image series of modality CT, MR or PT (:data:`PLAN_MODALITIES`)
with at least :data:`MIN_SLICES` slices (frames of a multi-frame object count) whose images
share one slice orientation. Left out: segmentations, structure sets, reports and other
non-image objects; secondary captures (screenshots); localizers (``ImageType`` LOCALIZER or
SCOUT, or images in several orientations, as a survey's three planes); series of fewer slices;
other modalities (radiographs, ultrasound cine loops). Each left-out series is logged with
its reason (``-v``).

**Which segmentation prompts a row** (the ``prompts`` cell, else empty):

1. an RTSTRUCT or DICOM SEG whose references name the series (RTSTRUCT:
   ``ReferencedFrameOfReferenceSequence > RTReferencedStudySequence >
   RTReferencedSeriesSequence``; SEG: ``ReferencedSeriesSequence``), or whose referenced
   instances (contour images, source images) belong to it;
2. failing that, for an RTSTRUCT only (its contours are in patient coordinates; a SEG's
   frames are tied to its source images), the same ``FrameOfReferenceUID`` when exactly one
   planned series of the same patient has it (two or more: ambiguous, left empty and logged).

When several match, the newest (structure set or content date and time) is taken, and the
others are logged.

Rows are sorted by patient, date and series number. ``case_id`` is built from the patient id,
the study date, the modality and the series number, made safe as a folder name and unique.
``timepoint`` is the study date (``YYYY-MM-DD``); a study without any date gets an empty
cell to fill in. A patient without PatientID gets ``anonymous-<hash of the study>``: one
patient per study, to be corrected by hand to group time points.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DicomSeriesError, VolumeIOError

log = logging.getLogger(__name__)

PLAN_MODALITIES = ("CT", "MR", "PT")
MIN_SLICES = 3
PLAN_COLUMNS = ("case_id", "patient_id", "timepoint", "modality", "image", "series_uid", "prompts", "description",
                "study_uid")
SEGMENTATION_MODALITIES = ("RTSTRUCT", "SEG")
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants .7.1 ... .7.4
_LOCALIZER_TYPES = {"LOCALIZER", "SCOUT"}


@dataclass
class _Series:
    """What the headers of one image series say (collected file by file)."""

    key: str
    uid: str
    modality: str
    patient_id: str
    study_uid: str
    date: str
    number: int | None
    description: str
    frame_of_reference: str
    sop_class: str
    files: list[Path] = field(default_factory=list)
    frames: int = 0
    has_pixels: bool = False
    image_types: set[str] = field(default_factory=set)
    orientations: set[tuple[float, ...]] = field(default_factory=set)
    sop_uids: set[str] = field(default_factory=set)


@dataclass
class _Segmentation:
    """One RTSTRUCT or DICOM SEG file and what it references."""

    path: Path
    modality: str
    patient_id: str
    series: set[str]
    instances: set[str]
    frames_of_reference: set[str]
    stamp: str


def _text(ds: Any, key: str) -> str:
    value = getattr(ds, key, "")
    return str(value).strip() if value is not None else ""


def _date(ds: Any) -> str:
    """The study's date as YYYY-MM-DD (StudyDate, else the series', acquisition's or content's), or ''."""
    for key in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        value = _text(ds, key)
        if re.fullmatch(r"\d{8}", value):
            return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return ""


def _number(ds: Any) -> int | None:
    try:
        return int(str(getattr(ds, "SeriesNumber", "")).strip())
    except (TypeError, ValueError):
        return None


def _items(ds: Any, *path: str) -> list[Any]:
    """The items at the end of a chain of sequences (every branch)."""
    level = [ds]
    for key in path:
        level = [item for node in level for item in (getattr(node, key, None) or [])]
    return level


def _segmentation(path: Path, ds: Any, modality: str) -> _Segmentation:
    if modality == "RTSTRUCT":
        series = {_text(s, "SeriesInstanceUID") for s in _items(ds, "ReferencedFrameOfReferenceSequence",
                                                                "RTReferencedStudySequence",
                                                                "RTReferencedSeriesSequence")}
        instances = {_text(i, "ReferencedSOPInstanceUID") for i in _items(
            ds, "ReferencedFrameOfReferenceSequence", "RTReferencedStudySequence", "RTReferencedSeriesSequence",
            "ContourImageSequence")}
        frames = ({_text(f, "FrameOfReferenceUID") for f in _items(ds, "ReferencedFrameOfReferenceSequence")}
                  | {_text(r, "ReferencedFrameOfReferenceUID") for r in _items(ds, "StructureSetROISequence")})
        stamp = _text(ds, "StructureSetDate") + _text(ds, "StructureSetTime")
    else:
        series = {_text(s, "SeriesInstanceUID") for s in _items(ds, "ReferencedSeriesSequence")}
        instances = ({_text(i, "ReferencedSOPInstanceUID") for i in _items(ds, "ReferencedSeriesSequence",
                                                                            "ReferencedInstanceSequence")}
                     | {_text(i, "ReferencedSOPInstanceUID") for i in _items(
                         ds, "PerFrameFunctionalGroupsSequence", "DerivationImageSequence", "SourceImageSequence")})
        frames = {_text(ds, "FrameOfReferenceUID")}
        stamp = _text(ds, "ContentDate") + _text(ds, "ContentTime")
    stamp = stamp or _text(ds, "SeriesDate") + _text(ds, "SeriesTime")
    return _Segmentation(path, modality, _text(ds, "PatientID"), series - {""}, instances - {""}, frames - {""},
                         stamp)


def scan_export(root: Path) -> tuple[list[_Series], list[_Segmentation], int]:
    """The image series and segmentation files below ``root`` (headers only) and the number of
    files that are not DICOM."""
    import pydicom

    series: dict[str, _Series] = {}
    segmentations: list[_Segmentation] = []
    skipped = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name.upper() == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=False)
        except Exception:  # not DICOM, or a header pydicom cannot read: skipped quietly
            skipped += 1
            continue
        modality = _text(ds, "Modality").upper()
        if modality in SEGMENTATION_MODALITIES:
            try:
                segmentations.append(_segmentation(path, ds, modality))
            except (AttributeError, TypeError, ValueError) as exc:  # a malformed reference sequence
                log.info("%s %s skipped: unreadable references (%s)", modality, path, exc)
            continue
        uid = _text(ds, "SeriesInstanceUID")
        study_uid = _text(ds, "StudyInstanceUID")
        frame_of_reference = _text(ds, "FrameOfReferenceUID")
        key = uid or f"no-uid|{path.parent}|{study_uid}|{frame_of_reference}|{modality}"
        entry = series.get(key)
        if entry is None:
            entry = series[key] = _Series(
                key=key, uid=uid, modality=modality, patient_id=_text(ds, "PatientID"), study_uid=study_uid,
                date=_date(ds), number=_number(ds), description=_text(ds, "SeriesDescription"),
                frame_of_reference=frame_of_reference, sop_class=_text(ds, "SOPClassUID"))
        entry.files.append(path)
        try:
            if "Rows" in ds:
                entry.has_pixels = True
                entry.frames += int(getattr(ds, "NumberOfFrames", 1) or 1)
            entry.image_types.update(str(v).strip().upper() for v in (getattr(ds, "ImageType", None) or []))
            iop = getattr(ds, "ImageOrientationPatient", None)
            if iop is not None and len(iop) == 6:
                entry.orientations.add(tuple(round(float(v), 3) for v in iop))
        except (TypeError, ValueError):  # a malformed value: the study fails when loaded, with the reason
            pass
        entry.sop_uids.add(_text(ds, "SOPInstanceUID"))
    return list(series.values()), segmentations, skipped


def _why_not(series: _Series) -> str | None:
    """Why a series is not planned (None: it is); see the module docstring."""
    if series.modality not in PLAN_MODALITIES:
        return f"modality {series.modality or 'none'} (planned: {', '.join(PLAN_MODALITIES)})"
    if not series.has_pixels:
        return "no image"
    if series.sop_class.startswith(_SECONDARY_CAPTURE):
        return "a secondary capture"
    if series.image_types & _LOCALIZER_TYPES:
        return "a localizer (ImageType)"
    if len(series.orientations) > 1:
        return "images in several orientations (a localizer)"
    if series.frames < MIN_SLICES:
        return f"{series.frames} slice(s), fewer than {MIN_SLICES}"
    return None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("._-")


def _case_ids(planned: list[_Series], patients: dict[str, str]) -> dict[str, str]:
    from .cells import check_case_id

    ids: dict[str, str] = {}
    used: set[str] = set()
    for s in planned:
        parts = [_safe(patients[s.key])[:40] or "patient", s.date.replace("-", "") or "nodate", s.modality,
                 f"s{s.number}" if s.number is not None else ""]
        base = "_".join(p for p in parts if p)
        if check_case_id(base):
            base = "case-" + base
        case_id, n = base, 1
        while case_id.casefold() in used:
            n += 1
            case_id = f"{base}-{n}"
        used.add(case_id.casefold())
        ids[s.key] = case_id
    return ids


def _relative(path: Path, base: Path) -> str:
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # another drive (Windows): absolute
        return path.as_posix()


def _prompt_files(planned: list[_Series], segmentations: list[_Segmentation], patients: dict[str, str]
                  ) -> dict[str, Path]:
    """Series key -> the RTSTRUCT or SEG that prompts it (see the module docstring)."""
    matches: dict[str, list[_Segmentation]] = {}
    for seg in segmentations:
        hits = [s for s in planned if s.uid and s.uid in seg.series] or \
               [s for s in planned if seg.instances & s.sop_uids]
        how = "references"
        if not hits and seg.modality == "RTSTRUCT":
            same_frame = [s for s in planned if s.frame_of_reference and s.frame_of_reference in seg.frames_of_reference
                          and (not seg.patient_id or s.patient_id == seg.patient_id)]
            how = "frame of reference"
            if len(same_frame) > 1:
                log.info("%s %s: no referenced series found, and %d series share its frame of reference (%s): left "
                         "out; put it in the prompts column of the right row", seg.modality, seg.path,
                         len(same_frame), ", ".join(patients[s.key] + " " + s.description for s in same_frame))
            hits = same_frame if len(same_frame) == 1 else []
        if not hits:
            log.info("%s %s references no planned series: left out", seg.modality, seg.path)
            continue
        for s in hits:
            log.debug("%s %s prompts series %s (by %s)", seg.modality, seg.path, s.uid, how)
            matches.setdefault(s.key, []).append(seg)
    chosen: dict[str, Path] = {}
    for key, segs in matches.items():
        segs = sorted(segs, key=lambda g: (g.stamp, str(g.path)), reverse=True)
        if len(segs) > 1:
            log.info("series %s has %d segmentations; taking the newest, %s (others: %s)", key, len(segs),
                     segs[0].path, ", ".join(str(g.path) for g in segs[1:]))
        chosen[key] = segs[0].path
    return chosen


def plan_manifest(root: str | os.PathLike, *, output: Path, relative_to: Path | None = None,
                  overwrite: bool = False) -> list[dict[str, str]]:
    """Write a manifest CSV (UTF-8 with a byte-order mark, so that spreadsheets read accents) for
    the DICOM export below ``root``; the rows written, as dicts of :data:`PLAN_COLUMNS`.

    Paths in the manifest are relative to ``relative_to`` (default: the manifest's folder, as
    :func:`~medsam3d.batch.manifest.read_manifest` reads them). An existing ``output`` is
    refused unless ``overwrite`` (its prompts column may hold work). Rows without prompts have
    an empty ``prompts`` cell, which the manifest reader refuses until it is filled in.

    Raises :class:`~medsam3d.errors.DicomSeriesError` when ``root`` holds no plannable image
    series, :class:`~medsam3d.errors.VolumeIOError` for an unreadable root or unwritable output.
    """
    from ..io._atomic import atomic_path, check_output_path

    root = Path(root)
    output = Path(output)
    if not root.is_dir():
        raise VolumeIOError(f"expected a folder of DICOM files (a PACS export), found "
                            f"{'a file' if root.exists() else 'nothing'} at {root}; give the export's folder")
    if output.exists() and not overwrite:
        raise VolumeIOError(f"expected a new manifest path, found an existing file at {output} (its prompts may be "
                            "filled in already); give another name, or overwrite it (--force)")
    check_output_path(output)
    base = Path(os.path.abspath(relative_to if relative_to is not None else output.parent))
    all_series, segmentations, not_dicom = scan_export(root)
    planned = []
    for s in all_series:
        why = _why_not(s)
        if why:
            log.info("series %s [%s] '%s' (%d file(s)) left out: %s", s.uid or "(no UID)", s.modality, s.description,
                     len(s.files), why)
        else:
            planned.append(s)
    if not planned:
        found = ", ".join(sorted({f"{s.modality or '?'}: {_why_not(s)}" for s in all_series})[:4]) or "none"
        raise DicomSeriesError(f"expected DICOM image series ({', '.join(PLAN_MODALITIES)}, {MIN_SLICES} slices or "
                               f"more) below {root}, found {len(all_series)} image series ({found}), "
                               f"{len(segmentations)} RTSTRUCT/SEG and {not_dicom} other file(s); point to the "
                               "export's folder")
    patients = {}
    for s in planned:
        if s.patient_id:
            patients[s.key] = s.patient_id
        else:
            anchor = s.study_uid or s.frame_of_reference or Path(os.path.relpath(s.files[0].parent, root)).as_posix()
            digest = hashlib.sha1(anchor.encode()).hexdigest()[:8]  # the same on every run over this export
            patients[s.key] = f"anonymous-{digest}"
            log.warning("series %s has no PatientID: patient '%s' (one per study); edit patient_id to group time "
                        "points", s.uid or s.files[0].parent, patients[s.key])
    planned.sort(key=lambda s: (patients[s.key], s.date or "9999", s.number if s.number is not None else 1 << 62,
                                s.uid, s.key))
    case_ids = _case_ids(planned, patients)
    prompts = _prompt_files(planned, segmentations, patients)
    rows = []
    for s in planned:
        folder = Path(os.path.commonpath([str(Path(os.path.abspath(f)).parent) for f in s.files]))
        prompt = prompts.get(s.key)
        rows.append({"case_id": case_ids[s.key], "patient_id": patients[s.key], "timepoint": s.date,
                     "modality": s.modality, "image": _relative(folder, base), "series_uid": s.uid,
                     "prompts": _relative(Path(os.path.abspath(prompt)), base) if prompt else "",
                     "description": s.description, "study_uid": s.study_uid})
        if not s.uid:
            log.warning("series in %s has no SeriesInstanceUID: its folder must hold no other image series", folder)
        if not s.date:
            log.warning("series %s of patient %s has no date: fill in its timepoint", s.uid, patients[s.key])
    _warn_same_time(rows)
    with atomic_path(output) as tmp:
        with open(tmp, "w", encoding="utf-8-sig", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(PLAN_COLUMNS))
            writer.writeheader()
            writer.writerows(rows)
    log.info("wrote manifest %s: %d series of %d patient(s), %d with prompts", output, len(rows),
             len(set(patients.values())), sum(1 for r in rows if r["prompts"]))
    return rows


def _warn_same_time(rows: list[dict[str, str]]) -> None:
    """Log the patients with several series of one modality at one date: a manifest runs one of them."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for row in rows:
        if row["timepoint"]:
            groups.setdefault((row["patient_id"], row["modality"], row["timepoint"]), []).append(row["case_id"])
    for (patient, modality, date), ids in groups.items():
        if len(ids) > 1:
            log.warning("patient %s has %d %s series on %s (%s): keep the one to segment and delete the other rows",
                        patient, len(ids), modality, date, ", ".join(ids))
