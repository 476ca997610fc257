"""What the sub-commands share: the option value types, the one-line error, ``--image``."""

from __future__ import annotations

import argparse
import sys


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, found {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, found {text!r}")
    return value


def _image(args: argparse.Namespace):
    """The ``--image`` of mesh, measure and render (its ``--volume`` for a 4D one), or None."""
    from ..errors import Medsam3dError
    from ..io import load

    if args.image is None:
        if args.volume_index is not None:
            raise Medsam3dError("expected --volume with --image (it picks a volume of the image), found no --image")
        return None
    return load(args.image, volume_index=args.volume_index)


def _one_line(message: str) -> str:
    """``message`` as one printable line: line breaks (a path may hold one) and bytes that are not
    UTF-8 (an undecodable file name) escaped."""
    text = str(message).encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _fail(message: str) -> int:
    print(f"medsam3d: error: {_one_line(message)}", file=sys.stderr)
    return 2
