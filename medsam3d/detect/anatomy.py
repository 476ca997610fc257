"""``ct-anatomy``: a weight-free detector for the CT anatomy whose answer is physics, not learning.

Classical image analysis on Hounsfield units (thresholds, connected components, morphology,
region growing; scipy and scikit-image), for a small vocabulary:

* ``body`` (body outline): the largest connected object above -500 HU after an in-plane
  opening (which detaches the table and the blankets), its holes filled slice by slice;
* ``lungs``, ``left lung``, ``right lung``: air-like voxels (-1024..-400 HU) inside the body
  whose component's mean lies above -980 HU (parenchyma, not bowel gas) and holds at least
  ``min_lung_ml``; the airways are taken out, left and right come from the components'
  centres in patient coordinates, or, when the two lungs touch, from a split at the body's
  midline;
* ``airways`` (trachea and main bronchi): the lumen (< -900 HU) connected to a round air
  column near the body's centre on the most superior slices, grown in 3D and stopped before it
  leaks into the parenchyma;
* ``bones``: hysteresis thresholding (seeds above ``bone_high`` HU, grown through voxels
  above ``bone_low``) inside the body, closed and with small holes (marrow) filled;
* ``fat``: -190..-30 HU inside the body, away from the edges of air (partial volume).

Each answer is a :class:`~medsam3d.detect.Detection` with the ``mask``, its key slice (where
the mask is largest), the box there and the ``z_range``; ``source`` is
``"ct-anatomy (classical)"``, never a model's. The lungs are compact objects whose boxes can
seed the engine (``seed=True``); the others are answers as masks only (``seed=False``).
Non-CT input (no Hounsfield units) is refused.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..errors import DetectorError
from ..volume import Volume
from .base import Detection, Progress

log = logging.getLogger(__name__)

NAME = "ct-anatomy"
SOURCE = "ct-anatomy (classical)"

#: the targets and the texts that name them (lower case, spaces collapsed)
VOCABULARY: dict[str, tuple[str, ...]] = {
    "body": ("body", "body outline", "body contour", "patient", "skin"),
    "lungs": ("lungs", "lung", "both lungs"),
    "left lung": ("left lung", "lung left", "lung_left"),
    "right lung": ("right lung", "lung right", "lung_right"),
    "airways": ("airways", "airway", "trachea", "bronchi", "trachea and bronchi"),
    "bones": ("bones", "bone", "skeleton"),
    "fat": ("fat", "adipose tissue", "fat tissue"),
}
#: targets whose boxes seed the engine (compact organs); the others are answered by their masks
SEEDABLE = ("lungs", "left lung", "right lung")
_ALIASES = {alias: target for target, aliases in VOCABULARY.items() for alias in aliases}


def target_of(text: str) -> str:
    """The vocabulary target ``text`` names, or a one-line :class:`DetectorError` listing them."""
    key = " ".join(str(text or "").lower().replace("_", " ").split())
    if key not in _ALIASES:
        raise DetectorError(f"expected a text that detector '{NAME}' can find ({', '.join(VOCABULARY)}), "
                            f"found {text!r}")
    return _ALIASES[key]


class AnatomyDetector:
    """CT anatomy by Hounsfield thresholds and morphology (see the module docstring).

    Options are keyword-only: ``bone_low``/``bone_high`` (HU, hysteresis), ``fat_range`` (HU),
    ``min_lung_ml`` (smallest lung component kept), ``modality_check`` (False: skip the test
    that the input is a CT in Hounsfield units). Results of one volume are cached per target.
    """

    name = NAME

    def __init__(self, *, bone_low: float = 200.0, bone_high: float = 300.0,
                 fat_range: tuple[float, float] = (-190.0, -30.0), min_lung_ml: float = 5.0,
                 modality_check: bool = True) -> None:
        self.bone_low, self.bone_high = float(bone_low), float(bone_high)
        self.fat_range = (float(fat_range[0]), float(fat_range[1]))
        self.min_lung_ml = float(min_lung_ml)
        self.modality_check = bool(modality_check)
        self._cache: dict[str, np.ndarray] = {}
        self._cache_key: int | None = None
        self.timings: dict[str, float] = {}

    # -- the Detector protocol -------------------------------------------------------------
    def detect(self, volume: Volume, text: str, *, progress: Progress | None = None) -> list[Detection]:
        """The mask of the target ``text`` names (one detection, or none when it is not in the image)."""
        target = target_of(text)
        mask = self.mask(volume, target, progress=progress)
        if not mask.any():
            return []
        return [_detection(text, mask, seed=target in SEEDABLE)]

    # -- masks -----------------------------------------------------------------------------
    def mask(self, volume: Volume, target: str, *, progress: Progress | None = None) -> np.ndarray:
        """The boolean mask of ``target`` (a key of :data:`VOCABULARY`) on the volume's grid."""
        if target not in VOCABULARY:
            target = target_of(target)
        if self._cache_key != id(volume):
            self._check_ct(volume)
            self._cache, self._cache_key, self.timings = {}, id(volume), {}
        if target not in self._cache:
            t0 = time.perf_counter()
            hu = np.asarray(volume.array)
            if hu.dtype.kind == "f" and not np.isfinite(hu).all() or float(hu.min()) < -1024:
                hu = np.clip(np.nan_to_num(hu, nan=-1024.0), -1024, None)  # padding outside the field of view
            axes = _axes(volume)
            if target == "body":
                out = _body(hu, axes)
            elif target == "airways":
                out = _airways(hu, self.mask(volume, "body"), axes, volume.spacing)
            elif target in ("lungs", "left lung", "right lung"):
                left, right = _lungs(hu, self.mask(volume, "body"), self.mask(volume, "airways"), axes,
                                     volume.voxel_volume_mm3, self.min_lung_ml)
                self._cache["left lung"], self._cache["right lung"] = left, right
                self._cache["lungs"] = left | right
                out = self._cache[target]
            elif target == "bones":
                out = _bones(hu, self.mask(volume, "body"), axes, self.bone_low, self.bone_high,
                             volume.spacing)
            else:
                out = _fat(hu, self.mask(volume, "body"), self.fat_range)
            self._cache[target] = out
            self.timings[target] = time.perf_counter() - t0
            log.info("%s: %s in %.2f s (%d voxels)", NAME, target, self.timings[target], int(out.sum()))
            if progress is not None:
                progress(1, 1, f"{NAME}: {target}")
        return self._cache[target]

    def _check_ct(self, volume: Volume) -> None:
        if not self.modality_check:
            return
        header = str(volume.meta.get("modality") or "").upper()
        if header and header != "CT":
            raise DetectorError(f"expected a CT in Hounsfield units for detector '{NAME}', found modality "
                                f"{header}; it answers CT only (use a learned detector for other images)")
        a = np.asarray(volume.array)
        sample = a[:: max(1, a.shape[0] // 96), :: max(1, a.shape[1] // 96), :]
        p1, hi = float(np.nanpercentile(sample, 1)), float(np.nanmax(sample))
        if not (p1 < -500 and hi > 100):
            raise DetectorError(f"expected a CT in Hounsfield units for detector '{NAME}' (air near -1000 HU), "
                                f"found intensities {float(np.nanmin(sample)):.0f}..{hi:.0f} with 1st percentile "
                                f"{p1:.0f}; it answers CT only")


def _detection(text: str, mask: np.ndarray, *, seed: bool) -> Detection:
    """The mask's key slice (largest area), its box there and its slice range."""
    areas = mask.sum(axis=(0, 1))
    k = int(np.argmax(areas))
    ks = np.flatnonzero(areas)
    ii, jj = np.nonzero(mask[:, :, k])
    return Detection(text, 1.0, k, (int(ii.min()), int(jj.min()), int(ii.max()), int(jj.max())),
                     (int(ks[0]), int(ks[-1])), mask, SOURCE, seed=seed)


# -- geometry ------------------------------------------------------------------------------
class _Axes:
    """Which voxel axis is axial (slices for 2D operations), which points to the patient's left."""

    def __init__(self, axial: int, lr: int, left_sign: float, superior_sign: float) -> None:
        self.axial, self.lr, self.left_sign, self.superior_sign = axial, lr, left_sign, superior_sign


def _axes(volume: Volume) -> _Axes:
    m = np.asarray(volume.affine, float)[:3, :3]
    axial = int(np.argmax(np.abs(m[2])))
    lr = int(np.argmax(np.abs(m[0])))
    # RAS: +x is the patient's right; an axis whose index grows with -x grows towards the left
    return _Axes(axial, lr, -float(np.sign(m[0, lr])), float(np.sign(m[2, axial]) or 1.0))


# -- targets -------------------------------------------------------------------------------
def _inplane(axes: _Axes, footprint: np.ndarray) -> np.ndarray:
    """A 3D structuring element that acts within each axial slice only."""
    st = np.zeros((footprint.shape[0],) * 3, bool)
    index = [slice(None)] * 3
    index[axes.axial] = footprint.shape[0] // 2
    st[tuple(index)] = footprint
    return st


def _fill_inplane(mask: np.ndarray, axes: _Axes) -> np.ndarray:
    """Holes filled slice by slice: background not connected, within its slice, to the slice's edge."""
    from scipy import ndimage

    labels, _ = ndimage.label(~mask, structure=_inplane(axes, ndimage.generate_binary_structure(2, 1)))
    edge = [labels.take(i, axis=a) for a in range(3) if a != axes.axial for i in (0, -1)]
    outside = np.unique(np.concatenate([e.ravel() for e in edge]))
    return ~np.isin(labels, outside[outside > 0]) & (labels >= 0) | mask


def _coarse(hu: np.ndarray, axes: _Axes) -> np.ndarray:
    """Every other voxel in-plane (a quarter of the voxels) for the large structures."""
    index = [slice(None, None, 2)] * 3
    index[axes.axial] = slice(None)
    return hu[tuple(index)]


def _fine(coarse: np.ndarray, axes: _Axes, shape: tuple[int, ...]) -> np.ndarray:
    """A coarse mask back on the full grid (nearest neighbour)."""
    out = coarse
    for a in range(3):
        if a != axes.axial:
            out = np.repeat(out, 2, axis=a)
    return out[tuple(slice(0, n) for n in shape)]


def _body(hu: np.ndarray, axes: _Axes) -> np.ndarray:
    """Every large object above -500 HU after an in-plane opening (trunk and arms, not the table).

    Found on every other voxel in-plane, then its outline snapped back to the threshold at full
    resolution (what lies inside, the lungs among it, stays)."""
    from scipy import ndimage

    dense = _coarse(hu, axes) > -500
    disk = np.ones((3, 3), bool)
    st = _inplane(axes, disk)
    opened = ndimage.binary_opening(dense, structure=st)
    labels, n = ndimage.label(opened)
    if n == 0:
        return np.zeros(hu.shape, bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    body = np.isin(labels, np.flatnonzero(sizes >= 0.02 * sizes.max()))
    body = ndimage.binary_dilation(body, structure=st) & dense | body  # give back what the opening took
    body = _fill_inplane(body, axes)
    core = ndimage.binary_erosion(body, structure=st, iterations=2)
    rim = ndimage.binary_dilation(body, structure=st)
    return _fine(core, axes, hu.shape) | (_fine(rim, axes, hu.shape) & (hu > -500))


def _airways(hu: np.ndarray, body: np.ndarray, axes: _Axes, spacing) -> np.ndarray:
    """The lumen connected to the trachea found on the most superior slices (empty without one)."""
    from scipy import ndimage

    n_slices = hu.shape[axes.axial]
    top = range(n_slices - 1, -1, -1) if axes.superior_sign > 0 else range(n_slices)
    lumen = (hu < -900) & body
    pixel_mm2 = float(np.prod([s for a, s in enumerate(spacing) if a != axes.axial]))
    min_area = 80.0 / pixel_mm2  # the trachea's lumen: 1.5-2.5 cm across
    seed = None
    for k in list(top)[: max(1, n_slices // 10)]:
        index = [slice(None)] * 3
        index[axes.axial] = k
        sl_body = body[tuple(index)]
        if not sl_body.any():
            continue
        labels, n = ndimage.label(lumen[tuple(index)])
        centre = np.array(ndimage.center_of_mass(sl_body))
        extent = np.ptp(np.argwhere(sl_body), axis=0) + 1
        for value in range(1, n + 1):
            comp = labels == value
            area = int(comp.sum())
            if not min_area <= area <= 0.02 * sl_body.sum():
                continue
            c = np.array(ndimage.center_of_mass(comp))
            if np.any(np.abs(c - centre) > 0.2 * extent):
                continue  # not near the body's centre
            pts = np.argwhere(comp)
            if np.ptp(pts, axis=0).max() + 1 > 3 * max(1, np.ptp(pts, axis=0).min() + 1):
                continue  # not round
            seed = (k, comp)
            break
        if seed is not None:
            break
    if seed is None:
        return np.zeros(hu.shape, bool)
    k, comp = seed
    seeds = np.zeros(hu.shape, bool)
    index = [slice(None)] * 3
    index[axes.axial] = k
    seeds[tuple(index)] = comp
    out = np.zeros(hu.shape, bool)
    seed_ml = comp.sum()
    for threshold in (-950, -975, -990):  # a tighter lumen when the growth leaks into the lungs
        labels, _ = ndimage.label((hu < threshold) & body)
        values = np.unique(labels[seeds])
        out = np.isin(labels, values[values > 0])
        if out.sum() < 60 * seed_ml * max(1, n_slices // 10):
            break
    if out.sum() * float(np.prod(spacing)) < 1000.0:  # under 1 mL: a bubble (the oesophagus), no airway
        return np.zeros(hu.shape, bool)
    return out


def _lungs(hu: np.ndarray, body: np.ndarray, airways: np.ndarray, axes: _Axes, voxel_mm3: float,
           min_ml: float) -> tuple[np.ndarray, np.ndarray]:
    """Found on every other voxel in-plane, then their outline snapped back to -400 HU at full resolution."""
    from scipy import ndimage

    st = _inplane(axes, ndimage.generate_binary_structure(2, 1))
    chu = _coarse(hu, axes)
    air = (chu < -400) & _coarse(body, axes) & ~ndimage.binary_dilation(_coarse(airways, axes), structure=st)
    air = ndimage.binary_opening(air, structure=st)
    labels, n = ndimage.label(air)
    empty = np.zeros(hu.shape, bool)
    if n == 0:
        return empty, empty
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    # parenchyma (about -850 HU, with vessels) against gas (-1000 HU with a partial-volume rim)
    parenchyma = np.bincount(labels.ravel(), weights=(chu > -920).ravel(), minlength=n + 1)
    keep = [v for v in range(1, n + 1)
            if sizes[v] * 4 * voxel_mm3 / 1000 >= min_ml and parenchyma[v] > 0.5 * sizes[v]]
    if not keep:
        return empty, empty
    lungs = _fill_inplane(np.isin(labels, keep), axes)  # the vessels inside the parenchyma
    # left and right: components wholly on one side of the body's midline, else split at it
    coord = np.arange(lungs.shape[axes.lr])
    profile = _coarse(body, axes).sum(axis=tuple(a for a in range(3) if a != axes.lr))
    midline = float((coord * profile).sum() / max(profile.sum(), 1))
    shape = [1, 1, 1]
    shape[axes.lr] = -1
    side = np.broadcast_to((coord.reshape(shape) - midline) * axes.left_sign > 0, lungs.shape)  # patient's left
    left = np.zeros(lungs.shape, bool)
    labels, n = ndimage.label(lungs)
    for value, where in enumerate(ndimage.find_objects(labels), start=1):
        comp = labels[where] == value
        frac = float(side[where][comp].mean())
        if frac > 0.9:
            left[where] |= comp
        elif frac >= 0.1:  # both lungs in one component: split at the midline
            left[where] |= comp & side[where]
    out = []
    for part in (left, lungs & ~left):
        core = ndimage.binary_erosion(part, structure=st)
        rim = ndimage.binary_dilation(part, structure=st)
        out.append(_fine(core, axes, hu.shape) | (_fine(rim, axes, hu.shape) & (hu < -400)))
    out[1] &= ~out[0]
    return out[0], out[1]


def _bones(hu: np.ndarray, body: np.ndarray, axes: _Axes, low: float, high: float, spacing) -> np.ndarray:
    from scipy import ndimage

    # two voxels in from the body's outline (one on the every-other-voxel grid): no skin, no table
    inside = _fine(ndimage.binary_erosion(_coarse(body, axes), structure=_inplane(axes, np.ones((3, 3), bool))),
                   axes, hu.shape)
    # hysteresis: the connected regions above `low` that reach above `high` somewhere, and hold
    # 100 mm3 at least (smaller ones are calcifications and contrast specks)
    bone = (hu > low) & inside
    labels, n = ndimage.label(bone)
    keep = np.zeros(n + 1, bool)
    keep[np.unique(labels[bone & (hu > high)])] = True
    keep &= np.bincount(labels.ravel(), minlength=n + 1) * float(np.prod(spacing)) >= 100.0
    keep[0] = False
    full = bone = keep[labels]
    found = ndimage.find_objects(bone.astype(np.uint8))
    if not found:
        return full
    box = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in found[0])  # the rest works around the bones only
    plane = _inplane(axes, ndimage.generate_binary_structure(2, 1))
    bone, hu = ndimage.binary_closing(bone[box], structure=plane), hu[box]
    # holes in the bone within a slice: marrow (cancellous above 100 HU, fatty below -20 HU) is
    # bone, the spinal canal (cord and CSF, about 0-60 HU) is not; looked for around each bone only
    pixel_mm2 = float(np.prod([s for a, s in enumerate(spacing) if a != axes.axial]))
    labels, n = ndimage.label(bone)
    for value, where in enumerate(ndimage.find_objects(labels), start=1):
        if where is None:
            continue
        part = labels[where] == value
        holes = _fill_inplane(part, axes) & ~part
        hole_labels, m = ndimage.label(holes, structure=plane)
        if not m:
            continue
        sizes = np.bincount(hole_labels.ravel(), minlength=m + 1)
        means = np.bincount(hole_labels.ravel(), weights=hu[where].ravel().astype(np.float64),
                            minlength=m + 1) / np.maximum(sizes, 1)
        fill = (means > 100) | (means < -20) | (sizes * pixel_mm2 <= 20)
        fill[0] = False
        bone[where] |= fill[hole_labels]
    full[box] = bone
    return full


def _fat(hu: np.ndarray, body: np.ndarray, fat_range: tuple[float, float]) -> np.ndarray:
    from scipy import ndimage

    fat = (hu >= fat_range[0]) & (hu <= fat_range[1]) & body
    near_air = ndimage.binary_dilation(hu < -400, iterations=1)  # partial volume at air edges
    fat &= ~near_air
    return ndimage.binary_opening(fat, iterations=1)

