import json

import numpy as np
import pytest

from medsam3d import PromptError
from medsam3d.prompts import box_from_ras, load_prompts, parse_box_option, parse_box_ras_option, parse_prompts

from conftest import make_volume


@pytest.fixture
def vol():
    return make_volume(shape=(120, 140, 40), spacing=(0.8, 0.8, 3.0), axcodes="LPS")


def test_issue_example_document(vol):
    doc = {"version": 1, "objects": [
        {"name": "tumor", "slice": 24, "box": [40, 52, 118, 130]},
        {"name": "tumor", "slice": 31, "box": [44, 50, 110, 127]},
        {"name": "node", "slice": 12, "box": [10, 12, 30, 33], "z_range": [8, 17]},
    ]}
    objs = parse_prompts(doc, vol)
    assert [(o.name, o.label) for o in objs] == [("tumor", 1), ("node", 2)]
    assert [b.slice for b in objs[0].boxes] == [24, 31]
    assert objs[1].z_range == (8, 17)
    assert objs[0].boxes[0].box == (40, 52, 118, 130)


@pytest.mark.parametrize("entry, message", [
    ({"slice": 3, "box": [0, 0, 200, 10]}, "inside the slice"),
    ({"slice": 3, "box": [10, 10, 10, 30]}, "at least 2 voxels"),
    ({"slice": 3, "box": [30, 10, 10, 30]}, "min <= max"),
    ({"slice": 40, "box": [0, 0, 5, 5]}, "within 0..39"),
    ({"slice": 3, "box": [0, 0, 5, 5], "colour": "red"}, "unknown"),
    ({"slice": 3, "box": [0, 0, 5]}, "list of 4"),
    ({"slice": 3, "box": [0.5, 0, 5, 5]}, "integer voxel"),
    ({"box": [0, 0, 5, 5]}, "'box' and 'slice'"),
    ({"slice": 3, "box": [0, 0, 5, 5], "z_range": [5, 9]}, "inside its z_range"),
    ({"slice": 3, "box": [0, 0, 5, 5], "z_range": [5, 2]}, "start <= end"),
    # found by trying: these gave an internal error, or slice 1 for 'true', or a nameless object
    ({"slice": True, "box": [0, 0, 5, 5]}, "true/false"),
    ({"slice": 3, "box": [0, 0, 5, 1e999]}, "finite"),
    ({"slice": 3, "box": [0, 0, 5, "NaN"]}, "finite"),
    ({"box_ras": [[0, 0, "NaN"], [1, 1, 1]]}, "finite"),
    ({"box_ras": [[0, 0, "x"], [1, 1, 1]]}, "as numbers"),
    ({"name": "", "slice": 3, "box": [0, 0, 5, 5]}, "non-empty text"),
    ({"name": None, "slice": 3, "box": [0, 0, 5, 5]}, "non-empty text"),
    ({"slice": 3, "box": [0, 0, 5, 5], "label": 0}, "within 1..65535"),
    ({"slice": 3, "box": [0, 0, 5, 5], "label": 2.5}, "integer"),
])
def test_invalid_prompts_are_refused(vol, entry, message):
    with pytest.raises(PromptError, match=message):
        parse_prompts({"version": 1, "objects": [entry]}, vol)


