"""Slicer nodes <-> medsam3d's data: volumes, ROI prompts, label maps, measurements.

The one place where the module converts between MRML nodes and what medsam3d (in-process or
behind ``medsam3d serve``) reads and returns. It uses only MRML and VTK classes reached
through the nodes and the scene they belong to (no ``slicer.app``, ``qt`` or
``slicer.modules``; ``slicer.dicomDatabase`` only when it exists, for a volume's DICOM
modality): the Segmentations module's logic is passed in as an argument. So it runs
unchanged in Slicer and under the PyPI package ``slicer-core`` (Slicer's MRML without Qt),
where ``tests/test_slicer_bridge.py`` checks it against Slicer's own C++ classes.

Conventions (medsam3d's, see its ``docs/conventions.md``):

* a volume is ``(array, ijk_to_ras)``: ``array[i, j, k]`` (i = column, j = row, k = slice;
  Slicer's ``arrayFromVolume`` is the transpose, ``[k, j, i]``) and the 4x4 ``IJKToRAS``
  matrix of the node (RAS millimetres);
* coordinates are the volume's **own** RAS: a linear parent transform of the volume stays
  outside (the segmentation is put under the same transform), ROI corners are brought into
  the volume's frame; a non-linear transform is refused, since a box would not stay a box;
* a label map is ``(array, ijk_to_ras, segments)`` with ``segments = {value: {"name",
  "color"}}`` (colours 0..1), the form of ``medsam3d.Volume.meta["segments"]``;
* a voxel box is ``[i_min, j_min, i_max, j_max]`` with inclusive indices on slice ``k``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

#: a voxel centre within this fraction of a voxel of a ROI's face counts as inside (medsam3d's rule)
FACE_TOLERANCE = 1e-3
#: the record's objects -> the measurement table's columns (title, unit, how to read it from an object)
TABLE_COLUMNS = (
    ("Object", "", "name"),
    ("Label", "", "label"),
    ("Volume", "mL", "volume_ml"),
    ("Volume range min", "mL", "range_min"),
    ("Volume range max", "mL", "range_max"),
    ("Long axis", "mm", "long_axis_mm"),
    ("Short axis", "mm", "short_axis_mm"),
    ("Max 3D diameter", "mm", "max_diameter_3d_mm"),
    ("Voxels", "", "voxels"),
    ("Lesions", "", "lesions"),
    ("Flags", "", "flags"),
)


# ---------------------------------------------------------------------- matrices and transforms
def matrix_to_array(matrix) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a (4, 4) float array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def array_to_matrix(array) -> Any:
    """A (4, 4) array as a new ``vtkMatrix4x4``."""
    import vtk

    array = np.asarray(array, dtype=np.float64)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def parent_to_world(node) -> np.ndarray:
    """The 4x4 matrix from ``node``'s own coordinates to world RAS (identity without a parent
    transform). Raises ValueError for a non-linear transform."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise ValueError(f"expected '{node.GetName()}' under a linear transform (or none), found the non-linear "
                         f"transform '{transform.GetName()}'; harden it (Data module: Harden transform) first")
    import vtk

    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return matrix_to_array(matrix)


