"""Tumour measurements per label and per connected component (lesion), in true millimetres.

Definitions (all distances in world mm through the exact affine, so anisotropic,
flipped and oblique grids are handled):

* ``volume_ml``: voxel count x ``|det(affine)|`` / 1000, exact.
* ``mesh_volume_ml``, ``surface_mm2``: enclosed volume and area of the lesion's surface from
  :func:`medsam3d.surface.mask_surface`, the one surface of the package (the files of
  ``mesh`` are this surface, smoothed with its volume kept): marching cubes at level 0.5,
  the surface IBSI and pyradiomics define their shape features on, made closed, manifold
  and outward for every mask.
* ``sphericity``: ``(36 pi V^2)^(1/3) / A`` with the mesh volume and area.
* ``max_diameter_3d_mm``: the largest distance between two vertices of that surface.
* RECIST-style axial diameters: on the axial slice (the slice axis closest to S-I) where
  the lesion's area is largest, ``long_axis_mm`` is the largest in-plane distance between
  two contour points and ``short_axis_mm`` the longest chord perpendicular to it.
* ``bbox_ras`` (min/max corners of the voxels), ``centroid_ras``, ``slice_extent``
  (k range), ``touches_border`` and ``border_planes`` (a lesion cut by the image edge is flagged,
  not dropped: its volume is a lower bound).
* With an image: intensity statistics inside the lesion (HU for CT).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .surface import Surface, mask_surface
from .volume import Volume, reorient

log = logging.getLogger(__name__)


def max_distance(points: np.ndarray) -> float:
    """Largest distance between two points (mm), over their convex hull to stay fast."""
    points = np.asarray(points, float)
    if len(points) < 2:
        return 0.0
    try:
        from scipy.spatial import ConvexHull

        hull = points[ConvexHull(points).vertices] if len(points) > points.shape[1] + 1 else points
    except Exception:  # degenerate (flat) point sets
        hull = points
    from scipy.spatial.distance import pdist

    return float(pdist(hull).max()) if len(hull) > 1 else 0.0


def border_planes(mask: np.ndarray) -> list[str]:
    """The grid's outer index planes that a 3D mask reaches, e.g. ``["k=0", "j=511"]``: an object there
    may go on beyond the image, and its volume is then a lower bound."""
    planes = []
    for a, axis in enumerate("ijk"):  # only the six outer planes are read, not the whole mask
        planes += [f"{axis}={v}" for v in (0, mask.shape[a] - 1) if np.take(mask, v, axis=a).any()]
    return planes


def surface_mesh(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mask's surface in world RAS mm (:func:`medsam3d.surface.mask_surface`): vertices (V, 3),
    faces (F, 3), closed, manifold and outward."""
    surface = mask_surface(mask, affine)
    return surface.vertices, surface.faces


def mesh_volume_area(verts: np.ndarray, faces: np.ndarray) -> tuple[float, float]:
    """Enclosed volume (mm^3, divergence theorem) and area (mm^2) of a closed triangle mesh."""
    surface = Surface(np.asarray(verts, float), np.asarray(faces))
    return surface.volume_mm3, surface.area_mm2


