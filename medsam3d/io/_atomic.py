"""Atomic output: write to a temporary file beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

from ..errors import VolumeIOError


def full_suffix(path: str | os.PathLike) -> str:
    """``.nii.gz``, ``.seg.nrrd``, ``.nrrd``... (the double suffixes medical formats use)."""
    name = Path(path).name.lower()
    for double in (".nii.gz", ".seg.nrrd", ".seg.nhdr"):
        if name.endswith(double):
            return double
    return Path(path).suffix.lower()


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse, before any work, an output path that cannot be written: a folder, or one in a missing folder.

    Returns the folder the file goes to.
    """
    path = Path(path)
    if path.is_dir():
        raise VolumeIOError(f"expected an output file path, found a folder at {path}; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise VolumeIOError(f"expected an existing output folder, found none at {parent}; create it first")
    return parent


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path with the same suffix; on success move it onto ``path``.

    On any failure the temporary file is removed and ``path`` is left untouched, so a
    failed write never leaves a half-written output.
    """
    path = Path(path)
    parent = check_output_path(path)
    suffix = full_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = parent / f".{stem}.{uuid.uuid4().hex[:8]}.tmp{suffix}"
    try:
        yield tmp
        if not tmp.exists():
            raise VolumeIOError(f"expected the writer to create {tmp}, found nothing")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
