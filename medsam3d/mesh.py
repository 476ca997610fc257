"""Surface meshes of label maps in patient coordinates, and their files.

``label_mesh(labels, label)`` is the label's surface from :mod:`medsam3d.surface` (the same
surface ``measure`` measures: marching cubes on the label padded by one voxel, closed,
manifold and outward for every mask), smoothed with a windowed-sinc filter (``smooth``
iterations; each piece keeps the volume it had before smoothing), decimated on request
(``decimate`` = fraction of triangles to remove, skipped with a warning when the result
would not stay closed and manifold), in world RAS mm through the exact affine (LPS on
request). Writers: STL, OBJ, PLY, VTP, all atomic; the space is written into STL/PLY/VTP
headers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import VolumeIOError, require
from .io._atomic import atomic_path, full_suffix
from .io._guard import utf8_writable
from .surface import Surface, label_surface
from .volume import Volume

log = logging.getLogger(__name__)

MESH_SUFFIXES = (".stl", ".obj", ".ply", ".vtp")


def mesh_paths(path: str | Path, labels: list[int]) -> dict[int, Path]:
    """Where each label's surface goes: ``path`` itself for one label, ``NAME_label<N>.ext`` beside it for several."""
    path = Path(path)
    suffix = full_suffix(path)
    if len(labels) == 1:
        return {labels[0]: path}
    return {value: path.with_name(f"{path.name[: -len(suffix)]}_label{value}{suffix}") for value in labels}


def write_label_meshes(labels: Volume, values: list[int], path: str | Path | None, staged, *, names_from=None,
                       **options) -> dict[int, tuple[Path | None, dict[str, float | int | bool]]]:
    """Each label's surface (:func:`label_mesh` with ``options``) and its :func:`mesh_properties`;
    written, when ``path`` is given, to its :func:`mesh_paths` file staged in ``staged`` (an
    :class:`~medsam3d.io._atomic.OutputSet`: the files land together or not at all). The file
    names come from ``names_from`` (default: ``values``), so that a label's file name does not
    depend on which other labels were meshed."""
    paths = mesh_paths(path, list(names_from or values)) if path is not None and values else {}
    out = {}
    for value in values:
        poly = label_mesh(labels, value, **options)
        target = paths.get(value)
        if target is not None:
            write_mesh(poly, staged.staged(target), label=value)
        out[value] = (target, mesh_properties(poly))
    return out


def label_mesh(labels: Volume, label: int, *, space: str = "RAS", smooth: int = 15, decimate: float = 0.0):
    """A closed, manifold, outward ``vtkPolyData`` surface of one label in world mm (with point normals)."""
    require("vtk", "meshing")
    return label_surface(labels, label, space=space, smooth=smooth, decimate=decimate).to_vtk()


def mesh_properties(poly) -> dict[str, float | int | bool]:
    """Volume (mm^3), area (mm^2) and closedness of a mesh.

    ``boundary_edges`` (one triangle), ``nonmanifold_edges`` (three or more),
    ``nonmanifold_vertices`` (more than one fan of triangles), ``misoriented_edges`` (two
    triangles running the same way), ``regions`` (connected pieces), ``outward`` (positive
    signed volume); ``watertight`` means closed, manifold and consistently oriented.
    """
    surface = Surface.from_vtk(poly)
    if not len(surface.faces):
        return {"volume_mm3": 0.0, "area_mm2": 0.0, "triangles": 0, "boundary_edges": 0, "nonmanifold_edges": 0,
                "nonmanifold_vertices": 0, "misoriented_edges": 0, "regions": 0, "outward": False,
                "watertight": False}
    top = surface.topology()
    signed = surface.signed_volume_mm3
    return {"volume_mm3": abs(signed), "area_mm2": surface.area_mm2, "triangles": int(len(surface.faces)),
            "boundary_edges": top["boundary_edges"], "nonmanifold_edges": top["nonmanifold_edges"],
            "nonmanifold_vertices": top["nonmanifold_vertices"], "misoriented_edges": top["misoriented_edges"],
            "regions": top["regions"], "outward": signed > 0, "watertight": top["oriented"]}


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
        with utf8_writable(tmp) as name:  # VTK's writers take UTF-8 names only
            writer.SetFileName(name)
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
