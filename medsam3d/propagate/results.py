"""What propagation returns: per object, a mask per slice with its score and box."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..prompts import ObjectPrompt


@dataclass
class SliceResult:
    """One slice's mask, in the working layout."""

    mask: np.ndarray  # (I, J) bool
    score: float  # the model's quality score (an interpolated slice: the lower of its neighbours')
    box: tuple[int, int, int, int]  # the box the slice was prompted with
    interpolated: bool = False  # filled from agreeing neighbours (see .gaps), not segmented


@dataclass
class ObjectResult:
    """One object's slices, why its walk ended each way, and the spread of its alternatives."""

    prompt: ObjectPrompt
    slices: dict[int, SliceResult] = field(default_factory=dict)
    #: "up" / "down" -> why the object ends there
    stop_reasons: dict[str, str] = field(default_factory=dict)
    #: each chain-vote member's volume over the result's (see :func:`.chains.alternative_volumes`);
    #: [] without a vote
    alternatives: list[float] = field(default_factory=list)
