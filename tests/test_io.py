"""Loaders and writers on real cases and synthetic grids: every voxel and the affine exact."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

import medsam3d as m3
from medsam3d import GeometryError, VolumeIOError
from medsam3d.errors import DicomSeriesError

from conftest import make_volume, shared

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("modality", ["CT", "MR_T1"])
def test_dicom_series_equals_its_nifti_twin(modality):
    dicom = m3.load(shared(f"ibsi_sts_041/dicom/{modality}/image"))
    nifti = m3.load(shared(f"ibsi_sts_041/nifti/{modality}_image.nii.gz"))
    assert dicom.shape == nifti.shape
    np.testing.assert_allclose(dicom.affine, nifti.affine, atol=1e-4)
    assert np.array_equal(dicom.array, nifti.array)
    assert dicom.meta["modality"] == ("CT" if modality == "CT" else "MR")
    assert dicom.axcodes == ("L", "P", "S")


@pytest.mark.parametrize("case", ["siemens/anatomical/001", "hitachi/anatomical/001",
                                  "philips_enhanced/anatomical/001"])
def test_dicom2nifti_cases_match_expected_geometry(case):
    vol = m3.load(shared(f"dicom2nifti/{case}"))
    truth = nib.load(shared(f"dicom2nifti/{case}_ground_truth.nii.gz"))
    t_data = np.asanyarray(truth.dataobj)
    t_data = t_data[..., 0] if t_data.ndim == 4 else t_data
    # compare in world space: both brought to the closest canonical layout
    ours = nib.as_closest_canonical(nib.Nifti1Image(vol.array.astype(np.float32), vol.affine))
    ref = nib.as_closest_canonical(nib.Nifti1Image(t_data.astype(np.float32), truth.affine))
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-3)
    np.testing.assert_allclose(np.asanyarray(ours.dataobj), np.asanyarray(ref.dataobj), rtol=1e-5)


def test_oblique_hitachi_keeps_its_oblique_affine():
    vol = m3.load(shared("dicom2nifti/hitachi/anatomical/001"))
    assert vol.is_oblique
    np.testing.assert_allclose(vol.spacing, (2.34375, 2.34375, 4.0), atol=1e-3)


def test_gantry_tilt_is_refused_or_loaded_sheared():
    path = shared("dicom2nifti/failing/gantrytilting/001")
    with pytest.raises(GeometryError, match="gantry tilt of 14.00 degrees"):
        m3.load(path)
    vol = m3.load(path, allow_tilt=True)
    # the k axis follows the real slice positions (sheared, exact), not the slice normal
    normal = np.cross(vol.direction[:, 0], vol.direction[:, 1])
    angle = np.degrees(np.arccos(abs(normal @ vol.direction[:, 2])))
    assert angle == pytest.approx(14.0, abs=0.05)


@pytest.mark.parametrize("case", ["dicom2nifti/failing/sliceincrement/002", "monai_ct_dicom/CT_DICOM"])
def test_missing_slice_and_irregular_spacing_are_refused(case):
    with pytest.raises(GeometryError, match="evenly spaced slices"):
        m3.load(shared(case))


def test_decubitus_sagittal_mr_orientation():
    vol = m3.load(shared("dcm_qa_decubitus/HFDR/2_t1_fl2d_sag"))
    sidecar = json.loads(shared("dcm_qa_decubitus/Ref/t1_fl2d_sag_20220407151157.json").read_text())
    assert vol.shape == (256, 256, 35)
    # IOP (0,1,0 / 0,0,-1): columns go posterior, rows go inferior, slices sorted along the normal
    assert vol.axcodes == ("P", "I", "R")
    np.testing.assert_allclose(vol.spacing, (1.015625, 1.015625, 4.8), atol=1e-4)
    assert vol.meta["patient_position"] == sidecar["PatientPosition"] == "HFDR"
    # the i/j axes are the header's row/column cosines (LPS), whatever the patient position
    import pydicom

    first = sorted(shared("dcm_qa_decubitus/HFDR/2_t1_fl2d_sag").iterdir())[0]
    iop = [float(v) for v in pydicom.dcmread(first, stop_before_pixels=True).ImageOrientationPatient]
    np.testing.assert_allclose(vol.direction[:, 0] * [-1, -1, 1], iop[:3], atol=1e-4)
    np.testing.assert_allclose(vol.direction[:, 1] * [-1, -1, 1], iop[3:], atol=1e-4)


def test_jpeg2000_ct_and_flipped_label_file_land_on_the_same_anatomy():
    ct = m3.load(shared("totalseg_ct_dicom/example_ct_dicom"))
    assert ct.array.min() == -1024 and ct.meta["modality"] == "CT"
    seg = m3.load(shared("totalseg_ct_dicom/example_seg_dicom.nii.gz"))
    assert seg.axcodes == ("L", "A", "S") and ct.axcodes == ("L", "P", "S")
    # the label file is stored with j flipped: reorient it onto the CT layout, no resampling
    aligned, _ = m3.reorient(seg, ct.axcodes)
    np.testing.assert_allclose(aligned.affine, ct.affine, atol=1e-3)
    liver = aligned.array == 5
    soft = lambda mask: np.mean((ct.array[mask] > 0) & (ct.array[mask] < 150))  # noqa: E731
    # liver and spleen lie on soft-tissue HU; the mirrored (array-order) masks do not
    assert soft(liver) > 0.98 and soft(aligned.array == 1) > 0.98
    assert soft(liver[:, ::-1, :]) < 0.8 and soft((aligned.array == 1)[:, ::-1, :]) < 0.5
    assert liver.sum() * ct.voxel_volume_mm3 / 1000 == pytest.approx(699.4, abs=0.5)
    # load_labels puts it on the CT's grid by itself (it used to refuse it: "resample it first")
    labels = m3.load_labels(shared("totalseg_ct_dicom/example_seg_dicom.nii.gz"), ct)
    assert labels.same_grid(ct) and np.array_equal(labels.array, aligned.array)


def test_dcmqi_three_slice_ct_and_its_label_maps_share_a_grid(tmp_path):
    ct = m3.load(shared("dcmqi_ct3slice/ct-3slice"))
    liver = m3.load_labels(shared("dcmqi_ct3slice/liver_seg.nrrd"), ct)
    assert liver.array.sum() * ct.voxel_volume_mm3 / 1000 == pytest.approx(70.4, abs=0.1)
    # its SpecificCharacterSet is '' (highdicom refused it: internal error ValueError); as DICOM SEG and back
    both = m3.load_labels(shared("dcmqi_ct3slice/liver_spine_seg.nrrd"), ct)
    back = m3.load_labels(m3.save(both, tmp_path / "seg.dcm", reference=ct), ct)
    assert np.array_equal(back.array, both.array) and sorted(back.segments) == [1, 2]


def test_dicom_seg_codes_follow_the_object_names(tmp_path):
    """Every segment used to be coded Neoplasm, a spleen too. The codes now come from the name:
    a lesion term (with the organ before it as the anatomic region), an anatomical structure, or
    Neoplasm for a name that says neither."""
    import pydicom

    ct = m3.load(shared("dcmqi_ct3slice/ct-3slice"))
    both = m3.load_labels(shared("dcmqi_ct3slice/liver_spine_seg.nrrd"), ct)
    three = both.with_array(np.where(both.array == 2, 3, both.array).astype(np.uint8))
    three.array[:20, :20, :] = 2
    three.meta["segments"] = {1: {"name": "liver tumor", "color": (1, 0, 0)}, 2: {"name": "object", "color": (0, 1, 0)},
                              3: {"name": "left kidney", "color": (0, 0, 1)}}
    path = m3.save(three, tmp_path / "seg.dcm", reference=ct)
    found = [(s.SegmentLabel, s.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning,
              s.SegmentedPropertyTypeCodeSequence[0].CodeValue, s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning,
              [r.CodeMeaning for r in s.get("AnatomicRegionSequence", [])])
             for s in pydicom.dcmread(path).SegmentSequence]
    assert found == [("liver tumor", "Morphologically Abnormal Structure", "108369006", "Neoplasm", ["Liver"]),
                     ("object", "Morphologically Abnormal Structure", "108369006", "Neoplasm", []),
                     ("left kidney", "Anatomical Structure", "64033007", "Kidney", [])]
    back = m3.load_labels(path, ct)
    assert np.array_equal(back.array, three.array)
    assert [back.segments[v]["name"] for v in (1, 2, 3)] == ["liver tumor", "object", "left kidney"]


@pytest.mark.parametrize("modality", ["CT", "MR_T1"])
def test_rtstruct_rasterisation_matches_nifti_mask(modality):
    image = m3.load(shared(f"ibsi_sts_041/dicom/{modality}/image"))
    rt = m3.load_rtstruct(shared(f"ibsi_sts_041/dicom/{modality}/mask"), image)
    ref = m3.load_labels(shared(f"ibsi_sts_041/nifti/{modality}_mask.nii.gz"), image)
    a, b = rt.array > 0, ref.array > 0
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice >= 0.95
    assert rt.segments[1]["name"].startswith("GTV_Mass")
    assert a.sum() * image.voxel_volume_mm3 / 1000 == pytest.approx(60.59, abs=0.05)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd", ".dcm"])
def test_label_round_trips_keep_every_voxel(tmp_path, suffix):
    image = m3.load(shared("ibsi_sts_041/dicom/CT/image"))
    labels = np.zeros(image.shape, np.uint8)
    labels[30:60, 40:80, 10:30] = 1
    labels[90:100, 20:30, 5:9] = 2
    lab = image.with_array(labels, segments={1: {"name": "tumor", "color": (1, 0, 0)},
                                             2: {"name": "node", "color": (0, 1, 0)}})
    out = m3.save(lab, tmp_path / f"labels{suffix}", reference=image)
    back = m3.load_labels(out, image)
    assert np.array_equal(back.array, labels)
    np.testing.assert_allclose(back.affine, image.affine, atol=1e-4)
    if suffix in (".seg.nrrd", ".dcm"):
        assert back.segments[1]["name"] == "tumor" and back.segments[2]["name"] == "node"
        # DICOM SEG stores CIELab in 16 bits: the sRGB colours come back to within 1/255
        np.testing.assert_allclose(back.segments[1]["color"], (1, 0, 0), atol=0.005)
        np.testing.assert_allclose(back.segments[2]["color"], (0, 1, 0), atol=0.005)
    assert os.listdir(tmp_path) == [out.name]  # nothing else left behind


@pytest.mark.parametrize("codes", ["LAS", "RAS", "PIR", "ASL"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".seg.nrrd"])
def test_synthetic_flipped_and_oblique_grids_round_trip(tmp_path, codes, suffix):
    for oblique in (0.0, 23.0):
        vol = make_volume(axcodes=codes, oblique_deg=oblique, dtype=np.uint8)
        vol = vol.with_array((vol.array % 3).astype(np.uint8))
        path = m3.save(vol, tmp_path / f"x{oblique:.0f}{suffix}")
        back = m3.load(path)
        assert np.array_equal(back.array, vol.array)
        np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)


def test_dicom_seg_needs_a_dicom_source(tmp_path):
    vol = make_volume(dtype=np.uint8)
    with pytest.raises(VolumeIOError, match="DICOM SEG"):
        m3.save(vol, tmp_path / "x.dcm", reference=vol)
    assert not list(tmp_path.iterdir())


def test_dicom_seg_of_an_anonymised_series(tmp_path):
    """The TotalSegmentator CT has empty Study/Series/SOP Instance UIDs and SOP Class UID (the file
    meta keeps the SOP ones). DICOM SEG output used to end in an internal error (KeyError: '')
    after the whole segmentation; now it is refused before any work, and where only the SOP
    UIDs are missing they are taken from the file meta."""
    import pydicom
    from pydicom.uid import generate_uid

    folder = shared("totalseg_ct_dicom/example_ct_dicom")
    ct = m3.load(folder)
    labels = m3.load_labels(shared("totalseg_ct_dicom/example_seg_dicom.nii.gz"), ct)
    labels = labels.with_array(np.where(np.isin(labels.array, (1, 52)), labels.array, 0).astype(np.uint8))
    with pytest.raises(VolumeIOError, match="StudyInstanceUID, SeriesInstanceUID for DICOM SEG.*empty"):
        m3.io.check_output(tmp_path / "x.dcm", reference=ct)
    with pytest.raises(VolumeIOError, match="StudyInstanceUID, SeriesInstanceUID"):
        m3.save(labels, tmp_path / "x.dcm", reference=ct)
    copy = tmp_path / "ct"
    copy.mkdir()
    study, series = generate_uid(), generate_uid()
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == "" and ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        for key in ("AccessionNumber", "ReferringPhysicianName", "StudyID"):  # type 2, dropped by some anonymisers
            if key in ds:
                delattr(ds, key)
        ds.save_as(copy / path.name)
    ct2 = m3.load(copy)
    assert ct2.meta["sop_instance_uids"][0] and np.array_equal(ct2.array, ct.array)
    out = m3.save(labels, tmp_path / "organs.dcm", reference=ct2)
    back = m3.load_labels(out, ct2)
    assert np.array_equal(back.array > 0, labels.array > 0) and len(back.segments) == 2
    # dicom2nifti's oblique Hitachi MR has no FrameOfReferenceUID at all (highdicom: internal ValueError)
    hitachi = m3.load(shared("dicom2nifti/hitachi/anatomical/001"))
    with pytest.raises(VolumeIOError, match="FrameOfReferenceUID for DICOM SEG"):
        m3.io.check_output(tmp_path / "x.dcm", reference=hitachi)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import medsam3d.io._nifti as nifti_mod

    vol = make_volume(dtype=np.uint8)

    def broken_save(image, path):
        with open(path, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError):
        nifti_mod.write_nifti(vol, tmp_path / "x.nii.gz")
    assert not list(tmp_path.iterdir())


def test_several_series_need_a_choice():
    folder = shared("ibsi_sts_041/dicom")
    with pytest.raises(DicomSeriesError, match="found 2:.*--series"):
        m3.load(folder)
    series = [s for s in m3.list_dicom_series(folder) if s.modality == "MR"]
    vol = m3.load(folder, series_uid=series[0].uid)
    assert vol.shape == (90, 109, 45)


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(VolumeIOError, match="found nothing"):
        m3.load(tmp_path / "missing.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(VolumeIOError, match="empty file"):
        m3.load(tmp_path / "empty.nii.gz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(VolumeIOError, match="expected a NIfTI"):
        m3.load(tmp_path / "notes.txt")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(DicomSeriesError, match="no DICOM files"):
        m3.load(empty)


def test_truncated_files_are_refused(tmp_path):
    data = shared("ibsi_sts_041/nifti/CT_image.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[:5000])
    with pytest.raises(VolumeIOError, match="cannot read|truncated"):
        m3.load(tmp_path / "cut.nii.gz")
    nrrd = shared("pyradiomics/brain2_image.nrrd").read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(nrrd[:3000])
    with pytest.raises(VolumeIOError):
        m3.load(tmp_path / "cut.nrrd")


def test_malformed_dicom_header_values_are_skipped_or_refused(tmp_path, caplog):
    """pydicom converts values on access: an IS '1A' or a DS 'x' must not end in a traceback."""
    import shutil

    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag
    from pydicom.uid import generate_uid

    source = shared("ibsi_sts_041/dicom/CT/image")
    reference = m3.load(source)
    folder = tmp_path / "ct"
    shutil.copytree(source, folder)
    first = sorted(folder.iterdir())[0]
    # a stray file of another series whose NumberOfFrames is not a number: skipped with a warning
    stray = pydicom.dcmread(first)
    stray.SeriesInstanceUID = generate_uid()
    stray[0x00280008] = RawDataElement(Tag(0x00280008), "IS", 2, b"1A", 0, False, True)
    stray.save_as(tmp_path / "stray.dcm")
    shutil.copy(tmp_path / "stray.dcm", folder / "zz_stray.dcm")
    with caplog.at_level("WARNING", logger="medsam3d"):
        volume = m3.load(folder)
    assert np.array_equal(volume.array, reference.array) and np.allclose(volume.affine, reference.affine)
    assert "malformed" in caplog.text and "zz_stray.dcm" in caplog.text
    # a slice of the series itself whose position is not numeric: one clear error
    broken = pydicom.dcmread(first)
    broken[0x00200032] = RawDataElement(Tag(0x00200032), "DS", 6, b"x\\y\\z ", 0, False, True)
    broken.save_as(first)
    with pytest.raises(DicomSeriesError, match="expected well-formed header values.*fix or remove") as info:
        m3.load(folder)
    assert "\n" not in str(info.value)


def test_label_on_another_grid_is_refused():
    image = m3.load(shared("ibsi_sts_041/nifti/CT_image.nii.gz"))
    with pytest.raises(GeometryError, match="expected the label map on the image's grid"):
        m3.load_labels(shared("ibsi_sts_041/nifti/MR_T1_mask.nii.gz"), image)


def test_nrrd_lps_and_las_cases_load_with_right_volumes():
    brain = m3.load_labels(shared("pyradiomics/brain2_label.nrrd"))
    assert brain.axcodes == ("L", "A", "S")
    assert (brain.array == 1).sum() == 453
    prostate = m3.load_labels(shared("pyradiomics/prostate_phantom_subvolume-label.nrrd"))
    assert prostate.axcodes == ("R", "A", "S")
    assert {v: int((prostate.array == v).sum()) for v in (1, 7, 8, 9)} == {1: 168, 7: 170, 8: 2997, 9: 9088}


# ---------------------------------------------------------------------- nibabel's own files, 4D, the CLI's words
NIBABEL_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")


@pytest.mark.parametrize("name, index", [("anatomical.nii", None), ("standard.nii.gz", None),
                                         ("example4d.nii.gz", 1), ("example_nifti2.nii.gz", 0),
                                         ("functional.nii", 19), ("test.mgz", 1)])
def test_nibabel_test_files_read_with_nibabels_affine_and_voxels(name, index):
    """.mgz was refused as an unknown format; a 4D file failed instead of asking for a volume."""
    path = os.path.join(NIBABEL_DATA, name)
    truth = nib.load(path)
    vol = m3.load(path, volume_index=index)
    data = np.asanyarray(truth.dataobj)
    expected = data if index is None else data[..., index]
    assert vol.array.dtype.isnative and np.array_equal(vol.array, expected)
    assert np.array_equal(vol.affine, truth.affine)
    assert vol.meta["format"] == ("mgh" if name.endswith(".mgz") else "nifti")
    if index is not None:
        n = data.shape[3]
        with pytest.raises(VolumeIOError, match=f"found {n} volumes.*--volume N, N in 0..{n - 1}"):
            m3.load(path)


@pytest.mark.parametrize("given", [".hdr", ".img"])
def test_nifti_pairs_read_like_their_single_file(tmp_path, given):
    """NIfTI .hdr/.img pairs were refused as an unknown format."""
    single = nib.load(os.path.join(NIBABEL_DATA, "anatomical.nii"))
    affine = single.affine @ np.diag([-1.0, 1.0, 1.0, 1.0])  # a flipped axis: the affine must follow
    affine[0, 3] += 10
    pair = nib.Nifti1Pair(np.asanyarray(single.dataobj), affine)
    nib.save(pair, tmp_path / "anat.img")
    vol = m3.load(tmp_path / f"anat{given}")
    back = nib.load(tmp_path / "anat.hdr")
    assert np.array_equal(vol.array, np.asanyarray(single.dataobj)) and np.array_equal(vol.affine, back.affine)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    assert vol.axcodes == tuple(nib.aff2axcodes(affine))


def test_every_option_of_every_command_has_help():
    """--space (mesh) and --view (render) had no help text."""
    from medsam3d.cli import _get_parser

    parser = _get_parser()
    commands = parser._subparsers._group_actions[0].choices
    missing = [f"{name} {action.option_strings or action.dest}" for name, sub in commands.items()
               for action in sub._actions if not action.help]
    assert not missing
    assert {"--image", "--max-labels"} <= {o for a in commands["mesh"]._actions for o in a.option_strings}
    for name in ("measure", "render"):
        assert "--max-labels" in {o for a in commands[name]._actions for o in a.option_strings}
    assert "--volume" in {o for a in commands["segment"]._actions for o in a.option_strings}


def test_info_names_its_units_and_where_the_modality_came_from(capsys):
    """info printed 'origin: [...]' (RAS, unsaid) and 'modality: None' for a CT NIfTI."""
    from medsam3d.cli import main

    example = os.path.join(os.path.dirname(__file__), "..", "examples", "sts041_ct", "CT_image.nii.gz")
    assert main(["info", example]) == 0
    out = capsys.readouterr().out
    assert "origin (RAS mm): [112.3048, 44.922, 755.0]" in out and "spacing (mm): [0.976562, 0.976562, 3.27]" in out
    assert "intensity range: -1000 .. 1569 HU" in out
    assert "modality: CT (none in the file; guessed from the intensities" in out
    assert main(["info", example, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["origin"] == [112.3048, 44.922, 755.0] and info["modality"] is None  # the JSON keys are unchanged
    dicom = shared("ibsi_sts_041/dicom/CT/image")
    assert main(["info", str(dicom)]) == 0
    assert "modality: CT (from the header)" in capsys.readouterr().out
