"""Carry a segmentation from one study onto another of the same patient, as prompts."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import FollowUpError
from ..prompts.types import MAX_LABEL, ObjectPrompt
from ..volume import Volume
from .register import Registration, identity, register_rigid, sitk_affine

log = logging.getLogger(__name__)

# Warn when less than this fraction of an object's volume lands inside the target image.
_PARTLY_OUTSIDE = 0.5


def resample_labels(labels: Volume, target: Volume, matrix: np.ndarray) -> np.ndarray:
    """``labels`` resampled (nearest neighbour) onto ``target``'s grid; ``matrix`` maps target RAS points to
    the labels' RAS points. Returns the (I, J, K) label array of the target grid (0 outside ``labels``)."""
    import SimpleITK as sitk

    from ..io._sitk import to_sitk

    array = np.asarray(labels.array)
    if array.dtype.kind == "f":
        array = np.rint(array).astype(np.int32)
    source = to_sitk(labels.with_array(array))
    reference = to_sitk(target.with_array(np.zeros(target.shape, np.uint8)))
    out = sitk.Resample(source, reference, sitk_affine(matrix), sitk.sitkNearestNeighbor, 0, source.GetPixelID())
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def transfer_prompts(source_labels: Volume, source_image: Volume, target_image: Volume, *,
                     register: bool = True, registration: Registration | None = None
                     ) -> tuple[list[ObjectPrompt], dict[str, Any]]:
    """Prompts for ``target_image`` from the segmentation ``source_labels`` of ``source_image`` (same patient).

    The target is registered rigidly onto the source (:func:`register_rigid`; ``register=False``
    takes the studies as aligned in patient space), the label map is resampled with nearest
    neighbour onto the target's grid through that transform, and each object becomes an
    :class:`ObjectPrompt` with the object's label value and name (the label map's segment
    names, else ``"label N"``, the names :func:`medsam3d.measure` gives; a repeated name gets
    its value appended), one box on the target slice ``k`` where the object is largest
    (inclusive ``(i0, j0, i1, j1)``) and its slice range (``z_range``), made as
    :func:`medsam3d.prompts.prompts_from_labels` makes them.
    ``registration``: a registration already computed for this pair (target -> source),
    used instead of a new one.

    Returns the prompts and the registration entry (``case_id``/``to``: the target's and the
    source's ``meta["case_id"]`` when they carry one). Raises :class:`FollowUpError` when an
    object lands outside the target image. The prompts can only find again what was segmented
    on the source: a lesion that is new on the target gets no prompt.
    """
    from ..io.labels import segment_table
    from ..prompts import prompts_from_labels

    if registration is None:
        registration = register_rigid(target_image, source_image) if register else identity(
            "register=False: the studies are taken as aligned in patient space (same FrameOfReference, "
            "patient not moved)")
    resampled = resample_labels(source_labels, target_image, registration.matrix)
    names = {value: str(info["name"]) for value, info in segment_table(source_labels).items()}
    present = [v for v in np.unique(source_labels.array).astype(np.int64).tolist() if v != 0]
    if not present:
        raise FollowUpError("expected at least one object in the source segmentation, found only background; "
                            "give a segmentation with labelled objects")
    for value in present:
        name = names.get(value, f"label {value}")
        if not 0 < value <= MAX_LABEL:
            raise FollowUpError(f"expected label values 1..{MAX_LABEL} in the source segmentation, found {value} "
                                f"({name!r}); relabel it")
        mask = resampled == value
        if not mask.any():
            raise FollowUpError(
                f"expected object {name!r} (label {value}) inside the target image after registration, found it "
                f"entirely outside ({registration.method} transform); check that both studies show the lesion or "
                "give the target prompts of its own")
        inside = mask.sum() * target_image.voxel_volume_mm3
        total = (np.asarray(source_labels.array) == value).sum() * source_labels.voxel_volume_mm3
        if inside < _PARTLY_OUTSIDE * total:
            log.warning("object %r (label %d): only %.0f%% of its volume lands inside the target image", name, value,
                        100.0 * inside / total)
    # one box on the slice where each object is largest and its slice range, as for an RTSTRUCT or a SEG
    moved = Volume(resampled, target_image.affine, {"segments": source_labels.segments})
    prompts = prompts_from_labels(moved)
    entry = registration.as_dict(case_id=_case_id(target_image), to=_case_id(source_image))
    log.info("transferred %d object(s) onto the target (%s)", len(prompts), registration.method)
    return prompts, entry


def _case_id(volume: Volume) -> str | None:
    value = volume.meta.get("case_id")
    return None if value is None else str(value)
