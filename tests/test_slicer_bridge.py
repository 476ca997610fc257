"""The Slicer module's bridge (``slicer_extension/MedSAM3D/MedSAM3DLib/bridge.py``) against
Slicer's real MRML classes, from the PyPI package ``slicer-core`` (Slicer's MRML and module
logics without Qt).

slicer-core pins ``vtk==9.6.2`` and cannot share medsam3d's environment, so these tests run
in their own virtual environment and skip (with the reason) anywhere else::

    python3.11 -m venv .venv-slicer
    .venv-slicer/bin/pip install slicer-core==5.13.31053.0 numpy pytest
    .venv-slicer/bin/python -m pytest tests/test_slicer_bridge.py

(``slicer_extension/ci/test_bridge.sh`` does exactly this.) Two tests also read a file the
other side wrote (a volume Slicer wrote read by medsam3d; a ``.seg.nrrd`` medsam3d wrote read
by Slicer): they run medsam3d in its own environment's Python, ``$MEDSAM3D_PYTHON`` (default:
the repository's ``.venv/bin/python``), and skip without one.

What this proves: the MRML plumbing (array order, IJKToRAS, transforms, ROI geometry,
segments, tables, storage nodes) against slicer-core's revision of Slicer (5.13). What it
does not: the Qt GUI, the parameter node, pip installs, or Slicer 5.10/5.12 behaviour.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "slicer_extension" / "MedSAM3D"

try:
    import slicer
    from slicer import vtkMRMLScene  # noqa: F401 - the MRML classes, not the unrelated PyPI "slicer"
except ImportError:
    pytest.skip("needs Slicer's MRML classes (the PyPI package slicer-core, in its own venv: "
                "slicer_extension/ci/test_bridge.sh)", allow_module_level=True)

import vtk  # noqa: E402 - slicer-core's VTK

sys.path.insert(0, str(MODULE_DIR))
from MedSAM3DLib import bridge  # noqa: E402

pytestmark = pytest.mark.slicer_core


# ---------------------------------------------------------------------- helpers
@pytest.fixture
def scene():
    """A fresh scene, set as ``slicer.mrmlScene`` (slicer.util's array helpers use it)."""
    scene = slicer.vtkMRMLScene()
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = scene
    yield scene
    slicer.mrmlScene = previous
    scene.Clear(1)


@pytest.fixture
def seg_logic(scene):
    """The Segmentations module's logic, as the module passes slicer.modules.segmentations.logic()."""
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    return logic


def rotation(deg_z: float, deg_x: float) -> np.ndarray:
    tz, tx = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(tz), -np.sin(tz), 0], [np.sin(tz), np.cos(tz), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(tx), -np.sin(tx)], [0, np.sin(tx), np.cos(tx)]])
    return rz @ rx


#: grids: (name, 3x3 direction*spacing, origin) -- flipped axes, a permutation, anisotropic spacing, oblique
GRIDS = {
    "LPS-like": (np.diag([-0.8, -0.8, 2.5]), [120.0, 90.0, -40.0]),
    "flipped-permuted": (np.array([[0, -0.9, 0], [0.7, 0, 0], [0, 0, -3.0]]), [10.0, -5.0, 30.0]),
    "oblique": (rotation(25, 12) @ np.diag([0.9, 1.1, 2.0]), [-31.5, 12.25, 7.0]),
}


def affine(name: str) -> np.ndarray:
    matrix, origin = GRIDS[name]
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = matrix, origin
    return out


def add_volume(scene, array_ijk, ijk_to_ras, name="volume"):
    """A scalar volume node made by Slicer's own helper (not by the bridge): (k, j, i) array + IJKToRAS."""
    node = slicer.util.addVolumeFromArray(np.ascontiguousarray(array_ijk.transpose(2, 1, 0)),
                                          ijkToRAS=bridge.array_to_matrix(ijk_to_ras), name=name)
    assert node.GetScene() is scene
    return node