def ijk_to_ras(volume_node) -> np.ndarray:
    """The volume node's ``IJKToRAS`` matrix (its own RAS, without parent transforms)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix_to_array(matrix)


# ---------------------------------------------------------------------- volumes
def _array_kji(image_data) -> np.ndarray:
    from vtkmodules.util import numpy_support

    scalars = image_data.GetPointData().GetScalars()
    if scalars is None:
        raise ValueError("expected a volume with voxels, found an empty one")
    if scalars.GetNumberOfComponents() != 1:
        raise ValueError(f"expected a scalar volume (one value per voxel), found {scalars.GetNumberOfComponents()} "
                         "components; convert it to a scalar volume (Vector to Scalar Volume module)")
    dims = image_data.GetDimensions()
    return numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1])


def volume_from_node(volume_node) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """A scalar volume node -> ``(array[i, j, k], ijk_to_ras, meta)``; the array is a copy.

    Refuses a volume under a non-linear transform (see the module docstring); ``meta`` names
    the node, and gives its DICOM modality when :func:`dicom_modality` finds it.
    """
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError("expected a volume with voxels, found none; choose a loaded volume")
    parent_to_world(volume_node)  # refuses non-linear transforms
    array = np.ascontiguousarray(_array_kji(volume_node.GetImageData()).transpose(2, 1, 0))
    meta: Dict[str, Any] = {"source": f"slicer:{volume_node.GetName()}"}
    modality = dicom_modality(volume_node)
    if modality:
        meta["modality"] = modality
    return array, ijk_to_ras(volume_node), meta


#: the DICOM Modality tag, as ctkDICOMDatabase names tags
MODALITY_TAG = "0008,0060"


def dicom_modality(volume_node, database=None) -> Optional[str]:
    """The DICOM modality (``"CT"``, ``"MR"``...) of a volume loaded by Slicer's DICOM module, else None.

    Slicer's DICOM plugins record the instances a volume came from in the node's attribute
    ``DICOM.instanceUIDs`` (space-separated SOP instance UIDs); the modality is read from the
    DICOM database (``slicer.dicomDatabase``, or ``database``) for the first of them. A volume
    not loaded from DICOM, a Slicer without a DICOM database, or an instance the database no
    longer has gives None (medsam3d then guesses the modality from the intensities).
    """
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids:
        return None
    if database is None:
        try:
            import slicer
        except ImportError:
            return None
        database = getattr(slicer, "dicomDatabase", None)
        if database is None:
            return None
    try:
        value = database.instanceValue(uids[0], MODALITY_TAG)
        if not value:
            path = database.fileForInstance(uids[0])
            value = database.fileValue(path, MODALITY_TAG) if path else ""
    except Exception:  # noqa: BLE001 - a database without the instance (or closed) is no modality
        return None
    value = str(value or "").strip().upper()
    return value or None


def update_volume_node(volume_node, array_ijk: np.ndarray, ijk_to_ras_matrix: np.ndarray) -> None:
    """Set a scalar (or label map) volume node's voxels from ``array[i, j, k]`` and its ``IJKToRAS``."""
    volume_node.SetAndObserveImageData(_image_data(array_ijk))
    volume_node.SetIJKToRASMatrix(array_to_matrix(ijk_to_ras_matrix))