def recist_axes(mask2d: np.ndarray, affine2d: np.ndarray) -> dict[str, Any]:
    """Long axis and perpendicular short axis (mm) of a 2D mask.

    ``affine2d`` (3x3 world columns for i, j and the origin) maps (i, j) to world mm.
    Contours are traced at the pixel boundaries (marching squares, level 0.5).
    """
    from skimage.measure import find_contours

    padded = np.pad(mask2d.astype(np.float32), 1)
    contours = [c - 1.0 for c in find_contours(padded, 0.5)]
    if not contours:
        return {"long_axis_mm": 0.0, "short_axis_mm": 0.0}
    pts = np.concatenate(contours)
    world = pts @ affine2d[:, :2].T + affine2d[:, 2]
    from scipy.spatial.distance import pdist, squareform

    try:
        from scipy.spatial import ConvexHull

        hull_idx = ConvexHull(world[:, :2] if np.ptp(world[:, 2]) < 1e-6 else _plane_coords(world)).vertices
    except Exception:
        hull_idx = np.arange(len(world))
    hull = world[hull_idx]
    d = squareform(pdist(hull))
    a, b = np.unravel_index(np.argmax(d), d.shape)
    long_axis = float(d[a, b])
    if long_axis == 0:
        return {"long_axis_mm": 0.0, "short_axis_mm": 0.0}
    u = (hull[b] - hull[a]) / long_axis
    # perpendicular direction inside the slice plane
    normal = np.cross(affine2d[:, 0], affine2d[:, 1])
    v = np.cross(normal / np.linalg.norm(normal), u)
    # densify the contour so chords are measured finely, then bin along u
    dense = _densify(contours) @ affine2d[:, :2].T + affine2d[:, 2]
    pu, pv = (dense - hull[a]) @ u, (dense - hull[a]) @ v
    step = 0.25 * float(min(np.linalg.norm(affine2d[:, 0]), np.linalg.norm(affine2d[:, 1])))
    bins = np.floor(pu / step).astype(int)
    short, ends = 0.0, None
    order = np.argsort(bins)
    bins, pv, pu = bins[order], pv[order], pu[order]
    splits = np.flatnonzero(np.diff(bins)) + 1
    for group_v, group_u in zip(np.split(pv, splits), np.split(pu, splits)):
        if group_v.size >= 2 and float(group_v.max() - group_v.min()) > short:
            short = float(group_v.max() - group_v.min())
            u_mid = float(group_u.mean())
            ends = [hull[a] + u_mid * u + float(group_v.min()) * v, hull[a] + u_mid * u + float(group_v.max()) * v]
    out = {"long_axis_mm": round(long_axis, 3), "short_axis_mm": round(short, 3),
           "long_axis_ras": [hull[a].round(3).tolist(), hull[b].round(3).tolist()]}
    if ends is not None:
        out["short_axis_ras"] = [ends[0].round(3).tolist(), ends[1].round(3).tolist()]
    return out


def _plane_coords(world: np.ndarray) -> np.ndarray:
    centred = world - world.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def _densify(contours, step: float = 0.25) -> np.ndarray:
    out = []
    for c in contours:
        seg = np.diff(c, axis=0)
        n = np.maximum(1, np.ceil(np.linalg.norm(seg, axis=1) / step).astype(int))
        for p, s, m in zip(c[:-1], seg, n):
            t = np.arange(m)[:, None] / m
            out.append(p + t * s)
        out.append(c[-1:])
    return np.concatenate(out)