def medsam3d_python() -> str:
    python = os.environ.get("MEDSAM3D_PYTHON") or str(REPO / ".venv" / "bin" / "python")
    if not Path(python).exists():
        pytest.skip(f"needs medsam3d's own Python to read/write the other side's files ({python} not found; "
                    "set MEDSAM3D_PYTHON)")
    probe = subprocess.run([python, "-c", "import medsam3d"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{python} cannot import medsam3d: {probe.stderr.strip().splitlines()[-1:]}")
    return python


def run_medsam3d(code: str) -> dict:
    out = subprocess.run([medsam3d_python(), "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- the environment
def test_slicer_is_slicer_core():
    """``slicer`` here is slicer-core's MRML package, not PyPI's unrelated ``slicer`` (shap's)."""
    dist = importlib.metadata.distribution("slicer-core")
    assert dist.version == "5.13.31053.0"
    files = {str(f) for f in dist.files or ()}
    assert "slicer/__init__.py" in files
    assert Path(slicer.__file__).resolve() == Path(dist.locate_file("slicer/__init__.py")).resolve()
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("slicer")  # the name-clashing package must not be installed too
    assert vtk.vtkVersion.GetVTKVersion() == importlib.metadata.version("vtk")


# ---------------------------------------------------------------------- volumes
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_volume_node_to_arrays_and_back(scene, grid):
    rng = np.random.default_rng(1)
    array = rng.integers(-1000, 2000, size=(7, 9, 5)).astype(np.int16)  # [i, j, k], all sizes distinct
    matrix = affine(grid)
    node = add_volume(scene, array, matrix)

    got, got_matrix, meta = bridge.volume_from_node(node)
    assert got.shape == (7, 9, 5) and got.dtype == np.int16
    assert np.array_equal(got, array)
    np.testing.assert_allclose(got_matrix, matrix, atol=1e-12)
    assert meta["source"] == "slicer:volume"
    got[0, 0, 0] += 1  # a copy: the node's voxels are untouched
    assert slicer.util.arrayFromVolume(node)[0, 0, 0] == array[0, 0, 0]

    # one voxel, checked through Slicer's own geometry: index (i, j, k) -> RAS
    i, j, k = 5, 2, 3
    ras = [0.0, 0.0, 0.0, 1.0]
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    m.MultiplyPoint([i, j, k, 1.0], ras)
    np.testing.assert_allclose(ras[:3], (matrix @ [i, j, k, 1.0])[:3], atol=1e-9)
    assert slicer.util.arrayFromVolume(node)[k, j, i] == got[i, j, k] - (1 if (i, j, k) == (0, 0, 0) else 0)

    # and back: a new node from (array, affine)
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    bridge.update_volume_node(other, array, matrix)
    assert np.array_equal(slicer.util.arrayFromVolume(other), array.transpose(2, 1, 0))
    np.testing.assert_allclose(bridge.matrix_to_array(_ijk_to_ras(other)), matrix, atol=1e-12)
    np.testing.assert_allclose(other.GetSpacing(), np.linalg.norm(matrix[:3, :3], axis=0), atol=1e-12)


def _ijk_to_ras(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return m


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A minimal NRRD reader (the header Slicer writes): (array[i, j, k], ijk_to_ras)."""
    raw = path.read_bytes()
    header, data = raw.split(b"\n\n", 1)
    fields = dict(line.split(": ", 1) for line in header.decode().splitlines()[1:] if ": " in line)
    assert fields["space"] == "left-posterior-superior"
    sizes = [int(v) for v in fields["sizes"].split()]
    directions = [[float(x) for x in v.split(",")] for v in re.findall(r"\(([^)]*)\)", fields["space directions"])]
    origin = [float(x) for x in fields["space origin"].strip("()").split(",")]
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.array(directions).T
    ijk_to_lps[:3, 3] = origin
    dtype = {"short": "<i2", "float": "<f4", "unsigned char": "u1"}[fields["type"]]
    data = gzip.decompress(data) if fields["encoding"] == "gzip" else data
    array = np.frombuffer(data, dtype=dtype).reshape(sizes[::-1]).transpose(2, 1, 0)
    return array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_volume_file_for_upload(scene, tmp_path, grid):
    """The file uploaded to a server (Slicer's own NRRD writer) holds the node's voxels and IJKToRAS."""
    array = np.random.default_rng(2).integers(-500, 500, size=(6, 8, 4)).astype(np.int16)
    node = add_volume(scene, array, affine(grid))
    storage_before = node.GetStorageNode()
    path = Path(bridge.write_volume_file(node, str(tmp_path / "volume.nrrd")))
    got, matrix = _read_nrrd(path)
    assert np.array_equal(got, array)
    np.testing.assert_allclose(matrix, affine(grid), atol=1e-9)
    assert node.GetStorageNode() is storage_before  # the node's own storage is left alone
    assert scene.GetNodesByClass("vtkMRMLVolumeArchetypeStorageNode").GetNumberOfItems() == 0
    # uncompressed (written on the GUI thread: no gzip), unless asked
    assert b"encoding: raw" in path.read_bytes()[:1000]
    zipped = Path(bridge.write_volume_file(node, str(tmp_path / "zipped.nrrd"), compress=True))
    assert b"encoding: gzip" in zipped.read_bytes()[:1000]
    assert np.array_equal(_read_nrrd(zipped)[0], array)


def test_volume_file_read_by_medsam3d(scene, tmp_path):
    """medsam3d (its own environment) reads Slicer's file with the same voxels and affine."""
    array = np.random.default_rng(3).integers(-500, 500, size=(6, 8, 4)).astype(np.int16)
    node = add_volume(scene, array, affine("oblique"))
    path = bridge.write_volume_file(node, str(tmp_path / "volume.nrrd"))
    seen = run_medsam3d(f"import json, medsam3d as m; v = m.load({path!r}); "
                        "print(json.dumps({'affine': v.affine.tolist(), 'array': v.array.tolist()}))")
    np.testing.assert_allclose(seen["affine"], affine("oblique"), atol=1e-6)
    assert np.array_equal(np.array(seen["array"]), array)


def test_dicom_modality_from_the_instance_uids(scene, monkeypatch):
    """The modality of a volume Slicer loaded from DICOM: its ``DICOM.instanceUIDs`` attribute, looked
    up in the DICOM database (a real Slicer's, checked by the module's self-test); slicer-core has no
    DICOM database, so here: no database, no attribute -> None."""
    node = add_volume(scene, np.zeros((4, 4, 3), np.int16), np.eye(4))
    assert bridge.dicom_modality(node) is None
    node.SetAttribute("DICOM.instanceUIDs", "1.2.840.1 1.2.840.2 1.2.840.3")
    assert not hasattr(slicer, "dicomDatabase") or slicer.dicomDatabase is None
    assert bridge.dicom_modality(node) is None  # no DICOM database here
    node.RemoveAttribute("DICOM.instanceUIDs")
    node.SetAttribute("DICOM.Modality", "CT")  # not what Slicer's DICOM plugins set on a volume: ignored
    assert bridge.dicom_modality(node) is None


def test_nonlinear_transform_refused(scene):
    node = add_volume(scene, np.zeros((4, 4, 4), np.int16), np.eye(4))
    warp = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    grid = vtk.vtkGridTransform()
    image = vtk.vtkImageData()
    image.SetDimensions(2, 2, 2)
    image.AllocateScalars(vtk.VTK_DOUBLE, 3)
    grid.SetDisplacementGridData(image)
    warp.SetAndObserveTransformToParent(grid)
    assert not warp.IsTransformToWorldLinear()
    node.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(ValueError, match="non-linear transform 'warp'"):
        bridge.volume_from_node(node)


# ---------------------------------------------------------------------- ROIs -> prompts
def _voxel_box_by_hand(corners_ras, matrix, shape):
    """The voxel box whose centres a ROI's corners cover (medsam3d's rule), computed independently."""
    ijk = np.array([np.linalg.solve(matrix[:3, :3], c - matrix[:3, 3]) for c in corners_ras])
    lo = np.maximum(np.ceil(ijk.min(axis=0) - 1e-3), 0).astype(int)
    hi = np.minimum(np.floor(ijk.max(axis=0) + 1e-3), np.array(shape) - 1).astype(int)
    return lo, hi


def test_unrotated_roi_is_a_box_ras(scene):
    matrix = affine("LPS-like")
    node = add_volume(scene, np.zeros((40, 40, 20), np.int16), matrix)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "tumour")
    centre = (matrix @ [20, 18, 9, 1])[:3]
    roi.SetCenter(*centre)
    roi.SetSize(10.0, 8.0, 12.0)
    entry = bridge.prompt_entry_from_roi(roi, node)
    assert set(entry) == {"name", "box_ras"} and entry["name"] == "tumour"
    np.testing.assert_allclose(entry["box_ras"][0], centre - [5, 4, 6], atol=1e-4)
    np.testing.assert_allclose(entry["box_ras"][1], centre + [5, 4, 6], atol=1e-4)
    doc = bridge.prompts_from_rois([roi], node)
    assert doc == {"version": 1, "objects": [entry]}
    assert bridge.prompts_from_rois([roi], node, names=["mass"])["objects"][0]["name"] == "mass"


def test_flat_roi_is_a_2d_box(scene):
    """A ROI drawn on one slice (no depth) is a box on that slice: medsam3d finds the object's ends."""
    matrix = affine("LPS-like")
    node = add_volume(scene, np.zeros((40, 40, 20), np.int16), matrix)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "node")
    roi.SetCenter(*(matrix @ [20.0, 18.0, 7.0, 1])[:3])
    roi.SetSize(8.0, 4.0, 0.0)
    entry = bridge.prompt_entry_from_roi(roi, node)
    # i: 20 +- 4 mm / 0.8 mm = 15..25; j: 18 +- 2 mm / 0.8 = 15.5..20.5 -> 16..20
    assert entry == {"name": "node", "slice": 7, "box": [15, 16, 25, 20]}


@pytest.mark.parametrize("grid", ["oblique", "flipped-permuted"])
def test_rotated_roi_is_the_covering_voxel_box(scene, grid):
    matrix = affine(grid)
    shape = (40, 36, 24)
    node = add_volume(scene, np.zeros(shape, np.int16), matrix)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "lesion")
    centre = (matrix @ [20, 18, 12, 1])[:3]
    size = np.array([9.0, 7.0, 11.0])
    turn = vtk.vtkTransform()
    turn.RotateZ(30)
    turn.RotateX(10)
    roi.SetCenter(*centre)
    roi.SetSize(*size)
    to_centre = vtk.vtkTransform()  # rotate about the ROI's centre
    to_centre.Translate(*centre)
    to_centre.Concatenate(turn)
    to_centre.Translate(*(-centre))
    roi.ApplyTransformMatrix(to_centre.GetMatrix())
    assert not bridge.roi_is_axis_aligned(roi, node)

    rot = bridge.matrix_to_array(turn.GetMatrix())[:3, :3]
    signs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)])
    corners = centre + (signs * size / 2) @ rot.T
    np.testing.assert_allclose(np.sort(bridge.roi_corners_ras(roi, node), axis=0), np.sort(corners, axis=0), atol=1e-4)
    lo, hi = _voxel_box_by_hand(corners, matrix, shape)
    entry = bridge.prompt_entry_from_roi(roi, node)
    assert entry == {"name": "lesion", "slice": int((lo[2] + hi[2]) // 2), "box": [lo[0], lo[1], hi[0], hi[1]],
                     "z_range": [lo[2], hi[2]]}


def test_linear_transforms_are_applied(scene, seg_logic):
    """A volume under a linear transform: the ROI (placed in world coordinates) is brought into
    the volume's own frame, and the segmentation goes under the same transform."""
    matrix = affine("LPS-like")
    node = add_volume(scene, np.zeros((40, 40, 20), np.int16), matrix)
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 25.0)
    shift.SetElement(2, 3, -10.0)
    moved.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(moved.GetID())
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "tumour")
    local_centre = (matrix @ [20, 18, 9, 1])[:3]
    roi.SetCenter(*(local_centre + [25.0, 0.0, -10.0]))  # where the user sees it: in world coordinates
    roi.SetSize(10.0, 8.0, 12.0)
    entry = bridge.prompt_entry_from_roi(roi, node)
    np.testing.assert_allclose(entry["box_ras"][0], local_centre - [5, 4, 6], atol=1e-4)

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    labels = np.zeros((40, 40, 20), np.uint8)
    labels[18:23, 16:21, 8:11] = 1
    bridge.labels_to_segmentation(labels, matrix, {1: {"name": "tumour", "color": (1, 0, 0)}}, segmentation,
                                  seg_logic, node)
    assert segmentation.GetTransformNodeID() == moved.GetID()


