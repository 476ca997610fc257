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
    from .preprocess import CT_WINDOWS, MODALITIES

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

    p = sub.add_parser("segment", help="segment prompted objects in 3D and write a label map")
    p.add_argument("input", type=Path, help="NIfTI/NRRD/MHA file or DICOM folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, help="prompt JSON file (version 1), or a 3D Slicer markups file "
                                                  "(.mrk.json) with ROIs")
    src.add_argument("--box", action="append", metavar="I0,J0,I1,J1@K[:Z0..Z1]",
                     help="box on slice K in voxel indices, optionally with the object's slice range Z0..Z1 "
                          "(repeatable: one object each)")
    src.add_argument("--box-ras", action="append", metavar="R0,A0,S0,R1,A1,S1",
                     help="3D box by two opposite corners in RAS mm, as a Slicer ROI (repeatable: one object each)")
    p.add_argument("-o", "--output", type=Path, required=True, help="label map: .nii.gz, .nrrd, .seg.nrrd or .dcm (SEG)")
    p.add_argument("--json", dest="report", type=Path, help="write a JSON report here")
    p.add_argument("--model", default="litemedsam", help="litemedsam (default, bundled), medsam, sam-vit-b/l/h")
    p.add_argument("--checkpoint", type=Path, help="weights file (required for medsam and sam-*)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--window", help=f"CT preset ({', '.join(CT_WINDOWS)}), LEVEL,WIDTH in HU, percentile (MR's "
                                   "clipping) or roi (fitted to the intensities inside the prompt boxes)")
    p.add_argument("--modality", choices=MODALITIES, type=str.upper,
                   help="override the modality found in the header/intensities (every one but CT gets percentile "
                        "clipping)")
    p.add_argument("--overlap", default="score", choices=["score", "first", "last", "error"])
    p.add_argument("--series", dest="series_uid", help="SeriesInstanceUID when the folder holds several series")
    p.add_argument("--allow-tilt", action="store_true", help="accept gantry-tilted series (exact sheared grid)")
    p.add_argument("--no-zoom", action="store_true", help="encode whole slices instead of a crop around the prompts "
                   "(better for organs and vessels of a few cm in a whole CT slice: see the README)")
    p.add_argument("--stride", type=_positive_int, metavar="N",
                   help="encode every N-th slice first and interpolate smooth stretches between them "
                        "(default 3, 4 with --fast; 1: segment every slice)")
    p.add_argument("--blend-embeddings", action="store_true",
                   help="decode the skipped slices on blends of their neighbours' embeddings instead of encoding "
                        "them (fewer encodings on a CPU, slightly lower accuracy)")
    p.add_argument("--fast", action="store_true",
                   help="the speed preset: blended embeddings, stride 4, fewer sections with a 3D box (about half "
                        "the time of the defaults on a CPU, lower accuracy; see the README)")
    p.add_argument("--taper", type=_non_negative_float, default=2.0, metavar="POWER",
                   help="shrink each object's end slices to what an ellipsoid of its extent could hold (a prior "
                        "for tumours; POWER 2: an ellipsoid, larger: flatter; 0 turns it off, e.g. for organs)")
    p.add_argument("--measure", action="store_true", help="add shape measurements to the report")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("mesh", help="surface mesh of a label map in patient coordinates")
    p.add_argument("labels", type=Path, help="label map (NIfTI/NRRD/.seg.nrrd)")
    p.add_argument("-o", "--output", type=Path, required=True, help=".stl, .obj, .ply or .vtp (with several labels, "
                                                                      "one file per label: NAME_label<N>.ext)")
    p.add_argument("--label", type=int, action="append", help="label value (repeatable; default: every label)")
    p.add_argument("--space", default="RAS", choices=["RAS", "LPS"])
    p.add_argument("--smooth", type=int, default=15, help="windowed-sinc smoothing iterations (0: none)")
    p.add_argument("--decimate", type=float, default=0.0, help="fraction of triangles to remove (0..1)")
    p.set_defaults(func=_cmd_mesh)

    p = sub.add_parser("measure", help="volumes, diameters and shape figures of each label and lesion")
    p.add_argument("labels", type=Path, help="label map (NIfTI/NRRD/.seg.nrrd, or DICOM SEG/RTSTRUCT with --image)")
    p.add_argument("--image", type=Path, help="image for intensity statistics (same grid)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--csv", action="store_true", help="print CSV")
    p.add_argument("--no-components", action="store_true", help="whole labels only, not each lesion")
    p.set_defaults(func=_cmd_measure)

    p = sub.add_parser("render", help="PNG pictures: 3D view of the meshes, or axial overlay with RECIST axes")
    p.add_argument("labels", type=Path, help="label map")
    p.add_argument("-o", "--output", type=Path, required=True, help="PNG file")
    p.add_argument("--view", choices=["3d", "axial"], default="3d")
    p.add_argument("--image", type=Path, help="image under the overlay (required for --view axial)")
    p.add_argument("--label", type=int, default=None, help="label to draw (axial view; default: the first)")
    p.set_defaults(func=_cmd_render)

    return parser