def test_explicit_label_values(vol):
    """'label' was accepted and ignored: objects were numbered 1, 2, ... whatever it said."""
    doc = {"version": 1, "objects": [
        {"name": "tumor", "slice": 3, "box": [0, 0, 5, 5]},
        {"name": "node", "slice": 4, "box": [0, 0, 5, 5], "label": 1},
        {"name": "tumor", "slice": 5, "box": [0, 0, 5, 5]},
        {"name": "mass", "slice": 5, "box": [0, 0, 5, 5]},
        {"name": "cyst", "slice": 5, "box": [0, 0, 5, 5], "label": 300},
    ]}
    objs = parse_prompts(doc, vol)
    assert [(o.name, o.label) for o in objs] == [("tumor", 2), ("node", 1), ("mass", 3), ("cyst", 300)]
    clash = {"version": 1, "objects": [{"name": "a", "slice": 3, "box": [0, 0, 5, 5], "label": 4},
                                       {"name": "b", "slice": 3, "box": [0, 0, 5, 5], "label": 4}]}
    with pytest.raises(PromptError, match="found 4 for both 'a' and 'b'"):
        parse_prompts(clash, vol)
    twice = {"version": 1, "objects": [{"name": "a", "slice": 3, "box": [0, 0, 5, 5], "label": 4},
                                       {"name": "a", "slice": 4, "box": [0, 0, 5, 5], "label": 5}]}
    with pytest.raises(PromptError, match="one label value per object"):
        parse_prompts(twice, vol)


def test_document_level_errors(vol, tmp_path):
    with pytest.raises(PromptError, match="version 1"):
        parse_prompts({"version": 2, "objects": [{"slice": 1, "box": [0, 0, 4, 4]}]}, vol)
    with pytest.raises(PromptError, match="non-empty"):
        parse_prompts({"version": 1, "objects": []}, vol)
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(PromptError, match="valid JSON"):
        load_prompts(bad, vol)
    with pytest.raises(PromptError, match="found nothing"):
        load_prompts(tmp_path / "missing.json", vol)


def test_box_option():
    assert parse_box_option("1,2,30,40@7") == {"name": "object", "slice": 7, "box": [1, 2, 30, 40]}
    assert parse_box_option("1,2,30,40@7:5..9") == {"name": "object", "slice": 7, "box": [1, 2, 30, 40],
                                                      "z_range": [5, 9]}
    for bad in ("1,2,30@7", "1,2,30,40@7:5", "1,2,30,40@7:5-9"):
        with pytest.raises(PromptError, match="i0,j0,i1,j1@k"):
            parse_box_option(bad)
    assert parse_box_ras_option("-12.5,40,100,10,61.5,130") == {
        "name": "object", "box_ras": [[-12.5, 40.0, 100.0], [10.0, 61.5, 130.0]]}
    for bad in ("1,2,3", "1,2,3,4,5,x", "1,2,3,4,5,nan"):
        with pytest.raises(PromptError, match="R0,A0,S0,R1,A1,S1"):
            parse_box_ras_option(bad)


def _slicer_roi(center_lps, size, orientation=(1, 0, 0, 0, 1, 0, 0, 0, 1), **extra):
    """One ROI markup as 3D Slicer 5 writes it to a .mrk.json file (positions in LPS)."""
    return {"type": "ROI", "coordinateSystem": "LPS", "coordinateUnits": "mm", "roiType": "Box",
            "center": list(center_lps), "orientation": list(orientation), "size": list(size),
            "controlPoints": [], "measurements": [], **extra}


@pytest.mark.parametrize("codes", ["LPS", "RAS", "PIR"])
def test_slicer_markups_roi_file(codes, tmp_path):
    """A Slicer ROI saved as .mrk.json gives the box of the same ROI given as box_ras; rotated by 90
    degrees about S with its sizes swapped it is the same box; micrometres and RAS files are read."""
    vol = make_volume(shape=(50, 60, 30), spacing=(0.7, 0.9, 2.5), axcodes=codes)
    a, b = vol.index_to_ras([10, 20, 5]), vol.index_to_ras([30, 41, 17])
    (expected,) = parse_prompts({"version": 1, "objects": [{"name": "mass", "box_ras": [a.tolist(), b.tolist()]}]},
                                vol)
    centre_ras, size = (a + b) / 2, np.abs(b - a)
    centre_lps = centre_ras * [-1, -1, 1]
    rotated = (0, -1, 0, 1, 0, 0, 0, 0, 1)  # the ROI's x axis along A (LPS P), its y axis along -R
    doc = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                      "Schema/markups-schema-v1.0.3.json#",
           "markups": [_slicer_roi(centre_lps, size, name="mass"),
                       _slicer_roi(centre_lps, size[[1, 0, 2]], rotated),
                       _slicer_roi(centre_lps * 1000, size * 1000, coordinateUnits="um"),
                       _slicer_roi(centre_ras, size, coordinateSystem="RAS"),
                       {"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": []}]}
    path = tmp_path / "R.mrk.json"
    path.write_text(json.dumps(doc))
    objects = load_prompts(path, vol)
    assert [o.name for o in objects] == ["mass", "roi 2", "roi 3", "roi 4"]
    assert [o.label for o in objects] == [1, 2, 3, 4]
    for obj in objects:
        assert obj.boxes == expected.boxes and obj.z_range == expected.z_range == (5, 17), obj


