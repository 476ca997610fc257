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
    """Refuse, before any work, an output path that cannot be written: a folder, one in a missing
    folder, or one in a folder where no file can be created (read-only mounts such as /sys or
    /proc, permissions). The folder is tested by creating and removing a temporary file in it,
    which also holds for root, whom permission bits do not stop.

    Returns the folder the file goes to.
    """
    import tempfile

    path = Path(path)
    if path.is_dir():
        raise VolumeIOError(f"expected an output file path, found a folder at {path}; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise VolumeIOError(f"expected an existing output folder, found none at {parent}; create it first")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".medsam3d-write-test-"):
            pass
    except OSError as exc:
        raise VolumeIOError(f"expected a folder where files can be written, found {parent} "
                            f"({exc.strerror or type(exc).__name__}); choose another output folder") from None
    return parent


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path with the same suffix; on success move it onto ``path``.

    On any failure the temporary file is removed and ``path`` is left untouched, so a
    failed write never leaves a half-written output.
    """
    with OutputSet() as outputs:
        tmp = outputs.staged(path)
        yield tmp
        outputs.commit()


class OutputSet:
    """Outputs written together or not at all.

    ``staged(path)`` gives a temporary path beside ``path`` (same suffix, so writers pick the
    format from it); :meth:`commit` moves every staged file onto its final path, and a failure
    before it removes them all, leaving no output of the run behind. The moves happen after
    every writer succeeded, so the window for a partial set is a few renames.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []

    def staged(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        parent = check_output_path(path)
        suffix = full_suffix(path)
        stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
        tmp = parent / f".{stem}.{uuid.uuid4().hex[:8]}.tmp{suffix}"
        self._staged.append((tmp, path))
        return tmp

    def commit(self) -> list[Path]:
        missing = [tmp for tmp, _ in self._staged if not tmp.exists()]
        if missing:
            raise VolumeIOError(f"expected the writer to create {missing[0]}, found nothing")
        for n, (tmp, final) in enumerate(self._staged):
            try:
                os.replace(tmp, final)
            except OSError as exc:
                moved = ", ".join(str(f) for _, f in self._staged[:n]) or "none"
                raise VolumeIOError(f"expected to move {tmp.name} onto {final}, found {exc.strerror or exc}; "
                                    f"written before the failure: {moved}") from None
        done = [final for _, final in self._staged]
        self._staged = []
        return done

    def discard(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._staged = []

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()  # after commit() nothing is left to discard