def _cmd_info(args: argparse.Namespace) -> int:
    from .io import list_dicom_series, load
    from .report import describe_volume

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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, found {text!r}")
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
    from .io import check_output, load, save
    from .io._atomic import atomic_path, check_output_path
    from .pipeline import segment
    from .propagate import PropagationConfig
    from .prompts import load_prompts, parse_box_option, parse_box_ras_option, parse_prompts

    check_output(args.output)  # refuse what save() would refuse before the work, not after it
    if args.report:
        check_output_path(args.report)
    volume = load(args.input, series_uid=args.series_uid, allow_tilt=args.allow_tilt)
    check_output(args.output, reference=volume)  # DICOM SEG: is the input a DICOM series?
    if args.prompts:
        objects = load_prompts(args.prompts, volume)
    else:
        entries = ([parse_box_option(spec) for spec in args.box] if args.box
                   else [parse_box_ras_option(spec) for spec in args.box_ras])
        for n, entry in enumerate(entries, start=1):
            entry["name"] = f"object {n}" if len(entries) > 1 else "object"
        objects = parse_prompts({"version": 1, "objects": entries}, volume)
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=volume.shape[2], unit="slice", desc="segmenting", file=sys.stderr)

    def progress(done: int, total: int, message: str) -> None:
        if bar is not None:
            bar.total = max(total, done)
            bar.n = done
            bar.refresh()
        else:
            log.info("%s (%d/%d)", message, done, total)

    try:
        result = segment(volume, objects, model_name=args.model, checkpoint=args.checkpoint, device=args.device,
                         window=args.window, modality=args.modality, overlap=args.overlap,
                         zoom=None if args.no_zoom else 1.0, stride=args.stride, taper=args.taper, progress=progress,
                         config=PropagationConfig.fast() if args.fast
                         else PropagationConfig(blend_embeddings=args.blend_embeddings))
    finally:
        if bar is not None:
            bar.close()
    save(result.labels, args.output, reference=volume)
    report = result.report()
    report["output"] = str(args.output)
    if args.measure:
        from .measure import measure

        report["measurements"] = measure(result.labels, image=volume)
    if args.report:
        with atomic_path(args.report) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
    for obj in result.objects:
        extent = f"slices {obj['slices'][0]}-{obj['slices'][1]}" if obj["slices"] else "empty"
        border = f", reaches the image border ({', '.join(obj['border_planes'])}): a lower bound" \
            if obj["border_planes"] else ""
        spread = obj["volume_ml_range"]
        spread = f" ({obj['alternatives']} alternatives: {spread[0]:.2f}-{spread[1]:.2f} mL)" if spread else ""
        print(f"{obj['name']} (label {obj['label']}): {obj['volume_ml']:.2f} mL{spread}, {obj['voxels']} voxels, "
              f"{extent}{border}")
    print(f"wrote {args.output} in {result.seconds:.1f} s ({result.encoded_slices} slices encoded, "
          f"{result.model['name']} on {result.model['device']})")
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
    labels = load_labels(args.labels)
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
    from .io import load, load_labels
    from .measure import measure

    image = load(args.image) if args.image else None
    labels = load_labels(args.labels, image)
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
    from .io import load, load_labels
    from .io._atomic import check_output_path
    from .render import axial_overlay, render_meshes

    if args.output.suffix.lower() != ".png":
        raise VolumeIOError(f"expected -o ending in .png, found '{args.output.name}'")
    check_output_path(args.output)
    image = load(args.image) if args.image else None
    labels = load_labels(args.labels, image)
    if args.view == "3d":
        render_meshes(labels, args.output, labels_to_show=[args.label] if args.label else None)
    else:
        if image is None:
            raise VolumeIOError("expected --image IMAGE for the axial overlay, found none")
        values = [int(v) for v in np.unique(labels.array) if v != 0]
        axial_overlay(image, labels, args.output, label=args.label or (values[0] if values else 1))
    print(f"wrote {args.output}")
    return 0


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


def _fail(message: str) -> int:
    print(f"medsam3d: error: {message}", file=sys.stderr)
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