def _image_data(array_ijk: np.ndarray):
    import vtk
    from vtkmodules.util import numpy_support

    array_ijk = np.asarray(array_ijk)
    if array_ijk.ndim != 3:
        raise ValueError(f"expected a 3D array [i, j, k], found shape {array_ijk.shape}")
    if array_ijk.dtype == np.bool_:
        array_ijk = array_ijk.astype(np.uint8)
    kji = np.ascontiguousarray(array_ijk.transpose(2, 1, 0))
    image = vtk.vtkImageData()
    image.SetDimensions(*array_ijk.shape)
    scalars = numpy_support.numpy_to_vtk(kji.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    return image


def write_volume_file(volume_node, path: str, compress: bool = False) -> str:
    """Write the volume with Slicer's own writer (``.nrrd`` or ``.nii``/``.nii.gz``) for an upload;
    the node's own storage node and file name are left alone. Returns ``path``.

    Uncompressed by default: the file is written on Slicer's main thread, and gzip would hold
    the GUI for seconds on a large CT for little gain on a loopback or LAN upload."""
    scene = volume_node.GetScene()
    if scene is None:
        raise ValueError("expected a volume node in a scene, found one without")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        storage.SetFileName(str(path))
        storage.SetUseCompression(1 if compress else 0)
        if not storage.WriteData(volume_node):
            raise OSError(f"could not write '{volume_node.GetName()}' to {path}")
    finally:
        scene.RemoveNode(storage)
    return str(path)


# ---------------------------------------------------------------------- ROIs -> prompts
def roi_corners_ras(roi_node, volume_node) -> np.ndarray:
    """The 8 corners (8, 3) of a markups ROI in the volume's own RAS (the ROI's and the volume's
    linear transforms applied); a rotated ROI keeps its rotation."""
    if roi_node is None or roi_node.GetNumberOfControlPoints() == 0:
        raise ValueError("expected a placed ROI, found an empty one; place the ROI box first")
    parent_to_world(roi_node)  # refuses non-linear transforms of the ROI
    object_to_world = matrix_to_array(roi_node.GetObjectToWorldMatrix())
    world_to_volume = np.linalg.inv(parent_to_world(volume_node))
    half = np.asarray(roi_node.GetSize(), dtype=np.float64) / 2.0
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    corners = np.c_[signs * half, np.ones(8)]
    return (world_to_volume @ object_to_world @ corners.T).T[:, :3]


def roi_is_axis_aligned(roi_node, volume_node, tol: float = 1e-6) -> bool:
    """True when the ROI's edges run along R, A and S of the volume's RAS (not rotated)."""
    object_to_world = matrix_to_array(roi_node.GetObjectToWorldMatrix())
    rotation = (np.linalg.inv(parent_to_world(volume_node)) @ object_to_world)[:3, :3]
    rotation = rotation / np.linalg.norm(rotation, axis=0)
    return bool(np.all((np.abs(rotation) < tol) | (np.abs(rotation) > 1 - tol)))


def covering_voxel_box(corners_ras: np.ndarray, ijk_to_ras_matrix: np.ndarray,
                       shape_ijk: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """The inclusive voxel index range ``(lo, hi)`` (each ``[i, j, k]``) whose centres the corners'
    box covers, clipped to the image; medsam3d's rule for ``box_ras`` and rotated ROIs (a centre
    within 1/1000 voxel of a face counts as inside). An axis where the box holds no centre (a
    flat ROI between two slices) gets the nearest one. Raises ValueError outside the image."""
    ijk = (np.linalg.inv(ijk_to_ras_matrix) @ np.c_[np.asarray(corners_ras, float), np.ones(len(corners_ras))].T).T[:, :3]
    lo = np.ceil(ijk.min(axis=0) - FACE_TOLERANCE).astype(int)
    hi = np.floor(ijk.max(axis=0) + FACE_TOLERANCE).astype(int)
    centre = np.rint(ijk.mean(axis=0)).astype(int)
    flat = hi < lo
    lo[flat], hi[flat] = centre[flat], centre[flat]
    shape = np.asarray(shape_ijk, dtype=int)
    if np.any(hi < 0) or np.any(lo > shape - 1):
        raise ValueError(f"expected the ROI to overlap the volume, found it outside (voxel range "
                         f"{lo.tolist()}..{hi.tolist()}, volume 0..{(shape - 1).tolist()}); place it on this volume")
    return np.maximum(lo, 0), np.minimum(hi, shape - 1)


def prompt_entry_from_roi(roi_node, volume_node, name: Optional[str] = None) -> Dict[str, Any]:
    """One ROI -> one entry of a medsam3d prompt document (version 1), named ``name`` (the ROI's
    name by default):

    * a ROI that covers one slice of the volume (drawn flat on a slice) -> a 2D box
      ``{"slice": k, "box": [i0, j0, i1, j1]}``: medsam3d finds where the object ends;
    * an unrotated ROI -> ``{"box_ras": [[R, A, S] min, [R, A, S] max]}`` in the volume's RAS mm
      (medsam3d turns it into a 3D box: the slice range is given);
    * a rotated ROI -> the voxel box covering its 8 corners, ``{"slice", "box", "z_range"}``
      (what medsam3d does with a rotated ROI in a markups file).
    """
    corners = roi_corners_ras(roi_node, volume_node)
    matrix = ijk_to_ras(volume_node)
    shape = volume_node.GetImageData().GetDimensions()
    lo, hi = covering_voxel_box(corners, matrix, shape)
    entry: Dict[str, Any] = {"name": name if name is not None else roi_node.GetName()}
    box = [int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1])]
    if hi[2] == lo[2]:
        entry.update({"slice": int(lo[2]), "box": box})
    elif roi_is_axis_aligned(roi_node, volume_node):
        entry["box_ras"] = [corners.min(axis=0).tolist(), corners.max(axis=0).tolist()]
    else:
        entry.update({"slice": int((lo[2] + hi[2]) // 2), "box": box, "z_range": [int(lo[2]), int(hi[2])]})
    return entry


def prompts_from_rois(roi_nodes: Iterable, volume_node, names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """ROIs -> a medsam3d prompt document (version 1): one entry per ROI, named after the ROI
    (``names`` overrides); ROIs with the same name prompt one object."""
    roi_nodes = list(roi_nodes)
    if not roi_nodes:
        raise ValueError("expected at least one ROI, found none; place a ROI box around each object")
    names = list(names) if names is not None else [None] * len(roi_nodes)
    return {"version": 1, "objects": [prompt_entry_from_roi(r, volume_node, n) for r, n in zip(roi_nodes, names)]}


def slice_index(slice_node, volume_node) -> int:
    """The volume's slice ``k`` a slice view shows. Raises ValueError when the view does not show
    a k-slice of the volume (another orientation, or an oblique cut)."""
    slice_to_world = matrix_to_array(slice_node.GetSliceToRAS())
    to_ijk = np.linalg.inv(ijk_to_ras(volume_node)) @ np.linalg.inv(parent_to_world(volume_node)) @ slice_to_world
    normal = to_ijk[:3, 2]
    if abs(normal[2]) < 1e-9 or np.hypot(normal[0], normal[1]) > 1e-3 * abs(normal[2]):
        raise ValueError(f"expected the slice view '{slice_node.GetName()}' to show a slice of the volume's k axis, "
                         "found another orientation; use the view of the volume's acquisition plane (slice view menu: "
                         "Rotate to volume plane)")
    k = int(round(to_ijk[2, 3]))
    depth = volume_node.GetImageData().GetDimensions()[2]
    if not 0 <= k < depth:
        raise ValueError(f"expected the slice view inside the volume (slices 0..{depth - 1}), found slice {k}")
    return k


def refine_box(roi_node, volume_node, slice_node) -> Tuple[int, List[int]]:
    """The ROI's box on the slice a view shows: ``(k, [i0, j0, i1, j1])`` (the refine prompt).

    Raises ValueError when the ROI does not reach that slice (its voxel box's slices ``lo..hi``
    do not hold ``k``; a flat ROI holds the slice nearest to it): the box would otherwise be
    put on a slice where the user never drew it."""
    k = slice_index(slice_node, volume_node)
    lo, hi = covering_voxel_box(roi_corners_ras(roi_node, volume_node), ijk_to_ras(volume_node),
                                volume_node.GetImageData().GetDimensions())
    if not lo[2] <= k <= hi[2]:
        where = f"slice {lo[2]}" if lo[2] == hi[2] else f"slices {lo[2]}..{hi[2]}"
        raise ValueError(f"expected the ROI '{roi_node.GetName()}' to reach the slice shown in "
                         f"'{slice_node.GetName()}' (k = {k}), found it on {where}; move the ROI onto this slice, "
                         "or show one of its slices")
    return k, [int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1])]


# ---------------------------------------------------------------------- label maps <-> segmentations
def _label_dtype(array: np.ndarray):
    if array.size and int(array.min()) < 0:
        raise ValueError("expected label values >= 0, found negative ones")
    top = int(array.max()) if array.size else 0
    return np.uint8 if top < 256 else np.int16 if top < 32768 else np.int32


def labels_to_segmentation(array_ijk: np.ndarray, ijk_to_ras_matrix: np.ndarray, segments: Dict[int, Dict[str, Any]],
                           segmentation_node, segmentations_logic, reference_volume_node=None) -> List[str]:
    """A label map -> ``segmentation_node``'s segments (replacing the ones it had), one per value
    of ``segments`` (named and coloured from it; values in the array without an entry get
    ``label N``; an entry whose value is absent becomes an empty segment). The node gets the
    reference volume's geometry and parent transform. Returns the segment ids, in label order.
    """
    array_ijk = np.asarray(array_ijk)
    scene = segmentation_node.GetScene()
    if scene is None:
        raise ValueError("expected a segmentation node in a scene, found one without")
    segments = {int(k): dict(v) for k, v in (segments or {}).items()}
    for value in np.unique(array_ijk):
        if value != 0:
            segments.setdefault(int(value), {"name": f"label {int(value)}"})
    segmentation = segmentation_node.GetSegmentation()
    segmentation.RemoveAllSegments()
    if reference_volume_node is not None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        segmentation_node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        update_volume_node(labelmap, array_ijk.astype(_label_dtype(array_ijk), copy=False), ijk_to_ras_matrix)
        if np.any(array_ijk) and not segmentations_logic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node):
            raise RuntimeError("Slicer could not import the label map into the segmentation")
    finally:
        scene.RemoveNode(labelmap)
    by_value = {}
    for n in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(n)
        by_value[int(segment.GetLabelValue())] = segmentation.GetNthSegmentID(n)
    ids = []
    for value in sorted(segments):
        info = segments[value]
        color = tuple(float(c) for c in info.get("color") or _default_color(value))
        segment_id = by_value.get(value)
        if segment_id is None:  # an object with no voxels: an empty segment, so that it is seen and named
            segment_id = segmentation.AddEmptySegment(f"label_{value}", str(info.get("name", f"label {value}")), color)
        segment = segmentation.GetSegment(segment_id)
        segment.SetName(str(info.get("name", f"label {value}")))
        segment.SetColor(*color)
        if segment.GetLabelValue() != value:  # an empty segment: no voxel carries its value
            segment.SetLabelValue(value)
        ids.append(segment_id)
    return ids


def read_segmentation_file(path: str, segmentation_node, reference_volume_node=None) -> List[str]:
    """Load a ``.seg.nrrd`` (names, colours, label values as written by medsam3d) into
    ``segmentation_node``, replacing its segments; the node gets the reference volume's geometry
    and parent transform. Returns the segment ids."""
    scene = segmentation_node.GetScene()
    if scene is None:
        raise ValueError("expected a segmentation node in a scene, found one without")
    segmentation_node.GetSegmentation().RemoveAllSegments()
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    try:
        storage.SetFileName(str(path))
        if not storage.ReadData(segmentation_node):
            raise OSError(f"Slicer could not read the segmentation {path}")
    finally:
        scene.RemoveNode(storage)
    if reference_volume_node is not None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        segmentation_node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]


