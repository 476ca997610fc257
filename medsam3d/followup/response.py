"""Response categories: RECIST 1.1 on the target lesions' diameters, and a volumetric analogue.

RECIST 1.1 as written (Eisenhauer et al., Eur J Cancer 2009;45:228-247), with the EORTC
clarifications (nodes are one organ; SD is judged against the baseline for shrinkage and the
nadir for growth). The volumetric category applies the same structure to the sum of the target
lesions' volumes, with the thresholds that a sphere's volume crosses when its diameter changes by
-30 % and +20 %: (0.7^3 - 1) = -65.7 % and (1.2^3 - 1) = +72.8 %.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MEASURABLE_MM = 10.0        # non-nodal lesion: long axis
NODE_MEASURABLE_MM = 15.0   # lymph node: short axis
NODE_NORMAL_MM = 10.0       # a node below this short axis is normal (counts as gone for CR)
MAX_TARGETS = 5
MAX_PER_ORGAN = 2
PR_PCT = -30.0              # vs baseline sum
PD_PCT = 20.0               # vs nadir sum
PD_ABS_MM = 5.0             # and at least this much larger than the nadir sum
NODE_ORGAN = "lymph node"
_EPS = 1e-9                 # thresholds hold "at" their value despite floating point


@dataclass(frozen=True)
class VolumetricThresholds:
    """Volumetric response thresholds on the sum of the target lesions' volumes, in percent.

    ``pr_pct``: partial response at or below this change vs baseline (default -65.7 %, a
    sphere whose diameter shrinks by 30 %). ``pd_pct``: progression at or above this change
    vs the nadir (default +72.8 %, a sphere whose diameter grows by 20 %).
    """

    pr_pct: float = round((0.7**3 - 1) * 100, 1)
    pd_pct: float = round((1.2**3 - 1) * 100, 1)

    def __post_init__(self) -> None:
        from ..errors import FollowUpError

        for name in ("pr_pct", "pd_pct"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise FollowUpError(f"expected {name} as a finite number of percent, found {value!r}")
        if not -100.0 < self.pr_pct < 0.0 < self.pd_pct:
            raise FollowUpError(f"expected -100 < pr_pct < 0 < pd_pct, found pr_pct={self.pr_pct}, "
                                f"pd_pct={self.pd_pct}; give a decrease for PR and an increase for PD")

    def as_dict(self) -> dict[str, float]:
        return {"pr_pct": float(self.pr_pct), "pd_pct": float(self.pd_pct)}


DEFAULT_THRESHOLDS = VolumetricThresholds()

RECIST_RULE = (
    "RECIST 1.1 (Eisenhauer et al. 2009) on the baseline's lesions. A lesion is a lymph node when its "
    "'lymph_node' key says so, else when its name contains 'node' or 'lymph'. Measurable at baseline: "
    f"a non-nodal lesion with long axis >= {MEASURABLE_MM:g} mm (>= 2x the slice thickness when a "
    "'slice_thickness_mm' is given with the lesion or study, not applied otherwise), a node with short axis "
    f">= {NODE_MEASURABLE_MM:g} mm (nodes are measured on the short axis; a node under "
    f"{NODE_NORMAL_MM:g} mm is normal). Targets: the measurable lesions, largest diameter first, at most "
    f"{MAX_PER_ORGAN} per organ and {MAX_TARGETS} in all; organ = the lesion's 'organ' key, else "
    f"'{NODE_ORGAN}' for nodes (all nodes are one organ), else the part of the name before the first "
    "'/' or ':', else the name. Every other baseline lesion is a non-target lesion. Sum of diameters = "
    "long axes of non-nodal targets + short axes of nodal targets (a disappeared target counts 0 mm, a node "
    "its actual short axis). Nadir = the smallest sum at the earlier time points, baseline included. "
    f"Target response: PD when the sum is >= {PD_PCT:g} % and >= {PD_ABS_MM:g} mm above the nadir; CR when "
    f"every non-nodal target has disappeared and every nodal target is < {NODE_NORMAL_MM:g} mm short axis; "
    f"PR when the sum is <= {PR_PCT:g} % vs baseline; SD otherwise; NE when a target could not be measured "
    "(unless the measured ones already make PD). Overall: any lesion absent at baseline and present at "
    "the time point (a new lesion) is PD; target CR needs every non-target lesion gone too (else PR); "
    "without targets the category comes from the non-target lesions (CR when all are gone, else SD for "
    "RECIST's non-CR/non-PD). Unequivocal progression of non-target lesions is a reader's judgement and "
    "is not assessed. Response confirmation and best overall response are not derived."
)


def volumetric_rule(thresholds: VolumetricThresholds) -> str:
    return (
        "The RECIST structure applied to the sum of the target lesions' volumes (the same targets; a "
        f"disappeared target counts 0 mL): PD when the sum is >= {thresholds.pd_pct:+g} % vs the nadir volume "
        "(the smallest sum at the earlier time points, baseline included; any growth from a nadir of 0 mL) or "
        f"when a new lesion is present; CR when every target is gone as for RECIST; PR when the sum is <= "
        f"{thresholds.pr_pct:+g} % vs baseline; SD otherwise; NE when a target's volume is missing. The "
        "default thresholds are the volume changes of a sphere whose diameter changes by -30 % and +20 % "
        "(RECIST's thresholds): 0.7^3 - 1 = -65.7 % and 1.2^3 - 1 = +72.8 %."
    )


# ---------------------------------------------------------------------------------------------- lesions
def number(value: Any) -> float | None:
    """A finite float, or None (missing, NaN, infinite, not a number)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def is_lymph_node(lesion: Mapping[str, Any]) -> bool:
    """The lesion's ``lymph_node`` key when it is a bool, else whether its name contains "node" or "lymph"."""
    flag = lesion.get("lymph_node")
    if isinstance(flag, bool):
        return flag
    name = str(lesion.get("name") or "").casefold()
    return "node" in name or "lymph" in name


