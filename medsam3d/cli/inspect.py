"""``medsam3d info`` (what an image file or DICOM folder holds) and ``medsam3d measure``."""

from __future__ import annotations

import argparse
import json
import sys

from ._common import _fail, _image


#: the text output's names of ``describe_volume``'s keys, with their units (the JSON keeps the keys)
_INFO_NAMES = {"shape": "shape (voxels i, j, k)", "spacing": "spacing (mm)", "origin": "origin (RAS mm)",
               "axcodes": "axis directions (i, j, k)", "voxel_volume_mm3": "voxel volume (mm3)",
               "intensity_range": "intensity range", "affine_source": "affine from", "volume_index": "volume"}


def _cmd_info(args: argparse.Namespace) -> int:
    from ..io import list_dicom_series, load
    from ..io._guard import check_path
    from ..report import describe_volume

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
    from ..preprocess import guess_modality

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


def _cmd_measure(args: argparse.Namespace) -> int:
    from ..io import load_labels
    from ..measure import measure

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
