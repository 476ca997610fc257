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
    from .io import MAX_LABELS
    from .preprocess import CT_WINDOWS, MODALITIES

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
    p.add_argument("-o", "--output", type=Path, required=True, help="label map: .nii.gz, .nrrd, .seg.nrrd or .dcm (SEG)")
    p.add_argument("--json", dest="report", type=Path, help="write the case record (JSON, see the report schema) here")
    p.add_argument("--mesh", type=Path, help="write each object's surface (RAS mm): .stl, .obj, .ply or .vtp")
    p.add_argument("--picture", type=Path, help="write a PNG of the surfaces")
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
    p.add_argument("--no-zoom", action="store_true", help="encode whole slices instead of a crop around the prompts "
                   "(better for organs and vessels of a few cm in a whole CT slice: see the guide's engine page)")
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


#: the text output's names of ``describe_volume``'s keys, with their units (the JSON keeps the keys)
_INFO_NAMES = {"shape": "shape (voxels i, j, k)", "spacing": "spacing (mm)", "origin": "origin (RAS mm)",
               "axcodes": "axis directions (i, j, k)", "voxel_volume_mm3": "voxel volume (mm3)",
               "intensity_range": "intensity range", "affine_source": "affine from", "volume_index": "volume"}


def _cmd_info(args: argparse.Namespace) -> int:
    from .io import list_dicom_series, load
    from .io._guard import check_path
    from .report import describe_volume

    check_path(args.path)
    series = None
    if args.path.is_dir():
        series = [s.as_dict() for s in list_dicom_series(args.path)]
        images = [s for s in series if s["rows"] is not None and s["modality"] not in ("RTSTRUCT", "SEG")]
        if not series:
            return _fail(f"expected DICOM files in {args.path}, found none")
        if args.series_uid is None and len(images) != 1:
            if args.json:
                print(json.dumps({"path": str(args.path), "series": series}, indent=2))
            else:
                print(f"{args.path}: {len(series)} series ({len(images)} image series); " + (
                    "choose one with --series" if images else "point to the folder of the image slices"))
                for s in series:
                    size = f"{s['columns']}x{s['rows']}x{s['frames']}" if s["rows"] else "no pixels"
                    print(f"  {s['series_uid']}  {s['modality']:<8} {size}  {s['files']} file(s)  '{s['description']}'")
            return 0
    volume = load(args.path, series_uid=args.series_uid, allow_tilt=args.allow_tilt, volume_index=args.volume_index)
    info = describe_volume(volume)
    if volume.meta.get("volume_index") is not None:
        info["volume_index"] = volume.meta["volume_index"]
    if series is not None:
        info["series"] = series
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from .preprocess import guess_modality

    modality, how = guess_modality(volume)
    for key, value in info.items():
        if key == "affine":
            print("affine (ijk -> RAS mm):")
            for row in value:
                print("   " + "  ".join(f"{v:11.4f}" for v in row))
        elif key == "series":
            print(f"series: {len(value)} in folder")
        elif key == "modality":
            print(f"modality: {modality} (from the header)" if how == "header" else
                  f"modality: {modality} (none in the file; guessed from the {how})")
        elif key == "intensity_range" and value is not None:
            print(f"intensity range: {value[0]:g} .. {value[1]:g}{' HU' if modality == 'CT' else ''}")
        else:
            print(f"{_INFO_NAMES.get(key, key)}: {value}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, found {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, found {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, found {text!r}")
    return value


def _cmd_segment(args: argparse.Namespace) -> int:
    from .propagate import PropagationConfig
    from .prompts import parse_box_option, parse_box_ras_option
    from .run import run_case

    if args.prompts:
        prompts = args.prompts
    else:
        entries = ([parse_box_option(spec) for spec in args.box] if args.box
                   else [parse_box_ras_option(spec) for spec in args.box_ras])
        for n, entry in enumerate(entries, start=1):
            entry["name"] = f"object {n}" if len(entries) > 1 else "object"
        prompts = {"version": 1, "objects": entries}
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=1, unit="slice", desc="segmenting", file=sys.stderr, leave=False)

    def progress(done: int, total: int, message: str) -> None:
        if bar is not None:
            bar.total = max(total, done)
            bar.n = done
            bar.refresh()
        else:
            log.info("%s (%d/%d)", message, done, total)

    try:
        record = run_case(
            args.input, prompts, outputs={"labels": args.output, "report": args.report, "mesh": args.mesh,
                                          "picture": args.picture},
            measure=args.measure, model_name=args.model, checkpoint=args.checkpoint, device=args.device,
            trust_checkpoint=args.trust_checkpoint, threads=args.threads, series_uid=args.series_uid,
            allow_tilt=args.allow_tilt, volume_index=args.volume_index, case_id=args.case_id, progress=progress,
            window=args.window,
            modality=args.modality, overlap=args.overlap, zoom=None if args.no_zoom else 1.0, stride=args.stride,
            taper=args.taper, config=PropagationConfig.fast() if args.fast
            else PropagationConfig(blend_embeddings=args.blend_embeddings))
        if bar is not None:
            bar.n = bar.total  # the work planned is done
            bar.refresh()
    finally:
        if bar is not None:
            bar.close()
    for obj in record.objects:
        extent = f"slices {obj.slices[0]}-{obj.slices[1]}" if obj.slices else "empty"
        border = f", reaches the image border ({', '.join(obj.border_planes)}): a lower bound" \
            if obj.border_planes else ""
        spread = obj.volume_ml_range
        spread = f" ({obj.alternatives} alternatives: {spread[0]:.2f}-{spread[1]:.2f} mL)" if spread else ""
        print(f"{obj.name} (label {obj.label}): {obj.volume_ml:.2f} mL{spread}, {obj.voxels} voxels, "
              f"{extent}{border}")
    written = [p for p in (record.outputs["labels"], record.outputs["report"]) if p] + \
        record.outputs["meshes"] + record.outputs["pictures"]
    print(f"wrote {', '.join(written)} in {record.timings['total_s']:.1f} s ({record.encoded['slices']} slices "
          f"encoded, {record.model['name']} on {record.model['device']})")
    return 0


