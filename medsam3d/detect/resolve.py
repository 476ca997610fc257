"""Text prompts to box prompts: ask a detector, keep its detections, one object each."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ..errors import DetectorError, PromptError
from ..prompts import MAX_LABEL, BoxPrompt, ObjectPrompt
from ..volume import Volume
from .base import Detection, Detector, Progress
from .registry import available_detectors, load_detector

log = logging.getLogger(__name__)


def resolve_text_prompts(volume: Volume, objects: Sequence[ObjectPrompt], detector: Detector | str | None, *,
                         progress: Progress | None = None,
                         proposals: list[dict[str, Any]] | None = None) -> list[ObjectPrompt]:
    """Replace each object that has a ``text`` and no boxes by one object per detection.

    ``detector`` (a :class:`Detector`, a registered name, or None) answers the texts of the
    objects that do not name their own ``detector``. Detections are kept best score first;
    their boxes are clipped to the volume, and those left less than 2 voxels wide or high are
    dropped, as are the ones the detector itself rejected (``Detection.rejected``). The first
    kept detection keeps the object's name and label, the next ones are named "liver 2",
    "liver 3"... and take the smallest label values no object uses. Each new object carries
    the text, the detector's name, the score, its box on its slice and its ``z_range``. Other
    objects pass through unchanged, in order.

    ``proposals``, when given a list, receives one dict per detection the detectors proposed
    (``text``, ``detector``, ``score``, ``slice``, ``box``, ``z_range``, ``kept``, ``reason``
    (None when kept) and ``name``, the object a kept one became): the report's
    ``prompts.detections``. It is filled before a "not found" error is raised.

    Raises :class:`PromptError` when a text has no detector to answer it (naming the
    registered ones) or when a detector finds its target nowhere ("not found": never an
    empty result; the message counts the rejected proposals and gives their reasons).
    """
    pending = [o for o in objects if o.text is not None and not o.boxes]
    if not pending:
        return list(objects)
    used_labels = {o.label for o in objects}
    used_names = {o.name for o in objects}
    loaded: dict[str, Detector] = {}
    out: list[ObjectPrompt] = []
    for obj in objects:
        if obj.text is None or obj.boxes:
            out.append(obj)
            continue
        det = _detector_for(obj, detector, loaded)
        found = det.detect(volume, obj.text, progress=progress)
        _check_list(det, found)
        masks_only = [d for d in found if not d.seed and d.rejected is None]
        if masks_only and len(masks_only) == len(found):
            raise PromptError(f"expected a text whose boxes can seed the engine for object '{obj.name}', found "
                              f"{obj.text!r}, which detector '{det.name}' answers with a mask only "
                              f"({masks_only[0].source}); write it with 'medsam3d detect INPUT --text "
                              f"\"{obj.text}\" --labels OUT'")
        record: list[dict[str, Any]] = []
        try:
            kept = _usable(volume, obj, det, found, record)
        finally:  # the proposals are the report's, also when the text is found nowhere
            if proposals is not None:
                proposals.extend(record)
        for n, found in enumerate(kept):
            if n == 0:
                name, label = obj.name, obj.label
            else:
                name = next(f"{obj.name} {m}" for m in range(n + 1, n + 2 + len(used_names))
                            if f"{obj.name} {m}" not in used_names)
                label = next((v for v in range(1, MAX_LABEL + 1) if v not in used_labels), None)
                if label is None:
                    raise PromptError(f"expected at most {MAX_LABEL} objects, found more with the detections "
                                      f"of {obj.text!r}; raise the detector's thresholds")
            used_names.add(name)
            used_labels.add(label)
            next(r for r in record if r["kept"] and r["name"] is None)["name"] = name
            out.append(ObjectPrompt(name, label, [BoxPrompt(found.slice, found.box)], found.z_range, text=obj.text,
                                    detector=found.source or det.name, score=found.score))
        log.info("%r (%s): %d object(s) from detector %s (%d proposal(s) rejected)", obj.text, obj.name, len(kept),
                 det.name, sum(not r["kept"] for r in record))
    return out


def _check_list(detector: Detector, detections: Any) -> None:
    if not isinstance(detections, (list, tuple)) or not all(isinstance(d, Detection) for d in detections):
        raise DetectorError(f"expected detector '{detector.name}' to return a list of Detection, found "
                            f"{type(detections).__name__}")


def _proposal(d: Detection, detector: Detector, reason: str | None) -> dict[str, Any]:
    return {"text": d.text, "detector": d.source or detector.name, "score": round(float(d.score), 4),
            "slice": int(d.slice), "box": [int(v) for v in d.box],
            "z_range": None if d.z_range is None else [int(v) for v in d.z_range], "kept": reason is None,
            "reason": reason, "name": None}


def _detector_for(obj: ObjectPrompt, given: Detector | str | None, loaded: dict[str, Detector]) -> Detector:
    """The object's own detector (by name), else the one given; a one-line error when there is none."""
    if obj.detector is not None and not (isinstance(given, Detector) and given.name == obj.detector):
        name = obj.detector
    elif isinstance(given, str):
        name = given
    elif given is not None:
        if not isinstance(given, Detector):
            raise DetectorError(f"expected a detector (a name and detect(volume, text, *, progress)) or its "
                                f"registered name, found {type(given).__name__}")
        return given
    else:
        names = available_detectors()
        choice = (f"choose one of {', '.join(names)} (--detector NAME)" if names else
                  "none is installed: install a detector plugin (entry point group 'medsam3d.detectors')")
        raise PromptError(f"expected a detector for the text {obj.text!r} of object '{obj.name}', found none "
                          f"chosen; {choice}, or draw a box")
    if name not in loaded:
        loaded[name] = load_detector(name)
    return loaded[name]


