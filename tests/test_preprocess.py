import numpy as np
import pytest

import medsam3d as m3
from medsam3d import PromptError
from medsam3d.preprocess import CT_WINDOWS, apply_window, choose_window, guess_modality

from conftest import make_volume, shared


def test_presets_and_explicit_window():
    vol = make_volume()
    w = choose_window(vol, "lung", "CT")
    assert (w.lower, w.upper) == (-600 - 750, -600 + 750) and w.name == "lung"
    w = choose_window(vol, "40,400", "CT")
    assert (w.lower, w.upper) == (-160, 240)
    out = apply_window(np.array([-1000, -160, 40, 240, 3000]), w)
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1])
    assert set(CT_WINDOWS) >= {"soft-tissue", "lung", "bone", "brain", "liver"}
    with pytest.raises(PromptError, match="LEVEL,WIDTH"):
        choose_window(vol, "wide")
    with pytest.raises(PromptError, match="positive"):
        choose_window(vol, "40,-4")


def test_modality_from_header_and_from_intensities():
    ct = m3.load(shared("ibsi_sts_041/nifti/CT_image.nii.gz"))
    mr = m3.load(shared("ibsi_sts_041/nifti/MR_T1_image.nii.gz"))
    assert guess_modality(ct)[0] == "CT" and "intensities" in guess_modality(ct)[1]
    assert guess_modality(mr)[0] == "MR"
    assert choose_window(ct).name == "soft-tissue"
    w = choose_window(mr)
    assert w.method == "percentile" and 0 < w.lower < w.upper
    dicom = m3.load(shared("ibsi_sts_041/dicom/MR_T1/image"))
    assert guess_modality(dicom) == ("MR", "header")
    # an MR-like volume given as CT by the user follows the user
    assert choose_window(mr, modality="CT").name == "soft-tissue"


def test_roi_window_fits_the_prompt_box():
    vol = make_volume()
    values = np.array([10.0, 20.0, 30.0, 40.0, 50.0] * 20)
    w = choose_window(vol, "roi", "CT", roi_values=values)
    span = np.percentile(values, 99) - np.percentile(values, 1)
    assert w.method == "roi"
    assert w.lower == pytest.approx(np.percentile(values, 1) - 0.2 * span)
    assert w.upper == pytest.approx(np.percentile(values, 99) + 0.2 * span)
    with pytest.raises(PromptError, match="prompt boxes"):
        choose_window(vol, "roi", "CT")


def test_a_windowed_volume_reads_what_windowing_the_whole_volume_gives():
    from medsam3d.preprocess import Window, WindowedVolume, apply_window

    array = np.random.default_rng(0).integers(-1024, 2000, (17, 13, 9)).astype(np.int16)[:, ::-1]  # a view
    window = Window("CT", "ct-window", -160.0, 240.0)
    whole = apply_window(array, window)
    lazy = WindowedVolume(array, window)
    assert lazy.shape == whole.shape and lazy.ndim == 3
    for index in (np.s_[:, :, 4], np.s_[3, :, :], np.s_[:, 5, :], np.s_[2:9, 1:7, 0], np.s_[..., 8]):
        assert lazy[index].dtype == np.float32 and np.array_equal(lazy[index], whole[index])


def test_fusion_cleaning_within_the_mask_box_matches_the_whole_volume():
    from scipy import ndimage

    from medsam3d.fuse import fill_holes_per_slice, largest_component

    rng = np.random.default_rng(1)
    for _ in range(5):
        mask = np.zeros((40, 36, 12), bool)
        mask[5:30, 8:33, 2:10] = ndimage.binary_opening(rng.random((25, 25, 8)) > 0.45)
        labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        expected = mask if n <= 1 else labels == int(np.argmax(sizes)) + 1
        assert np.array_equal(largest_component(mask), expected)
        filled = mask.copy()
        for k in range(mask.shape[2]):
            filled[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
        assert np.array_equal(fill_holes_per_slice(mask), filled)
    empty = np.zeros((4, 4, 4), bool)
    assert not largest_component(empty).any() and not fill_holes_per_slice(empty).any()
