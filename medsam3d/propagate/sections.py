"""The orthogonal sections: a box for every slice from sagittal and coronal sections.

A box chain (each slice prompted with the previous slice's mask) compounds its errors
over tens of slices. Here the model also segments a few *orthogonal* sections through the
object, whose box prompts are fully known from the key box and the object's slice range:

* sagittal sections (fixed ``i``, image = ``j`` x ``k``) through the key box at 3 positions,
  box = key box's ``j`` range x the slice range;
* coronal sections (fixed ``j``, image = ``i`` x ``k``), box = key ``i`` range x slice range.

Sections are resampled along ``k`` to square pixels before the model sees them (slices are
often 3-5x thicker than pixels) and the masks are sampled back on the slice grid. On each
slice ``k`` the union of the sagittal masks gives the object's ``j`` extent and the coronal
masks its ``i`` extent: that box prompts the slice, independently of its neighbours
(:mod:`.walk` segments the slices with these boxes).
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

SECTION_POSITIONS = (0.5, 0.3, 0.7)  # along the key box, fraction of its width


class Section:
    """One orthogonal section through the volume, encoded once (:func:`encode_sections`),
    decoded with any box.

    ``section[c, k]`` is cropped to columns ``cols`` and slices ``ks`` (inclusive; a zoom on
    the object, as for axial slices) and shown to the model with rows = k (resampled by
    ``row_scale`` to square pixels, superior at the top) and columns = c.
    """

    def __init__(self, model, section: np.ndarray, row_scale: float, cols: tuple[int, int] | None = None,
                 ks: tuple[int, int] | None = None):
        from scipy import ndimage

        self.model = model
        self.full_cols, self.full_k = section.shape
        self.c0, c1 = cols or (0, section.shape[0] - 1)
        self.k0, k1 = ks or (0, section.shape[1] - 1)
        section = section[self.c0 : c1 + 1, self.k0 : k1 + 1]
        self.ncols, self.nk = section.shape
        image = section.T[::-1]
        rows = max(2, int(round(self.nk * row_scale)))
        if rows != self.nk:
            image = ndimage.zoom(image, (rows / self.nk, 1.0), order=1, grid_mode=True, mode="nearest")
        self.scale = image.shape[0] / self.nk
        self.image = image.astype(np.float32)
        self.features = None
        self.rows = image.shape[0]

    def mask(self, cols: tuple[int, int], ks: tuple[int, int]) -> np.ndarray:
        """(columns, K) mask on the full slice grid for a box over columns ``cols`` and slices ``ks``."""
        c0, c1 = cols[0] - self.c0, cols[1] - self.c0
        k0, k1 = max(ks[0] - self.k0, 0), min(ks[1] - self.k0, self.nk - 1)
        r0 = int(np.floor((self.nk - 1 - k1) * self.scale))
        r1 = min(self.rows - 1, int(np.ceil((self.nk - k0) * self.scale)) - 1)
        masks, _ = self.model.decode(self.features, np.array([[c0, r0, c1, r1]], np.float32))
        centres = np.clip(((self.nk - 1 - np.arange(self.nk)) + 0.5) * self.scale, 0, self.rows - 1).astype(int)
        out = np.zeros((self.full_cols, self.full_k), bool)
        out[self.c0 : self.c0 + self.ncols, self.k0 : self.k0 + self.nk] = masks[0][centres].T
        return out


def encode_sections(model, sections: list[Section]) -> None:
    """Encode the sections in one batch."""
    for sec, features in zip(sections, model.encode([sec.image for sec in sections])):
        sec.features = features


def orthogonal_boxes(model, images: np.ndarray, spacing: tuple[float, float, float], key_box, z_range,
                     *, adaptive: bool = False, margin: float = 0.05, max_rounds: int = 12,
                     positions: tuple[float, ...] = SECTION_POSITIONS, beyond: bool = False
                     ) -> tuple[dict[int, tuple[int, int, int, int]], int, dict[int, tuple[int, int, int, int]]]:
    """Box per slice from sagittal and coronal sections (see module doc).

    With ``adaptive`` the slice range is a first guess: while a section's mask touches an
    end of its box (the object goes on), that end is pushed out by an eighth of the range
    (at least one slice) and the sections are decoded again (no re-encoding), until the
    masks end inside the box, at the volume or after ``max_rounds``. The steps are small
    because a section's mask partly follows its box: larger steps overshoot the object's end.

    With ``adaptive`` and ``beyond`` the sections are also decoded once with a box over their whole
    extent (the first guess plus the key box's largest size in mm each way), for a walk that
    decides slice by slice whether the object goes on past the range found (the sections' masks
    follow their box along the slices, so they cannot say it themselves). Returns the boxes, the
    number of sections encoded and the boxes of that whole extent (empty without ``beyond``).
    """
    I, J, K = images.shape
    i0, j0, i1, j1 = key_box
    si, sj, sk = spacing
    wj, wi = j1 - j0 + 1, i1 - i0 + 1
    j_cols = (max(0, j0 - int(round(margin * wj))), min(J - 1, j1 + int(round(margin * wj))))
    i_cols = (max(0, i0 - int(round(margin * wi))), min(I - 1, i1 + int(round(margin * wi))))
    lo, hi = z_range
    # zoom: the sections show the object with one box size of context on each side, and
    # along k the first guess plus room to grow (the box's largest size in mm, >= 4 slices)
    grow = max(4, int(np.ceil(max(wi * si, wj * sj) / sk)))
    ks = (max(0, lo - grow), min(K - 1, hi + grow)) if adaptive else (0, K - 1)
    j_crop = (max(0, j0 - wj), min(J - 1, j1 + wj))
    i_crop = (max(0, i0 - wi), min(I - 1, i1 + wi))
    sagittal = [Section(model, images[int(round(i0 + f * (i1 - i0))), :, :], sk / sj, j_crop, ks)
                for f in positions]
    coronal = [Section(model, images[:, int(round(j0 + f * (j1 - j0))), :], sk / si, i_crop, ks)
               for f in positions]
    encode_sections(model, sagittal + coronal)
    for _ in range(max_rounds if adaptive else 1):
        j_extent = np.zeros((J, K), bool)
        i_extent = np.zeros((I, K), bool)
        for sec in sagittal:
            j_extent |= sec.mask(j_cols, (lo, hi))
        for sec in coronal:
            i_extent |= sec.mask(i_cols, (lo, hi))
        present = np.flatnonzero(j_extent.any(axis=0) & i_extent.any(axis=0))
        if not adaptive or present.size == 0:
            break
        step = max(1, (hi - lo) // 8)  # small steps: a section's mask follows its box a little
        grow_lo = present[0] <= lo and lo > ks[0]
        grow_hi = present[-1] >= hi and hi < ks[1]
        if not (grow_lo or grow_hi):
            break
        lo = max(ks[0], lo - step) if grow_lo else lo
        hi = min(ks[1], hi + step) if grow_hi else hi
    boxes = _extent_boxes(i_extent, j_extent, range(lo, hi + 1))
    log.info("orthogonal sections give boxes on %d slices of %d..%d", len(boxes), lo, hi)
    whole: dict[int, tuple[int, int, int, int]] = {}
    if adaptive and beyond and boxes:
        j_extent = np.zeros((J, K), bool)
        i_extent = np.zeros((I, K), bool)
        for sec in sagittal:
            j_extent |= sec.mask(j_cols, ks)
        for sec in coronal:
            i_extent |= sec.mask(i_cols, ks)
        whole = _extent_boxes(i_extent, j_extent, range(ks[0], ks[1] + 1))
    return boxes, len(sagittal) + len(coronal), whole


def _extent_boxes(i_extent: np.ndarray, j_extent: np.ndarray, ks) -> dict[int, tuple[int, int, int, int]]:
    """Slice k's box from the sections' extents along i and j (where both have one)."""
    boxes = {}
    for k in ks:
        ii = np.flatnonzero(i_extent[:, k])
        jj = np.flatnonzero(j_extent[:, k])
        if ii.size and jj.size:
            boxes[k] = (int(ii[0]), int(jj[0]), int(ii[-1]), int(jj[-1]))
    return boxes
