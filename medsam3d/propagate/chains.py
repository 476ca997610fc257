"""The chain vote: box chains walk the sections' slices again, and each slice keeps the majority.

The sections give each slice a box independently of its neighbours; near the ends of a
tumour that drifts sideways those boxes miss, and on low-contrast CT they are loose. A box
chain (next box = previous mask's box + margin) follows a drift but compounds its errors:
a tight margin shrinks on CT, a loose one grows. Voting both settles each slice on what
most of them agree on: chains follow a tumour that drifts sideways out of the sections,
the sections stop a chain's errors from piling up. The members' volumes also give the
spread of the engine's own alternative segmentations (:func:`alternative_volumes`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from .._parallel import map_threads
from .boxes import cap_box, expand_box, largest_2d_component, mask_box, shift_box
from .config import PropagationConfig
from .encoder import SliceEncoder
from .gaps import interpolate_masks
from .results import ObjectResult, SliceResult

log = logging.getLogger(__name__)

#: a member of the vote: slice -> mask
Member = dict[int, np.ndarray]

#: larger patches are registered on block means (f x f, f = ceil(side / TRACK_PX)): the FFTs are
#: f² times smaller on a large tumour, for a Dice lower by a few thousandths at most
TRACK_PX = 128


def chain_vote(encoder: SliceEncoder, result: ObjectResult, start, keys, config: PropagationConfig
               ) -> list[Member]:
    """Per-slice majority vote of the sections' masks and box chains run over the same slices.

    For every margin in ``config.chain_vote`` a chain walks outwards from the key slice over
    the slices the sections segmented (already encoded: decoding only, nothing is encoded;
    with ``config.blend_embeddings`` the encoded ones only, none decoded on a blend),
    restarting at every prompted slice and ending at an empty mask; the slices between are
    interpolated as in :func:`.gaps.fill_gaps`. Each slice then keeps the pixels that most
    members agree on; a chain that ended before a slice (or had no mask to start from)
    abstains there. The prompted slices keep their own masks. Without a z_range the chains
    walk the slices the sections found, as with one.

    A chain's box is capped at the sections' box for its slice x (1 + ``config.chain_cap``, or
    ``config.chain_cap_3d`` with a z_range) along i and j: the sections may misplace a
    tumour's tapering end but see its size, and an uncapped chain keeps the size of the
    previous slice and grows past the end. Where the sections see only a chord of the object
    the cap keeps only part of it.

    With ``config.chain_track`` every margin also gets a tracked chain: before its box is
    made, the previous mask's box is moved by the image shift between the two slices
    (:func:`track_shift`). On low-contrast CT the model fills whatever box it is given, so
    only the image can tell that the tumour drifted.

    Returns the members (the sections' masks, then each chain's).
    """
    slices = result.slices
    cap = config.chain_cap_3d if result.prompt.z_range and config.chain_cap_3d is not None else config.chain_cap
    walked = sorted(k for k, s in slices.items() if not s.interpolated)
    if config.blend_embeddings:  # the chains walk the encoded slices only and interpolate between them
        walked = [k for k in walked if k in encoder.used or k == start.slice]
    members = [{k: s.mask for k, s in slices.items()}]
    plan = [(margin, False) for margin in config.chain_vote]
    if config.chain_track:
        plan += [(margin, True) for margin in config.chain_vote]
    chains: list[Member] = [{start.slice: slices[start.slice].mask} for _ in plan]
    at = walked.index(start.slice)
    for order in (walked[at + 1 :], walked[:at][::-1]):
        _walk_chains(encoder, chains, plan, order, start.slice, slices, keys, cap, config)
    _interpolate_chains(chains)
    members += chains
    _vote(slices, keys, members)
    log.info("chain vote over %d slices (%d members)", len(slices), len(members))
    return members


def _walk_chains(encoder: SliceEncoder, chains: list[Member], plan: list[tuple[float, bool]], order: list[int],
                 origin: int, slices: dict[int, SliceResult], keys, cap: float, config: PropagationConfig) -> None:
    """Extend every chain from slice ``origin`` over the slices ``order`` (one direction).

    The chains walk in lockstep so that each slice decodes all their boxes in one call. A chain
    that is still going restarts from each prompted slice on the way; a chain ends at its
    first empty mask.
    """
    prev = [(chain[origin], origin) for chain in chains]  # each chain's last mask and its slice
    alive = list(range(len(plan)))
    for k in order:
        if k in keys:  # a prompted slice: every chain that is still going restarts from it
            for c in alive:
                chains[c][k] = slices[k].mask
                prev[c] = (slices[k].mask, k)
            continue
        going = [c for c in alive if prev[c][0].any()]  # an empty prompted slice: nothing to follow
        if not going:
            break
        boxes = _chain_boxes(encoder.images, [prev[c] for c in going], [plan[c] for c in going], k,
                             slices[k].box, cap, config)
        masks, _ = encoder.predict(k, np.array(boxes))
        alive = []
        for c, mask in zip(going, masks):
            mask = largest_2d_component(mask)
            if mask.sum() >= config.min_area_px:  # else this chain ends here
                chains[c][k] = mask
                prev[c] = (mask, k)
                alive.append(c)
        if not alive:
            break


def _chain_boxes(images: np.ndarray, prevs: list[tuple[np.ndarray, int]], plan: list[tuple[float, bool]], k: int,
                 section_box, cap: float, config: PropagationConfig) -> list[tuple[int, int, int, int]]:
    """Each chain's box on slice k: its previous mask's box (moved with the image for a tracked
    chain), grown by the chain's margin and capped by the sections' box ``section_box``."""
    shape = images.shape[:2]
    tracked = [n for n, (_, track) in enumerate(plan) if track]
    shifts = dict(zip(tracked, map_threads(lambda n: track_shift(images, *prevs[n], k), tracked)))
    boxes = []
    for n, (margin, track) in enumerate(plan):
        prev_box = mask_box(prevs[n][0])
        if track:
            prev_box = shift_box(prev_box, shifts[n], shape)
        boxes.append(cap_box(expand_box(prev_box, shape, margin, config.margin_min), section_box, cap))
    return boxes


def _interpolate_chains(chains: list[Member]) -> None:
    """Fill each chain's slices between the ones it walked (in place), by shape-based interpolation."""
    gaps = [(chain, a, b, t) for chain in chains for a, b in zip(sorted(chain), sorted(chain)[1:])
            for t in range(a + 1, b)]
    filled = map_threads(lambda g: interpolate_masks(g[0][g[1]], g[0][g[2]], (g[3] - g[1]) / (g[2] - g[1])), gaps)
    for (chain, _, _, t), mask in zip(gaps, filled):
        chain[t] = mask