def segmentation_to_labels(segmentation_node, segmentations_logic, reference_volume_node
                           ) -> Tuple[np.ndarray, np.ndarray, Dict[int, Dict[str, Any]]]:
    """``segmentation_node`` -> a label map on the reference volume's grid: ``(array[i, j, k],
    ijk_to_ras, segments)``. Each segment keeps its label value when they are distinct and
    positive (as :func:`labels_to_segmentation` sets them), else gets 1, 2, ... in order;
    overlapping segments: the later one wins."""
    import vtk

    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    values = [int(segmentation.GetSegment(i).GetLabelValue()) for i in ids]
    if len(set(values)) != len(values) or min(values, default=1) < 1:
        values = list(range(1, len(ids) + 1))
    scene = segmentation_node.GetScene()
    shape = reference_volume_node.GetImageData().GetDimensions()
    out = np.zeros(shape, dtype=np.int32)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        for segment_id, value in zip(ids, values):
            one = vtk.vtkStringArray()
            one.InsertNextValue(segment_id)
            if not segmentations_logic.ExportSegmentsToLabelmapNode(segmentation_node, one, labelmap,
                                                                    reference_volume_node):
                raise RuntimeError(f"Slicer could not export segment {segment_id!r}")
            out[_array_kji(labelmap.GetImageData()).transpose(2, 1, 0) > 0] = value
    finally:
        scene.RemoveNode(labelmap)
    segments = {value: {"name": segmentation.GetSegment(i).GetName(),
                        "color": tuple(float(c) for c in segmentation.GetSegment(i).GetColor())}
                for i, value in zip(ids, values)}
    return out.astype(_label_dtype(out)), ijk_to_ras(reference_volume_node), segments