def _cmd_mesh(args: argparse.Namespace) -> int:
    import numpy as np

    from .io import load_labels
    from .io._atomic import check_output_path, full_suffix
    from .mesh import MESH_SUFFIXES, label_mesh, mesh_properties, write_mesh
    from .errors import VolumeIOError

    suffix = full_suffix(args.output)
    if suffix not in MESH_SUFFIXES:
        raise VolumeIOError(f"expected -o ending in {', '.join(MESH_SUFFIXES)}, found '{args.output.name}'")
    check_output_path(args.output)
    image = _image(args)
    labels = load_labels(args.labels, image, max_labels=args.max_labels)
    values = args.label or [int(v) for v in np.unique(labels.array) if v != 0]
    if not values:
        raise VolumeIOError(f"expected labelled voxels to mesh in {args.labels}, found only background (0); "
                            "check that this is the segmentation, not an empty label map")
    for value in values:
        poly = label_mesh(labels, value, space=args.space, smooth=args.smooth, decimate=args.decimate)
        out = args.output if len(values) == 1 else args.output.with_name(
            f"{args.output.name[: -len(suffix)]}_label{value}{suffix}")
        write_mesh(poly, out, label=value)
        props = mesh_properties(poly)
        print(f"label {value}: {out} ({props['triangles']} triangles, {props['volume_mm3'] / 1000:.2f} mL enclosed, "
              f"{'watertight' if props['watertight'] else 'NOT watertight'}, {args.space})")
    return 0


def _cmd_measure(args: argparse.Namespace) -> int:
    from .io import load_labels
    from .measure import measure

    image = _image(args)
    labels = load_labels(args.labels, image, max_labels=args.max_labels)
    rows = measure(labels, image=image, components=not args.no_components)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.csv:
        import csv

        flat = [_flatten(r) for r in rows]
        keys = list(dict.fromkeys(k for r in flat for k in r))
        writer = csv.DictWriter(sys.stdout, fieldnames=keys)
        writer.writeheader()
        writer.writerows(flat)
    else:
        if not rows:
            print(f"no labelled voxels in {args.labels}: only background (0)")
        for r in rows:
            what = f"label {r['label']} '{r['name']}'" + (f" lesion {r['component']}" if r["component"] else "")
            print(f"{what}: {r['volume_ml']:.3f} mL ({r['voxels']} voxels), mesh {r['mesh_volume_ml']:.3f} mL, "
                  f"surface {r['surface_mm2']:.0f} mm2, max 3D diameter {r['max_diameter_3d_mm']:.1f} mm, "
                  f"axial long/short {r.get('long_axis_mm', 0):.1f}/{r.get('short_axis_mm', 0):.1f} mm"
                  + (f", touches the image border ({', '.join(r['border_planes'])})" if r["touches_border"] else ""))
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    import numpy as np

    from .errors import VolumeIOError
    from .io import load_labels
    from .io._atomic import check_output_path
    from .render import axial_overlay, render_meshes

    if args.output.suffix.lower() != ".png":
        raise VolumeIOError(f"expected -o ending in .png, found '{args.output.name}'")
    check_output_path(args.output)
    image = _image(args)
    labels = load_labels(args.labels, image, max_labels=args.max_labels)
    if args.view == "3d":
        render_meshes(labels, args.output, labels_to_show=[args.label] if args.label else None)
    else:
        if image is None:
            raise VolumeIOError("expected --image IMAGE for the axial overlay, found none")
        values = [int(v) for v in np.unique(labels.array) if v != 0]
        axial_overlay(image, labels, args.output, label=args.label or (values[0] if values else 1))
    print(f"wrote {args.output}")
    return 0


def _image(args: argparse.Namespace):
    """The ``--image`` of mesh, measure and render (its ``--volume`` for a 4D one), or None."""
    from .errors import Medsam3dError
    from .io import load

    if args.image is None:
        if args.volume_index is not None:
            raise Medsam3dError("expected --volume with --image (it picks a volume of the image), found no --image")
        return None
    return load(args.image, volume_index=args.volume_index)


def _flatten(row: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}_"))
        elif isinstance(value, list):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def _one_line(message: str) -> str:
    """``message`` as one printable line: line breaks (a path may hold one) and bytes that are not
    UTF-8 (an undecodable file name) escaped."""
    text = str(message).encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _fail(message: str) -> int:
    print(f"medsam3d: error: {_one_line(message)}", file=sys.stderr)
    return 2


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
