"""3D Slicer markups files (``.mrk.json``): each ROI markup becomes one prompt-file entry."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import PromptError
from ._checks import _numbers, _short

_MARKUP_KEYS = {"box_corners_ras"}  # set by :func:`markups_to_entries` only

log = logging.getLogger("medsam3d.prompts")


def markups_to_entries(data: dict[str, Any], source: str = "the markups file") -> list[dict[str, Any]]:
    """A 3D Slicer markups file (``.mrk.json``) -> prompt-file entries, one object per ROI markup.

    Each ROI's 8 corners (``center`` +- ``size`` / 2 along the axes of its ``orientation``, a
    3x3 matrix whose columns are the ROI's axes) are given as ``box_corners_ras``; positions in
    ``LPS`` (Slicer's default on disk) are turned to RAS, ``um`` to mm. The object's name is the
    markup's ``name`` (or ``roi N``). Other markup types (points, lines) are not boxes: they are
    refused when no ROI is there, and skipped (with a log line) beside one.
    """
    markups = data.get("markups")
    if not isinstance(markups, list) or not markups:
        raise PromptError(f"expected a non-empty 'markups' list in {source}, found {_short(markups)}")
    entries, skipped = [], []
    for n, markup in enumerate(markups, start=1):
        if not isinstance(markup, dict) or markup.get("type") != "ROI":
            skipped.append(markup.get("type") if isinstance(markup, dict) else type(markup).__name__)
            continue
        where = f"ROI #{n} of {source}"
        if "center" not in markup or "size" not in markup:
            raise PromptError(f"expected 'center' and 'size' in {where}, found {sorted(markup)}; "
                              "save the ROI from Slicer 5 or later")
        center = np.array(_numbers(markup["center"], 3, f"'center' of {where}"))
        size = np.array(_numbers(markup["size"], 3, f"'size' of {where}"))
        if np.any(size < 0):
            raise PromptError(f"expected a ROI size >= 0 in {where}, found {size.tolist()}")
        axes = np.array(_numbers(markup.get("orientation", [1, 0, 0, 0, 1, 0, 0, 0, 1]), 9,
                                 f"'orientation' of {where}")).reshape(3, 3)
        units = markup.get("coordinateUnits", "mm")
        units = units[0] if isinstance(units, list) and units else units
        if units not in ("mm", "um"):
            raise PromptError(f"expected coordinateUnits mm or um in {where}, found {_short(units)}")
        system = markup.get("coordinateSystem", "LPS")
        if system not in ("LPS", "RAS"):
            raise PromptError(f"expected coordinateSystem LPS or RAS in {where}, found {_short(system)}")
        signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], np.float64)
        corners = center + (signs * size / 2) @ axes.T  # column c of ``axes`` is the ROI's axis c
        corners = corners / 1000.0 if units == "um" else corners
        if system == "LPS":
            corners = corners * np.array([-1.0, -1.0, 1.0])
        name = markup.get("name")
        entries.append({"name": name.strip() if isinstance(name, str) and name.strip() else f"roi {n}",
                        "box_corners_ras": corners.tolist()})
    if not entries:
        raise PromptError(f"expected at least one ROI (box) markup in {source}, found only {skipped}; "
                          "draw the box with Slicer's ROI tool")
    if skipped:
        log.warning("%s: skipped %d markups that are not ROIs (%s)", source, len(skipped),
                    ", ".join(map(str, skipped)))
    return entries

