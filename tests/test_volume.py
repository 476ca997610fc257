import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medsam3d import GeometryError, Volume, reorient
from medsam3d.io import from_nibabel, from_sitk, to_nibabel, to_sitk
from medsam3d.volume import display_axcodes, on_grid

from conftest import make_volume

CODES = ["RAS", "LPS", "LAS", "PIR", "SLA", "IRP", "ASL"]


@pytest.mark.parametrize("codes", CODES)
@pytest.mark.parametrize("oblique", [0.0, 17.0])
def test_sitk_and_nibabel_bridges_are_exact(codes, oblique):
    vol = make_volume(axcodes=codes, oblique_deg=oblique)
    for back in (from_sitk(to_sitk(vol)), from_nibabel(to_nibabel(vol))):
        assert np.array_equal(back.array, vol.array)
        np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
        assert back.axcodes == vol.axcodes


def test_sitk_geometry_is_lps_of_the_ras_affine():
    vol = make_volume(axcodes="LPS", spacing=(0.5, 0.8, 3.0))
    img = to_sitk(vol)
    # a voxel's physical point in ITK (LPS) is the RAS point with x and y negated
    ijk = (3, 5, 7)
    lps = np.array(img.TransformIndexToPhysicalPoint(ijk))
    ras = vol.index_to_ras(ijk)
    np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-9)
    assert img.GetSize() == vol.shape
    assert img.GetPixel(*ijk) == vol.array[ijk]


def test_derived_geometry():
    vol = make_volume(axcodes="LPS", spacing=(0.5, 0.8, 3.0))
    assert vol.axcodes == ("L", "P", "S")
    np.testing.assert_allclose(vol.spacing, (0.5, 0.8, 3.0))
    assert vol.voxel_volume_mm3 == pytest.approx(1.2)
    np.testing.assert_allclose(vol.ras_to_index(vol.index_to_ras([[1, 2, 3]])), [[1, 2, 3]], atol=1e-9)
    assert not vol.is_oblique
    assert make_volume(oblique_deg=20).is_oblique


@pytest.mark.parametrize("bad", [np.zeros((4, 4)), np.eye(3), np.full((4, 4), np.nan)])
def test_invalid_affine_is_refused(bad):
    with pytest.raises(GeometryError, match="expected"):
        Volume(np.zeros((2, 2, 2)), bad)


def test_2d_array_is_refused():
    with pytest.raises(GeometryError, match="expected a 3D"):
        Volume(np.zeros((2, 2)), np.eye(4))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(CODES), st.sampled_from(CODES), st.floats(0, 40))
def test_reorient_is_exact_and_invertible(src, dst, oblique):
    vol = make_volume(axcodes=src, oblique_deg=oblique, shape=(5, 6, 7))
    out, reo = reorient(vol, tuple(dst))
    assert out.axcodes == tuple(dst) or oblique > 0
    # same world position for every voxel value: reorientation never resamples
    for ijk in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
        new = np.round(reo.source_to_target_index(ijk)).astype(int)
        assert out.array[tuple(new)] == vol.array[ijk]
        np.testing.assert_allclose(out.index_to_ras(new), vol.index_to_ras(ijk), atol=1e-6)
    assert np.array_equal(reo.invert(out.array), vol.array)


def test_display_layout_keeps_slice_axis():
    vol = make_volume(axcodes="RAI")
    out, reo = reorient(vol, display_axcodes(vol))
    assert out.axcodes == ("L", "P", "I")
    sag = make_volume(axcodes="ASR")
    out, _ = reorient(sag, display_axcodes(sag))
    assert out.axcodes == ("P", "I", "R")


@pytest.mark.parametrize("oblique", [0.0, 17.0])
def test_on_grid_reorients_the_same_voxels_and_refuses_anything_else(oblique):
    image = make_volume(axcodes="LPS", oblique_deg=oblique, shape=(5, 6, 7))
    for codes in CODES:
        stored, _ = reorient(image, tuple(codes))  # the same voxels, other axis directions
        back = on_grid(stored, image)
        assert back.same_grid(image) and np.array_equal(back.array, image.array)
    shifted = Volume(image.array, image.affine @ np.array([[1, 0, 0, 0.5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    with pytest.raises(GeometryError, match="resample it onto the image grid"):
        on_grid(shifted, image)
    with pytest.raises(GeometryError, match="resample it onto the image grid"):
        on_grid(Volume(image.array[:, :, :6], image.affine), image)
