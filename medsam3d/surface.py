"""The one surface of a label: closed, manifold, outward, in patient millimetres.

Both :mod:`medsam3d.mesh` (files, pictures) and :mod:`medsam3d.measure` (mesh volume,
surface area, sphericity, largest 3D diameter) build a label's surface here, so the package
reports one mesh volume per mask.

How the surface is made, and why:

* The label's voxels are cut out with a one-voxel margin of background (so an object cut by
  the image border is still closed) and contoured by marching cubes (scikit-image's Lewiner
  variant, whose case tables are topologically consistent) at the level ``0.5 - 1e-4``
  between background (0) and label (1). On a binary mask the level 0.5 is exactly the
  value of the saddle of every ambiguous face (two label voxels touching along an edge,
  diagonally across the face): the face test then ties, and the two cubes that share the
  face can resolve it differently, which leaves edges with four triangles. Just below 0.5
  every tie is decided the same way everywhere: label voxels that touch along an edge are
  joined by a thin bridge, and voxels that touch only at a corner stay apart (the cube's
  interior test). Each triangle edge then lies in a cube face shared by exactly two cubes
  and each vertex on a grid edge shared by four, so every edge has exactly two triangles and
  every vertex one fan: closed and manifold for any mask, one-voxel-thin parts, cavities
  and several components included. The vertices move by 1e-4 voxel, nothing measurable.
* It is the marching-cubes surface at level 0.5 that IBSI and pyradiomics define their
  mesh-based shape features on, so ``measure`` agrees with pyradiomics. Its enclosed volume
  is close to the voxel volume for compact objects; it cuts the voxels' corners, so one
  voxel encloses 1/6 of its volume and a one-voxel-thin line half of it.
* Vertices go from voxel indices to world millimetres through the exact affine (any
  spacing, flips, oblique axes); RAS by default, LPS on request. Triangles are ordered
  counter-clockwise seen from outside (outward normals, positive signed volume), also under
  a mirroring affine (det < 0).
* Smoothing (``smooth`` iterations, for files and pictures) is VTK's windowed-sinc filter,
  which moves vertices and never changes which vertices form which triangle: the surface
  stays closed and manifold. Boundary and feature-edge smoothing are off; the pass band is
  low (little shrinkage). Each piece is then moved along its normals until it encloses its
  volume from before smoothing again, so a file encloses the mesh volume ``measure``
  reports (a piece of a voxel or two only in part: that offset is bounded). Decimation
  (``decimate``) uses quadric decimation and is kept only when its result is still closed,
  manifold, outward and in as many pieces; otherwise it is skipped with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .errors import GeometryError
from .volume import LPS_TO_RAS, Volume

log = logging.getLogger(__name__)

#: marching-cubes level: just below 0.5, so ambiguous faces are all resolved the same way
LEVEL = 0.5 - 1e-4

#: windowed-sinc pass band used for smoothing (low: little shrinkage)
PASS_BAND = 0.1


@dataclass(frozen=True)
class Surface:
    """A triangle surface in world millimetres: ``vertices`` (V, 3) and ``faces`` (F, 3) indices,
    counter-clockwise seen from outside. ``space`` is "RAS" or "LPS"; ``notes`` says what was
    done to it (smoothing, decimation, or why a step was skipped)."""

    vertices: np.ndarray
    faces: np.ndarray
    space: str = "RAS"
    notes: dict = field(default_factory=dict)

    @property
    def signed_volume_mm3(self) -> float:
        """Enclosed volume by the divergence theorem: positive when the triangles face outward."""
        v = self.vertices
        a, b, c = v[self.faces[:, 0]], v[self.faces[:, 1]], v[self.faces[:, 2]]
        centre = v.mean(axis=0) if len(v) else np.zeros(3)  # about the centre: less cancellation
        a, b, c = a - centre, b - centre, c - centre
        return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)

    @property
    def volume_mm3(self) -> float:
        """Enclosed volume (mm^3) of the closed, outward surface."""
        return abs(self.signed_volume_mm3)

    @property
    def area_mm2(self) -> float:
        """Surface area (mm^2)."""
        v = self.vertices
        a, b, c = v[self.faces[:, 0]], v[self.faces[:, 1]], v[self.faces[:, 2]]
        return float(0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1).sum())

    @property
    def bounds(self) -> np.ndarray:
        """(3, 2): min and max of x, y, z in this surface's space."""
        return np.column_stack([self.vertices.min(axis=0), self.vertices.max(axis=0)])

    def topology(self) -> dict[str, int | bool]:
        """Edge and vertex counts that say whether the surface is a closed, oriented 2-manifold.

        ``boundary_edges``: edges with one triangle; ``nonmanifold_edges``: edges with three or
        more; ``misoriented_edges``: edges that two triangles traverse in the same direction;
        ``nonmanifold_vertices``: vertices whose triangles form more than one fan;
        ``regions``: connected pieces; ``euler``: V - E + F (2 per sphere-like piece).
        """
        return topology(self.faces, len(self.vertices))

    def vertex_normals(self) -> np.ndarray:
        """Unit outward normals per vertex (area-weighted over its triangles)."""
        v, f = self.vertices, self.faces
        fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
        normals = np.zeros_like(v)
        for k in range(3):
            np.add.at(normals, f[:, k], fn)
        length = np.linalg.norm(normals, axis=1, keepdims=True)
        return normals / np.where(length > 0, length, 1.0)

    def to_vtk(self):
        """The surface as ``vtkPolyData`` (triangles, outward point normals, the space as field data)."""
        import vtk
        from vtk.util import numpy_support

        poly = vtk.vtkPolyData()
        points = vtk.vtkPoints()
        points.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(self.vertices, np.float64), deep=True))
        poly.SetPoints(points)
        cells = vtk.vtkCellArray()
        offsets = np.arange(0, 3 * len(self.faces) + 1, 3, dtype=np.int64)
        cells.SetData(numpy_support.numpy_to_vtkIdTypeArray(offsets, deep=True),
                      numpy_support.numpy_to_vtkIdTypeArray(np.ascontiguousarray(self.faces, np.int64).ravel(),
                                                            deep=True))
        poly.SetPolys(cells)
        normals = numpy_support.numpy_to_vtk(self.vertex_normals(), deep=True)
        normals.SetName("Normals")
        poly.GetPointData().SetNormals(normals)
        tag = vtk.vtkStringArray()
        tag.SetName("space")
        tag.InsertNextValue(self.space)
        poly.GetFieldData().AddArray(tag)
        return poly

    @classmethod
    def from_vtk(cls, poly, space: str | None = None) -> "Surface":
        """A surface from ``vtkPolyData`` (polygons are triangulated; lines and vertices are ignored)."""
        import vtk
        from vtk.util import numpy_support

        if space is None:
            arr = poly.GetFieldData().GetAbstractArray("space")
            space = arr.GetValue(0) if arr is not None and arr.GetNumberOfValues() else "RAS"
        tri = vtk.vtkTriangleFilter()
        tri.SetInputData(poly)
        tri.PassLinesOff()
        tri.PassVertsOff()
        tri.Update()
        out = tri.GetOutput()
        if out.GetNumberOfPoints() == 0:
            return cls(np.zeros((0, 3)), np.zeros((0, 3), np.int64), space)
        vertices = numpy_support.vtk_to_numpy(out.GetPoints().GetData()).astype(np.float64)
        conn = numpy_support.vtk_to_numpy(out.GetPolys().GetConnectivityArray()).astype(np.int64)
        return cls(vertices, conn.reshape(-1, 3), space)


