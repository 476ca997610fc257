"""Label map -> DICOM RT Structure Set (RTSTRUCT) referencing its source series.

Radiotherapy planning systems read contours, not label maps: each object becomes one ROI
(its name and colour from the label map's segments, numbered by its label value), and each
slice it covers becomes closed planar contours in that slice's plane, in LPS patient
millimetres through the volume's exact affine (``LPS = diag(-1, -1, 1) @ RAS``), so oblique
and sheared grids are placed exactly. Every contour references the image it lies on
(ContourImageSequence) and the structure set references the series and its frame of
reference.

The contours are traced with marching squares at level 0.5 between voxel centres: they pass
through the middle of each edge between a labelled and an unlabelled voxel, so a voxel
centre lies inside the contours exactly when the voxel is labelled. Holes are separate
contours inside their outline and islands in a hole are contours again, so the even-odd rule
(:func:`medsam3d.io.load_rtstruct`, and the DICOM convention for nested contours) gives the
label map back voxel for voxel. The area a contour encloses differs from the voxels' by
about half a voxel per contour (the corners it cuts).
"""

from __future__ import annotations

import logging
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np

from ..errors import GeometryError, VolumeIOError
from ..volume import LPS_TO_RAS, Volume
from ._atomic import atomic_path
from .labels import segment_table

log = logging.getLogger(__name__)

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
#: the SOP class that RTReferencedStudySequence names for a study (Study Component Management; the value
#: PS3.3 C.8.8.5 and the planning systems use)
_STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
#: patient and study attributes of type 2 copied from the source (written empty when it lacks them)
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")
_OPTIONAL_COPIED = ("SpecificCharacterSet", "StudyDescription", "PatientAge", "PatientWeight", "PatientSize",
                    "IssuerOfPatientID", "OtherPatientIDs", "PatientComments")


def slice_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """The closed contours of a 2D mask (``mask2d[i, j]``) as (n, 2) arrays of (i, j) voxel indices,
    traced at level 0.5 (see the module docstring); straight runs are kept as their two end points."""
    from skimage.measure import find_contours

    padded = np.pad(np.asarray(mask2d, dtype=np.uint8), 1)  # every contour closes inside the padding
    out = []
    for contour in find_contours(padded, 0.5):
        points = contour[:-1] - 1.0  # find_contours repeats the first point at the end of a closed contour
        prev, nxt = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
        a, b = points - prev, nxt - points
        turn = np.abs(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]) > 1e-9
        points = points[turn]
        if len(points) >= 3:
            out.append(points)
    return out


def check_rtstruct_source(reference: Volume | None) -> None:
    """Refuse, before any work, a reference an RTSTRUCT cannot be written for (one line)."""
    from .dicomseg import check_seg_source

    check_seg_source(reference, output="RTSTRUCT", instead="drop --rtstruct (RTSTRUCT output needs a DICOM input)")


