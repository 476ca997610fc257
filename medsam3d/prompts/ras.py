"""3D boxes in RAS millimetres (two corners, or the corners of a rotated ROI) -> a box in voxel indices."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import PromptError
from ..volume import Volume
from ._checks import _numbers, _short
from .types import BoxPrompt


def box_from_ras(volume: Volume, corner_a: Sequence[float], corner_b: Sequence[float]) -> tuple[BoxPrompt, tuple[int, int]]:
    """A 3D ROI given by two RAS corners -> (box on its middle slice, inclusive z range).

    The ROI's 8 corners are mapped to voxel space and the covering index range is kept
    (rounded to the nearest voxel centre, clipped to the image), so oblique or flipped
    grids give the voxels whose centres the ROI contains (a centre within 1/1000 voxel of
    the ROI's face counts as inside).
    """
    if not all(isinstance(c, (list, tuple, np.ndarray)) and len(c) == 3 for c in (corner_a, corner_b)):
        raise PromptError(f"expected two RAS corners of 3 numbers each, found {_short(corner_a)} and "
                          f"{_short(corner_b)}")
    a = np.array(_numbers(list(corner_a), 3, "the first RAS corner"))
    b = np.array(_numbers(list(corner_b), 3, "the second RAS corner"))
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    return box_from_ras_corners(volume, corners)


def box_from_ras_corners(volume: Volume, corners: np.ndarray, hint: str = "check the coordinates are RAS, not LPS"
                         ) -> tuple[BoxPrompt, tuple[int, int]]:
    """The voxel box covering a ROI given by its corners in RAS mm (any number, e.g. the 8 of a
    rotated Slicer ROI) -> (box on its middle slice, inclusive z range); see :func:`box_from_ras`.
    ``hint`` ends the error for a ROI outside the image."""
    corners = np.asarray(corners, np.float64).reshape(-1, 3)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    with np.errstate(over="ignore", invalid="ignore"):
        ijk = volume.ras_to_index(corners)
    if not np.all(np.isfinite(ijk)):
        raise PromptError(f"expected a RAS ROI of finite millimetres, found corners {lo.tolist()}..{hi.tolist()} "
                          "too far out to place on the image; check the coordinates")
    # a voxel centre within 1/1000 voxel of a face counts as inside: typed millimetres are rounded
    imin = np.ceil(ijk.min(axis=0) - 1e-3).astype(int)
    imax = np.floor(ijk.max(axis=0) + 1e-3).astype(int)
    shape = np.array(volume.shape)
    if np.any(imax < 0) or np.any(imin > shape - 1):
        raise PromptError(
            f"expected the RAS ROI {lo.round(1).tolist()}..{hi.round(1).tolist()} mm to overlap the image, found it "
            f"outside (image covers voxels 0..{(shape - 1).tolist()}); {hint}"
        )
    imin, imax = np.maximum(imin, 0), np.minimum(imax, shape - 1)
    if np.any(imax < imin):
        raise PromptError("expected the RAS ROI to contain at least one voxel centre, found none; enlarge it")
    k_mid = int((imin[2] + imax[2]) // 2)
    box = BoxPrompt(k_mid, (int(imin[0]), int(imin[1]), int(imax[0]), int(imax[1])))
    return box, (int(imin[2]), int(imax[2]))