def _usable(volume: Volume, obj: ObjectPrompt, detector: Detector, detections: Sequence[Detection],
            record: list[dict[str, Any]]) -> list[Detection]:
    """The detections clipped to the volume, rejected and degenerate ones dropped, best first (each one
    appended to ``record`` as a proposal); "not found" if none is left."""
    I, J, K = volume.shape
    kept, dropped, reasons = [], [], []
    for d in sorted(detections, key=lambda d: (d.rejected is not None, -d.score)):
        if d.mask is not None and d.mask.shape != volume.shape:
            raise DetectorError(f"expected the mask of detector '{detector.name}' on the volume's grid "
                                f"{volume.shape}, found {d.mask.shape}")
        if d.rejected is not None or not d.seed:
            reason = d.rejected or f"a mask only ({d.source or detector.name}): no box to seed the engine"
            reasons.append(reason)
            record.append(_proposal(d, detector, reason))
            continue
        i0, j0, i1, j1 = max(d.box[0], 0), max(d.box[1], 0), min(d.box[2], I - 1), min(d.box[3], J - 1)
        if not 0 <= d.slice < K or i1 - i0 < 1 or j1 - j0 < 1:
            dropped.append(f"{list(d.box)}@{d.slice}")
            record.append(_proposal(d, detector, "outside the volume or under 2 voxels once clipped to it"))
            continue
        z_range = None if d.z_range is None else (max(d.z_range[0], 0), min(d.z_range[1], K - 1))
        clipped = Detection(d.text, d.score, d.slice, (i0, j0, i1, j1), z_range, d.mask, d.source)
        kept.append(clipped)
        record.append(_proposal(clipped, detector, None))
    if dropped:
        log.info("detector %s: dropped %d detection(s) of %r outside the volume or under 2 voxels: %s",
                 detector.name, len(dropped), obj.text, ", ".join(dropped))
    if not kept:
        unusable = f" ({len(dropped)} outside the volume or under 2 voxels)" if dropped else ""
        if reasons:
            distinct = list(dict.fromkeys(reasons))
            unusable += (f" ({len(reasons)} proposal(s) rejected: {'; '.join(distinct[:3])}"
                         f"{'...' if len(distinct) > 3 else ''})")
        raise PromptError(f"expected to find {obj.text!r} (object '{obj.name}') in the image, found it nowhere: "
                          f"not found by detector '{detector.name}'{unusable}; check the text, try another "
                          "detector, or draw a box")
    return kept
