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