def test_refine_box_on_the_current_slice(scene):
    matrix = affine("oblique")
    shape = (40, 36, 24)
    node = add_volume(scene, np.zeros(shape, np.int16), matrix)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "lesion")
    roi.SetCenter(*(matrix @ [20, 18, 12, 1])[:3])
    roi.SetSize(9.0, 7.0, 0.0)
    view = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    # the view of the volume's own plane ("Rotate to volume plane") at slice k = 15
    slice_to_ras = np.eye(4)
    slice_to_ras[:3, :3] = matrix[:3, :3] / np.linalg.norm(matrix[:3, :3], axis=0)
    slice_to_ras[:3, 3] = (matrix @ [10, 10, 15, 1])[:3]
    view.GetSliceToRAS().DeepCopy(bridge.array_to_matrix(slice_to_ras))
    view.UpdateMatrices()
    # the ROI (drawn flat around slice 12) does not reach slice 15: refused, not moved there
    lo, hi = _voxel_box_by_hand(bridge.roi_corners_ras(roi, node), matrix, shape)
    assert lo[2] <= 12 <= hi[2] and hi[2] < 15
    with pytest.raises(ValueError, match=r"expected the ROI 'lesion' to reach the slice shown in 'Red' \(k = 15\)"):
        bridge.refine_box(roi, node, view)
    roi.SetCenter(*(matrix @ [20, 18, 15, 1])[:3])  # moved onto the slice shown
    k, box = bridge.refine_box(roi, node, view)
    lo, hi = _voxel_box_by_hand(bridge.roi_corners_ras(roi, node), matrix, shape)
    assert k == 15 and box == [lo[0], lo[1], hi[0], hi[1]]
    # a ROI with depth reaches every slice of its range, and no other
    roi.SetCenter(*(matrix @ [20, 18, 13, 1])[:3])
    roi.SetSize(9.0, 7.0, 8.0)
    lo, hi = _voxel_box_by_hand(bridge.roi_corners_ras(roi, node), matrix, shape)
    assert lo[2] <= 15 <= hi[2]
    assert bridge.refine_box(roi, node, view)[0] == 15
    roi.SetCenter(*(matrix @ [20, 18, 3, 1])[:3])
    with pytest.raises(ValueError, match="found it on slices"):
        bridge.refine_box(roi, node, view)
    roi.SetSize(9.0, 7.0, 0.0)
    # a view across the slices (a sagittal cut of this volume) is refused with the remedy
    slice_to_ras[:3, :3] = slice_to_ras[:3, [1, 2, 0]]
    view.GetSliceToRAS().DeepCopy(bridge.array_to_matrix(slice_to_ras))
    view.UpdateMatrices()
    with pytest.raises(ValueError, match="Rotate to volume plane"):
        bridge.refine_box(roi, node, view)