def test_slicer_markups_without_a_roi_are_refused(vol):
    points = {"markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": []}]}
    with pytest.raises(PromptError, match="at least one ROI .*found only \\['Fiducial'\\]"):
        parse_prompts(points, vol)
    for markup, message in ((_slicer_roi((0, 0, 0), (5, 5, 5), coordinateSystem="XYZ"), "LPS or RAS"),
                            (_slicer_roi((0, 0, 0), (5, -5, 5)), "size >= 0"),
                            (_slicer_roi((0, 0, float("nan")), (5, 5, 5)), "finite numbers"),
                            ({"type": "ROI", "controlPoints": []}, "'center' and 'size'")):
        with pytest.raises(PromptError, match=message):
            parse_prompts({"markups": [markup]}, vol)


@pytest.mark.parametrize("codes", ["LPS", "RAS", "LAS", "PIR"])
def test_box_ras_maps_to_the_voxels_it_contains(codes):
    vol = make_volume(shape=(50, 60, 30), spacing=(0.7, 0.9, 2.5), axcodes=codes)
    lo_idx, hi_idx = np.array([10, 20, 5]), np.array([30, 41, 17])
    a, b = vol.index_to_ras(lo_idx), vol.index_to_ras(hi_idx)  # voxel centres as ROI corners
    box, z_range = box_from_ras(vol, a, b)
    # the k axis may not be the file's slice axis (PIR): check all three index ranges
    assert (box.box[0], box.box[2]) == (10, 30)
    assert (box.box[1], box.box[3]) == (20, 41)
    assert z_range == (5, 17) and box.slice == 11


def test_box_ras_outside_the_image_is_refused(vol):
    far = vol.index_to_ras([500, 500, 500])
    with pytest.raises(PromptError, match="overlap the image.*check the coordinates are RAS, not LPS"):
        parse_prompts({"version": 1, "objects": [{"name": "m", "box_ras": [far.tolist(), (far + 5).tolist()]}]}, vol)
    # a Slicer ROI states its coordinate system and is converted: RAS vs LPS is not the likely cause
    far_lps = far * [-1, -1, 1]
    with pytest.raises(PromptError, match="overlap the image.*placed on this image") as info:
        parse_prompts({"markups": [_slicer_roi(far_lps, (5, 5, 5))]}, vol)
    assert "LPS" not in str(info.value)


def test_prompt_file_round_trip(vol, tmp_path):
    doc = {"version": 1, "objects": [{"name": "mass", "box_ras": [vol.index_to_ras([5, 6, 7]).tolist(),
                                                                  vol.index_to_ras([25, 26, 17]).tolist()]}]}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    (obj,) = load_prompts(path, vol)
    assert obj.boxes[0].box == (5, 6, 25, 26) and obj.z_range == (7, 17) and obj.boxes[0].slice == 12


