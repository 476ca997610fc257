"""What the learned detectors share: their weights (local only), the slices they see, the scan.

Weights are a local folder in the Hugging Face layout (``config.json``, ``*.safetensors``,
the processor's files) or the id of a model already in the Hugging Face cache. Both are
loaded with ``local_files_only=True`` (nothing is ever downloaded) and ``use_safetensors=True``
(pickled ``.bin`` weights can run code and are refused); ``trust_remote_code`` stays off.

Each slice is shown to the detector as an 8-bit RGB image: the engine's window
(:func:`medsam3d.preprocess.choose_window`: soft tissue for CT, 0.5-99.5 percentiles
otherwise, or ``window=``), grey in the three channels, image rows along j and columns
along i, so a box ``(x0, y0, x1, y1)`` in pixels is ``(i0, j0, i1, j1)`` in voxels.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ...errors import DetectorError, require
from ...preprocess import Window, apply_window, choose_window
from ...volume import Volume
from ..base import Detection, Progress
from ..tracks import TrackOptions, find_tracks

log = logging.getLogger(__name__)

_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def transformers_module(title: str):
    """``transformers``, or a one-line error naming the extra that brings it."""
    module = require("transformers", f"the {title} detector", extra="detect")
    module.utils.logging.disable_progress_bar()
    return module


#: a folder whose subfolders, named as the detectors (``grounding-dino``, ``kosmos-2``, ``sam3``), hold their
#: weights: where detectors built by name alone (a batch's detector column, the server) look first
WEIGHTS_ENV = "MEDSAM3D_DETECTORS"


def resolve_weights(title: str, weights: str | Path | None, *, model_types: Sequence[str],
                    known: Sequence[str], name: str = "") -> Path:
    """The local folder holding ``title``'s weights, checked; a one-line error when there is none.

    ``weights``: a folder, or a model id looked up in the Hugging Face cache only. None: the
    folder ``$MEDSAM3D_DETECTORS/<name>`` when it exists, else the first of ``known`` found in
    the cache. The folder's ``config.json`` must name one of ``model_types`` and the weights
    must be safetensors.
    """
    if weights is None:
        shared = os.environ.get(WEIGHTS_ENV)
        if shared and (Path(shared).expanduser() / name).is_dir():
            weights = Path(shared).expanduser() / name
        else:
            weights = next((m for m in known if _cached_snapshot(m) is not None), known[0])
    spec = str(weights)
    how = (f"on a machine with network run 'hf download {known[0]} --local-dir DIR', copy DIR here and pass "
           f"--detector-weights DIR or put it at ${WEIGHTS_ENV}/{name or 'NAME'} (known to work: {', '.join(known)})")
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        folder = _cached_snapshot(spec) if _MODEL_ID.match(spec) else None
        if folder is None:
            where = "in the Hugging Face cache" if _MODEL_ID.match(spec) else "as a folder"
            raise DetectorError(f"expected {title} weights (a model folder, or a model id already in the Hugging "
                                f"Face cache), found none for {spec!r} {where}; {how}")
    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise DetectorError(f"expected a readable config.json in the {title} weights folder {folder}, found "
                            f"{type(exc).__name__}: {exc}; {how}") from None
    if model_type not in model_types:
        raise DetectorError(f"expected {title} weights (model_type {' or '.join(model_types)}) in {folder}, found "
                            f"model_type {model_type!r}; choose the detector that matches them or {how}")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        found = f"only {', '.join(pickled)} (pickled, which can run code)" if pickled else "no weights file"
        raise DetectorError(f"expected {title} weights as *.safetensors in {folder}, found {found}; download the "
                            f"safetensors revision of the model ({how})")
    return folder


def _cached_snapshot(model_id: str) -> Path | None:
    """The cached snapshot folder of ``model_id``, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def load_pretrained(title: str, folder: Path, model_class: str, device: str):
    """The processor and the model (eval mode, on ``device``) from ``folder``, offline and safetensors only."""
    from ...models.base import import_torch

    transformers = transformers_module(title)
    import_torch()  # the thread cap of set_threads, where torch was not imported when it was set
    t0 = time.perf_counter()
    try:
        processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
        model = getattr(transformers, model_class).from_pretrained(folder, local_files_only=True,
                                                                   use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DetectorError(f"expected loadable {title} weights and processor in {folder}, found "
                            f"{type(exc).__name__}: {first[:200]}; download the whole model folder again") from None
    model = model.eval().to(device)
    log.info("%s loaded from %s in %.1f s (%s parameters, %s)", title, folder, time.perf_counter() - t0,
             f"{sum(p.numel() for p in model.parameters()):,}", device)
    return processor, model


def slice_images(planes: Sequence[np.ndarray], window: Window) -> list[np.ndarray]:
    """Each slice ((I, J) intensities) as the 8-bit RGB image a detector sees: (J, I, 3), rows along j."""
    out = []
    for plane in planes:
        grey = np.round(apply_window(plane, window) * 255.0).astype(np.uint8).T
        out.append(np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2)))
    return out


