"""``medsam3d detect`` and ``segment --text``: a detector turns texts into boxes (and masks).

``detect`` writes what the detector proposes for the user to check and edit: a version-2
prompt file of box objects (``-o``), a 3D Slicer ROI markups file (``--markups``) and, for
detectors that segment (the classical ``ct-anatomy``), the masks as a label map
(``--labels``). A text found nowhere ends with "not found" and exit code 2, never with an
empty result.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("medsam3d")


def add_segment_text_arguments(prompt_source: argparse._MutuallyExclusiveGroup,
                               parser: argparse.ArgumentParser) -> None:
    """``segment``'s ``--text`` (beside ``--prompts``/``--box``), ``--detector`` and ``--detector-weights``."""
    prompt_source.add_argument("--text", action="append", metavar="TEXT",
                               help="what to find, e.g. 'left lung': a detector proposes its boxes, the engine "
                                    "segments them (repeatable: one object each; see --detector)")
    _detector_arguments(parser)


def add_detect_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``detect`` subcommand's arguments."""
    parser.add_argument("input", type=Path, help="NIfTI/NRRD/MHA file or DICOM folder")
    parser.add_argument("--text", action="append", required=True, metavar="TEXT",
                        help="what to find, e.g. 'lungs' (repeatable)")
    parser.add_argument("-o", "--output", type=Path, help="write the proposed boxes as a prompt file (version 2) "
                                                          "to check, edit and give to 'segment --prompts'")
    parser.add_argument("--markups", type=Path, help="write the proposed boxes as 3D Slicer ROIs (.mrk.json)")
    parser.add_argument("--labels", type=Path, help="write the detector's masks (classical results such as the "
                                                    "bones) as a label map: .nii.gz, .nrrd or .seg.nrrd")
    parser.add_argument("--series", dest="series_uid", help="SeriesInstanceUID when the folder holds several series")
    parser.add_argument("--volume", dest="volume_index", type=int, metavar="N",
                        help="the volume to use in a 4D file or a DICOM series holding several")
    parser.add_argument("--allow-tilt", action="store_true", help="accept gantry-tilted series (exact sheared grid)")
    _detector_arguments(parser)
    parser.set_defaults(func=_cmd_detect)


def _detector_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--detector", metavar="NAME",
                        help="the detector that answers texts (default: ct-anatomy, weight-free CT anatomy: body, "
                             "lungs, left/right lung, airways, bones, fat)")
    parser.add_argument("--detector-weights", metavar="PATH",
                        help="a learned detector's weights: a local Hugging Face model folder, or the id of a model "
                             "already in the Hugging Face cache (nothing is downloaded)")
    parser.add_argument("--detector-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a detector option, e.g. box_threshold=0.4, text_threshold=0.3, stride=2, "
                             "min_slices=3, device=cuda (repeatable; see docs/text_prompts.md)")


def build_detector(args: argparse.Namespace):
    """The detector ``--detector`` names (default ``ct-anatomy``), with ``--detector-weights`` when given."""
    from ..detect import load_detector

    options: dict[str, Any] = dict(_option(text) for text in getattr(args, "detector_option", None) or ())
    if getattr(args, "detector_weights", None) is not None:
        options["weights"] = args.detector_weights
    return load_detector(args.detector or "ct-anatomy", **options)


