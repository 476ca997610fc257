"""DICOM SEG output (and input) with highdicom, referencing the source series."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import numpy as np

from ..errors import GeometryError, VolumeIOError, require
from ..volume import Volume
from ._atomic import atomic_path
from .labels import segment_table

log = logging.getLogger(__name__)

#: the patient and study attributes of type 2 (present, possibly empty) that a SEG copies from its source
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


#: words of object names that mean a neoplasm, beside the terms of DICOM CID 7159 (Lesion Segmentation Types)
_NEOPLASM_WORDS = {"tumor": "Neoplasm", "tumour": "Neoplasm", "cancer": "Neoplasm", "carcinoma": "Neoplasm",
                   "sarcoma": "Neoplasm", "gtv": "Neoplasm", "metastasis": "NeoplasmSecondary",
                   "metastases": "NeoplasmSecondary", "tumors": "Neoplasm", "tumours": "Neoplasm",
                   "lesions": "Lesion", "nodules": "Nodule", "cysts": "Cyst", "masses": "Mass"}


_LATERALITY = {"left", "right", "bilateral", "l", "r"}


def segment_codes(name: str):
    """DICOM codes of a segment from its object's name: (property category, property type, anatomic
    region or None), all SNOMED CT from DICOM's segmentation context groups (pydicom's code dictionary).

    * a lesion term (CID 7159: neoplasm, mass, lesion, nodule, cyst, ...; "tumor", "tumour",
      "cancer", "sarcoma", "GTV" and "metastasis" mean a neoplasm) -> Morphologically Abnormal
      Structure; words before it that name an anatomical structure become the anatomic region
      ("liver tumor": Neoplasm in the Liver);
    * an anatomical structure of CID 7151 ("spleen", "left kidney", "lymph node") -> Anatomical
      Structure (a device of CID 7157 -> Physical Object); numbers and laterality words are
      left out of the codes (they stay in the label);
    * anything else (e.g. "object") -> Neoplasm, what this tool is for; the name stays the segment label.
    """
    from pydicom.sr.codedict import codes

    # numbers ("mass 2") and laterality ("left kidney": DICOM codes it as a modifier) are left to the label
    words = [w for w in re.findall(r"[A-Za-z0-9]+", name) if not w.isdigit() and w.lower() not in _LATERALITY]

    def concept(collection, ws):
        if len(ws) == 1 and ws[0].lower() in _NEOPLASM_WORDS and collection is codes.cid7159:
            return getattr(codes.cid7159, _NEOPLASM_WORDS[ws[0].lower()])
        keyword = "".join(w[:1].upper() + w[1:].lower() for w in ws)
        return getattr(collection, keyword, None) if keyword else None

    abnormal, anatomical = codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.AnatomicalStructure
    for start in range(len(words)):  # the longest lesion term at the end of the name
        lesion = concept(codes.cid7159, words[start:])
        if lesion is not None:
            region = concept(codes.cid7151, words[:start]) if start else None
            if region is not None and concept(codes.cid7159, words[:start]) is not None:
                region = None  # "necrosis lesion": not an anatomic region
            return abnormal, lesion, region
    whole = concept(codes.cid7151, words)
    if whole is not None:
        category = codes.SCT.PhysicalObject if concept(codes.cid7157, words) is not None else anatomical
        return category, whole, None
    return abnormal, codes.SCT.Neoplasm, None


def check_seg_source(reference: Volume | None, *, output: str = "DICOM SEG",
                     instead: str = "write .seg.nrrd or .nii.gz instead") -> list:
    """The source series' files of a DICOM output (SEG, and the SR and RTSTRUCT that share this check),
    or one line saying why ``reference`` cannot be one; ``output`` names the output and ``instead`` the
    remedy in that line."""
    if reference is None:
        raise VolumeIOError(f"expected the source DICOM series as reference for {output} output, found none")
    files = reference.meta.get("dicom_files")
    if not files or reference.meta.get("format") != "dicom":
        raise VolumeIOError(
            f"expected a DICOM source series for {output} output, found a "
            f"{reference.meta.get('format', 'non-DICOM')} image; {instead}"
        )
    if len(files) == 1 and reference.meta.get("frame_order"):
        raise VolumeIOError(f"{output} output for enhanced multi-frame sources is not supported yet; {instead}")
    meta = reference.meta
    missing = [key for key, name in (("StudyInstanceUID", "study_uid"), ("SeriesInstanceUID", "series_uid"),
                                     ("FrameOfReferenceUID", "frame_of_reference_uid")) if not meta.get(name)]
    if "" in meta.get("sop_instance_uids", ()):
        missing.append("SOPInstanceUID")
    if missing:
        raise VolumeIOError(f"expected the source series' {', '.join(missing)} for {output} output (it "
                            "references them), found them empty or absent (an anonymised series?); " + instead)
    return files


#: the longest value of the string VRs a derived object copies from its source (PS3.5 Table 6.2-1)
_MAX_LENGTH = {"SH": 16, "LO": 64, "PN": 64, "ST": 1024, "LT": 10240}


def fit_value_lengths(dataset) -> None:
    """Cut the top-level string values longer than their VR allows (a Study ID of 17 characters, an
    SH of 16 at most, copied from a source that breaks the rule), so that the derived object is valid
    DICOM; each cut is logged."""
    for element in dataset:
        if element.VR in _MAX_LENGTH and not element.is_empty:
            cut = fitted_value(element.keyword, element.value, element.VR)
            if cut is not element.value:
                element.value = cut


def fitted_value(keyword: str, value, vr: str | None = None):
    """``value`` of attribute ``keyword`` cut to its VR's longest (see :func:`fit_value_lengths`); the
    value itself when it fits or is not a string."""
    from pydicom.datadict import dictionary_VR
    from pydicom.multival import MultiValue

    limit = _MAX_LENGTH.get(vr or dictionary_VR(keyword))
    several = isinstance(value, (list, tuple, MultiValue))
    values = list(value) if several else [value]
    if limit is None or all(v is None or len(str(v)) <= limit for v in values):
        return value
    cut = [v if v is None or len(str(v)) <= limit else str(v)[:limit] for v in values]
    log.info("%s: %r is longer than its VR allows (%d characters); cut to %r", keyword, str(value), limit,
             cut if len(cut) > 1 else cut[0])
    return cut if several else cut[0]


def _source_datasets(reference: Volume, **check):
    """The source series' headers (no pixels), repaired where a derived object copies from them;
    ``check``: :func:`check_seg_source`'s ``output`` and ``instead``."""
    import pydicom

    from .dicom_values import instance_uid

    sources = []
    for f in check_seg_source(reference, **check):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for key in ("SOPClassUID", "SOPInstanceUID"):  # some anonymisers keep them in the file meta only
            if not getattr(ds, key, ""):
                setattr(ds, key, instance_uid(ds, key))
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet  # empty means the default repertoire; highdicom refuses ''
        for key in _TYPE2_COPIED:  # type 2: must be present, may be empty; anonymisers drop some
            if key not in ds:
                setattr(ds, key, "")
        sources.append(ds)
    return sources


