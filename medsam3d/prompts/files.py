"""Prompts from a file (JSON version 1 or 2, or a Slicer ``.mrk.json``) or from whatever the API accepts."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any, Iterable

from ..errors import PromptError
from ..volume import Volume
from .parse import parse_prompts
from .types import ObjectPrompt

MAX_PROMPT_FILE_BYTES = 16 * 1024 * 1024  # a prompt file is a few kB; Slicer markups with many points stay far below


def load_prompts(path: str | Path, volume: Volume) -> list[ObjectPrompt]:
    """Read and validate a prompt file (JSON version 1 or 2, or a Slicer ``.mrk.json``)."""
    import errno
    import os

    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        found = {errno.ENOENT: "nothing; check the path", errno.ELOOP: "a loop of symbolic links; fix the links",
                 errno.ENAMETOOLONG: "a path too long for this system; use a shorter one",
                 errno.ENOTDIR: "nothing (a part of the path is a file); check the path"}.get(
            exc.errno, f"it unreadable ({exc.strerror or type(exc).__name__})")
        raise PromptError(f"expected a prompt JSON file at {path}, found {found}") from None
    if not stat.S_ISREG(info.st_mode):
        raise PromptError(f"expected a prompt JSON file at {path}, found "
                          f"{'a folder' if stat.S_ISDIR(info.st_mode) else 'a device, pipe or socket'}; "
                          "give the file's path")
    if info.st_size > MAX_PROMPT_FILE_BYTES:
        raise PromptError(f"expected a prompt JSON file of a few kB at {path}, found {info.st_size / 1e6:.0f} MB; "
                          "check that this is the prompt file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptError(f"expected a prompt file in UTF-8 text at {path}, found bytes that are not "
                          f"(at byte {exc.start}); save it as UTF-8 JSON") from None
    except OSError as exc:
        raise PromptError(f"expected a readable prompt file at {path}, found it unreadable "
                          f"({exc.strerror or type(exc).__name__})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptError(f"expected valid JSON in {path}, found a syntax error ({exc}); fix the file") from None
    except (ValueError, RecursionError) as exc:  # an integer of > 4300 digits, nesting deeper than Python's stack
        what = "nesting too deep to read" if isinstance(exc, RecursionError) else " ".join(str(exc).split())[:120]
        raise PromptError(f"expected a prompt JSON document in {path}, found {what}; fix the file") from None
    return parse_prompts(data, volume, source=path.name)


def prompts_from(spec: Iterable[dict[str, Any]] | dict[str, Any] | list[ObjectPrompt] | str | Path, volume: Volume
                 ) -> list[ObjectPrompt]:
    """Accept parsed ObjectPrompts, a prompt document, a list of entries, or the path of a prompt
    file (version 1 or 2, or a Slicer ``.mrk.json``)."""
    if spec is None:
        raise PromptError("expected prompts (a prompt document, a list of entries or of ObjectPrompt, or a "
                          "prompt file's path), found None")
    if isinstance(spec, (str, Path)) or hasattr(spec, "__fspath__"):
        return load_prompts(Path(spec), volume)
    if isinstance(spec, list) and spec and all(isinstance(o, ObjectPrompt) for o in spec):
        return spec  # type: ignore[return-value]
    if not isinstance(spec, dict) and (isinstance(spec, bytes) or not hasattr(spec, "__iter__")):
        raise PromptError(f"expected prompts as a prompt document (dict), a list of entries or a prompt file's "
                          f"path, found {type(spec).__name__}")
    return parse_prompts(spec if isinstance(spec, dict) else list(spec), volume)
