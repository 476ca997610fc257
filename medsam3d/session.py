"""An interactive session: one volume loaded, the model warm, embeddings kept between prompts.

In the spirit of segment-anything's ``SamPredictor``: a server or the Slicer module keeps a
:class:`Session` open while the user draws boxes, so that one more box re-uses what was
computed. The engine asks the model to encode 2D images (axial slices, or crops of them,
and the orthogonal sections); :class:`CachedModel` keys each encoding by the exact pixels it
was given, so a later request for the same slice, crop, section and window costs nothing,
and any change (another window, a wider crop) is a different image and is encoded anew.
The cache is bounded in bytes and drops the least recently used embeddings first.

What a refine recomputes: every slice of every object is decoded again (decoding is cheap);
an image is encoded only when its pixels were not encoded before in this session. A new
box inside the current zoom crop, on a slice the engine had encoded, encodes nothing; a box
that widens the crop, or a changed window, re-encodes the slices the engine then visits.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from .errors import PromptError
from .volume import Volume

log = logging.getLogger(__name__)

#: default bound of a session's embedding cache (LiteMedSAM: 4 MB per embedding, about 256 slices)
DEFAULT_CACHE_MB = 1024


class CachedModel:
    """A :class:`~medsam3d.models.SliceModel` whose encodings are cached by image content.

    The SliceModel attributes, :meth:`decode`, :meth:`blend` and ``region_embedding`` are the wrapped model's;
    ``hits``, ``misses`` (images encoded) and ``nbytes`` say what the cache did. Calls from
    several threads are serialised by a lock (the engine itself calls from one thread).
    Features of a type whose size cannot be read (not arrays or tensors) count as
    ``fallback_bytes`` each, so the bound holds for any model.
    """

    fallback_bytes = 4 << 20

    def __init__(self, model, max_bytes: int = DEFAULT_CACHE_MB << 20):
        import threading

        self.model = model
        self.max_bytes = int(max_bytes)
        self._lock = threading.RLock()
        self._cache: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    # the SliceModel attributes, read through to the wrapped model
    name = property(lambda self: self.model.name)
    device = property(lambda self: self.model.device)
    runtime = property(lambda self: self.model.runtime)
    checkpoint = property(lambda self: self.model.checkpoint)
    weights_sha256 = property(lambda self: self.model.weights_sha256)
    trust_checkpoint = property(lambda self: self.model.trust_checkpoint)
    can_blend = property(lambda self: self.model.can_blend)

    def decode(self, features, boxes):
        return self.model.decode(features, boxes)

    def blend(self, fa, fb, w):
        return self.model.blend(fa, fb, w)

    @property
    def region_embedding(self):
        """The wrapped model's optional ``region_embedding`` (an AttributeError where it has none)."""
        return self.model.region_embedding

    @staticmethod
    def key(image: np.ndarray) -> bytes:
        image = np.ascontiguousarray(image, np.float32)
        return hashlib.blake2b(image.tobytes(), digest_size=20, person=str(image.shape).encode()[:16]).digest()

    def encode(self, images: Sequence[np.ndarray]) -> list[Any]:
        keys = [self.key(im) for im in images]
        with self._lock:
            return self._encode(images, keys)

    def _encode(self, images: Sequence[np.ndarray], keys: list[bytes]) -> list[Any]:
        todo = [n for n, k in enumerate(keys) if k not in self._cache]
        todo = [n for n in todo if keys[n] not in {keys[m] for m in todo if m < n}]  # one encoding per distinct image
        if todo:
            for n, features in zip(todo, self.model.encode([images[n] for n in todo])):
                size = _nbytes(features) or self.fallback_bytes
                self._cache[keys[n]] = (features, size)
                self.nbytes += size
            self.misses += len(todo)
        out = []
        for k in keys:
            self._cache.move_to_end(k)
            out.append(self._cache[k][0])
        self.hits += len(keys) - len(todo)
        self._evict()  # after the lookups: this call's own features stay until it returns them
        return out

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and len(self._cache) > 1:
            _, (_, size) = self._cache.popitem(last=False)
            self.nbytes -= size

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self.nbytes = 0

    def info(self) -> dict[str, int]:
        return {"entries": len(self._cache), "bytes": self.nbytes, "hits": self.hits, "misses": self.misses,
                "max_bytes": self.max_bytes}


def _nbytes(value: Any) -> int:
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if hasattr(value, "element_size") and hasattr(value, "nelement"):  # a torch tensor
        return int(value.element_size() * value.nelement())
    return 0


