"""The command line's box shortcuts (``--box``, ``--box-ras``) -> prompt-file entries."""

from __future__ import annotations

import math
import re
from typing import Any

from ..errors import PromptError
from ._checks import _short

_BOX_RE = re.compile(r"^\s*(-?\d+),(-?\d+),(-?\d+),(-?\d+)@(-?\d+)(?::(-?\d+)\.\.(-?\d+))?\s*$")


def parse_box_option(spec: str) -> dict[str, Any]:
    """CLI shortcut ``i0,j0,i1,j1@k`` (or ``i0,j0,i1,j1@k:z0..z1`` with the object's inclusive
    slice range, a 3D box) -> one prompt-file object entry."""
    match = _BOX_RE.match(spec)
    if not match:
        raise PromptError(f"expected --box as i0,j0,i1,j1@k or i0,j0,i1,j1@k:z0..z1 (voxel indices), "
                          f"found {_short(spec)}")
    try:
        i0, j0, i1, j1, k = (int(g) for g in match.groups()[:5])
        z_range = [int(match.group(6)), int(match.group(7))] if match.group(6) is not None else None
    except ValueError:  # more digits than Python converts (4300)
        raise PromptError(f"expected --box with voxel indices of this image, found numbers too long in "
                          f"{_short(spec)}") from None
    entry: dict[str, Any] = {"name": "object", "slice": k, "box": [i0, j0, i1, j1]}
    if z_range is not None:
        entry["z_range"] = z_range
    return entry


def parse_box_ras_option(spec: str) -> dict[str, Any]:
    """CLI shortcut ``R0,A0,S0,R1,A1,S1`` (two opposite corners of a 3D ROI in RAS mm) -> one
    prompt-file object entry."""
    parts = spec.split(",")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        values = []
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        raise PromptError(f"expected --box-ras as R0,A0,S0,R1,A1,S1 (two opposite corners in RAS mm), "
                          f"found {_short(spec)}")
    return {"name": "object", "box_ras": [values[:3], values[3:]]}

