"""The measurements of a segmentation as a DICOM Structured Report (TID 1500 Measurement Report).

A radiology system stores and shows measurements as an SR beside the images: this module
writes one Comprehensive 3D SR (with highdicom) whose Measurement Report holds one
*Volumetric ROI Measurements* group (TID 1411) per object. Each group references the object's
segment in the DICOM SEG medsam3d wrote for the same case (its SOP Instance UID and segment
number), carries the segment's tracking UID and coded finding, and holds:

* **Volume** in mL: SNOMED CT 118565006 "Volume", unit UCUM ``ml``, method DCM 126030 "Sum of
  segmented voxel method for volume" (voxel count x voxel volume, as medsam3d measures it);
* **Long axis** and **Short axis** in mm (SNOMED CT 103339001 and 103340004, DICOM CID 7470
  linear measurements): the RECIST-style axes on the object's largest axial slice, with the
  image they were measured on when the series is axial (TID 1411 allows no coordinates in
  its measurements: the end points stay in the JSON report);
* **Maximum 3D diameter** in mm: IBSI L0JK "Maximum 3D Diameter of a Mesh" (the IBSI coding
  scheme DICOM includes in CID 7470): the largest distance between two vertices of the
  object's surface, IBSI's definition and medsam3d's ``max_diameter_3d_mm``.

Values come from :func:`medsam3d.measure` rows (``component`` 0: the whole object), so the SR
says what the JSON report says. The report is marked complete and unverified (an automatic
measurement a reader has not signed).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GeometryError, VolumeIOError, require
from ..volume import Volume
from ._atomic import atomic_path

log = logging.getLogger(__name__)

_INSTEAD = "drop --sr (the SR references the DICOM SEG written from a DICOM input)"


def check_sr_source(reference: Volume | None) -> None:
    """Refuse, before any work, a reference an SR cannot be written for (one line)."""
    from .dicomseg import check_seg_source

    check_seg_source(reference, output="DICOM SR", instead=_INSTEAD)


def measurement_codes() -> dict[str, Any]:
    """The concept names and units of the SR's measurements, keyed by the field of a
    :func:`medsam3d.measure` row they hold (see the module docstring for the schemes)."""
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    mm = codes.UCUM.Millimeter
    ml = CodedConcept("ml", "UCUM", "milliliter")  # UCUM, as DICOM CID 7181 codes it
    return {
        "volume_ml": (codes.SCT.Volume, ml),  # SCT 118565006
        "long_axis_mm": (codes.SCT.LongAxis, mm),  # SCT 103339001
        "short_axis_mm": (codes.SCT.ShortAxis, mm),  # SCT 103340004
        "max_diameter_3d_mm": (CodedConcept("L0JK", "IBSI", "Maximum 3D Diameter of a Mesh"), mm),
    }


def write_measurement_sr(labels: Volume, path: str | Path, *, seg: str | Path, reference: Volume,
                         measurements: Iterable[dict[str, Any]] | None = None, algorithm: str = "medsam3d",
                         series_number: int = 901) -> Path:
    """Write the measurements of ``labels`` as a TID 1500 Measurement Report referencing ``seg``.

    Parameters
    ----------
    labels : Volume
        The label map measured (on ``reference``'s grid): each measured label is one group.
    path : path
        The ``.dcm`` file to write (atomically: a failure leaves nothing behind).
    seg : path
        The DICOM SEG of ``labels`` that medsam3d wrote from ``reference`` (``save(labels,
        "x.dcm", reference=...)``): each group references its segment, found by the segment's
        tracking ID ``label N`` (or its label, the object's name).
    reference : Volume
        The DICOM series the labels were drawn on (``medsam3d.load`` of its folder).
    measurements : rows of :func:`medsam3d.measure`, optional
        The rows with ``component`` 0 (the whole objects) are written; the lesion rows are left
        out. Measured here (without intensities) when not given.

    Returns the path written. Raises :class:`~medsam3d.errors.VolumeIOError` (one line) for a
    non-DICOM reference, an unreadable SEG, one without a segment for a measured label, or no
    measurement; :class:`~medsam3d.errors.GeometryError` for a SEG of another series or labels
    on another grid.
    """
    hd = require("highdicom", "DICOM SR output")
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from .. import __version__
    from .dicomseg import _source_datasets, fit_value_lengths

    sources = _source_datasets(reference, output="DICOM SR", instead=_INSTEAD)
    reference.check_same_grid(labels)
    seg_ds = _read_seg(hd, seg, reference)
    if measurements is None:
        from ..measure import measure

        measurements = measure(labels, components=False)
    rows = sorted((r for r in measurements if int(r.get("component", 0)) == 0), key=lambda r: int(r["label"]))
    if not rows:
        raise VolumeIOError("expected measurements of at least one object for DICOM SR output, found none "
                            "(an empty label map?)")
    numbers = _segment_numbers(seg_ds, labels)
    algo = hd.sr.AlgorithmIdentification(name=algorithm, version=__version__)
    groups = []
    for row in rows:
        value = int(row["label"])
        if value not in numbers:
            raise VolumeIOError(f"expected a segment for label {value} ({row.get('name', '')}) in the DICOM SEG "
                                f"{seg}, found segments for labels {sorted(numbers)}; give the SEG written from "
                                "these labels")
        groups.append(_group(hd, codes, seg_ds, numbers[value], row, reference, sources, algo))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[algorithm, __version__]), name=algorithm[:64], manufacturer_name="medsam3d",
            model_name=algorithm[:64]),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.ImagingProcedure,  # SCT 363679005, DICOM CID 100
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,  # DCM 126000, CID 7021
    )
    try:
        with warnings.catch_warnings(record=True) as caught:  # the source's own values, as for the SEG
            warnings.simplefilter("always", UserWarning)
            sr = hd.sr.Comprehensive3DSR(
                evidence=[*sources, seg_ds], content=report[0], series_instance_uid=hd.UID(),
                series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medsam3d",
                is_complete=True, is_final=False, is_verified=False,
                series_description="medsam3d measurements",
            )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise VolumeIOError(f"expected a source series and SEG highdicom can reference in a DICOM SR, found one it "
                            f"refuses ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
                            f"{_INSTEAD}") from None
    for warning in caught:
        log.info("DICOM SR: %s", str(warning.message).split(". ")[0])
    sr.SoftwareVersions = __version__
    sr.ManufacturerModelName = "medsam3d"
    fit_value_lengths(sr)
    with atomic_path(path) as tmp:
        sr.save_as(str(tmp))
    log.info("wrote DICOM SR %s (%d measurement groups)", path, len(groups))
    return Path(path)


def _read_seg(hd, seg, reference: Volume):
    """The SEG as highdicom reads it, checked to be drawn on ``reference``'s series."""
    try:
        seg_ds = hd.seg.segread(str(seg))
    except Exception as exc:
        raise VolumeIOError(f"expected the DICOM SEG of these labels at {seg}, found a file highdicom cannot read "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); write the labels as "
                            ".dcm first") from None
    series = {str(s.SeriesInstanceUID) for s in getattr(seg_ds, "ReferencedSeriesSequence", [])}
    if str(reference.meta.get("series_uid")) not in series or \
            str(getattr(seg_ds, "FrameOfReferenceUID", "")) != str(reference.meta.get("frame_of_reference_uid")):
        raise GeometryError(f"expected a DICOM SEG of series {reference.meta.get('series_uid')}, found {seg} "
                            f"referencing {sorted(series) or 'no series'}; give the SEG written from this series")
    return seg_ds


def _segment_numbers(seg_ds, labels: Volume) -> dict[int, int]:
    """Label value -> segment number: medsam3d's SEG writes the tracking ID ``label N``; other SEGs are
    matched by segment label = object name."""
    names = {str(info.get("name")): value for value, info in labels.segments.items()}
    out = {}
    for item in seg_ds.SegmentSequence:
        number = int(item.SegmentNumber)
        tracking = str(getattr(item, "TrackingID", "") or "")
        if tracking.startswith("label ") and tracking[6:].strip().lstrip("-").isdigit():
            out[int(tracking[6:])] = number
        elif str(getattr(item, "SegmentLabel", "")) in names:
            out[names[str(item.SegmentLabel)]] = number
    return out


def _group(hd, codes, seg_ds, number: int, row: dict[str, Any], reference: Volume, sources, algo):
    """One TID 1411 group: the segment, its finding and its measurements."""
    from highdicom.sr import CodedConcept

    item = next(s for s in seg_ds.SegmentSequence if int(s.SegmentNumber) == number)
    name = str(row.get("name") or getattr(item, "SegmentLabel", "") or f"label {row['label']}")
    tracking = hd.sr.TrackingIdentifier(uid=str(getattr(item, "TrackingUID", "") or hd.UID()),
                                        identifier=f"{name} (label {int(row['label'])})"[:64])
    finding = CodedConcept.from_dataset(item.SegmentedPropertyTypeCodeSequence[0])
    category = CodedConcept.from_dataset(item.SegmentedPropertyCategoryCodeSequence[0])
    sites = [hd.sr.FindingSite(CodedConcept.from_dataset(region))
             for region in getattr(item, "AnatomicRegionSequence", [])]
    units = measurement_codes()
    measurements = []
    for key, (concept, unit) in units.items():
        value = row.get(key)
        if value is None or not np.isfinite(float(value)):
            continue
        extra: dict[str, Any] = {}
        if key == "volume_ml":
            extra["method"] = codes.DCM.SumOfSegmentedVoxelMethodForVolume  # DCM 126030, CID 7474
        elif key in ("long_axis_mm", "short_axis_mm"):
            extra.update(_axis_references(hd, row, key, reference, sources))
        measurements.append(hd.sr.Measurement(name=concept, value=float(value), unit=unit, algorithm_id=algo,
                                              **extra))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        # the segment and its source series (highdicom's from_segmentation misses a single segment's
        # identification in the shared functional groups)
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg_ds.SOPClassUID), sop_instance_uid=str(seg_ds.SOPInstanceUID), segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(str(reference.meta["series_uid"]))),
        finding_type=finding, finding_category=category, finding_sites=sites or None,
        algorithm_id=algo, measurements=measurements,
    )


def _axis_references(hd, row: dict[str, Any], key: str, reference: Volume, sources) -> dict[str, Any]:
    """The image an axis was measured on, when the series is axial (its slices are the axial slices)."""
    k = row.get("axial_slice")
    if k is None or reference.axcodes[2] not in ("S", "I") or not 0 <= int(k) < len(sources):
        return {}
    return {"referenced_images": [hd.sr.SourceImageForMeasurement(
        referenced_sop_class_uid=str(sources[int(k)].SOPClassUID),
        referenced_sop_instance_uid=str(reference.meta["sop_instance_uids"][int(k)]))]}
