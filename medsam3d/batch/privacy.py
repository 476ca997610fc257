"""Pseudonymisation of a batch's results before they are shared (report, CSV, JSON).

The manifest's ``patient_id`` and ``case_id`` are the pseudonyms: they are kept as written,
so the manifest's author must choose ids that are not themselves identifying (no MRN, no
name). Everything else that can carry a real identity is removed or replaced:

- **File paths** (the study's image, the record's input path, prompt source, checkpoint,
  outputs and mesh paths, the manifest path) are replaced by placeholders built from the
  case id, keeping only the file type: ``<P01-T0>/image.nii.gz``,
  ``<P01-T0>/prompts.json``, ``<P01-T0>/output-1.seg.nrrd``, ``<manifest>.csv``. Folders
  and file names are where real names hide most often (``/data/DOE_JOHN/ct.nii.gz``).
  Any other absolute path left in free text (error messages, warnings, settings) becomes
  ``<path>``. Relative paths inside ``OUTDIR`` (``files``) are kept, because the batch
  names them after the case ids; known identity strings in them are still removed.
- **DICOM patient attributes** anywhere (any dict key, case-insensitive, in
  :data:`DICOM_IDENTITY_KEYS`: PatientName, PatientID, OtherPatientIDs, PatientBirthDate,
  PatientSex, PatientAge, PatientAddress, AccessionNumber, InstitutionName,
  ReferringPhysicianName, ...) are deleted.
- **DICOM UIDs** (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID,
  FrameOfReferenceUID, and the record's ``input.series_uid``) are replaced by
  ``<removed>``: a UID is not a name, but it leads back to the exam in the hospital's
  archive. The input's SHA-256 stays, since it names a file only to someone who holds it.
- **Metadata columns** whose normalised name (lower case, letters and digits only)
  contains one of :data:`IDENTIFYING_COLUMN_WORDS` (name, mrn, birth, dob, accession,
  ssn, address, phone, email, ...) are deleted. The list errs on the side of removing.

Every value removed above (and its name parts, and a date of birth written without
separators) is then searched for in every remaining string and replaced by
``<removed>``, so a name copied into an error message or a file name does not survive.

Kept on purpose: the time points as written and the study order (they may be scan dates;
a response is read against the intervals between scans), the input hashes, the model and
its weights hash, measurements.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

logger = logging.getLogger(__name__)

REMOVED = "<removed>"

#: DICOM attributes (keywords, compared case-insensitively) that identify a person or an exam; deleted
DICOM_IDENTITY_KEYS = frozenset(k.lower() for k in (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "PatientBirthDate", "PatientBirthTime", "PatientBirthName", "PatientMotherBirthName", "PatientSex", "PatientAge",
    "PatientAddress", "PatientTelephoneNumbers", "PatientInsurancePlanCodeSequence", "MilitaryRank",
    "IssuerOfPatientID", "MedicalRecordLocator", "EthnicGroup", "Occupation", "PatientComments",
    "AccessionNumber", "StudyID", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician", "StationName", "DeviceSerialNumber",
))
#: DICOM UIDs (and the record's ``series_uid``); replaced by :data:`REMOVED`
UID_KEYS = frozenset(k.lower() for k in (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "series_uid",
    "MediaStorageSOPInstanceUID", "ReferencedSOPInstanceUID",
))
#: a metadata column whose normalised name contains one of these is deleted
IDENTIFYING_COLUMN_WORDS = (
    "name", "mrn", "medicalrecord", "recordnumber", "birth", "dob", "accession", "ssn", "socialsecurity",
    "nhs", "insurance", "address", "street", "zip", "postcode", "postal", "phone", "email", "mail",
    "initials", "physician", "referring", "doctor", "surgeon", "institution", "hospital", "patientid", "uid",
)

# deleted, but their values (M, 045Y) are too short and common to search for in other text
_NOT_SEARCHED = frozenset(("patientsex", "patientage", "ethnicgroup", "militaryrank"))
# an absolute path left in free text: POSIX (/a/b), home (~/a) or Windows (C:\a, \\server\share)
_ABSOLUTE_PATH = re.compile(r"(?<![\w./\\<>])(?:[A-Za-z]:[\\/]|\\\\|~/|/)(?=[^\s/])[^\s'\"<>|,;()\[\]{}]*")
_DATE = re.compile(r"^(\d{4})[-./](\d{2})[-./](\d{2})$")


def pseudonymise(results: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a batch's results with identities removed (see the module docstring)."""
    out = copy.deepcopy(results)
    secrets: set[str] = set()
    paths: dict[str, str] = {}

    manifest = out.get("manifest")
    if isinstance(manifest, dict) and manifest.get("path"):
        paths[str(manifest["path"])] = f"<manifest>{_suffix(manifest['path'])}"
        manifest["path"] = paths[str(manifest["path"])]

    studies = [s for s in out.get("studies") or () if isinstance(s, dict)]
    own_paths = []
    for study in studies:
        case = str(study.get("case_id") or "case")
        own: dict[str, str] = {}
        metadata = study.get("metadata")
        if isinstance(metadata, dict):
            for column in [c for c in metadata if _identifying_column(c)]:
                secrets.update(_variants(metadata.pop(column)))
            for column, value in list(metadata.items()):
                if isinstance(value, str) and _looks_like_path(value):
                    own[value] = f"<{case}>/{column}{_suffix(value)}"
        if study.get("image"):
            own[str(study["image"])] = f"<{case}>/image{_suffix(study['image'])}"
        prompts = study.get("prompts")
        if isinstance(prompts, str) and not prompts.startswith(("from:", "text:")) and _looks_like_path(prompts):
            own[prompts] = f"<{case}>/prompts{_suffix(prompts)}"  # a prompt file, as written in the manifest
        record = study.get("record")
        if isinstance(record, dict):
            _record_paths(record, case, own)
        own_paths.append(own)
        for path, placeholder in own.items():
            paths.setdefault(path, placeholder)

    _collect_dicom(out, secrets)
    kept = _kept_ids(out)
    secrets = {s for s in secrets if _searchable(s) and s not in kept}
    # each study's own paths first: a file several studies share (one prompt file for a patient's
    # time points) is named after the study in that study's entry, after the first elsewhere
    for study, own in zip(studies, own_paths):
        study.update(_Scrubber(own, set(), fallback=False)(study))
    result = _Scrubber(paths, secrets)(out)
    logger.debug("pseudonymised: %d paths and %d identity strings replaced", len(paths), len(secrets))
    return result


