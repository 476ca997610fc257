"""Follow-up over time: rigid registration on a real CT, prompt transfer, lesion matching and the
RECIST 1.1 / volumetric arithmetic on patients whose answer is known by hand."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from conftest import shared

from medsam3d import Volume
from medsam3d.errors import FollowUpError, Medsam3dError
from medsam3d.followup import DEFAULT_THRESHOLDS, VolumetricThresholds, follow_up, register_rigid, transfer_prompts
from medsam3d.followup.register import rotation_angle_deg, sitk_affine

log = logging.getLogger(__name__)

CT = "ibsi_sts_041/nifti/CT_image.nii.gz"
MASK = "ibsi_sts_041/nifti/CT_mask.nii.gz"

# the synthetic motion: degrees about R, A, S (through the image centre), then a shift in mm (|t| = 10.5 mm)
ANGLES_DEG = (3.0, -2.0, 4.0)
SHIFT_MM = (6.0, -5.0, 7.0)


# ------------------------------------------------------------------------------------------------ helpers
def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    out = np.eye(3)
    out[i, i] = out[j, j] = c
    out[i, j], out[j, i] = -s, s
    return out


def _resample(volume: Volume, grid: Volume, matrix: np.ndarray, *, labels: bool = False) -> Volume:
    """``volume`` seen on ``grid`` through ``matrix`` (grid RAS point -> ``volume`` RAS point)."""
    import SimpleITK as sitk

    from medsam3d.io._sitk import from_sitk, to_sitk

    if labels:
        image = sitk.Resample(to_sitk(volume), to_sitk(grid), sitk_affine(matrix), sitk.sitkNearestNeighbor, 0)
    else:
        image = sitk.Resample(to_sitk(volume), to_sitk(grid), sitk_affine(matrix), sitk.sitkLinear, -1000.0,
                              sitk.sitkFloat32)
    return from_sitk(image)


@pytest.fixture(scope="module")
def synthetic():
    """The CT (baseline), a follow-up made from it by a known rigid motion, on a grid cropped by 15, 15
    and 4 voxels on each side (another field of view, all of it inside the moved baseline), the true
    matrix (follow-up RAS -> baseline RAS) and the reference mask."""
    from medsam3d.io import load, load_labels

    ct = load(shared(CT))
    mask = load_labels(shared(MASK), reference=ct)
    rotation = _rotation(0, ANGLES_DEG[0]) @ _rotation(1, ANGLES_DEG[1]) @ _rotation(2, ANGLES_DEG[2])
    centre = ct.index_to_ras((np.array(ct.shape) - 1) / 2.0)
    truth = np.eye(4)
    truth[:3, :3] = rotation
    truth[:3, 3] = centre + np.array(SHIFT_MM) - rotation @ centre
    crop = np.array([15, 15, 4])
    affine = np.array(ct.affine)
    affine[:3, 3] = ct.index_to_ras(crop)
    grid = Volume(np.zeros(tuple(np.array(ct.shape) - 2 * crop), np.float32), affine)
    followup = _resample(ct, grid, truth)
    return ct, followup, truth, mask


@pytest.fixture(scope="module")
def transferred(synthetic):
    """The reference mask carried onto the follow-up through a fresh registration (done once)."""
    ct, followup, _, mask = synthetic
    return transfer_prompts(mask, ct, followup)


# ------------------------------------------------------------------------------------------------ (a) registration
@pytest.mark.shared_data
def test_registration_recovers_a_known_rigid_motion(synthetic, transferred):
    ct, followup, truth, mask = synthetic
    _, entry = transferred
    assert entry["method"] == "rigid" and entry["note"] is None and entry["metric"] < -0.5
    found = np.array(entry["matrix"])
    rotation_error = rotation_angle_deg(found[:3, :3] @ truth[:3, :3].T)
    centre = followup.index_to_ras((np.array(followup.shape) - 1) / 2.0)
    centre_error = float(np.linalg.norm(found[:3, :3] @ centre + found[:3, 3] - (truth[:3, :3] @ centre + truth[:3, 3])))
    # the tumour's voxels, where the displacement matters
    tumour = ct.index_to_ras(np.argwhere(mask.array > 0))
    inverse = np.linalg.inv(truth)
    points = tumour @ inverse[:3, :3].T + inverse[:3, 3]  # follow-up points of the tumour
    tumour_error = float(np.linalg.norm(points @ (found[:3, :3] - truth[:3, :3]).T + found[:3, 3] - truth[:3, 3],
                                        axis=1).max())
    log.info("registration errors: rotation %.4f deg, translation at the image centre %.4f mm, max over the "
             "tumour %.4f mm (true motion %.2f deg, %.2f mm)", rotation_error, centre_error, tumour_error,
             rotation_angle_deg(truth[:3, :3]), np.linalg.norm(SHIFT_MM))
    assert rotation_error < 1.0
    assert centre_error < 1.0
    assert tumour_error < 1.0


def test_registration_without_images_or_when_asked_not_to_is_identity():
    lesion = _lesion("tumour", 30.0)
    studies = [_study("b", 0, [lesion]), _study("f", 1, [lesion])]
    for kwargs in ({"register": False}, {}):
        entry = follow_up(studies, **kwargs)[0]["registration"][0]
        assert entry["method"] == "identity" and entry["matrix"] == np.eye(4).tolist() and entry["metric"] is None
        assert entry["note"] and ("register=False" in entry["note"] or "load_image=None" in entry["note"])


def test_registration_falls_back_to_identity_with_a_note(monkeypatch):
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    baseline = Volume(rng.normal(size=(24, 24, 12)).astype(np.float32), affine)
    blank = Volume(np.zeros((24, 24, 12), np.float32), affine)
    result = register_rigid(blank, baseline)
    assert result.method == "identity" and np.array_equal(result.matrix, np.eye(4)) and result.metric is None
    assert "one value only" in result.note and "identity used" in result.note

    def fail(self, fixed, moving):
        raise RuntimeError("Exception thrown in SimpleITK ImageRegistrationMethod_Execute: ...\n"
                           "ITK ERROR: MattesMutualInformation(0x55d0c0ffee): Too many samples map outside")

    monkeypatch.setattr(sitk.ImageRegistrationMethod, "Execute", fail)
    result = register_rigid(baseline, baseline)
    assert result.method == "identity" and result.note.startswith("rigid registration failed")
    assert "0x55d0" not in result.note and "\n" not in result.note


def test_follow_up_registers_through_load_image():
    """load_image is called with case ids; a load failure gives identity with the reason."""
    calls = []

    def load(case_id):
        calls.append(case_id)
        raise FollowUpError(f"expected an image for {case_id}, found none")

    studies = [_study("b", 0, [_lesion("t", 30.0)]), _study("f", 1, [_lesion("t", 30.0)])]
    entry = follow_up(studies, load_image=load)[0]["registration"][0]
    assert calls and entry["method"] == "identity" and "could not be loaded" in entry["note"]


# ------------------------------------------------------------------------------------------------ (b) transfer
@pytest.mark.shared_data
def test_transfer_boxes_the_moved_mask(synthetic, transferred):
    _, followup, truth, mask = synthetic
    prompts, entry = transferred
    expected = _resample(mask, followup, truth, labels=True).array > 0
    assert len(prompts) == 1
    prompt = prompts[0]
    assert prompt.label == 1 and prompt.name == "label 1" and len(prompt.boxes) == 1
    box = prompt.boxes[0]
    on_slice = expected[:, :, box.slice]
    ii, jj = np.flatnonzero(on_slice.any(axis=1)), np.flatnonzero(on_slice.any(axis=0))
    want = (ii[0], jj[0], ii[-1], jj[-1])
    log.info("transferred box %s on slice %d, z_range %s; the moved mask's box there %s, its slices %s", box.box,
             box.slice, prompt.z_range, want, (np.flatnonzero(expected.any(axis=(0, 1)))[[0, -1]]).tolist())
    i0, j0, i1, j1 = box.box
    assert i0 <= want[0] + 2 and j0 <= want[1] + 2 and i1 >= want[2] - 2 and j1 >= want[3] - 2
    assert max(abs(i0 - want[0]), abs(j0 - want[1]), abs(i1 - want[2]), abs(j1 - want[3])) <= 2
    ks = np.flatnonzero(expected.any(axis=(0, 1)))
    assert abs(prompt.z_range[0] - ks[0]) <= 1 and abs(prompt.z_range[1] - ks[-1]) <= 1
    assert set(entry) == REGISTRATION_KEYS
    json.dumps(entry, allow_nan=False)
    # the prompt is one the prompt parser takes back on the follow-up's grid
    from medsam3d.prompts import parse_prompts

    parsed = parse_prompts({"version": 1, "objects": [{"name": prompt.name, "label": prompt.label, "slice": box.slice,
                                                        "box": list(box.box), "z_range": list(prompt.z_range)}]},
                           followup)
    assert parsed[0].boxes[0].box == box.box


def test_transfer_names_objects_and_refuses_one_outside_the_target():
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    image = Volume(np.zeros((40, 40, 10), np.float32), affine)
    labels = np.zeros((40, 40, 10), np.uint8)
    labels[5:12, 6:10, 2:5] = 1
    labels[20:30, 22:34, 4:9] = 3
    segmented = Volume(labels, affine, {"segments": {3: {"name": "liver/seg3"}}})
    prompts, entry = transfer_prompts(segmented, image, image, register=False)
    assert [(p.name, p.label) for p in prompts] == [("label 1", 1), ("liver/seg3", 3)]
    assert prompts[0].boxes[0].box == (5, 6, 11, 9) and prompts[0].z_range == (2, 4)
    assert prompts[1].boxes[0].box == (20, 22, 29, 33) and prompts[1].z_range == (4, 8)
    assert entry["method"] == "identity" and "register=False" in entry["note"]
    far = Volume(np.zeros((40, 40, 10), np.float32), affine @ _translation(500.0, 0.0, 0.0))
    with pytest.raises(FollowUpError, match="entirely outside") as info:
        transfer_prompts(segmented, image, far, register=False)
    assert isinstance(info.value, Medsam3dError) and "\n" not in str(info.value)


def _translation(x: float, y: float, z: float) -> np.ndarray:
    out = np.eye(4)
    out[:3, 3] = (x, y, z)
    return out


# ------------------------------------------------------------------------------------------------ (c) arithmetic
def _lesion(name: str, long_mm: float | None, *, short: float | None = None, volume: float | None = None,
            at=(0.0, 0.0, 0.0), label: int = 1, **extra) -> dict:
    """A lesion dict as the batch runner builds it; the volume defaults to a sphere of the long axis."""
    if volume is None and long_mm is not None:
        volume = math.pi / 6 * long_mm**3 / 1000.0
    return {"label": label, "name": name, "volume_ml": volume, "long_axis_mm": long_mm,
            "short_axis_mm": short if short is not None else (None if long_mm is None else 0.7 * long_mm),
            "max_diameter_3d_mm": long_mm, "centroid_ras": list(at), "touches_border": False, "flags": [], **extra}


def _study(case_id: str, order: int, lesions, *, patient: str = "P1", modality: str | None = "CT",
           transferred: bool = False, **extra) -> dict:
    return {"case_id": case_id, "patient_id": patient, "timepoint": f"T{order}", "order": [1, float(order)],
            "modality": modality, "lesions": lesions, "prompts_transferred": transferred, **extra}


def _run(*timepoints, thresholds=DEFAULT_THRESHOLDS) -> dict:
    studies = [_study(f"c{n}", n, lesions) for n, lesions in enumerate(timepoints)]
    results = follow_up(studies, register=False, thresholds=thresholds)
    assert len(results) == 1
    return results[0]


def _categories(result: dict, key: str = "recist") -> list[str]:
    return [r[key] for r in result["response"]]


FAR = (100.0, 0.0, 0.0)


def test_partial_response_at_minus_30_percent():
    result = _run([_lesion("a", 50.0, label=1), _lesion("b", 30.0, at=FAR, label=2)],
                  [_lesion("a", 35.0, label=1), _lesion("b", 21.0, at=FAR, label=2)])
    assert _categories(result) == ["baseline", "PR"]
    assert result["response"][0]["sum_diameters_mm"] == 80.0 and result["response"][1]["sum_diameters_mm"] == 56.0
    assert result["response"][1]["change_vs_baseline_pct"] == -30.0
    assert [les["diameter_change_vs_baseline_pct"] for les in result["lesions"]] == [[None, -30.0], [None, -30.0]]
    near = _run([_lesion("a", 50.0), _lesion("b", 30.0, at=FAR)], [_lesion("a", 36.0), _lesion("b", 21.0, at=FAR)])
    assert _categories(near) == ["baseline", "SD"]  # -28.75 %


def test_progression_needs_20_percent_and_5_mm():
    assert _categories(_run([_lesion("a", 30.0)], [_lesion("a", 36.0)])) == ["baseline", "PD"]  # +20 %, +6 mm
    small = _run([_lesion("a", 20.0)], [_lesion("a", 24.0)])  # +20 % but +4 mm
    assert _categories(small) == ["baseline", "SD"]
    assert small["response"][1]["change_vs_nadir_pct"] == 20.0
    assert _categories(_run([_lesion("a", 30.0)], [_lesion("a", 35.9)])) == ["baseline", "SD"]  # +19.7 %


def test_new_lesion_is_progression_and_unmatched_lesions_are_new_or_disappeared():
    result = _run([_lesion("a", 30.0), _lesion("b", 20.0, at=FAR, label=2)],
                  [_lesion("a", 30.0), _lesion("c", 8.0, at=(0.0, 80.0, 0.0), label=2)])
    assert _categories(result) == ["baseline", "PD"]
    assert result["response"][1]["new_lesions"] == ["L3"]
    assert result["response"][1]["recist_reason"] == "new lesion(s) present: L3"
    statuses = {les["track"]: [p["status"] for p in les["by_timepoint"]] for les in result["lesions"]}
    assert statuses == {"L1": ["baseline", "present"], "L2": ["baseline", "disappeared"], "L3": ["new"]}
    gone = result["lesions"][1]["by_timepoint"][1]
    assert gone == {"case_id": "c1", "label": None, "volume_ml": 0.0, "diameter_mm": 0.0, "status": "disappeared"}
    new = result["lesions"][2]
    assert new["by_timepoint"][0]["case_id"] == "c1" and not new["target"]
    assert new["volume_change_vs_baseline_pct"] == [None, None]
    assert result["response"][1]["volumetric"] == "PD"


def test_complete_response_with_a_node_under_10_mm():
    result = _run([_lesion("liver", 30.0), _lesion("lymph node", 25.0, short=16.0, at=FAR, label=2)],
                  [_lesion("lymph node", 20.0, short=8.0, at=FAR, label=2)])
    assert _categories(result) == ["baseline", "CR"]
    assert _categories(result, "volumetric") == ["baseline", "CR"]
    assert result["response"][1]["sum_diameters_mm"] == 8.0  # a node keeps its actual short axis
    node = result["lesions"][1]
    assert node["lymph_node"] and node["organ"] == "lymph node" and node["by_timepoint"][1]["diameter_mm"] == 8.0
    # a node at 10 mm is not normal: no CR
    assert _categories(_run([_lesion("node", 25.0, short=16.0)], [_lesion("node", 20.0, short=10.0)])) == \
        ["baseline", "PR"]


def test_target_complete_response_with_a_non_target_left_is_partial_response():
    result = _run([_lesion("a", 30.0), _lesion("small", 8.0, at=FAR, label=2)],
                  [_lesion("small", 8.0, at=FAR, label=2)])
    assert [les["target"] for les in result["lesions"]] == [True, False]
    assert _categories(result) == ["baseline", "PR"]


def test_nodes_are_measured_on_the_short_axis():
    result = _run([_lesion("lymph node 1", 30.0, short=12.0), _lesion("node 2", 20.0, short=15.0, at=FAR, label=2),
                   _lesion("mass", 9.5, at=(0.0, 100.0, 0.0), label=3),
                   _lesion("flagged", 40.0, short=11.0, lymph_node=True, at=(0.0, -100.0, 0.0), label=4)],
                  [_lesion("lymph node 1", 30.0, short=12.0), _lesion("node 2", 20.0, short=15.0, at=FAR, label=2),
                   _lesion("mass", 9.5, at=(0.0, 100.0, 0.0), label=3),
                   _lesion("flagged", 40.0, short=11.0, lymph_node=True, at=(0.0, -100.0, 0.0), label=4)])
    flags = [(les["name"], les["lymph_node"], les["measurable"], les["target"]) for les in result["lesions"]]
    assert flags == [("lymph node 1", True, False, False), ("node 2", True, True, True), ("mass", False, False, False),
                     ("flagged", True, False, False)]
    assert result["response"][0]["sum_diameters_mm"] == 15.0


def test_five_targets_at_most_and_two_per_organ():
    names = [("liver/a", 50.0), ("liver/b", 45.0), ("liver: c", 40.0), ("lung:a", 35.0), ("lung:b", 30.0),
             ("bone", 25.0), ("adrenal", 20.0), ("spleen", 15.0, {"organ": "liver"})]
    lesions = [_lesion(n[0], n[1], at=(60.0 * i, 0.0, 0.0), label=i + 1, **(n[2] if len(n) > 2 else {}))
               for i, n in enumerate(names)]
    result = _run(lesions, lesions)
    chosen = [les["name"] for les in result["lesions"] if les["target"]]
    assert chosen == ["liver/a", "liver/b", "lung:a", "lung:b", "bone"]
    assert [les["organ"] for les in result["lesions"]] == ["liver", "liver", "liver", "lung", "lung", "bone",
                                                           "adrenal", "liver"]
    assert result["response"][0]["sum_diameters_mm"] == 185.0


def test_progression_is_judged_against_the_nadir_and_response_against_baseline():
    result = _run([_lesion("a", 100.0)], [_lesion("a", 60.0)], [_lesion("a", 72.0)])
    assert _categories(result) == ["baseline", "PR", "PD"]  # -28 % vs baseline but +20 % / +12 mm vs nadir 60
    assert [r["change_vs_nadir_pct"] for r in result["response"]] == [None, -40.0, 20.0]
    assert [r["change_vs_baseline_pct"] for r in result["response"]] == [None, -40.0, -28.0]
    still = _run([_lesion("a", 100.0)], [_lesion("a", 60.0)], [_lesion("a", 71.0)])
    assert _categories(still) == ["baseline", "PR", "SD"]  # -29 % vs baseline, +18.3 % vs nadir
    # the nadir includes the baseline: growth from baseline straight away
    assert _categories(_run([_lesion("a", 50.0)], [_lesion("a", 55.0)], [_lesion("a", 60.0)])) == \
        ["baseline", "SD", "PD"]


def test_volumetric_categories_at_the_thresholds():
    assert DEFAULT_THRESHOLDS.as_dict() == {"pr_pct": -65.7, "pd_pct": 72.8}
    assert round((0.7**3 - 1) * 100, 1) == -65.7 and round((1.2**3 - 1) * 100, 1) == 72.8

    def volumetric(before: float, after: float, thresholds=DEFAULT_THRESHOLDS) -> tuple[str, str]:
        result = _run([_lesion("a", 30.0, volume=before)], [_lesion("a", 30.0, volume=after)], thresholds=thresholds)
        return result["response"][1]["volumetric"], result["response"][1]["recist"]

    assert volumetric(10.0, 3.43) == ("PR", "SD")
    assert volumetric(10.0, 3.44) == ("SD", "SD")
    assert volumetric(10.0, 17.28) == ("PD", "SD")
    assert volumetric(10.0, 17.27) == ("SD", "SD")
    loose = VolumetricThresholds(pr_pct=-50.0, pd_pct=40.0)
    assert volumetric(10.0, 5.0, loose) == ("PR", "SD") and volumetric(10.0, 14.0, loose) == ("PD", "SD")
    result = _run([_lesion("a", 30.0, volume=10.0)], [_lesion("a", 30.0, volume=5.0)], [_lesion("a", 30.0, volume=9.0)])
    assert _categories(result, "volumetric") == ["baseline", "SD", "PD"]  # -10 % vs baseline, +80 % vs nadir 5 mL
    assert result["response"][2]["volume_change_vs_nadir_pct"] == 80.0
    assert result["response"][2]["volume_change_vs_baseline_pct"] == -10.0
    assert result["lesions"][0]["volume_change_vs_nadir_pct"] == [None, -50.0, 80.0]
    with pytest.raises(FollowUpError):
        VolumetricThresholds(pr_pct=10.0)


def test_a_target_that_cannot_be_measured_is_not_evaluable():
    result = _run([_lesion("a", 30.0), _lesion("b", 20.0, at=FAR, label=2)],
                  [_lesion("a", None, volume=None), _lesion("b", 20.0, at=FAR, label=2)])
    assert _categories(result) == ["baseline", "NE"] and _categories(result, "volumetric") == ["baseline", "NE"]
    assert result["response"][1]["sum_diameters_mm"] is None
    # ... unless the measured targets alone make progression
    grown = _run([_lesion("a", 30.0), _lesion("b", 20.0, at=FAR, label=2)],
                 [_lesion("a", None, volume=None), _lesion("b", 70.0, at=FAR, label=2)])
    assert _categories(grown) == ["baseline", "PD"]
    failed = follow_up([_study("b", 0, [_lesion("a", 30.0)]), _study("f", 1, None)], register=False)[0]
    assert _categories(failed) == ["baseline", "NE"]


def test_tracks_chain_through_time_points_and_use_the_registration():
    # the lesion drifts 8 mm per time point: 16 mm from baseline at T2, within the gate of its T1 position
    result = _run([_lesion("x", 12.0)], [_lesion("y", 12.0, at=(8.0, 0.0, 0.0))], [_lesion("z", 12.0, at=(16.0, 0, 0))])
    assert len(result["lesions"]) == 1
    assert [p["status"] for p in result["lesions"][0]["by_timepoint"]] == ["baseline", "present", "present"]
    # the follow-up is shifted 50 mm to the left of the baseline; its registration maps it back
    shift = _translation(50.0, 0.0, 0.0).tolist()
    studies = [_study("b", 0, [_lesion("a", 20.0)]),
               _study("f", 1, [_lesion("b", 20.0, at=(-50.0, 0.0, 0.0))],
                      registration={"case_id": "f", "to": "b", "method": "rigid", "metric": -1.0, "matrix": shift,
                                    "note": None})]
    result = follow_up(studies)[0]
    assert len(result["lesions"]) == 1 and result["registration"][0]["matrix"] == shift
    # matching by name when prompts were transferred, whatever the distance; a disappearing named object
    studies = [_study("b", 0, [_lesion("liver/1", 20.0), _lesion("lung/1", 15.0, at=FAR, label=2)]),
               _study("f", 1, [_lesion("lung/1", 15.0, at=(0.0, 0.0, 0.0), label=2),
                               _lesion("liver/1", 0.0, volume=0.0, at=(0.0, 0.0, 0.0))], transferred=True)]
    result = follow_up(studies, register=False)[0]
    assert [[p["status"] for p in les["by_timepoint"]] for les in result["lesions"]] == \
        [["baseline", "disappeared"], ["baseline", "present"]]
    assert result["lesions"][0]["by_timepoint"][1]["label"] == 1
    assert result["prompts_transferred"] is True
    assert any("new lesions cannot have been found" in n for n in result["response"][1]["notes"])
    # a name given at a later time point carries over too (prompts transferred from that time point)
    studies = [_study("b", 0, [_lesion("a", 20.0)]), _study("f1", 1, [_lesion("renamed", 20.0, at=(5.0, 0, 0))]),
               _study("f2", 2, [_lesion("renamed", 20.0, at=(60.0, 0, 0))], transferred=True)]
    result = follow_up(studies, register=False)[0]
    assert len(result["lesions"]) == 1 and result["lesions"][0]["name"] == "a"


def test_distance_gate_and_one_to_one_assignment():
    # two lesions swap names; positions decide when names were not carried over
    base = [_lesion("a", 30.0, at=(0.0, 0.0, 0.0)), _lesion("b", 30.0, at=(40.0, 0.0, 0.0), label=2)]
    follow = [_lesion("p", 30.0, at=(38.0, 0.0, 0.0)), _lesion("q", 30.0, at=(3.0, 0.0, 0.0), label=2)]
    result = _run(base, follow)
    assert [les["by_timepoint"][1]["label"] for les in result["lesions"]] == [2, 1]
    # 16 mm away, long axes 20 mm: gate max(10, 10) = 10 mm -> a new lesion and a disappeared one
    result = _run([_lesion("a", 20.0)], [_lesion("a2", 20.0, at=(16.0, 0.0, 0.0))])
    assert [les["track"] for les in result["lesions"]] == ["L1", "L2"]
    # ... but a 40 mm lesion has a 20 mm gate
    assert len(_run([_lesion("a", 40.0)], [_lesion("a2", 40.0, at=(16.0, 0.0, 0.0))])["lesions"]) == 1


def test_border_note_grouping_and_order():
    studies = [_study("mr1", 2, [_lesion("a", 30.0)], modality="MR"),
               _study("ct2", 1, [_lesion("a", 30.0, touches_border=True)]),
               _study("ct1", 0, [_lesion("a", 30.0)]),
               _study("q1", 0, [_lesion("a", 30.0)], patient="P2")]
    results = follow_up(studies, register=False)
    assert [(r["patient_id"], r["modality"], r["baseline"]) for r in results] == \
        [("P1", "MR", "mr1"), ("P1", "CT", "ct1"), ("P2", "CT", "q1")]
    ct = results[1]
    assert [t["case_id"] for t in ct["timepoints"]] == ["ct1", "ct2"]
    assert any("touches the image border" in n for n in ct["response"][1]["notes"])
    assert ct["prompts_transferred"] is False
    with pytest.raises(FollowUpError, match="expected the keys"):
        follow_up([{"case_id": "x"}])


# ------------------------------------------------------------------------------------------------ (d) the output
TOP_KEYS = {"patient_id", "modality", "baseline", "timepoints", "registration", "lesions", "response",
            "prompts_transferred", "rules"}
TIMEPOINT_KEYS = {"case_id", "timepoint", "order"}
REGISTRATION_KEYS = {"case_id", "to", "method", "metric", "matrix", "note"}
LESION_KEYS = {"track", "name", "organ", "lymph_node", "measurable", "target", "by_timepoint",
               "volume_change_vs_baseline_pct", "volume_change_vs_nadir_pct", "diameter_change_vs_baseline_pct"}
POINT_KEYS = {"case_id", "label", "volume_ml", "diameter_mm", "status"}
RESPONSE_KEYS = {"case_id", "timepoint", "sum_diameters_mm", "change_vs_baseline_pct", "change_vs_nadir_pct",
                 "recist", "recist_reason", "total_volume_ml", "volume_change_vs_baseline_pct",
                 "volume_change_vs_nadir_pct", "volumetric", "volumetric_reason", "new_lesions", "notes"}
RULE_KEYS = {"matching", "recist", "volumetric", "thresholds"}
CATEGORIES = {"baseline", "CR", "PR", "SD", "PD", "NE"}


def test_output_is_json_with_exactly_the_spec_keys():
    studies = [_study("b", 0, [_lesion("a", 30.0), _lesion("node", 25.0, short=16.0, at=FAR, label=2)]),
               _study("f1", 1, [_lesion("a", float("nan"), volume=float("nan")),
                                _lesion("new", 9.0, at=(0.0, 90.0, 0.0), label=3)]),
               _study("f2", 2, [_lesion("a", 12.0)], transferred=True)]
    results = follow_up(studies, register=False)
    text = json.dumps(results, allow_nan=False)
    assert json.loads(text) == results
    (result,) = results
    assert set(result) == TOP_KEYS
    assert all(set(t) == TIMEPOINT_KEYS for t in result["timepoints"])
    assert len(result["registration"]) == 2 and all(set(r) == REGISTRATION_KEYS for r in result["registration"])
    assert all(set(les) == LESION_KEYS for les in result["lesions"])
    assert all(set(p) == POINT_KEYS for les in result["lesions"] for p in les["by_timepoint"])
    assert all(len(les[k]) == 3 for les in result["lesions"] for k in LESION_KEYS if k.endswith("_pct"))
    assert all(set(r) == RESPONSE_KEYS for r in result["response"])
    assert {r["recist"] for r in result["response"]} | {r["volumetric"] for r in result["response"]} <= CATEGORIES
    assert {p["status"] for les in result["lesions"] for p in les["by_timepoint"]} <= \
        {"baseline", "present", "new", "disappeared"}
    assert set(result["rules"]) == RULE_KEYS and result["rules"]["thresholds"] == {"pr_pct": -65.7, "pd_pct": 72.8}
    assert result["timepoints"][0] == {"case_id": "b", "timepoint": "T0", "order": [1, 0.0]}


def test_a_lesion_back_after_complete_response_is_progression():
    """RECIST 1.1: after CR, any lesion reappearing is PD, even far below +20 % / +5 mm over a nadir of 0."""
    studies = [_study("c0", 0, [_lesion("a", 30.0)]), _study("c1", 1, [_lesion("a", 0.0, volume=0.0)]),
               _study("c2", 2, [_lesion("a", 4.0)])]
    result = follow_up(studies, register=False)[0]
    assert _categories(result) == ["baseline", "CR", "PD"]
    assert "reappeared after CR" in result["response"][2]["recist_reason"]
    assert _categories(result, "volumetric") == ["baseline", "CR", "PD"]
