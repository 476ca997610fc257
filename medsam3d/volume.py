"""The :class:`Volume` model: a voxel array and its exact index-to-world affine.

Conventions (every other module relies on them):

* ``Volume.array`` is indexed ``array[i, j, k]`` with the file's own voxel axes
  (nibabel's order). For a DICOM series ``i`` is the column, ``j`` the row and ``k`` the
  position of the slice sorted along the slice normal (increasing), the order SimpleITK
  uses. A 2D slice shown as an image is ``array[:, :, k].T`` (rows = j, columns = i).
* ``Volume.affine`` maps ``(i, j, k, 1)`` to RAS millimetres (the NIfTI / nibabel /
  Slicer ``IJKToRAS`` convention). Spacing, origin, direction and orientation codes are
  derived from it and never stored twice.
* A label map is a ``Volume`` with an integer array; ``meta["segments"]`` maps a label
  value to ``{"name": str, "color": (r, g, b)}`` (colours in 0..1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import GeometryError

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D voxel array ``array[i, j, k]`` with its 4x4 index-to-RAS affine (mm)."""

    array: np.ndarray
    affine: np.ndarray
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        array = np.asarray(self.array)
        if array.ndim != 3:
            if array.ndim < 3:
                hint = (f"a {array.ndim}D array: medsam3d needs a 3D volume (a stack of slices; one slice is "
                        "array[:, :, None])")
            else:
                hint = (f"a {array.ndim}D array: pass one 3D volume of it (array[..., n]), or load the file with "
                        "volume_index=n")
            raise GeometryError(f"expected a 3D voxel array, found shape {array.shape}, {hint}")
        if array.dtype.kind not in "biuf":
            raise GeometryError(f"expected a numeric voxel array (bool, integer or float), found dtype {array.dtype}; "
                                "convert it (complex data: take its magnitude)")
        affine = np.array(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise GeometryError(f"expected a finite 4x4 affine, found {affine.shape} {affine.tolist()}")
        if not np.allclose(affine[3], [0, 0, 0, 1]):
            raise GeometryError(f"expected an affine whose last row is [0, 0, 0, 1], found {affine[3].tolist()}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise GeometryError("expected an invertible affine, found a singular one (zero spacing or parallel axes)")
        affine.setflags(write=False)
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "meta", dict(self.meta))

    # ------------------------------------------------------------------ derived geometry
    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel counts along (i, j, k)."""
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (i, j, k): the norms of the affine's columns."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin(self) -> tuple[float, float, float]:
        """RAS position (mm) of the centre of voxel (0, 0, 0)."""
        return tuple(float(x) for x in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the RAS unit vectors of the i, j, k axes."""
        return self.affine[:3, :3] / np.asarray(self.spacing)

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Directions the i, j, k axes increase towards (nibabel ``aff2axcodes``), e.g. ``('L','P','S')``."""
        import nibabel as nib

        return tuple(nib.aff2axcodes(self.affine))  # type: ignore[return-value]

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm^3: ``|det(affine[:3, :3])|`` (exact for sheared grids too)."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    @property
    def is_oblique(self) -> bool:
        """True when an axis is not aligned with a world axis."""
        d = np.abs(self.direction)
        return bool(np.any((d > 1e-6) & (d < 1 - 1e-6)))

    @property
    def segments(self) -> dict[int, dict[str, Any]]:
        """Label value -> ``{"name", "color"}`` for label maps (empty for images)."""
        return dict(self.meta.get("segments", {}))

    # ------------------------------------------------------------------ coordinates
    def index_to_ras(self, ijk: Sequence[float] | np.ndarray) -> np.ndarray:
        """Map voxel indices (..., 3) to RAS mm (..., 3)."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def ras_to_index(self, ras: Sequence[float] | np.ndarray) -> np.ndarray:
        """Map RAS mm (..., 3) to continuous voxel indices (..., 3)."""
        ras = np.asarray(ras, dtype=np.float64)
        inv = np.linalg.inv(self.affine)
        return ras @ inv[:3, :3].T + inv[:3, 3]

    def same_grid(self, other: "Volume", *, atol: float = 1e-4) -> bool:
        """True when ``other`` has the same shape and affine (to ``atol`` mm)."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol))

    def check_same_grid(self, other: "Volume", *, what: str = "label map", atol: float = 1e-4) -> None:
        """Raise :class:`GeometryError` with both grids described unless they match."""
        if not self.same_grid(other, atol=atol):
            raise GeometryError(
                f"expected the {what} on the image's grid (shape {self.shape}, spacing "
                f"{_fmt(self.spacing)} mm, origin {_fmt(self.origin)}, axes {''.join(self.axcodes)}), "
                f"found shape {other.shape}, spacing {_fmt(other.spacing)} mm, origin {_fmt(other.origin)}, "
                f"axes {''.join(other.axcodes)}; resample it onto the image grid first"
            )

    def with_array(self, array: np.ndarray, **meta: Any) -> "Volume":
        """A volume on the same grid holding ``array`` (meta updated with ``meta``)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise GeometryError(f"expected an array of shape {self.shape} for this grid, found {array.shape}")
        return Volume(array, self.affine, {**self.meta, **meta})

    def __repr__(self) -> str:
        return (
            f"Volume(shape={self.shape}, spacing={_fmt(self.spacing)}, axcodes={''.join(self.axcodes)}, "
            f"dtype={self.array.dtype}, modality={self.meta.get('modality')})"
        )


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


# ---------------------------------------------------------------------- reorientation
@dataclass(frozen=True)
class Reorientation:
    """A permutation/flip of voxel axes (no resampling) with its exact inverse.

    ``ornt`` is a nibabel orientation transform from the source layout to the target one;
    ``source_shape`` is the source array's shape.
    """

    ornt: np.ndarray
    source_shape: tuple[int, int, int]

    @property
    def target_shape(self) -> tuple[int, int, int]:
        shape = [0, 0, 0]
        for src_axis, (dst_axis, _) in enumerate(self.ornt):
            shape[int(dst_axis)] = self.source_shape[src_axis]
        return tuple(shape)  # type: ignore[return-value]

    @property
    def index_map(self) -> np.ndarray:
        """4x4 matrix mapping target voxel indices to source voxel indices."""
        import nibabel.orientations as no

        return no.inv_ornt_aff(self.ornt, self.source_shape)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Source-layout array -> target-layout array."""
        import nibabel.orientations as no

        return np.ascontiguousarray(no.apply_orientation(array, self.ornt))

    def invert(self, array: np.ndarray) -> np.ndarray:
        """Target-layout array -> source-layout array (exact inverse of :meth:`apply`)."""
        import nibabel.orientations as no

        # the inverse sends each target axis back to its source axis with the same flip
        inverse = np.zeros((3, 2))
        for src_axis, (dst_axis, flip) in enumerate(self.ornt):
            inverse[int(dst_axis)] = (src_axis, flip)
        return np.ascontiguousarray(no.apply_orientation(array, inverse))

    def source_to_target_index(self, ijk: np.ndarray) -> np.ndarray:
        """Map source voxel indices (..., 3) to target voxel indices."""
        inv = np.linalg.inv(self.index_map)
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ inv[:3, :3].T + inv[:3, 3]


def reorient(volume: Volume, axcodes: Sequence[str | None]) -> tuple[Volume, Reorientation]:
    """Permute/flip the voxel axes so they point towards ``axcodes`` (no resampling).

    ``axcodes`` holds one of ``L/R``, ``A/P``, ``S/I`` per target axis, or ``None`` to keep
    that axis as it is (same world axis, same direction). Returns the reoriented volume
    and the :class:`Reorientation` whose ``invert`` puts arrays back on the source grid.
    """
    import nibabel.orientations as no

    current = no.io_orientation(volume.affine)
    if any(c is None for c in axcodes):
        target = np.zeros((3, 2))
        for axis, code in enumerate(axcodes):
            if code is None:
                target[axis] = current[axis]
            else:
                target[axis] = _code_to_ornt(code)
    else:
        target = np.array([_code_to_ornt(c) for c in axcodes])
    if sorted(target[:, 0].tolist()) != [0.0, 1.0, 2.0]:
        raise GeometryError(f"expected three distinct world axes in {list(axcodes)}, found a repeated axis")
    transform = no.ornt_transform(current, target)
    reo = Reorientation(transform, volume.shape)
    new_affine = volume.affine @ reo.index_map
    return Volume(reo.apply(volume.array), new_affine, volume.meta), reo


def on_grid(volume: Volume, reference: Volume, *, what: str = "label map") -> Volume:
    """``volume`` on ``reference``'s grid, exactly: as it is, or with its voxel axes permuted/flipped.

    A label map stored with other axis directions than its image (TotalSegmentator writes LAS
    labels for an LPS CT) holds the same voxels: reorienting it is lossless. Any other
    difference (shape, spacing, origin, an oblique or shifted lattice) would need resampling
    and raises :class:`GeometryError` with both grids described.
    """
    if reference.same_grid(volume):
        return volume
    if volume.array.ndim == 3 and sorted(volume.shape) == sorted(reference.shape):
        moved, _ = reorient(volume, reference.axcodes)
        if reference.same_grid(moved):
            log.info("%s stored with axes %s: put on the image's %s grid by permuting/flipping axes (exact)",
                     what, "".join(volume.axcodes), "".join(reference.axcodes))
            return moved
    reference.check_same_grid(volume, what=what)
    return volume


def _code_to_ornt(code: str) -> tuple[float, float]:
    table = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    try:
        return table[code.upper()]
    except KeyError:
        raise GeometryError(f"expected an axis code among R/L/A/P/S/I, found {code!r}") from None


def display_axcodes(volume: Volume) -> tuple[str, str, None]:
    """Radiological display layout of each slice, keeping the slice axis ``k`` untouched.

    Axial slices: columns towards patient Left, rows towards Posterior (DICOM display);
    sagittal: columns towards Posterior, rows towards Inferior; coronal: columns towards
    Left, rows towards Inferior. Keeping ``k`` means slice indices of prompts stay valid.
    """
    import nibabel.orientations as no

    k_world = int(no.io_orientation(volume.affine)[2, 0])
    if k_world == 2:  # axial
        return ("L", "P", None)
    if k_world == 0:  # sagittal
        return ("P", "I", None)
    return ("L", "I", None)  # coronal