def organ_of(lesion: Mapping[str, Any], *, node: bool) -> str:
    """The organ a lesion counts for in the two-per-organ rule (see :data:`RECIST_RULE`)."""
    organ = lesion.get("organ")
    if organ is not None and str(organ).strip():
        return str(organ).strip()
    if node:
        return NODE_ORGAN
    name = str(lesion.get("name") or "").strip()
    cut = min((i for i in (name.find("/"), name.find(":")) if i > 0), default=-1)
    return name[:cut].strip() if cut > 0 else name


def diameter(lesion: Mapping[str, Any], *, node: bool) -> float | None:
    """RECIST diameter: the short axis of a node, the long axis of any other lesion."""
    return number(lesion.get("short_axis_mm" if node else "long_axis_mm"))


def is_measurable(lesion: Mapping[str, Any], *, node: bool, slice_thickness_mm: float | None) -> bool:
    size = diameter(lesion, node=node)
    if size is None:
        return False
    if node:
        return size >= NODE_MEASURABLE_MM - _EPS
    minimum = MEASURABLE_MM if slice_thickness_mm is None else max(MEASURABLE_MM, 2.0 * slice_thickness_mm)
    return size >= minimum - _EPS


def select_targets(measurable: Sequence[tuple[str, str, float]]) -> list[str]:
    """Targets from ``(track, organ, diameter)`` of the measurable baseline lesions: largest first, at most
    :data:`MAX_PER_ORGAN` per organ and :data:`MAX_TARGETS` in all (ties keep the given order)."""
    chosen: list[str] = []
    per_organ: dict[str, int] = {}
    for track, organ, _ in sorted(measurable, key=lambda item: -item[2]):
        if len(chosen) >= MAX_TARGETS:
            break
        if per_organ.get(organ, 0) >= MAX_PER_ORGAN:
            continue
        per_organ[organ] = per_organ.get(organ, 0) + 1
        chosen.append(track)
    return chosen


# ---------------------------------------------------------------------------------------------- sums
def rounded(value: float | None, digits: int = 3) -> float | None:
    """``value`` rounded for the results (None stays None)."""
    return None if value is None else round(float(value), digits)


def pct(value: float | None, reference: float | None) -> float | None:
    """Percent change of ``value`` vs ``reference`` (None when either is missing or the reference is 0)."""
    if value is None or reference is None or reference <= 0:
        return None
    return (value - reference) / reference * 100.0


