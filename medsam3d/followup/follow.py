"""Follow the lesions of each patient over time: registration, matching, response."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import FollowUpError, Medsam3dError
from ..volume import Volume
from . import response as rs
from .match import MATCHING_RULE, Anchor, Candidate, match
from .register import Registration, identity, register_rigid
from .table import responses

log = logging.getLogger(__name__)

_REQUIRED = ("case_id", "patient_id", "order", "lesions")


@dataclass
class _Point:
    """A track at one time point: the lesion (None when absent) and its status."""

    lesion: Mapping[str, Any] | None
    status: str  # baseline | present | new | disappeared


@dataclass
class _Track:
    id: str
    first: int                     # index of the time point where it appeared
    name: str
    node: bool
    organ: str
    measurable: bool
    points: dict[int, _Point] = field(default_factory=dict)
    latest_name: str = ""
    position: np.ndarray | None = None   # latest present centroid, baseline RAS
    size_mm: float = 0.0                 # latest present long axis (or 3D maximum diameter)

    def value(self, t: int, key: str) -> float | None:
        """``volume`` (mL) or ``diameter`` (mm, RECIST) at time point ``t``: 0 when disappeared, None when
        absent from the follow-up at ``t`` or not measured."""
        point = self.points.get(t)
        if point is None:
            return None
        if point.status == "disappeared":
            return 0.0
        if key == "volume":
            return rs.number(point.lesion.get("volume_ml"))
        return rs.diameter(point.lesion, node=self.node)

    def gone(self, t: int) -> bool:
        """Gone in RECIST's sense at ``t``: disappeared, or a node under 10 mm short axis."""
        point = self.points.get(t)
        if point is None:
            return False
        if point.status == "disappeared":
            return True
        if self.node:
            d = self.value(t, "diameter")
            return d is not None and d < rs.NODE_NORMAL_MM
        return False


def follow_up(studies: Sequence[Mapping[str, Any]], *, load_image: Callable[[str], Volume] | None = None,
              register: bool = True, thresholds: rs.VolumetricThresholds = rs.DEFAULT_THRESHOLDS
              ) -> list[dict[str, Any]]:
    """Follow every patient's lesions over time; one JSON-ready dict per (patient, modality).

    ``studies``: dicts with ``case_id``, ``patient_id``, ``timepoint``, ``order`` (a JSON-able
    sort key), ``modality``, ``lesions`` (the per-lesion facts: ``label, name, volume_ml,
    long_axis_mm, short_axis_mm, max_diameter_3d_mm, centroid_ras, touches_border, flags``,
    optionally ``organ``, ``lymph_node``, ``slice_thickness_mm``) and ``prompts_transferred``.
    A study may carry ``registration`` (an entry as this function writes it, ``to`` its
    baseline), which is then used instead of registering again.

    Studies are followed per (patient, modality), in ``order``; the first is the baseline.
    Each follow-up image (``load_image(case_id)``) is registered rigidly onto the baseline
    image (:func:`register_rigid`) unless ``register`` is false or no ``load_image`` is given
    (identity, said in the entry's note). Lesions are matched as :data:`MATCHING_RULE` says,
    and each time point gets a RECIST 1.1 and a volumetric category (:data:`RECIST_RULE`,
    ``thresholds``). The result's ``rules`` states the rules in words.

    In each lesion's ``by_timepoint``, entries start at the time point where the lesion was
    first seen (a new lesion has none before), each naming its ``case_id``; the per-lesion
    change lists have one value per time point of ``timepoints`` (null where there is nothing
    to compare).
    """
    if not isinstance(thresholds, rs.VolumetricThresholds):
        raise FollowUpError(f"expected thresholds as a VolumetricThresholds, found {type(thresholds).__name__}")
    groups: dict[tuple[str, str | None], list[Mapping[str, Any]]] = {}
    for n, study in enumerate(studies):
        _check_study(study, n)
        key = (str(study["patient_id"]), None if study.get("modality") is None else str(study["modality"]))
        groups.setdefault(key, []).append(study)
    out = []
    for (patient, modality), group in groups.items():
        try:
            ordered = sorted(group, key=lambda s: _sort_key(s["order"]))
        except TypeError:
            raise FollowUpError(f"expected comparable 'order' keys for patient {patient!r}, found "
                                f"{[s['order'] for s in group]}; give every study of a patient the same kind of "
                                "order (dates or numbers)") from None
        out.append(_follow_patient(patient, modality, ordered, load_image=load_image, register=register,
                                   thresholds=thresholds))
    return out


