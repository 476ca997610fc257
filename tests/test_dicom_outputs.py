"""DICOM outputs for radiology and radiotherapy: the SEG, the measurement SR (TID 1500) and the RTSTRUCT.

Writers round trip (RTSTRUCT -> load_rtstruct gives the label map back; the SR's values are the
measurements and it references the SEG's segments), dciodvfy finds no error in any of the
three, run_case and the CLI write them together or refuse them before any work.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

import medsam3d as m3
from medsam3d.cli import main
from medsam3d.errors import GeometryError, VolumeIOError
from medsam3d.io.dicomsr import write_measurement_sr
from medsam3d.io.rtstruct_write import slice_contours, write_rtstruct

from conftest import EXAMPLES, dice, shared
from synthetic import ThresholdModel

CT_SERIES = "ibsi_sts_041/dicom/CT/image"
CT_MASK = "ibsi_sts_041/nifti/CT_mask.nii.gz"


@pytest.fixture(scope="module")
def ct():
    return m3.load(shared(CT_SERIES))


@pytest.fixture(scope="module")
def reference_mask(ct):
    """The expert's tumour (IBSI STS_041) on the DICOM series' grid, named as a user would."""
    mask = m3.load_labels(shared(CT_MASK), ct)
    return m3.Volume(mask.array, mask.affine, {"segments": {1: {"name": "sarcoma", "color": (0.9, 0.2, 0.1)}}})


def _two_objects(ct, reference_mask):
    """The tumour (label 1) and a small ball elsewhere (label 2)."""
    array = reference_mask.array.astype(np.uint8).copy()
    ijk = np.indices(ct.shape)
    array[((ijk[0] - 120) ** 2 + (ijk[1] - 130) ** 2 + ((ijk[2] - 10) * 3.3) ** 2) <= 64] = 2
    segments = {1: {"name": "sarcoma", "color": (0.9, 0.2, 0.1)}, 2: {"name": "lymph node", "color": (0.1, 0.8, 0.2)}}
    return m3.Volume(array, ct.affine, {"segments": segments})


def _dciodvfy_errors(path) -> list[str]:
    """The lines of dciodvfy's verdict on a file that report an error (warnings are allowed)."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


# ---------------------------------------------------------------------- RTSTRUCT
def test_rtstruct_round_trip_reproduces_the_expert_mask(ct, reference_mask, tmp_path):
    """One ROI, every slice of the tumour, read back through load_rtstruct: voxel for voxel
    (Dice 1.0 measured; 0.98 is the requirement)."""
    import pydicom

    path = write_rtstruct(reference_mask, tmp_path / "rt.dcm", reference=ct)
    back = m3.load_rtstruct(path, ct)
    assert dice(back.array == 1, reference_mask.array == 1) >= 0.98
    assert np.array_equal(back.array, reference_mask.array)
    assert back.segments[1]["name"] == "sarcoma"
    np.testing.assert_allclose(back.segments[1]["color"], (0.9, 0.2, 0.1), atol=1 / 255)
    ds = pydicom.dcmread(path)
    assert ds.Modality == "RTSTRUCT" and ds.FrameOfReferenceUID == ct.meta["frame_of_reference_uid"]
    assert ds.StudyInstanceUID == ct.meta["study_uid"] and ds.ApprovalStatus == "UNAPPROVED"
    series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == ct.meta["series_uid"]
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == ct.meta["sop_instance_uids"]
    # each contour references the image of the slice it lies on (LPS z of an axial series = the slice's z)
    positions = {uid: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
                 for uid, f in zip(ct.meta["sop_instance_uids"], ct.meta["dicom_files"])}
    contours = ds.ROIContourSequence[0].ContourSequence
    assert len({c.ContourImageSequence[0].ReferencedSOPInstanceUID for c in contours}) == \
        int((reference_mask.array == 1).any(axis=(0, 1)).sum())
    for contour in contours:
        z = np.asarray(contour.ContourData, float).reshape(-1, 3)[:, 2]
        assert np.allclose(z, positions[contour.ContourImageSequence[0].ReferencedSOPInstanceUID], atol=1e-3)


