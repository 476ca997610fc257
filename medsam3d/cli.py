"""The ``medsam3d`` command line: a thin layer over the Python API.

Exit codes: 0 success; 2 bad input (a one-line message on stderr); 1 unexpected error
(traceback with ``--debug``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from .errors import Medsam3dError

log = logging.getLogger("medsam3d")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, like every bad input
        self.exit(2, f"medsam3d: error: {message} (see '{self.prog} --help')\n")


def _get_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="medsam3d", description="Prompt-driven 3D segmentation and tumour volumetry.")
    parser.add_argument("--version", action="version", version=f"medsam3d {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("info", help="describe an image file or DICOM folder")
    p.add_argument("path", type=Path, help="NIfTI/NRRD/MHA file or DICOM folder")
    p.add_argument("--series", dest="series_uid", help="SeriesInstanceUID to describe in a DICOM folder")
    p.add_argument("--allow-tilt", action="store_true", help="accept gantry-tilted series (exact sheared grid)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    return parser


def _cmd_info(args: argparse.Namespace) -> int:
    from .io import list_dicom_series, load
    from .report import describe_volume

    series = None
    if args.path.is_dir():
        series = [s.as_dict() for s in list_dicom_series(args.path)]
        images = [s for s in series if s["rows"] is not None and s["modality"] not in ("RTSTRUCT", "SEG")]
        if args.series_uid is None and len(images) != 1:
            if args.json:
                print(json.dumps({"path": str(args.path), "series": series}, indent=2))
            else:
                print(f"{args.path}: {len(series)} series ({len(images)} image series); choose one with --series")
                for s in series:
                    size = f"{s['columns']}x{s['rows']}x{s['frames']}" if s["rows"] else "no pixels"
                    print(f"  {s['series_uid']}  {s['modality']:<8} {size}  {s['files']} file(s)  '{s['description']}'")
            return 0 if series else _fail(f"expected DICOM files in {args.path}, found none")
    volume = load(args.path, series_uid=args.series_uid, allow_tilt=args.allow_tilt)
    info = describe_volume(volume)
    if series is not None:
        info["series"] = series
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if key == "affine":
                print("affine (ijk -> RAS mm):")
                for row in value:
                    print("   " + "  ".join(f"{v:11.4f}" for v in row))
            elif key == "series":
                print(f"series: {len(value)} in folder")
            else:
                print(f"{key}: {value}")
    return 0


def _fail(message: str) -> int:
    print(f"medsam3d: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _get_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("highdicom", "pydicom"):
        logging.getLogger(noisy).setLevel(max(level, logging.ERROR))
    try:
        return int(args.func(args) or 0)
    except Medsam3dError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted")
    except Exception as exc:  # unexpected: a bug, say so
        if args.debug:
            raise
        print(f"medsam3d: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback "
              "and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
