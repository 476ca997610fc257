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

import json
import logging
import math
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import PromptError
from .volume import Volume

_OBJECT_KEYS = {"name", "slice", "box", "z_range", "box_ras", "label"}
_TEXT_KEYS = {"text", "detector"}  # version 2
_BOX_KEYS = {"slice", "box", "z_range", "box_ras", "box_corners_ras"}
VERSIONS = (1, 2)
_MARKUP_KEYS = {"box_corners_ras"}  # set by :func:`markups_to_entries` only
MAX_LABEL = 65535  # label maps are written as uint8, or uint16 past 255

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BoxPrompt:
    """One box on one slice: ``box = (i_min, j_min, i_max, j_max)`` inclusive voxel indices."""

    slice: int
    box: tuple[int, int, int, int]

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0] + 1) * (self.box[3] - self.box[1] + 1)


@dataclass
class ObjectPrompt:
    """Every prompt of one object, its label value and optional slice bounds.

    ``text`` (prompt file version 2): what a detector is to find; an object with a text and no
    boxes waits for :func:`medsam3d.detect.resolve_text_prompts`, which gives it boxes and
    sets ``detector`` (the detector's name; in a prompt file, the one asked for) and
    ``score`` (the detection's).
    """

    name: str
    label: int
    boxes: list[BoxPrompt] = field(default_factory=list)
    z_range: tuple[int, int] | None = None
    text: str | None = None
    detector: str | None = None
    score: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``text``, ``detector`` and ``score`` only when set); see :meth:`from_dict`."""
        out = {"name": self.name, "label": self.label, "z_range": list(self.z_range) if self.z_range else None,
               "boxes": [{"slice": b.slice, "box": list(b.box)} for b in self.boxes]}
        out.update({key: value for key in ("text", "detector", "score")
                    if (value := getattr(self, key)) is not None})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ObjectPrompt:
        """The inverse of :meth:`as_dict`."""
        try:
            return cls(name=data["name"], label=int(data["label"]),
                       boxes=[BoxPrompt(int(b["slice"]), tuple(int(v) for v in b["box"])) for b in data["boxes"]],
                       z_range=tuple(data["z_range"]) if data.get("z_range") else None, text=data.get("text"),
                       detector=data.get("detector"), score=data.get("score"))
        except (KeyError, TypeError, ValueError) as exc:
            raise PromptError(f"expected an object prompt as ObjectPrompt.as_dict() writes it, found {_short(data)} "
                              f"({type(exc).__name__}: {exc})") from None


def _numbers(value: Any, n: int, what: str) -> list[float]:
    """``n`` finite numbers (not booleans, not NaN or infinite), or one line saying what was found."""
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise PromptError(f"expected {what} as a list of {n} numbers, found {_short(value)}")
    if any(isinstance(v, bool) for v in value):
        raise PromptError(f"expected {what} as numbers, found a true/false value in {_short(value)}")
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer too large for a float
        raise PromptError(f"expected {what} as numbers, found {_short(value)}") from None
    if not all(math.isfinite(v) for v in out):
        raise PromptError(f"expected {what} as finite numbers, found {_short(value)}")
    return out


def _int_list(value: Any, n: int, what: str) -> list[int]:
    out = _numbers(value, n, what)
    if any(v != round(v) for v in out):
        raise PromptError(f"expected integer voxel indices in {what}, found {_short(value)}; "
                          "use box_ras for millimetres")
    return [int(v) for v in out]


def box_from_ras(volume: Volume, corner_a: Sequence[float], corner_b: Sequence[float]) -> tuple[BoxPrompt, tuple[int, int]]:
    """A 3D ROI given by two RAS corners -> (box on its middle slice, inclusive z range).

    The ROI's 8 corners are mapped to voxel space and the covering index range is kept
    (rounded to the nearest voxel centre, clipped to the image), so oblique or flipped
    grids give the voxels whose centres the ROI contains (a centre within 1/1000 voxel of
    the ROI's face counts as inside).
    """
    if not all(isinstance(c, (list, tuple, np.ndarray)) and len(c) == 3 for c in (corner_a, corner_b)):
        raise PromptError(f"expected two RAS corners of 3 numbers each, found {_short(corner_a)} and "
                          f"{_short(corner_b)}")
    a = np.array(_numbers(list(corner_a), 3, "the first RAS corner"))
    b = np.array(_numbers(list(corner_b), 3, "the second RAS corner"))
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    return box_from_ras_corners(volume, corners)


def box_from_ras_corners(volume: Volume, corners: np.ndarray, hint: str = "check the coordinates are RAS, not LPS"
                         ) -> tuple[BoxPrompt, tuple[int, int]]:
    """The voxel box covering a ROI given by its corners in RAS mm (any number, e.g. the 8 of a
    rotated Slicer ROI) -> (box on its middle slice, inclusive z range); see :func:`box_from_ras`.
    ``hint`` ends the error for a ROI outside the image."""
    corners = np.asarray(corners, np.float64).reshape(-1, 3)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    with np.errstate(over="ignore", invalid="ignore"):
        ijk = volume.ras_to_index(corners)
    if not np.all(np.isfinite(ijk)):
        raise PromptError(f"expected a RAS ROI of finite millimetres, found corners {lo.tolist()}..{hi.tolist()} "
                          "too far out to place on the image; check the coordinates")
    # a voxel centre within 1/1000 voxel of a face counts as inside: typed millimetres are rounded
    imin = np.ceil(ijk.min(axis=0) - 1e-3).astype(int)
    imax = np.floor(ijk.max(axis=0) + 1e-3).astype(int)
    shape = np.array(volume.shape)
    if np.any(imax < 0) or np.any(imin > shape - 1):
        raise PromptError(
            f"expected the RAS ROI {lo.round(1).tolist()}..{hi.round(1).tolist()} mm to overlap the image, found it "
            f"outside (image covers voxels 0..{(shape - 1).tolist()}); {hint}"
        )
    imin, imax = np.maximum(imin, 0), np.minimum(imax, shape - 1)
    if np.any(imax < imin):
        raise PromptError("expected the RAS ROI to contain at least one voxel centre, found none; enlarge it")
    k_mid = int((imin[2] + imax[2]) // 2)
    box = BoxPrompt(k_mid, (int(imin[0]), int(imin[1]), int(imax[0]), int(imax[1])))
    return box, (int(imin[2]), int(imax[2]))


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


MAX_PROMPT_FILE_BYTES = 16 * 1024 * 1024  # a prompt file is a few kB; Slicer markups with many points stay far below


def _short(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters (a prompt error stays one readable line)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # deeply nested data, an integer too long to print
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_prompts(path: str | Path, volume: Volume) -> list[ObjectPrompt]:
    """Read and validate a prompt file (JSON version 1 or 2, or a Slicer ``.mrk.json``)."""
    import errno
    import os

    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        found = {errno.ENOENT: "nothing; check the path", errno.ELOOP: "a loop of symbolic links; fix the links",
                 errno.ENAMETOOLONG: "a path too long for this system; use a shorter one",
                 errno.ENOTDIR: "nothing (a part of the path is a file); check the path"}.get(
            exc.errno, f"it unreadable ({exc.strerror or type(exc).__name__})")
        raise PromptError(f"expected a prompt JSON file at {path}, found {found}") from None
    if not stat.S_ISREG(info.st_mode):
        raise PromptError(f"expected a prompt JSON file at {path}, found "
                          f"{'a folder' if stat.S_ISDIR(info.st_mode) else 'a device, pipe or socket'}; "
                          "give the file's path")
    if info.st_size > MAX_PROMPT_FILE_BYTES:
        raise PromptError(f"expected a prompt JSON file of a few kB at {path}, found {info.st_size / 1e6:.0f} MB; "
                          "check that this is the prompt file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptError(f"expected a prompt file in UTF-8 text at {path}, found bytes that are not "
                          f"(at byte {exc.start}); save it as UTF-8 JSON") from None
    except OSError as exc:
        raise PromptError(f"expected a readable prompt file at {path}, found it unreadable "
                          f"({exc.strerror or type(exc).__name__})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptError(f"expected valid JSON in {path}, found a syntax error ({exc}); fix the file") from None
    except (ValueError, RecursionError) as exc:  # an integer of > 4300 digits, nesting deeper than Python's stack
        what = "nesting too deep to read" if isinstance(exc, RecursionError) else " ".join(str(exc).split())[:120]
        raise PromptError(f"expected a prompt JSON document in {path}, found {what}; fix the file") from None
    return parse_prompts(data, volume, source=path.name)


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


def prompts_from(spec: Iterable[dict[str, Any]] | dict[str, Any] | list[ObjectPrompt] | str | Path, volume: Volume
                 ) -> list[ObjectPrompt]:
    """Accept parsed ObjectPrompts, a prompt document, a list of entries, or the path of a prompt
    file (version 1 or 2, or a Slicer ``.mrk.json``)."""
    if spec is None:
        raise PromptError("expected prompts (a prompt document, a list of entries or of ObjectPrompt, or a "
                          "prompt file's path), found None")
    if isinstance(spec, (str, Path)) or hasattr(spec, "__fspath__"):
        return load_prompts(Path(spec), volume)
    if isinstance(spec, list) and spec and all(isinstance(o, ObjectPrompt) for o in spec):
        return spec  # type: ignore[return-value]
    if not isinstance(spec, dict) and (isinstance(spec, bytes) or not hasattr(spec, "__iter__")):
        raise PromptError(f"expected prompts as a prompt document (dict), a list of entries or a prompt file's "
                          f"path, found {type(spec).__name__}")
    return parse_prompts(spec if isinstance(spec, dict) else list(spec), volume)
