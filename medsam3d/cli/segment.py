"""``medsam3d segment``: prompts from the command line or a file -> :func:`medsam3d.run.run_case`."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("medsam3d")


def _cmd_segment(args: argparse.Namespace) -> int:
    from ..propagate import PropagationConfig
    from ..prompts import parse_box_option, parse_box_ras_option
    from ..run import run_case

    detector = None
    if args.prompts:
        prompts = args.prompts
        if getattr(args, "detector", None) or getattr(args, "detector_weights", None):
            from .detect import build_detector

            detector = build_detector(args)  # answers the file's text objects
    elif getattr(args, "text", None):
        from .detect import segment_text_options

        prompts, detector = segment_text_options(args)
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
                                          "picture": args.picture, "rtstruct": args.rtstruct, "sr": args.sr},
            measure=args.measure, model_name=args.model, checkpoint=args.checkpoint, device=args.device,
            trust_checkpoint=args.trust_checkpoint, threads=args.threads, series_uid=args.series_uid,
            allow_tilt=args.allow_tilt, volume_index=args.volume_index, case_id=args.case_id, progress=progress,
            window=args.window,
            modality=args.modality, overlap=args.overlap, zoom=None if args.no_zoom else 1.0, stride=args.stride,
            taper=args.taper, detector=detector,
            config=PropagationConfig.fast() if args.fast
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
    written = [p for p in (record.outputs["labels"], record.outputs.get("rtstruct"), record.outputs.get("sr"),
                           record.outputs["report"]) if p] + record.outputs["meshes"] + record.outputs["pictures"]
    print(f"wrote {', '.join(written)} in {record.timings['total_s']:.1f} s ({record.encoded['slices']} slices "
          f"encoded, {record.model['name']} on {record.model['device']})")
    return 0
