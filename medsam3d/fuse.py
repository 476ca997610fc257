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

    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice (along k): a tumour's necrotic core stays part of it."""
    from scipy import ndimage

    out = mask.copy()
    for k in np.flatnonzero(mask.any(axis=(0, 1))):
        out[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
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
    best = np.full(shape, -np.inf, np.float32)
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
        best[mask] = np.broadcast_to(score[None, None, :], shape)[mask]
    for label, n in lost.items():
        if n:
            log.warning("label %d lost %d voxel(s) to overlapping objects (policy %s)", label, n, overlap)
    return out, lost
