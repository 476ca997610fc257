"""The batch manifest (reading, refusals, prompts per study) and the planner of a manifest from a PACS export."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medsam3d.batch.manifest import PromptSource, Study, read_manifest, study_prompts
from medsam3d.errors import DicomSeriesError, ManifestError, Medsam3dError, PromptError, VolumeIOError
from medsam3d.prompts import prompts_from_labels
from medsam3d.volume import Volume

from conftest import EXAMPLES, shared

EXAMPLE = EXAMPLES / "sts041_ct"
HEADER = "case_id,patient_id,timepoint,image,prompts"


def write(path: Path, text: str, *, bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def manifest(tmp_path: Path, *rows: str, header: str = HEADER, name: str = "manifest.csv") -> Path:
    return write(tmp_path / name, "\n".join([header, *rows]) + "\n")


# ---------------------------------------------------------------------------------------------- reading
def test_csv_every_prompt_form_relative_paths_metadata_and_bom(tmp_path):
    (tmp_path / "cases").mkdir()
    shutil.copy(EXAMPLE / "prompts.json", tmp_path / "cases" / "p.json")
    (tmp_path / "cases" / "roi.mrk.json").write_text("{}")
    text = "\n".join([
        "Case_ID,patient_id,timepoint,image,prompts,series_uid,modality,window,model,checkpoint,site,arm",
        "a1,P1,2024-01-05,cases/ct1.nii.gz,cases/p.json,,ct,soft-tissue,litemedsam,,liver,A",
        'a2,P1,20240301,/abs/ct2,"120,88,171,140@41:30..50",1.2.3,,40,400,,,liver,A',
        "a3,P1,2024-06-01,ct3.nii.gz,text:liver tumor,,,,,,liver,A",
        "a4,P1,2024-09-01,ct4.nii.gz,from:a1,,,,,w/ckpt.pth,liver,A",
        "b1,P2,0,mr.nii.gz,cases/roi.mrk.json,,MR,,,,,B",
        "b2,P2,12.5,mr2.nii.gz,missing_prompts.json,,MR,,,,,B",
        "",
    ])
    path = write(tmp_path / "m.csv", text.replace("40,400", '"40,400"'), bom=True)
    studies = read_manifest(path)
    assert [s.case_id for s in studies] == ["a1", "a2", "a3", "a4", "b1", "b2"]
    assert [s.row for s in studies] == [2, 3, 4, 5, 6, 7]
    a1, a2, a3, a4, b1, b2 = studies
    assert a1.image == tmp_path / "cases" / "ct1.nii.gz" and a1.image.is_absolute()
    assert a1.prompts == PromptSource("file", str(tmp_path / "cases" / "p.json"))
    assert a1.prompts.describe() == "cases/p.json"  # as written
    assert (a1.modality, a1.window, a1.model, a1.series_uid) == ("CT", "soft-tissue", "litemedsam", None)
    assert a1.metadata == {"site": "liver", "arm": "A"}
    assert a2.image == Path("/abs/ct2") and a2.series_uid == "1.2.3" and a2.window == "40,400"
    assert a2.prompts.kind == "box" and a2.prompts.value == "120,88,171,140@41:30..50"
    assert a3.prompts == PromptSource("text", "liver tumor") and a3.prompts.describe() == "text:liver tumor"
    assert a4.prompts == PromptSource("from", "a1") and a4.checkpoint == tmp_path / "w" / "ckpt.pth"
    assert b1.prompts.kind == "file" and b2.prompts.kind == "file"  # a missing prompt file fails its study only
    assert [s.order for s in studies[:2]] == [(0, 738890), (0, 738946)]
    assert (b1.order, b2.order) == ((1, 0.0), (1, 12.5))
    assert isinstance(a1, Study)


def test_semicolon_and_tab_separated(tmp_path):
    rows = ["x1;P;1;img.nii.gz;120,88,171,140@41", "x2;P;2;img2.nii.gz;text:mass"]
    studies = read_manifest(manifest(tmp_path, *rows, header=HEADER.replace(",", ";")))
    assert [s.prompts.kind for s in studies] == ["box", "text"]
    tsv = write(tmp_path / "m.tsv", HEADER.replace(",", "\t") + "\nx1\tP\t1\timg.nii.gz\t1,2,30,40@0\n")
    assert read_manifest(tsv)[0].prompts.value == "1,2,30,40@0"


@pytest.mark.parametrize("wrap", [False, True], ids=["list", "studies"])
def test_json_manifest(tmp_path, wrap):
    shutil.copy(EXAMPLE / "prompts.json", tmp_path / "p.json")
    items = [
        {"case_id": "c1", "patient_id": "P", "timepoint": "2023-01-02", "image": "ct.nii.gz", "prompts": "p.json",
         "modality": None, "site": "lung", "metadata": {"reader": "R1"}},
        {"case_id": "c2", "patient_id": "Q", "timepoint": 3, "image": "ct2.nii.gz", "prompts": "5,5,20,20@3",
         "Window": "lung", "dose": 2.5, "tags": ["a", "b"]},
    ]
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"studies": items} if wrap else items), encoding="utf-8-sig")
    c1, c2 = read_manifest(path)
    assert (c1.row, c2.row) == (1, 2)
    assert c1.image == tmp_path / "ct.nii.gz" and c1.prompts.kind == "file" and c1.modality is None
    assert c1.metadata == {"site": "lung", "reader": "R1"}
    assert c2.timepoint == "3" and c2.order == (1, 3.0) and c2.window == "lung"
    assert c2.metadata == {"dose": "2.5", "tags": '["a","b"]'}


# ---------------------------------------------------------------------------------------------- refusals
_LONG_HEADER = HEADER + ",window,model,modality,"  # a spreadsheet's trailing unnamed column
_OK = 'ok,P0,2024-01-01,img.nii.gz,"1,1,9,9@0"'

REFUSALS = [
    ("duplicate case_id", ["a,P,1,i.nii.gz,text:x", "b,P,2,i.nii.gz,text:x", "a,P,3,i.nii.gz,text:x"],
     ["rows 2 and 4", "'a' twice"]),
    ("duplicate case_id ignoring case", ["Case1,P,1,i.nii.gz,text:x", "case1,P,2,i.nii.gz,text:x"],
     ["rows 2 and 3", "only in case"]),
    ("empty prompts", ["a,P,1,i.nii.gz,text:x", "b,P,2,i.nii.gz,"], ["row 3", "fill in the prompts column"]),
    ("empty image", ["a,P,1,,text:x"], ["row 2", "fill in the image column"]),
    ("too few fields", ["a,P,1,i.nii.gz,text:x", "b,P,2,i.nii.gz"], ["row 3", "expected 5 fields", "found 4"]),
    ("unquoted box", ["a,P,1,i.nii.gz,120,88,171,140@41"], ["row 2", "found 8", "quote"]),
    ("bad quoting", ['a,P,1,i.nii.gz,"text:x"y'], ["row 2", "quoting"]),
    ("timepoint words", ["a,P,next week,i.nii.gz,text:x"], ["row 2", "timepoint", "'next week'"]),
    ("timepoint not a date", ["a,P,2024-02-30,i.nii.gz,text:x"], ["row 2", "no calendar date"]),
    ("dicom date not a date", ["a,P,20241340,i.nii.gz,text:x"], ["row 2", "no calendar date"]),
    ("dates and numbers", ["a,P,2024-01-01,i.nii.gz,text:x", "b,Q,1,i.nii.gz,text:x", "c,P,3,i.nii.gz,text:x"],
     ["rows 2 and 4", "'P'", "dates or all as numbers"]),
    ("bad box", [_OK, "a,P,1,i.nii.gz,\"1,2,3@4\""], ["row 3", "inline box"]),
    ("box min after max", ["a,P,1,i.nii.gz,\"30,10,5,20@3\""], ["row 2", "min before max"]),
    ("box outside its z range", ["a,P,1,i.nii.gz,\"1,1,9,9@3:5..8\""], ["row 2", "outside its z range"]),
    ("unknown from", ["a,P,1,i.nii.gz,text:x", "b,P,2,i.nii.gz,from:zz"], ["row 3", "from:zz", "no such case_id"]),
    ("from in other case", ["Abc,P,1,i.nii.gz,text:x", "b,P,2,i.nii.gz,from:abc"], ["row 3", "did you mean from:Abc"]),
    ("from itself", ["a,P,1,i.nii.gz,from:a"], ["row 2", "its own case_id"]),
    ("from another patient", ["a,P,1,i.nii.gz,text:x", "b,Q,2,i.nii.gz,from:a"], ["row 3", "same patient"]),
    ("from cycle", ["a,P,1,i.nii.gz,from:c", "b,P,2,i.nii.gz,from:a", "c,P,3,i.nii.gz,from:b", "d,P,4,i.nii.gz,from:a"],
     ["rows 2, 3, 4", "cycle", "a -> c -> b -> a"]),
    ("empty from", ["a,P,1,i.nii.gz,from:"], ["row 2", "after 'from:'"]),
    ("same time point", ["a,P,2024-01-05,i.nii.gz,text:x", "b,P,20240105,j.nii.gz,text:x"],
     ["rows 2 and 3", "per modality and time point", "'20240105'"]),
    ("case_id with a slash", ["x/y,P,1,i.nii.gz,text:x"], ["row 2", "'/'"]),
    ("case_id ..", [_OK, "..,P,1,i.nii.gz,text:x"], ["row 3", "folder name"]),
    ("case_id control character", ["a\x01b,P,1,i.nii.gz,text:x"], ["row 2", "'\\x01'"]),
    ("case_id reserved", ["NUL,P,1,i.nii.gz,text:x"], ["row 2", "Windows reserves"]),
    ("unknown window", [_OK + ",,,,", "a,P,1,i.nii.gz,text:x,purple,,,"], ["row 3", "window"], _LONG_HEADER),
    ("unknown model", ["a,P,1,i.nii.gz,text:x,,nope,,"], ["row 2", "model", "'nope'"], _LONG_HEADER),
    ("unknown modality", ["a,P,1,i.nii.gz,text:x,,,MRI,"], ["row 2", "modality", "'MRI'"], _LONG_HEADER),
    ("value in an unnamed column", ["a,P,1,i.nii.gz,text:x,,,,oops"], ["row 2", "column 9"], _LONG_HEADER),
]


@pytest.mark.parametrize("rows, needles, header", [(*r[1:], HEADER)[:3] for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_row(tmp_path, rows, needles, header):
    path = manifest(tmp_path, *rows, header=header)
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith("manifest.csv row")
    for needle in needles:
        assert needle in message, message
    assert isinstance(info.value, Medsam3dError) and isinstance(info.value, ValueError)


def test_refusals_of_the_file_and_header(tmp_path):
    cases = [
        ("case_id,patient_id,timepoint,image\na,P,1,i", ["row 1", "found no prompts", "add the column"]),
        ("case_id,patient_id,timepoint,image,prompts,Prompts\na,P,1,i,text:x,text:y", ["row 1", "'prompts' twice"]),
        ("", ["found an empty file"]),
        (HEADER + "\n\n", ["at least one study"]),
    ]
    for text, needles in cases:
        path = write(tmp_path / "m.csv", text)
        with pytest.raises(ManifestError) as info:
            read_manifest(path)
        for needle in needles:
            assert needle in str(info.value), str(info.value)
    (tmp_path / "latin.csv").write_bytes((HEADER + "\na,Zoë,1,i,text:x\n").encode("latin-1"))
    with pytest.raises(ManifestError, match="line 2.*CSV UTF-8"):
        read_manifest(tmp_path / "latin.csv")
    with pytest.raises(ManifestError, match="found nothing"):
        read_manifest(tmp_path / "absent.csv")
    bad_json = [({"studies": {}}, "list of studies"), ({"cases": []}, "found dict with keys"),
                ([{"case_id": "a"}], "row 1.*found no patient_id"), ([_json_row("a"), 3], "row 2.*found int"),
                ([_json_row("a"), _json_row("a", timepoint="2")], "rows 1 and 2")]
    for data, pattern in bad_json:
        (tmp_path / "m.json").write_text(json.dumps(data))
        with pytest.raises(ManifestError, match=pattern):
            read_manifest(tmp_path / "m.json")
    (tmp_path / "m.json").write_text("[{]")
    with pytest.raises(ManifestError, match="syntax error on line 1"):
        read_manifest(tmp_path / "m.json")


def _json_row(case_id: str, **extra) -> dict:
    return {"case_id": case_id, "patient_id": "P", "timepoint": "1", "image": "i.nii.gz", "prompts": "text:x", **extra}


def test_missing_files_are_not_refused(tmp_path):
    """A missing image or a bad prompt file is the study's failure, not the manifest's."""
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "notes.txt").write_text("a box somewhere")
    path = manifest(tmp_path, "a,P,1,absent.nii.gz,bad.json", "b,P,2,absent/,notes.txt", "c,P,3,x.nii.gz,nope.json")
    a, b, c = read_manifest(path)
    volume = _small_volume()
    with pytest.raises(PromptError, match="valid JSON"):
        study_prompts(a, volume)
    with pytest.raises(PromptError):
        study_prompts(b, volume)
    with pytest.raises(PromptError, match="found nothing"):
        study_prompts(c, volume)


# ---------------------------------------------------------------------------------------------- prompts
def _small_volume(shape=(40, 30, 12)) -> Volume:
    return Volume(np.zeros(shape, np.int16), np.diag([0.8, 0.8, 2.5, 1.0]))


def _study(prompts: PromptSource, **kwargs) -> Study:
    return Study(row=2, case_id="c", patient_id="P", timepoint="1", order=(1, 1.0), image=Path("/x"),
                 prompts=prompts, **kwargs)


def test_prompts_from_labels_synthetic():
    array = np.zeros((40, 30, 12), np.uint8)
    array[5:15, 4:9, 2:7] = 1  # a box: i 5..14, j 4..8, k 2..6, largest everywhere: first slice
    array[8:12, 5:7, 2] = 0
    array[20:31, 10:25, 5:11] = 3
    array[22:36, 12:27, 8] = 3  # slice 8 is its largest: i 20..35 wide, j 10..26
    array[38, 2:6, 4] = 4  # one voxel wide: widened to 2 voxels inside the slice
    labels = Volume(array, np.diag([0.8, 0.8, 2.5, 1.0]),
                    {"segments": {1: {"name": "tumour"}, 3: {"name": "node"}, 7: {"name": "absent"}}})
    objects = prompts_from_labels(labels)
    assert [(o.name, o.label) for o in objects] == [("tumour", 1), ("node", 3), ("label 4", 4)]
    tumour, node, thin = objects
    assert tumour.boxes[0].slice == 3 and tumour.boxes[0].box == (5, 4, 14, 8) and tumour.z_range == (2, 6)
    assert node.boxes[0].slice == 8 and node.boxes[0].box == (20, 10, 35, 26) and node.z_range == (5, 10)
    assert thin.boxes[0].box == (38, 2, 39, 5) and thin.z_range == (4, 4)
    with pytest.raises(PromptError, match="empty label map"):
        prompts_from_labels(Volume(np.zeros((5, 5, 3), np.uint8), np.eye(4)))


def test_study_prompts_on_the_example():
    """Every kind that needs no shared data, on the bundled example (a user's clone)."""
    import medsam3d as m3

    image = m3.load(EXAMPLE / "CT_image.nii.gz")
    objects = study_prompts(_study(PromptSource("file", str(EXAMPLE / "prompts.json"))), image)
    assert [(o.name, o.boxes[0].slice, o.boxes[0].box) for o in objects] == [("sarcoma", 23, (57, 57, 100, 109))]
    (box,) = study_prompts(_study(PromptSource("box", "57,57,100,109@23:10..40")), image)
    assert box.boxes[0].box == (57, 57, 100, 109) and box.z_range == (10, 40)
    (text,) = study_prompts(_study(PromptSource("text", "soft tissue sarcoma")), image)
    assert (text.name, text.text, text.boxes) == ("soft tissue sarcoma", "soft tissue sarcoma", [])
    with pytest.raises(PromptError, match="inside the slice"):
        study_prompts(_study(PromptSource("box", "57,57,400,109@23")), image)
    source = _study(PromptSource("from", "baseline"))
    with pytest.raises(PromptError, match="from:baseline"):
        study_prompts(source, image)
    mask = m3.load(EXAMPLE / "CT_mask.nii.gz")
    (carried,) = study_prompts(source, image, labels_of=lambda case_id: mask)
    k = int(np.argmax((mask.array > 0).sum(axis=(0, 1))))
    ii, jj = np.nonzero(mask.array[:, :, k])
    assert carried.boxes[0].slice == k and carried.boxes[0].box == (ii.min(), jj.min(), ii.max(), jj.max())
    ks = np.flatnonzero(mask.array.any(axis=(0, 1)))
    assert carried.z_range == (ks[0], ks[-1])
    with pytest.raises(Medsam3dError):  # a label map on another grid
        study_prompts(source, image, labels_of=lambda case_id: _small_volume())


def test_study_prompts_rtstruct_real(tmp_path):
    import medsam3d as m3
    from medsam3d.io.rtstruct import load_rtstruct

    folder = shared("ibsi_sts_041/dicom/CT")
    path = manifest(tmp_path, f"ct,STS_041,2006-04-13,{folder / 'image'},{folder / 'mask' / 'RS.dcm'}")
    (study,) = read_manifest(path)
    assert study.prompts.kind == "rtstruct"
    image = m3.load(study.image)
    (gtv,) = study_prompts(study, image)
    assert gtv.name == "GTV_Mass_CT" and gtv.label == 1
    labels = load_rtstruct(folder / "mask" / "RS.dcm", image).array
    k = gtv.boxes[0].slice
    assert (labels[:, :, k] > 0).sum() == (labels > 0).sum(axis=(0, 1)).max()
    ii, jj = np.nonzero(labels[:, :, k])
    assert gtv.boxes[0].box == (ii.min(), jj.min(), ii.max(), jj.max())
    reference = m3.load(shared("ibsi_sts_041/nifti/CT_mask.nii.gz")).array > 0  # the IBSI's own mask
    ks = np.flatnonzero(reference.any(axis=(0, 1)))
    assert abs(gtv.z_range[0] - ks[0]) <= 1 and abs(gtv.z_range[1] - ks[-1]) <= 1


def _make_seg(folder: Path) -> Path:
    """A DICOM SEG (two named segments) on the 3-slice dcmqi CT, written by medsam3d itself."""
    import medsam3d as m3
    from medsam3d.io import load_labels
    from medsam3d.io.dicomseg import write_dicom_seg

    image = m3.load(shared("dcmqi_ct3slice/ct-3slice"))
    labels = load_labels(shared("dcmqi_ct3slice/liver_spine_seg.nrrd"), image)
    named = Volume(labels.array, labels.affine, {"segments": {1: {"name": "liver", "color": (1, 0, 0)},
                                                              2: {"name": "vertebra", "color": (0, 1, 0)}}})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "SEG0001"  # no extension, as PACS exports name files
    write_dicom_seg(named, path, image)
    return path


def test_study_prompts_seg_real(tmp_path):
    import medsam3d as m3

    seg = _make_seg(tmp_path / "seg")
    path = manifest(tmp_path, f"ct,P,1,{shared('dcmqi_ct3slice/ct-3slice')},seg/SEG0001")
    (study,) = read_manifest(path)
    assert study.prompts == PromptSource("seg", str(seg))
    image = m3.load(study.image)
    liver, vertebra = study_prompts(study, image)
    assert (liver.name, liver.label, vertebra.name, vertebra.label) == ("liver", 1, "vertebra", 2)
    assert liver.z_range == (0, 2) and liver.boxes[0].box == (79, 145, 350, 366)
    # an image slice given as prompts: the study fails with what was found
    (bad,) = read_manifest(manifest(tmp_path, f"ct,P,1,x,{shared('dcmqi_ct3slice/ct-3slice/01.dcm')}"))
    assert bad.prompts.kind == "file"
    with pytest.raises(PromptError, match="DICOM CT file"):
        study_prompts(bad, image)


# ---------------------------------------------------------------------------------------------- planner
def _copy_series(source: Path, target: Path, *, prefix: str = "", strip_suffix: bool = False) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for n, f in enumerate(sorted(p for p in source.iterdir() if p.is_file())):
        name = f"{prefix}{n:04d}" if strip_suffix else f"{prefix}{f.name}"
        shutil.copy(f, target / name)


def _localizer(source: Path, target: Path) -> None:
    """Two slices of a copy of ``source`` re-labelled as a localizer series of their own."""
    import pydicom

    target.mkdir(parents=True, exist_ok=True)
    for n, f in enumerate(sorted(source.iterdir())[:2]):
        ds = pydicom.dcmread(str(f))
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.SeriesNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(str(target / f"loc{n}"))


def _pacs_export(root: Path) -> None:
    data = shared("ibsi_sts_041/dicom")
    mixed = root / "STS_041" / "20060413"  # CT and MR slices in one folder, no extensions
    _copy_series(data / "CT" / "image", mixed, prefix="CT", strip_suffix=True)
    _copy_series(data / "MR_T1" / "image", mixed, prefix="MR", strip_suffix=True)
    shutil.copy(data / "CT" / "mask" / "RS.dcm", mixed / "RS_CT")
    shutil.copy(data / "MR_T1" / "mask" / "RS.dcm", root / "STS_041" / "RS_MR")
    _localizer(data / "CT" / "image", mixed)
    _copy_series(shared("totalseg_ct_dicom/example_ct_dicom"), root / "deep" / "a" / "b" / "c")
    _copy_series(shared("dcmqi_ct3slice/ct-3slice"), root / "99000" / "ct")
    _make_seg(root / "99000" / "seg")
    (root / "README.txt").write_text("not DICOM")
    (root / "99000" / "ct" / "DICOMDIR").write_bytes(b"\0" * 200)


def test_plan_manifest_on_a_pacs_export(tmp_path, caplog):
    from medsam3d.batch.plan import PLAN_COLUMNS, plan_manifest

    root = tmp_path / "export"
    _pacs_export(root)
    output = tmp_path / "plan" / "manifest.csv"
    output.parent.mkdir()
    rows = plan_manifest(root, output=output)
    assert [r["case_id"] for r in rows[:3]] == ["99000_20030417_CT_s2", "STS_041_20060413_CT_s3",
                                                "STS_041_20060413_MR_s5598032"]
    assert rows[3]["case_id"].startswith("anonymous-") and rows[3]["case_id"].endswith("_20221208_CT")
    assert output.read_bytes().startswith(b"\xef\xbb\xbf")
    with open(output, encoding="utf-8-sig", newline="") as handle:
        written = list(csv.DictReader(handle))
    assert written == rows and list(written[0]) == list(PLAN_COLUMNS)
    seg, ct, mr, anonymous = rows
    assert ct["image"] == mr["image"] == "../export/STS_041/20060413"  # one folder, two series: the UIDs tell
    assert ct["series_uid"].endswith("699573") and mr["series_uid"].endswith("625887")
    assert ct["prompts"] == "../export/STS_041/20060413/RS_CT"  # by the RTSTRUCT's series reference,
    assert mr["prompts"] == "../export/STS_041/RS_MR"  # though CT and MR share one frame of reference
    assert (ct["timepoint"], ct["modality"], ct["description"]) == ("2006-04-13", "CT", "IBSI_1_STS_041_CT_image")
    assert seg["prompts"] == "../export/99000/seg/SEG0001" and seg["image"] == "../export/99000/ct"
    assert anonymous["prompts"] == "" and anonymous["image"] == "../export/deep/a/b/c"
    assert all(r["study_uid"] or r is anonymous for r in rows)
    assert "no PatientID" in caplog.text
    # once its prompts are filled in, the plan reads back as a manifest
    for row in rows:
        row["prompts"] = row["prompts"] or "100,100,200,200@10"
    with open(output, "w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(PLAN_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    studies = read_manifest(output)
    assert [s.prompts.kind for s in studies] == ["seg", "rtstruct", "rtstruct", "box"]
    assert studies[1].image == root / "STS_041" / "20060413" and studies[1].series_uid == ct["series_uid"]
    assert studies[1].metadata == {"description": "IBSI_1_STS_041_CT_image", "study_uid": ct["study_uid"]}
    assert studies[1].order == studies[2].order  # CT and MR of one day: two modalities, not refused
    import medsam3d as m3

    for study, roi in ((studies[1], "GTV_Mass_CT"), (studies[2], "GTV_Mass_MR_T1")):  # the plan runs as planned
        image = m3.load(study.image, series_uid=study.series_uid)
        assert [o.name for o in study_prompts(study, image)] == [roi]


def test_plan_frame_of_reference_fallback(tmp_path, caplog):
    """An RTSTRUCT without series references prompts the one series of its frame of reference."""
    import logging

    import pydicom

    from medsam3d.batch.plan import plan_manifest

    data = shared("ibsi_sts_041/dicom")
    ds = pydicom.dcmread(str(data / "CT" / "mask" / "RS.dcm"))
    for item in ds.ReferencedFrameOfReferenceSequence:
        del item.RTReferencedStudySequence
    root = tmp_path / "export"
    _copy_series(data / "CT" / "image", root / "ct")
    ds.save_as(str(root / "rs.dcm"))
    (row,) = plan_manifest(root, output=tmp_path / "m.csv", relative_to=tmp_path / "export")
    assert (row["prompts"], row["image"]) == ("rs.dcm", "ct")
    _copy_series(data / "MR_T1" / "image", root / "mr")  # now two series share the frame of reference
    with caplog.at_level(logging.INFO, logger="medsam3d.batch.plan"):
        rows = plan_manifest(root, output=tmp_path / "m.csv", overwrite=True)
    assert [r["prompts"] for r in rows] == ["", ""]
    assert "share its frame of reference" in caplog.text


def test_plan_refusals(tmp_path):
    from medsam3d.batch.plan import plan_manifest

    root = tmp_path / "export"
    root.mkdir()
    (root / "a.txt").write_text("x")
    with pytest.raises(DicomSeriesError) as info:
        plan_manifest(root, output=tmp_path / "m.csv")
    assert "\n" not in str(info.value) and "0 image series" in str(info.value)
    _localizer(shared("ibsi_sts_041/dicom/CT/image"), root / "loc")
    with pytest.raises(DicomSeriesError, match="localizer"):
        plan_manifest(root, output=tmp_path / "m.csv")
    with pytest.raises(VolumeIOError, match="found nothing"):
        plan_manifest(tmp_path / "absent", output=tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("filled in already")
    _copy_series(shared("dcmqi_ct3slice/ct-3slice"), root / "ct")
    with pytest.raises(VolumeIOError, match="existing file"):
        plan_manifest(root, output=tmp_path / "m.csv")
    assert (tmp_path / "m.csv").read_text() == "filled in already"


def test_cli_batch_plan(tmp_path, capsys):
    from medsam3d.cli.batch_plan import _cmd_batch_plan

    root = tmp_path / "export"
    _copy_series(shared("ibsi_sts_041/dicom/CT/image"), root / "ct")
    shutil.copy(shared("ibsi_sts_041/dicom/CT/mask/RS.dcm"), root / "rs")
    _copy_series(shared("dcmqi_ct3slice/ct-3slice"), root / "other")
    args = argparse.Namespace(root=root, output=tmp_path / "m.csv", force=False)
    assert _cmd_batch_plan(args) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "2 series of 2 patient(s), 1 with prompts" in out
    assert "fill in the prompts of 1 row(s)" in out
