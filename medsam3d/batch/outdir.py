"""The batch's output folder: one batch at a time, staging, and a study's folder swapped in whole."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import BatchError
from .store import ResultStore
from .worker import LABELS_NRRD

#: the file that marks a study folder as the batch's own (only such a folder is ever replaced)
STUDY_MARKER = ".medsam3d-study"


def prepare_outdir(outdir: Path) -> None:
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchError(f"expected a writable output folder, found '{outdir}' cannot be created ({exc.strerror}); "
                         "choose another -o") from None
    if not os.access(outdir, os.W_OK):
        raise BatchError(f"expected a writable output folder, found '{outdir}' read-only; choose another -o")


def clean_staging(outdir: Path) -> None:
    staging = outdir / ".staging"
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)


def open_store(outdir: Path) -> ResultStore:
    import sqlite3

    path = outdir / "results.sqlite"
    try:
        return ResultStore(path)
    except sqlite3.DatabaseError as exc:
        raise BatchError(f"expected the batch's results database at {path}, found a file SQLite cannot use ({exc}); "
                         "move it away or choose another -o") from None


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a directory's entries are synced by syncing the directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutdirLock:
    """One batch at a time per output folder (an advisory lock, released when the process dies)."""

    def __init__(self, outdir: Path):
        self.path = outdir / ".lock"
        self.handle = None

    def __enter__(self):
        import fcntl

        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise BatchError(f"expected no other batch writing to '{self.path.parent}', found one running; "
                             "wait for it or choose another -o") from None
        return self

    def __exit__(self, *exc):
        self.handle.close()


def place_study(outdir: Path, case_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """Write a study's files into a staging folder, then swap it in for the study's folder whole.

    A folder of that name is replaced only if the batch wrote it (it holds :data:`STUDY_MARKER`):
    an output folder that also holds data never loses a folder that is not the batch's."""
    final = outdir / case_id
    if final.exists() and not (final / STUDY_MARKER).is_file():
        raise BatchError(f"'{final}' exists and was not written by medsam3d batch; move it away or choose another -o")
    staging = outdir / ".staging" / f"{case_id}.{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    for rel, data in {**result["files"], STUDY_MARKER: b"written by medsam3d batch\n"}.items():
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    old = outdir / ".staging" / f"{case_id}.old.{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    _fsync_dir(outdir)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    names = sorted(result["files"])
    record = result["record"]
    overlays = record.pop("batch_files", {}).get("overlays", [])
    prefix = f"{case_id}/"
    files = {"labels": prefix + LABELS_NRRD, "nifti": _rel(prefix, "labels.nii.gz", names),
             "dicom_seg": _rel(prefix, "seg.dcm", names), "sr": _rel(prefix, "sr.dcm", names),
             "rtstruct": _rel(prefix, "rtstruct.dcm", names), "record": prefix + "record.json",
             "measurements": prefix + "measurements.csv",
             "meshes": [prefix + n for n in names if n.startswith("meshes/")],
             "snapshot": _rel(prefix, "snapshot.png", names),
             "overlays": [{**o, "path": prefix + o["path"]} for o in overlays]}
    if result.get("transfer") is not None:
        files["transfer"] = result["transfer"]
    return files


def _rel(prefix: str, name: str, names: list[str]) -> str | None:
    return prefix + name if name in names else None


