"""The zoom check: the crop around small objects is kept only where its masks span their boxes
as well as the whole slices' do (``medsam3d.pipeline.choose_view``), on real cases."""

import numpy as np
import pytest

import medsam3d as m3
from medsam3d.propagate import PropagationConfig
from medsam3d.propagate.boxes import box_fit

from conftest import dice, shared


def test_box_fit_is_the_iou_of_the_masks_box_with_the_prompt():
    mask = np.zeros((40, 40), bool)
    assert box_fit(mask, (5, 5, 14, 14)) == 0.0
    mask[5:15, 5:15] = True
    assert box_fit(mask, (5, 5, 14, 14)) == 1.0
    mask[:] = False
    mask[5:15, 5:10] = True  # half the box
    assert box_fit(mask, (5, 5, 14, 14)) == pytest.approx(0.5)


def _prompt(ref: np.ndarray) -> dict:
    ks = np.flatnonzero(ref.any(axis=(0, 1)))
    k = int((ks[0] + ks[-1]) // 2)
    ii, jj = np.nonzero(ref[:, :, k])
    return {"version": 1, "objects": [{"name": "object", "slice": k, "z_range": [int(ks[0]), int(ks[-1])],
                                       "box": [int(ii.min()), int(jj.min()), int(ii.max()), int(jj.max())]}]}


def test_a_vessel_in_a_whole_abdominal_ct_is_segmented_on_whole_slices(litemedsam):
    # the aorta's crop (3x its box) enlarges it about 5-fold over the whole slice's scale, and the
    # model then keeps about half of it; the check sees the masks fill less of their box there
    image = m3.load(shared("totalseg_ct_dicom/example_ct_dicom"))
    ref = m3.load_labels(shared("totalseg_ct_dicom/example_seg_dicom.nii.gz"), image).array == 52
    result = m3.segment(image, _prompt(ref), model=litemedsam)
    check = result.settings["zoom_check"]
    assert check["chosen"] == "whole" and check["whole_fit"] > check["crop_fit"] and result.settings["crop"] is None
    assert dice(result.labels.array == 1, ref) > 0.9
    unchecked = m3.segment(image, _prompt(ref), model=litemedsam, config=PropagationConfig(zoom_check=False))
    assert unchecked.settings["crop"] is not None and unchecked.settings["zoom_check"] is None
    assert dice(unchecked.labels.array == 1, ref) < dice(result.labels.array == 1, ref) - 0.1
    assert check["extra_encoded"] == 1  # the key slice, on the crop: counted in the slices encoded


def test_a_small_brain_lesion_keeps_its_crop(litemedsam):
    image = m3.load(shared("pyradiomics/brain2_image.nrrd"))
    ref = m3.load_labels(shared("pyradiomics/brain2_label.nrrd"), image).array == 1
    result = m3.segment(image, _prompt(ref), model=litemedsam)
    check = result.settings["zoom_check"]
    assert check["chosen"] == "crop" and check["crop_fit"] >= check["whole_fit"] and result.settings["crop"]
    assert check["extra_encoded"] == 1  # the key slice, on the whole slice
    assert dice(result.labels.array == 1, ref) > 0.65
