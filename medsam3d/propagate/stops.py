"""Where an object ends: the content check (sections) and the box chain's stop rules.

Past an object's end SAM-family models do not return empty masks: they keep returning
blobs of the neighbouring tissue, often scored almost as high as the object's own slices.
Each rule here reads evidence that the mask is no longer the object.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .boxes import mask_box
from .config import PropagationConfig
from .results import SliceResult


def content_check(image: np.ndarray, mask: np.ndarray, config: PropagationConfig
                  ) -> Callable[[np.ndarray, np.ndarray], bool] | None:
    """A test of whether a slice's mask still holds the object seen in ``mask`` on ``image`` (the
    prompted slice), or None when the object does not stand out there.

    Past a conspicuous lesion's end the model keeps returning a small blob of the neighbouring
    tissue, scored almost as high as the lesion's own slices; its intensity tells it apart. The
    test: the mask's median intensity must lie at least ``config.content_min_rel`` of the way
    from the prompted slice's ring median to its inside median. It applies where that contrast
    is at least ``config.content_min_cnr`` x the pooled robust spread (IQR / 1.349) of inside
    and ring. A fainter object (at least ``config.content_weak_cnr`` x the spread) gets the
    weaker test ``config.content_weak_rel``: past a faint lesion's end the masks hold tissue of
    the opposite contrast, so only a reversed contrast ends it. On low-contrast tumours the
    medians say nothing, and neither test applies.

    ``mask`` should be the prompted slice's best mask (the box ensemble's, see
    :func:`.engine.prompt_ensemble`): on a small lesion the mask for a tight box alone can
    miss so much of it that its contrast comes out reversed.
    """
    from scipy import ndimage

    if max(config.content_min_cnr, config.content_weak_cnr) <= 0 or mask.sum() < config.min_area_px:
        return None
    ring = ndimage.binary_dilation(mask, iterations=3) & ~mask
    inside, around = image[mask], image[ring]
    if around.size == 0:
        return None
    contrast = float(np.median(inside) - np.median(around))
    iqr_in, iqr_around = (float(np.subtract(*np.percentile(v, [75, 25]))) for v in (inside, around))
    spread = np.sqrt((iqr_in**2 + iqr_around**2) / 2) / 1.349  # pooled robust standard deviation
    cnr = abs(contrast) / max(spread, 1e-6)
    if cnr >= config.content_min_cnr > 0:
        min_rel = config.content_min_rel
    elif cnr >= config.content_weak_cnr > 0:
        min_rel = config.content_weak_rel
    else:
        return None
    base = float(np.median(around))

    def holds(slice_image: np.ndarray, slice_mask: np.ndarray) -> bool:
        return (float(np.median(slice_image[slice_mask])) - base) / contrast >= min_rel

    return holds


def embedding_check(encoder, key: int, key_mask: np.ndarray, config: PropagationConfig
                    ) -> Callable[[int, np.ndarray], bool] | None:
    """A test of whether slice k's mask still holds the object of the prompted slice ``key`` (its
    mask ``key_mask``), read in the model's own image embedding; None where the model gives no
    embedding of a region or the object does not differ from its surroundings there.

    On the prompted slice, the mean embedding inside the mask and the mean over a ring around it
    span a direction. A slice's mask holds the object where its own mean embedding lies at least
    ``config.extend_min_rel`` of the way from the ring's to the inside's along that direction.
    Unlike the intensity test of :func:`content_check` this reads what the encoder saw around
    each pixel, which tells a soft-tissue tumour from the muscle it sits in where their
    intensities are alike. It is used past the sections' first range only (see
    :mod:`.walk`): on the object's own slices the masks follow their boxes well, and their
    mean embedding drifts towards the surroundings near the ends, inside the object too.
    """
    if config.extend_min_rel <= 0:
        return None
    key_region = encoder.region_embedding(key, key_mask)
    if key_region is None or key_region[1] is None:
        return None
    inside, ring = key_region
    direction = inside - ring
    norm = float(direction @ direction)
    if norm <= 1e-12:
        return None

    def alike(k: int, mask: np.ndarray) -> bool:
        region = encoder.region_embedding(k, mask)
        return region is not None and float((region[0] - ring) @ direction) / norm >= config.extend_min_rel

    return alike


def stop_reason(mask: np.ndarray, area: int, score: float, prev: SliceResult, peak: int,
                config: PropagationConfig, bounded: bool, start_score: float = 1.0) -> str | None:
    """Why the box chain ends at a slice whose mask is ``mask`` (``area`` pixels, scored
    ``score``), or None when it goes on. ``prev`` is the previous slice's result, ``peak`` the
    largest area so far, ``start_score`` the prompted slice's score; inside a given z_range
    (``bounded``) only an empty mask ends it.

    The rules: an empty mask; a small mask (below ``min_area_frac`` of the peak) that the model
    is also less sure of (below ``tail_score_frac`` x the start score), the model's blob of
    neighbouring tissue past the end; a low quality score (below ``min_score``); a jump in area
    (above ``max_growth`` x the previous slice's) or of the centroid (by more than ``max_shift``
    x the previous box's diagonal), where the mask leaked onto a neighbour.
    """
    if area < config.min_area_px:
        return "empty mask"
    if bounded:
        return None
    if area < config.min_area_frac * peak and score < config.tail_score_frac * start_score:
        return f"small, less certain mask ({area} px < {config.min_area_frac:.0%} of {peak}, score {score:.2f})"
    if score < config.min_score:
        return f"low quality (score {score:.2f})"
    prev_area = int(prev.mask.sum())
    if prev_area and area > config.max_growth * prev_area:
        return f"area jump ({prev_area} -> {area} px)"
    if prev_area:
        c_prev = np.argwhere(prev.mask).mean(axis=0)
        c_new = np.argwhere(mask).mean(axis=0)
        i0, j0, i1, j1 = mask_box(prev.mask)
        diag = float(np.hypot(i1 - i0 + 1, j1 - j0 + 1))
        if float(np.hypot(*(c_new - c_prev))) > config.max_shift * diag:
            return "centroid jump"
    return None
