"""Intensity preprocessing per modality: CT windows, MR percentile clipping.

The result is a float32 volume in [0, 1] that every model adapter takes as input; the
choice made is returned as a JSON-ready record kept with the segmentation result.

Modality comes, in order, from the caller (``--modality``), the DICOM header, or the
intensities: a volume whose 1st percentile is below -500 and whose maximum is above 100
is taken as CT in Hounsfield units (air at -1000 HU is always present around a patient
or in the lungs, bowel, etc.), anything else as MR (non-negative, arbitrary units).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import Medsam3dError, PromptError
from .volume import Volume

log = logging.getLogger(__name__)

#: CT presets: name -> (level, width) in HU
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft-tissue": (40.0, 400.0),
    "abdomen": (50.0, 350.0),
    "liver": (60.0, 160.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}
#: modalities a caller may give or a DICOM header may state (all but CT get percentile clipping)
MODALITIES = ("CT", "MR", "PT", "US")
MR_PERCENTILES = (0.5, 99.5)
ROI_PERCENTILES = (1.0, 99.0)
ROI_WIDEN = 0.2


@dataclass(frozen=True)
class Window:
    """What was done to the intensities (recorded with every result)."""

    modality: str
    method: str  # "ct-window" | "percentile" | "minmax"
    lower: float
    upper: float
    name: str | None = None
    modality_source: str = "given"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def finite_intensities(volume: Volume) -> tuple[Volume, int]:
    """The volume with its NaN and infinite voxels set to its lowest finite value, and their count.

    Such voxels mark "no data" (outside a resampled field of view, say); left in, they turn
    every percentile and the model's min-max normalisation into NaN, and the masks into
    nothing. An image without two different finite values has nothing to segment and is refused.
    """
    array = volume.array
    count = 0
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        count = int(bad.sum())
        if count == array.size:
            raise Medsam3dError("expected an image with finite intensities, found every voxel NaN or infinite; "
                                "check the file")
        if count:
            lowest = float(array[~bad].min())
            log.warning("%d voxel(s) NaN or infinite: treated as the lowest intensity, %g", count, lowest)
            volume = Volume(np.where(bad, array.dtype.type(lowest), array), volume.affine, volume.meta)
    lo, hi = float(volume.array.min()), float(volume.array.max())
    if lo == hi:
        raise Medsam3dError(f"expected an image whose intensities vary, found every voxel equal to {lo:g}; "
                            "check that the file holds the image, not an empty or constant volume")
    return volume, count


def guess_modality(volume: Volume) -> tuple[str, str]:
    """Return (modality, how it was decided)."""
    header = str(volume.meta.get("modality") or "").upper()
    if header in MODALITIES:
        return header, "header"
    sample = volume.array[:: max(1, volume.shape[0] // 64), :: max(1, volume.shape[1] // 64), :]
    p1 = float(np.percentile(sample, 1))
    high = float(sample.max())
    if p1 < -500 and high > 100:
        return "CT", f"intensities (1st percentile {p1:.0f} < -500 HU)"
    return "MR", f"intensities (1st percentile {p1:.0f}, no air in HU)"


def parse_window(spec: str | None) -> tuple[str | None, tuple[float, float] | None]:
    """``"soft-tissue"`` -> preset; ``"40,400"`` -> explicit level,width; None -> auto."""
    if spec in (None, "", "auto"):
        return None, None
    if spec in CT_WINDOWS:
        return spec, CT_WINDOWS[spec]
    if spec in ("percentile", "mr"):
        return "percentile", None
    if spec == "roi":
        return "roi", None
    try:
        level, width = (float(x) for x in spec.split(","))
    except ValueError:
        raise PromptError(
            f"expected a window preset ({', '.join(CT_WINDOWS)}, percentile) or 'LEVEL,WIDTH', found {spec!r}"
        ) from None
    if width <= 0:
        raise PromptError(f"expected a positive window width, found {width}")
    return f"{level:g},{width:g}", (level, width)


def choose_window(volume: Volume, window: str | None = None, modality: str | None = None,
                  roi_values: np.ndarray | None = None) -> Window:
    """Pick the intensity window (see the module docstring).

    ``roi`` fits the window to ``roi_values`` (the voxels inside the prompt boxes): their
    1st..99th percentiles, widened by ``ROI_WIDEN`` of that range on each side, so a
    low-contrast tumour gets the full grey range.
    """
    if modality:
        mod, source = modality.upper(), "given"
    else:
        mod, source = guess_modality(volume)
    name, level_width = parse_window(window)
    if name == "roi":
        if roi_values is None or roi_values.size < 4:
            raise PromptError("expected prompt boxes to fit the 'roi' window to, found none")
        lo, hi = (float(v) for v in np.percentile(roi_values, ROI_PERCENTILES))
        pad = ROI_WIDEN * max(hi - lo, 1e-3)
        return Window(mod, "roi", lo - pad, hi + pad, "roi", source)
    if level_width is not None:
        level, width = level_width
        return Window(mod, "ct-window", level - width / 2, level + width / 2, name, source)
    if mod == "CT" and name != "percentile":
        level, width = CT_WINDOWS["soft-tissue"]
        return Window(mod, "ct-window", level - width / 2, level + width / 2, "soft-tissue", source)
    lo, hi = np.percentile(volume.array, MR_PERCENTILES)
    if hi <= lo:
        hi = lo + 1.0
    return Window(mod, "percentile", float(lo), float(hi), f"p{MR_PERCENTILES[0]}-p{MR_PERCENTILES[1]}", source)


def apply_window(array: np.ndarray, window: Window) -> np.ndarray:
    """Clip to the window and scale to float32 [0, 1]."""
    out = (np.asarray(array, dtype=np.float32) - window.lower) / max(window.upper - window.lower, 1e-6)
    return np.clip(out, 0.0, 1.0, out=out)


class WindowedVolume:
    """A volume seen through a window, applied on each read: ``volume[index]`` is
    ``apply_window(array[index], window)``, the same values as windowing the whole volume
    first, without its float32 copy (1 GB for a 512 x 512 x 1000 CT)."""

    dtype = np.dtype(np.float32)

    def __init__(self, array: np.ndarray, window: Window) -> None:
        self.array, self.window = array, window

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def ndim(self) -> int:
        return self.array.ndim

    def __getitem__(self, index) -> np.ndarray:
        return apply_window(self.array[index], self.window)
