"""3D fusion: per-object slice masks -> one label map, with clean-up and an overlap policy."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from .errors import PromptError

log = logging.getLogger(__name__)

OVERLAP_POLICIES = ("score", "first", "last", "error")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component of a 3D mask."""
    from scipy import ndimage

    box = _bounds(mask)
    if box is None:
        return mask
    labels, n = ndimage.label(mask[box], structure=np.ones((3, 3, 3), bool))  # within the mask's box only
    if n <= 1:
        return mask
    sizes = ndimage.sum_labels(mask[box], labels, index=np.arange(1, n + 1))
    out = np.zeros_like(mask)
    out[box] = labels == (int(np.argmax(sizes)) + 1)
    return out


def _bounds(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of a mask's voxels as slices (None: an empty mask)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not hit.size:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice (along k): a tumour's necrotic core stays part of it."""
    from scipy import ndimage

    out = mask.copy()
    box = _bounds(mask)
    for k in np.flatnonzero(mask.any(axis=(0, 1))):  # a hole lies within the slice's box of the mask
        out[box[0], box[1], k] = ndimage.binary_fill_holes(mask[box[0], box[1], k])
    return out


def taper_ends(mask: np.ndarray, power: float = 2.0, spacing: tuple[float, float] = (1.0, 1.0),
               bounds: tuple[int, int] | None = None, min_slices: int = 5) -> np.ndarray:
    """Shrink an object's slices near its two ends to what an ellipsoid of its extent could hold there.

    A box-prompted model keeps most of a tumour's cross-section up to its last slices: the box comes
    from the neighbouring slice and the tumour's faint pole looks like its middle. Here an object
    whose largest slice mask holds A pixels, with its middle at slice c and its first and last
    slices z0 and z1, may hold at most ``A (1 - (|k - c| / R) ** power)`` pixels on slice k, where
    R = (z1 - z0) / 2 + 1 reaches the next slice beyond each end. With ``power`` 2 that is the
    largest ellipsoid with the object's extent and largest cross-section: wherever an ellipsoid's
    pole lies between the last slice and the next, none of it is cut (up to pixel rounding, and to
    a largest cross-section that falls between two slices); a larger power allows a flatter
    profile. A larger slice mask loses its outer rim (the pixels nearest its edge, in mm along i
    and j) down to that area; nothing grows.

    Only an object whose two ends were found inside the slices it could occupy is changed: one that
    reaches a ``bounds`` slice (default: the volume's first and last; the pipeline passes a prompt's
    ``z_range``) may be cut off there by the field of view or by the user, and its ends are not
    its poles. Objects of fewer than ``min_slices`` slices are left alone too.
    """
    from scipy import ndimage

    ks = np.flatnonzero(mask.any(axis=(0, 1)))
    lo, hi = bounds if bounds is not None else (0, mask.shape[2] - 1)
    if len(ks) < min_slices or ks[0] <= lo or ks[-1] >= hi:
        return mask
    areas = mask.sum(axis=(0, 1))
    centre, reach = (ks[0] + ks[-1]) / 2, (ks[-1] - ks[0]) / 2 + 1
    out = mask.copy()
    for k in ks:
        allowed = areas.max() * (1.0 - (abs(k - centre) / reach) ** power)
        if areas[k] <= allowed:
            continue
        if allowed < 1:
            out[:, :, k] = False
            continue
        depth = ndimage.distance_transform_edt(mask[:, :, k], sampling=spacing)
        out[:, :, k] = depth >= np.sort(depth[mask[:, :, k]])[::-1][int(allowed) - 1]
    return out


def fuse(masks: Sequence[np.ndarray], scores: Sequence[np.ndarray], labels: Sequence[int], *,
         overlap: str = "score", keep_largest: bool = True, fill_holes: bool = True
         ) -> tuple[np.ndarray, dict[int, int]]:
    """Combine per-object 3D masks into one label array.

    ``scores`` holds, per object, a (K,) array of per-slice model scores used by the
    ``score`` policy (a voxel claimed by two objects goes to the one whose slice scored
    higher). ``first``/``last`` give it to the earlier/later object; ``error`` refuses.
    Returns the label array and, per label, how many of its voxels were lost to overlap.
    """
    if overlap not in OVERLAP_POLICIES:
        raise PromptError(f"expected an overlap policy among {OVERLAP_POLICIES}, found {overlap!r}")
    cleaned = []
    for mask in masks:
        if fill_holes:
            mask = fill_holes_per_slice(mask)
        if keep_largest and mask.any():
            mask = largest_component(mask)
        cleaned.append(mask)
    shape = cleaned[0].shape if cleaned else (0, 0, 0)
    out = np.zeros(shape, np.uint16 if max(labels, default=0) > 255 else np.uint8)
    # each claimed voxel's slice score, for the score policy; one object claims nothing twice
    best = np.full(shape, -np.inf, np.float32) if overlap == "score" and len(cleaned) > 1 else None
    lost = {int(label): 0 for label in labels}
    for n, (mask, score, label) in enumerate(zip(cleaned, scores, labels)):
        taken = mask & (out > 0)
        if taken.any():
            if overlap == "error":
                other = sorted(set(np.unique(out[taken]).tolist()))
                raise PromptError(f"expected objects not to overlap (overlap policy 'error'), found label {label} "
                                  f"sharing {int(taken.sum())} voxels with label(s) {other}; choose another policy")
            if overlap == "first":
                win = np.zeros_like(mask)
            elif overlap == "last":
                win = taken
            else:
                win = taken & (score[None, None, :] > best)
            for other in np.unique(out[taken & win]):
                lost[int(other)] += int(np.sum(taken & win & (out == other)))
            lost[int(label)] += int(np.sum(taken & ~win))
            mask = (mask & ~taken) | (taken & win)
        out[mask] = label
        if best is not None:
            best[mask] = np.broadcast_to(score[None, None, :], shape)[mask]
    for label, n in lost.items():
        if n:
            log.warning("label %d lost %d voxel(s) to overlapping objects (policy %s)", label, n, overlap)
    return out, lost
