"""Weight-free test doubles: a 'model' whose answer is known, for propagation logic tests."""

from __future__ import annotations

import numpy as np


class ThresholdModel:
    """Segments bright pixels (> 0.5) inside the box; score = 0.95 (0.1 for an empty mask).

    Follows the SliceModel interface: images are (rows, cols) float in [0, 1]; boxes are
    xyxy (x = column, y = row) inclusive.
    """

    name = "threshold"
    device = "cpu"
    weights_sha256 = None
    runtime = "numpy"
    checkpoint = None
    trust_checkpoint = False
    can_blend = False

    @staticmethod
    def blend(fa, fb, w):
        raise NotImplementedError("ThresholdModel cannot blend embeddings (can_blend is False)")

    def __init__(self):
        self.encoded = 0

    def encode(self, images):
        self.encoded += len(images)
        return [np.asarray(im) for im in images]

    def decode(self, image, boxes):
        masks, scores = [], []
        for x0, y0, x1, y1 in np.asarray(boxes).reshape(-1, 4):
            m = np.zeros(image.shape, bool)
            r0, r1 = int(max(0, np.floor(y0))), int(min(image.shape[0] - 1, np.ceil(y1)))
            c0, c1 = int(max(0, np.floor(x0))), int(min(image.shape[1] - 1, np.ceil(x1)))
            m[r0 : r1 + 1, c0 : c1 + 1] = image[r0 : r1 + 1, c0 : c1 + 1] > 0.5
            masks.append(m)
            scores.append(0.95 if m.any() else 0.1)
        return np.array(masks), np.array(scores, np.float32)


def ellipsoid(shape, center, radii):
    """Boolean ellipsoid in index space."""
    grid = np.indices(shape).astype(float)
    d = sum(((grid[a] - center[a]) / radii[a]) ** 2 for a in range(3))
    return d <= 1.0


def visible(mask, min_area=4):
    """The part of a mask the engine keeps: slices with fewer than ``min_area`` voxels are noise."""
    out = mask.copy()
    out[:, :, mask.sum(axis=(0, 1)) < min_area] = False
    return out


class BlendingThresholdModel(ThresholdModel):
    """ThresholdModel whose 'embeddings' (the images) can be blended between slices."""

    can_blend = True

    @staticmethod
    def blend(fa, fb, w):
        return (1 - w) * fa + w * fb


class TightBoxModel(ThresholdModel):
    """Like a SAM-family model given a box drawn on the object's edge: the mask loses the ring
    of pixels within 1 px of the box's sides (it segments only inside the box shrunk by 1)."""

    def decode(self, image, boxes):
        shrunk = np.asarray(boxes, np.float32).reshape(-1, 4) + [1, 1, -1, -1]
        return super().decode(image, shrunk)


class EmbeddingThresholdModel(ThresholdModel):
    """ThresholdModel with a one-number image 'embedding' of a region: its mean intensity, and that of
    a 3-pixel ring around it (the optional ``region_embedding`` of a SliceModel)."""

    @staticmethod
    def region_embedding(image, mask):
        from scipy import ndimage

        if not mask.any():
            return None
        ring = ndimage.binary_dilation(mask, iterations=3) & ~mask
        return np.array([image[mask].mean()]), (np.array([image[ring].mean()]) if ring.any() else None)


def install_plugin(folder, monkeypatch, module: str, source: str, group: str, entry: str) -> None:
    """Install a one-module package into ``folder`` as pip would lay it out (the module and a
    ``.dist-info`` with one entry point ``entry`` in ``group``) and put ``folder`` on ``sys.path``
    for the test, so that ``importlib.metadata`` finds the entry point."""
    (folder / f"{module}.py").write_text(source)
    info = folder / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{entry}\n")
    monkeypatch.syspath_prepend(str(folder))