def write_rtstruct(labels: Volume, path: str | Path, *, reference: Volume, label: str = "medsam3d",
                   series_number: int = 902) -> Path:
    """Write ``labels`` (on ``reference``'s grid) as an RTSTRUCT with one ROI per object.

    Parameters
    ----------
    labels : Volume
        The label map; ``labels.segments`` gives each value's name and colour (defaults
        otherwise). Every value present, and every one named in the segments, is an ROI whose
        ROI Number is the label value.
    path : path
        The ``.dcm`` file to write (atomically: a failure leaves nothing behind).
    reference : Volume
        The DICOM series the labels were drawn on (``medsam3d.load`` of its folder): its
        patient, study and frame of reference are copied and every contour references its slice.
    label : str
        The Structure Set Label (16 characters at most).

    Returns the path written. Raises :class:`~medsam3d.errors.VolumeIOError` for a
    non-DICOM reference or an empty label map, and
    :class:`~medsam3d.errors.GeometryError` for a label map on another grid.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.sr.codedict import codes
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ImplicitVRLittleEndian, generate_uid

    from .. import __version__
    from .dicomseg import _source_datasets, fit_value_lengths, fitted_value, segment_codes

    sources = _source_datasets(reference, output="RTSTRUCT",
                               instead="drop --rtstruct (RTSTRUCT output needs a DICOM input)")
    reference.check_same_grid(labels)
    table = segment_table(labels)
    if not table or not np.any(labels.array):
        raise VolumeIOError("expected at least one labelled voxel for RTSTRUCT output, found an empty label map")
    uids = list(reference.meta["sop_instance_uids"])
    if len(uids) != reference.shape[2] or len(sources) != reference.shape[2]:
        raise GeometryError(f"expected one DICOM image per slice of the reference ({reference.shape[2]}), found "
                            f"{len(sources)}; load the series with medsam3d.load")
    first = sources[0]
    for_uid = str(reference.meta["frame_of_reference_uid"])
    now = datetime.now()

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # 4-byte lengths: long contours fit
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    with warnings.catch_warnings():  # pydicom warns about the source's own values (cut below): not the user's to fix
        warnings.simplefilter("ignore", UserWarning)
        copied = {key: fitted_value(key, first[key].value) for key in _OPTIONAL_COPIED
                  if key in first and not first[key].is_empty}
        copied.update({key: fitted_value(key, getattr(first, key, "") or "") for key in _TYPE2_COPIED})
    for key in _OPTIONAL_COPIED:
        if key in copied:
            setattr(ds, key, copied[key])
    # SOP Common
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    # Patient, General Study (type 2: present, possibly empty)
    for key in _TYPE2_COPIED:
        setattr(ds, key, copied[key])
    ds.StudyInstanceUID = str(reference.meta["study_uid"])
    # RT Series, General Equipment
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "medsam3d contours"
    ds.SeriesDate, ds.SeriesTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.OperatorsName = ""
    ds.Manufacturer = "medsam3d"
    ds.ManufacturerModelName = "medsam3d"
    ds.SoftwareVersions = __version__
    # Frame of Reference
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = getattr(first, "PositionReferenceIndicator", "") or ""
    # Structure Set
    ds.StructureSetLabel = label[:16]
    ds.StructureSetName = label[:64]
    ds.StructureSetDescription = "automatic segmentation (medsam3d), not reviewed"
    ds.InstanceNumber = 1
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    images = [(str(src.SOPClassUID), uid) for src, uid in zip(sources, uids)]
    series = Dataset()
    series.SeriesInstanceUID = str(reference.meta["series_uid"])
    series.ContourImageSequence = Sequence([_image_item(*image) for image in images])
    study = Dataset()
    study.ReferencedSOPClassUID = _STUDY_SOP_CLASS
    study.ReferencedSOPInstanceUID = ds.StudyInstanceUID
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = for_uid
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])

    to_lps = LPS_TO_RAS @ reference.affine  # ijk -> LPS mm (LPS_TO_RAS is its own inverse)
    rois, roi_contours, observations = [], [], []
    contours_written = 0
    for value, info in table.items():
        name = str(info["name"])
        roi = Dataset()
        roi.ROINumber = value
        roi.ReferencedFrameOfReferenceUID = for_uid
        roi.ROIName = name[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"medsam3d {__version__}"[:64]
        rois.append(roi)
        item = Dataset()
        item.ReferencedROINumber = value
        item.ROIDisplayColor = [round(255 * min(max(float(c), 0.0), 1.0)) for c in info["color"]][:3]
        contours = _roi_contours(labels.array == value, to_lps, images)
        if contours:
            item.ContourSequence = Sequence(contours)
        else:
            log.info("RTSTRUCT: ROI %r (label %d) is empty: written without contours", name, value)
        contours_written += len(contours)
        roi_contours.append(item)
        obs = Dataset()
        obs.ObservationNumber = value
        obs.ReferencedROINumber = value
        category, _, _ = segment_codes(name)
        # an organ is ORGAN; a lesion's type (GTV, CTV...) is a clinical decision left to the planner: empty
        obs.RTROIInterpretedType = "ORGAN" if category == codes.SCT.AnatomicalStructure else ""
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(roi_contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    ds.ApprovalStatus = "UNAPPROVED"  # an automatic segmentation: a person approves it, not the tool
    fit_value_lengths(ds)
    with atomic_path(path) as tmp:
        pydicom.dcmwrite(str(tmp), ds, enforce_file_format=True)
    log.info("wrote RTSTRUCT %s (%d ROIs, %d contours)", path, len(rois), contours_written)
    return Path(path)


def _image_item(sop_class_uid: str, sop_instance_uid: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


def _roi_contours(mask: np.ndarray, to_lps: np.ndarray, images: list[tuple[str, str]]) -> list:
    """The CLOSED_PLANAR contour items of one object, slice by slice, in LPS mm."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    items = []
    for k in np.flatnonzero(mask.any(axis=(0, 1))):
        for points in slice_contours(mask[:, :, k]):
            ijk = np.column_stack([points, np.full(len(points), float(k))])
            lps = ijk @ to_lps[:3, :3].T + to_lps[:3, 3]
            contour = Dataset()
            contour.ContourImageSequence = Sequence([_image_item(*images[k])])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(lps)
            contour.ContourNumber = len(items) + 1
            # DS holds 16 characters: 3 decimals (a micrometre) keep any patient coordinate within it
            contour.ContourData = [f"{v:.3f}" for v in np.round(lps.ravel(), 3) + 0.0]
            items.append(contour)
    return items