def test_rtstruct_holes_islands_and_touching_corners_round_trip_on_an_oblique_grid(ct, tmp_path):
    """A ring (a hole), an island inside the hole, pixels touching by a corner, single pixels and
    three objects, on a flipped oblique affine: the even-odd rule gives every voxel back."""
    array = np.zeros(ct.shape, np.uint8)
    ii, jj = np.indices(ct.shape[:2])
    r = np.hypot(ii - 60, jj - 70)
    for k in (10, 11, 12):
        array[:, :, k][(r <= 20) & (r > 9)] = 1  # ring
        array[:, :, k][r <= 4] = 1  # island in the hole
    array[100, 100, 11] = array[101, 101, 11] = array[102, 100, 11] = 2  # corners touching
    array[5, 5, 30] = 3  # one pixel
    array[0:4, 0:160, 31] = 3  # on the image border
    rot = np.array([[0.96, -0.28, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.8, -0.9, 2.5])
    affine[:3, 3] = [12.0, -30.0, 800.0]
    reference = m3.Volume(ct.array, affine, ct.meta)
    labels = m3.Volume(array, affine, {"segments": {1: {"name": "ring"}, 2: {"name": "corners"},
                                                    3: {"name": "specks"}}})
    back = m3.load_rtstruct(write_rtstruct(labels, tmp_path / "rt.dcm", reference=reference), reference)
    assert np.array_equal(back.array, array)
    assert [back.segments[v]["name"] for v in (1, 2, 3)] == ["ring", "corners", "specks"]


def test_slice_contours_are_few_points_and_nested():
    mask = np.zeros((12, 12), bool)
    mask[2:10, 2:10] = True
    mask[4:8, 4:8] = False
    contours = slice_contours(mask)
    assert len(contours) == 2 and all(len(c) == 8 for c in contours)  # straight runs: their corners only


def test_rtstruct_refuses_an_empty_label_map_and_another_grid(ct, tmp_path):
    with pytest.raises(VolumeIOError, match="empty label map"):
        write_rtstruct(ct.with_array(np.zeros(ct.shape, np.uint8)), tmp_path / "rt.dcm", reference=ct)
    with pytest.raises(GeometryError):
        write_rtstruct(m3.Volume(np.ones((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "rt.dcm", reference=ct)
    nifti = m3.load(EXAMPLES / "sts041_ct" / "CT_image.nii.gz")
    with pytest.raises(VolumeIOError, match="DICOM source series for RTSTRUCT.*drop --rtstruct"):
        write_rtstruct(nifti.with_array(np.ones(nifti.shape, np.uint8)), tmp_path / "rt.dcm", reference=nifti)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------- SR (TID 1500)
def test_sr_holds_the_measurements_and_references_the_seg_segments(ct, reference_mask, tmp_path):
    import highdicom as hd
    import pydicom

    labels = _two_objects(ct, reference_mask)
    seg_path = m3.save(labels, tmp_path / "seg.dcm", reference=ct)
    rows = m3.measure(labels, image=ct)
    path = write_measurement_sr(labels, tmp_path / "sr.dcm", seg=seg_path, reference=ct, measurements=rows)
    seg = pydicom.dcmread(seg_path)
    sr = hd.sr.srread(path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.StudyInstanceUID == ct.meta["study_uid"]
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence and set(ct.meta["sop_instance_uids"]) <= evidence
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    by_label = {int(s.TrackingID.split()[1]): s for s in seg.SegmentSequence}
    wholes = {r["label"]: r for r in rows if r["component"] == 0}
    for group in groups:
        label = int(group.tracking_identifier.split("label ")[1].rstrip(")"))
        segment = by_label[label]
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [segment.SegmentNumber]
        assert ref.source_series_for_segmentation.value == ct.meta["series_uid"]
        assert group.tracking_uid == segment.TrackingUID
        assert group.finding_type.value == segment.SegmentedPropertyTypeCodeSequence[0].CodeValue
        values = {(m.name.scheme_designator, m.name.value): (m.value, m.unit.value) for m in group.get_measurements()}
        row = wholes[label]
        assert values[("SCT", "118565006")] == (pytest.approx(row["volume_ml"], rel=1e-9), "ml")
        assert values[("SCT", "103339001")] == (pytest.approx(row["long_axis_mm"], rel=1e-9), "mm")
        assert values[("SCT", "103340004")] == (pytest.approx(row["short_axis_mm"], rel=1e-9), "mm")
        assert values[("IBSI", "L0JK")] == (pytest.approx(row["max_diameter_3d_mm"], rel=1e-9), "mm")
        # the axes were measured on the series' own axial slice: the SR names that image
        long_axis = next(m for m in group.get_measurements() if m.name.value == "103339001")
        assert long_axis.referenced_images[0].referenced_sop_instance_uid == \
            ct.meta["sop_instance_uids"][row["axial_slice"]]


def test_sr_measures_when_not_given_and_refuses_a_foreign_seg(ct, reference_mask, tmp_path):
    import highdicom as hd

    seg_path = m3.save(reference_mask, tmp_path / "seg.dcm", reference=ct)
    path = write_measurement_sr(reference_mask, tmp_path / "sr.dcm", seg=seg_path, reference=ct)
    (group,) = hd.sr.srread(path).content.get_volumetric_roi_measurement_groups()
    volume = next(m for m in group.get_measurements() if m.name.value == "118565006")
    # measured on the label map's own affine (the NIfTI's, within 2e-6 mm of the series')
    assert volume.value == pytest.approx((reference_mask.array == 1).sum() * reference_mask.voxel_volume_mm3 / 1000,
                                         rel=1e-12)
    other = m3.load(shared("dcmqi_ct3slice/ct-3slice"))
    with pytest.raises(GeometryError, match="expected a DICOM SEG of series"):
        write_measurement_sr(other.with_array(np.ones(other.shape, np.uint8)), tmp_path / "x.dcm", seg=seg_path,
                             reference=other)
    with pytest.raises(VolumeIOError, match="highdicom cannot read"):
        write_measurement_sr(reference_mask, tmp_path / "x.dcm", seg=EXAMPLES / "sts041_ct" / "prompts.json",
                             reference=ct)
    assert not (tmp_path / "x.dcm").exists()


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("modality", ["CT", "MR_T1"])
def test_dciodvfy_finds_no_error_in_the_seg_sr_and_rtstruct(modality, tmp_path):
    """The CT series is Implicit VR with a Study ID too long for its VR (cut in the outputs), the MR
    Explicit VR."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("needs dciodvfy (Debian package dicom3tools) to validate the DICOM objects")
    image = m3.load(shared(f"ibsi_sts_041/dicom/{modality}/image"))
    mask = m3.load_labels(shared(f"ibsi_sts_041/nifti/{modality}_mask.nii.gz"), image)
    labels = m3.Volume(mask.array, image.affine, {"segments": {1: {"name": "sarcoma"}}})
    seg = m3.save(labels, tmp_path / "seg.dcm", reference=image)
    sr = write_measurement_sr(labels, tmp_path / "sr.dcm", seg=seg, reference=image)
    rt = write_rtstruct(labels, tmp_path / "rt.dcm", reference=image)
    assert {p.name: _dciodvfy_errors(p) for p in (seg, sr, rt)} == {"seg.dcm": [], "sr.dcm": [], "rt.dcm": []}


# ---------------------------------------------------------------------- run_case and the CLI
def _prompts():
    return json.loads((EXAMPLES / "sts041_ct" / "prompts.json").read_text())


def test_run_case_writes_seg_sr_and_rtstruct_together(ct, tmp_path):
    import highdicom as hd

    outputs = {"labels": tmp_path / "seg.dcm", "sr": tmp_path / "sr.dcm", "rtstruct": tmp_path / "rt.dcm",
               "report": tmp_path / "r.json"}
    record = m3.run_case(shared(CT_SERIES), _prompts(), model=ThresholdModel(), outputs=outputs, measure=False,
                         window="0,400", zoom=None, taper=None)
    assert record.outputs["sr"] == str(outputs["sr"]) and record.outputs["rtstruct"] == str(outputs["rtstruct"])
    report = json.loads(outputs["report"].read_text())
    m3.validate_report(report)
    assert report["outputs"]["sr"] == str(outputs["sr"])
    whole = record.objects[0].measurements["whole"]  # an SR implies the measurements
    (group,) = hd.sr.srread(outputs["sr"]).content.get_volumetric_roi_measurement_groups()
    volume = next(m for m in group.get_measurements() if m.name.value == "118565006")
    assert volume.value == pytest.approx(whole["volume_ml"], rel=1e-9)
    assert np.array_equal(m3.load_rtstruct(outputs["rtstruct"], ct).array, record.labels.array)
    assert np.array_equal(m3.load_labels(outputs["labels"], ct).array, record.labels.array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "rt.dcm", "seg.dcm", "sr.dcm"]


def test_a_failing_sr_leaves_no_output_behind(ct, tmp_path, monkeypatch):
    import medsam3d.io.dicomsr

    def broken(*args, **kwargs):
        raise VolumeIOError("expected to write the SR, found a broken disk")

    monkeypatch.setattr(medsam3d.io.dicomsr, "write_measurement_sr", broken)
    outputs = {"labels": tmp_path / "seg.dcm", "sr": tmp_path / "sr.dcm", "rtstruct": tmp_path / "rt.dcm"}
    with pytest.raises(VolumeIOError, match="broken disk"):
        m3.run_case(ct, _prompts(), model=ThresholdModel(), outputs=outputs, window="0,400", zoom=None, taper=None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("labels, extra, message", [
    ("l.dcm", ["--sr", "sr.dcm"], "DICOM source series for DICOM SR output, found a nifti image; drop --sr"),
    ("l.nii.gz", ["--sr", "sr.dcm"], "labels output as a DICOM SEG (.dcm) for the DICOM SR (--sr)"),
    ("l.nii.gz", ["--rtstruct", "rt.dcm"], ("DICOM source series for RTSTRUCT output, found a nifti image; "
                                            "drop --rtstruct")),
    ("l.nii.gz", ["--rtstruct", "rt.nii.gz"], "RTSTRUCT path (--rtstruct) to end in .dcm"),
])
def test_cli_refuses_dicom_outputs_of_a_nifti_input(tmp_path, capsys, monkeypatch, labels, extra, message):
    import medsam3d.pipeline

    monkeypatch.setattr(medsam3d.pipeline, "segment", _must_not_run)
    code = main(["segment", str(EXAMPLES / "sts041_ct" / "CT_image.nii.gz"), "--box", "57,57,100,109@23",
                 "-o", str(tmp_path / labels), extra[0], str(tmp_path / extra[1])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("labels, extra, message", [
    ("l.nii.gz", ["--sr", "sr.dcm"], "labels output as a DICOM SEG (.dcm) for the DICOM SR (--sr)"),
    ("l.dcm", ["--sr", "l.dcm"], "labels and sr outputs to be different files"),
    ("l.dcm", ["--sr", "sr.json"], "DICOM SR path (--sr) to end in .dcm"),
])
def test_cli_refuses_an_sr_without_its_seg(ct, tmp_path, capsys, monkeypatch, labels, extra, message):
    import medsam3d.pipeline

    monkeypatch.setattr(medsam3d.pipeline, "segment", _must_not_run)
    code = main(["segment", str(shared(CT_SERIES)), "--box", "57,57,100,109@23", "-o", str(tmp_path / labels),
                 extra[0], str(tmp_path / extra[1])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def _must_not_run(*args, **kwargs):
    raise AssertionError("segment() ran although an output cannot be written")


@pytest.mark.slow
def test_cli_dicom_series_to_seg_sr_and_rtstruct_with_the_real_model(ct, tmp_path, capsys):
    """The bundled example's box (examples/sts041_ct, the same grid as this series) on the DICOM
    series, on 9 slices: SEG, SR and RTSTRUCT agree with each other and pass dciodvfy."""
    import highdicom as hd
    import pydicom

    seg, sr, rt, report = (tmp_path / n for n in ("seg.dcm", "sr.dcm", "rt.dcm", "r.json"))
    box = _prompts()["objects"][0]
    spec = f"{','.join(map(str, box['box']))}@{box['slice']}:{box['slice'] - 4}..{box['slice'] + 4}"
    code = main(["segment", str(shared(CT_SERIES)), "--box", spec, "-o", str(seg), "--sr", str(sr),
                 "--rtstruct", str(rt), "--json", str(report), "--device", "cpu", "--fast", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and str(sr) in out and str(rt) in out
    labels = m3.load_labels(seg, ct)
    assert labels.array.any() and np.array_equal(m3.load_rtstruct(rt, ct).array, labels.array)
    data = json.loads(report.read_text())
    m3.validate_report(data)
    assert data["outputs"]["sr"] == str(sr) and data["outputs"]["rtstruct"] == str(rt)
    whole = data["objects"][0]["measurements"]["whole"]
    (group,) = hd.sr.srread(sr).content.get_volumetric_roi_measurement_groups()
    values = {m.name.value: m.value for m in group.get_measurements()}
    assert values["118565006"] == pytest.approx(whole["volume_ml"], rel=1e-9)
    assert values["103339001"] == pytest.approx(whole["long_axis_mm"], rel=1e-9)
    assert group.referenced_segment.referenced_sop_instance_uid == \
        pydicom.dcmread(seg, stop_before_pixels=True).SOPInstanceUID
    expert = m3.load_labels(shared(CT_MASK), ct).array == 1
    inside = slice(box["slice"] - 4, box["slice"] + 5)
    assert dice(labels.array[:, :, inside] == 1, expert[:, :, inside]) >= 0.85  # measured 0.907
    if shutil.which("dciodvfy") is not None:  # the writers' own test skips with a reason without it
        assert {p.name: _dciodvfy_errors(p) for p in (seg, sr, rt)} == {"seg.dcm": [], "sr.dcm": [], "rt.dcm": []}