@dataclass(frozen=True)
class Targets:
    """The target lesions at one time point: each one's value (mm or mL; 0 when it disappeared, None when
    it could not be measured) and whether it is gone in RECIST's sense."""

    tracks: Sequence[str]
    values: Sequence[float | None]
    gone: Sequence[bool]

    @property
    def total(self) -> float | None:
        return None if any(v is None for v in self.values) else float(sum(self.values))  # type: ignore[arg-type]

    @property
    def measured_total(self) -> float:
        return float(sum(v for v in self.values if v is not None))

    @property
    def missing(self) -> list[str]:
        return [t for t, v in zip(self.tracks, self.values) if v is None]


def _fmt(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:.1f} {unit}" if unit == "mm" else f"{value:.2f} {unit}"


def categorise(targets: Targets, *, baseline: float | None, nadir: float | None, pr_pct: float, pd_pct: float,
               pd_abs: float, unit: str, nontarget: str, new: Sequence[str]) -> tuple[str, str]:
    """The category at one follow-up time point and the reason for it, in words.

    ``nontarget``: ``"none"`` (no non-target lesion), ``"CR"`` (all gone), ``"present"`` or ``"NE"``.
    ``new``: the tracks present now and absent at baseline. ``pd_abs``: the smallest absolute
    increase over the nadir for PD (5 mm for RECIST, 0 for volumes).
    """
    category, reason = _categorise(targets, baseline=baseline, nadir=nadir, pr_pct=pr_pct, pd_pct=pd_pct,
                                   pd_abs=pd_abs, unit=unit, nontarget=nontarget)
    if new:
        also = f"; the targets also progress ({reason})" if category == "PD" else ""
        return "PD", f"new lesion(s) present: {', '.join(new)}{also}"
    return category, reason


def _categorise(targets: Targets, *, baseline: float | None, nadir: float | None, pr_pct: float, pd_pct: float,
                pd_abs: float, unit: str, nontarget: str) -> tuple[str, str]:
    """The category from the target and non-target lesions alone (new lesions aside)."""
    if not targets.tracks:
        if nontarget == "none":
            return "NE", "no lesion at baseline to follow"
        if nontarget == "CR":
            return "CR", "no target lesion at baseline; every non-target lesion is gone"
        if nontarget == "NE":
            return "NE", "no target lesion at baseline and a non-target lesion could not be evaluated"
        return "SD", "no target lesion at baseline; non-target lesion(s) present: non-CR/non-PD"
    total = targets.total
    measured = targets.measured_total if total is None else total
    if nadir is not None and nadir > 0:
        growth = pct(measured, nadir)
        grows = growth is not None and growth >= pd_pct - _EPS and measured - nadir >= pd_abs - _EPS
    else:  # a nadir of 0: any growth of at least the absolute minimum (more than nothing for volumes)
        grows = nadir is not None and measured - nadir >= pd_abs - _EPS and measured > nadir
    vs_nadir = f"{_fmt(measured, unit)} vs nadir {_fmt(nadir, unit)}"
    if grows:
        change = pct(measured, nadir)
        what = f"{change:+.1f} %" if change is not None else "from 0"
        head = "sum of the measured targets" if total is None else "sum"
        return "PD", f"{head} {vs_nadir}: {what} and {measured - (nadir or 0):+.1f} {unit}"
    if total is None:
        return "NE", f"target lesion(s) {', '.join(targets.missing)} could not be measured"
    if all(targets.gone):
        if nontarget in ("none", "CR"):
            return "CR", "every target lesion is gone" + (" and so is every non-target lesion"
                                                          if nontarget == "CR" else "")
        return "PR", (f"every target lesion is gone but non-target lesion(s) are "
                      f"{'not evaluable' if nontarget == 'NE' else 'present'} (RECIST: PR)")
    change = pct(total, baseline)
    if change is not None and change <= pr_pct + _EPS:
        return "PR", f"sum {_fmt(total, unit)}: {change:+.1f} % vs baseline {_fmt(baseline, unit)} (PR at <= {pr_pct:g} %)"
    change_nadir = pct(total, nadir)
    nadir_words = f"{change_nadir:+.1f} %" if change_nadir is not None else "n/a"
    base_words = f"{change:+.1f} %" if change is not None else "n/a"
    return "SD", (f"sum {_fmt(total, unit)}: {base_words} vs baseline, {nadir_words} and "
                  f"{total - (nadir or 0):+.1f} {unit} vs nadir {_fmt(nadir, unit)}; neither PR nor PD")