def test_roi_outside_the_volume_refused(scene):
    node = add_volume(scene, np.zeros((10, 10, 10), np.int16), np.eye(4))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "far")
    roi.SetCenter(500.0, 0.0, 0.0)
    roi.SetSize(5.0, 5.0, 5.0)
    with pytest.raises(ValueError, match="outside"):
        bridge.prompt_entry_from_roi(roi, node)
    empty = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "unplaced")
    with pytest.raises(ValueError, match="place the ROI"):
        bridge.prompt_entry_from_roi(empty, node)


# ---------------------------------------------------------------------- label maps <-> segmentations
SEGMENTS = {1: {"name": "tumour", "color": (0.9, 0.2, 0.1)}, 3: {"name": "node", "color": (0.1, 0.5, 0.9)},
            7: {"name": "satellite", "color": (0.2, 0.8, 0.3)}}


def _labels(shape=(20, 18, 12)):
    labels = np.zeros(shape, np.uint8)
    labels[3:9, 4:10, 2:7] = 1
    labels[12:16, 10:15, 6:11] = 3  # label 7 has no voxel: an empty, named segment
    return labels


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_labels_to_named_coloured_segments_and_back(scene, seg_logic, grid):
    matrix = affine(grid)
    labels = _labels()
    volume = add_volume(scene, np.zeros(labels.shape, np.int16), matrix)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ids = bridge.labels_to_segmentation(labels, matrix, SEGMENTS, segmentation, seg_logic, volume)
    seg = segmentation.GetSegmentation()
    assert seg.GetNumberOfSegments() == 3 and len(ids) == 3
    got = {seg.GetSegment(i).GetLabelValue(): (seg.GetSegment(i).GetName(), seg.GetSegment(i).GetColor()) for i in ids}
    assert {v: n for v, (n, _) in got.items()} == {1: "tumour", 3: "node", 7: "satellite"}
    for value, (_, color) in got.items():
        np.testing.assert_allclose(color, SEGMENTS[value]["color"])

    # Slicer's own export (not the bridge's) holds each segment's voxels on the volume's grid
    exported = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    for segment_id, value in zip(ids, sorted(SEGMENTS)):
        one = vtk.vtkStringArray()
        one.InsertNextValue(segment_id)
        assert seg_logic.ExportSegmentsToLabelmapNode(segmentation, one, exported, volume)
        mask = slicer.util.arrayFromVolume(exported).transpose(2, 1, 0) > 0
        assert np.array_equal(mask, labels == value)
        np.testing.assert_allclose(bridge.matrix_to_array(_ijk_to_ras(exported)), matrix, atol=1e-9)

    back, back_matrix, segments = bridge.segmentation_to_labels(segmentation, seg_logic, volume)
    assert np.array_equal(back, labels)
    np.testing.assert_allclose(back_matrix, matrix, atol=1e-12)
    assert {v: s["name"] for v, s in segments.items()} == {1: "tumour", 3: "node", 7: "satellite"}

    # the surface in the 3D view
    assert bridge.show_surface(segmentation)
    assert seg.ContainsRepresentation("Closed surface")
    surface = vtk.vtkPolyData()
    segmentation.GetClosedSurfaceRepresentation(ids[0], surface)
    assert surface.GetNumberOfPoints() > 0

    # a second run replaces the segments (it does not add to them)
    bridge.labels_to_segmentation((labels == 1).astype(np.uint8), matrix, {1: SEGMENTS[1]}, segmentation, seg_logic,
                                  volume)
    assert seg.GetNumberOfSegments() == 1 and seg.GetNthSegment(0).GetName() == "tumour"


