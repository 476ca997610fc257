"""Slice-by-slice propagation of box prompts through a volume.

By default (``PropagationConfig.orthogonal``) every slice's box comes from orthogonal
sections through the object (:mod:`medsam3d.views`): the box chain below then only
gives the first guess of the object's extent when no ``z_range`` is given.

The box chain: from each object's prompted slice (the one with the largest box first) the engine walks
outwards in both directions. The next slice's box is the previous mask's bounding box
plus a margin; a prompted slice on the way uses its own box. An object ends on evidence:

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
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

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
    batch_size: int = 1
    #: take each slice's box from orthogonal (sagittal + coronal) sections, see :mod:`medsam3d.views`
    orthogonal: bool = True
    #: without a z_range, the sections first span the key box's largest in-plane size x this, each way
    section_reach: float = 0.6
    #: with a z_range, the sections' box is the key box widened by this fraction each side
    section_margin_3d: float = 0.15
    #: voxel size (mm) along i, j, k, set by the pipeline from the volume
    voxel_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass
class SliceResult:
    mask: np.ndarray  # (I, J) bool in the working layout
    score: float
    box: tuple[int, int, int, int]


@dataclass
class ObjectResult:
    prompt: ObjectPrompt
    slices: dict[int, SliceResult] = field(default_factory=dict)
    stop_reasons: dict[str, str] = field(default_factory=dict)


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
        self.sections_encoded = 0
        self.progress = progress
        self.total_hint = total_hint or images.shape[2]

    def _slice_image(self, k: int) -> np.ndarray:
        i0, j0, i1, j1 = self.crop
        return self.images[i0 : i1 + 1, j0 : j1 + 1, k].T  # rows = j, columns = i

    def get(self, k: int, direction: int = 0, limit: tuple[int, int] | None = None):
        if k not in self.cache:
            lo, hi = limit or (0, self.images.shape[2] - 1)
            todo = [k]
            step = direction or 1
            nxt = k + step
            while len(todo) < self.batch_size and lo <= nxt <= hi:
                if nxt not in self.cache:
                    todo.append(nxt)
                nxt += step
            features = self.model.encode([self._slice_image(s) for s in todo])
            for s, f in zip(todo, features):
                self.cache[s] = f
            if self.progress:
                self.progress(len(self.cache), self.total_hint, f"encoded slice {k}")
        return self.cache[k]

    def predict(self, k: int, boxes: np.ndarray, direction: int = 0, limit=None) -> tuple[np.ndarray, np.ndarray]:
        """Masks (N, I, J) in full-slice coordinates for boxes (N, 4) in slice pixels (i, j)."""
        i0, j0, i1, j1 = self.crop
        local = np.asarray(boxes, np.float32).reshape(-1, 4) - [i0, j0, i0, j0]
        masks_rc, scores = self.model.decode(self.get(k, direction, limit), local)
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
        for k, prompt in sorted(keys.items()):
            masks, scores = encoder.predict(k, np.array([prompt.box]), 0, (lo, hi))
            mask = masks[0] & _box_mask(expand_box(prompt.box, (I, J), 0.0, config.margin_min), (I, J))
            result.slices[k] = SliceResult(mask, float(scores[0]), prompt.box)
        for direction in (+1, -1) if not (config.orthogonal and obj.z_range) else ():
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
        if config.orthogonal:
            _orthogonal_pass(encoder, obj, result, start, keys, config)
        log.info("object '%s': slices %d..%d (%s; %s)", obj.name, min(result.slices), max(result.slices),
                 result.stop_reasons["down"], result.stop_reasons["up"])
        results.append(result)
    return results


def _orthogonal_pass(encoder: SliceEncoder, obj: ObjectPrompt, result: ObjectResult, start, keys, config) -> None:
    """Re-segment every slice with a box read from orthogonal sections (replaces the chain's boxes).

    With a ``z_range`` the sections span it; otherwise they start from the chain's extent
    and grow while the object goes on (see :func:`medsam3d.views.orthogonal_boxes`), and the
    object ends where the sections end.
    """
    from .views import orthogonal_boxes

    I, J, K = encoder.images.shape
    if obj.z_range:
        z, adaptive = obj.z_range, False
    else:
        # first guess: the chain's extent, and at least the key box's largest in-plane size
        # each way (tumours are rarely more than twice as long as they are wide)
        b = start.box
        reach = int(np.ceil(max((b[2] - b[0] + 1) * config.voxel_mm[0], (b[3] - b[1] + 1) * config.voxel_mm[1])
                            / config.voxel_mm[2] * config.section_reach))
        z = (max(0, min(min(result.slices) - 1, start.slice - reach)),
             min(K - 1, max(max(result.slices) + 1, start.slice + reach)))
        adaptive = True
    # a given z_range comes with a box on one slice that need not be the largest: wider sections
    boxes, sections = orthogonal_boxes(encoder.model, encoder.images, config.voxel_mm, start.box, z,
                                       adaptive=adaptive, margin=config.section_margin_3d if obj.z_range else 0.05)
    encoder.sections_encoded += sections
    lo, hi = (obj.z_range if obj.z_range else (min(boxes, default=start.slice), max(boxes, default=start.slice)))
    slices = {k: result.slices[k] for k in keys}
    for direction in (+1, -1):
        k = start.slice + direction
        last_box = start.box
        while lo <= k <= hi:
            if k in keys:
                last_box = keys[k].box
                k += direction
                continue
            if k not in boxes and not obj.z_range:
                result.stop_reasons["up" if direction > 0 else "down"] = f"orthogonal sections end at slice {k}"
                break
            box = boxes.get(k, last_box)  # inside a given range, a gap reuses the nearest box
            box = expand_box(box, (I, J), config.margin_frac, config.margin_min)
            masks, scores = encoder.predict(k, np.array([box]), direction, (lo, hi))
            mask = _largest_2d_component(masks[0])
            if mask.sum() < config.min_area_px:
                if obj.z_range:
                    k += direction
                    continue
                result.stop_reasons["up" if direction > 0 else "down"] = f"empty mask at slice {k}"
                break
            slices[k] = SliceResult(mask, float(scores[0]), box)
            last_box = boxes.get(k, last_box)
            k += direction
        else:
            result.stop_reasons["up" if direction > 0 else "down"] = "z_range end" if obj.z_range else "sections end"
    result.slices = slices


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
