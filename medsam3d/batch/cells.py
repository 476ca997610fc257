"""One manifest row's cells, each checked alone (a detector cell with its row's prompts cell; a prompts
cell that names a file by that file's DICOM header), shared by the manifest reader and the batch planner.

Each ``check_*`` and ``parse_*`` function that is given a ``where`` (the manifest and row) raises
:class:`~medsam3d.errors.ManifestError` with one line naming it, what was expected, what was found
and what to do; :func:`check_case_id` returns the reason instead, for the planner's own message.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ManifestError, Medsam3dError, PromptError

#: a case_id names the study's output folder: ASCII letters, digits, '.', '_' and '-', starting
#: with a letter or digit, not ending with '.', at most 100 characters (portable on every file system)
CASE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_RESERVED_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{n}" for n in range(10)), *(f"LPT{n}" for n in range(10))}
_BOX_LIKE = re.compile(r"^\s*[-+\d][-+\d\s,]*@")  # numbers, then '@': meant as an inline box
_DATE_DASHED = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_DATE_DICOM = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
#: what a prompts cell may hold, for the errors
PROMPT_FORMS = ("a prompt file (.json, .mrk.json), an inline box i0,j0,i1,j1@k, an RTSTRUCT or DICOM SEG file, "
                "text:WHAT or from:CASE_ID")


@dataclass(frozen=True)
class PromptSource:
    """Where a study's prompts come from.

    ``kind``: ``file`` | ``box`` | ``rtstruct`` | ``seg`` | ``text`` | ``from``; ``value``: the
    absolute path (file, rtstruct, seg), the box ``i0,j0,i1,j1@k[:z0..z1]``, the text, or the
    source ``case_id`` (from). ``written``: the cell as the manifest has it.
    """

    kind: str
    value: str
    written: str = field(default="", compare=False)

    def describe(self) -> str:
        """The prompts as written in the manifest (a relative path stays relative)."""
        if self.written:
            return self.written
        return {"text": f"text:{self.value}", "from": f"from:{self.value}"}.get(self.kind, self.value)


def resolve_path(cell: str, folder: Path) -> Path:
    """The absolute path a cell names, a relative one taken from the manifest's ``folder``."""
    path = Path(cell).expanduser()
    return Path(os.path.abspath(path if path.is_absolute() else folder / path))


def check_case_id(case_id: str) -> str | None:
    """Why ``case_id`` cannot name an output folder (None when it can): see :data:`CASE_ID_PATTERN`."""
    if not CASE_ID_PATTERN.fullmatch(case_id):
        bad = sorted({c for c in case_id if not (c.isascii() and (c.isalnum() or c in "._-"))})
        if bad:
            shown = ", ".join(repr(c) for c in bad[:5])
            return f"the character{'s' if len(bad) > 1 else ''} {shown}"
        if len(case_id) > 100:
            return f"{len(case_id)} characters (at most 100)"
        return "a name that starts with '.', '_' or '-'"
    if case_id.endswith("."):
        return "a name that ends with '.'"
    if case_id.split(".")[0].upper() in _RESERVED_NAMES:
        return "a device name Windows reserves"
    return None


def parse_case_id(case_id: str, where: str) -> str:
    """``case_id`` if it can name an output folder (:func:`check_case_id`), else a ManifestError."""
    why = check_case_id(case_id)
    if why:
        raise ManifestError(f"{where}: expected a case_id usable as a folder name (ASCII letters, digits, '.', '_', "
                            f"'-'; starting with a letter or digit), found {case_id!r} with {why}; rename it")
    return case_id


def timepoint_order(text: str, *, where: str = "timepoint") -> tuple:
    """The sort key of a time point: ``(0, date ordinal)`` for ``YYYY-MM-DD`` or ``YYYYMMDD``,
    ``(1, number)`` for a finite number; anything else raises :class:`ManifestError`."""
    value = text.strip()
    match = _DATE_DASHED.match(value) or _DATE_DICOM.match(value)
    if match:
        try:
            return (0, _dt.date(*(int(g) for g in match.groups())).toordinal())
        except ValueError:
            raise ManifestError(f"{where}: expected a timepoint as a date (YYYY-MM-DD or YYYYMMDD) or a number, found "
                                f"{text!r}, which is no calendar date; correct it") from None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value):
        raise ManifestError(f"{where}: expected a timepoint as a date (YYYY-MM-DD or YYYYMMDD) or a number (days, "
                            f"weeks, visit), found {text!r}; write it in one of these forms")
    return (1, number)


