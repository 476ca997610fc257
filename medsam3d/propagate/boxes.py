"""Boxes and masks on one slice.

A box is inclusive ``(i0, j0, i1, j1)`` in slice pixels of the working layout (i, j); a mask
is a 2D (I, J) bool array.
"""

from __future__ import annotations

import numpy as np


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive (i0, j0, i1, j1) bounding box of a 2D (I, J) mask, or None when empty."""
    ii = np.flatnonzero(mask.any(axis=1))
    jj = np.flatnonzero(mask.any(axis=0))
    if ii.size == 0:
        return None
    return int(ii[0]), int(jj[0]), int(ii[-1]), int(jj[-1])


def box_fit(mask: np.ndarray, box) -> float:
    """How well a mask spans its prompt box: the IoU of the mask's bounding box with ``box``
    (0 for an empty mask). A box drawn around an object is spanned by the object."""
    own = mask_box(mask)
    if own is None:
        return 0.0
    inter = [max(own[0], box[0]), max(own[1], box[1]), min(own[2], box[2]), min(own[3], box[3])]
    overlap = max(0, inter[2] - inter[0] + 1) * max(0, inter[3] - inter[1] + 1)
    area = (own[2] - own[0] + 1) * (own[3] - own[1] + 1) + (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    return overlap / (area - overlap)


def expand_box(box, shape: tuple[int, int], frac: float, minimum: int) -> tuple[int, int, int, int]:
    """``box`` grown on each side by ``frac`` of its size along that axis (at least ``minimum``
    pixels), kept inside a slice of ``shape``."""
    i0, j0, i1, j1 = box
    mi = max(minimum, int(round(frac * (i1 - i0 + 1))))
    mj = max(minimum, int(round(frac * (j1 - j0 + 1))))
    return max(0, i0 - mi), max(0, j0 - mj), min(shape[0] - 1, i1 + mi), min(shape[1] - 1, j1 + mj)


def box_mask(box, shape: tuple[int, int]) -> np.ndarray:
    """The pixels of ``box`` as a mask of ``shape``."""
    out = np.zeros(shape, bool)
    i0, j0, i1, j1 = box
    out[i0 : i1 + 1, j0 : j1 + 1] = True
    return out


def shift_box(box, shift: tuple[int, int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """``box`` moved by (di, dj), kept inside the slice."""
    di, dj = shift
    i0, j0, i1, j1 = box
    di = int(np.clip(di, -i0, shape[0] - 1 - i1))
    dj = int(np.clip(dj, -j0, shape[1] - 1 - j1))
    return i0 + di, j0 + dj, i1 + di, j1 + dj


def cap_box(box, limit, slack: float) -> tuple[int, int, int, int]:
    """``box`` shrunk about its centre to at most ``limit``'s size x (1 + slack) along each axis."""
    out = list(box)
    for a in (0, 1):
        size = box[a + 2] - box[a] + 1
        cap = (limit[a + 2] - limit[a] + 1) * (1 + slack)
        if size > cap:
            centre = (box[a] + box[a + 2]) / 2
            out[a], out[a + 2] = int(round(centre - (cap - 1) / 2)), int(round(centre + (cap - 1) / 2))
    return tuple(out)


def largest_2d_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected part of a 2D mask (the model's stray blobs dropped), or the mask
    itself when it has at most one part."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)
