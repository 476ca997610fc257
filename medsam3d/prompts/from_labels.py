"""A label map (an RTSTRUCT's ROIs, a DICOM SEG's segments, a previous segmentation) -> box prompts.

Each label value becomes one object, named after its segment (``meta["segments"]``, else
``label N``), keeping its label value, with:

* one box: the bounding box (inclusive voxel indices) of the label on the slice ``k`` where it
  covers the most voxels, the slice a reader would draw the box on;
* its ``z_range``: the first and last slice the label touches, so propagation stays inside the
  structure's extent.

A label on several separate regions (one ROI drawn around two lesions) still gives one box, on
the largest slice; prompt such lesions as separate objects when each one matters.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import PromptError
from ..volume import Volume
from .parse import parse_prompts
from .types import MAX_LABEL, ObjectPrompt

log = logging.getLogger(__name__)


def label_entries(labels: Volume) -> list[dict[str, Any]]:
    """The prompt-file entries (version 1, with ``label``) of every non-empty label of ``labels``.

    Labels absent from the voxels (an ROI drawn on other slices than this image's) are left out
    with a log line. A box narrower than 2 voxels (a 1-voxel-wide structure) is widened to 2
    inside the slice, the smallest box a prompt file accepts.
    """
    array = np.asarray(labels.array)
    if array.dtype.kind not in "biu":
        raise PromptError(f"expected an integer label map to make prompts from, found dtype {array.dtype}")
    size_i, size_j, _ = labels.shape
    segments = labels.segments
    entries: list[dict[str, Any]] = []
    names_used: dict[str, int] = {}
    values = [int(v) for v in np.unique(array) if v > 0]
    for value in sorted(set(values) | {int(v) for v in segments}):
        name = str(segments.get(value, {}).get("name") or f"label {value}").strip() or f"label {value}"
        if value not in values:
            log.info("segment %d '%s' has no voxels on this image: no prompt for it", value, name)
            continue
        if value > MAX_LABEL:
            raise PromptError(f"expected label values within 1..{MAX_LABEL} to make prompts from, found {value}")
        mask = array == value
        per_slice = mask.sum(axis=(0, 1))
        ks = np.flatnonzero(per_slice)
        k = int(np.argmax(per_slice))  # the first slice of largest area
        ii, jj = np.nonzero(mask[:, :, k])
        box = [int(ii.min()), int(jj.min()), int(ii.max()), int(jj.max())]
        for lo, hi, size in ((0, 2, size_i), (1, 3, size_j)):
            if box[hi] - box[lo] < 1:  # widen a 1-voxel-wide box to 2, inside the slice
                box[hi] = min(box[lo] + 1, size - 1)
                box[lo] = box[hi] - 1
        count = names_used.get(name.casefold(), 0)
        names_used[name.casefold()] = count + 1
        if count:  # entries with one name prompt one object: keep two segments of one name apart
            name = f"{name} ({value})"
        entries.append({"name": name, "label": value, "slice": k, "box": box,
                        "z_range": [int(ks[0]), int(ks[-1])]})
    return entries


def prompts_from_labels(labels: Volume) -> list[ObjectPrompt]:
    """One :class:`ObjectPrompt` per non-empty label of ``labels`` (see the module docstring), on
    ``labels``' grid (the image it was drawn on).

    Raises :class:`~medsam3d.errors.PromptError` when no label has a voxel.
    """
    entries = label_entries(labels)
    if not entries:
        source = labels.meta.get("source")
        raise PromptError(f"expected at least one labelled voxel to make prompts from, found an empty label map"
                          f"{f' ({source})' if source else ''}; check that it was drawn on this image")
    return parse_prompts({"version": 1, "objects": entries}, labels)