def topology(faces: np.ndarray, n_vertices: int) -> dict[str, int | bool]:
    """See :meth:`Surface.topology`."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    faces = np.asarray(faces, np.int64).reshape(-1, 3)
    n = int(n_vertices)
    f = len(faces)
    first = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])  # corner c of a triangle: edge first->second
    second = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    _, counts = np.unique(np.minimum(first, second) * n + np.maximum(first, second), return_counts=True)
    _, dcounts = np.unique(first * n + second, return_counts=True)
    boundary, nonmanifold = int((counts == 1).sum()), int((counts > 2).sum())
    misoriented = int((dcounts > 1).sum())
    # fans: the triangles around a vertex, linked when they share an edge at that vertex
    third = np.concatenate([faces[:, 2], faces[:, 0], faces[:, 1]])
    corners = np.arange(3 * f)
    keys = np.concatenate([first * n + second, first * n + third])  # (vertex, neighbour) of each corner's two edges
    ids = np.concatenate([corners, corners])
    order = np.argsort(keys, kind="stable")
    keys, ids = keys[order], ids[order]
    same = keys[1:] == keys[:-1]
    graph = coo_matrix((np.ones(int(same.sum())), (ids[:-1][same], ids[1:][same])), shape=(3 * f, 3 * f))
    _, fan = connected_components(graph, directed=False)
    fans = np.unique(first * (3 * f) + fan) // (3 * f)
    fans_per_vertex = np.bincount(fans, minlength=n)
    nonmanifold_vertices = int((fans_per_vertex > 1).sum())
    used = int((fans_per_vertex > 0).sum())
    # regions: pieces connected through their edges
    edges = coo_matrix((np.ones(len(first)), (first, second)), shape=(n, n))
    labels = connected_components(edges, directed=False)[1]
    regions = len(np.unique(labels[first])) if f else 0
    euler = used - len(counts) + f
    closed = boundary == 0 and nonmanifold == 0 and nonmanifold_vertices == 0 and f > 0
    return {"boundary_edges": boundary, "nonmanifold_edges": nonmanifold, "misoriented_edges": misoriented,
            "nonmanifold_vertices": nonmanifold_vertices, "regions": regions, "euler": int(euler),
            "closed_manifold": bool(closed), "oriented": bool(closed and misoriented == 0)}


def mask_surface(mask: np.ndarray, affine: np.ndarray, *, space: str = "RAS") -> Surface:
    """The closed, manifold, outward marching-cubes surface of a 3D boolean mask, in world mm.

    ``affine`` maps voxel indices (i, j, k) to RAS mm; ``space="LPS"`` gives LPS coordinates.
    """
    from skimage.measure import marching_cubes

    space = _space(space)
    mask = np.asarray(mask, bool)
    if mask.ndim != 3:
        raise GeometryError(f"expected a 3D mask, found {mask.ndim} dimensions")
    spans = [np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
    if not all(len(span) for span in spans):
        raise GeometryError("expected voxels in the mask to build a surface, found none")
    lo, hi = np.array([span[0] for span in spans]), np.array([span[-1] + 1 for span in spans])
    crop = np.pad(mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], 1).astype(np.float32)
    verts, faces, _, _ = marching_cubes(crop, level=LEVEL, method="lewiner")
    index = verts.astype(np.float64) + (lo - 1)  # back to voxel indices of the whole grid
    faces = np.asarray(faces, np.int64)
    # scikit-image's winding, seen in index space: fixed here so triangles face outward in world mm
    if _signed_volume(index, faces) < 0:
        faces = faces[:, ::-1].copy()
    matrix = np.asarray(affine, float) if space == "RAS" else LPS_TO_RAS @ np.asarray(affine, float)
    world = index @ matrix[:3, :3].T + matrix[:3, 3]
    if np.linalg.det(matrix[:3, :3]) < 0:  # a mirroring affine turns the winding over
        faces = faces[:, ::-1].copy()
    return Surface(world, faces, space)


def label_surface(labels: Volume, label: int, *, space: str = "RAS", smooth: int = 0,
                  decimate: float = 0.0) -> Surface:
    """The surface of one label of a label map; ``smooth`` windowed-sinc iterations and
    ``decimate`` (fraction of triangles to remove) on request (both need VTK).

    With ``smooth=0`` and no decimation this is the surface that ``measure`` measures.
    """
    array = np.asarray(labels.array)
    mask = array == label
    if not mask.any():
        raise GeometryError(f"expected voxels with label {label}, found none (labels present: "
                            f"{sorted(int(v) for v in np.unique(array) if v)})")
    surface = mask_surface(mask, labels.affine, space=space)
    if smooth and smooth > 0:
        surface = smooth_surface(surface, int(smooth))
    if decimate and decimate > 0:
        surface = decimate_surface(surface, float(decimate))
    return surface


def smooth_surface(surface: Surface, iterations: int, *, pass_band: float = PASS_BAND) -> Surface:
    """Windowed-sinc smoothing (VTK): vertices move, the triangles stay, so the surface stays
    closed and manifold. Boundary, feature-edge and non-manifold smoothing are off."""
    from .errors import require

    vtk = require("vtk", "mesh smoothing")
    from vtk.util import numpy_support

    if iterations <= 0 or not len(surface.faces):
        return surface
    sinc = vtk.vtkWindowedSincPolyDataFilter()
    sinc.SetInputData(surface.to_vtk())
    sinc.SetNumberOfIterations(int(iterations))
    sinc.SetPassBand(pass_band)
    sinc.BoundarySmoothingOff()
    sinc.FeatureEdgeSmoothingOff()
    sinc.NonManifoldSmoothingOff()
    sinc.NormalizeCoordinatesOn()
    sinc.Update()
    out = sinc.GetOutput()
    if out.GetNumberOfPoints() != len(surface.vertices) or out.GetNumberOfCells() != len(surface.faces):
        log.warning("smoothing changed the surface's vertices or triangles: kept it unsmoothed")
        return Surface(surface.vertices, surface.faces, surface.space, {**surface.notes, "smooth": 0})
    vertices = numpy_support.vtk_to_numpy(out.GetPoints().GetData()).astype(np.float64)
    vertices = _restore_volumes(surface, vertices)
    return Surface(vertices, surface.faces, surface.space, {**surface.notes, "smooth": int(iterations)})


def _restore_volumes(surface: Surface, smoothed: np.ndarray, *, steps: int = 8) -> np.ndarray:
    """Give each connected piece of a smoothed surface back the volume it had before smoothing.

    Smoothing shrinks thin parts (a one-voxel line, a single voxel) much more than compact
    ones. Each piece is moved along its outward vertex normals by one distance, found by a
    Newton step (the volume grows by the area times the distance) and then secant steps, and
    bounded by half the unsmoothed piece's smallest extent, so the file encloses the volume
    ``measure`` reports.
    A piece that would still turn inside out keeps its unsmoothed vertices.
    """
    faces = surface.faces
    region = _vertex_regions(faces, len(smoothed))
    face_region = region[faces[:, 0]]
    n = int(region.max()) + 1
    target = _region_volumes(surface.vertices, faces, face_region, n)
    extent = np.full(n, np.inf)
    for axis in range(3):  # half the smallest extent of each piece bounds the offset
        lo = np.full(n, np.inf)
        hi = np.full(n, -np.inf)
        np.minimum.at(lo, region, surface.vertices[:, axis])
        np.maximum.at(hi, region, surface.vertices[:, axis])
        extent = np.minimum(extent, hi - lo)
    cap = 0.5 * extent
    normals = Surface(smoothed, faces).vertex_normals()
    offset = np.zeros(n)
    current = _region_volumes(smoothed, faces, face_region, n)
    area = np.bincount(face_region, weights=_face_areas(smoothed, faces), minlength=n)
    slope = np.where(area > 0, area, 1.0)  # d volume / d offset: the area first, then secants
    vertices = smoothed
    for _ in range(steps):
        miss = target - current
        if np.all(np.abs(miss) <= 1e-4 * np.abs(target)):
            break
        new_offset = np.clip(offset + miss / slope, -cap, cap)
        vertices = smoothed + new_offset[region][:, None] * normals
        new = _region_volumes(vertices, faces, face_region, n)
        moved = np.abs(new_offset - offset) > 1e-12
        secant = (new - current) / np.where(moved, new_offset - offset, 1.0)
        slope = np.where(moved & (secant > 0), secant, slope)
        offset, current = new_offset, new
    vertices = vertices.copy()
    final = _region_volumes(vertices, faces, face_region, n)
    folded = np.sign(final) != np.sign(target)
    if folded.any():
        log.warning("smoothing would turn %d piece(s) of the surface inside out: kept them unsmoothed",
                    int(folded.sum()))
        back = folded[region]
        vertices[back] = surface.vertices[back]
    return vertices


def _vertex_regions(faces: np.ndarray, n_vertices: int) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n_vertices, n_vertices))
    return connected_components(graph, directed=False)[1]


def _face_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    return 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)


def _region_volumes(vertices: np.ndarray, faces: np.ndarray, face_region: np.ndarray, n: int) -> np.ndarray:
    centre = vertices.mean(axis=0)
    a, b, c = (vertices[faces[:, k]] - centre for k in range(3))
    return np.bincount(face_region, weights=np.einsum("ij,ij->i", a, np.cross(b, c)) / 6.0, minlength=n)


def decimate_surface(surface: Surface, fraction: float) -> Surface:
    """Quadric decimation (VTK) removing ``fraction`` of the triangles, kept only when the result
    is still closed, manifold, consistently oriented and outward, with the same number of pieces;
    otherwise the surface comes back undecimated with a warning (``notes["decimate"]`` is 0)."""
    if not 0 < fraction < 1:
        raise GeometryError(f"expected --decimate between 0 and 1 (fraction removed), found {fraction}")
    return _checked_decimation(surface, fraction, _quadric_decimation)


def _quadric_decimation(surface: Surface, fraction: float) -> Surface:
    from .errors import require

    vtk = require("vtk", "mesh decimation")
    dec = vtk.vtkQuadricDecimation()
    dec.SetInputData(surface.to_vtk())
    dec.SetTargetReduction(float(fraction))
    dec.VolumePreservationOn()
    dec.Update()
    return Surface.from_vtk(dec.GetOutput(), surface.space)


def _checked_decimation(surface: Surface, fraction: float, decimator) -> Surface:
    result = decimator(surface, fraction)
    if len(result.faces):
        check, before = result.topology(), surface.topology()
        if check["oriented"] and check["regions"] == before["regions"] and result.signed_volume_mm3 > 0:
            return Surface(result.vertices, result.faces, surface.space, {**surface.notes, "decimate": fraction})
    log.warning("decimation would leave the surface open, non-manifold or in other pieces: kept all %d triangles",
                len(surface.faces))
    return Surface(surface.vertices, surface.faces, surface.space, {**surface.notes, "decimate": 0.0})


def _signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    return Surface(vertices, faces).signed_volume_mm3


def _space(space: str) -> str:
    space = str(space).upper()
    if space not in ("RAS", "LPS"):
        raise GeometryError(f"expected space RAS or LPS, found {space!r}")
    return space