def check_window(window: str, where: str, checked: dict[str, Any]) -> None:
    """A ``window`` cell that :func:`medsam3d.preprocess.parse_window` reads (``checked`` memoises the answers)."""
    key = f"window:{window}"
    if key not in checked:
        from ..preprocess import parse_window

        try:
            parse_window(window)
            checked[key] = None
        except Medsam3dError as exc:
            checked[key] = str(exc)
    if checked[key]:
        raise ManifestError(f"{where}: {checked[key]}; correct the window column")


def check_model(model: str, where: str, checked: dict[str, Any]) -> None:
    """A ``model`` cell naming a registered model."""
    if "models" not in checked:
        from ..models import available_models

        checked["models"] = available_models()
    if model not in checked["models"]:
        raise ManifestError(f"{where}: expected a model among {', '.join(checked['models'])}, found {model!r}; "
                            "correct the model column (or leave it empty for the default)")


def check_detector(detector: str, prompts: str, where: str, checked: dict[str, Any]) -> None:
    """A registered detector's name (never a path: weights are the batch's business), for a text or a prompt file."""
    if "detectors" not in checked:
        from ..detect import available_detectors

        checked["detectors"] = available_detectors()
    if detector.strip().lower() not in checked["detectors"]:
        raise ManifestError(f"{where}: expected a detector among {', '.join(checked['detectors'])}, found "
                            f"{detector!r}; correct the detector column (or leave it empty for ct-anatomy)")
    if prompts.strip().lower().startswith(("from:",)) or _BOX_LIKE.match(prompts):
        raise ManifestError(f"{where}: expected a text:WHAT or a prompt file with text objects beside the detector "
                            f"column, found {prompts!r}; a detector answers texts (empty the detector column)")


def prompt_source(cell: str, folder: Path, where: str) -> PromptSource:
    """What a ``prompts`` cell names: ``text:``/``from:``, an inline box, or a file (its DICOM header tells an
    RTSTRUCT or SEG from a prompt file)."""
    lowered = cell.lower()
    for prefix in ("text", "from"):
        if lowered.startswith(prefix + ":"):
            value = cell[len(prefix) + 1:].strip()
            if not value:
                what = "the text a detector is to find" if prefix == "text" else "the case_id to take the objects from"
                raise ManifestError(f"{where}: expected {what} after '{prefix}:', found nothing; write "
                                    f"{prefix}:{'liver tumor' if prefix == 'text' else 'CASE_ID'}")
            return PromptSource(prefix, value, cell)
    path = resolve_path(cell, folder)
    if _BOX_LIKE.match(cell) and not path.exists():
        return PromptSource("box", _checked_box(cell, where), cell)
    kind = "file"
    if not path.name.lower().endswith(".json"):
        modality = dicom_modality(path)
        kind = {"RTSTRUCT": "rtstruct", "SEG": "seg"}.get(modality or "", "file")
    return PromptSource(kind, str(path), cell)


def _checked_box(cell: str, where: str) -> str:
    """An inline box checked as far as it can be without the image (indices, order, size)."""
    from ..prompts import parse_box_option

    forms = "i0,j0,i1,j1@k or i0,j0,i1,j1@k:z0..z1 (voxel indices, quoted in a CSV)"
    try:
        entry = parse_box_option(cell)
    except PromptError:
        raise ManifestError(f"{where}: expected an inline box as {forms}, found {cell!r}; correct the prompts cell"
                            ) from None
    i0, j0, i1, j1 = entry["box"]
    k = entry["slice"]
    z0, z1 = entry.get("z_range", (k, k))
    problem = ("negative voxel indices" if min(i0, j0, i1, j1, k, z0, z1) < 0 else
               "i1 <= i0 or j1 <= j0 (a box at least 2 voxels wide and high, min before max)"
               if i1 <= i0 or j1 <= j0 else f"slice {k} outside its z range {z0}..{z1}" if not z0 <= k <= z1 else "")
    if problem:
        raise ManifestError(f"{where}: expected an inline box as {forms}, found {cell!r} with {problem}; correct the "
                            "prompts cell")
    return cell.strip()


def dicom_modality(path: Path) -> str | None:
    """The Modality of a DICOM file's header (None for a missing file or one that is not DICOM)."""
    if not path.is_file():
        return None
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["Modality"])
    except Exception:  # pydicom raises many types on a file that is not DICOM
        return None
    return str(getattr(ds, "Modality", "") or "") or None


def json_cell(value: Any) -> str:
    """A JSON manifest's value as the text a CSV cell would hold (lists and objects as compact JSON)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"{value:g}" if isinstance(value, float) and value.is_integer() and abs(value) < 1e15 else str(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
