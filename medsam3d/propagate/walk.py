"""The sections' pass: every slice of an object segmented with its box from the orthogonal sections.

With a ``z_range`` the sections span it; otherwise they start from a first guess around the
prompted slices and grow while the object goes on (:func:`.sections.orthogonal_boxes`). Their
masks follow their box along the slices, so the range they find is mostly the first guess's;
past it the walk goes on, on the boxes of the sections decoded over their whole extent, while
each slice's mask holds the prompted slice's object in the model's own image embedding
(:func:`.stops.embedding_check`). The object ends there, where the sections end, where a
slice's mask is empty, or where it no longer holds what the prompted slice held in intensity
(:func:`.stops.content_check`). The sections' extent is a
better start than a box chain's: past a small lesion's end a chain's masks of neighbouring
tissue keep a sizeable part of the key slice's area, and sections started from there run on.

From the key slice the walk goes up and down, encoding only every ``config.stride``-th slice
(and every prompted slice) at first; :mod:`.gaps` then fills the slices in between.
"""

from __future__ import annotations

import numpy as np

from ..prompts import ObjectPrompt
from . import sections
from .boxes import expand_box, largest_2d_component
from .config import PropagationConfig
from .encoder import SliceEncoder
from .gaps import fill_gaps
from .results import ObjectResult, SliceResult
from .stops import content_check, embedding_check


def first_range(start, keys, config: PropagationConfig, depth: int) -> tuple[int, int]:
    """The sections' first slice range for an object without a z_range: the key box's largest
    in-plane size (in mm) x ``config.section_reach`` each way from the middle of the prompted
    slices, and every prompted slice (within ``depth`` slices).

    Centred on the middle of the prompted slices rather than on the largest box's slice: with
    boxes at a third and two thirds of a tumour, a range centred on one of them is shifted
    towards it, and the sections' masks, which follow their box, end early on one side and
    late on the other.
    """
    b, mm = start.box, config.voxel_mm
    reach = int(np.ceil(max((b[2] - b[0] + 1) * mm[0], (b[3] - b[1] + 1) * mm[1]) / mm[2] * config.section_reach))
    middle = (min(keys) + max(keys)) / 2
    return (max(0, min(min(keys), int(np.floor(middle - reach)))),
            min(depth - 1, max(max(keys), int(np.ceil(middle + reach)))))


