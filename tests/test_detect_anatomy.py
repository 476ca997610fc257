"""The weight-free ``ct-anatomy`` detector on real CT: bones against TotalSegmentator, lungs, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from medsam3d import Volume
from medsam3d.detect import load_detector, resolve_text_prompts
from medsam3d.errors import DetectorError, PromptError
from medsam3d.prompts import ObjectPrompt

from conftest import shared

TOTALSEG = "totalseg_ct_dicom"
BONE_LABELS = [32, 33, 69, 70, *range(97, 104), *range(109, 116)]  # vertebrae T11/T12, humeri, ribs 6-12


def _shared(name):
    return shared(name)


@pytest.fixture(scope="module")
def totalseg():
    import SimpleITK as sitk

    import medsam3d as m3

    volume = m3.load(_shared(f"{TOTALSEG}/example_ct_dicom"))
    seg = sitk.ReadImage(str(_shared(f"{TOTALSEG}/example_seg_dicom.nii.gz")))
    # the reference grid in LPS from the volume's RAS affine; the labels resampled there in world space
    affine = np.asarray(volume.affine, float)
    lps = np.diag([-1.0, -1.0, 1.0])
    matrix = lps @ affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    ref = sitk.Image([int(n) for n in volume.shape], sitk.sitkUInt8)
    ref.SetSpacing(spacing.tolist())
    ref.SetDirection((matrix / spacing).ravel().tolist())
    ref.SetOrigin((lps @ affine[:3, 3]).tolist())
    labels = sitk.GetArrayFromImage(sitk.Resample(seg, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    return volume, labels.transpose(2, 1, 0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_bones_match_totalsegmentator(totalseg):
    volume, labels = totalseg
    detections = load_detector("ct-anatomy").detect(volume, "bones")
    assert len(detections) == 1
    d = detections[0]
    assert d.mask is not None and not d.seed and "classical" in d.source
    assert dice(d.mask, np.isin(labels, BONE_LABELS)) > 0.68
    for group in ([32, 33], [69, 70]):  # vertebrae, humeri: most of each found
        ref = np.isin(labels, group)
        assert (d.mask & ref).sum() / ref.sum() > 0.7


def test_stomach_gas_is_not_lung_and_no_airway_in_an_abdomen(totalseg):
    volume, labels = totalseg
    det = load_detector("ct-anatomy")
    assert det.detect(volume, "lungs") == []  # the slab shows under 1 mL of lung base, and gas in the stomach
    assert det.detect(volume, "trachea") == []
    body = det.detect(volume, "body")[0].mask
    assert body[labels > 0].mean() > 0.99  # every labelled organ lies inside the body
    fat = det.detect(volume, "fat")[0].mask
    assert (fat & np.isin(labels, [5, 1])).sum() < 0.01 * fat.sum()  # not in the liver or the spleen


@pytest.fixture(scope="module")
def thorax():
    import medsam3d as m3

    return m3.load(_shared("dcmqi_ct3slice/ct-3slice"))


def test_lungs_left_and_right(thorax):
    """The 3-slice CT shows both lung bases (checked in a picture): each lung is one box whose side
    follows the patient's left (i grows towards L here)."""
    det = load_detector("ct-anatomy")
    left = det.detect(thorax, "left lung")[0]
    right = det.detect(thorax, "right lung")[0]
    assert left.seed and right.seed and left.z_range == (0, 2)
    assert 15 < left.mask.sum() * thorax.voxel_volume_mm3 / 1000 < 40
    assert left.box[0] > 256 > right.box[2]  # axcodes LPS: larger i is the patient's left
    assert not (left.mask & right.mask).any()
    both = det.detect(thorax, "lungs")[0].mask
    assert (both == (left.mask | right.mask)).all()
    hu = np.clip(thorax.array, -1024, None)
    assert np.median(hu[both]) < -700


def test_unknown_text_lists_vocabulary_and_mr_is_refused(thorax):
    det = load_detector("ct-anatomy")
    for text in ("liver", "", "   "):
        with pytest.raises(DetectorError, match="body, lungs, left lung, right lung, airways, bones, fat"):
            det.detect(thorax, text)
    mr = Volume(np.random.default_rng(0).uniform(0, 800, (32, 32, 8)).astype(np.float32), np.eye(4),
                {"modality": "MR"})
    with pytest.raises(DetectorError, match="CT") as info:
        det.detect(mr, "bones")
    assert "\n" not in str(info.value)
    unlabelled = Volume(mr.array, np.eye(4), {})
    with pytest.raises(DetectorError, match="Hounsfield"):
        load_detector("ct-anatomy").detect(unlabelled, "bones")


def test_lung_boxes_seed_the_engine_and_masks_do_not(thorax):
    det = load_detector("ct-anatomy")
    objects = resolve_text_prompts(thorax, [ObjectPrompt("lung", 1, text="left lung")], det)
    assert objects[0].boxes[0].box == det.detect(thorax, "left lung")[0].box
    assert objects[0].detector == "ct-anatomy (classical)"
    with pytest.raises(PromptError, match="mask only"):
        resolve_text_prompts(thorax, [ObjectPrompt("bone", 1, text="bones")], det)
