"""The detector interface: a volume and a text in, scored boxes (and optionally masks) out."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import DetectorError
from ..volume import Volume

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Detection:
    """One object a detector found for a text, in the voxel indices of the volume it was given.

    ``box`` is ``(i0, j0, i1, j1)``, inclusive, on slice ``k = slice`` (a prompt file's
    ``box``); ``z_range`` (inclusive, containing ``slice``) bounds the object when the
    detector knows its extent in k; ``mask`` (bool, the volume's shape) is the object itself
    when the detector segments; ``source`` names the detector (or its backend) that found it;
    ``seed`` is False when the mask itself is the answer and the box no prompt for the engine;
    ``rejected`` (a reason) marks a proposal the detector itself turned down (see
    :mod:`medsam3d.detect.tracks`).
    """

    text: str
    score: float
    slice: int
    box: tuple[int, int, int, int]
    z_range: tuple[int, int] | None = None
    mask: np.ndarray | None = None
    source: str = ""
    #: False: the mask is the answer (a classical result such as the bones or the fat), and its box is
    #: no prompt for the engine to propagate
    seed: bool = True
    #: why this proposal is no object (an isolated detection, a box covering the slice...); None: kept.
    #: Rejected detections are recorded in the report, never segmented
    rejected: str | None = None

    def __post_init__(self) -> None:
        where = f"the detection of {self.text!r}"
        if not isinstance(self.score, (int, float, np.number)) or not math.isfinite(float(self.score)):
            raise DetectorError(f"expected a finite score in {where}, found {self.score!r}")
        try:
            box = tuple(int(v) for v in self.box)
            k = int(self.slice)
            z_range = None if self.z_range is None else tuple(int(v) for v in self.z_range)
        except (TypeError, ValueError):
            raise DetectorError(f"expected integer voxel indices in {where}, found slice {self.slice!r}, "
                                f"box {self.box!r}, z_range {self.z_range!r}") from None
        if len(box) != 4 or box[2] < box[0] or box[3] < box[1]:
            raise DetectorError(f"expected box (i0, j0, i1, j1) with min <= max in {where}, found {self.box!r}")
        if z_range is not None and (len(z_range) != 2 or not z_range[0] <= k <= z_range[1]):
            raise DetectorError(f"expected z_range (k0, k1) around slice {k} in {where}, found {self.z_range!r}")
        if self.mask is not None and (not isinstance(self.mask, np.ndarray) or self.mask.dtype != bool
                                      or self.mask.ndim != 3):
            raise DetectorError(f"expected the mask of {where} as a 3D boolean array, found "
                                f"{type(self.mask).__name__} {getattr(self.mask, 'dtype', '')}")
        if self.rejected is not None and (not isinstance(self.rejected, str) or not self.rejected.strip()):
            raise DetectorError(f"expected the reason of a rejected {where} as a non-empty string (None: kept), "
                                f"found {self.rejected!r}")
        object.__setattr__(self, "score", float(self.score))
        object.__setattr__(self, "slice", k)
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "z_range", z_range)


@runtime_checkable
class Detector(Protocol):
    """What :func:`medsam3d.detect.resolve_text_prompts` needs from a detector.

    ``name`` is its registry name. ``detect`` returns every object it keeps for ``text``
    (an empty list: none found), best first or in any order, and may add the proposals it
    turned down, each with its reason in ``rejected`` (for the report); a 2D detector chooses the slices
    it looks at itself (a stride, then around its hits) and reports them as boxes on slices,
    with a ``z_range`` when it links them across slices. ``progress(done, total, message)``
    is called as it goes when given.
    """

    name: str

    def detect(self, volume: Volume, text: str, *, progress: Progress | None = None) -> list[Detection]:
        ...
