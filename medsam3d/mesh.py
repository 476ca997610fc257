"""Surface meshes of label maps with VTK, placed in patient coordinates.

``label_mesh(labels, label)`` runs VTK's SurfaceNets3D (made for label maps) on the
label padded by one voxel (so the surface is closed at the image border), smooths it
with a windowed-sinc filter (``smooth`` iterations, pass band 0.1: low shrinkage), can
decimate it (``decimate`` = fraction of triangles to remove), and maps it from voxel
indices to world RAS mm through the exact affine (LPS on request). Normals are made
consistent and outward, so a mirroring affine (det < 0) still gives a valid solid.
Writers: STL, OBJ, PLY, VTP, all atomic; the space is written into STL/PLY/VTP headers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import GeometryError, VolumeIOError, require
from .io._atomic import atomic_path, full_suffix
from .volume import LPS_TO_RAS, Volume

log = logging.getLogger(__name__)

MESH_SUFFIXES = (".stl", ".obj", ".ply", ".vtp")


def label_mesh(labels: Volume, label: int, *, space: str = "RAS", smooth: int = 15, decimate: float = 0.0):
    """A closed, manifold ``vtkPolyData`` surface of one label in world mm."""
    vtk = require("vtk", "meshing")
    from vtk.util import numpy_support

    space = space.upper()
    if space not in ("RAS", "LPS"):
        raise GeometryError(f"expected space RAS or LPS, found {space!r}")
    mask = np.asarray(labels.array) == label
    if not mask.any():
        raise GeometryError(f"expected voxels with label {label}, found none (labels present: "
                            f"{sorted(int(v) for v in np.unique(labels.array) if v)})")
    padded = np.pad(mask.astype(np.uint8), 1)
    image = vtk.vtkImageData()
    image.SetDimensions(*padded.shape)
    image.SetOrigin(-1.0, -1.0, -1.0)  # padded index space: voxel (0,0,0) of the label at the origin
    image.SetSpacing(1.0, 1.0, 1.0)
    scalars = numpy_support.numpy_to_vtk(padded.ravel(order="F"), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)

    nets = vtk.vtkSurfaceNets3D()
    nets.SetInputData(image)
    nets.SetValue(0, 1)
    nets.SetBackgroundLabel(0)
    nets.SetOutputMeshTypeToTriangles()
    nets.SmoothingOff()  # smoothing below, with a filter that preserves volume better
    poly_port = nets.GetOutputPort()
    if smooth and smooth > 0:
        sinc = vtk.vtkWindowedSincPolyDataFilter()
        sinc.SetInputConnection(poly_port)
        sinc.SetNumberOfIterations(int(smooth))
        sinc.SetPassBand(0.1)
        sinc.BoundarySmoothingOff()
        sinc.FeatureEdgeSmoothingOff()
        sinc.NonManifoldSmoothingOn()
        sinc.NormalizeCoordinatesOn()
        poly_port = sinc.GetOutputPort()
    if decimate and decimate > 0:
        if not 0 < decimate < 1:
            raise GeometryError(f"expected --decimate between 0 and 1 (fraction removed), found {decimate}")
        dec = vtk.vtkQuadricDecimation()
        dec.SetInputConnection(poly_port)
        dec.SetTargetReduction(float(decimate))
        dec.VolumePreservationOn()
        poly_port = dec.GetOutputPort()

    matrix = labels.affine if space == "RAS" else LPS_TO_RAS @ labels.affine
    transform = vtk.vtkTransform()
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r, c]))
    transform.SetMatrix(m)
    tf = vtk.vtkTransformPolyDataFilter()
    tf.SetInputConnection(poly_port)
    tf.SetTransform(transform)
    clean = vtk.vtkCleanPolyData()
    clean.SetInputConnection(tf.GetOutputPort())
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputConnection(clean.GetOutputPort())
    normals.ConsistencyOn()
    normals.AutoOrientNormalsOn()
    normals.SplittingOff()
    normals.Update()
    poly = vtk.vtkPolyData()
    poly.DeepCopy(normals.GetOutput())
    tag = vtk.vtkStringArray()
    tag.SetName("space")
    tag.InsertNextValue(space)
    poly.GetFieldData().AddArray(tag)
    return poly


def mesh_properties(poly) -> dict[str, float | int | bool]:
    """Volume (mm^3), area (mm^2), and closedness of a mesh (boundary/non-manifold edges)."""
    import vtk

    props = vtk.vtkMassProperties()
    tri = vtk.vtkTriangleFilter()
    tri.SetInputData(poly)
    props.SetInputConnection(tri.GetOutputPort())
    props.Update()
    edges = vtk.vtkFeatureEdges()
    edges.SetInputData(poly)
    edges.BoundaryEdgesOn()
    edges.NonManifoldEdgesOff()
    edges.FeatureEdgesOff()
    edges.ManifoldEdgesOff()
    edges.Update()
    boundary = edges.GetOutput().GetNumberOfCells()
    edges.BoundaryEdgesOff()
    edges.NonManifoldEdgesOn()
    edges.Update()
    nonmanifold = edges.GetOutput().GetNumberOfCells()
    return {"volume_mm3": props.GetVolume(), "area_mm2": props.GetSurfaceArea(), "triangles": poly.GetNumberOfCells(),
            "boundary_edges": boundary, "nonmanifold_edges": nonmanifold,
            "watertight": boundary == 0 and nonmanifold == 0}


def write_quietly(writer, what: str) -> None:
    """Run a VTK writer with VTK's own error printing off; a failure becomes one line (VolumeIOError)."""
    import vtk

    shown = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        returned = writer.Write()  # 1/0 for polydata writers, None for image writers (void Write)
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(shown)
    if returned == 0 or writer.GetErrorCode():
        raise VolumeIOError(f"expected to write {what}, found the file cannot be written there "
                            f"(VTK error code {writer.GetErrorCode()}); check the folder's permissions and free space")


def write_mesh(poly, path: str | Path, *, label: int | None = None) -> Path:
    """Write a mesh as STL, OBJ, PLY or VTP (atomically)."""
    import vtk

    path = Path(path)
    suffix = full_suffix(path)
    space = "RAS"
    arr = poly.GetFieldData().GetAbstractArray("space")
    if arr is not None:
        space = arr.GetValue(0)
    header = f"medsam3d mesh, label {label}, space {space}, units mm"
    if suffix == ".stl":
        writer = vtk.vtkSTLWriter()
        writer.SetFileTypeToBinary()
        writer.SetHeader(header)
    elif suffix == ".obj":
        writer = vtk.vtkOBJWriter()
    elif suffix == ".ply":
        writer = vtk.vtkPLYWriter()
        writer.SetFileTypeToBinary()
        writer.AddComment(header)
    elif suffix == ".vtp":
        writer = vtk.vtkXMLPolyDataWriter()
    else:
        raise VolumeIOError(f"expected a mesh file ending in {', '.join(MESH_SUFFIXES)}, found '{path.name}'")
    with atomic_path(path) as tmp:
        writer.SetFileName(str(tmp))
        writer.SetInputData(poly)
        write_quietly(writer, f"the mesh to {path}")
    log.info("wrote %s", path)
    return path


def read_mesh(path: str | Path):
    """Read an STL/OBJ/PLY/VTP mesh back (for checks)."""
    import vtk

    suffix = full_suffix(path)
    reader = {".stl": vtk.vtkSTLReader, ".obj": vtk.vtkOBJReader, ".ply": vtk.vtkPLYReader,
              ".vtp": vtk.vtkXMLPolyDataReader}[suffix]()
    reader.SetFileName(str(path))
    reader.Update()
    return reader.GetOutput()
