"""Rigid registration of one study of a patient onto another (SimpleITK), in RAS millimetres.

Two studies of one patient that share a DICOM FrameOfReference are aligned in patient space
only if the patient did not move between them; a follow-up is therefore registered onto its
baseline by default. The result is a 4x4 matrix in RAS mm that maps a point of the
follow-up to the same anatomical point of the baseline (``p_baseline = M @ p_followup``),
the convention ITK's resampling uses for the transform from the output (fixed) grid to the
input (moving) one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..volume import LPS_TO_RAS, Volume

log = logging.getLogger(__name__)

# A match this much worse than no registration at all means the optimiser wandered off.
_WORSE_TOLERANCE = 1e-3
# Less than this fraction of the follow-up's voxels inside the baseline after registration:
# the result is not trusted (the images barely overlap).
_MIN_OVERLAP = 0.2


@dataclass(frozen=True)
class Registration:
    """The result of :func:`register_rigid`.

    ``matrix``: 4x4, RAS mm, follow-up point -> baseline point. ``method``: ``"rigid"`` or
    ``"identity"`` (registration not asked for, not possible, or not trusted: ``note`` says
    which). ``metric``: the final Mattes mutual information (negative; lower is a better
    match) of the transform used; ``None`` when no registration ran (or ITK failed).
    ``details``: optimiser facts for the log (iterations, stop condition, the metric without
    registration, the start chosen).
    """

    matrix: np.ndarray
    method: str = "identity"
    metric: float | None = None
    note: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def rotation_deg(self) -> float:
        """The rotation angle of the matrix in degrees."""
        return rotation_angle_deg(self.matrix[:3, :3])

    def as_dict(self, *, case_id: str | None = None, to: str | None = None) -> dict[str, Any]:
        """The JSON-ready registration entry of a follow-up result."""
        return {"case_id": case_id, "to": to, "method": self.method,
                "metric": None if self.metric is None else round(float(self.metric), 6),
                "matrix": [[round(float(v), 9) for v in row] for row in self.matrix], "note": self.note}


def identity(note: str | None = None) -> Registration:
    """No registration: the two studies are taken as aligned in patient space."""
    return Registration(np.eye(4), "identity", None, note)


def rotation_angle_deg(rotation: np.ndarray) -> float:
    """Angle (degrees) of a 3x3 rotation matrix: ``acos((trace - 1) / 2)``."""
    c = (float(np.trace(rotation)) - 1.0) / 2.0
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def ras_to_lps_matrix(matrix: np.ndarray) -> np.ndarray:
    """The same point mapping written in LPS (ITK) coordinates: ``F @ M @ F`` with ``F = diag(-1, -1, 1, 1)``."""
    return LPS_TO_RAS @ np.asarray(matrix, dtype=np.float64) @ LPS_TO_RAS


def sitk_affine(matrix_ras: np.ndarray):
    """A ``SimpleITK.AffineTransform`` (LPS) that maps points as ``matrix_ras`` does in RAS."""
    import SimpleITK as sitk

    lps = ras_to_lps_matrix(matrix_ras)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(lps[:3, :3].ravel().tolist())
    transform.SetTranslation(lps[:3, 3].tolist())
    return transform


def _matrix_from_euler(transform) -> np.ndarray:
    """4x4 LPS matrix of an ITK centred rigid transform: ``p' = R (p - c) + c + t``."""
    rotation = np.array(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    centre = np.array(transform.GetCenter(), dtype=np.float64)
    shift = np.array(transform.GetTranslation(), dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = centre + shift - rotation @ centre
    return out


def _float_image(volume: Volume):
    import SimpleITK as sitk

    from ..io._sitk import to_sitk

    array = np.asarray(volume.array, dtype=np.float32)
    finite = np.isfinite(array)
    if not finite.all():  # NaN marks "no data": give it the lowest value so that it reads as background
        array = np.where(finite, array, np.nanmin(array) if finite.any() else 0.0).astype(np.float32)
    return sitk.Cast(to_sitk(volume.with_array(array)), sitk.sitkFloat32)


def _overlap(fixed_volume: Volume, moving_volume: Volume, matrix_ras: np.ndarray) -> float:
    """Fraction of the fixed grid's voxel centres (every 4th along each axis) that land inside the moving grid."""
    grids = np.meshgrid(*[np.arange(0, n, 4) for n in fixed_volume.shape], indexing="ij")
    ijk = np.stack([g.ravel() for g in grids], axis=1)
    ras = fixed_volume.index_to_ras(ijk) @ matrix_ras[:3, :3].T + matrix_ras[:3, 3]
    idx = moving_volume.ras_to_index(ras)
    inside = np.all((idx >= -0.5) & (idx <= np.asarray(moving_volume.shape) - 0.5), axis=1)
    return float(inside.mean()) if len(inside) else 0.0


def _itk_message(exc: Exception) -> str:
    """The last line of an ITK error, without the object's address (one short line for a note)."""
    import re

    lines = str(exc).strip().splitlines()
    text = lines[-1] if lines else type(exc).__name__
    return re.sub(r"\(0x[0-9a-fA-F]+\)", "", text).replace("ITK ERROR: ", "").strip()[:160]


def register_rigid(followup: Volume, baseline: Volume, *, seed: int = 7, sampling: float = 0.2, bins: int = 50,
                   shrink: tuple[int, ...] = (4, 2, 1), smoothing_mm: tuple[float, ...] = (2.0, 1.0, 0.0),
                   iterations: int = 200) -> Registration:
    """Register ``followup`` rigidly onto ``baseline``; the matrix maps follow-up RAS points to baseline ones.

    Method: a rigid (Euler 3D) transform maximising Mattes mutual information (``bins``
    histogram bins, a random ``sampling`` fraction of the follow-up's voxels drawn with the
    fixed ``seed``, so that a rerun gives the same matrix), linear interpolation, regular
    step gradient descent with parameter scales from physical shifts, in a multi-resolution
    pyramid (``shrink`` factors with Gaussian ``smoothing_mm``). The start is the best (by
    the metric) of three: no motion (rotation about the follow-up's centre), the image
    centres aligned and the intensity centres of mass aligned (ITK's
    CenteredTransformInitializer, GEOMETRY and MOMENTS).

    The result falls back to the identity, with a ``note`` saying why, when an image is blank,
    when ITK fails, when the registered match is worse than no motion at all (then ``metric``
    is that of no motion: the studies were already aligned, or the optimiser went astray), or
    when less than a fifth of the follow-up lies inside the baseline afterwards. A note (the
    result kept) also says when the optimiser stopped at its iteration limit. Reruns give the
    same matrix to about 1e-9 (ITK's multi-threaded sums).
    """
    import SimpleITK as sitk

    if len(shrink) != len(smoothing_mm):
        from ..errors import FollowUpError

        raise FollowUpError(f"expected one smoothing per shrink level, found {len(shrink)} shrink factors and "
                            f"{len(smoothing_mm)} smoothings; give as many of each")
    fixed, moving = _float_image(followup), _float_image(baseline)

    def method(multires: bool):
        r = sitk.ImageRegistrationMethod()
        r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
        r.SetMetricSamplingStrategy(r.RANDOM)
        r.SetMetricSamplingPercentage(sampling, seed)
        r.SetInterpolator(sitk.sitkLinear)
        if multires:
            r.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4, numberOfIterations=iterations,
                                                      relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
            r.SetOptimizerScalesFromPhysicalShift()
            r.SetShrinkFactorsPerLevel(list(shrink))
            r.SetSmoothingSigmasPerLevel(list(smoothing_mm))
            r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        return r

    def evaluate(transform) -> float:
        r = method(False)
        r.SetInitialTransform(transform, inPlace=False)
        return float(r.MetricEvaluate(fixed, moving))

    for volume, what in ((followup, "follow-up"), (baseline, "baseline")):
        values = np.asarray(volume.array)
        if values.size == 0 or np.nanmax(values) == np.nanmin(values):
            log.warning("the %s image is blank; identity used", what)
            return identity(f"the {what} image holds one value only (nothing to register); identity used: the "
                            "studies are taken as aligned in patient space")
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in fixed.GetSize()])
    start_identity = sitk.Euler3DTransform()
    start_identity.SetCenter(centre)
    starts = {"identity": start_identity}
    for name, mode in (("geometry", sitk.CenteredTransformInitializerFilter.GEOMETRY),
                       ("moments", sitk.CenteredTransformInitializerFilter.MOMENTS)):
        try:  # the moments start needs some non-zero mass in both images
            starts[name] = sitk.Euler3DTransform(
                sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(), mode))
        except RuntimeError as exc:
            log.debug("no %s start: %s", name, _itk_message(exc))
    try:
        scores = {name: evaluate(t) for name, t in starts.items()}
        best = min(scores, key=lambda name: scores[name])
        registration = method(True)
        final = sitk.Euler3DTransform(starts[best])
        registration.SetInitialTransform(final, inPlace=True)  # optimised in place
        registration.Execute(fixed, moving)
        metric = evaluate(final)
    except RuntimeError as exc:
        detail = _itk_message(exc)
        log.warning("rigid registration failed (%s); identity used", detail)
        return identity(f"rigid registration failed ({detail}); identity used: the studies are taken as aligned "
                        "in patient space")
    stop = registration.GetOptimizerStopConditionDescription()
    matrix = LPS_TO_RAS @ _matrix_from_euler(final) @ LPS_TO_RAS
    details = {"start": best, "start_metrics": {k: round(v, 6) for k, v in scores.items()},
               "identity_metric": round(scores["identity"], 6), "iterations": int(registration.GetOptimizerIteration()),
               "stop": stop}
    log.info("rigid registration: start %s, metric %.4f (identity %.4f), rotation %.2f deg, %s", best, metric,
             scores["identity"], rotation_angle_deg(matrix[:3, :3]), stop)
    if metric > scores["identity"] + _WORSE_TOLERANCE * abs(scores["identity"]):
        return Registration(np.eye(4), "identity", scores["identity"],
                            f"rigid registration found no better match than no motion (metric {metric:.4f} vs "
                            f"{scores['identity']:.4f} without it); identity used", details)
    overlap = _overlap(followup, baseline, matrix)
    details["overlap"] = round(overlap, 4)
    if overlap < _MIN_OVERLAP:
        return Registration(np.eye(4), "identity", None,
                            f"rigid registration not trusted: only {overlap:.0%} of the follow-up lies inside the "
                            "baseline afterwards; identity used", details)
    note = None
    if registration.GetOptimizerIteration() >= iterations:
        note = f"the optimiser stopped at its iteration limit ({iterations}) at the finest level; check the alignment"
    return Registration(matrix, "rigid", metric, note, details)
