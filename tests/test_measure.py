"""Measurements and meshes on analytic phantoms and real masks (pyradiomics as the reference)."""

import os

import numpy as np
import pytest

import medsam3d as m3
from medsam3d import Volume
from medsam3d.measure import border_planes, measure
from medsam3d.mesh import label_mesh, mesh_properties, read_mesh, write_mesh

from conftest import EXAMPLES, shared

EXAMPLE = EXAMPLES / "sts041_ct"


def _rotation(deg):
    t = np.radians(deg)
    rz = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(t / 2), -np.sin(t / 2)], [0, np.sin(t / 2), np.cos(t / 2)]])
    return rz @ rx


def phantom(spacing, flips=(1, 1, 1), oblique=0.0, lesions=(((0, 0, 0), (12, 9, 15)),), shape=(90, 90, 40)):
    """Ellipsoids (centre offset mm from the grid centre, radii mm along the world axes).

    Returns the label volume, the analytic volumes (mm^3) and centres (RAS).
    """
    affine = np.eye(4)
    affine[:3, :3] = _rotation(oblique) @ np.diag(np.asarray(spacing) * np.asarray(flips))
    affine[:3, 3] = [-30.0, 12.0, 101.0]
    vol = Volume(np.zeros(shape, np.uint8), affine)
    ras = vol.index_to_ras(np.indices(shape).reshape(3, -1).T)
    centre = vol.index_to_ras((np.array(shape) - 1) / 2)
    labels = np.zeros(len(ras), np.uint8)
    volumes, centres = [], []
    for offset, radii in lesions:
        c = centre + np.asarray(offset, float)
        inside = (((ras - c) / np.asarray(radii, float)) ** 2).sum(axis=1) <= 1
        labels[inside] = 1
        volumes.append(4 / 3 * np.pi * np.prod(radii))
        centres.append(c)
    return vol.with_array(labels.reshape(shape)), volumes, centres


GRIDS = [
    dict(spacing=(1.0, 1.0, 1.0)),
    dict(spacing=(0.7, 0.9, 2.5)),
    dict(spacing=(0.7, 0.9, 2.5), flips=(-1, 1, -1)),
    dict(spacing=(0.8, 0.8, 2.0), oblique=25.0),
]


@pytest.mark.parametrize("grid", GRIDS)
def test_ellipsoid_phantom(grid):
    labels, (analytic,), (centre,) = phantom(**grid)
    (row,) = measure(labels)
    voxels = int(labels.array.sum())
    assert row["voxels"] == voxels
    assert row["volume_ml"] == pytest.approx(voxels * labels.voxel_volume_mm3 / 1000, rel=1e-9)
    assert row["mesh_volume_ml"] * 1000 == pytest.approx(analytic, rel=0.02)
    poly = label_mesh(labels, 1)
    props = mesh_properties(poly)
    assert props["watertight"]
    assert props["volume_mm3"] == pytest.approx(analytic, rel=0.02)
    voxel = max(labels.spacing)
    if not grid.get("oblique"):
        # radii 12, 9, 15 mm along R, A, S: the longest diameter is 30 mm (S-I); axial axes 24 / 18 mm
        assert row["max_diameter_3d_mm"] == pytest.approx(30.0, abs=voxel)
        assert row["long_axis_mm"] == pytest.approx(24.0, abs=max(labels.spacing[:2]))
        assert row["short_axis_mm"] == pytest.approx(18.0, abs=max(labels.spacing[:2]))
    # the mesh sits where the ellipsoid is, in RAS
    bounds = np.array(poly.GetBounds()).reshape(3, 2)
    np.testing.assert_allclose(bounds.mean(axis=1), centre, atol=voxel)
    np.testing.assert_allclose(row["centroid_ras"], centre, atol=0.5 * voxel)
    if not grid.get("oblique"):
        np.testing.assert_allclose(bounds[:, 1] - bounds[:, 0], [24, 18, 30], atol=2 * voxel)


def test_lps_mesh_is_the_mirror_of_ras():
    labels, _, (centre,) = phantom(spacing=(1, 1, 2))
    ras = np.array(label_mesh(labels, 1, space="RAS").GetBounds()).reshape(3, 2).mean(axis=1)
    lps = np.array(label_mesh(labels, 1, space="LPS").GetBounds()).reshape(3, 2).mean(axis=1)
    np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-6)


