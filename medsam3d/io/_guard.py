"""Checks made before a file is read: the path itself, and the size a header claims.

A header can claim any size (a corrupt or hostile file: 100000^3 voxels in a 1 kB file);
reading it would try to allocate that much memory, so the claim is checked first against
what the file can hold (raw: its bytes; compressed: deflate's largest ratio, 1032:1) and
against the memory this process may use (physical memory, a cgroup limit or ``RLIMIT_AS``).
"""

from __future__ import annotations

import contextlib
import errno
import math
import numbers
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import VolumeIOError

#: deflate (gzip, zlib) cannot expand data by more than 1032:1; bzip2 and others stay well below 1:10^6
COMPRESSION_LIMIT = {"gzip": 1032, "zlib": 1032, "bzip2": 1_000_000, "other": 1_000_000}


def check_path(path: Path, what: str = "an image file or DICOM folder") -> os.stat_result:
    """``os.stat`` of ``path``, or one line saying why it cannot be read (missing, a symbolic link
    loop, a name too long for the system, no permission, a device or pipe)."""
    try:
        info = os.stat(path)
    except ValueError:  # a NUL character
        raise VolumeIOError(f"expected {what} at a valid path, found one with a NUL character: {path!r}") from None
    except FileNotFoundError:
        if os.path.islink(path):
            raise VolumeIOError(f"expected {what} at {path}, found a symbolic link to nothing "
                                f"({os.readlink(path)}); fix the link") from None
        raise VolumeIOError(f"expected {what} at {path}, found nothing; check the path") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise VolumeIOError(f"expected {what} at {path}, found a loop of symbolic links; fix the links") from None
        if exc.errno == errno.ENAMETOOLONG:
            raise VolumeIOError(f"expected {what} at a path this system accepts, found one too long "
                                f"({len(os.fsencode(path))} bytes, or a part over 255); use a shorter path") from None
        raise VolumeIOError(f"expected {what} at {path}, found it unreadable "
                            f"({exc.strerror or type(exc).__name__}); check the path and its permissions") from None
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise VolumeIOError(f"expected {what} at {path}, found a device, pipe or socket; give a file or a folder")
    return info


def memory_limit() -> int:
    """Bytes this process may still allocate, at most: physical memory, a cgroup's limit, or
    what ``RLIMIT_AS`` leaves of the address space (whichever is smallest)."""
    limits = []
    with contextlib.suppress(ValueError, OSError, AttributeError):
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for cgroup in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            text = Path(cgroup).read_text().strip()
            if text.isdigit() and int(text) < 1 << 60:
                limits.append(int(text))
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            used = 0
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("VmSize:"):
                        used = int(line.split()[1]) * 1024
            limits.append(max(soft - used, 0))
    return min(limits) if limits else 1 << 62


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB" if n >= 1e5 else f"{int(n)} bytes"


def check_claimed_size(path: str | os.PathLike, shape: Sequence[int], itemsize: int, *,
                       data_bytes: int | None = None, compression: str | None = None,
                       loaded: Sequence[int] | None = None, loaded_itemsize: int | None = None) -> None:
    """Refuse, before any allocation, a header whose voxel count cannot be true or cannot be held.

    ``shape`` and ``itemsize``: what the header says the file stores; ``data_bytes``: the bytes the
    file has for those voxels (None: unknown); ``compression``: None for raw data, else ``gzip``,
    ``zlib``, ``bzip2`` or ``other``. ``loaded`` and ``loaded_itemsize``: the part that will be in
    memory (one volume of a 4D file, scaled values), if not all of it.
    """
    dims = [int(n) for n in shape]
    if any(n < 0 for n in dims):
        raise VolumeIOError(f"expected voxel counts >= 0 in the header of {path}, found {dims}; the file is corrupt")
    needed = math.prod(dims) * max(int(itemsize), 1)
    size = "x".join(str(n) for n in dims)
    if data_bytes is not None:
        room = data_bytes if compression is None else data_bytes * COMPRESSION_LIMIT.get(compression, 10**6)
        if needed > room:
            held = f"{_gb(data_bytes)} of {'compressed ' if compression else ''}voxel data"
            raise VolumeIOError(f"expected the {size} voxels the header of {path} claims ({_gb(needed)}), found "
                                f"{held}, which cannot hold them; the file is truncated or its header is corrupt")
    in_memory = math.prod(int(n) for n in (loaded if loaded is not None else dims)) * \
        max(int(loaded_itemsize or itemsize), 1)
    available = memory_limit()
    if in_memory > available:
        raise VolumeIOError(f"expected an image that fits in memory, found a header in {path} claiming {size} "
                            f"voxels ({_gb(in_memory)}, more than the {_gb(available)} this process may use); "
                            "check the file, or crop or downsample it first")


