"""Uploaded volumes: the file's name, a zipped DICOM series checked before it is unpacked, the load.

The server writes an upload only inside its own temporary folder, under a name it makes
(``upload.nii.gz``...): the client's ``X-Filename`` gives the suffix (the format) and nothing
else. A zip is checked from its central directory before any byte is unpacked: the number of
entries, their total uncompressed size, and their names (an absolute path, a drive letter or
a ``..`` part refuses the whole archive, so do symbolic links and encrypted entries). Its files
are then unpacked flat under numbered names, with the bytes actually written counted against
the sizes the directory claims. The voxel count a header states is checked before the voxels
are read (NIfTI, NRRD, MetaImage, MGH, a DICOM series' rows x columns x frames), and again once
loaded.

An upload is one file: nothing it names is read. A detached header (``.nhdr``, ``.mhd``,
``.hdr``/``.img``) is refused by its suffix, and a NRRD whose header has a data file field
(``data file:``, ``datafile:``, a LIST or a pattern) or a MetaImage whose ``ElementDataFile``
is not ``LOCAL`` is refused before any reader opens it: those name another file, which the
reader would open on the server's disk.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import stat
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import VolumeIOError
from ..volume import Volume

log = logging.getLogger(__name__)

#: the suffixes an upload may have (a single file holding one volume, or a zip of one DICOM series)
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mgz", ".mgh", ".zip")
#: the suffixes of a header whose voxels are in another file: never uploadable (one file per upload)
DETACHED_SUFFIXES = (".nhdr", ".mhd", ".hdr", ".img", ".hdr.gz", ".img.gz", ".raw", ".zraw")
#: the most bytes of a NRRD or MetaImage text header read (a longer one is refused)
MAX_HEADER_BYTES = 1 << 20


class UploadTooLarge(VolumeIOError):
    """An upload over one of the server's size limits (bytes, unpacked bytes, files, voxels): HTTP 413."""


class UploadTimeout(VolumeIOError):
    """An upload whose body stopped coming for longer than the server waits: HTTP 408."""


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
    for suffix in DETACHED_SUFFIXES:
        if name.endswith(suffix):
            raise VolumeIOError(f"expected a volume in one file, found a detached header or data file ({suffix}); "
                                "convert it to .nrrd, .mha or .nii.gz first (e.g. medsam3d convert)")
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
        _check_header_claim(path, suffix, max_voxels)  # also refuses a header naming another file
        volume = load(path)
    _check_voxels(int(volume.array.size), max_voxels)
    return volume


def _check_voxels(count: int, max_voxels: int) -> None:
    if count > max_voxels:
        raise UploadTooLarge(f"expected at most {max_voxels} voxels, found {count}; crop or resample the volume "
                             "first, or start the server with a larger --max-voxels")


def _check_header_claim(path: Path, suffix: str, max_voxels: int) -> None:
    """The voxel count a NIfTI, NRRD, MetaImage or MGH header states, checked before the voxels are
    read; a NRRD or MetaImage header that names a data file of its own is refused (see the module
    docstring)."""
    count = None
    if suffix in (".nii", ".nii.gz", ".mgz", ".mgh"):
        import nibabel as nib

        try:
            shape = nib.load(str(path)).header.get_data_shape()
        except Exception:  # noqa: BLE001 - any unreadable header: load() says what is wrong with it
            return
        count = _product(shape)
    elif suffix in (".nrrd", ".mha"):
        with open(path, "rb") as handle:
            nrrd = handle.read(4) == b"NRRD"  # ITK picks its reader by the content as well as the name
        if nrrd:
            fields = _text_header(path, "NRRD")
            if any(key.replace(" ", "") == "datafile" for key in fields):
                raise VolumeIOError("expected a NRRD holding its own voxels, found a header naming a data file "
                                    "(data file:); upload the volume as one file (.nrrd with attached data)")
            from ..io._guard import nrrd_claim

            claim = nrrd_claim(path)
            if claim is not None:
                count = _product(max(int(n), 0) for n in claim[0])
        else:
            fields = _text_header(path, "MetaImage")
            data_file = fields.get("elementdatafile")
            if data_file is not None and data_file.upper() != "LOCAL":
                raise VolumeIOError("expected a MetaImage holding its own voxels (ElementDataFile = LOCAL), found a "
                                    "header naming another file; upload the volume as one .mha file")
            try:
                sizes = [int(v) for v in fields.get("dimsize", "").split()]
                channels = int((fields.get("elementnumberofchannels") or "1").split()[0])
            except (ValueError, IndexError):
                sizes, channels = [], 1
            if sizes:
                count = _product(max(n, 0) for n in sizes) * max(channels, 1)
    if count is not None:
        _check_voxels(count, max_voxels)