class SectionWalk:
    """One object's walk over the slices with the sections' boxes (see the module doc).

    ``slices`` collects the masks (the prompted slices' to start with), ``empty`` the slices
    with no mask of the object and ``foreign`` those whose mask failed the content check (or,
    past the sections' first range, the embedding check :func:`.stops.embedding_check`).
    """

    def __init__(self, encoder: SliceEncoder, obj: ObjectPrompt, start, keys, config: PropagationConfig,
                 slices: dict[int, SliceResult], key_mask: np.ndarray):
        self.encoder, self.obj, self.start, self.keys, self.config = encoder, obj, start, keys, config
        self.shape = encoder.images.shape[:2]
        self.slices = slices
        self.empty: set[int] = set()
        self.foreign: set[int] = set()  # also in ``empty``
        self.stride = max(1, int(config.stride))
        self.holds = None if obj.z_range else content_check(encoder.images[..., start.slice], key_mask, config)
        self.alike = None if obj.z_range else embedding_check(encoder, start.slice, key_mask, config)
        self._find_boxes()

    def _find_boxes(self) -> None:
        """The sections' box per slice (:attr:`boxes`), and the walk's range (:attr:`lo`, :attr:`hi`).

        A short range, or a volume of a few slices (whose sections are a few pixels high), gets
        no sections: every slice's box is the key box's (see :meth:`slice_box`), and without a
        z_range an empty mask still ends the object. A given z_range comes with a box on one
        slice that need not be the largest, hence wider sections then. Without a z_range the
        range the sections found is probed one slice past each end when the model can tell
        whether a mask still holds the object (:attr:`alike`); where it does, that side takes the
        boxes of the sections decoded over their whole extent (:func:`.sections.orthogonal_boxes`),
        and the walk goes on while each slice past the range passes :attr:`alike` (:meth:`run`).
        :attr:`first` keeps the range found.
        """
        obj, config, K = self.obj, self.config, self.encoder.images.shape[2]
        z = obj.z_range or first_range(self.start, self.keys, config, K)
        self.short = (z[1] - z[0] if obj.z_range else K - 1) + 1 < config.section_min_slices
        whole = {}
        if self.short:
            z = obj.z_range or (0, K - 1)
            self.boxes, encoded = {}, 0
        else:
            positions = (obj.z_range and config.section_positions_3d) or config.section_positions
            self.boxes, encoded, whole = sections.orthogonal_boxes(
                self.encoder.model, self.encoder.images, config.voxel_mm, self.start.box, z,
                adaptive=not obj.z_range, margin=config.section_margin_3d if obj.z_range else 0.05,
                positions=tuple(positions), beyond=self.alike is not None)
        self.encoder.sections_encoded += encoded
        if obj.z_range or self.short:
            self.lo, self.hi = z
            self.first = z
            return
        self.first = (min(self.boxes.keys() | {self.start.slice}), max(self.boxes.keys() | {self.start.slice}))
        for direction, end in ((1, self.first[1]), (-1, self.first[0])):
            probe = end + direction
            if probe in whole and self._goes_on(probe, whole[probe]):
                # the object goes on past the range found: this side walks on the whole extent's boxes,
                # whose masks do not taper at that range's end, while each slice's mask passes ``alike``
                self.boxes.update({k: b for k, b in whole.items() if (k - self.start.slice) * direction > 0})
        self.lo = min(self.boxes, default=self.start.slice)
        self.hi = max(self.boxes, default=self.start.slice)

    def _goes_on(self, k: int, box) -> bool:
        """Whether slice k, past the sections' first range, holds the object (its mask for ``box``
        passes the content and embedding checks)."""
        box = expand_box(box, self.shape, self.config.margin_frac, self.config.margin_min)
        mask = largest_2d_component(self.encoder.predict(k, np.array([box]))[0][0])
        return bool(mask.sum() >= self.config.min_area_px and (not self.holds or self.holds(
            self.encoder.images[..., k], mask)) and self.alike(k, mask))

    def slice_box(self, k: int) -> tuple[int, int, int, int]:
        """Slice k's box: a prompted slice's own, else the sections'; inside a given range, a slice
        the sections missed reuses the nearest box towards the key slice."""
        step = 1 if k < self.start.slice else -1
        for t in range(k, self.start.slice, step):
            if t in self.keys:
                return self.keys[t].box
            if t in self.boxes:
                return self.boxes[t]
        return self.start.box

    def run(self, k: int, direction: int, blend: bool = False) -> bool:
        """Segment slice k with its box; False (and k in :attr:`empty`) where no mask of the object
        is found. ``direction`` is the walk's, for encoding ahead; ``blend`` as for
        :meth:`.SliceEncoder.predict`."""
        config = self.config
        box = expand_box(self.slice_box(k), self.shape, config.margin_frac, config.margin_min)
        masks, scores = self.encoder.predict(k, np.array([box]), direction * self.stride, (self.lo, self.hi),
                                             blend=blend)
        mask = largest_2d_component(masks[0])
        if mask.sum() < config.min_area_px:
            self.empty.add(k)  # no object here (without a z_range, this ends it)
            return False
        if (self.holds and not self.holds(self.encoder.images[..., k], mask)) or (
                self.alike and not self.first[0] <= k <= self.first[1] and not self.alike(k, mask)):
            self.empty.add(k)
            self.foreign.add(k)
            return False
        self.slices[k] = SliceResult(mask, float(scores[0]), box)
        return True

    def _todo(self, direction: int) -> tuple[list[int], str]:
        """This direction's slices in walking order, up to where the sections end, and why it ends."""
        obj = self.obj
        bound = self.hi if direction > 0 else self.lo
        todo = []
        for k in range(self.start.slice + direction, bound + direction, direction):
            if k not in self.boxes and not obj.z_range and not self.short and k not in self.keys:
                return todo, f"orthogonal sections end at slice {k}"
            todo.append(k)
        return todo, "z_range end" if obj.z_range else "volume edge" if self.short else "sections end"

    def walk(self, direction: int, blend: bool) -> str:
        """Segment every stride-th slice of this direction (and every prompted slice) until the object
        ends; returns why it ends. With ``blend``, the slices segmented one by one past an empty
        mask are decoded on blends of the encoded slices around them."""
        todo, reason = self._todo(direction)
        last_good = self.start.slice
        n = 0
        while n < len(todo):
            nxt = min(n + self.stride, len(todo))
            n = next((m + 1 for m in range(n, nxt) if todo[m] in self.keys), nxt)  # stop at a prompted slice
            k = todo[n - 1]
            if k in self.keys or self.run(k, direction):
                last_good = k
                continue
            if self.obj.z_range:
                # the object goes on to the range's end: the slices skipped before this empty one are
                # segmented, not left out
                for t in range(last_good + direction, k, direction):
                    if self.run(t, direction, blend):
                        last_good = t
                continue
            # without a range an empty mask ends the object: find the end slice by slice
            end = next((t for t in range(last_good + direction, k, direction) if not self.run(t, direction, blend)),
                       k)
            what = "a mask unlike the prompted slice's object" if end in self.foreign else "empty mask"
            return f"{what} at slice {end}"
        return reason


def orthogonal_pass(encoder: SliceEncoder, obj: ObjectPrompt, result: ObjectResult, start, keys,
                    config: PropagationConfig, key_mask: np.ndarray) -> None:
    """Re-segment every slice of ``result`` with a box read from orthogonal sections (see the module
    doc); keeps the prompted slices' masks. ``start`` is the key (largest) prompt, ``keys`` the
    prompts by slice, ``key_mask`` the key slice's best mask (for the content check)."""
    walk = SectionWalk(encoder, obj, start, keys, config, {k: result.slices[k] for k in keys}, key_mask)
    blend = config.blend_embeddings and encoder.model.can_blend
    for direction in (+1, -1):
        result.stop_reasons["up" if direction > 0 else "down"] = walk.walk(direction, blend)
    fill_gaps(walk.slices, walk.empty, encoder.used, walk.run, walk.slice_box, walk.shape, config, blend)
    result.slices = walk.slices
