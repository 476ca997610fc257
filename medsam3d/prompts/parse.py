"""A prompt document (version 1 or 2, a list of entries, or Slicer markups) -> validated objects."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import PromptError
from ..volume import Volume
from ._checks import _int_list, _short
from .markups import _MARKUP_KEYS, markups_to_entries
from .ras import box_from_ras, box_from_ras_corners
from .types import MAX_LABEL, BoxPrompt, ObjectPrompt

_OBJECT_KEYS = {"name", "slice", "box", "z_range", "box_ras", "label"}
_TEXT_KEYS = {"text", "detector"}  # version 2
_BOX_KEYS = {"slice", "box", "z_range", "box_ras", "box_corners_ras"}
VERSIONS = (1, 2)


def parse_prompts(data: dict[str, Any] | list[Any], volume: Volume, source: str = "the markups file"
                  ) -> list[ObjectPrompt]:
    """Validate a prompt document (version 1 or 2, or a 3D Slicer markups document holding ROIs,
    see :func:`markups_to_entries`) against ``volume`` and group it into objects.

    A bare list of entries has no version: it is read as version 2 when an entry has a
    ``text``, else as version 1. Text objects come back without boxes (see
    :func:`medsam3d.detect.resolve_text_prompts`).
    """
    markups = isinstance(data, dict) and "markups" in data
    if markups:
        data = {"version": 1, "objects": markups_to_entries(data, source)}
    if isinstance(data, list):
        texts = any(isinstance(e, dict) and _TEXT_KEYS & set(e) for e in data)
        data = {"version": 2 if texts else 1, "objects": data}
    if not isinstance(data, dict):
        raise PromptError(f"expected a JSON object with 'version' and 'objects', found {type(data).__name__}")
    unknown = set(data) - {"version", "objects"}
    if unknown:
        raise PromptError(f"expected keys 'version' and 'objects' in the prompt file, found also {sorted(unknown)}")
    version = data.get("version", 1)
    if isinstance(version, bool) or version not in VERSIONS:
        raise PromptError(f"expected prompt file version 1 or 2, found {_short(version)}")
    entries = data.get("objects")
    if not isinstance(entries, list) or not entries:
        raise PromptError("expected a non-empty 'objects' list in the prompt file, found none")
    I, J, K = volume.shape
    objects: dict[str, ObjectPrompt] = {}
    explicit: dict[str, int] = {}  # name -> the label value its entries ask for
    for n, entry in enumerate(entries):
        where = f"object #{n + 1}"
        if not isinstance(entry, dict):
            raise PromptError(f"expected {where} to be a JSON object, found {_short(entry)}")
        if version == 1 and _TEXT_KEYS & set(entry):
            raise PromptError(f"expected prompt file version 2 for {sorted(_TEXT_KEYS & set(entry))} in {where}, "
                              'found version 1; set "version": 2 (and name every object)')
        keys = _OBJECT_KEYS | (_TEXT_KEYS if version == 2 else set())
        bad = set(entry) - keys - (_MARKUP_KEYS if markups else set())
        if bad:
            raise PromptError(f"expected only keys {sorted(keys)} in {where}, found unknown {sorted(bad)}")
        if version == 2 and "name" not in entry:
            raise PromptError(f"expected a 'name' in {where} of a version 2 prompt file, found none; name every "
                              "object (only version 1 files may leave it out)")
        name = entry.get("name", "object")
        if not isinstance(name, str) or not name.strip():
            raise PromptError(f"expected 'name' of {where} as a non-empty text, found {_short(name)}")
        name = name.strip()
        where = f"{where} ('{name}')"
        obj = objects.get(name)
        if obj is None:
            obj = objects[name] = ObjectPrompt(name=name, label=0)  # numbered below
        if "label" in entry:
            label = _int_list([entry["label"]], 1, f"'label' of {where}")[0]
            if not 1 <= label <= MAX_LABEL:
                raise PromptError(f"expected 'label' of {where} within 1..{MAX_LABEL}, found {label}")
            if explicit.setdefault(name, label) != label:
                raise PromptError(f"expected one label value per object, found {explicit[name]} and {label} "
                                  f"for '{name}'; entries with the same name prompt one object")
        if "text" in entry:
            _text_entry(obj, entry, where)
            continue
        if "detector" in entry:
            raise PromptError(f"expected 'detector' with a 'text' in {where}, found it with boxes; a detector "
                              "answers a text: add the text or drop the detector")
        if obj.text is not None:
            raise PromptError(f"expected either a 'text' or boxes for object '{name}', found both; "
                              "give the text's object another name")
        if "box_corners_ras" in entry:
            # a markups file states its coordinate system (converted already): a far ROI is another image's
            box, z_range = box_from_ras_corners(volume, np.array(entry["box_corners_ras"]),
                                                "check the ROI was placed on this image (same study and series)")
            obj.boxes.append(box)
            obj.z_range = _merge_range(obj.z_range, z_range)
        elif "box_ras" in entry:
            if "box" in entry or "slice" in entry:
                raise PromptError(f"expected either 'box_ras' or 'box' + 'slice' in {where}, found both")
            corners = entry["box_ras"]
            if not isinstance(corners, (list, tuple)) or len(corners) != 2:
                raise PromptError(f"expected box_ras as two RAS corners [[R,A,S],[R,A,S]] in {where}, "
                                  f"found {_short(corners)}")
            box, z_range = box_from_ras(volume, corners[0], corners[1])
            obj.boxes.append(box)
            obj.z_range = _merge_range(obj.z_range, z_range)
        else:
            if "box" not in entry or "slice" not in entry:
                raise PromptError(f"expected 'box' and 'slice' (or 'box_ras') in {where}, found {sorted(entry)}")
            k = _int_list([entry["slice"]], 1, f"'slice' of {where}")[0]
            if not 0 <= k < K:
                raise PromptError(f"expected 'slice' of {where} within 0..{K - 1}, found {k}")
            i0, j0, i1, j1 = _int_list(entry["box"], 4, f"'box' of {where}")
            if i1 < i0 or j1 < j0:
                raise PromptError(f"expected box [i_min, j_min, i_max, j_max] with min <= max in {where}, "
                                  f"found {[i0, j0, i1, j1]}")
            if i0 < 0 or j0 < 0 or i1 > I - 1 or j1 > J - 1:
                raise PromptError(f"expected the box of {where} inside the slice (i 0..{I - 1}, j 0..{J - 1}), "
                                  f"found {[i0, j0, i1, j1]}; give voxel indices of this image "
                                  "(or box_ras in millimetres)")
            if i1 - i0 < 1 or j1 - j0 < 1:
                raise PromptError(f"expected a box at least 2 voxels wide and high in {where}, "
                                  f"found {[i0, j0, i1, j1]}; indices are inclusive: [i, j, i + 1, j + 1] "
                                  "is the smallest box")
            obj.boxes.append(BoxPrompt(k, (i0, j0, i1, j1)))
        if "z_range" in entry:
            z0, z1 = _int_list(entry["z_range"], 2, f"'z_range' of {where}")
            if not (0 <= z0 <= z1 < K):
                raise PromptError(f"expected z_range of {where} with 0 <= start <= end <= {K - 1}, found {[z0, z1]}")
            obj.z_range = _merge_range(obj.z_range, (z0, z1))
    _number_objects(list(objects.values()), explicit)
    for obj in objects.values():
        if obj.z_range:
            outside = [b.slice for b in obj.boxes if not obj.z_range[0] <= b.slice <= obj.z_range[1]]
            if outside:
                raise PromptError(f"expected the boxes of '{obj.name}' inside its z_range {list(obj.z_range)}, "
                                  f"found slices {outside}")
    return list(objects.values())


def _text_entry(obj: ObjectPrompt, entry: dict[str, Any], where: str) -> None:
    """A version-2 ``text`` entry (and its optional ``detector``) into ``obj``, which has no boxes."""
    boxes = sorted(_BOX_KEYS & set(entry))
    if boxes or obj.boxes:
        found = f"also {boxes}" if boxes else "boxes in another entry of the same name"
        raise PromptError(f"expected either 'text' or a box in {where}, found {found}; a detector finds the text's "
                          "boxes: give boxes to another object")
    for key in ("text", "detector"):
        if key not in entry:
            continue
        value = entry[key]
        if not isinstance(value, str) or not value.strip():
            raise PromptError(f"expected '{key}' of {where} as a non-empty text, found {_short(value)}")
        old = getattr(obj, key)
        if old is not None and old != value.strip():
            raise PromptError(f"expected one {key} per object, found {_short(old)} and {_short(value.strip())} for "
                              f"'{obj.name}'; entries with the same name prompt one object")
        setattr(obj, key, value.strip())


def _number_objects(objects: list[ObjectPrompt], explicit: dict[str, int]) -> None:
    """Label values: an object's ``label`` if its entries give one, else 1, 2, ... in order of first
    appearance, skipping the values given explicitly. Two objects may not share a value."""
    owner: dict[int, str] = {}
    for name, label in explicit.items():
        if label in owner:
            raise PromptError(f"expected a different label value for each object, found {label} for both "
                              f"'{owner[label]}' and '{name}'")
        owner[label] = name
    free = (v for v in range(1, MAX_LABEL + 1) if v not in owner)
    for obj in objects:
        obj.label = explicit[obj.name] if obj.name in explicit else next(free)


def _merge_range(a: tuple[int, int] | None, b: tuple[int, int]) -> tuple[int, int]:
    return b if a is None else (min(a[0], b[0]), max(a[1], b[1]))