def test_two_lesions_are_measured_separately():
    labels, volumes, centres = phantom(spacing=(0.8, 0.8, 2.0), lesions=(((-18, 0, 0), (8, 8, 8)),
                                                                         ((16, 5, 4), (5, 5, 6))))
    rows = measure(labels)
    whole, first, second = rows
    assert whole["component"] == 0 and whole["lesions"] == 2
    assert first["voxels"] + second["voxels"] == whole["voxels"]
    assert first["mesh_volume_ml"] * 1000 == pytest.approx(volumes[0], rel=0.03)
    assert second["mesh_volume_ml"] * 1000 == pytest.approx(volumes[1], rel=0.04)
    np.testing.assert_allclose(first["centroid_ras"], centres[0], atol=1.0)
    np.testing.assert_allclose(second["centroid_ras"], centres[1], atol=1.0)
    assert first["max_diameter_3d_mm"] == pytest.approx(16, abs=2.0)


def test_border_lesion_is_flagged_not_dropped():
    labels, _, _ = phantom(spacing=(1, 1, 1), shape=(40, 40, 20))
    (row,) = measure(labels)
    assert row["touches_border"] and row["voxels"] > 0


def test_border_planes_name_the_outer_planes_a_mask_reaches():
    mask = np.zeros((5, 6, 7), bool)
    assert border_planes(mask) == []
    mask[1:4, 1:5, 2:5] = True
    assert border_planes(mask) == []
    mask[0, 3, 3] = mask[2, 5, 6] = True
    assert border_planes(mask) == ["i=0", "j=5", "k=6"]
    mask[:] = True
    assert border_planes(mask) == ["i=0", "i=4", "j=0", "j=5", "k=0", "k=6"]


def test_intensity_statistics_in_hu():
    image = m3.load(shared("ibsi_sts_041/dicom/CT/image"))
    labels = m3.load_labels(shared("ibsi_sts_041/nifti/CT_mask.nii.gz"), image)
    (row,) = measure(labels, image=image)
    values = image.array[labels.array == 1]
    assert row["intensity"]["unit"] == "HU"
    assert row["intensity"]["mean"] == pytest.approx(values.mean(), abs=1e-3)
    assert row["intensity"]["p50"] == pytest.approx(np.median(values))
    assert row["intensity"]["non_finite_voxels"] == 0
    # NaN voxels ("no data") inside the lesion are left out of the statistics and counted
    array = image.array.astype(np.float32)
    inside = np.argwhere(labels.array == 1)[:50]
    array[tuple(inside.T)] = np.nan
    (row,) = measure(labels, image=Volume(array, image.affine, image.meta))
    kept = array[(labels.array == 1) & np.isfinite(array)]
    assert row["intensity"]["non_finite_voxels"] == 50
    assert row["intensity"]["mean"] == pytest.approx(kept.mean(), abs=1e-3) and np.isfinite(row["intensity"]["p95"])


REAL_MASKS = [  # (mask, image or None: the mask itself serves, shape features ignore intensities; label)
    ("ibsi_sts_041/nifti/CT_mask.nii.gz", "ibsi_sts_041/nifti/CT_image.nii.gz", 1),
    ("pyradiomics/brain2_label.nrrd", "pyradiomics/brain2_image.nrrd", 1),
    ("pyradiomics/breast1_label.nrrd", "pyradiomics/breast1_image.nrrd", 1),
    # masks whose former VTK surface was non-manifold, split or far off in volume
    ("pyradiomics/prostate_phantom_subvolume-label.nrrd", "pyradiomics/prostate_phantom_subvolume.nrrd", 9),
    ("totalseg_ct_dicom/example_seg_dicom.nii.gz", None, 33),
]


