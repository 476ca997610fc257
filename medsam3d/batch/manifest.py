"""The batch manifest: one row per study (an image and its prompts), read and checked before anything runs.

A manifest is a CSV file (UTF-8, with or without a byte-order mark; comma, semicolon or tab
separated) or a JSON file (a list of objects, or ``{"studies": [...]}``) with these keys:

* required: ``case_id``, ``patient_id``, ``timepoint``, ``image``, ``prompts``;
* optional: ``series_uid``, ``modality``, ``window``, ``model``, ``checkpoint``;
* any other column is kept as the study's ``metadata`` and carried into the results.

Relative paths (``image``, ``checkpoint``, prompt files) are relative to the manifest's folder.
``timepoint`` is a date (``YYYY-MM-DD`` or DICOM ``YYYYMMDD``) or a number (days, weeks, a
visit number); one patient's time points are all dates or all numbers. A ``prompts`` cell is
one of: a prompt file (``.json`` version 1 or 2, 3D Slicer ``.mrk.json``), an inline box
``i0,j0,i1,j1@k`` or ``i0,j0,i1,j1@k:z0..z1``, an RTSTRUCT or DICOM SEG file (one object per
ROI or segment), ``text:WHAT`` (a detector finds it) or ``from:CASE_ID`` (the objects of
another study of the same patient, carried over by the batch runner).

What makes the manifest wrong as a whole is refused before any study runs, with a one-line
:class:`~medsam3d.errors.ManifestError` naming the row: a missing required column, an empty
required cell, a row with the wrong number of fields, a duplicate or unusable ``case_id``,
an unreadable ``timepoint``, a bad inline box, an unknown ``window`` or ``model``, a
``from:`` that names no other case of the same patient or closes a cycle, and two studies of
one patient with the same modality at the same time point. What can only be known by
reading a study's files (a missing image, a bad prompt file) is that study's failure, which
the runner records while the other studies go on: :func:`study_prompts` raises it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import ManifestError, PromptError
from .cells import (PROMPT_FORMS, PromptSource, check_detector, check_model, check_window, dicom_modality, json_cell,
                    parse_case_id, prompt_source, resolve_path, timepoint_order)

if TYPE_CHECKING:
    from ..prompts.types import ObjectPrompt
    from ..volume import Volume

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("case_id", "patient_id", "timepoint", "image", "prompts")
OPTIONAL_COLUMNS = ("series_uid", "modality", "window", "model", "checkpoint", "detector")
PROMPT_KINDS = ("file", "box", "rtstruct", "seg", "text", "from")
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # a manifest of 100,000 studies stays far below


@dataclass(frozen=True)
class Study:
    """One row of a manifest: a study (an image of a patient at a time point) and its prompts.

    ``row``: the row number a user sees (CSV: the line number, the header being line 1; JSON:
    the 1-based index in the list). ``order``: the sort key within the patient,
    ``(0, date ordinal)`` for a date or ``(1, number)`` for a number. ``image`` and
    ``checkpoint`` are absolute. ``metadata``: every column that is not a manifest column.
    """

    row: int
    case_id: str
    patient_id: str
    timepoint: str
    order: tuple
    image: Path
    prompts: PromptSource
    series_uid: str | None = None
    modality: str | None = None
    window: str | None = None
    model: str | None = None
    checkpoint: Path | None = None
    #: the registered detector that answers a ``text:`` prompt (None: the batch's, else ``ct-anatomy``)
    detector: str | None = None
    metadata: dict[str, str] = field(default_factory=dict, hash=False)  # hash=False: a Study stays hashable


# ---------------------------------------------------------------------------------------------- reading
def read_manifest(path: str | os.PathLike) -> list[Study]:
    """Read and check a manifest (CSV or JSON, see the module docstring); the studies in row order.

    Raises :class:`~medsam3d.errors.ManifestError` (one line naming the row and the fix) for
    anything that makes the manifest wrong as a whole; files the rows name are not opened,
    except the header of a prompts file, to tell an RTSTRUCT or DICOM SEG from a prompt file.
    """
    path = Path(path)
    text = _manifest_text(path)
    is_json = path.suffix.lower() == ".json" or (path.suffix.lower() not in (".csv", ".tsv", ".txt")
                                                  and text.lstrip()[:1] in ("[", "{"))
    rows = _json_rows(path, text) if is_json else _csv_rows(path, text)
    if not rows:
        raise ManifestError(f"expected at least one study in the manifest {path}, found none; add a row per study")
    folder = Path(os.path.abspath(path.parent if str(path.parent) else "."))
    checked: dict[str, Any] = {}  # window and model values already checked
    studies = [_study(path.name, number, cells, folder, checked) for number, cells in rows]
    _check_studies(path.name, studies)
    log.info("manifest %s: %d studies of %d patients", path, len(studies), len({s.patient_id for s in studies}))
    return studies


def _manifest_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ManifestError(f"expected a manifest file (CSV or JSON) at {path}, found a folder; give the file")
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"expected a manifest of at most {MAX_MANIFEST_BYTES // 2**20} MiB at {path}, found "
                                f"{size / 2**20:.0f} MiB; check that this is the manifest")
        raw = path.read_bytes()
    except OSError as exc:
        found = "nothing" if isinstance(exc, FileNotFoundError) else f"it unreadable ({exc.strerror or exc})"
        raise ManifestError(f"expected a manifest file (CSV or JSON) at {path}, found {found}; check the path"
                            ) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ManifestError(f"expected the manifest {path.name} in UTF-8, found a byte that is not UTF-8 on line "
                            f"{line}; save it as 'CSV UTF-8' (or JSON in UTF-8)") from None


def _column(name: str) -> str:
    """A header name as the manifest knows it: manifest columns case-insensitive, others as written."""
    name = name.strip()
    return name.lower() if name.lower() in REQUIRED_COLUMNS + OPTIONAL_COLUMNS else name


def _delimiter(path: Path, text: str) -> str:
    """The field separator: a tab for .tsv, else the one of , ; tab that splits the header into the
    most manifest columns (a spreadsheet in a comma-decimal locale writes semicolons)."""
    if path.suffix.lower() == ".tsv":
        return "\t"
    header = next((line for line in text.splitlines() if line.strip()), "")
    best, found = ",", -1
    for candidate in (",", ";", "\t"):
        names = {_column(c) for c in next(csv.reader([header], delimiter=candidate), [])}
        count = len(names & set(REQUIRED_COLUMNS + OPTIONAL_COLUMNS))
        if count > found:
            best, found = candidate, count
    return best


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict[str, str]]]:
    """(line number, cells by column) of each non-empty row; the header's problems and the rows'
    field counts refused here."""
    name = path.name
    delimiter = _delimiter(path, text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[tuple[int, dict[str, str]]] = []
    header: list[str] | None = None
    header_line = 1
    previous = 0
    try:
        for record in reader:
            line, previous = previous + 1, reader.line_num  # the record's first line
            cells = [c.strip() for c in record]
            if not any(cells):
                continue  # a blank line, or a spreadsheet's row of empty cells
            if header is None:
                header, header_line = [_column(c) for c in cells], line
                _check_header(name, header, header_line)
                continue
            if len(cells) < len(header) or any(cells[len(header):]):
                hint = (f"quote cells that hold '{delimiter}' (an inline box: \"120,88,171,140@41\")"
                        if len(cells) > len(header) else "add the missing cells (empty ones may stay empty)")
                raise ManifestError(f"{name} row {line}: expected {len(header)} fields as in the header, found "
                                    f"{len(cells)}; {hint}")
            row: dict[str, str] = {}
            for column, (key, value) in enumerate(zip(header, cells), start=1):
                if not key:
                    if value:
                        raise ManifestError(f"{name} row {line}: expected no value in column {column}, which has no "
                                            f"name in the header, found {value!r}; name the column or clear the cell")
                    continue
                row[key] = value
            rows.append((line, row))
    except csv.Error as exc:
        raise ManifestError(f"{name} row {previous + 1}: expected CSV fields, found a malformed row ({exc}); fix the "
                            "quoting of that line") from None
    if header is None:
        raise ManifestError(f"expected a header row ({', '.join(REQUIRED_COLUMNS)}) in the manifest {path}, found an "
                            "empty file; write the header and one row per study")
    return rows


def _check_header(name: str, header: list[str], line: int) -> None:
    seen: set[str] = set()
    for key in header:
        if key and key in seen:
            raise ManifestError(f"{name} row {line}: expected each column once in the header, found '{key}' twice; "
                                "rename or remove one")
        seen.add(key)
    missing = [c for c in REQUIRED_COLUMNS if c not in seen]
    if missing:
        raise ManifestError(f"{name} row {line}: expected the columns {', '.join(REQUIRED_COLUMNS)} in the header, "
                            f"found no {', '.join(missing)}; add the column{'s' if len(missing) > 1 else ''}")


def _json_rows(path: Path, text: str) -> list[tuple[int, dict[str, str]]]:
    name = path.name
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"expected valid JSON in the manifest {name}, found a syntax error on line {exc.lineno} "
                            f"({exc.msg}); fix the file") from None
    except (ValueError, RecursionError):
        raise ManifestError(f"expected a JSON manifest in {name}, found values too long or nested too deep to read; "
                            "fix the file") from None
    if isinstance(data, dict) and "studies" in data:
        data = data["studies"]
    if not isinstance(data, list):
        keys = f" with keys {sorted(data)[:5]}" if isinstance(data, dict) else ""
        raise ManifestError(f"expected a JSON manifest as a list of studies or {{\"studies\": [...]}} in {name}, "
                            f"found {type(data).__name__}{keys}")
    rows: list[tuple[int, dict[str, str]]] = []
    for number, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            raise ManifestError(f"{name} row {number}: expected a JSON object with {', '.join(REQUIRED_COLUMNS)}, "
                                f"found {type(item).__name__}")
        row: dict[str, str] = {}
        for key, value in item.items():
            if key == "metadata" and isinstance(value, dict):
                row.update({str(k): json_cell(v) for k, v in value.items() if str(k) not in row})
                continue
            column = _column(str(key))
            if column in row and column in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
                raise ManifestError(f"{name} row {number}: expected each key once, found '{column}' twice (in "
                                    "another case or spelling); keep one")
            row[column] = json_cell(value)
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise ManifestError(f"{name} row {number}: expected the keys {', '.join(REQUIRED_COLUMNS)}, found no "
                                f"{', '.join(missing)}; add {'them' if len(missing) > 1 else 'it'} to that study")
        rows.append((number, row))
    return rows


# ---------------------------------------------------------------------------------------------- one row
def _study(name: str, row: int, cells: dict[str, str], folder: Path, checked: dict[str, Any]) -> Study:
    where = f"{name} row {row}"
    for column in REQUIRED_COLUMNS:
        if not cells.get(column, ""):
            what = PROMPT_FORMS if column == "prompts" else {
                "case_id": "a name for the study's output folder", "patient_id": "the patient's identifier",
                "timepoint": "a date (YYYY-MM-DD) or a number", "image": "the image file or DICOM folder"}[column]
            raise ManifestError(f"{where}: expected a value in the '{column}' column ({what}), found it empty; fill "
                                f"in the {column} column")
    case_id = parse_case_id(cells["case_id"], where)
    order = timepoint_order(cells["timepoint"], where=where)
    optional = {c: cells.get(c, "") or None for c in OPTIONAL_COLUMNS}
    modality = optional["modality"].upper() if optional["modality"] else None
    if modality is not None:
        from ..preprocess import MODALITIES

        if modality not in MODALITIES:
            raise ManifestError(f"{where}: expected a modality among {', '.join(MODALITIES)} (or an empty cell: from "
                                f"the image), found {optional['modality']!r}; correct the modality column")
    if optional["window"] is not None:
        check_window(optional["window"], where, checked)
    if optional["model"] is not None:
        check_model(optional["model"], where, checked)
    if optional["detector"] is not None:
        check_detector(optional["detector"], cells["prompts"], where, checked)
    return Study(
        row=row, case_id=case_id, patient_id=cells["patient_id"], timepoint=cells["timepoint"], order=order,
        image=resolve_path(cells["image"], folder), prompts=prompt_source(cells["prompts"], folder, where),
        series_uid=optional["series_uid"], modality=modality, window=optional["window"], model=optional["model"],
        checkpoint=resolve_path(optional["checkpoint"], folder) if optional["checkpoint"] else None,
        detector=optional["detector"].strip().lower() if optional["detector"] else None,
        metadata={k: v for k, v in cells.items() if k not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS},
    )


# ---------------------------------------------------------------------------------------------- all rows
def _check_studies(name: str, studies: list[Study]) -> None:
    """The checks across rows: unique case_ids, one kind of time point per patient, one study per
    patient, modality and time point, and ``from:`` targets."""
    by_id: dict[str, Study] = {}
    for study in studies:
        other = by_id.setdefault(study.case_id.casefold(), study)
        if other is not study:
            same = "" if other.case_id == study.case_id else " (they differ only in case, which a file system may not)"
            raise ManifestError(f"{name} rows {other.row} and {study.row}: expected a different case_id for each "
                                f"study, found '{study.case_id}' twice{same}; rename one")
    patients: dict[str, list[Study]] = {}
    for study in studies:
        patients.setdefault(study.patient_id, []).append(study)
    for patient, group in patients.items():
        kinds = {s.order[0]: s for s in group}
        if len(kinds) > 1:
            date, number = kinds[0], kinds[1]
            raise ManifestError(f"{name} rows {date.row} and {number.row}: expected the time points of patient "
                                f"'{patient}' all as dates or all as numbers, found a date ({date.timepoint!r}) and a "
                                f"number ({number.timepoint!r}); use one kind for the patient")
        seen: dict[tuple, Study] = {}
        for study in group:
            other = seen.setdefault((study.modality, study.order), study)
            if other is not study:
                modality = f"modality {study.modality}" if study.modality else "no modality column"
                raise ManifestError(f"{name} rows {other.row} and {study.row}: expected one study of patient "
                                    f"'{patient}' per modality and time point, found two with {modality} at "
                                    f"{study.timepoint!r}; keep one (delete the other row), correct a timepoint, or "
                                    "fill in the modality column")
    exact = {s.case_id: s for s in studies}
    for study in studies:
        if study.prompts.kind != "from":
            continue
        target = exact.get(study.prompts.value)
        if target is None:
            near = by_id.get(study.prompts.value.casefold())
            hint = f"did you mean from:{near.case_id}?" if near else "name a case_id of this manifest"
            raise ManifestError(f"{name} row {study.row}: expected from:{study.prompts.value} to name another study of "
                                f"the manifest, found no such case_id; {hint}")
        if target is study:
            raise ManifestError(f"{name} row {study.row}: expected from: to name another study, found its own case_id "
                                f"'{study.case_id}'; give this study its own prompts or name an earlier study")
        if target.patient_id != study.patient_id:
            raise ManifestError(f"{name} row {study.row}: expected from:{target.case_id} to name a study of the same "
                                f"patient '{study.patient_id}', found one of patient '{target.patient_id}' (row "
                                f"{target.row}); objects carry over between one patient's time points only")
    for study in studies:  # cycles: follow each chain of from: until a study with prompts of its own
        chain = [study]
        while chain[-1].prompts.kind == "from":
            nxt = exact[chain[-1].prompts.value]
            if nxt in chain:
                loop = chain[chain.index(nxt):]
                path = " -> ".join(s.case_id for s in loop + [nxt])
                rows = ", ".join(str(s.row) for s in sorted(loop, key=lambda s: s.row))
                raise ManifestError(f"{name} rows {rows}: expected from: to lead to a study with prompts of its own, "
                                    f"found a cycle ({path}); give one of them its own prompts")
            chain.append(nxt)


# ---------------------------------------------------------------------------------------------- prompts
def study_prompts(study: Study, volume: Volume, *, labels_of: Callable[[str], Volume] | None = None
                  ) -> list[ObjectPrompt]:
    """The prompts of ``study`` on ``volume`` (its image, loaded), validated.

    * ``file``: :func:`medsam3d.prompts.load_prompts` (JSON version 1 or 2, Slicer ``.mrk.json``);
    * ``box``: the inline box, as the command line's ``--box``;
    * ``rtstruct`` / ``seg``: the file rasterised on ``volume`` (it must be drawn on this series),
      then one object per ROI or segment (:func:`medsam3d.prompts.prompts_from_labels`);
    * ``text``: one version-2 text object (name and text the cell's text), for a detector;
    * ``from``: needs ``labels_of(case_id)``, which returns the source study's label map already
      carried onto ``volume``'s grid (the batch runner registers and transfers it); without it a
      :class:`~medsam3d.errors.PromptError` says so.

    Raises a :class:`~medsam3d.errors.Medsam3dError` (``PromptError``, or ``VolumeIOError`` /
    ``GeometryError`` for an unreadable or foreign RTSTRUCT / SEG): the study fails, the batch goes on.
    """
    from ..prompts import load_prompts, parse_box_option, parse_prompts
    from ..prompts.from_labels import prompts_from_labels

    source = study.prompts
    if source.kind == "file":
        path = Path(source.value)
        if not path.name.lower().endswith(".json"):
            modality = dicom_modality(path)
            if modality is not None:
                raise PromptError(f"expected a prompt file (.json, .mrk.json), an RTSTRUCT or a DICOM SEG as the "
                                  f"prompts of case '{study.case_id}', found a DICOM {modality} file at {path}; give "
                                  "the segmentation or prompt file, not an image")
        return load_prompts(path, volume)
    if source.kind == "box":
        return parse_prompts([parse_box_option(source.value)], volume)
    if source.kind == "text":
        return parse_prompts({"version": 2, "objects": [{"name": source.value, "text": source.value}]}, volume)
    if source.kind in ("rtstruct", "seg"):
        if source.kind == "rtstruct":
            from ..io.rtstruct import load_rtstruct

            labels = load_rtstruct(source.value, volume)
        else:
            from ..io.dicomseg import read_dicom_seg

            labels = read_dicom_seg(source.value, volume)
        return prompts_from_labels(labels)
    if source.kind == "from":
        if labels_of is None:
            raise PromptError(f"expected the objects of case '{source.value}' for case '{study.case_id}' "
                              f"(from:{source.value}), found no segmentation to take them from; the batch runner "
                              "carries them over once that case is segmented (labels_of=...)")
        labels = labels_of(source.value)
        if labels is None:
            raise PromptError(f"expected a segmentation of case '{source.value}' to take the objects of case "
                              f"'{study.case_id}' from, found none (did that case fail?)")
        volume.check_same_grid(labels)
        return prompts_from_labels(labels)
    raise PromptError(f"expected a prompt source among {', '.join(PROMPT_KINDS)}, found {source.kind!r}")
