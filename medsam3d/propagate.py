"""Slice-by-slice propagation of box prompts through a volume.

From each object's prompted slice (the one with the largest box first) the engine walks
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
    margin_frac: float = 0.08
    margin_min: int = 3
    min_area_frac: float = 0.15
    min_area_px: int = 4
    tail_score_frac: float = 0.92
    min_score: float = 0.35
    max_growth: float = 1.8
    max_shift: float = 0.5
    batch_size: int = 1
    #: propagated boxes stay inside the prompted box widened by this fraction of its size (None: no limit)
    box_limit_frac: float | None = None
    #: a slice's mask may extend at most this far (mm) beyond the previous slice's mask (None: no limit)
    max_step_mm: float | None = None
    #: in-plane pixel size (mm) along i and j, set by the pipeline from the volume
    pixel_mm: tuple[float, float] = (1.0, 1.0)


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
        for direction in (+1, -1):
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
                if config.box_limit_frac is not None:
                    box = _clip_box(box, expand_box(start.box, (I, J), config.box_limit_frac, 0))
                masks, scores = encoder.predict(k, np.array([box]), direction, (lo, hi))
                mask = masks[0]
                if config.max_step_mm is not None and prev.mask.any():
                    mask = mask & _dilate_mm(prev.mask, config.max_step_mm, config.pixel_mm)
                mask = _largest_2d_component(mask)
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
        log.info("object '%s': slices %d..%d (%s; %s)", obj.name, min(result.slices), max(result.slices),
                 result.stop_reasons["down"], result.stop_reasons["up"])
        results.append(result)
    return results


def _clip_box(box, limit):
    i0, j0, i1, j1 = box
    a0, b0, a1, b1 = limit
    out = (max(i0, a0), max(j0, b0), min(i1, a1), min(j1, b1))
    return out if out[2] > out[0] and out[3] > out[1] else tuple(limit)


def _dilate_mm(mask: np.ndarray, radius_mm: float, pixel_mm: tuple[float, float]) -> np.ndarray:
    """Binary dilation by an ellipse of ``radius_mm`` in physical units (anisotropic pixels)."""
    from scipy import ndimage

    ri = max(1, int(np.floor(radius_mm / pixel_mm[0])))
    rj = max(1, int(np.floor(radius_mm / pixel_mm[1])))
    ii, jj = np.ogrid[-ri : ri + 1, -rj : rj + 1]
    footprint = (ii * pixel_mm[0]) ** 2 + (jj * pixel_mm[1]) ** 2 <= radius_mm**2
    return ndimage.binary_dilation(mask, structure=footprint)


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