def _check_study(study: Any, n: int) -> None:
    if not isinstance(study, Mapping):
        raise FollowUpError(f"expected study {n + 1} as a dict, found {type(study).__name__}")
    missing = [key for key in _REQUIRED if key not in study]
    if missing:
        raise FollowUpError(f"expected the keys {list(_REQUIRED)} in study {n + 1} "
                            f"({study.get('case_id', '?')!r}), found {sorted(study)} (missing {missing})")
    lesions = study["lesions"]
    if lesions is not None and not (isinstance(lesions, Sequence) and all(isinstance(x, Mapping) for x in lesions)):
        raise FollowUpError(f"expected 'lesions' of study {study['case_id']!r} as a list of dicts (or null), found "
                            f"{type(lesions).__name__}")


def _sort_key(order: Any) -> tuple:
    return tuple(order) if isinstance(order, (list, tuple)) else (order,)


def _json_order(order: Any) -> Any:
    return list(order) if isinstance(order, (list, tuple)) else order


def _registration(study: Mapping[str, Any], baseline: Mapping[str, Any], baseline_image: Callable[[], Volume | None],
                  *, load_image: Callable[[str], Volume] | None, register: bool) -> Registration:
    given = study.get("registration")
    if isinstance(given, Mapping) and given.get("to") == baseline["case_id"] and given.get("matrix") is not None:
        matrix = np.asarray(given["matrix"], dtype=np.float64)
        if matrix.shape == (4, 4) and np.all(np.isfinite(matrix)):
            return Registration(matrix, str(given.get("method") or "rigid"), rs.number(given.get("metric")),
                                given.get("note"))
    if not register:
        return identity("register=False: the studies are taken as aligned in patient space (same "
                        "FrameOfReference, patient not moved)")
    if load_image is None:
        return identity("no images given (load_image=None): the studies are taken as aligned in patient space")
    try:
        reference = baseline_image()
        image = load_image(str(study["case_id"]))
    except (Medsam3dError, OSError) as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        log.warning("follow-up %s: images not loaded (%s); identity used", study["case_id"], detail)
        return identity(f"images could not be loaded ({detail}); the studies are taken as aligned in patient space")
    return register_rigid(image, reference)


def _lesion_size(lesion: Mapping[str, Any]) -> float:
    for key in ("long_axis_mm", "max_diameter_3d_mm"):
        value = rs.number(lesion.get(key))
        if value is not None:
            return value
    return 0.0


def _is_empty(lesion: Mapping[str, Any]) -> bool:
    volume = rs.number(lesion.get("volume_ml"))
    return volume is not None and volume <= 0.0