def write_dicom_seg(labels: Volume, path: str | Path, reference: Volume, *, algorithm: str = "medsam3d") -> None:
    """Write ``labels`` (on ``reference``'s grid) as a BINARY DICOM SEG referencing its series."""
    hd = require("highdicom", "DICOM SEG output")
    from pydicom.sr.codedict import codes

    from .. import __version__

    sources = _source_datasets(reference)
    reference.check_same_grid(labels)
    table = segment_table(labels)
    if not table:
        raise VolumeIOError("expected at least one labelled voxel for DICOM SEG output, found an empty label map")
    # DICOM SEG numbers segments 1..n: remap the label values in order
    remap = np.zeros(int(labels.array.max()) + 1, dtype=np.uint16)
    descriptions = []
    algo = hd.AlgorithmIdentificationSequence(
        name=algorithm, version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    for number, (value, info) in enumerate(table.items(), start=1):
        remap[value] = number
        lab = hd.color.CIELabColor.from_rgb(*(int(round(255 * float(c))) for c in info["color"]))
        category, kind, region = segment_codes(str(info["name"]))
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(info["name"])[:64],
            segmented_property_category=category,
            segmented_property_type=kind,
            anatomic_regions=[region] if region is not None else None,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_id=f"label {value}",
            tracking_uid=hd.UID(),
            display_color=lab,
        ))
    pixels = remap[np.asarray(labels.array, dtype=np.int64)].transpose(2, 1, 0)  # (k, rows, cols)
    try:
        # highdicom and pydicom warn about the source's own values (a one-part PatientName, an over-long
        # SH copied over); the user cannot act on them here: logged (-v), not printed as tracebacks
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            seg = _segmentation(hd, sources, pixels, descriptions, __version__)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise VolumeIOError(f"expected a source series highdicom can reference in a DICOM SEG, found one it refuses "
                            f"({type(exc).__name__}: {exc}); write .seg.nrrd or .nii.gz instead") from None
    for warning in caught:
        log.info("DICOM SEG: %s", str(warning.message).split(". ")[0])
    fit_value_lengths(seg)
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp))
    log.info("wrote DICOM SEG %s (%d segments)", path, len(descriptions))