@pytest.mark.parametrize("mask_path, image_path, value", REAL_MASKS)
def test_real_masks_agree_with_pyradiomics(mask_path, image_path, value):
    radiomics = pytest.importorskip("radiomics", reason="pyradiomics is the reference (README test command installs it)")
    import SimpleITK as sitk
    from radiomics import shape

    labels = m3.load_labels(shared(mask_path))
    mask = (labels.array == value).astype(np.uint8)
    labels = labels.with_array(mask)
    (row,) = measure(labels, components=False)
    assert row["volume_ml"] == pytest.approx(mask.sum() * labels.voxel_volume_mm3 / 1000, rel=1e-12)
    radiomics.setVerbosity(40)
    # pyradiomics 3.0.1's MeshVolume depends on the storage orientation (brain2, stored LAS:
    # 1838.5 mm3 as stored, 1734.7 mm3 after a pure flip to LPS; VTK's marching cubes gives
    # 1734.7 either way), so the reference is computed on the LPS layout of the same voxels
    msk = sitk.DICOMOrient(sitk.Cast(sitk.ReadImage(str(shared(mask_path))) == value, sitk.sitkUInt8), "LPS")
    if image_path:
        img = sitk.DICOMOrient(sitk.ReadImage(str(shared(image_path))), "LPS")
    else:
        img = sitk.Cast(msk, sitk.sitkFloat32)
    features = shape.RadiomicsShape(img, msk)
    features.enableAllFeatures()
    ref = features.execute()
    assert row["voxels"] * labels.voxel_volume_mm3 == pytest.approx(float(ref["VoxelVolume"]), rel=1e-6)
    assert row["mesh_volume_ml"] * 1000 == pytest.approx(float(ref["MeshVolume"]), rel=0.01)
    assert row["surface_mm2"] == pytest.approx(float(ref["SurfaceArea"]), rel=0.01)
    assert row["sphericity"] == pytest.approx(float(ref["Sphericity"]), abs=0.01)
    assert row["max_diameter_3d_mm"] == pytest.approx(float(ref["Maximum3DDiameter"]), rel=0.01)