def _record_paths(record: dict[str, Any], case: str, paths: dict[str, str]) -> None:
    """Register the record's own paths under case-id placeholders."""
    inp = record.get("input")
    if isinstance(inp, dict) and inp.get("path"):
        paths.setdefault(str(inp["path"]), f"<{case}>/image{_suffix(inp['path'])}")
    prompts = record.get("prompts")
    if isinstance(prompts, dict) and isinstance(prompts.get("source"), str) and _looks_like_path(prompts["source"]):
        paths.setdefault(prompts["source"], f"<{case}>/prompts{_suffix(prompts['source'])}")
    model = record.get("model")
    if isinstance(model, dict) and model.get("checkpoint"):
        name = _basename(str(model["checkpoint"]))
        paths.setdefault(str(model["checkpoint"]), f"<checkpoint>/{name}")
    outputs = record.get("outputs")
    found = []
    if isinstance(outputs, dict):
        for value in outputs.values():
            found += [value] if isinstance(value, str) else [v for v in value or () if isinstance(v, str)]
    for obj in record.get("objects") or ():
        mesh = obj.get("mesh") if isinstance(obj, dict) else None
        if isinstance(mesh, dict) and isinstance(mesh.get("path"), str):
            found.append(mesh["path"])
    for n, value in enumerate(dict.fromkeys(found), start=1):
        paths.setdefault(value, f"<{case}>/output-{n}{_suffix(value)}")


