"""The engine: each object's prompted slices, its walk through the volume, the vote and the ensemble.

Per object, in this order:

1. every prompted slice is segmented with its own box, and its final mask is computed: the
   majority over its box grown by 0-3 pixels (:func:`prompt_ensemble`);
2. by default the orthogonal sections give every slice its box (:mod:`.walk`) and box chains
   vote with them (:mod:`.chains`); with ``PropagationConfig(orthogonal=False)`` the box
   chain alone walks the slices instead (:func:`box_chain`);
3. the prompted slices get their ensemble masks, and the result the spread of its
   alternative volumes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ..prompts import ObjectPrompt
from .boxes import box_mask, expand_box, largest_2d_component, mask_box
from .chains import alternative_volumes, chain_vote
from .config import PropagationConfig
from .encoder import SliceEncoder
from .results import ObjectResult, SliceResult
from .stops import stop_reason
from .walk import orthogonal_pass

log = logging.getLogger(__name__)


def propagate(encoder: SliceEncoder, objects: Sequence[ObjectPrompt], config: PropagationConfig | None = None
              ) -> list[ObjectResult]:
    """Segment every object through the volume; returns per-object per-slice masks in the
    working layout (``encoder``'s images)."""
    config = config or PropagationConfig()
    return [_propagate_object(encoder, obj, config) for obj in objects]


def _propagate_object(encoder: SliceEncoder, obj: ObjectPrompt, config: PropagationConfig) -> ObjectResult:
    result = ObjectResult(obj)
    keys = {b.slice: b for b in obj.boxes}
    start = max(obj.boxes, key=lambda b: b.area)  # the key prompt: the walks start from its slice
    bounds = obj.z_range or (0, encoder.images.shape[2] - 1)
    as_drawn = _segment_prompted(encoder, result, keys, bounds, config)
    ensemble = prompt_ensemble(encoder, keys, config, as_drawn)
    members = []
    if config.orthogonal:
        orthogonal_pass(encoder, obj, result, start, keys, config,
                        key_mask=ensemble.get(start.slice, result.slices[start.slice].mask))
        if config.chain_vote:
            members = chain_vote(encoder, result, start, keys, config)
    else:
        for direction in (+1, -1):
            result.stop_reasons["up" if direction > 0 else "down"] = box_chain(
                encoder, result, start, keys, bounds, direction, config)
    for k, mask in ensemble.items():
        result.slices[k].mask = mask
    result.alternatives = alternative_volumes(result, members, keys)
    log.info("object '%s': slices %d..%d (%s; %s)", obj.name, min(result.slices), max(result.slices),
             result.stop_reasons["down"], result.stop_reasons["up"])
    return result


def _segment_prompted(encoder: SliceEncoder, result: ObjectResult, keys, bounds: tuple[int, int],
                      config: PropagationConfig) -> dict[int, np.ndarray]:
    """Segment every prompted slice with its own box into ``result`` (the mask kept within the box
    grown by ``config.margin_min``); returns each slice's mask as the model gave it."""
    shape = encoder.images.shape[:2]
    as_drawn = {}
    for k, prompt in sorted(keys.items()):
        masks, scores = encoder.predict(k, np.array([prompt.box]), 0, bounds)
        as_drawn[k] = masks[0]
        mask = masks[0] & box_mask(expand_box(prompt.box, shape, 0.0, config.margin_min), shape)
        result.slices[k] = SliceResult(mask, float(scores[0]), prompt.box)
    return as_drawn


def prompt_ensemble(encoder: SliceEncoder, keys, config: PropagationConfig,
                    as_drawn: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Each prompted slice's final mask: the per-pixel majority (at least half) of the masks for
    the user's box grown by each of ``config.prompt_ensemble`` pixels, within the largest box.

    MedSAM-family models are trained on boxes loosened by a few pixels; a box drawn tight on
    the lesion's edge (as a reference's bounding box is) cuts off its boundary ring, which on a
    small lesion is much of it. The majority does not depend on how tight the box was drawn.
    The propagation itself starts from the box as given: starting it from the ensemble's mask
    made the box chains grow on low-contrast CT. Computed before the walk (the content check
    reads the key slice's contrast on it) and applied after it; empty when the ensemble is off.
    ``as_drawn`` holds each prompted slice's mask for the box as given (already decoded), so a
    grow of 0 costs no decode.
    """
    I, J, _ = encoder.images.shape
    grow = sorted(int(g) for g in config.prompt_ensemble)
    out = {}
    for k, prompt in keys.items() if grow else ():
        boxes = [expand_box(prompt.box, (I, J), 0.0, g) if g > 0 else prompt.box for g in grow]
        grown = [b for g, b in zip(grow, boxes) if g > 0]
        masks = encoder.predict(k, np.array(grown))[0] if grown else np.zeros((0, I, J), bool)
        votes = masks.sum(axis=0) + grow.count(0) * as_drawn[k]
        limit = box_mask(expand_box(boxes[-1], (I, J), 0.0, config.margin_min), (I, J))
        out[k] = (2 * votes >= len(boxes)) & limit
    return out


def box_chain(encoder: SliceEncoder, result: ObjectResult, start, keys, bounds: tuple[int, int], direction: int,
              config: PropagationConfig) -> str:
    """Walk from the key slice in ``direction`` (+1 or -1) within ``bounds``, each slice's box the
    previous mask's bounding box plus a margin, until a stop rule (:func:`.stops.stop_reason`)
    ends the object; returns why it ended. A prompted slice on the way keeps its own mask and
    the walk goes on from it. A rejected slice is not kept, and the walk never falls back to
    the original box, so it cannot leak through the rest of the volume. Slices are encoded
    ahead in batches along the walk."""
    shape = encoder.images.shape[:2]
    lo, hi = bounds
    prev = result.slices[start.slice]
    peak = max(int(prev.mask.sum()), 1)
    k = start.slice + direction
    while lo <= k <= hi:
        if k in keys:  # another prompt: trust it and walk on from there
            prev = result.slices[k]
            peak = max(peak, int(prev.mask.sum()))
            k += direction
            continue
        prev_box = mask_box(prev.mask) or prev.box
        box = expand_box(prev_box, shape, config.margin_frac, config.margin_min)
        masks, scores = encoder.predict(k, np.array([box]), direction, (lo, hi))
        mask = largest_2d_component(masks[0])
        score = float(scores[0])
        area = int(mask.sum())
        stop = stop_reason(mask, area, score, prev, peak, config, bounded=result.prompt.z_range is not None,
                           start_score=result.slices[start.slice].score)
        if stop:
            return f"{stop} at slice {k}"
        result.slices[k] = SliceResult(mask, score, box)
        peak = max(peak, area)
        prev = result.slices[k]
        k += direction
    return "volume edge" if result.prompt.z_range is None else "z_range end"