def pixel_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """A detector's box ``(x0, y0, x1, y1)`` in pixel edges as inclusive voxel indices ``(i0, j0, i1, j1)``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, y0 = min(max(x0, 0.0), width - 1.0), min(max(y0, 0.0), height - 1.0)
    x1, y1 = min(max(x1 - 1.0, x0), width - 1.0), min(max(y1 - 1.0, y0), height - 1.0)
    return x0, y0, x1, y1


def fraction(detector: str, name: str, value: Any) -> float:
    """``value`` as a number in [0, 1]; a one-line error naming the option otherwise."""
    try:
        number = float(value) if not isinstance(value, (bool, str)) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not 0.0 <= number <= 1.0:
        raise DetectorError(f"expected {name} as a number in [0, 1] for detector '{detector}', found {value!r}")
    return number


def folder_options(folder: Path, detector: str) -> dict[str, Any]:
    """The default options in ``folder/medsam3d-detector.json`` (none: an empty dict)."""
    path = folder / OPTIONS_FILE
    if not path.is_file():
        return {}
    try:
        options = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DetectorError(f"expected a JSON object of options in {path}, found {type(exc).__name__}: {exc}; "
                            "correct or remove the file") from None
    if not isinstance(options, dict) or {"weights", "device"} & set(options):
        raise DetectorError(f"expected a JSON object of detector options (not weights or device) in {path}, found "
                            f"{str(options)[:80]}; correct or remove the file")
    log.info("%s: options %s from %s", detector, options, path)
    return options


def check_text(title: str, text: str) -> str:
    """The text stripped; a one-line error for an empty one."""
    if not isinstance(text, str) or not text.strip():
        raise DetectorError(f"expected a text naming what to find for the {title} detector (e.g. 'liver', "
                            f"'tumor'), found {text!r}")
    return " ".join(text.split())


#: a JSON object of default options in a weights folder: how a batch or the server, which build a detector by
#: name alone, get thresholds other than the defaults
OPTIONS_FILE = "medsam3d-detector.json"


class LearnedDetector:
    """A 2D learned detector run slice by slice and linked into 3D tracks (:mod:`..tracks`).

    Subclasses set ``name``, ``title``, ``model_class``, ``model_types``, ``known``
    (model ids, the first one the default), ``own_options`` (their own options and
    defaults, read into attributes by :meth:`_own`) and implement ``_answer`` (a batch of
    slice images and a text -> per image ``[(box_in_pixels, score[, mask]), ...]``;
    :meth:`answer` runs it without gradients).

    Options: ``weights`` (a folder or a cached model id), ``device`` ("auto", "cpu",
    "cuda"...), ``window`` (a window preset or "LEVEL,WIDTH"; default: the engine's),
    ``modality``, ``batch_size`` (slices per forward pass), the backend's own options, and
    the tracking options of :class:`~medsam3d.detect.tracks.TrackOptions` (``box_threshold``,
    ``stride``, ``min_slices``, ``min_score``, ``max_tracks``...). Options the call does not
    give are taken from the weights folder's ``medsam3d-detector.json`` when it has one.
    """

    name = ""
    title = ""
    model_class = ""
    model_types: tuple[str, ...] = ()
    known: tuple[str, ...] = ()
    default_box_threshold = 0.3
    own_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, *, weights: str | Path | None = None, device: str = "auto", **options: Any) -> None:
        from ...models.base import resolve_device

        self.folder = resolve_weights(self.title, weights, model_types=self.model_types, known=self.known,
                                      name=self.name)
        options = {**folder_options(self.folder, self.name), **options}
        general = {"window": None, "modality": None, "batch_size": 4}
        for key, default in general.items():
            setattr(self, key, options.pop(key, default))
        for key, default in self.own_options.items():
            self._own(key, options.pop(key, default))
        options.setdefault("box_threshold", self.default_box_threshold)
        try:
            self.options = TrackOptions(**options, learned=True)
        except TypeError:
            known = [*general, *self.own_options, *sorted(set(TrackOptions.__dataclass_fields__) - {"learned"})]
            unknown = sorted(set(options) - set(TrackOptions.__dataclass_fields__))
            raise DetectorError(f"expected options among weights, device, {', '.join(known)} for detector "
                                f"'{self.name}', found {', '.join(unknown) or sorted(options)}") from None
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise DetectorError(f"expected a positive integer batch_size for detector '{self.name}', found "
                                f"{self.batch_size!r}")
        self.device = resolve_device(device)
        self.processor, self.model = load_pretrained(self.title, self.folder, self.model_class, self.device)
        self.timings: dict[str, float] = {}

    def _own(self, key: str, value: Any) -> None:
        """Check and set one of ``own_options`` (the thresholds here; subclasses add theirs)."""
        setattr(self, key, fraction(self.name, key, value))

    def answer(self, images: list[np.ndarray], text: str) -> list[list[tuple]]:
        """Per image (8-bit RGB, rows along j), ``[(box (x0, y0, x1, y1) inclusive pixels, score[, mask]), ...]``."""
        import torch

        with torch.inference_mode():
            return self._answer(images, text)

    def _answer(self, images: list[np.ndarray], text: str) -> list[list[tuple]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def detect(self, volume: Volume, text: str, *, progress: Progress | None = None) -> list[Detection]:
        """The tracks of ``text`` in ``volume`` (kept ones first, rejected ones with their reason)."""
        text = check_text(self.title, text)
        window = choose_window(volume, self.window, self.modality)
        t0 = time.perf_counter()
        slices = [0]

        def detect_many(planes: list[np.ndarray]) -> list[list[tuple]]:
            slices[0] += len(planes)
            return self.answer(slice_images(planes, window), text)

        found = find_tracks(volume, _Batched(detect_many, self.batch_size), text, source=self.name,
                            options=self.options, progress=progress)
        self.timings = {"detect_s": round(time.perf_counter() - t0, 3), "slices": slices[0]}
        return found


class _Batched:
    """A slice detector that also answers ``batch_size`` slices at once (:func:`~..tracks.scan` batches them)."""

    def __init__(self, detect_many, batch_size: int) -> None:
        self.detect_many, self.batch_size = detect_many, batch_size

    def __call__(self, plane: np.ndarray) -> list[tuple]:
        return self.detect_many([plane])[0]
