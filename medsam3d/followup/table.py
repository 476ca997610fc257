"""A patient's response table: per study, the sums of the target lesions' diameters and volumes,
their changes against the baseline and the nadir, and the RECIST 1.1 and volumetric categories
with their reasons (see :mod:`.response` for the rules and :mod:`.follow` for the tracks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import response as rs

if TYPE_CHECKING:
    from .follow import _Track as Track


def _nontarget_state(tracks: Sequence[Track], targets: set[str], t: int) -> str:
    others = [tr for tr in tracks if tr.first == 0 and tr.id not in targets]
    if not others:
        return "none"
    if all(tr.gone(t) for tr in others):
        return "CR"
    if any(tr.points.get(t) is not None and tr.points[t].status != "disappeared" and tr.value(t, "volume") is None
           for tr in others):
        return "NE"
    return "present"


def responses(studies: list[Mapping[str, Any]], tracks: list[Track], targets: list[Track], evaluated: list[bool],
               notes: list[list[str]], thresholds: rs.VolumetricThresholds) -> list[dict[str, Any]]:
    """One entry per study of ``studies`` (in time order): the sums and their changes, both categories with
    their reasons, the lesions new there and the notes. ``targets`` are the baseline's target tracks,
    ``evaluated[t]`` says whether study t has lesion measurements, ``notes[t]`` what the matching said of it."""
    target_ids = [tr.id for tr in targets]
    target_set = set(target_ids)
    sums: list[float | None] = []
    volumes: list[float | None] = []
    out = []
    for t, study in enumerate(studies):
        diam = rs.Targets(target_ids, [tr.value(t, "diameter") for tr in targets], [tr.gone(t) for tr in targets])
        vol = rs.Targets(target_ids, [tr.value(t, "volume") for tr in targets], [tr.gone(t) for tr in targets])
        new_here = [tr.id for tr in tracks if tr.first == t and t > 0]
        present_new = [tr.id for tr in tracks if 0 < tr.first <= t and tr.points.get(t) is not None
                       and tr.points[t].status != "disappeared"]
        entry_notes = list(notes[t])
        if t > 0 and study.get("prompts_transferred"):
            entry_notes.append("the prompts of this study were transferred from an earlier study: new lesions cannot "
                               "have been found at this time point")
        for tr in tracks:
            point = tr.points.get(t)
            if point is not None and point.lesion is not None and point.lesion.get("touches_border") \
                    and point.status != "disappeared":
                entry_notes.append(f"{tr.id} ({tr.name}) touches the image border: its diameters and volume may be "
                                   "truncated")
        if t == 0:
            if not target_ids and evaluated[0]:
                entry_notes.append("no measurable lesion at baseline: no target lesion")
            entry = {"recist": "baseline", "recist_reason": _baseline_reason(targets, diam.total),
                     "volumetric": "baseline", "volumetric_reason": f"baseline: sum of the target lesions' volumes "
                                                                    f"{_volume_words(vol.total)}"}
            sum_t, vol_t = diam.total, vol.total
            changes = (None, None, None, None)
        elif not evaluated[t]:
            sum_t = vol_t = None
            changes = (None, None, None, None)
            entry = {"recist": "NE", "recist_reason": "the study has no lesion measurements",
                     "volumetric": "NE", "volumetric_reason": "the study has no lesion measurements"}
        else:
            sum_t, vol_t = diam.total, vol.total
            nadir = min((s for s in sums if s is not None), default=None)
            nadir_v = min((v for v in volumes if v is not None), default=None)
            nontarget = _nontarget_state(tracks, target_set, t)
            recist, recist_reason = rs.categorise(diam, baseline=sums[0], nadir=nadir, pr_pct=rs.PR_PCT,
                                                  pd_pct=rs.PD_PCT, pd_abs=rs.PD_ABS_MM, unit="mm",
                                                  nontarget=nontarget, new=present_new)
            volumetric, volumetric_reason = rs.categorise(vol, baseline=volumes[0], nadir=nadir_v,
                                                          pr_pct=thresholds.pr_pct, pd_pct=thresholds.pd_pct,
                                                          pd_abs=0.0, unit="mL", nontarget=nontarget, new=present_new)
            changes = (rs.pct(sum_t, sums[0]), rs.pct(sum_t, nadir), rs.pct(vol_t, volumes[0]),
                       rs.pct(vol_t, nadir_v))
            # RECIST 1.1: after a complete response, any lesion coming back is progression
            back = [tr.id for tr in tracks if (p := tr.points.get(t)) is not None and p.status == "present"
                    and not tr.gone(t)]
            if out and back:
                if out[-1]["recist"] == "CR" and recist != "PD":
                    recist, recist_reason = "PD", f"lesion(s) {', '.join(back)} reappeared after CR"
                if out[-1]["volumetric"] == "CR" and volumetric != "PD":
                    volumetric, volumetric_reason = "PD", f"lesion(s) {', '.join(back)} reappeared after CR"
            entry = {"recist": recist, "recist_reason": recist_reason, "volumetric": volumetric,
                     "volumetric_reason": volumetric_reason}
        sums.append(sum_t)
        volumes.append(vol_t)
        out.append({"case_id": str(study["case_id"]),
                    "timepoint": None if study.get("timepoint") is None else str(study["timepoint"]),
                    "sum_diameters_mm": rs.rounded(sum_t), "change_vs_baseline_pct": rs.rounded(changes[0]),
                    "change_vs_nadir_pct": rs.rounded(changes[1]), "recist": entry["recist"],
                    "recist_reason": entry["recist_reason"], "total_volume_ml": rs.rounded(vol_t, 4),
                    "volume_change_vs_baseline_pct": rs.rounded(changes[2]),
                    "volume_change_vs_nadir_pct": rs.rounded(changes[3]),
                    "volumetric": entry["volumetric"], "volumetric_reason": entry["volumetric_reason"],
                    "new_lesions": new_here, "notes": entry_notes})
    return out


def _baseline_reason(targets: list[Track], total: float | None) -> str:
    if not targets:
        return "baseline: no target lesion"
    names = ", ".join(f"{tr.id} ({tr.name}, {'short' if tr.node else 'long'} axis)" for tr in targets)
    return f"baseline: {len(targets)} target lesion(s) {names}; sum of diameters " + (
        "n/a" if total is None else f"{total:.1f} mm")


def _volume_words(total: float | None) -> str:
    return "n/a" if total is None else f"{total:.2f} mL"