def choose_volume(path: str | os.PathLike, shape: Sequence[int], volumes: int, volume_index: int | None, *,
                  labels: bool = False, what: str = "volumes") -> int | None:
    """Which volume of a file with ``volumes`` 3D volumes to read (None: the file is 3D), or one
    line: a 2D image, a 4D file without ``volume_index``, an index out of range or given for a 3D file."""
    dims = "x".join(str(int(n)) for n in shape)
    if len(shape) < 3:
        raise VolumeIOError(f"expected a 3D volume, found a {len(shape)}D image ({dims}) in {path}; medsam3d "
                            "segments 3D volumes (stacks of slices): give the whole series, as a DICOM folder or "
                            "a 3D file")
    if volume_index is not None and (isinstance(volume_index, bool) or not isinstance(volume_index, numbers.Integral)):
        raise VolumeIOError(f"expected the volume index as a whole number, found {volume_index!r}")
    if volumes <= 1:
        if volume_index is not None:
            raise VolumeIOError(f"expected --volume (volume_index) only with a 4D file, found a single 3D volume "
                                f"({dims}) in {path}; drop --volume")
        return None
    if labels:
        raise VolumeIOError(f"expected a 3D label map, found {volumes} {what} in {path} ({dims}); give a single "
                            "label map (one label value per voxel)")
    if volume_index is None:
        raise VolumeIOError(f"expected one 3D volume, found {volumes} {what} in {path} ({dims}); choose one with "
                            f"--volume N, N in 0..{volumes - 1} (volume_index=N in Python)")
    if not 0 <= int(volume_index) < volumes:
        raise VolumeIOError(f"expected --volume within 0..{volumes - 1} for the {volumes} {what} in {path}, "
                            f"found {volume_index}")
    return int(volume_index)


# ---------------------------------------------------------------------- non-UTF-8 paths for C++ libraries
def is_utf8(path: str | os.PathLike) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@contextlib.contextmanager
def utf8_readable(path: str | os.PathLike) -> Iterator[str]:
    """A UTF-8 path for reading ``path`` with a C++ library: ITK aborts the process (a C++
    exception) on a name that is not valid UTF-8 and VTK raises UnicodeEncodeError, so such a path
    is reached through a symbolic link with a clean name (to the folder when only the folder's name
    is the problem, so that detached data files resolve)."""
    if is_utf8(path):
        yield str(path)
        return
    path = Path(os.path.abspath(path))
    folder = tempfile.mkdtemp(prefix="medsam3d-path-")
    try:
        if is_utf8(path.name):
            os.symlink(path.parent, os.path.join(folder, "d"))
            yield os.path.join(folder, "d", path.name)
        else:
            link = os.path.join(folder, "image" + "".join(s for s in path.suffixes[-2:] if is_utf8(s)))
            os.symlink(path, link)
            yield link
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def utf8_writable(path: str | os.PathLike) -> Iterator[str]:
    """A UTF-8 path for writing ``path`` with a C++ library (see :func:`utf8_readable`): the file is
    written under a clean name in a temporary folder and moved onto ``path`` afterwards."""
    if is_utf8(path):
        yield str(path)
        return
    folder = tempfile.mkdtemp(prefix="medsam3d-path-")
    try:
        suffix = "".join(s for s in Path(path).suffixes[-2:] if is_utf8(s))
        clean = os.path.join(folder, "image" + suffix)
        yield clean
        shutil.move(clean, os.fspath(path))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------- NRRD / MetaImage headers
_NRRD_ENCODING = {"raw": None, "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}


def header_data_bytes(path: Path) -> tuple[int | None, str | None]:
    """(bytes available for voxels, compression) of a NRRD or MetaImage file, from its header;
    ``(None, None)`` when the header names no single data file this can size (lists, patterns)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
    except OSError:
        return None, None
    text = head.decode("latin-1")
    if text.startswith("NRRD"):
        end = re.search(r"\r?\n\r?\n", text)
        header = text[: end.start()] if end else text
        fields = {}
        for line in header.splitlines()[1:]:
            if ":" in line and not line.startswith("#"):
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.lstrip("=").strip()
        encoding = fields.get("encoding", "raw").lower()
        compression = _NRRD_ENCODING.get(encoding, "other") if encoding in _NRRD_ENCODING else None
        if encoding not in _NRRD_ENCODING:
            return None, None  # ascii/hex: text, bigger than the voxels; not sized here
        data_file = fields.get("data file") or fields.get("datafile")
        if data_file is None:
            if end is None:
                return 0, compression
            return max(path.stat().st_size - len(text[: end.end()].encode("latin-1")), 0), compression
        return _detached_size(path, data_file), compression
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            break
    if "elementdatafile" not in fields:
        return None, None
    compression = "zlib" if fields.get("compresseddata", "").lower() == "true" else None
    data_file = fields["elementdatafile"]
    if data_file.upper() == "LOCAL":
        marker = re.search(r"ElementDataFile\s*=\s*LOCAL\r?\n", text, re.IGNORECASE)
        offset = len(text[: marker.end()].encode("latin-1")) if marker else len(head)
        return max(path.stat().st_size - offset, 0), compression
    return _detached_size(path, data_file), compression


def nrrd_claim(path: Path) -> tuple[list[int], int] | None:
    """(sizes, bytes per value) a NRRD header states, or None when it states no readable sizes."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(1 << 16).decode("latin-1")
    except OSError:
        return None
    end = re.search(r"\r?\n\r?\n", text)
    fields = dict((k.strip().lower(), v.strip()) for k, _, v in
                  (line.partition(":") for line in (text[: end.start()] if end else text).splitlines()[1:]))
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
    except (KeyError, ValueError):
        return None
    kind = fields.get("type", "").lower()
    size = 1 if ("char" in kind or "8" in kind) else 2 if ("short" in kind or "16" in kind) else \
        8 if ("long" in kind or "64" in kind or "double" in kind) else 4
    return sizes, size


def _detached_size(header: Path, data_file: str) -> int | None:
    if data_file.upper().startswith("LIST") or "%" in data_file:
        return None
    target = Path(data_file) if os.path.isabs(data_file) else header.parent / data_file
    try:
        return target.stat().st_size
    except OSError:
        return None  # a missing data file: the reader says so
