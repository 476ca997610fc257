"""``segment(volume, prompts)``: the one high-level entry point of the engine.

Steps: choose and apply the intensity window -> reorient slices to the radiological
display layout (no resampling; the slice axis k is kept so prompt slices stay valid) ->
encode/propagate per object -> fuse into one label map -> undo the reorientation so the
labels lie exactly on the input grid.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from .errors import Medsam3dError
from .fuse import fuse, taper_ends
from .io import as_volume
from .preprocess import MODALITIES, Window, WindowedVolume, choose_window, finite_intensities
from .prompts import BoxPrompt, ObjectPrompt, prompts_from
from .models.base import describe_model
from .propagate import ObjectResult, PropagationConfig, SliceEncoder, propagate
from .volume import Volume, display_axcodes, reorient

log = logging.getLogger(__name__)


@dataclass
class SegmentationResult:
    """What the engine found: labels on the input grid and, per object, how it was segmented.

    Volumes, their range, border flags and measurements are the record's
    (:func:`medsam3d.record.object_records`, :func:`medsam3d.run_case`), not the engine's.
    ``objects`` holds one dict per object: ``label``, ``name``, ``text``, ``prompts`` and
    ``z_range`` (as resolved on the input grid), ``slices`` (first and last labelled slice, or
    None), ``mean_score``, ``interpolated_slices``, ``stopped`` (why each end ended),
    ``voxels_lost_to_overlap``, ``voxels_removed_by_taper`` and ``alternatives`` (each chain-vote
    member's volume over the result's, see :mod:`medsam3d.propagate`).
    """

    labels: Volume
    objects: list[dict[str, Any]]
    window: Window
    model: dict[str, Any]
    seconds: float
    encoded_slices: int
    settings: dict[str, Any] = field(default_factory=dict)
    prompts: list[ObjectPrompt] = field(default_factory=list)
    #: what the detectors proposed for the text prompts, kept or rejected with the reason (see
    #: :func:`medsam3d.detect.resolve_text_prompts`); empty without text prompts
    detections: list[dict[str, Any]] = field(default_factory=list)
    #: seconds spent by the detectors on the text prompts (part of ``seconds``); None without text prompts
    detect_seconds: float | None = None


#: the options of :func:`segment` that :func:`medsam3d.run_case` and :class:`medsam3d.Session` pass on
#: (the model's own are theirs): one place, checked against the signature by the tests
ENGINE_OPTIONS = ("window", "modality", "overlap", "keep_largest", "fill_holes", "taper", "zoom", "stride", "config",
                  "detector")


def _zoom_crop(objects: Sequence[ObjectPrompt], shape: tuple[int, int], context: float) -> tuple[int, int, int, int] | None:
    """Region around every prompt box (each side extended by ``context`` x the box size)."""
    boxes = np.array([b.box for o in objects for b in o.boxes], float)
    size = np.maximum(boxes[:, 2:] - boxes[:, :2] + 1, 8)
    lo = (boxes[:, :2] - context * size).min(axis=0)
    hi = (boxes[:, 2:] + context * size).max(axis=0)
    lo = np.maximum(np.floor(lo), 0).astype(int)
    hi = np.minimum(np.ceil(hi), np.array(shape) - 1).astype(int)
    # keep the crop square-ish so the model's 256 px are not wasted on padding
    side = int(max(hi - lo + 1))
    for axis in (0, 1):
        extra = side - (hi[axis] - lo[axis] + 1)
        lo[axis] = max(0, lo[axis] - extra // 2)
        hi[axis] = min(shape[axis] - 1, lo[axis] + side - 1)
        lo[axis] = max(0, hi[axis] - side + 1)
    if (hi[0] - lo[0] + 1) * (hi[1] - lo[1] + 1) >= 0.8 * shape[0] * shape[1]:
        return None
    return int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1])


def choose_view(cropped: SliceEncoder, whole: SliceEncoder, objects: Sequence[ObjectPrompt]
                ) -> tuple[SliceEncoder, dict[str, Any]]:
    """The zoom crop or the whole slices, whichever view's masks span their boxes better.

    Each object's key box (its largest) is segmented on both views; the view whose masks'
    bounding boxes overlap their prompt boxes more (:func:`medsam3d.propagate.boxes.box_fit`,
    averaged over the objects; the crop on a tie) is kept, with the key slices it encoded.
    The model segments best at the scale it was trained at, and what it does at the wrong one
    is shrink the object into part of its box: enlarged several-fold, vessels and small organs
    in a whole abdominal CT come out too small; shown whole, a lesion of a few millimetres in
    a brain MR fills too little of its box. Returns the encoder and the record
    of the choice (``crop_fit``, ``whole_fit``, ``chosen`` and ``extra_encoded``, the slices
    encoded for the view that was not kept).
    """
    from .propagate.boxes import box_fit

    fits = {"crop": [], "whole": []}
    for obj in objects:
        key = max(obj.boxes, key=lambda b: b.area)
        for name, encoder in (("crop", cropped), ("whole", whole)):
            masks, _ = encoder.predict(key.slice, np.array([key.box]))
            fits[name].append(box_fit(masks[0], key.box))
    crop_fit, whole_fit = (float(np.mean(f)) for f in (fits["crop"], fits["whole"]))
    chosen = "crop" if crop_fit >= whole_fit else "whole"
    for encoder in (cropped, whole):
        encoder.used.clear()  # encoded, not yet asked for by the walk
    log.info("zoom check: masks span their boxes %.2f on the crop, %.2f on whole slices: %s kept",
             crop_fit, whole_fit, chosen)
    kept, other = (cropped, whole) if chosen == "crop" else (whole, cropped)
    extra = other.encoded
    other.cache.clear()
    return kept, {"crop_fit": round(crop_fit, 4), "whole_fit": round(whole_fit, 4), "chosen": chosen,
                  "extra_encoded": extra}


def _roi_values(volume: Volume, objects: Sequence[ObjectPrompt]) -> np.ndarray:
    """Intensities inside every prompt box (on its slice), for ROI-fitted windows."""
    parts = [volume.array[b.box[0] : b.box[2] + 1, b.box[1] : b.box[3] + 1, b.slice].ravel()
             for o in objects for b in o.boxes]
    return np.concatenate(parts) if parts else np.zeros(0)


def _to_working(objects: Sequence[ObjectPrompt], reo) -> list[ObjectPrompt]:
    out = []
    for obj in objects:
        boxes = []
        for b in obj.boxes:
            corners = np.array([[b.box[0], b.box[1], b.slice], [b.box[2], b.box[3], b.slice]], float)
            c = np.round(reo.source_to_target_index(corners)).astype(int)
            lo, hi = c.min(axis=0), c.max(axis=0)
            boxes.append(BoxPrompt(int(c[0, 2]), (int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1]))))
        out.append(ObjectPrompt(obj.name, obj.label, boxes, obj.z_range))
    return out


def segment(volume: Volume | str | os.PathLike, prompts, *, model=None, model_name: str = "litemedsam", checkpoint=None,
            device: str = "auto", window: str | None = None, modality: str | None = None,
            overlap: str = "score", keep_largest: bool = True, fill_holes: bool = True, taper: float | None = 2.0,
            zoom: float | None = 1.0, stride: int | None = None, config: PropagationConfig | None = None,
            detector=None, progress: Callable[[int, int, str], None] | None = None) -> SegmentationResult:
    """Segment every prompted object of ``volume`` in 3D.

    Parameters
    ----------
    volume : Volume or path
        The image (any orientation; labels come back on exactly its grid), or a path that
        :func:`medsam3d.load` reads. NaN or infinite voxels
        are shown to the model as its lowest intensity (counted in ``settings["non_finite_voxels"]``);
        a constant image is refused.
    prompts : list of ObjectPrompt, prompt document (dict), list of prompt entries, or a path
        See :mod:`medsam3d.prompts` (voxel boxes on a slice, ``z_range``, ``box_ras``); a path is
        read as a prompt file (version 1, or a 3D Slicer markups file with ROIs).
    model : SliceModel, optional
        A loaded model; otherwise ``model_name``/``checkpoint``/``device`` build one.
    window : str, optional
        CT preset (``soft-tissue``, ``lung``, ``bone``, ``brain``, ``liver``...), ``LEVEL,WIDTH``
        or ``percentile``; default: chosen from the modality.
    modality : {"CT", "MR", "PT", "US"}, optional
        Overrides the DICOM header and the guess from the intensities (see :mod:`medsam3d.preprocess`).
    overlap : {"score", "first", "last", "error"}
        Who gets a voxel claimed by two objects.
    taper : float or None
        Shrink each object's slices near its two ends to what an ellipsoid of its extent and largest
        cross-section could hold there (this power: 2 an ellipsoid, larger flatter; see
        :func:`medsam3d.fuse.taper_ends`). A prior for tumours, whose poles the model
        over-segments. It changes only objects whose two ends the engine found itself, not at the
        volume's edge nor at their ``z_range``'s. None or 0 turns it off (advised for organs, or
        any object that is not roughly ellipsoidal).
    zoom : float or None
        Encode a crop around the prompts, each side extended by ``zoom`` x the box size
        (None: whole slices). Small objects in large slices gain resolution from the crop; organs
        and vessels of a few cm in a whole abdominal CT can come out shrunk by it: use None there
        (the guide's engine page, and ``benchmarks/bench_segment.py --organs``, give the figures).
    detector : Detector or str, optional
        Answers the text prompts (prompt format version 2) that name no detector of their own:
        a :class:`medsam3d.detect.Detector` or a registered name (see :mod:`medsam3d.detect`).
    stride : int, optional
        Encode every ``stride``-th slice first; the slices between are interpolated where
        their neighbours' masks agree and segmented where they do not (default: the
        config's, 3; 1 segments every slice). Overrides ``config.stride``.
    progress : callable(done, total, message), optional
        Called after each encoded batch of slices.
    """
    from .models import load_model

    t0 = time.perf_counter()
    volume = as_volume(volume)
    if taper is not None and not (isinstance(taper, (int, float)) and 0 <= taper < float("inf")):
        raise Medsam3dError(f"expected a taper power >= 0 (0 or None: off), found {taper!r}")
    if zoom is not None and not (isinstance(zoom, (int, float)) and 0 <= zoom < float("inf")):
        raise Medsam3dError(f"expected a zoom context >= 0 (None: whole slices), found {zoom!r}")
    if modality is not None and str(modality).strip().upper() not in MODALITIES:
        raise Medsam3dError(f"expected a modality among {', '.join(MODALITIES)} (or None: from the header or the "
                            f"intensities), found {modality!r}")
    modality = str(modality).strip().upper() if modality is not None else None
    objects = prompts_from(prompts, volume)
    proposals: list[dict[str, Any]] = []
    detect_seconds = None
    if any(o.text is not None and not o.boxes for o in objects):
        from .detect import resolve_text_prompts

        t_detect = time.perf_counter()
        objects = resolve_text_prompts(volume, objects, detector, progress=progress, proposals=proposals)
        detect_seconds = time.perf_counter() - t_detect
    image, non_finite = finite_intensities(volume)
    if model is None:
        model = load_model(model_name, checkpoint=checkpoint, device=device)
    win = choose_window(image, window, modality, roi_values=_roi_values(image, objects))
    working, reo = reorient(image, display_axcodes(image))
    images = WindowedVolume(working.array, win)  # windowed slice by slice as the engine reads them
    work_objects = _to_working(objects, reo)
    crop = _zoom_crop(work_objects, images.shape[:2], zoom) if zoom is not None else None
    config = config or PropagationConfig()
    changes: dict[str, Any] = {"voxel_mm": tuple(float(v) for v in working.spacing)}
    if config.batch_size is None:
        changes["batch_size"] = 8 if model.device != "cpu" else 1
    if stride is not None:
        if int(stride) < 1:
            raise Medsam3dError(f"expected a stride >= 1, found {stride}; use 1 to segment every slice")
        changes["stride"] = int(stride)
    config = replace(config, **changes)  # a new config: the caller's is left as it was
    # the work planned: every stride-th slice of each object's range (the whole volume without a
    # z_range) and its ends; the gaps may add a few, and the caller's bar then grows its total
    span = min(images.shape[2], sum((o.z_range[1] - o.z_range[0] + 1) if o.z_range else images.shape[2]
                                    for o in work_objects))
    planned = min(span, -(-span // max(1, config.stride)) + 1)
    encoder = SliceEncoder(model, images, crop=crop, batch_size=config.batch_size, progress=progress,
                           total_hint=planned)
    view = None
    if crop is not None and config.zoom_check:
        whole = SliceEncoder(model, images, batch_size=config.batch_size, progress=progress, total_hint=planned)
        encoder, view = choose_view(encoder, whole, work_objects)
        crop = encoder.crop if view["chosen"] == "crop" else None
    results = propagate(encoder, work_objects, config)
    encoded = encoder.encoded + (view["extra_encoded"] if view else 0)
    encoder.cache.clear()  # the embeddings are done with: their memory is the fusion's
    masks, scores = _object_masks(results, images.shape)
    fused, lost = fuse(masks, scores, [o.label for o in work_objects], overlap=overlap,
                       keep_largest=keep_largest, fill_holes=fill_holes)
    tapered = {}
    for obj in work_objects if taper else ():
        mask = fused == obj.label
        removed = mask & ~taper_ends(mask, taper, tuple(working.spacing[:2]), obj.z_range)
        fused[removed] = 0
        tapered[obj.label] = int(removed.sum())
    labels_array = reo.invert(fused)
    segments = {o.label: {"name": o.name, "color": _color(o.label)} for o in objects}
    labels = Volume(labels_array, volume.affine, {"segments": segments, "image_source": volume.meta.get("source"),
                                                  "modality": win.modality})
    seconds = time.perf_counter() - t0
    summary = []
    for obj, res in zip(objects, results):
        ks = np.flatnonzero((labels_array == obj.label).any(axis=(0, 1)))
        summary.append({
            **obj.as_dict(),  # name, label, boxes, z_range (and text, detector, score when set)
            "slices": [int(ks[0]), int(ks[-1])] if ks.size else None,
            "mean_score": round(float(np.mean([s.score for s in res.slices.values()])), 4) if res.slices else 0.0,
            "interpolated_slices": sorted(int(k) for k, s in res.slices.items() if s.interpolated),
            "stopped": res.stop_reasons, "voxels_lost_to_overlap": lost.get(obj.label, 0),
            "voxels_removed_by_taper": tapered.get(obj.label, 0),
            "alternatives": [float(a) for a in res.alternatives],
        })
    log.info("segmented %d object(s) in %.1f s (%d slices encoded)", len(objects), seconds, encoded)
    return SegmentationResult(labels, summary, win, describe_model(model), seconds, encoded,
                              {"encoded_sections": encoder.sections_encoded, "non_finite_voxels": non_finite,
                               "zoom_check": view,
                               "overlap": overlap, "keep_largest": keep_largest, "fill_holes": fill_holes,
                               "taper": taper or None, "zoom": zoom, "crop": list(crop) if crop else None,
                               "detector": detector if isinstance(detector, str) or detector is None
                               else detector.name,
                               "propagation": _config_dict(config)}, objects, proposals, detect_seconds)


def _config_dict(config: PropagationConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def _object_masks(results: Sequence[ObjectResult], shape) -> tuple[list[np.ndarray], list[np.ndarray]]:
    masks, scores = [], []
    for res in results:
        mask = np.zeros(shape, bool)
        score = np.zeros(shape[2], np.float32)
        for k, sl in res.slices.items():
            mask[:, :, k] = sl.mask
            score[k] = sl.score
        masks.append(mask)
        scores.append(score)
    return masks, scores


def _color(label: int):
    from .io.labels import default_color

    return default_color(label)
