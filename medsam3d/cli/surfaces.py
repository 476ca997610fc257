"""``medsam3d mesh`` (surface files) and ``medsam3d render`` (PNG pictures) of a label map."""

from __future__ import annotations

import argparse

from ._common import _image


def _cmd_mesh(args: argparse.Namespace) -> int:
    import numpy as np

    from ..errors import VolumeIOError
    from ..io import load_labels
    from ..io._atomic import OutputSet, check_output_path, full_suffix
    from ..mesh import MESH_SUFFIXES, write_label_meshes

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
    with OutputSet() as staged:  # every label's file, or none
        meshes = write_label_meshes(labels, values, args.output, staged, space=args.space, smooth=args.smooth,
                                    decimate=args.decimate)
        staged.commit()
    for value, (out, props) in meshes.items():
        print(f"label {value}: {out} ({props['triangles']} triangles, {props['volume_mm3'] / 1000:.2f} mL enclosed, "
              f"{'watertight' if props['watertight'] else 'NOT watertight'}, {args.space})")
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    import numpy as np

    from ..errors import VolumeIOError
    from ..io import load_labels
    from ..io._atomic import check_output_path
    from ..render import axial_overlay, render_meshes

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