def _segmentation(hd, sources, pixels, descriptions, version):
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medsam3d",
        manufacturer_model_name="medsam3d",
        software_versions=version,
        device_serial_number="0",
        omit_empty_frames=True,
    )


def read_dicom_seg(path: str | Path, reference: Volume) -> Volume:
    """Read a DICOM SEG onto ``reference``'s grid (a DICOM series it references)."""
    hd = require("highdicom", "DICOM SEG input")
    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:
        raise VolumeIOError(f"expected a DICOM SEG at {path}, found a file highdicom cannot read "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
    uids = reference.meta.get("sop_instance_uids")
    if not uids or len(uids) != reference.shape[2]:
        raise GeometryError("expected the DICOM series the SEG references as reference image, found another image")
    try:
        return _seg_labels(hd, seg, path, reference, uids)
    except (AttributeError, KeyError, IndexError, ValueError, TypeError, RuntimeError) as exc:
        if isinstance(exc, GeometryError):
            raise
        raise VolumeIOError(f"expected a DICOM SEG of the image series given (--image), found one whose frames or "
                            f"segments do not match it ({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); "
                            "give the series the SEG was made on") from None


def _seg_labels(hd, seg, path, reference: Volume, uids) -> Volume:
    referenced = {str(source.ReferencedSOPInstanceUID)
                  for frame in getattr(seg, "PerFrameFunctionalGroupsSequence", [])
                  for derivation in getattr(frame, "DerivationImageSequence", [])
                  for source in getattr(derivation, "SourceImageSequence", [])
                  if "ReferencedSOPInstanceUID" in source}
    foreign = referenced - set(uids)
    if foreign:
        raise GeometryError(f"expected a DICOM SEG drawn on the image series given (--image), found frames that "
                            f"reference {len(foreign)} image(s) not in it (of {len(referenced)}); give the series "
                            "the SEG was made on")
    numbers = list(seg.segment_numbers)
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=numbers, combine_segments=True, relabel=False,
        assert_missing_frames_are_empty=True,
    )  # (k, rows, cols)
    segments = {}
    values = np.zeros(max(numbers) + 1, dtype=np.int64)
    for number in numbers:
        desc = seg.get_segment_description(number)
        value = number
        tracking = getattr(desc, "tracking_id", None) or ""
        if str(tracking).startswith("label "):
            value = int(str(tracking).split()[1])
        values[number] = value
        segments[value] = {"name": desc.segment_label, "color": _display_rgb(hd, desc)}
    array = values[np.asarray(frames, dtype=np.int64)].transpose(2, 1, 0)
    from .labels import label_dtype

    return Volume(array.astype(label_dtype(array)), reference.affine,
                  {"source": str(path), "format": "dicom-seg", "segments": segments})


def _display_rgb(hd, desc) -> tuple[float, float, float]:
    """A segment's recommended display colour as sRGB 0..1 (grey when the SEG gives none)."""
    value = getattr(desc, "RecommendedDisplayCIELabValue", None)
    if not value:
        return (0.5, 0.5, 0.5)
    rgb = hd.color.CIELabColor.from_dicom_value(tuple(int(v) for v in value)).to_rgb()
    return tuple(round(c / 255.0, 3) for c in rgb)
