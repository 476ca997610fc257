"""From 2D detections to 3D seeds: scan slices, link boxes across slices, keep the real objects.

A 2D detector (Grounding DINO, Kosmos-2, or any callable) sees one slice at a time and
answers with scored boxes. :func:`find_tracks` turns its answers into 3D objects:

1. **Scan** every ``stride``-th slice, then **refine** around the hits: the slices within
   ``stride - 1`` of a slice with a hit (for a learned detector, one not covering the slice) are
   scanned too, repeatedly, so that an object's whole
   extent in k is seen while empty regions cost one slice in ``stride``.
2. **Per slice**: boxes under ``box_threshold`` are dropped, and so are duplicates (IoU above
   ``duplicate_iou`` with a better box of the same slice).
3. **Link** boxes of consecutive slices into tracks: a box joins the track whose last box
   overlaps it best (IoU at least ``link_iou``) when that box lies at most ``max_gap + 1``
   slices below (``max_gap`` missed slices are bridged); otherwise it starts a track.
4. **Reject** tracks that are no real object, each with its reason: for learned detectors
   (``learned=True``) boxes covering more than ``max_area_fraction`` of the slice (what
   Grounding DINO answers when the target is absent), tracks seen on fewer than
   ``min_slices`` slices (isolated detections), tracks whose mean score is under
   ``min_score``, and, with ``max_tracks``, the tracks beyond the best ``max_tracks``.
5. **Key slice** per kept track: its largest box (``key="area"``, ties by score) or its
   best-scoring one (``key="score"``), with the track's slice range as ``z_range``.

Every track becomes a :class:`~medsam3d.detect.Detection`; the rejected ones carry their
reason in ``rejected`` (the resolver records them in the report and seeds the engine with
the others only). :class:`TrackingDetector` wraps a 2D detector into a
:class:`~medsam3d.detect.Detector`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DetectorError
from ..volume import Volume
from .base import Detection, Progress

log = logging.getLogger(__name__)

#: a 2D detector: a slice's intensities ((I, J), the volume's array at k) -> [(box, score[, mask]), ...],
#: box ``(i0, j0, i1, j1)`` inclusive in the slice's indices, mask (optional) bool (I, J). One with a
#: ``detect_many(list of slices) -> list of answers`` attribute is given ``batch_size`` slices at a time
SliceDetector = Callable[[np.ndarray], Sequence[Sequence[Any]]]


@dataclass(frozen=True)
class TrackOptions:
    """How :func:`find_tracks` scans, links and filters (see the module docstring)."""

    stride: int = 4
    box_threshold: float = 0.25
    duplicate_iou: float = 0.7
    link_iou: float = 0.3
    max_gap: int = 1
    min_slices: int = 2
    min_score: float = 0.3
    max_area_fraction: float = 0.8
    learned: bool = True
    key: str = "area"
    #: keep at most this many tracks (the best: mean score x slices); None: all that pass
    max_tracks: int | None = None

    def __post_init__(self) -> None:
        for name, low in (("stride", 1), ("max_gap", 0), ("min_slices", 1), ("max_tracks", 1)):
            value = getattr(self, name)
            if name == "max_tracks" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise DetectorError(f"expected {name} as an integer >= {low} in the tracking options, found "
                                    f"{value!r}")
        for name, open_low in (("box_threshold", False), ("min_score", False), ("link_iou", False),
                               ("duplicate_iou", True), ("max_area_fraction", True)):
            value = getattr(self, name)
            number = not isinstance(value, bool) and isinstance(value, (int, float, np.number))
            if not number or not (0 < value <= 1 if open_low else 0 <= value <= 1):
                raise DetectorError(f"expected {name} as a number in {'(' if open_low else '['}0, 1] in the "
                                    f"tracking options, found {value!r}")
        if self.key not in ("area", "score"):
            raise DetectorError(f"expected key 'area' or 'score' in the tracking options, found {self.key!r}")


@dataclass(frozen=True)
class SliceHit:
    """One box a 2D detector gave on slice ``slice`` (float voxel indices, inclusive)."""

    slice: int
    box: tuple[float, float, float, float]
    score: float
    #: the 2D mask cropped to its own bounding box, whose first voxel is ``mask_origin`` (i, j)
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)
    mask_origin: tuple[int, int] = (0, 0)

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0] + 1) * (self.box[3] - self.box[1] + 1)


@dataclass
class Track:
    """Boxes linked across slices (one per slice, in increasing k) and the verdict on them."""

    hits: list[SliceHit]
    rejected: str | None = None

    @property
    def slices(self) -> list[int]:
        return [h.slice for h in self.hits]

    @property
    def mean_score(self) -> float:
        return float(np.mean([h.score for h in self.hits]))

    def key_hit(self, key: str = "area") -> SliceHit:
        """The key slice's hit: the largest box (ties: best score), or the best-scoring one."""
        if key == "score":
            return max(self.hits, key=lambda h: (h.score, h.area))
        return max(self.hits, key=lambda h: (h.area, h.score))


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two inclusive boxes ``(i0, j0, i1, j1)``."""
    wi = min(a[2], b[2]) - max(a[0], b[0]) + 1
    wj = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if wi <= 0 or wj <= 0:
        return 0.0
    inter = wi * wj
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return float(inter / union) if union > 0 else 0.0


def scan(array: np.ndarray, detect_slice: SliceDetector, options: TrackOptions, *,
         progress: Progress | None = None) -> dict[int, list[SliceHit]]:
    """Every ``stride``-th slice, then the slices around the hits until no new hit appears.

    Returns the hits of each scanned slice (an empty list: scanned, nothing there); boxes
    under the box threshold and same-slice duplicates are already dropped.
    """
    K = array.shape[2]
    plane = array.shape[0] * array.shape[1]
    todo = list(range(0, K, options.stride))
    if K and todo[-1] != K - 1:
        todo.append(K - 1)
    seen: dict[int, list[SliceHit]] = {}
    many = getattr(detect_slice, "detect_many", None)  # a batched detector answers batch_size slices at once
    chunk = max(1, int(getattr(detect_slice, "batch_size", 1) or 1)) if many is not None else 1
    while todo:
        for start in range(0, len(todo), chunk):
            ks = todo[start:start + chunk]
            if many is not None:
                answers = many([np.asarray(array[:, :, k]) for k in ks])
                if len(answers) != len(ks):
                    raise DetectorError(f"expected the 2D detector to answer each of {len(ks)} slices, found "
                                        f"{len(answers)} answers")
            else:
                answers = [detect_slice(np.asarray(array[:, :, k])) for k in ks]
            for k, answer in zip(ks, answers):
                seen[k] = _slice_hits(array, k, answer, options)
            if progress is not None:
                progress(len(seen), len(seen) + len(todo) - start - len(ks), f"detecting on slice {ks[-1]}")
        around = {k + d for k in todo if any(_refines(h, plane, options) for h in seen[k])
                  for d in range(-options.stride + 1, options.stride)}
        todo = sorted(k for k in around if 0 <= k < K and k not in seen)
    log.debug("scanned %d of %d slices (%d px each), %d with hits", len(seen), K, plane,
              sum(bool(h) for h in seen.values()))
    return seen


def _refines(hit: SliceHit, plane: int, options: TrackOptions) -> bool:
    """Whether a hit calls for its neighbours to be scanned (not a learned detector's slice-covering box)."""
    return not options.learned or hit.area <= options.max_area_fraction * plane


def _slice_hits(array: np.ndarray, k: int, answers: Sequence[Sequence[Any]] | None,
                options: TrackOptions) -> list[SliceHit]:
    I, J = array.shape[:2]
    hits = []
    for answer in answers or ():
        try:
            box, score = answer[0], float(answer[1])
            mask = answer[2] if len(answer) > 2 else None
            box = tuple(float(v) for v in box)
        except (TypeError, ValueError, IndexError):
            raise DetectorError(f"expected the 2D detector to answer (box, score[, mask]) on slice {k}, found "
                                f"{answer!r:.80}") from None
        if len(box) != 4 or not np.all(np.isfinite(box)) or box[2] < box[0] or box[3] < box[1] \
                or not np.isfinite(score):
            raise DetectorError(f"expected a finite box (i0, j0, i1, j1) with min <= max and a finite score on "
                                f"slice {k}, found {box!r} and {score!r}")
        if mask is not None and (not isinstance(mask, np.ndarray) or mask.shape != (I, J)):
            raise DetectorError(f"expected the 2D detector's mask on slice {k} as an ({I}, {J}) array, found "
                                f"{getattr(mask, 'shape', type(mask).__name__)}")
        if score >= options.box_threshold:
            hits.append(SliceHit(k, box, score, *_cropped(mask)))
    kept: list[SliceHit] = []
    for hit in sorted(hits, key=lambda h: -h.score):  # same-slice duplicates: keep the best
        if all(iou(hit.box, other.box) <= options.duplicate_iou for other in kept):
            kept.append(hit)
    return kept


def _cropped(mask: np.ndarray | None) -> tuple[np.ndarray | None, tuple[int, int]]:
    """A 2D mask as its bounding box's crop and that box's first voxel (a slice's hits stay small)."""
    if mask is None:
        return None, (0, 0)
    mask = np.asarray(mask).astype(bool, copy=False)
    ii, jj = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(ii):
        return np.zeros((0, 0), bool), (0, 0)
    return mask[ii[0]:ii[-1] + 1, jj[0]:jj[-1] + 1].copy(), (int(ii[0]), int(jj[0]))


def link(hits_by_slice: dict[int, list[SliceHit]], options: TrackOptions) -> list[Track]:
    """Tracks of boxes across slices: IoU at least ``link_iou`` with the track's last box, at most
    ``max_gap`` slices missed in between; each box joins one track, each track takes one box per slice."""
    tracks: list[Track] = []
    for k in sorted(hits_by_slice):
        open_tracks = [t for t in tracks if 0 < k - t.hits[-1].slice <= options.max_gap + 1]
        pairs = sorted(((iou(t.hits[-1].box, h.box), n, m) for n, t in enumerate(open_tracks)
                        for m, h in enumerate(hits_by_slice[k])), reverse=True)
        used_t, used_h = set(), set()
        for overlap, n, m in pairs:
            if overlap < options.link_iou or overlap == 0:
                break
            if n in used_t or m in used_h:
                continue
            open_tracks[n].hits.append(hits_by_slice[k][m])
            used_t.add(n)
            used_h.add(m)
        tracks += [Track([h]) for m, h in enumerate(hits_by_slice[k]) if m not in used_h]
    return tracks


def judge(tracks: list[Track], plane: tuple[int, int], options: TrackOptions) -> list[Track]:
    """Set each track's ``rejected`` reason (None: kept); returns the tracks, kept ones first, best first."""
    area = float(plane[0] * plane[1])
    for t in tracks:
        fraction = float(np.median([h.area for h in t.hits])) / area
        if options.learned and fraction > options.max_area_fraction:
            t.rejected = (f"box covers {fraction:.0%} of the slice (> {options.max_area_fraction:.0%}): a learned "
                          "detector's answer when the target is absent")
        elif len(t.hits) < options.min_slices:
            t.rejected = (f"seen on {len(t.hits)} slice{'s' if len(t.hits) > 1 else ''} "
                          f"(< {options.min_slices}): an isolated detection")
        elif t.mean_score < options.min_score:
            t.rejected = f"mean score {t.mean_score:.2f} < {options.min_score:.2f}"
    covering = [t for t in tracks if t.rejected and t.rejected.startswith("box covers")]
    if len(covering) > 1:  # one proposal for the slice-covering boxes of the whole scan, not one per slice
        merged = Track(sorted((h for t in covering for h in t.hits), key=lambda h: h.slice))
        fraction = float(np.median([h.area for h in merged.hits])) / area
        merged.rejected = (f"box covers {fraction:.0%} of the slice (> {options.max_area_fraction:.0%}) on "
                           f"{len(merged.hits)} scanned slices: a learned detector's answer when the target is "
                           "absent")
        tracks = [t for t in tracks if t not in covering] + [merged]
    tracks = sorted(tracks, key=lambda t: (t.rejected is not None, -t.mean_score * len(t.hits)))
    if options.max_tracks is not None:
        for rank, t in enumerate((t for t in tracks if t.rejected is None), start=1):
            if rank > options.max_tracks:
                t.rejected = f"track {rank} by mean score x slices (> max_tracks {options.max_tracks})"
    return tracks


def find_tracks(volume: Volume | np.ndarray, detect_slice: SliceDetector, text: str, *, source: str = "",
                options: TrackOptions | None = None, progress: Progress | None = None) -> list[Detection]:
    """The 3D objects a 2D detector sees in ``volume``: one :class:`Detection` per track.

    Kept tracks come first (best first: mean score x slices); rejected ones follow with their
    reason in ``rejected``. Each detection's ``score`` is its track's mean score, ``slice`` and
    ``box`` its key slice and box (rounded outwards to voxels, clipped to the slice),
    ``z_range`` its first and last slice, and ``mask`` the 2D masks stacked (a bridged slice
    gets the union of its neighbours') when the
    detector gives them on every slice of the track.
    """
    options = options or TrackOptions()
    array = np.asarray(volume.array if isinstance(volume, Volume) else volume)
    if array.ndim != 3:
        raise DetectorError(f"expected a 3D volume to detect {text!r} in, found shape {array.shape}")
    t0 = time.perf_counter()
    hits = scan(array, detect_slice, options, progress=progress)
    tracks = judge(link({k: h for k, h in hits.items() if h}, options), array.shape[:2], options)
    I, J = array.shape[:2]
    out = []
    for t in tracks:
        hit = t.key_hit(options.key)
        lo = np.clip(np.floor(hit.box[:2]), 0, [I - 1, J - 1]).astype(int)
        hi = np.clip(np.ceil(hit.box[2:]), lo, [I - 1, J - 1]).astype(int)
        box = (int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1]))
        mask = None
        if t.rejected is None and all(h.mask is not None for h in t.hits):
            mask = np.zeros(array.shape, bool)
            for h in t.hits:
                (i0, j0), (di, dj) = h.mask_origin, h.mask.shape
                mask[i0:i0 + di, j0:j0 + dj, h.slice] = h.mask
            for a, b in zip(t.hits, t.hits[1:]):  # a bridged slice: both neighbours' masks
                for k in range(a.slice + 1, b.slice):
                    mask[:, :, k] = mask[:, :, a.slice] | mask[:, :, b.slice]
        out.append(Detection(text, t.mean_score, hit.slice, box, (t.slices[0], t.slices[-1]), mask, source,
                             rejected=t.rejected))
    kept = sum(d.rejected is None for d in out)
    log.info("%s: %r: %d slice(s) scanned of %d, %d track(s), %d kept, in %.2f s", source or "detector", text,
             len(hits), array.shape[2], len(out), kept, time.perf_counter() - t0)
    return out


class TrackingDetector:
    """A :class:`~medsam3d.detect.Detector` made of a 2D detector and :func:`find_tracks`.

    ``slice_detector(text)`` returns the 2D detector for one text (a callable slice ->
    ``[(box, score[, mask]), ...]``); ``options`` are :class:`TrackOptions` fields
    (keyword-only: ``stride``, ``min_slices``, ``min_score``...).
    """

    def __init__(self, name: str, slice_detector: Callable[[str], SliceDetector], *, source: str | None = None,
                 **options: Any) -> None:
        self.name = name
        self.source = source or name
        self._slice_detector = slice_detector
        try:
            self.options = TrackOptions(**options)
        except TypeError as exc:
            raise DetectorError(f"expected tracking options among {', '.join(TrackOptions.__dataclass_fields__)}"
                                f" for detector '{name}', found {sorted(options)}") from exc

    def detect(self, volume: Volume, text: str, *, progress: Progress | None = None) -> list[Detection]:
        """Every track of ``text`` in ``volume``, the rejected ones with their reason."""
        return find_tracks(volume, self._slice_detector(text), text, source=self.source, options=self.options,
                           progress=progress)