class Session:
    """One volume and a warm model, kept open between prompts.

    >>> session = medsam3d.Session("CT.nii.gz")                                  # doctest: +SKIP
    >>> first = session.segment({"version": 1, "objects": [{"name": "tumour", "slice": 23,
    ...                                                     "box": [57, 57, 100, 109]}]})  # doctest: +SKIP
    >>> fixed = session.refine("tumour", slice=27, box=[60, 60, 98, 104])           # doctest: +SKIP
    >>> record = session.run(outputs={"labels": "tumour.seg.nrrd"})              # doctest: +SKIP

    To refine and get the record in one pass (the engine runs once), build the prompts and run
    them: ``record = session.run(session.refined_prompts("tumour", slice=27, box=[...]))``
    (then set ``session.objects`` to them, as :meth:`refine` would).

    ``segment`` and ``refine`` return the engine's
    :class:`~medsam3d.pipeline.SegmentationResult`; ``run`` writes outputs and returns the
    :class:`~medsam3d.record.CaseRecord` of the current prompts (via :func:`medsam3d.run_case`).
    Engine options given to the constructor (``window``, ``zoom``, ``config``...) apply to every
    call unless a call overrides them. A session is not thread-safe: a server gives each
    client its own, or serialises calls to one.
    """

    def __init__(self, image: Volume | str | os.PathLike, *, model=None, model_name: str = "litemedsam",
                 checkpoint=None, device: str = "auto", trust_checkpoint: bool = False, threads: int | None = None,
                 series_uid: str | None = None, allow_tilt: bool = False, volume_index: int | None = None,
                 cache_mb: int = DEFAULT_CACHE_MB,
                 **options):
        from .io import as_volume, load
        from .models import load_model, set_threads
        from .run import check_engine_options

        check_engine_options(options)
        if threads is not None:
            set_threads(threads)
        self.volume = load(image, series_uid=series_uid, allow_tilt=allow_tilt, volume_index=volume_index) \
            if isinstance(image, (str, os.PathLike)) else as_volume(image)
        if model is None:
            model = load_model(model_name, checkpoint=checkpoint, device=device, trust_checkpoint=trust_checkpoint)
        self.model = model if isinstance(model, CachedModel) else CachedModel(model, int(cache_mb) << 20)
        self.options = options
        self.objects: list = []  # the current prompts, resolved (ObjectPrompt)
        self.result = None  # the last SegmentationResult

    def segment(self, prompts, **options):
        """Segment ``prompts`` (replacing the session's current prompts); see :func:`medsam3d.segment`."""
        from .pipeline import segment
        from .prompts import prompts_from

        objects = prompts_from(prompts, self.volume)
        before = self.model.misses
        self.result = segment(self.volume, objects, model=self.model, **{**self.options, **options})
        self.objects = self.result.prompts
        log.info("session: %d new encodings (%d cached)", self.model.misses - before, len(self.model._cache))
        return self.result

    def refined_prompts(self, obj: int | str, *, slice: int, box: Sequence[int], replace: bool = True) -> list:
        """The session's current prompts with a box on ``slice`` added to object ``obj`` (label or
        name), replacing its box there when ``replace``; nothing is segmented and the session is
        left unchanged. Feed the result to :meth:`segment` or :meth:`run` (what :meth:`refine`
        does); raises :class:`~medsam3d.errors.PromptError` for an unknown object or a bad box."""
        from dataclasses import replace as changed

        from .prompts import parse_prompts

        if not self.objects:
            raise PromptError("expected a segmentation to refine, found none in this session; call segment() first")
        matches = [o for o in self.objects if obj in (o.label, o.name)]
        if not matches:
            known = ", ".join(f"{o.name!r} (label {o.label})" for o in self.objects)
            raise PromptError(f"expected an object of this session ({known}), found {obj!r}")
        target = matches[0]
        # the box checked and read as a prompt file entry would be (whole numbers, inside the image)
        entry = {"name": target.name, "slice": slice, "box": list(box) if isinstance(box, (list, tuple)) else box}
        new = parse_prompts({"version": 1, "objects": [entry]}, self.volume)[0].boxes[0]
        boxes = [b for b in target.boxes if not (replace and b.slice == new.slice)] + [new]
        z_range = target.z_range
        if z_range is not None:
            z_range = (min(z_range[0], new.slice), max(z_range[1], new.slice))
        return [changed(o, boxes=boxes, z_range=z_range) if o is target else o for o in self.objects]

    def refine(self, obj: int | str, *, slice: int, box: Sequence[int], replace: bool = True, **options):
        """Add a box on ``slice`` to object ``obj`` (label or name), replacing its box there when
        ``replace``, and segment again with the cached embeddings (see the module docstring)."""
        return self.segment(self.refined_prompts(obj, slice=slice, box=box, replace=replace), **options)

    def run(self, prompts=None, **kwargs):
        """:func:`medsam3d.run_case` on this session's volume and warm model (the current prompts
        unless ``prompts`` is given); returns the record."""
        from .run import run_case

        prompts = self.objects if prompts is None else prompts
        if not prompts:
            raise PromptError("expected prompts, found none in this session; call segment() first or give them")
        return run_case(self.volume, prompts, model=self.model, **{**self.options, **kwargs})
