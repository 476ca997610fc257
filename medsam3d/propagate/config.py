"""The propagation engine's settings: one frozen record, read and never written during a run.

The pipeline derives the settings that depend on the input (the voxel size, the batch size
for the device, a stride given by the caller) with :func:`dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PropagationConfig:
    """How box prompts are propagated through a volume (see :mod:`medsam3d.propagate`)."""

    #: a box made from a mask is its bounding box grown by this fraction of its size each side...
    margin_frac: float = 0.03
    #: ...and by at least this many pixels
    margin_min: int = 1
    #: box chain: a mask below this fraction of the largest area so far, scored below
    #: ``tail_score_frac`` x the prompted slice's score, ends the object (see :mod:`.stops`)
    min_area_frac: float = 0.15
    #: a mask of fewer pixels is empty
    min_area_px: int = 4
    tail_score_frac: float = 0.92
    #: box chain: a model quality score below this ends the object
    min_score: float = 0.35
    #: box chain: an area above this x the previous slice's ends the object (a leak)
    max_growth: float = 1.8
    #: box chain: a centroid moved by more than this x the previous box's diagonal ends the object
    max_shift: float = 0.5
    #: slices encoded ahead per batch; None: the pipeline chooses (8 on a GPU, 1 on a CPU)
    batch_size: int | None = None
    #: take each slice's box from orthogonal (sagittal + coronal) sections, see :mod:`.sections`;
    #: False runs the box chain instead
    orthogonal: bool = True
    #: without a z_range, the sections first span the key box's largest in-plane size x this, each way
    section_reach: float = 0.6
    #: with a z_range, the sections' box is the key box widened by this fraction each side
    section_margin_3d: float = 0.15
    #: encode every stride-th slice first; the slices between are interpolated where their
    #: neighbours' masks overlap by at least ``interp_iou``, else segmented too (see :mod:`.gaps`)
    stride: int = 3
    interp_iou: float = 0.6
    #: where the sagittal and coronal sections cut the key box (fractions of its width)
    section_positions: tuple[float, ...] = (0.5, 0.3, 0.7)
    #: with a z_range, these positions instead (None: ``section_positions``); the chain vote then
    #: recovers much of what fewer sections miss, while the sections alone carry a 2D box's slices
    section_positions_3d: tuple[float, ...] | None = None
    #: with a z_range of fewer slices than this, no sections: every slice is encoded anyway, and
    #: on lesions this short the sections' encodings did not change the masks
    section_min_slices: int = 5
    #: box-chain margins whose masks vote with the sections' (see :mod:`.chains`); () turns the vote off
    chain_vote: tuple[float, ...] = (0.03, 0.06)
    #: a chain's box is at most the sections' box for that slice x (1 + chain_cap) along i and j
    chain_cap: float = 0.5
    #: with a z_range, this cap instead (None: ``chain_cap``); a single pair of sections sees a
    #: chord of the object off its centre and needs a looser cap
    chain_cap_3d: float | None = None
    #: with the vote, a second chain per margin moves its box with the image (see :func:`.chains.track_shift`)
    chain_track: bool = True
    #: the prompted slices' own masks: per-pixel majority over the user's box grown by each of
    #: these many pixels (the propagation still starts from the box as given); () = the box alone
    prompt_ensemble: tuple[int, ...] = (0, 1, 2, 3)
    #: where neighbours disagree, decode the middle slice on a blend of their embeddings instead of
    #: encoding it, and let the vote's chains walk the encoded slices only (fewer encodings and
    #: decodes, slightly lower Dice; see :mod:`.gaps`, :mod:`.chains` and :meth:`fast`)
    blend_embeddings: bool = False
    #: without a z_range, an object that stands out on its prompted slice (|median inside - median of a
    #: 3-pixel ring| >= this x their pooled robust spread) ends where a slice's mask holds less than
    #: ``content_min_rel`` of that contrast (see :func:`.stops.content_check`); 0 turns this off
    content_min_cnr: float = 1.5
    content_min_rel: float = 0.5
    #: a fainter object (at least this x the spread) ends where a slice's mask holds less than
    #: ``content_weak_rel`` of the contrast (negative: the contrast is reversed); 0 turns this off
    content_weak_cnr: float = 0.5
    content_weak_rel: float = -0.5
    #: without a z_range, the walk goes on past the sections' first range, on boxes from the sections
    #: decoded over their whole extent, while each slice's mask lies at least this far from the prompted
    #: slice's surroundings towards its inside in the model's own image embedding (see
    #: :func:`.stops.embedding_check`); 0 turns this off (the object then ends with the first range)
    extend_min_rel: float = 0.8
    #: with a zoom crop, segment each object's key slice both on the crop and on the whole slice,
    #: and keep the crop only where its masks span their boxes at least as well (see
    #: :func:`medsam3d.pipeline.choose_view`); False keeps the crop unchecked
    zoom_check: bool = True
    #: voxel size (mm) along i, j, k; the pipeline sets it from the volume
    voxel_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def fast(cls, **changes) -> PropagationConfig:
        """The speed preset (CLI ``--fast``): blended embeddings, stride 4 and, with a z_range,
        sections at the key box's centre only, with the vote's chains capped at 2x the sections'
        box (one central pair of sections sees a chord of the object off its centre, and the
        default cap then keeps too little of it). About half the default settings' time for a
        slightly lower Dice; the benchmark's results give the figures. ``changes`` override any
        field."""
        settings = dict(blend_embeddings=True, stride=4, section_positions_3d=(0.5,), chain_cap_3d=1.0)
        settings.update(changes)
        return cls(**settings)