def test_unnamed_labels_get_a_name(scene, seg_logic):
    labels = _labels()
    volume = add_volume(scene, np.zeros(labels.shape, np.int16), np.eye(4))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ids = bridge.labels_to_segmentation(labels, np.eye(4), {}, segmentation, seg_logic, volume)
    seg = segmentation.GetSegmentation()
    assert [seg.GetSegment(i).GetName() for i in ids] == ["label 1", "label 3"]


def test_seg_nrrd_written_by_slicer_read_back(scene, seg_logic, tmp_path):
    """A .seg.nrrd through Slicer's segmentation storage node and back (the server path's reader)."""
    matrix = affine("oblique")
    labels = _labels()
    volume = add_volume(scene, np.zeros(labels.shape, np.int16), matrix)
    source = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    bridge.labels_to_segmentation(labels, matrix, SEGMENTS, source, seg_logic, volume)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "labels.seg.nrrd"))
    assert storage.WriteData(source)
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ids = bridge.read_segmentation_file(str(tmp_path / "labels.seg.nrrd"), target, volume)
    seg = target.GetSegmentation()
    assert sorted(seg.GetSegment(i).GetName() for i in ids) == ["node", "satellite", "tumour"]
    back, _, _ = bridge.segmentation_to_labels(target, seg_logic, volume)
    assert np.array_equal(back, labels)