def test_cli_joins_minus_signed_coordinates_to_their_option():
    # argparse would take "-12.5,..." or "-.5,..." for an unknown option ("expected one argument")
    from medsam3d.cli import _join_negative_values

    assert _join_negative_values(["segment", "x.nii", "--box-ras", "-12.5,40,100,10,61,130", "-o", "y.nii"]) == [
        "segment", "x.nii", "--box-ras=-12.5,40,100,10,61,130", "-o", "y.nii"]
    assert _join_negative_values(["--box-ras", "-.5,1,2,3,4,5"]) == ["--box-ras=-.5,1,2,3,4,5"]
    assert _join_negative_values(["--box-ras", "1,2,3,4,5,6", "-v"]) == ["--box-ras", "1,2,3,4,5,6", "-v"]
    assert _join_negative_values(["--json", "-1.json"]) == ["--json", "-1.json"]  # other options untouched


def test_version_2_text_objects(vol):
    from medsam3d.prompts import ObjectPrompt

    doc = {"version": 2, "objects": [
        {"name": "liver", "text": "liver"},
        {"name": "lesion", "text": "tumor", "detector": "grounding-dino", "label": 7},
        {"name": "node", "slice": 12, "box": [10, 12, 30, 33], "z_range": [8, 17]},
    ]}
    objs = parse_prompts(doc, vol)
    assert [(o.name, o.label, o.text, o.detector, o.boxes) for o in objs[:2]] == [
        ("liver", 1, "liver", None, []), ("lesion", 7, "tumor", "grounding-dino", [])]
    assert objs[2].text is None and objs[2].label == 2 and objs[2].z_range == (8, 17)
    for obj in objs:
        assert ObjectPrompt.from_dict(json.loads(json.dumps(obj.as_dict()))) == obj
    assert "text" not in objs[2].as_dict()  # version-1 objects are written as before
    assert parse_prompts([{"name": "liver", "text": "liver"}], vol)[0].text == "liver"  # a bare list: version 2


@pytest.mark.parametrize("entry, message", [
    ({"text": "liver"}, "a 'name' in object #1 of a version 2 prompt file"),
    ({"name": "a", "text": "liver", "slice": 3, "box": [0, 0, 5, 5]}, "either 'text' or a box"),
    ({"name": "a", "text": "liver", "box_ras": [[0, 0, 0], [1, 1, 1]]}, "either 'text' or a box"),
    ({"name": "a", "text": "  "}, "non-empty text"),
    ({"name": "a", "text": "liver", "detector": 3}, "'detector' of object #1 \\('a'\\) as a non-empty text"),
    ({"name": "a", "slice": 3, "box": [0, 0, 5, 5], "detector": "x"}, "'detector' with a 'text'"),
    ({"name": "a", "text": "liver", "prompt": "x"}, "unknown \\['prompt'\\]"),
])
def test_invalid_version_2_entries_are_refused(vol, entry, message):
    with pytest.raises(PromptError, match=message):
        parse_prompts({"version": 2, "objects": [entry]}, vol)


def test_text_needs_version_2_and_one_kind_of_prompt_per_object(vol):
    with pytest.raises(PromptError, match="^expected prompt file version 2 for \\['text'\\] in object #1, found "
                                          "version 1; set \"version\": 2"):
        parse_prompts({"version": 1, "objects": [{"name": "liver", "text": "liver"}]}, vol)
    for entries in ([{"name": "a", "text": "liver"}, {"name": "a", "slice": 3, "box": [0, 0, 5, 5]}],
                    [{"name": "a", "slice": 3, "box": [0, 0, 5, 5]}, {"name": "a", "text": "liver"}]):
        with pytest.raises(PromptError, match="either"):
            parse_prompts({"version": 2, "objects": entries}, vol)
    with pytest.raises(PromptError, match="one text per object, found 'liver' and 'spleen'"):
        parse_prompts({"version": 2, "objects": [{"name": "a", "text": "liver"}, {"name": "a", "text": "spleen"}]},
                      vol)
    with pytest.raises(PromptError, match="version 1 or 2, found 3"):
        parse_prompts({"version": 3, "objects": [{"name": "a", "text": "liver"}]}, vol)