def _position(lesion: Mapping[str, Any], matrix: np.ndarray) -> np.ndarray | None:
    centroid = lesion.get("centroid_ras")
    try:
        point = np.asarray(centroid, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        return None
    return matrix[:3, :3] @ point + matrix[:3, 3]


def _thickness(lesion: Mapping[str, Any], study: Mapping[str, Any]) -> float | None:
    value = rs.number(lesion.get("slice_thickness_mm"))
    return value if value is not None else rs.number(study.get("slice_thickness_mm"))


def _new_track(tracks: list[_Track], t: int, lesion: Mapping[str, Any], study: Mapping[str, Any], status: str,
               position: np.ndarray | None) -> _Track:
    node = rs.is_lymph_node(lesion)
    track = _Track(id=f"L{len(tracks) + 1}", first=t, name=str(lesion.get("name") or f"label {lesion.get('label')}"),
                   node=node, organ=rs.organ_of(lesion, node=node),
                   measurable=rs.is_measurable(lesion, node=node, slice_thickness_mm=_thickness(lesion, study)))
    track.points[t] = _Point(lesion, status)
    track.latest_name = track.name
    if position is not None and not _is_empty(lesion):
        track.position, track.size_mm = position, _lesion_size(lesion)
    tracks.append(track)
    return track


def _label(lesion: Mapping[str, Any] | None) -> int | None:
    if lesion is None:
        return None
    try:
        return int(lesion.get("label"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _follow_patient(patient: str, modality: str | None, studies: list[Mapping[str, Any]], *,
                    load_image: Callable[[str], Volume] | None, register: bool,
                    thresholds: rs.VolumetricThresholds) -> dict[str, Any]:
    baseline = studies[0]
    cache: dict[str, Volume] = {}

    def baseline_image() -> Volume:
        if "image" not in cache:
            cache["image"] = load_image(str(baseline["case_id"]))  # type: ignore[misc]
        return cache["image"]

    registrations: list[Registration | None] = [None]
    notes: list[list[str]] = [[] for _ in studies]
    tracks: list[_Track] = []
    evaluated: list[bool] = []
    for t, study in enumerate(studies):
        lesions = study["lesions"]
        evaluated.append(lesions is not None)
        if t == 0:
            matrix = np.eye(4)
        else:
            reg = _registration(study, baseline, baseline_image, load_image=load_image, register=register)
            registrations.append(reg)
            matrix = reg.matrix
            if reg.note and register:  # register=False is the caller's choice, stated in the registration entry
                notes[t].append(f"registration: {reg.note}")
        if lesions is None:
            notes[t].append("the study has no lesion measurements (its segmentation failed): not evaluable")
            continue
        if t == 0:
            for lesion in lesions:
                if _is_empty(lesion):
                    notes[0].append(f"object {lesion.get('name')!r} (label {lesion.get('label')}) is empty at "
                                    "baseline: not followed")
                    continue
                _new_track(tracks, 0, lesion, study, "baseline", _position(lesion, matrix))
            continue
        candidates = [Candidate(i, str(lesion.get("name") or ""), _position(lesion, matrix), _lesion_size(lesion),
                                _is_empty(lesion)) for i, lesion in enumerate(lesions)]
        anchors = [Anchor(n, (tr.name, tr.latest_name), tr.position, tr.size_mm) for n, tr in enumerate(tracks)]
        pairs, how = match(candidates, anchors, names_carried=bool(study.get("prompts_transferred")))
        for c in candidates:
            lesion = lesions[c.index]
            if c.index in pairs:
                track = tracks[pairs[c.index]]
                status = "disappeared" if c.empty else "present"
                track.points[t] = _Point(lesion, status)
                track.latest_name = c.name or track.latest_name
                if not c.empty and c.position is not None:
                    track.position, track.size_mm = c.position, c.size_mm
                log.debug("%s %s: %r -> %s by %s", patient, study["case_id"], c.name, track.id, how[c.index])
            elif c.empty:
                notes[t].append(f"object {c.name!r} (label {lesion.get('label')}) is empty and matches no earlier "
                                "lesion by name: ignored")
            else:
                _new_track(tracks, t, lesion, study, "new", c.position)
        for track in tracks:
            if t not in track.points and track.first < t:
                track.points[t] = _Point(None, "disappeared")

    targets = [tr.id for tr in tracks if tr.first == 0 and tr.id in set(
        rs.select_targets([(x.id, x.organ, x.value(0, "diameter") or 0.0) for x in tracks
                           if x.first == 0 and x.measurable]))]
    target_set = set(targets)
    by_id = {tr.id: tr for tr in tracks}
    timepoints = [{"case_id": str(s["case_id"]), "timepoint": None if s.get("timepoint") is None
                   else str(s["timepoint"]), "order": _json_order(s["order"])} for s in studies]

    lesions_out = [_lesion_entry(tr, studies, target=tr.id in target_set) for tr in tracks]
    response = responses(studies, tracks, [by_id[i] for i in targets], evaluated, notes, thresholds)
    transferred = any(bool(s.get("prompts_transferred")) for s in studies[1:])
    return {
        "patient_id": patient, "modality": modality, "baseline": str(baseline["case_id"]),
        "timepoints": timepoints,
        "registration": [reg.as_dict(case_id=str(s["case_id"]), to=str(baseline["case_id"]))
                         for s, reg in zip(studies[1:], registrations[1:])],
        "lesions": lesions_out, "response": response, "prompts_transferred": transferred,
        "rules": {"matching": MATCHING_RULE, "recist": rs.RECIST_RULE, "volumetric": rs.volumetric_rule(thresholds),
                  "thresholds": thresholds.as_dict()},
    }


def _changes(track: _Track, n: int, key: str) -> tuple[list[float | None], list[float | None]]:
    """Per time point: percent change vs the track's baseline value and vs its nadir (the smallest value at
    the earlier time points since it appeared)."""
    vs_base: list[float | None] = []
    vs_nadir: list[float | None] = []
    base = track.value(0, key) if track.first == 0 else None
    for t in range(n):
        value = track.value(t, key)
        earlier = [v for s in range(track.first, t) if (v := track.value(s, key)) is not None]
        vs_base.append(rs.rounded(rs.pct(value, base)) if t > 0 else None)
        vs_nadir.append(rs.rounded(rs.pct(value, min(earlier))) if earlier and t > track.first else None)
    return vs_base, vs_nadir


def _lesion_entry(track: _Track, studies: list[Mapping[str, Any]], *, target: bool) -> dict[str, Any]:
    n = len(studies)
    volume_base, volume_nadir = _changes(track, n, "volume")
    diameter_base, _ = _changes(track, n, "diameter")
    by_timepoint = []
    for t in range(track.first, n):
        point = track.points.get(t)
        if point is None:  # the study was not evaluated (no measurements)
            continue
        by_timepoint.append({"case_id": str(studies[t]["case_id"]), "label": _label(point.lesion),
                             "volume_ml": rs.rounded(track.value(t, "volume"), 4),
                             "diameter_mm": rs.rounded(track.value(t, "diameter")),
                             "status": point.status})
    return {"track": track.id, "name": track.name, "organ": track.organ, "lymph_node": track.node,
            "measurable": track.measurable, "target": target, "by_timepoint": by_timepoint,
            "volume_change_vs_baseline_pct": volume_base, "volume_change_vs_nadir_pct": volume_nadir,
            "diameter_change_vs_baseline_pct": diameter_base}