def test_seg_nrrd_written_by_medsam3d(scene, seg_logic, tmp_path):
    """What a server sends (medsam3d's .seg.nrrd writer) read by Slicer: names, colours, voxels, grid."""
    matrix = affine("oblique")
    labels = _labels()
    path = tmp_path / "from_medsam3d.seg.nrrd"
    np.save(tmp_path / "labels.npy", labels)
    segments = {int(k): {"name": v["name"], "color": list(v["color"])} for k, v in SEGMENTS.items()}
    run_medsam3d(
        "import json, numpy as np, medsam3d as m; "
        f"segs = {{int(k): {{'name': v['name'], 'color': tuple(v['color'])}} for k, v in {segments!r}.items()}}; "
        f"v = m.Volume(np.load({str(tmp_path / 'labels.npy')!r}), np.array({matrix.tolist()!r}), "
        "{'segments': segs}); "
        f"m.save(v, {str(path)!r}); print(json.dumps({{'ok': True}}))")
    volume = add_volume(scene, np.zeros(labels.shape, np.int16), matrix)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ids = bridge.read_segmentation_file(str(path), segmentation, volume)
    seg = segmentation.GetSegmentation()
    names = {seg.GetSegment(i).GetLabelValue(): seg.GetSegment(i).GetName() for i in ids}
    assert names[1] == "tumour" and names[3] == "node"
    for segment_id in ids:
        value = seg.GetSegment(segment_id).GetLabelValue()
        if value in SEGMENTS and SEGMENTS[value]["name"] == seg.GetSegment(segment_id).GetName():
            np.testing.assert_allclose(seg.GetSegment(segment_id).GetColor(), SEGMENTS[value]["color"], atol=1e-6)
    back, _, _ = bridge.segmentation_to_labels(segmentation, seg_logic, volume)
    assert np.array_equal(back, labels)


