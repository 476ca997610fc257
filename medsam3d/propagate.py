"""Slice-by-slice propagation of box prompts through a volume.

By default (``PropagationConfig.orthogonal``) every slice's box comes from orthogonal
sections through the object (:mod:`medsam3d.views`); the box chain below runs only with
``orthogonal=False``.

With ``PropagationConfig.stride`` > 1 (the default is 3) only every stride-th slice and the
ends are encoded at first; the slices between are interpolated where their segmented
neighbours agree and segmented where they do not (:func:`_fill_gaps`); with
``PropagationConfig.blend_embeddings`` the slices segmented there are decoded on blended
neighbour embeddings instead of being encoded (:meth:`PropagationConfig.fast` builds on it).

Each prompted slice's final mask is the majority over its box grown by 0-3 pixels
(:func:`_prompt_ensemble`), so it does not depend on how tightly the box was drawn.

Box chains with two margins, each once with a fixed box and once with a box moved with the
image (:func:`_track_shift`), then walk the slices the sections segmented (given by the
z_range, or found by the sections for a 2D box), and each slice keeps the pixels that most
of the five agree on (:func:`_chain_vote`, ``PropagationConfig.chain_vote``, ``chain_track``):
chains follow a tumour that drifts sideways out of the sections, the sections stop a chain's
errors from piling up.

Without a z_range an object that stands out from its surroundings on the prompted slice
also ends where a slice's mask no longer holds what it held there (:func:`_content_check`).

The box chain (with ``orthogonal=False`` only): from each object's prompted slice (the one
with the largest box first) the engine walks outwards in both directions. The next slice's
box is the previous mask's bounding box plus a margin; a prompted slice on the way uses its
own box. An object ends on evidence:

* an empty mask, or a small one (below ``min_area_frac`` of the largest area seen so
  far) that the model is also less sure of (score below ``tail_score_frac`` x the
  prompted slice's score): past a tumour's end SAM-family models keep returning small,
  less confident blobs of the neighbouring tissue;
* a low predicted quality (model IoU score below ``min_score``);
* a jump in area (above ``max_growth`` x the previous slice) or a centroid jump larger
  than ``max_shift`` x the previous box's diagonal (the mask leaked onto a neighbour);
* the end of the object's ``z_range`` when one is given (inside it, only an empty mask
  stops the walk).

A rejected slice is not kept. The engine never falls back to the original box outside
the prompted slices, so it cannot leak through the rest of the volume.

Embeddings are cached per slice (one encoding serves every object) and slices are
encoded ahead in batches along the walk (``batch_size``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ._parallel import map_threads
from .prompts import ObjectPrompt

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


@dataclass
class PropagationConfig:
    margin_frac: float = 0.03
    margin_min: int = 1
    min_area_frac: float = 0.15
    min_area_px: int = 4
    tail_score_frac: float = 0.92
    min_score: float = 0.35
    max_growth: float = 1.8
    max_shift: float = 0.5
    #: slices encoded ahead per batch; None: 8 on a GPU, 1 on a CPU (set by the pipeline)
    batch_size: int | None = None
    #: take each slice's box from orthogonal (sagittal + coronal) sections, see :mod:`medsam3d.views`
    orthogonal: bool = True
    #: without a z_range, the sections first span the key box's largest in-plane size x this, each way
    section_reach: float = 0.6
    #: with a z_range, the sections' box is the key box widened by this fraction each side
    section_margin_3d: float = 0.15
    #: encode every stride-th slice first; the slices between are interpolated where their
    #: neighbours' masks overlap by at least ``interp_iou``, else segmented too
    stride: int = 3
    interp_iou: float = 0.6
    #: where the sagittal and coronal sections cut the key box (fractions of its width)
    section_positions: tuple[float, ...] = (0.5, 0.3, 0.7)
    #: with a z_range, these positions instead (None: ``section_positions``); the chain vote then
    #: recovers much of what fewer sections miss, the sections alone carry a 2D box's slices
    section_positions_3d: tuple[float, ...] | None = None
    #: with a z_range of fewer slices than this, no sections: every slice is encoded anyway, and on
    #: the two short lesions (3 slices) the masks were the same without the sections' 6 encodings
    section_min_slices: int = 5
    #: box-chain margins whose masks vote with the sections' (see :func:`_chain_vote`); () turns the vote off
    chain_vote: tuple[float, ...] = (0.03, 0.06)
    #: a chain's box is at most the sections' box for that slice x (1 + chain_cap) along i and j
    chain_cap: float = 0.5
    #: with a z_range, this cap instead (None: ``chain_cap``); the speed preset's single pair of sections
    #: sees a chord of the object off its centre and needs a looser cap
    chain_cap_3d: float | None = None
    #: with the vote, a second chain per margin moves its box with the image (see :func:`_track_shift`)
    chain_track: bool = True
    #: the prompted slices' own masks: per-pixel majority over the user's box grown by each of
    #: these many pixels (the propagation still starts from the box as given); () = the box alone
    prompt_ensemble: tuple[int, ...] = (0, 1, 2, 3)
    #: where neighbours disagree, decode the middle slice on a blend of their embeddings instead of
    #: encoding it, and let the vote's chains walk the encoded slices only (fewer encodings and
    #: decodes, slightly lower Dice; see :func:`_fill_gaps`, :func:`_chain_vote` and :meth:`fast`)
    blend_embeddings: bool = False
    #: without a z_range, an object that stands out on its prompted slice (|median inside - median of a
    #: 3-pixel ring| >= this x their pooled robust spread) ends where a slice's mask holds less than
    #: ``content_min_rel`` of that contrast (see :func:`_content_check`); 0 turns this off
    content_min_cnr: float = 1.5
    content_min_rel: float = 0.5
    #: a fainter object (at least this x the spread) ends where a slice's mask holds less than
    #: ``content_weak_rel`` of the contrast (negative: the contrast is reversed); 0 turns this off
    content_weak_cnr: float = 0.5
    content_weak_rel: float = -0.5
    #: voxel size (mm) along i, j, k, set by the pipeline from the volume
    voxel_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def fast(cls, **changes) -> "PropagationConfig":
        """The speed preset (CLI ``--fast``): blended embeddings, stride 4 and, with a z_range, sections
        at the key box's centre only, with the vote's chains capped at 2x the sections' box (one
        central pair of sections sees a chord of the object off its centre; with the default cap
        the volumes ran 8-12 % low). On a 2-core CPU, 3D box, 8 cases: mean Dice CT 0.834, MR 0.823
        against the defaults' 0.844 and 0.829, in about half their time: 0.20-0.23x (CT) and 0.22-0.254x
        (MR) of the naive loop's, summed over the cases, in seven runs with the reordered box decoder
        and ONNX Runtime's threads not spinning (0.25-0.28x and 0.26-0.33x in runs 14-18, before
        both; the naive loop's own time moves by up to 37 % between runs; see the README's
        benchmark)."""
        settings = dict(blend_embeddings=True, stride=4, section_positions_3d=(0.5,), chain_cap_3d=1.0)
        settings.update(changes)
        return cls(**settings)


@dataclass
class SliceResult:
    mask: np.ndarray  # (I, J) bool in the working layout
    score: float
    box: tuple[int, int, int, int]
    interpolated: bool = False  # filled from agreeing neighbours (see _fill_gaps), not walked


@dataclass
class ObjectResult:
    prompt: ObjectPrompt
    slices: dict[int, SliceResult] = field(default_factory=dict)
    stop_reasons: dict[str, str] = field(default_factory=dict)
    #: each chain-vote member's volume over the result's (see :func:`_alternative_volumes`); [] without a vote
    alternatives: list[float] = field(default_factory=list)


class SliceEncoder:
    """Encodes slices on demand (cached), batching ahead along a direction.

    ``images`` is the preprocessed (I, J, K) float volume; ``crop`` an optional
    (i0, j0, i1, j1) inclusive region encoded instead of the whole slice (zoom).
    """

    def __init__(self, model, images: np.ndarray, crop: tuple[int, int, int, int] | None = None,
                 batch_size: int = 1, progress: Progress | None = None, total_hint: int | None = None):
        self.model = model
        self.images = images
        I, J, _ = images.shape
        self.crop = crop or (0, 0, I - 1, J - 1)
        self.batch_size = max(1, int(batch_size))
        self.cache: dict[int, object] = {}
        self.used: set[int] = set()  # slices asked for (not merely encoded ahead in a batch)
        self.sections_encoded = 0
        self.progress = progress
        self.total_hint = total_hint or images.shape[2]

    def _slice_image(self, k: int) -> np.ndarray:
        i0, j0, i1, j1 = self.crop
        return self.images[i0 : i1 + 1, j0 : j1 + 1, k].T  # rows = j, columns = i

    def get(self, k: int, direction: int = 0, limit: tuple[int, int] | None = None):
        """Features of slice k. With a ``direction`` (a walk's step) the next slices along it, up to
        ``batch_size`` in all and within ``limit``, are encoded in the same batch. Slices encoded
        ahead are not :attr:`used` until asked for, so the segmentation does not depend on the
        batch size (a GPU gives the same masks as a CPU)."""
        self.used.add(k)
        if k not in self.cache:
            lo, hi = limit or (0, self.images.shape[2] - 1)
            todo = [k]
            step = direction
            nxt = k + step
            while step and len(todo) < self.batch_size and lo <= nxt <= hi:
                if nxt not in self.cache:
                    todo.append(nxt)
                nxt += step
            features = self.model.encode([self._slice_image(s) for s in todo])
            for s, f in zip(todo, features):
                self.cache[s] = f
            if self.progress:
                self.progress(len(self.cache), self.total_hint, f"encoded slice {k}")
        return self.cache[k]

    def blended(self, k: int):
        """Features for slice k blended linearly from the nearest encoded slices on each side (the
        model's ``blend``), or None when k is encoded, has no encoded slice on one side, or the
        model cannot blend."""
        blend = getattr(self.model, "blend", None)
        if blend is None or k in self.used:  # a model that cannot blend its features: encode
            return None
        below = [t for t in self.used if t < k]
        above = [t for t in self.used if t > k]
        if not below or not above:
            return None
        a, b = max(below), min(above)
        return blend(self.cache[a], self.cache[b], (k - a) / (b - a))

    def predict(self, k: int, boxes: np.ndarray, direction: int = 0, limit=None, blend: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
        """Masks (N, I, J) in full-slice coordinates for boxes (N, 4) in slice pixels (i, j)."""
        i0, j0, i1, j1 = self.crop
        local = np.asarray(boxes, np.float32).reshape(-1, 4) - [i0, j0, i0, j0]
        features = self.blended(k) if blend else None
        if features is None:
            features = self.get(k, direction, limit)
        masks_rc, scores = self.model.decode(features, local)
        I, J, _ = self.images.shape
        full = np.zeros((len(local), I, J), bool)
        full[:, i0 : i1 + 1, j0 : j1 + 1] = masks_rc.transpose(0, 2, 1)
        return full, scores

    @property
    def encoded(self) -> int:
        return len(self.cache)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive (i0, j0, i1, j1) bounding box of a 2D (I, J) mask, or None when empty."""
    ii = np.flatnonzero(mask.any(axis=1))
    jj = np.flatnonzero(mask.any(axis=0))
    if ii.size == 0:
        return None
    return int(ii[0]), int(jj[0]), int(ii[-1]), int(jj[-1])


def expand_box(box, shape: tuple[int, int], frac: float, minimum: int) -> tuple[int, int, int, int]:
    i0, j0, i1, j1 = box
    mi = max(minimum, int(round(frac * (i1 - i0 + 1))))
    mj = max(minimum, int(round(frac * (j1 - j0 + 1))))
    return max(0, i0 - mi), max(0, j0 - mj), min(shape[0] - 1, i1 + mi), min(shape[1] - 1, j1 + mj)


def _largest_2d_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def _content_check(image: np.ndarray, mask: np.ndarray, config: PropagationConfig
                   ) -> Callable[[np.ndarray, np.ndarray], bool] | None:
    """A test of whether a slice's mask still holds the object seen in ``mask`` on ``image`` (the
    prompted slice), or None when the object does not stand out there.

    Past a conspicuous lesion's end the model keeps returning a blob of the neighbouring tissue
    (breast1 with a 2D box: 22 and 21 px on the slices either side of the lesion, scored almost as
    high as the lesion's own slices). The test: the mask's median intensity must lie at least
    ``config.content_min_rel`` of the way from the prompted slice's ring median to its inside
    median. It applies where that contrast is at least ``config.content_min_cnr`` x the pooled
    robust spread (IQR / 1.349) of inside and ring. A fainter object (at least
    ``config.content_weak_cnr`` x the spread) gets the weaker test ``config.content_weak_rel``:
    past its end the mask's contrast is reversed (brain2 with a 2D box: a lesion 0.65x the
    spread brighter than its ring, and masks of darker tissue on the slices past it, their
    medians 1.4x the lesion's contrast below the ring). On the low-contrast sarcomas
    (contrast-to-noise 0.07-0.53; sts010-mr is the one above 0.5, unchanged) the medians say
    nothing, and neither test applies.

    ``mask`` should be the prompted slice's best mask (the box ensemble's, see
    :func:`_prompt_ensemble`): brain2's mask for the tight box alone (112 px of 227) had the
    opposite contrast.
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


def propagate(encoder: SliceEncoder, objects: Sequence[ObjectPrompt], config: PropagationConfig | None = None
              ) -> list[ObjectResult]:
    """Run every object's walk; returns per-object per-slice masks in the working layout."""
    config = config or PropagationConfig()
    I, J, K = encoder.images.shape
    results = []
    for obj in objects:
        result = ObjectResult(obj)
        keys = {b.slice: b for b in obj.boxes}
        start = max(obj.boxes, key=lambda b: b.area)
        lo, hi = obj.z_range or (0, K - 1)
        # every prompted slice is segmented with its own box
        as_drawn = {}
        for k, prompt in sorted(keys.items()):
            masks, scores = encoder.predict(k, np.array([prompt.box]), 0, (lo, hi))
            as_drawn[k] = masks[0]
            mask = masks[0] & _box_mask(expand_box(prompt.box, (I, J), 0.0, config.margin_min), (I, J))
            result.slices[k] = SliceResult(mask, float(scores[0]), prompt.box)
        ensemble = _prompt_ensemble(encoder, keys, config, as_drawn)
        for direction in (+1, -1) if not config.orthogonal else ():  # the box chain
            prev = result.slices[start.slice]
            peak = max(int(prev.mask.sum()), 1)
            k = start.slice + direction
            reason = "volume edge" if obj.z_range is None else "z_range end"
            while lo <= k <= hi:
                if k in keys:  # another prompt: trust it and walk on from there
                    prev = result.slices[k]
                    peak = max(peak, int(prev.mask.sum()))
                    k += direction
                    continue
                prev_box = mask_box(prev.mask) or prev.box
                box = expand_box(prev_box, (I, J), config.margin_frac, config.margin_min)
                masks, scores = encoder.predict(k, np.array([box]), direction, (lo, hi))
                mask = _largest_2d_component(masks[0])
                score = float(scores[0])
                area = int(mask.sum())
                stop = _stop_reason(mask, area, score, prev, peak, config, bounded=obj.z_range is not None,
                                    start_score=result.slices[start.slice].score)
                if stop:
                    reason = f"{stop} at slice {k}"
                    break
                result.slices[k] = SliceResult(mask, score, box)
                peak = max(peak, area)
                prev = result.slices[k]
                k += direction
            result.stop_reasons["up" if direction > 0 else "down"] = reason
        members = []
        if config.orthogonal:
            _orthogonal_pass(encoder, obj, result, start, keys, config,
                             key_mask=ensemble.get(start.slice, result.slices[start.slice].mask))
            if config.chain_vote:
                members = _chain_vote(encoder, result, start, keys, config)
        for k, mask in ensemble.items():
            result.slices[k].mask = mask
        result.alternatives = _alternative_volumes(result, members, keys)
        log.info("object '%s': slices %d..%d (%s; %s)", obj.name, min(result.slices), max(result.slices),
                 result.stop_reasons["down"], result.stop_reasons["up"])
        results.append(result)
    return results


def _orthogonal_pass(encoder: SliceEncoder, obj: ObjectPrompt, result: ObjectResult, start, keys, config,
                     key_mask: np.ndarray) -> None:
    """Re-segment every slice with a box read from orthogonal sections (replaces the chain's boxes).

    With a ``z_range`` the sections span it; otherwise they start from the key box's largest
    in-plane size x ``config.section_reach`` each way (and every prompted slice) and grow
    while the object goes on (see :func:`medsam3d.views.orthogonal_boxes`), and the object
    ends where the sections end or a slice's mask is empty. (Starting from a box chain's
    extent instead, as before, let the sections run on past small lesions: the chain's masks
    past breast1's end stay at 20-33 % of the key's area.)

    With ``config.stride`` > 1 only every stride-th slice (and the ends) is encoded at
    first; see :func:`_fill_gaps` for the slices in between.
    """
    from .views import orthogonal_boxes

    I, J, K = encoder.images.shape
    if obj.z_range:
        z, adaptive = obj.z_range, False
    else:
        # first guess: the key box's largest in-plane size x section_reach each way from the middle of
        # the prompted slices (the key slice itself when there is one), and every prompted slice; the
        # sections then grow while the object goes on. (Centred on the largest box's slice instead, two
        # boxes at a third and two thirds of a tumour gave a range shifted towards one of them, and the
        # sections' masks, which follow their box, ended early on one side and late on the other.)
        b = start.box
        reach = int(np.ceil(max((b[2] - b[0] + 1) * config.voxel_mm[0], (b[3] - b[1] + 1) * config.voxel_mm[1])
                            / config.voxel_mm[2] * config.section_reach))
        middle = (min(keys) + max(keys)) / 2
        z = (max(0, min(min(keys), int(np.floor(middle - reach)))),
             min(K - 1, max(max(keys), int(np.ceil(middle + reach)))))
        adaptive = True
    # a given z_range comes with a box on one slice that need not be the largest: wider sections
    positions = (obj.z_range and config.section_positions_3d) or config.section_positions
    # a short range, or a volume of a few slices (whose sections are a few pixels high): no sections,
    # every slice's box is the key box's (see slice_box); without a z_range an empty mask still ends it
    short = (z[1] - z[0] if obj.z_range else K - 1) + 1 < config.section_min_slices
    if short:
        z = obj.z_range or (0, K - 1)
        boxes, sections = {}, 0
    else:
        boxes, sections = orthogonal_boxes(encoder.model, encoder.images, config.voxel_mm, start.box, z,
                                           adaptive=adaptive, margin=config.section_margin_3d if obj.z_range else 0.05,
                                           positions=tuple(positions))
    encoder.sections_encoded += sections
    lo, hi = z if obj.z_range or short else (min(boxes, default=start.slice), max(boxes, default=start.slice))
    slices = {k: result.slices[k] for k in keys}
    empty: set[int] = set()
    foreign: set[int] = set()  # slices whose mask failed the content check (also in ``empty``)
    stride = max(1, int(config.stride))
    holds = None if obj.z_range else _content_check(encoder.images[..., start.slice], key_mask, config)

    def slice_box(k: int) -> tuple[int, int, int, int]:
        # inside a given range, a slice the sections missed reuses the nearest box towards the key slice
        step = 1 if k < start.slice else -1
        for t in range(k, start.slice, step):
            if t in keys:
                return keys[t].box
            if t in boxes:
                return boxes[t]
        return start.box

    def run(k: int, direction: int, blend: bool = False) -> bool:
        box = expand_box(slice_box(k), (I, J), config.margin_frac, config.margin_min)
        masks, scores = encoder.predict(k, np.array([box]), direction * stride, (lo, hi), blend=blend)
        mask = _largest_2d_component(masks[0])
        if mask.sum() < config.min_area_px:
            empty.add(k)  # no object here (without a z_range, this ends it)
            return False
        if holds and not holds(encoder.images[..., k], mask):
            empty.add(k)
            foreign.add(k)
            return False
        slices[k] = SliceResult(mask, float(scores[0]), box)
        return True

    blend = config.blend_embeddings and callable(getattr(encoder.model, "blend", None))
    for direction in (+1, -1):
        side = "up" if direction > 0 else "down"
        bound = hi if direction > 0 else lo
        todo = []  # the slices of this direction, in walking order, up to where the sections end
        for k in range(start.slice + direction, bound + direction, direction):
            if k not in boxes and not obj.z_range and not short and k not in keys:
                result.stop_reasons[side] = f"orthogonal sections end at slice {k}"
                break
            todo.append(k)
        else:
            result.stop_reasons[side] = "z_range end" if obj.z_range else "volume edge" if short else "sections end"
        last_good = start.slice
        n = 0
        while n < len(todo):
            nxt = min(n + stride, len(todo))
            n = next((m + 1 for m in range(n, nxt) if todo[m] in keys), nxt)  # stop at a prompted slice
            k = todo[n - 1]
            if k in keys:
                last_good = k
                continue
            if run(k, direction):
                last_good = k
                continue
            if obj.z_range:
                # the object goes on to the range's end: the slices skipped before this empty one are
                # segmented, not left out (with blend, on blends of the encoded slices around them)
                for t in range(last_good + direction, k, direction):
                    if run(t, direction, blend):
                        last_good = t
                continue
            # without a range an empty mask ends the object: find the end slice by slice (with blend,
            # on blends of the two encoded slices around it)
            for t in range(last_good + direction, k, direction):
                if not run(t, direction, blend):
                    k = t
                    break
            what = "a mask unlike the prompted slice's object" if k in foreign else "empty mask"
            result.stop_reasons[side] = f"{what} at slice {k}"
            break
    _fill_gaps(slices, empty, encoder.used, run, slice_box, (I, J), config, blend)
    result.slices = slices


def _chain_vote(encoder: SliceEncoder, result: ObjectResult, start, keys, config: PropagationConfig
                ) -> list[dict[int, np.ndarray]]:
    """Per-slice majority vote of the sections' masks and box chains run over the same slices.

    The sections give each slice a box independently of its neighbours; near the ends of a
    tumour that drifts sideways those boxes miss, and on low-contrast CT they are loose. A
    box chain (next box = previous mask's box + margin) follows a drift but compounds its
    errors: a tight margin shrinks on CT, a loose one grows. For every margin in
    ``config.chain_vote`` a chain walks outwards from the key slice over the slices the
    sections segmented (already encoded: decoding only, nothing is encoded; with
    ``config.blend_embeddings`` the encoded ones only, none decoded on a blend), restarting at
    every prompted slice and ending at an empty mask; the slices between are interpolated
    as in :func:`_fill_gaps`. Each slice then keeps the pixels that most members agree on;
    a chain that ended before a slice (or had no mask to start from) abstains there.

    A chain's box is capped at the sections' box for its slice x (1 + ``config.chain_cap``, or
    ``config.chain_cap_3d`` with a z_range)
    along i and j: the sections may misplace a tumour's tapering end but see its size, and
    an uncapped chain keeps the size of the previous slice and grows past the end. Where
    the sections see only a chord of the object the cap keeps only part of it.

    With ``config.chain_track`` every margin also gets a tracked chain: before its box is
    made, the previous mask's box is moved by the image shift between the two slices
    (:func:`_track_shift`). On low-contrast CT the model fills whatever box it is given, so
    only the image can tell that the tumour drifted (sts001-ct: 0.782 -> 0.831; with the
    reference's box centres, 0.856).

    With a 2D box (no z_range) the chains walk the slices the sections found, as with a 3D box
    (cached embeddings, 8 cases, 2D box: mean Dice CT 0.814 -> 0.841, MR 0.739 -> 0.756).

    Returns the members (the sections' masks, then each chain's), slice -> mask.
    """
    I, J, _ = encoder.images.shape
    slices = result.slices
    cap = config.chain_cap_3d if result.prompt.z_range and config.chain_cap_3d is not None else config.chain_cap
    walked = sorted(k for k, s in slices.items() if not s.interpolated)
    if config.blend_embeddings:  # the chains walk the encoded slices only and interpolate between them
        walked = [k for k in walked if k in encoder.used or k == start.slice]
    members = [{k: s.mask for k, s in slices.items()}]
    plan = [(margin, False) for margin in config.chain_vote]
    if config.chain_track:
        plan += [(margin, True) for margin in config.chain_vote]
    chains: list[dict[int, np.ndarray]] = [{start.slice: slices[start.slice].mask} for _ in plan]
    at = walked.index(start.slice)
    for order in (walked[at + 1 :], walked[:at][::-1]):
        # the chains walk in lockstep so that each slice decodes all their boxes in one call
        prev = [(chain[start.slice], start.slice) for chain in chains]
        alive = list(range(len(plan)))
        for k in order:
            if k in keys:  # a prompted slice: every chain that is still going restarts from it
                for c in alive:
                    chains[c][k] = slices[k].mask
                    prev[c] = (slices[k].mask, k)
                continue
            alive = [c for c in alive if prev[c][0].any()]  # an empty prompted slice: nothing to follow
            tracked = [c for c in alive if plan[c][1]]
            shifts = dict(zip(tracked, map_threads(lambda c: _track_shift(encoder.images, *prev[c], k), tracked)))
            boxes, going, alive = [], alive, []
            if not going:
                break
            for c in going:
                margin, track = plan[c]
                prev_box = mask_box(prev[c][0])
                if track:
                    prev_box = _shift_box(prev_box, shifts[c], (I, J))
                box = expand_box(prev_box, (I, J), margin, config.margin_min)
                boxes.append(_cap_box(box, slices[k].box, cap))
            masks, _ = encoder.predict(k, np.array(boxes))
            for c, mask in zip(going, masks):
                mask = _largest_2d_component(mask)
                if mask.sum() >= config.min_area_px:  # else this chain ends here
                    chains[c][k] = mask
                    prev[c] = (mask, k)
                    alive.append(c)
            if not alive:
                break
    gaps = [(chain, a, b, t) for chain in chains for a, b in zip(sorted(chain), sorted(chain)[1:])
            for t in range(a + 1, b)]
    filled = map_threads(lambda g: _interpolate_masks(g[0][g[1]], g[0][g[2]], (g[3] - g[1]) / (g[2] - g[1])), gaps)
    for (chain, _, _, t), mask in zip(gaps, filled):
        chain[t] = mask
    members += chains
    for k, sl in slices.items():
        if k in keys:
            continue
        present = [m[k] for m in members if k in m]  # a chain that ended before k abstains
        sl.mask = sum(m.astype(np.uint8) for m in present) >= len(present) // 2 + 1
    log.info("chain vote over %d slices (%d members)", len(slices), len(members))
    return members


def _alternative_volumes(result: ObjectResult, members: Sequence[dict[int, np.ndarray]], keys) -> list[float]:
    """Each vote member's volume over the result's: how far the volume moves between the engine's own
    alternative segmentations, which the vote settles slice by slice (see :func:`_chain_vote`).

    A member counts the result's mask on the slices where it abstained and on the prompted slices
    (they do not vote). In benchmark run 24 the reference volume lay between the smallest and the
    largest of these (and the result) in 19 of 24 sarcoma runs (3D and 2D box, with and without
    ``--fast``) and 1 of 8 on the two 3-slice lesions: a spread, not a confidence interval.
    """
    final = {k: sl.mask for k, sl in result.slices.items()}
    total = sum(int(mask.sum()) for mask in final.values())
    if not members or not total:
        return []
    return [sum(int((member[k] if k in member and k not in keys else final[k]).sum()) for k in final) / total
            for member in members]


#: larger patches are registered on block means (f x f, f = ceil(side / TRACK_PX)): the FFTs are
#: f² times smaller on a large tumour, for a Dice lower by at most 0.002 per sarcoma (0.004 over the six)
TRACK_PX = 128


def _track_shift(images: np.ndarray, prev_mask: np.ndarray, ka: int, kb: int) -> tuple[int, int]:
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


def _shift_box(box, shift: tuple[int, int], shape: tuple[int, int]):
    """``box`` moved by (di, dj), kept inside the slice."""
    di, dj = shift
    i0, j0, i1, j1 = box
    di = int(np.clip(di, -i0, shape[0] - 1 - i1))
    dj = int(np.clip(dj, -j0, shape[1] - 1 - j1))
    return i0 + di, j0 + dj, i1 + di, j1 + dj


def _prompt_ensemble(encoder: SliceEncoder, keys, config: PropagationConfig,
                     as_drawn: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Each prompted slice's final mask: the per-pixel majority (at least half) of the masks for
    the user's box grown by each of ``config.prompt_ensemble`` pixels, within the largest box.

    MedSAM-family models are trained on boxes loosened by a few pixels; a box drawn tight on
    the lesion's edge (as a reference's bounding box is) cuts off its boundary ring, which on a
    small lesion is much of it (brain2: Dice 0.74 on its middle slice with the tight box, 0.92
    with 2 px more). The majority does not depend on how tight the box was drawn. The
    propagation itself starts from the box as given: starting it from the ensemble's mask
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
        limit = _box_mask(expand_box(boxes[-1], (I, J), 0.0, config.margin_min), (I, J))
        out[k] = (2 * votes >= len(boxes)) & limit
    return out


def _cap_box(box, limit, slack: float):
    """``box`` shrunk about its centre to at most ``limit``'s size x (1 + slack) along each axis."""
    out = list(box)
    for a in (0, 1):
        size = box[a + 2] - box[a] + 1
        cap = (limit[a + 2] - limit[a] + 1) * (1 + slack)
        if size > cap:
            centre = (box[a] + box[a + 2]) / 2
            out[a], out[a + 2] = int(round(centre - (cap - 1) / 2)), int(round(centre + (cap - 1) / 2))
    return tuple(out)


def _fill_gaps(slices: dict[int, SliceResult], empty: set[int], used, run, slice_box, shape, config,
               blend: bool = False) -> None:
    """Slices skipped by a strided walk: interpolated where their neighbours agree, else segmented.

    Between two segmented slices ``a < b`` with skipped slices in between: when the two
    masks overlap well (IoU >= ``config.interp_iou``) the object changes smoothly there and
    the skipped slices get the shape-based (signed distance) interpolation of the two masks,
    clipped to their own box from the sections; otherwise the middle slice is encoded and
    segmented and both halves are checked again. Slices already ``used`` (encoded and asked
    for by a walk) are always segmented. Interpolated slices are marked (score = the lower of
    the two neighbours' scores).

    With ``blend`` (``config.blend_embeddings`` and a model that can blend) nothing more is
    encoded here: where the neighbours disagree, the middle slice (and, past an empty middle,
    every skipped slice) is decoded with its own box on the linear blend of the embeddings of
    the nearest encoded slices on each side (:meth:`SliceEncoder.blended`). Where they agree
    the skipped slices are interpolated as without ``blend``: decoding them on blends as well
    gave the same Dice (3D box, 8 cases: CT 0.840 and MR 0.826-0.827 either way) for more decodes.
    """
    stack = [(a, b) for a, b in zip(sorted(slices), sorted(slices)[1:]) if b - a > 1]
    while stack:
        a, b = stack.pop()
        between = [t for t in range(a + 1, b) if t not in empty and t not in slices]
        if not between:
            continue
        cached = [t for t in between if t in used]
        if cached:  # encoded already (by the box chain): decoding is cheap, segment them
            done = [a, *(t for t in cached if run(t, 0)), b]
            stack += [(x, y) for x, y in zip(done, done[1:]) if y - x > 1]
            continue
        ma, mb = slices[a].mask, slices[b].mask
        iou = (ma & mb).sum() / max((ma | mb).sum(), 1)
        if iou >= config.interp_iou:
            for t in between:
                w = (t - a) / (b - a)
                box = expand_box(slice_box(t), shape, config.margin_frac, config.margin_min)
                mask = _interpolate_masks(ma, mb, w) & _box_mask(box, shape)
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


def _interpolate_masks(ma: np.ndarray, mb: np.ndarray, w: float) -> np.ndarray:
    """Shape-based interpolation: the zero level of (1 - w) x sdf(ma) + w x sdf(mb)."""
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


def _box_mask(box, shape) -> np.ndarray:
    out = np.zeros(shape, bool)
    i0, j0, i1, j1 = box
    out[i0 : i1 + 1, j0 : j1 + 1] = True
    return out


def _stop_reason(mask, area, score, prev: SliceResult, peak: int, config: PropagationConfig, bounded: bool,
                 start_score: float = 1.0) -> str | None:
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