def show_surface(segmentation_node, visible: bool = True) -> bool:
    """Build the closed-surface representation (the 3D view shows it) or hide it."""
    if not visible:
        display = segmentation_node.GetDisplayNode()
        if display is not None:
            display.SetVisibility3D(False)
        return True
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.GetDisplayNode().SetVisibility3D(True)
    return bool(segmentation_node.CreateClosedSurfaceRepresentation())


def _default_color(value: int) -> Tuple[float, float, float]:
    """A distinct colour per label (the golden-angle hue walk; used when the record gives none)."""
    import colorsys

    return colorsys.hsv_to_rgb((0.13 + 0.618034 * (value - 1)) % 1.0, 0.65, 0.95)


# ---------------------------------------------------------------------- measurements
def measurement_rows(record: Dict[str, Any]) -> List[Dict[str, Any]]:
    """A medsam3d case record (the JSON of ``run_case`` / the server's ``record``) -> one row per
    object: the columns of :data:`TABLE_COLUMNS` (NaN where the record has no value)."""
    rows = []
    for obj in record.get("objects", []):
        whole = (obj.get("measurements") or {}).get("whole") or {}
        spread = obj.get("volume_ml_range") or [math.nan, math.nan]
        rows.append({
            "name": obj.get("name", ""), "label": obj.get("label"), "volume_ml": obj.get("volume_ml"),
            "range_min": spread[0], "range_max": spread[1],
            "long_axis_mm": whole.get("long_axis_mm"), "short_axis_mm": whole.get("short_axis_mm"),
            "max_diameter_3d_mm": whole.get("max_diameter_3d_mm"), "voxels": obj.get("voxels"),
            "lesions": whole.get("lesions"), "flags": " ".join(obj.get("flags") or []),
        })
    return rows


