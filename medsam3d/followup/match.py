"""Matching the lesions of one time point to the tracks of the earlier ones.

Every position is in the baseline's RAS space: a follow-up lesion's centroid is mapped through
its study's registration matrix (follow-up -> baseline) before it is compared.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MIN_GATE_MM = 10.0
GATE_FRACTION = 0.5

MATCHING_RULE = (
    "Each follow-up lesion's centroid is mapped into the baseline's RAS space through its study's "
    "registration matrix, and the lesions of each time point are matched, in time order, to the tracks "
    "of all earlier time points (a track's position and size are those of its latest time point where "
    "it was present, so tracks chain through every time point and a lesion may reappear). "
    "1) Names: a lesion whose name (trimmed, case-insensitive) occurs once at its time point and is the "
    "name (at first sight or latest) of exactly one track belongs to that track; when the study's prompts were "
    "transferred (names carried over) this holds at any distance, otherwise only within the gate. "
    "2) Distance: the remaining lesions and tracks are paired one to one by minimum total centroid "
    "distance (scipy linear_sum_assignment, the most pairs within the gate first); a pair is accepted only "
    f"when its distance is at most the gate, max({MIN_GATE_MM:g} mm, {GATE_FRACTION:g} x the larger of "
    "the two long axes (the 3D maximum diameter when a long axis is missing)). "
    "A lesion left unmatched starts a new track (status 'new'); a track without a lesion at a time point, "
    "or matched to an empty object (volume 0), has status 'disappeared' there. An empty object that "
    "matches no track by name is ignored (it has no position)."
)


@dataclass
class Candidate:
    """One lesion of the time point being matched, with its centroid in baseline space."""

    index: int
    name: str
    position: np.ndarray | None  # baseline RAS, None when the lesion has no centroid
    size_mm: float               # long axis (or 3D maximum diameter), 0 when unknown
    empty: bool


@dataclass
class Anchor:
    """What a track offers for matching: its names (at first sight and latest) and its latest present
    position and size."""

    track: int
    names: tuple[str, ...]
    position: np.ndarray | None
    size_mm: float


def gate_mm(size_a: float, size_b: float) -> float:
    """The largest centroid distance at which two lesions may be the same one."""
    return max(MIN_GATE_MM, GATE_FRACTION * max(size_a, size_b))


def name_key(name: Any) -> str:
    return str(name).strip().casefold() if name is not None else ""


def match(candidates: Sequence[Candidate], anchors: Sequence[Anchor], *, names_carried: bool
          ) -> tuple[dict[int, int], dict[int, str]]:
    """Match ``candidates`` (one time point's lesions) to ``anchors`` (the open tracks).

    Returns ``{candidate index: track}`` and ``{candidate index: "name" | "distance"}`` (how each
    pair was made). ``names_carried``: the study's prompts were transferred, so a shared name is
    the same lesion whatever the distance.
    """
    from scipy.optimize import linear_sum_assignment

    pairs: dict[int, int] = {}
    how: dict[int, str] = {}

    def distance(c: Candidate, a: Anchor) -> float:
        if c.position is None or a.position is None:
            return math.inf
        return float(np.linalg.norm(c.position - a.position))

    # 1) names
    cand_names: dict[str, list[Candidate]] = {}
    for c in candidates:
        if name_key(c.name):
            cand_names.setdefault(name_key(c.name), []).append(c)
    anchor_names: dict[str, list[Anchor]] = {}
    for a in anchors:
        for key in {name_key(n) for n in a.names} - {""}:
            anchor_names.setdefault(key, []).append(a)
    used_tracks: set[int] = set()
    for key, cs in cand_names.items():
        if len(cs) != 1 or len(anchor_names.get(key, [])) != 1:
            continue
        c, a = cs[0], anchor_names[key][0]
        if a.track in used_tracks:
            continue
        within = c.empty or distance(c, a) <= gate_mm(c.size_mm, a.size_mm)
        if names_carried or within:
            pairs[c.index] = a.track
            how[c.index] = "name"
            used_tracks.add(a.track)

    # 2) distances, one to one
    rest_c = [c for c in candidates if c.index not in pairs and not c.empty and c.position is not None]
    rest_a = [a for a in anchors if a.track not in used_tracks and a.position is not None]
    if rest_c and rest_a:
        dist = np.array([[distance(c, a) for a in rest_a] for c in rest_c])
        gates = np.array([[gate_mm(c.size_mm, a.size_mm) for a in rest_a] for c in rest_c])
        feasible = dist <= gates
        # an infeasible pair costs more than every feasible assignment together: the most pairs first
        big = 1.0 + float(np.where(feasible, dist, 0.0).sum()) * 2.0 + 1e6
        cost = np.where(feasible, dist, big)
        rows, cols = linear_sum_assignment(cost)
        for r, col in zip(rows, cols):
            if feasible[r, col]:
                pairs[rest_c[r].index] = rest_a[col].track
                how[rest_c[r].index] = "distance"
    return pairs, how
