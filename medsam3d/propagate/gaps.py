"""The slices a strided walk skipped: interpolated where their neighbours agree, else segmented."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .boxes import box_mask, expand_box, mask_box
from .config import PropagationConfig
from .results import SliceResult


def fill_gaps(slices: dict[int, SliceResult], empty: set[int], used, run: Callable[..., bool],
              slice_box: Callable[[int], tuple[int, int, int, int]], shape: tuple[int, int],
              config: PropagationConfig, blend: bool = False) -> None:
    """Fill the slices skipped between the segmented ones in ``slices`` (in place).

    Between two segmented slices ``a < b`` with skipped slices in between: when the two
    masks overlap well (IoU >= ``config.interp_iou``) the object changes smoothly there and
    the skipped slices get the shape-based (signed distance) interpolation of the two masks,
    clipped to their own box (``slice_box``, grown by the margin); otherwise the middle slice
    is segmented (``run(k, direction, blend)``, False where it is empty) and both halves are
    checked again. Slices already ``used`` (encoded and asked for by a walk) are always
    segmented: decoding them is cheap. Slices in ``empty`` stay empty. Interpolated slices are
    marked (score = the lower of the two neighbours' scores).

    With ``blend`` (``config.blend_embeddings`` and a model that can blend) nothing more is
    encoded here: where the neighbours disagree, the middle slice (and, past an empty middle,
    every skipped slice) is decoded with its own box on the linear blend of the embeddings of
    the nearest encoded slices on each side (:meth:`.SliceEncoder.blended`). Where they agree
    the skipped slices are interpolated as without ``blend``: decoding them on blends as well
    gave the same Dice for more decodes.
    """
    stack = [(a, b) for a, b in zip(sorted(slices), sorted(slices)[1:]) if b - a > 1]
    while stack:
        a, b = stack.pop()
        between = [t for t in range(a + 1, b) if t not in empty and t not in slices]
        if not between:
            continue
        cached = [t for t in between if t in used]
        if cached:  # encoded already: decoding is cheap, segment them
            done = [a, *(t for t in cached if run(t, 0)), b]
            stack += [(x, y) for x, y in zip(done, done[1:]) if y - x > 1]
            continue
        ma, mb = slices[a].mask, slices[b].mask
        iou = (ma & mb).sum() / max((ma | mb).sum(), 1)
        if iou >= config.interp_iou:
            for t in between:
                w = (t - a) / (b - a)
                box = expand_box(slice_box(t), shape, config.margin_frac, config.margin_min)
                mask = interpolate_masks(ma, mb, w) & box_mask(box, shape)
                slices[t] = SliceResult(mask, min(slices[a].score, slices[b].score), box, interpolated=True)
            continue
        m = (a + b) // 2
        if m in empty or m in slices or not run(m, 0, blend):
            # an empty middle inside the object's range: segment every skipped slice
            for t in between:
                if t != m:
                    run(t, 0, blend)
            continue
        stack += [(a, m), (m, b)]


def interpolate_masks(ma: np.ndarray, mb: np.ndarray, w: float) -> np.ndarray:
    """Shape-based interpolation ``w`` of the way from ``ma`` to ``mb``: the zero level of
    (1 - w) x sdf(ma) + w x sdf(mb), sdf the signed distance to each mask's edge."""
    from scipy import ndimage

    box = mask_box(ma | mb)
    if box is None:  # two empty masks (empty prompted slices): nothing in between either
        return np.zeros_like(ma)
    i0, j0, i1, j1 = box
    pad = 2
    i0, j0 = max(0, i0 - pad), max(0, j0 - pad)
    i1, j1 = min(ma.shape[0] - 1, i1 + pad), min(ma.shape[1] - 1, j1 + pad)

    def sdf(m):
        m = m[i0 : i1 + 1, j0 : j1 + 1]
        return ndimage.distance_transform_edt(~m) - ndimage.distance_transform_edt(m)

    out = np.zeros_like(ma)
    out[i0 : i1 + 1, j0 : j1 + 1] = ((1 - w) * sdf(ma) + w * sdf(mb)) < 0
    return out