def fill_measurements_table(table_node, record: Dict[str, Any]) -> None:
    """Fill a table node with the record's measurements (one row per object, units in the
    column titles and unit labels) and keep the whole record, as JSON, in the node's attribute
    ``MedSAM3D.record`` (saved with the scene)."""
    import vtk

    rows = measurement_rows(record)
    table = vtk.vtkTable()
    for title, unit, key in TABLE_COLUMNS:
        text = key in ("name", "flags")
        column = vtk.vtkStringArray() if text else vtk.vtkDoubleArray()
        column.SetName(f"{title} ({unit})" if unit else title)
        for row in rows:
            value = row[key]
            if text:
                column.InsertNextValue(str(value))
            else:
                column.InsertNextValue(math.nan if value is None else float(value))
        table.AddColumn(column)
    table_node.SetAndObserveTable(table)
    for title, unit, _ in TABLE_COLUMNS:
        if unit:
            table_node.SetColumnUnitLabel(f"{title} ({unit})", unit)
    table_node.SetAttribute("MedSAM3D.record", json.dumps(record, allow_nan=True))


def table_rows(table_node) -> List[Dict[str, Any]]:
    """Read a measurement table back: one dict per row, keyed by column name."""
    table = table_node.GetTable()
    out = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c in range(table.GetNumberOfColumns()):
            column = table.GetColumn(c)
            value = column.GetValue(r)
            row[column.GetName()] = value if isinstance(value, str) else float(value)
        out.append(row)
    return out
