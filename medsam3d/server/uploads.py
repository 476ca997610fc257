"""Uploaded volumes: the file's name, a zipped DICOM series checked before it is unpacked, the load.

The server writes an upload only inside its own temporary folder, under a name it makes
(``upload.nii.gz``...): the client's ``X-Filename`` gives the suffix (the format) and nothing
else. A zip is checked from its central directory before any byte is unpacked: the number of
entries, their total uncompressed size, and their names (an absolute path, a drive letter or
a ``..`` part refuses the whole archive, so do symbolic links and encrypted entries). Its files
are then unpacked flat under numbered names, with the bytes actually written counted against
the sizes the directory claims. The voxel count a header states is checked before the voxels
are read (NIfTI, NRRD, a DICOM series' rows x columns x frames), and again once loaded.
"""

from __future__ import annotations

import logging
import stat
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import VolumeIOError
from ..volume import Volume

log = logging.getLogger(__name__)

#: the suffixes an upload may have (a single file holding one volume, or a zip of one DICOM series)
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mgz", ".mgh", ".zip")


class UploadTooLarge(VolumeIOError):
    """An upload over one of the server's size limits (bytes, unpacked bytes, files, voxels): HTTP 413."""


def upload_suffix(filename: str | None) -> str:
    """The format an upload's ``X-Filename`` asks for (one of :data:`UPLOAD_SUFFIXES`); the rest of
    the name is not used."""
    if not filename:
        raise VolumeIOError("expected an X-Filename header naming the upload's format (name.nii.gz, name.nrrd, "
                            "name.zip of a DICOM series), found none")
    name = PureWindowsPath(PurePosixPath(filename).name).name.lower()  # the last part, whatever the separator
    if name.endswith(".seg.nrrd"):
        raise VolumeIOError("expected an image volume (NIfTI, NRRD, MetaImage, MGH or a zipped DICOM series), found "
                            "a Slicer segmentation (.seg.nrrd); upload the image the prompts are drawn on")
    for suffix in UPLOAD_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise VolumeIOError(f"expected an X-Filename ending in {', '.join(UPLOAD_SUFFIXES)}, found a name ending in "
                        f"'{Path(name).suffix or name[-12:]}'; a DICOM series is uploaded as one .zip")


def check_zip(path: Path, *, max_bytes: int, max_files: int) -> list[zipfile.ZipInfo]:
    """The file entries of a zip, refused (one line) before extraction when they could not be unpacked
    safely: more than ``max_files`` entries or ``max_bytes`` bytes uncompressed (413), an absolute or
    climbing name, a symbolic link or an encrypted entry (400)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise VolumeIOError(f"expected a zip archive of one DICOM series, found one that cannot be read "
                            f"({type(exc).__name__}); zip the series' folder again") from None
    with archive:
        infos = archive.infolist()
    if len(infos) > max_files:
        raise UploadTooLarge(f"expected at most {max_files} entries in the zip, found {len(infos)}; upload one "
                             "series at a time")
    total = 0
    files = []
    for info in infos:
        name = info.filename.replace("\\", "/")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
            raise VolumeIOError("expected relative names inside the zip, found an absolute or climbing path "
                                "(/, a drive letter or '..'); zip the series' folder itself")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise VolumeIOError("expected plain files inside the zip, found a symbolic link; zip the files themselves")
        if info.flag_bits & 0x1:
            raise VolumeIOError("expected an unencrypted zip, found an encrypted entry; zip without a password")
        if info.is_dir():
            continue
        total += info.file_size
        if total > max_bytes:
            raise UploadTooLarge(f"expected at most {max_bytes >> 20} MB once unzipped, found the zip claims more "
                                 f"({total >> 20} MB after {len(files) + 1} files); upload a smaller series")
        files.append(info)
    if not files:
        raise VolumeIOError("expected the files of one DICOM series inside the zip, found no file")
    return files


def extract_zip(path: Path, folder: Path, files: list[zipfile.ZipInfo], *, max_bytes: int) -> None:
    """Unpack ``files`` (as :func:`check_zip` returned them) flat into ``folder`` under numbered names,
    stopping at the first entry that holds more bytes than its directory claims or when the total
    passes ``max_bytes``."""
    folder.mkdir(mode=0o700)
    written = 0
    with zipfile.ZipFile(path) as archive:
        for n, info in enumerate(files):
            target = folder / f"{n:06d}.dcm"
            left = info.file_size
            try:
                with archive.open(info) as source, open(target, "xb") as out:
                    while chunk := source.read(1 << 20):
                        left -= len(chunk)
                        written += len(chunk)
                        if left < 0 or written > max_bytes:
                            raise UploadTooLarge(f"expected at most {max_bytes >> 20} MB once unzipped, found an "
                                                 "entry larger than the zip claims; upload a smaller series")
                        out.write(chunk)
            except (zipfile.BadZipFile, EOFError, NotImplementedError, ValueError, RuntimeError) as exc:
                raise VolumeIOError(f"expected a readable zip of one DICOM series, found an entry that cannot be "
                                    f"unpacked ({type(exc).__name__}: {str(exc)[:80]}); zip the series again") from None


def load_upload(path: Path, suffix: str, *, series_uid: str | None = None, max_voxels: int,
                max_unzipped_bytes: int, max_zip_files: int) -> Volume:
    """The volume of an upload saved at ``path`` (named by the server, with ``suffix``), with the
    checks of the module docstring; a zip is unpacked beside it into ``dicom/``."""
    from ..io import load

    if suffix == ".zip":
        files = check_zip(path, max_bytes=max_unzipped_bytes, max_files=max_zip_files)
        folder = path.parent / "dicom"
        extract_zip(path, folder, files, max_bytes=max_unzipped_bytes)
        path.unlink()  # the unpacked files are the input now
        _check_dicom_claim(folder, series_uid, max_voxels)
        volume = load(folder, series_uid=series_uid)
    else:
        if series_uid is not None:
            raise VolumeIOError("expected series_uid only with a zipped DICOM series, found a single-volume file; "
                                "drop series_uid")
        _check_header_claim(path, suffix, max_voxels)
        volume = load(path)
    _check_voxels(int(volume.array.size), max_voxels)
    return volume


def _check_voxels(count: int, max_voxels: int) -> None:
    if count > max_voxels:
        raise UploadTooLarge(f"expected at most {max_voxels} voxels, found {count}; crop or resample the volume "
                             "first, or start the server with a larger --max-voxels")


def _check_header_claim(path: Path, suffix: str, max_voxels: int) -> None:
    """The voxel count a NIfTI or NRRD header states, checked before the voxels are read."""
    count = None
    if suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        try:
            shape = nib.load(str(path)).header.get_data_shape()
        except Exception:  # noqa: BLE001 - any unreadable header: load() says what is wrong with it
            return
        count = 1
        for n in shape:
            count *= int(n)
    elif suffix == ".nrrd":
        from ..io._guard import nrrd_claim

        claim = nrrd_claim(path)
        if claim is not None:
            count = 1
            for n in claim[0]:
                count *= max(int(n), 0)
    if count is not None:
        _check_voxels(count, max_voxels)


def _check_dicom_claim(folder: Path, series_uid: str | None, max_voxels: int) -> None:
    """Rows x columns x frames of the series to load (or of the largest one), from the headers only."""
    from ..io import list_dicom_series

    series = list_dicom_series(folder)
    chosen = [s for s in series if series_uid is None or s.uid == series_uid]
    counts = [int(s.rows or 0) * int(s.columns or 0) * int(s.frames or 0) for s in chosen]
    if counts:
        _check_voxels(max(counts), max_voxels)