def test_measurements_do_not_depend_on_storage_orientation():
    labels = m3.load_labels(shared("pyradiomics/brain2_label.nrrd"))
    for codes in (("L", "P", "S"), ("R", "A", "I"), ("P", "S", "L")):
        flipped, _ = m3.reorient(labels, codes)
        a, b = measure(labels)[0], measure(flipped)[0]
        for key in ("voxels", "volume_ml", "mesh_volume_ml", "surface_mm2", "max_diameter_3d_mm", "long_axis_mm",
                    "short_axis_mm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
        np.testing.assert_allclose(a["centroid_ras"], b["centroid_ras"], atol=1e-6)


@pytest.mark.parametrize("suffix", [".stl", ".obj", ".ply", ".vtp"])
def test_mesh_files_of_a_real_mask_enclose_its_volume(tmp_path, suffix):
    labels = m3.load_labels(shared("ibsi_sts_041/nifti/CT_mask.nii.gz"))
    voxel_ml = labels.array.sum() * labels.voxel_volume_mm3 / 1000
    path = write_mesh(label_mesh(labels, 1), tmp_path / f"gtv{suffix}", label=1)
    back = mesh_properties(read_mesh(path))
    assert back["watertight"]
    assert back["volume_mm3"] / 1000 == pytest.approx(voxel_ml, rel=0.03)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_cli_mesh_and_measure(tmp_path, capsys):
    from medsam3d.cli import main

    mask = shared("pyradiomics/prostate_phantom_subvolume-label.nrrd")
    assert main(["mesh", str(mask), "-o", str(tmp_path / "p.stl"), "--space", "LPS"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"p_label{v}.stl" for v in (1, 7, 8, 9)]
    assert "watertight" in capsys.readouterr().out
    assert main(["measure", str(mask), "--csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("label,name,component") and len(lines) >= 5
    assert main(["mesh", str(mask), "-o", str(tmp_path / "p.xyz")]) == 2
    assert main(["mesh", str(mask), "-o", str(tmp_path / "q.stl"), "--label", "5"]) == 2


def test_cli_on_an_empty_label_map_says_so(tmp_path, capsys):
    from medsam3d.cli import main

    empty = m3.save(Volume(np.zeros((20, 20, 8), np.uint8), np.diag([0.8, 0.8, 2.5, 1.0])), tmp_path / "empty.nii.gz")
    assert main(["mesh", str(empty), "-o", str(tmp_path / "e.stl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "expected labelled voxels to mesh" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "e.stl").exists()
    assert main(["measure", str(empty)]) == 0
    assert "no labelled voxels" in capsys.readouterr().out


def test_pictures_show_the_lesion(tmp_path, capfd):
    """Offscreen VTK rendering and the axial overlay, checked by looking at their pixels. Without
    a display VTK's "bad X server connection" warning used to reach the user's terminal."""
    from PIL import Image

    from medsam3d.cli import main

    image = EXAMPLE / "CT_image.nii.gz"
    mask = EXAMPLE / "CT_mask.nii.gz"
    assert main(["render", str(mask), "-o", str(tmp_path / "mesh.png")]) == 0
    assert capfd.readouterr().err == ""
    rgb = np.asarray(Image.open(tmp_path / "mesh.png").convert("RGB")).astype(int)
    # the mesh is drawn in its segment colour (green-ish) on a white background
    greenish = (rgb[..., 1] > rgb[..., 0] + 20) & (rgb[..., 1] > rgb[..., 2] + 20)
    assert 0.05 < greenish.mean() < 0.8
    assert main(["render", str(mask), "--view", "axial", "--image", str(image), "-o", str(tmp_path / "ax.png")]) == 0
    rgb = np.asarray(Image.open(tmp_path / "ax.png").convert("RGB")).astype(int)
    yellow = (rgb[..., 0] > 200) & (rgb[..., 1] > 200) & (rgb[..., 2] < 80)
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)
    cyan = (rgb[..., 0] < 60) & (rgb[..., 1] > 200) & (rgb[..., 2] > 200)
    assert yellow.sum() > 200 and red.sum() > 50 and cyan.sum() > 50
    assert main(["render", str(mask), "--view", "axial", "-o", str(tmp_path / "x.png")]) == 2


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc: a folder no one can write to")
def test_a_failed_vtk_write_says_so_in_one_line(capfd):
    """VTK's writers used to print their own multi-line error; render then said 'expected the
    writer to create .../.m.tmp.png, found nothing'. Now one line says what could not be written (the
    folder is checked before any work, and a writer's own failure says so in one line too)."""
    from medsam3d.cli import main

    mask = str(EXAMPLE / "CT_mask.nii.gz")
    for command in (["mesh", mask, "-o", "/proc/m.stl"], ["mesh", mask, "-o", "/proc/m.ply"],
                    ["render", mask, "-o", "/proc/v.png"]):
        assert main(command) == 2
        err = capfd.readouterr().err.splitlines()
        assert len(err) == 1 and "be written" in err[0] and "/proc" in err[0], err


def test_package_measure_is_the_function_and_takes_paths(tmp_path):
    """m3.measure was a wrapper named like its module: once anything imported medsam3d.measure
    (the CLI's --measure, render, this file), m3.measure(...) raised "'module' object is not
    callable". Paths, and a label map stored with other axis directions, are accepted too."""
    import medsam3d.measure  # noqa: F401  (what replaced the wrapper)

    image_path, mask_path = EXAMPLE / "CT_image.nii.gz", EXAMPLE / "CT_mask.nii.gz"
    first = m3.measure(mask_path, image=image_path, components=False)
    again = m3.measure(m3.load_labels(mask_path), image=m3.load(image_path), components=False)
    assert first == again and first[0]["volume_ml"] == pytest.approx(60.59, abs=0.01)
    flipped, _ = m3.reorient(m3.load_labels(mask_path), ("R", "A", "I"))
    assert m3.measure(flipped, image=image_path, components=False)[0]["voxels"] == first[0]["voxels"]
    for call in (lambda: m3.measure(np.zeros((4, 4, 4), np.uint8)), lambda: m3.load(None),
                 lambda: m3.load_labels(3), lambda: m3.save(np.zeros((4, 4, 4)), tmp_path / "x.nii.gz"),
                 lambda: m3.save(m3.load_labels(mask_path), None)):
        with pytest.raises(m3.Medsam3dError, match="expected a") as info:
            call()
        assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())