# ---------------------------------------------------------------------- measurements
RECORD = {
    "schema_version": "1.0",
    "objects": [
        {"label": 1, "name": "tumour", "voxels": 1234, "volume_ml": 12.5, "volume_ml_range": [11.9, 13.1],
         "flags": ["touches_border"],
         "measurements": {"whole": {"long_axis_mm": 41.2, "short_axis_mm": 30.05, "max_diameter_3d_mm": 47.9,
                                    "lesions": 1}, "lesions": []}},
        {"label": 2, "name": "node", "voxels": 0, "volume_ml": 0.0, "volume_ml_range": None, "flags": ["empty"],
         "measurements": {"whole": None, "lesions": []}},
    ],
}


def test_measurements_table(scene):
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    bridge.fill_measurements_table(table, RECORD)
    rows = bridge.table_rows(table)
    assert [r["Object"] for r in rows] == ["tumour", "node"]
    first = rows[0]
    assert first["Volume (mL)"] == 12.5
    assert (first["Volume range min (mL)"], first["Volume range max (mL)"]) == (11.9, 13.1)
    assert (first["Long axis (mm)"], first["Short axis (mm)"], first["Max 3D diameter (mm)"]) == (41.2, 30.05, 47.9)
    assert first["Flags"] == "touches_border" and first["Label"] == 1 and first["Voxels"] == 1234
    assert np.isnan(rows[1]["Long axis (mm)"]) and np.isnan(rows[1]["Volume range min (mL)"])
    assert table.GetColumnUnitLabel("Volume (mL)") == "mL"
    assert table.GetNumberOfRows() == 2 and table.GetNumberOfColumns() == len(bridge.TABLE_COLUMNS)
    assert json.loads(table.GetAttribute("MedSAM3D.record")) == RECORD
    bridge.fill_measurements_table(table, {"objects": RECORD["objects"][:1]})  # a new run replaces the rows
    assert table.GetNumberOfRows() == 1
