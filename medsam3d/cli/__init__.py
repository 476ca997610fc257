"""The ``medsam3d`` command line: a thin layer over the Python API.

Exit codes: 0 success; 2 bad input (a one-line message on stderr); 1 unexpected error
(traceback with ``--debug``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from ..errors import Medsam3dError
from ._common import _fail, _non_negative_float, _non_negative_int, _one_line, _positive_int
from .batch import _cmd_batch, _cmd_batch_plan
from .detect import add_detect_arguments, add_segment_text_arguments
from .inspect import _cmd_info, _cmd_measure
from .segment import _cmd_segment
from .serve import _cmd_serve, add_serve_arguments
from .surfaces import _cmd_mesh, _cmd_render


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, like every bad input
        self.exit(2, f"medsam3d: error: {message} (see '{self.prog} --help')\n")


def _get_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..io import MAX_LABELS
    from ..preprocess import CT_WINDOWS, MODALITIES

    parser = _Parser(prog="medsam3d", description="Prompt-driven 3D segmentation and tumour volumetry.")
    parser.add_argument("--version", action="version", version=f"medsam3d {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("info", help="describe an image file or DICOM folder")
    p.add_argument("path", type=Path, help="NIfTI/MGH/NRRD/MHA file or DICOM folder")
    p.add_argument("--series", dest="series_uid", help="SeriesInstanceUID to describe in a DICOM folder")
    p.add_argument("--volume", dest="volume_index", type=_non_negative_int, metavar="N",
                   help="the volume to describe in a 4D file or a DICOM series holding several (0 = the first)")
    p.add_argument("--allow-tilt", action="store_true", help="accept gantry-tilted series (exact sheared grid)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("segment", help="segment prompted objects in 3D and write a label map")
    p.add_argument("input", type=Path, help="NIfTI/NRRD/MHA file or DICOM folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, help="prompt JSON file (version 1 or 2), or a 3D Slicer markups file "
                                                  "(.mrk.json) with ROIs")
    src.add_argument("--box", action="append", metavar="I0,J0,I1,J1@K[:Z0..Z1]",
                     help="box on slice K in voxel indices, optionally with the object's slice range Z0..Z1 "
                          "(repeatable: one object each)")
    src.add_argument("--box-ras", action="append", metavar="R0,A0,S0,R1,A1,S1",
                     help="3D box by two opposite corners in RAS mm, as a Slicer ROI (repeatable: one object each)")
    add_segment_text_arguments(src, p)
    p.add_argument("-o", "--output", type=Path, required=True, help="label map: .nii.gz, .nrrd, .seg.nrrd or .dcm (SEG)")
    p.add_argument("--json", dest="report", type=Path, help="write the case record (JSON, see the report schema) here")
    p.add_argument("--mesh", type=Path, help="write each object's surface (RAS mm): .stl, .obj, .ply or .vtp")
    p.add_argument("--picture", type=Path, help="write a PNG of the surfaces")
    p.add_argument("--rtstruct", type=Path, help="write the contours as a DICOM RTSTRUCT (.dcm; a DICOM input)")
    p.add_argument("--sr", type=Path, help="write the measurements as a DICOM SR (TID 1500, .dcm) referencing the "
                                         "DICOM SEG of -o NAME.dcm (a DICOM input)")
    p.add_argument("--case-id", help="an identifier recorded in the report")
    p.add_argument("--model", default="litemedsam", help="litemedsam (default, bundled), medsam, sam-vit-b/l/h")
    p.add_argument("--checkpoint", type=Path, help="weights file (required for medsam and sam-*)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint that only loads by unpickling Python objects (this runs code from the "
                        "file: only for checkpoints from a source you trust; recorded in the report)")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="cap the CPU threads used (torch, ONNX Runtime)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--window", help=f"CT preset ({', '.join(CT_WINDOWS)}), LEVEL,WIDTH in HU, percentile (MR's "
                                   "clipping) or roi (fitted to the intensities inside the prompt boxes)")
    p.add_argument("--modality", choices=MODALITIES, type=str.upper,
                   help="override the modality found in the header/intensities (every one but CT gets percentile "
                        "clipping)")
    p.add_argument("--overlap", default="score", choices=["score", "first", "last", "error"],
                   help="who gets a voxel two objects claim: the higher model score (default), the first or last "
                        "object, or stop with an error")
    p.add_argument("--series", dest="series_uid", help="SeriesInstanceUID when the folder holds several series")
    p.add_argument("--volume", dest="volume_index", type=_non_negative_int, metavar="N",
                   help="the volume to segment in a 4D file or a DICOM series holding several (0 = the first; "
                        "without it such an input is refused with its number of volumes)")
    p.add_argument("--allow-tilt", action="store_true", help="accept gantry-tilted series (exact sheared grid)")
    p.add_argument("--no-zoom", action="store_true", help="encode whole slices, never a crop around the prompts "
                   "(by default the crop is kept only where it segments the prompted slices as well: the guide's "
                   "engine page)")
    p.add_argument("--stride", type=_positive_int, metavar="N",
                   help="encode every N-th slice first and interpolate smooth stretches between them "
                        "(default 3, 4 with --fast; 1: segment every slice)")
    p.add_argument("--blend-embeddings", action="store_true",
                   help="decode the skipped slices on blends of their neighbours' embeddings instead of encoding "
                        "them (fewer encodings on a CPU, slightly lower accuracy)")
    p.add_argument("--fast", action="store_true",
                   help="the speed preset: blended embeddings, stride 4, fewer sections with a 3D box (about half "
                        "the time of the defaults on a CPU, lower accuracy; see the guide's engine page)")
    p.add_argument("--taper", type=_non_negative_float, default=2.0, metavar="POWER",
                   help="shrink each object's end slices to what an ellipsoid of its extent could hold (a prior "
                        "for tumours; POWER 2: an ellipsoid, larger: flatter; 0 turns it off, e.g. for organs)")
    p.add_argument("--measure", action="store_true", help="add shape measurements to the report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("detect", help="propose boxes (and masks) for texts: a prompt file and Slicer ROIs to check")
    add_detect_arguments(p)

    p = sub.add_parser("batch", help="segment and measure every study of a manifest; follow-up and report",
                       description="Exit codes: 0 all done, 2 nothing run (bad manifest or options), "
                                   "3 finished with failed studies.")
    p.add_argument("manifest", type=Path, help="CSV or JSON: case_id, patient_id, timepoint, image, prompts, ...")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder (results.sqlite, report.html, "
                                                                     "a folder per study)")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="where the studies run")
    p.add_argument("--workers", type=_positive_int, default=1, metavar="N", help="worker processes or Ray actors")
    p.add_argument("--ray-address", metavar="ADDR", help="a running Ray cluster (default: start a local one)")
    p.add_argument("--force", action="store_true", help="recompute studies whose results are current")
    p.add_argument("--retry-failed", action="store_true", help="run again the studies that failed")
    p.add_argument("--model", default="litemedsam", help="litemedsam (default, bundled), medsam, sam-vit-b/l/h")
    p.add_argument("--checkpoint", type=Path, help="weights file (required for medsam and sam-*)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="CPU threads per worker")
    p.add_argument("--rtstruct", action="store_true", help="also write an RTSTRUCT for DICOM studies")
    p.add_argument("--no-register", action="store_true",
                   help="match lesions and transfer prompts in patient coordinates, without rigid registration")
    p.add_argument("--pseudonymise", action="store_true",
                   help="replace patient names and identifiers in report.html, results.csv and results.json")
    p.add_argument("--fast", action="store_true", help="the engine's speed preset (see segment --fast)")
    p.add_argument("--no-zoom", action="store_true", help="encode whole slices (see segment --no-zoom)")
    p.add_argument("--stride", type=_positive_int, metavar="N", help="see segment --stride")
    p.add_argument("--taper", type=_non_negative_float, default=2.0, metavar="POWER", help="see segment --taper")
    p.add_argument("--detector", metavar="NAME", help="the registered detector for text: prompts (default: the "
                                                      "manifest's detector column, else ct-anatomy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_batch)

    p = sub.add_parser("batch-plan", help="write a batch manifest from a folder of DICOM files (a PACS export)")
    p.add_argument("root", type=Path, help="the folder to walk (any depth)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the manifest to write (.csv)")
    p.add_argument("--force", action="store_true", help="overwrite an existing manifest (its prompts may be filled in)")
    p.set_defaults(func=_cmd_batch_plan)

    p = sub.add_parser("serve", help="an HTTP server: sessions, prompts, refines (the 3D Slicer module's backend)")
    add_serve_arguments(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("mesh", help="surface mesh of a label map in patient coordinates")
    p.add_argument("labels", type=Path, help="label map (NIfTI/NRRD/.seg.nrrd, or DICOM SEG/RTSTRUCT with --image)")
    p.add_argument("-o", "--output", type=Path, required=True, help=".stl, .obj, .ply or .vtp (with several labels, "
                                                                      "one file per label: NAME_label<N>.ext)")
    p.add_argument("--image", type=Path, help="the image the label map was drawn on (needed for DICOM SEG and "
                                              "RTSTRUCT; else checks the label map lies on its grid)")
    p.add_argument("--volume", dest="volume_index", type=_non_negative_int, metavar="N",
                   help="the volume of --image to use when it is a 4D file or a DICOM series holding several")
    p.add_argument("--label", type=int, action="append", help="label value (repeatable; default: every label)")
    p.add_argument("--space", default="RAS", choices=["RAS", "LPS"],
                   help="coordinates of the mesh's vertices in mm: RAS (default; NIfTI, 3D Slicer) or LPS (DICOM, ITK)")
    p.add_argument("--max-labels", type=_positive_int, default=MAX_LABELS, metavar="N",
                   help=f"refuse a label map with more than N distinct labels (default {MAX_LABELS}: more looks like "
                        "an image; .seg.nrrd, DICOM SEG and RTSTRUCT have no limit)")
    p.add_argument("--smooth", type=int, default=15, help="windowed-sinc smoothing iterations (0: none)")
    p.add_argument("--decimate", type=float, default=0.0, help="fraction of triangles to remove (0..1)")
    p.set_defaults(func=_cmd_mesh)

    p = sub.add_parser("measure", help="volumes, diameters and shape figures of each label and lesion")
    p.add_argument("labels", type=Path, help="label map (NIfTI/NRRD/.seg.nrrd, or DICOM SEG/RTSTRUCT with --image)")
    p.add_argument("--image", type=Path, help="image for intensity statistics (same grid)")
    p.add_argument("--volume", dest="volume_index", type=_non_negative_int, metavar="N",
                   help="the volume of --image to use when it is a 4D file or a DICOM series holding several")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--csv", action="store_true", help="print CSV")
    p.add_argument("--no-components", action="store_true", help="whole labels only, not each lesion")
    p.add_argument("--max-labels", type=_positive_int, default=MAX_LABELS, metavar="N",
                   help=f"refuse a label map with more than N distinct labels (default {MAX_LABELS}: more looks like "
                        "an image; .seg.nrrd, DICOM SEG and RTSTRUCT have no limit)")
    p.set_defaults(func=_cmd_measure)

    p = sub.add_parser("render", help="PNG pictures: 3D view of the meshes, or axial overlay with RECIST axes")
    p.add_argument("labels", type=Path, help="label map (NIfTI/NRRD/.seg.nrrd, or DICOM SEG/RTSTRUCT with --image)")
    p.add_argument("-o", "--output", type=Path, required=True, help="PNG file")
    p.add_argument("--view", choices=["3d", "axial"], default="3d",
                   help="3d: the surfaces (default); axial: the image's axial slice of largest extent with the "
                        "contour and RECIST axes")
    p.add_argument("--image", type=Path, help="image under the overlay (required for --view axial)")
    p.add_argument("--volume", dest="volume_index", type=_non_negative_int, metavar="N",
                   help="the volume of --image to use when it is a 4D file or a DICOM series holding several")
    p.add_argument("--label", type=int, default=None, help="label to draw (axial view; default: the first)")
    p.add_argument("--max-labels", type=_positive_int, default=MAX_LABELS, metavar="N",
                   help=f"refuse a label map with more than N distinct labels (default {MAX_LABELS}: more looks like "
                        "an image; .seg.nrrd, DICOM SEG and RTSTRUCT have no limit)")
    p.set_defaults(func=_cmd_render)

    return parser


_COORDINATE_OPTIONS = ("--box", "--box-ras")  # their values may start with a minus sign


def _join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--box-ras -12.5,40,...``: argparse takes a value that starts with a minus for an option and
    refuses it; join such values to their option (``--box-ras=-12.5,40,...``)."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in _COORDINATE_OPTIONS and arg.startswith("-") and (arg[1:2].isdigit() or arg[1:2] == "."):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = _get_parser()
    try:
        args = parser.parse_args(_join_negative_values(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # bad arguments (exit 2, one line already printed), --help, --version
        return int(exc.code or 0)
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is printed escaped, not an error
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a stream that cannot change its error handler now
                pass
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("highdicom", "pydicom", "nibabel"):  # nibabel prints header repairs on its own handler
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
        print(f"medsam3d: internal error: {type(exc).__name__}: {_one_line(str(exc))} (run with --debug for the "
              "traceback and report it)", file=sys.stderr)
        return 1