def _collect_dicom(node: Any, secrets: set[str]) -> None:
    """Delete DICOM identity attributes anywhere, remembering their values; blank the UIDs."""
    if isinstance(node, dict):
        for key in list(node):
            low = str(key).lower()
            if low in DICOM_IDENTITY_KEYS:
                value = node.pop(key)
                if low not in _NOT_SEARCHED:
                    secrets.update(_variants(value))
            elif low in UID_KEYS and node[key] is not None:
                secrets.update(_variants(node[key]))
                node[key] = REMOVED
            else:
                _collect_dicom(node[key], secrets)
    elif isinstance(node, list):
        for item in node:
            _collect_dicom(item, secrets)


def _kept_ids(results: dict[str, Any]) -> set[str]:
    """The pseudonyms themselves, which must not be scrubbed out of their own fields."""
    ids = set()
    for study in results.get("studies") or ():
        if isinstance(study, dict):
            ids.update(str(study[k]) for k in ("case_id", "patient_id") if study.get(k))
    return ids


def _searchable(text: str) -> bool:
    """Long enough to search for without erasing ordinary words or numbers (a 5+ digit number, a 3+ letter word)."""
    return len(text) >= 5 if text.isdigit() else len(text) >= 3


def _identifying_column(column: Any) -> bool:
    key = re.sub(r"[^a-z0-9]", "", str(column).lower())
    return any(word in key for word in IDENTIFYING_COLUMN_WORDS)


def _variants(value: Any) -> set[str]:
    """A value and the forms it takes elsewhere: name parts, a date with and without separators."""
    if isinstance(value, dict):
        return set().union(*(_variants(v) for v in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(_variants(v) for v in value)) if value else set()
    if value is None or isinstance(value, bool):
        return set()
    text = str(value).strip()
    if not text:
        return set()
    found = {text}
    parts = [p for p in re.split(r"[\^\s,_;]+", text) if len(p) >= 3]
    if len(parts) > 1:
        found.update(parts)
    date = _DATE.match(text)
    if date:
        found.add("".join(date.groups()))
    if re.fullmatch(r"\d{8}", text):
        found.add(f"{text[:4]}-{text[4:6]}-{text[6:]}")
    return found


def _looks_like_path(text: str) -> bool:
    return bool(_ABSOLUTE_PATH.fullmatch(text.strip())) or ("/" in text or "\\" in text) and "." in text


def _basename(path: str) -> str:
    return PureWindowsPath(path).name if "\\" in path else PurePosixPath(path).name


def _suffix(path: Any) -> str:
    """``.nii.gz``, ``.seg.nrrd``, ``.json``... of a path (a DICOM folder has none)."""
    from ..io._atomic import full_suffix

    suffix = full_suffix(_basename(str(path)))
    return suffix if re.fullmatch(r"(\.[A-Za-z0-9]{1,8}){1,2}", suffix or "") else ""


class _Scrubber:
    """Replace known paths, identity strings and left-over absolute paths in every string."""

    def __init__(self, paths: dict[str, str], secrets: set[str], *, fallback: bool = True) -> None:
        self.fallback = fallback
        self.paths = sorted(paths.items(), key=lambda kv: -len(kv[0]))
        words = sorted(secrets, key=len, reverse=True)
        # whole values anywhere; name parts only as words (letters/digits around them would be another word)
        whole = [re.escape(w) for w in words if len(w) >= 4 or not w.isalpha()]
        parts = [re.escape(w) for w in words if w.isalpha()]
        pattern = "|".join([*(f"(?:{w})" for w in whole), *(rf"(?<![A-Za-z0-9])(?:{w})(?![A-Za-z0-9])" for w in parts)])
        self.secret = re.compile(pattern, re.IGNORECASE) if pattern else None

    def __call__(self, node: Any) -> Any:
        if isinstance(node, dict):
            return {key: self(value) for key, value in node.items()}
        if isinstance(node, list):
            return [self(v) for v in node]
        if isinstance(node, str):
            return self.text(node)
        return node

    def text(self, text: str) -> str:
        for path, placeholder in self.paths:
            if path in text:
                text = text.replace(path, placeholder)
        if self.fallback:
            text = _ABSOLUTE_PATH.sub("<path>", text)
        if self.secret is not None:
            text = self.secret.sub(REMOVED, text)
        return text