def _product(values) -> int:
    out = 1
    for n in values:
        out *= int(n)
    return out


def _text_header(path: Path, kind: str) -> dict[str, str]:
    """The fields of a NRRD (``key: value``, to its blank line) or MetaImage (``Key = Value``, to
    ``ElementDataFile``, which ends it) text header: keys lower-cased, values stripped, the first of
    a repeated key kept; a header over :data:`MAX_HEADER_BYTES` is refused."""
    fields: dict[str, str] = {}
    read = 0
    with open(path, "rb") as handle:
        for n in itertools.count():
            raw = handle.readline(MAX_HEADER_BYTES + 1 - read)
            if not raw:
                break
            read += len(raw)
            if read > MAX_HEADER_BYTES:
                raise VolumeIOError(f"expected a {kind} header of at most {MAX_HEADER_BYTES >> 20} MB, found a longer "
                                    "one; check the file")
            line = raw.decode("latin-1").rstrip("\r\n")
            if kind == "NRRD":
                if n == 0:
                    continue  # the magic (NRRD000X): the reader checks it
                if not line.strip():
                    break  # the end of the header: the data follows
                if line.startswith("#"):
                    continue
                key, sep, value = line.partition(":")
                if not sep:
                    continue
                key = key.strip().lower()
            else:
                key, sep, value = line.partition("=")
                if not sep:
                    continue
                key = key.strip().lower()
            fields.setdefault(key, value.lstrip("=").strip())  # a NRRD key:=value pair keeps its key
            if kind != "NRRD" and key == "elementdatafile":
                break  # the data follows it
    return fields


def _check_dicom_claim(folder: Path, series_uid: str | None, max_voxels: int) -> None:
    """Rows x columns x frames of the series to load (or of the largest one), from the headers only."""
    from ..io import list_dicom_series

    series = list_dicom_series(folder)
    chosen = [s for s in series if series_uid is None or s.uid == series_uid]
    counts = [int(s.rows or 0) * int(s.columns or 0) * int(s.frames or 0) for s in chosen]
    if counts:
        _check_voxels(max(counts), max_voxels)


async def receive_upload(request, path: Path, limit: int, disconnect: type[Exception], idle_s: float) -> int:
    """Stream the request's body into ``path`` (a new file), stopping at ``limit`` bytes (413), or when
    no byte came for ``idle_s`` seconds (408)."""
    size = 0
    try:
        with open(path, "xb") as out:
            stream = request.stream().__aiter__()
            while True:
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), idle_s)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise UploadTimeout(f"expected the upload's bytes to keep coming, found none for {idle_s:g} s "
                                        f"(after {size >> 20} MB); send it again") from None
                size += len(chunk)
                if size > limit:  # the middleware reads and drops what follows (see .guard)
                    raise UploadTooLarge(f"expected an upload of at most {limit >> 20} MB, found more; start the "
                                         "server with a larger --max-upload-mb, or crop the volume")
                out.write(chunk)
    except disconnect:
        raise VolumeIOError("expected the whole upload, found the connection closed before its end") from None
    if size == 0:
        raise VolumeIOError("expected the bytes of a volume in the request's body, found an empty body")
    return size
