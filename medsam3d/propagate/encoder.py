"""The slice encoder: each slice's image embedding computed once, on demand, and cached.

One encoding serves every object and every stage of the engine (sections excepted). Slices
are encoded ahead in batches along a walk (``batch_size``), which pays on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: a progress callback: (done, total, message)
Progress = Callable[[int, int, str], None]


class SliceEncoder:
    """Encodes slices on demand (cached), batching ahead along a direction.

    ``images`` is the preprocessed (I, J, K) float volume; ``crop`` an optional
    (i0, j0, i1, j1) inclusive region encoded instead of the whole slice (zoom).
    """

    def __init__(self, model, images: np.ndarray, crop: tuple[int, int, int, int] | None = None,
                 batch_size: int = 1, progress: Progress | None = None, total_hint: int | None = None):
        self.model = model
        self.images = images
        I, J, _ = images.shape
        self.crop = crop or (0, 0, I - 1, J - 1)
        self.batch_size = max(1, int(batch_size))
        self.cache: dict[int, object] = {}
        self.used: set[int] = set()  # slices asked for (not merely encoded ahead in a batch)
        self.sections_encoded = 0
        self.progress = progress
        self.total_hint = total_hint or images.shape[2]

    def _slice_image(self, k: int) -> np.ndarray:
        i0, j0, i1, j1 = self.crop
        return self.images[i0 : i1 + 1, j0 : j1 + 1, k].T  # rows = j, columns = i

    def get(self, k: int, direction: int = 0, limit: tuple[int, int] | None = None):
        """Features of slice k. With a ``direction`` (a walk's step) the next slices along it, up to
        ``batch_size`` in all and within ``limit``, are encoded in the same batch. Slices encoded
        ahead are not :attr:`used` until asked for, so the segmentation does not depend on the
        batch size (a GPU gives the same masks as a CPU)."""
        self.used.add(k)
        if k not in self.cache:
            lo, hi = limit or (0, self.images.shape[2] - 1)
            todo = [k]
            step = direction
            nxt = k + step
            while step and len(todo) < self.batch_size and lo <= nxt <= hi:
                if nxt not in self.cache:
                    todo.append(nxt)
                nxt += step
            features = self.model.encode([self._slice_image(s) for s in todo])
            for s, f in zip(todo, features):
                self.cache[s] = f
            if self.progress:
                done = len(self.cache)  # the plan is an estimate: a longer walk raises the total
                self.progress(done, max(done, self.total_hint), f"encoded slice {k}")
        return self.cache[k]

    def blended(self, k: int):
        """Features for slice k blended linearly from the nearest encoded slices on each side (the
        model's ``blend``), or None when k is encoded, has no encoded slice on one side, or the
        model cannot blend."""
        if not self.model.can_blend or k in self.used:  # a model that cannot blend its features: encode
            return None
        below = [t for t in self.used if t < k]
        above = [t for t in self.used if t > k]
        if not below or not above:
            return None
        a, b = max(below), min(above)
        return self.model.blend(self.cache[a], self.cache[b], (k - a) / (b - a))

    def predict(self, k: int, boxes: np.ndarray, direction: int = 0, limit=None, blend: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
        """Masks (N, I, J) in full-slice coordinates for boxes (N, 4) in slice pixels (i, j), and
        the model's scores (N,). ``direction`` and ``limit`` as for :meth:`get`; with ``blend`` the
        slice is decoded on :meth:`blended` features where there are any."""
        i0, j0, i1, j1 = self.crop
        local = np.asarray(boxes, np.float32).reshape(-1, 4) - [i0, j0, i0, j0]
        features = self.blended(k) if blend else None
        if features is None:
            features = self.get(k, direction, limit)
        masks_rc, scores = self.model.decode(features, local)
        I, J, _ = self.images.shape
        full = np.zeros((len(local), I, J), bool)
        full[:, i0 : i1 + 1, j0 : j1 + 1] = masks_rc.transpose(0, 2, 1)
        return full, scores

    def region_embedding(self, k: int, mask: np.ndarray):
        """The model's mean embedding of slice k inside ``mask`` (I, J) and around it, on the features
        :meth:`predict` decoded it with (its own encoding once asked for, else a blend); None where the
        model has no ``region_embedding`` (see :func:`medsam3d.models.base.region_embedding`), k has no
        features or the mask no cell."""
        fn = getattr(self.model, "region_embedding", None)
        features = self.cache.get(k) if k in self.used else self.blended(k)
        if fn is None or features is None:
            return None
        i0, j0, i1, j1 = self.crop
        return fn(features, mask[i0 : i1 + 1, j0 : j1 + 1].T)

    @property
    def encoded(self) -> int:
        """How many slices were encoded (sections not counted)."""
        return len(self.cache)