def _vote(slices: dict[int, SliceResult], keys, members: Sequence[Member]) -> None:
    """Each slice but the prompted ones keeps the pixels of a strict majority of the members present."""
    for k, sl in slices.items():
        if k in keys:
            continue
        present = [m[k] for m in members if k in m]  # a chain that ended before k abstains
        sl.mask = sum(m.astype(np.uint8) for m in present) >= len(present) // 2 + 1


def alternative_volumes(result: ObjectResult, members: Sequence[Member], keys) -> list[float]:
    """Each vote member's volume over the result's: how far the volume moves between the engine's own
    alternative segmentations, which the vote settles slice by slice (see :func:`chain_vote`).

    A member counts the result's mask on the slices where it abstained and on the prompted slices
    (they do not vote). The range they span is a spread, not a confidence interval: how often it
    holds the reference volume is a benchmark figure (``range_holds_reference``).
    """
    final = {k: sl.mask for k, sl in result.slices.items()}
    total = sum(int(mask.sum()) for mask in final.values())
    if not members or not total:
        return []
    return [sum(int((member[k] if k in member and k not in keys else final[k]).sum()) for k in final) / total
            for member in members]


def track_shift(images: np.ndarray, prev_mask: np.ndarray, ka: int, kb: int) -> tuple[int, int]:
    """How far (di, dj) the image content around ``prev_mask`` moved from slice ka to slice kb.

    The patch is the mask's box grown by half its size on each side; the shift is found by
    masked normalised cross-correlation (``skimage.registration.phase_cross_correlation``
    with masks, Padfield 2012; on block means when the patch is larger than ``TRACK_PX``)
    and clipped to a quarter of the box's larger side.
    """
    import os

    import scipy.fft
    from skimage.registration import phase_cross_correlation

    I, J = prev_mask.shape
    i0, j0, i1, j1 = mask_box(prev_mask)
    hi, hj = (i1 - i0 + 1) // 2, (j1 - j0 + 1) // 2
    a0, b0, a1, b1 = max(0, i0 - hi), max(0, j0 - hj), min(I, i1 + hi + 1), min(J, j1 + hj + 1)
    before = images[a0:a1, b0:b1, ka].astype(np.float64)
    after = images[a0:a1, b0:b1, kb].astype(np.float64)
    if np.ptp(before) == 0 or np.ptp(after) == 0:  # nothing to register
        return 0, 0
    f = max(1, int(np.ceil(max(before.shape) / TRACK_PX)))
    if f > 1:  # a large patch: register block means (the shift is needed to a few pixels only)
        from skimage.transform import downscale_local_mean

        before, after = downscale_local_mean(before, (f, f)), downscale_local_mean(after, (f, f))
    everywhere = np.ones(before.shape, bool)
    with scipy.fft.set_workers(os.cpu_count() or 1):  # skimage's FFTs, on every core
        found = phase_cross_correlation(before, after, reference_mask=everywhere, moving_mask=everywhere)
    shift = f * np.asarray(found[0] if isinstance(found, tuple) else found, float)
    limit = 0.25 * max(i1 - i0 + 1, j1 - j0 + 1)
    di, dj = np.clip(-shift[:2], -limit, limit)
    return int(round(di)), int(round(dj))