def _component_stats(mask: np.ndarray, labels: Volume, axial: tuple[np.ndarray, Any] | None,
                     image: Volume | None) -> dict[str, Any]:
    affine = labels.affine
    idx = np.argwhere(mask)
    voxels = int(len(idx))
    out: dict[str, Any] = {"voxels": voxels, "volume_ml": voxels * labels.voxel_volume_mm3 / 1000.0}
    surface = mask_surface(mask, affine)
    mesh_v, area = surface.volume_mm3, surface.area_mm2
    out["mesh_volume_ml"] = mesh_v / 1000.0
    out["surface_mm2"] = round(area, 3)
    out["sphericity"] = round(float((36 * np.pi * mesh_v**2) ** (1 / 3) / area), 4) if area > 0 else None
    out["max_diameter_3d_mm"] = round(max_distance(surface.vertices), 3)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    corners = np.array([[x, y, z] for x in (lo[0] - 0.5, hi[0] + 0.5) for y in (lo[1] - 0.5, hi[1] + 0.5)
                        for z in (lo[2] - 0.5, hi[2] + 0.5)])
    ras = labels.index_to_ras(corners)
    out["bbox_ras"] = [ras.min(axis=0).round(3).tolist(), ras.max(axis=0).round(3).tolist()]
    out["centroid_ras"] = labels.index_to_ras(idx.mean(axis=0)).round(3).tolist()
    out["slice_extent"] = [int(lo[2]), int(hi[2])]
    out["border_planes"] = border_planes(mask)
    out["touches_border"] = bool(out["border_planes"])
    if axial is not None:
        reo_mask, ax_affine = axial
        m = reo_mask(mask)
        areas = m.sum(axis=(0, 1))
        k = int(np.argmax(areas))
        a2 = np.column_stack([ax_affine[:3, 0], ax_affine[:3, 1], ax_affine[:3, :3] @ [0, 0, k] + ax_affine[:3, 3]])
        axes = recist_axes(m[:, :, k], a2)
        out.update({"axial_slice": _source_slice(k, ax_affine, affine),
                    "axial_slice_area_mm2": round(float(areas[k]) * float(np.linalg.norm(np.cross(ax_affine[:3, 0], ax_affine[:3, 1]))), 3),
                    **axes})
    if image is not None:
        values = image.array[mask].astype(np.float64)
        finite = values[np.isfinite(values)]  # NaN marks "no data": statistics of the voxels that have some
        out["intensity"] = {"unit": _intensity_unit(image),
                            "non_finite_voxels": int(values.size - finite.size)}
        names = ("mean", "sd", "min", "max", "p5", "p25", "p50", "p75", "p95")
        if finite.size:
            pct = np.percentile(finite, [5, 25, 50, 75, 95])
            stats = [round(float(finite.mean()), 3), round(float(finite.std()), 3), float(finite.min()),
                     float(finite.max()), *(round(float(v), 3) for v in pct)]
        else:
            stats = [None] * len(names)
        out["intensity"].update(zip(names, stats))
    return out


def measure(labels: Volume | str, image: Volume | str | None = None, *,
            components: bool = True) -> list[dict[str, Any]]:
    """Measure every label (component 0 = the whole label) and, if ``components``, each lesion.

    ``labels`` and ``image`` are volumes or paths; the label map must hold the image's voxels
    (see :func:`medsam3d.io.load_labels`). Returns one JSON-ready dict per (label, component).
    """
    from scipy import ndimage

    from .io import as_volume

    image = as_volume(image) if image is not None else None
    labels = as_volume(labels, labels=True, reference=image)
    # axial view: reorient (no resampling) so that k runs along I->S and slices are axial
    ax, reo = reorient(labels, ("L", "P", "S"))
    axial = (reo.apply, ax.affine)
    rows = []
    names = labels.segments
    for value in [int(v) for v in np.unique(labels.array) if v != 0]:
        mask = labels.array == value
        name = names.get(value, {}).get("name", f"label {value}")
        whole = {"label": value, "name": name, "component": 0, **_component_stats(mask, labels, axial, image)}
        comp, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        whole["lesions"] = int(n)
        rows.append(whole)
        if components and n > 1:
            sizes = ndimage.sum_labels(mask, comp, index=np.arange(1, n + 1))
            for rank, c in enumerate(np.argsort(-sizes), start=1):
                rows.append({"label": value, "name": name, "component": rank,
                             **_component_stats(comp == c + 1, labels, axial, image)})
    return rows


def _source_slice(k_axial: int, axial_affine: np.ndarray, affine: np.ndarray) -> int:
    """The input's own k index of the centre of axial slice ``k_axial`` (its slice when the input is axial)."""
    centre = axial_affine[:3, :3] @ [0, 0, k_axial] + axial_affine[:3, 3]
    k = (np.linalg.inv(affine) @ np.append(centre, 1.0))[2]
    return int(round(k))


def _intensity_unit(image: Volume) -> str:
    """``HU`` for CT (said to be guessed when the file names no modality, as NIfTI and NRRD do not), else ``a.u.``."""
    from .preprocess import guess_modality

    modality, how = guess_modality(image)
    if modality != "CT":
        return "a.u."
    return "HU" if how == "header" else "HU (modality CT guessed from the intensities)"