def _option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON when it is (numbers, true/false), else as a string."""
    import json

    from ..errors import DetectorError

    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise DetectorError(f"expected --detector-option KEY=VALUE (e.g. box_threshold=0.4), found {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def text_prompts(texts: list[str]) -> dict[str, Any]:
    """``--text`` options as a version-2 prompt document, one text object each (names made unique)."""
    from ..errors import PromptError

    objects, names = [], set()
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise PromptError(f"expected a non-empty --text, found {text!r}")
        name, n = text.strip(), 2
        while name in names:
            name, n = f"{text.strip()} {n}", n + 1
        names.add(name)
        objects.append({"name": name, "text": text.strip()})
    return {"version": 2, "objects": objects}


def _cmd_detect(args: argparse.Namespace) -> int:
    from ..detect import Detection
    from ..errors import PromptError
    from ..io import load, save
    from ..volume import Volume
    from ._common import _fail

    volume = load(args.input, series_uid=args.series_uid, volume_index=args.volume_index,
                  allow_tilt=getattr(args, "allow_tilt", False))
    detector = build_detector(args)
    texts = text_prompts(args.text)["objects"]
    found: list[tuple[str, Detection]] = []
    missing: list[str] = []
    for obj in texts:
        detections = detector.detect(volume, obj["text"])
        if not isinstance(detections, (list, tuple)) or not all(isinstance(d, Detection) for d in detections):
            raise PromptError(f"expected detector '{detector.name}' to return a list of Detection, found "
                              f"{type(detections).__name__}")
        for d in detections:
            if d.rejected is not None:
                print(f"rejected {obj['text']!r}: score {d.score:.2f}, box {list(d.box)} on slice {d.slice}: "
                      f"{d.rejected} [{d.source}]")
        kept = [d for d in detections if d.rejected is None]
        if not kept:
            missing.append(obj["text"])
        for n, d in enumerate(sorted(kept, key=lambda d: -d.score)):
            found.append((obj["name"] if n == 0 else f"{obj['name']} {n + 1}", d))
    for name, d in found:
        z = f", slices {d.z_range[0]}-{d.z_range[1]}" if d.z_range else ""
        kind = "box (seeds the engine)" if d.seed else "mask only (classical result)"
        voxels = f", {int(d.mask.sum())} voxels, {d.mask.sum() * volume.voxel_volume_mm3 / 1000:.1f} mL" \
            if d.mask is not None else ""
        print(f"{name}: score {d.score:.2f}, box {list(d.box)} on slice {d.slice}{z}{voxels}: {kind} [{d.source}]")
    if missing:
        return _fail(f"not found: {', '.join(repr(t) for t in missing)} by detector '{detector.name}' in "
                     f"{args.input}; nothing written (check the text, try another detector, or draw a box)")
    written = []
    if args.output is not None:
        doc = {"version": 2, "objects": [_entry(name, d) for name, d in found]}
        _write_text(args.output, json.dumps(doc, indent=2) + "\n")
        written.append(str(args.output))
    if args.markups is not None:
        _write_text(args.markups, json.dumps(markups(volume, found), indent=2) + "\n")
        written.append(str(args.markups))
    if args.labels is not None:
        with_masks = [(name, d) for name, d in found if d.mask is not None]
        if not with_masks:
            return _fail(f"expected masks for --labels, found detector '{detector.name}' giving boxes only; "
                         "use 'medsam3d segment --text' to segment them")
        array = np.zeros(volume.shape, np.uint16)
        segments = {}
        for value, (name, d) in enumerate(with_masks, start=1):
            array[d.mask & (array == 0)] = value
            segments[value] = {"name": name}
        save(Volume(array, volume.affine, {"segments": segments}), args.labels, reference=volume)
        written.append(str(args.labels))
    if written:
        print(f"wrote {', '.join(written)}")
    return 0


def _entry(name: str, d) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "slice": d.slice, "box": list(d.box)}
    if d.z_range is not None:
        entry["z_range"] = list(d.z_range)
    return entry


def markups(volume, found) -> dict[str, Any]:
    """A 3D Slicer markups document (RAS mm): one ROI per detection, over its box and slice range."""
    affine = np.asarray(volume.affine, float)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    axes = affine[:3, :3] / spacing
    rois = []
    for name, d in found:
        k0, k1 = d.z_range if d.z_range is not None else (d.slice, d.slice)
        lo = np.array([d.box[0], d.box[1], k0], float) - 0.5
        hi = np.array([d.box[2], d.box[3], k1], float) + 0.5
        centre = affine[:3, :3] @ ((lo + hi) / 2) + affine[:3, 3]
        rois.append({"type": "ROI", "name": name, "coordinateSystem": "RAS", "coordinateUnits": "mm",
                     "center": centre.tolist(), "size": ((hi - lo) * spacing).tolist(),
                     "orientation": axes.ravel().tolist(), "roiType": "Box",
                     "description": f"{d.text}: score {d.score:.3f} from {d.source}"})
    return {"@schema": "https://raw.githubusercontent.com/slicer/slicer/main/Modules/Loadable/Markups/Resources/"
                       "Schema/markups-schema-v1.0.3.json#", "markups": rois}


def _write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def segment_text_options(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """``segment --text``: the prompt document and the detector for :func:`medsam3d.run.run_case`."""
    return text_prompts(args.text), build_detector(args)
