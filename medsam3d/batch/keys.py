"""What decides whether a study is current (its key), and the order studies run in."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

from .store import ResultStore
from .worker import LABELS_NRRD, ModelSpec

def _sha256_files(paths: Iterable[Path], known: FileHashes) -> str:
    """One digest of the files' names and contents (each file's digest from ``known`` when unchanged)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + known.sha256(path).encode() + b"\n")
    return digest.hexdigest()


class FileHashes:
    """SHA-256 of files, re-read only when a file's size or modification time changed since the
    database last saw it (a batch of hundreds of large DICOM studies is not hashed again on each run)."""

    def __init__(self, store: ResultStore | None = None):
        self.store = store
        self.fresh: dict[str, tuple[int, int, str]] = {}

    def sha256(self, path: Path) -> str:
        from ..models.base import file_sha256

        info = path.stat()
        cached = self.store.file_hash(str(path)) if self.store is not None else None
        if cached is not None and cached[:2] == (info.st_size, info.st_mtime_ns):
            return cached[2]
        digest = file_sha256(path)
        self.fresh[str(path)] = (info.st_size, info.st_mtime_ns, digest)
        return digest

    def save(self) -> None:
        if self.store is not None and self.fresh:
            self.store.save_file_hashes(self.fresh)
            self.fresh = {}


def _content_hash(path: Path, known: FileHashes) -> str:
    """The content of an image file (with its detached data file) or of every file under a folder."""
    from ..record import _data_files

    try:
        if path.is_dir():
            return "dir:" + _sha256_files(sorted(p for p in path.rglob("*") if p.is_file()), known)
        if path.is_file():
            return "file:" + _sha256_files([path, *_data_files(path)], known)
    except OSError as exc:
        return f"unreadable:{path}:{exc.errno}"
    return f"missing:{path}"


def _weights_id(spec: ModelSpec, study) -> str:
    """The model's weights by hash, without loading the model."""
    from ..models.base import file_sha256

    name = study.model or spec.name
    checkpoint = str(study.checkpoint) if study.checkpoint else spec.checkpoint
    if checkpoint:
        try:
            return f"{name}:{file_sha256(checkpoint)}"
        except OSError:
            return f"{name}:missing:{checkpoint}"
    if name == "litemedsam":
        from ..models.litemedsam import bundled_checkpoint

        return f"{name}:{bundled_checkpoint()[1]}"
    return name


def study_key(study, base: dict[str, Any], keys: dict[str, str], spec: ModelSpec, *, rtstruct: bool,
               register: bool, known: FileHashes) -> str:
    """SHA-256 of everything a study's result depends on (``--rtstruct`` only for DICOM folders,
    ``--no-register`` only for prompts taken ``from:`` another study)."""
    prompts = study.prompts
    if prompts.kind in ("file", "rtstruct", "seg"):
        prompt_id = _content_hash(Path(prompts.value), known)
    elif prompts.kind == "from":
        prompt_id = "from:" + keys.get(prompts.value, "?")
    else:
        prompt_id = f"{prompts.kind}:{prompts.value}"
    parts = {**base, "image": _content_hash(Path(study.image), known), "series_uid": study.series_uid,
             "window": study.window, "modality": study.modality, "prompts": prompt_id,
             "weights": _weights_id(spec, study), "device": spec.device}
    if rtstruct and Path(study.image).is_dir():
        parts["rtstruct"] = True
    if prompts.kind == "from":
        parts["register"] = register
    if study.detector:
        parts["detector"] = study.detector
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def levels(studies: list) -> list[list]:
    """Studies in waves: those taking prompts ``from:`` another study come in a wave after it."""
    by_id = {s.case_id: s for s in studies}
    depth: dict[str, int] = {}

    def level(study, seen=()) -> int:
        if study.case_id not in depth:
            if study.prompts.kind == "from" and study.prompts.value in by_id and study.case_id not in seen:
                depth[study.case_id] = 1 + level(by_id[study.prompts.value], (*seen, study.case_id))
            else:
                depth[study.case_id] = 0
        return depth[study.case_id]

    for s in studies:
        level(s)
    waves: list[list] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for s in studies:
        waves[depth[s.case_id]].append(s)
    return waves


def source_of(study, studies: list, store: ResultStore, outdir: Path) -> dict[str, Any] | None:
    """What a ``from:`` study needs of its source: its image and its label map (None if it has none)."""
    source = next(s for s in studies if s.case_id == study.prompts.value)
    row = store.study(source.case_id)
    labels = outdir / source.case_id / LABELS_NRRD
    if row is None or row["status"] != "done" or not labels.is_file():
        return None  # the worker then fails the study with a one-line error
    return {"case_id": source.case_id, "image": str(source.image), "series_uid": source.series_uid,
            "labels": labels.read_bytes()}


def settings_json(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in options.items():
        out[k] = asdict(v) if hasattr(v, "__dataclass_fields__") else v
    return out


