"""Box prompts: in voxel indices or RAS millimetres, from the CLI, a JSON file or Python.

Prompt file, version 1::

    {"version": 1,
     "objects": [
       {"name": "tumor", "slice": 24, "box": [40, 52, 118, 130]},
       {"name": "node",  "slice": 12, "box": [10, 12, 30, 33], "z_range": [8, 17]},
       {"name": "mass",  "box_ras": [[-12.5, 40.0, 100.0], [10.0, 61.0, 130.0]]}
     ]}

``box`` is ``[i_min, j_min, i_max, j_max]``, inclusive voxel indices on slice ``k = slice``.
Entries with the same ``name`` are several prompts for one object; objects get label
values 1, 2, ... in order of first appearance, unless an entry gives the object's ``label``
(1..65535; the automatic numbering skips the values so taken). ``z_range`` (inclusive)
bounds the object.
``box_ras`` holds two opposite corners of a 3D ROI in RAS mm (a Slicer ROI): it becomes
a box on the ROI's middle slice and a ``z_range``.

Version 2 adds objects named by a text, found by a detector (:mod:`medsam3d.detect`)::

    {"version": 2,
     "objects": [
       {"name": "liver", "text": "liver"},
       {"name": "lesion", "text": "tumor", "detector": "grounding-dino"},
       {"name": "node", "slice": 12, "box": [10, 12, 30, 33]}
     ]}

Everything of version 1 holds in version 2, but every entry has a ``name``. A ``text`` entry
may give the object's ``label`` and the ``detector`` (a registered name) that answers it, and
no box: :func:`medsam3d.detect.resolve_text_prompts` turns it into one object per detection
("liver", "liver 2", ...). A version 1 file with ``text`` is refused.

A 3D Slicer markups file (``.mrk.json``) is read too: each ROI in it is one object (see
:func:`markups_to_entries`).
"""

from __future__ import annotations

from .files import MAX_PROMPT_FILE_BYTES, load_prompts, prompts_from
from .from_labels import prompts_from_labels
from .markups import markups_to_entries
from .options import parse_box_option, parse_box_ras_option
from .parse import VERSIONS, parse_prompts
from .ras import box_from_ras, box_from_ras_corners
from .types import MAX_LABEL, BoxPrompt, ObjectPrompt

__all__ = ["MAX_LABEL", "MAX_PROMPT_FILE_BYTES", "VERSIONS", "BoxPrompt", "ObjectPrompt", "box_from_ras",
           "box_from_ras_corners", "load_prompts", "markups_to_entries", "parse_box_option", "parse_box_ras_option",
           "parse_prompts", "prompts_from", "prompts_from_labels"]
