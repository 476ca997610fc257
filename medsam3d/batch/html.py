"""The batch's report: one self-contained HTML file a clinician opens, prints or sends on.

:func:`write_report` renders a batch's results (``results.json``, see the batch spec) with
the Jinja2 template ``templates/report.html.j2`` into ``OUTDIR/report.html``. The file needs
nothing else: the pictures the batch wrote (slice overlays, 3D snapshots) are inlined as
base64 ``data:`` URIs, the volume-over-time plots are inline SVG drawn by matplotlib, the CSS
is inline and there is no script, so it opens the same offline, from an e-mail attachment or
printed to PDF. The template escapes every value (autoescape): names, errors and metadata
come from users' files.

Pieces that are missing (a failed study has no record and no pictures, a batch without
follow-up has no response tables, a picture file was deleted) are said to be missing in the
report instead of failing it.
"""

from __future__ import annotations

import base64
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..io._atomic import atomic_path
from .plot import volume_plot

logger = logging.getLogger(__name__)

TEMPLATE = "report.html.j2"
TEMPLATES = Path(__file__).with_name("templates")

#: what each flag means to a reader, shown beside it
FLAG_HELP = {
    "empty": "nothing was segmented",
    "touches_border": "the object reaches the image's edge: its volume may be a lower bound",
    "wide_volume_range": "the engine's alternative segmentations differ by more than 25 % of the volume",
}
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}
_CATEGORY_CLASS = {"CR": "good", "PR": "good", "SD": "neutral", "PD": "bad", "NE": "warn", "baseline": "base"}


def write_report(results: dict[str, Any], outdir: Path, *, path: Path | None = None,
                 pseudonymise: bool = False) -> Path:
    """Write the batch's HTML report (``outdir/report.html`` unless ``path`` is given); returns its path.

    ``outdir`` is the batch's output folder: the relative paths in ``results`` (``files``)
    are read from it. With ``pseudonymise``, the report shows
    :func:`medsam3d.batch.privacy.pseudonymise`'s copy of the results (the pictures are
    still read through the original paths). The file is written atomically.
    """
    outdir = Path(outdir)
    path = Path(path) if path is not None else outdir / "report.html"
    html = render_report(results, outdir, pseudonymise=pseudonymise)
    with atomic_path(path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    logger.info("report written to %s", path)
    return path


def render_report(results: dict[str, Any], outdir: Path, *, pseudonymise: bool = False) -> str:
    """The report's HTML text (what :func:`write_report` writes)."""
    import jinja2

    pictures = [_study_pictures(study, Path(outdir)) for study in _list(results.get("studies"))]
    shown = results
    if pseudonymise:
        from .privacy import pseudonymise as _pseudonymise

        shown = _pseudonymise(results)
    context = _context(shown, pictures)
    context["pseudonymised"] = pseudonymise
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    env.filters["pct"] = _pct
    env.filters["seconds"] = _seconds
    return env.get_template(TEMPLATE).render(**context)


# ---------------------------------------------------------------------------------------------- the view model

def _context(results: dict[str, Any], pictures: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the template shows, with every missing piece already replaced by None or []."""
    from .. import __version__

    studies = [s for s in _list(results.get("studies")) if isinstance(s, dict)]
    paired = list(zip(studies, pictures))
    paired = _sorted_studies(paired)
    lesions = [l for l in _list(results.get("lesions")) if isinstance(l, dict)]
    summary = results.get("summary") if isinstance(results.get("summary"), dict) else {}
    counts = {k: summary.get(k) for k in ("total", "done", "skipped", "failed")}
    if counts["total"] is None:
        counts["total"] = len(studies)
    manifest = results.get("manifest") if isinstance(results.get("manifest"), dict) else {}

    rows, views, provenance, attention = [], [], [], []
    for study, pics in paired:
        objects = _study_objects(study, lesions)
        flags = sorted({f for o in objects for f in o["flags"]} | set(_list(study.get("flags"))))
        status = str(study.get("status") or "unknown")
        who = {"case_id": study.get("case_id"), "patient_id": study.get("patient_id"),
               "timepoint": study.get("timepoint")}
        if status == "failed":
            attention.append({**who, "why": f"failed ({study.get('stage') or 'unknown stage'}): "
                                            f"{_one_line(study.get('error'))}", "cls": "bad"})
        elif flags:
            attention.append({**who, "why": ", ".join(flags), "cls": "warn"})
        if objects:
            for o in objects:
                rows.append({**who, **o, "status": status, "cls": _row_class(status, o["flags"])})
        else:
            rows.append({**who, "name": None, "label": None, "volume_ml": None, "range": None,
                         "long_axis_mm": None, "short_axis_mm": None, "flags": list(_list(study.get("flags"))),
                         "status": status, "cls": _row_class(status, _list(study.get("flags")))})
        views.append({**who, "status": status, "flags": flags, "error": _one_line(study.get("error")),
                      "stage": study.get("stage"), "modality": _modality(study), **pics})
        provenance.append(_provenance(study))

    failures = [{"case_id": f.get("case_id"), "row": f.get("row"), "stage": f.get("stage"),
                 "error": _one_line(f.get("error"))} for f in _list(results.get("failures")) if isinstance(f, dict)]
    if not failures:  # older or partial results: the failed studies themselves
        failures = [{"case_id": s.get("case_id"), "row": s.get("row"), "stage": s.get("stage"),
                     "error": _one_line(s.get("error"))} for s in studies if s.get("status") == "failed"]
    followups = [_followup(f, n) for n, f in enumerate(_list(results.get("followup"))) if isinstance(f, dict)]
    return {
        "title": "medsam3d batch report",
        "version": results.get("medsam3d_version"),
        "report_version": __version__,
        "created": results.get("created"),
        "rendered": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "manifest": {"path": manifest.get("path"), "sha256": manifest.get("sha256")},
        "counts": counts,
        "attention": attention,
        "rows": rows,
        "followups": followups,
        "studies": views,
        "failures": failures,
        "provenance": provenance,
        "flag_help": FLAG_HELP,
        "settings": _settings(results.get("settings")),
    }


def _study_objects(study: dict[str, Any], lesions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per object of a study: from the batch's lesion list, else from the study's record."""
    mine = [l for l in lesions if l.get("case_id") == study.get("case_id")]
    record = study.get("record") if isinstance(study.get("record"), dict) else {}
    by_label = {o.get("label"): o for o in _list(record.get("objects")) if isinstance(o, dict)}
    rows = []
    if mine:
        for l in mine:
            obj = by_label.get(l.get("label"), {})
            rows.append({"label": l.get("label"), "name": l.get("name"), "volume_ml": l.get("volume_ml"),
                         "range": _range(l.get("volume_ml_range", obj.get("volume_ml_range"))),
                         "long_axis_mm": l.get("long_axis_mm"), "short_axis_mm": l.get("short_axis_mm"),
                         "flags": list(_list(l.get("flags")) or _list(obj.get("flags")))})
        return rows
    for obj in by_label.values():
        whole = (obj.get("measurements") or {}).get("whole") or {}
        rows.append({"label": obj.get("label"), "name": obj.get("name"), "volume_ml": obj.get("volume_ml"),
                     "range": _range(obj.get("volume_ml_range")), "long_axis_mm": whole.get("long_axis_mm"),
                     "short_axis_mm": whole.get("short_axis_mm"), "flags": list(_list(obj.get("flags")))})
    return rows


def _provenance(study: dict[str, Any]) -> dict[str, Any]:
    record = study.get("record") if isinstance(study.get("record"), dict) else None
    inp = (record or {}).get("input") or {}
    model = (record or {}).get("model") or {}
    timings = study.get("timings") if isinstance(study.get("timings"), dict) and study.get("timings") else \
        (record or {}).get("timings") or {}
    return {
        "case_id": study.get("case_id"),
        "has_record": record is not None,
        "input_sha256": inp.get("sha256"),
        "input_format": inp.get("format"),
        "series_uid": inp.get("series_uid"),
        "prompts": study.get("prompts") if study.get("prompts") is not None else _prompt_text(record),
        "prompts_sha256": ((record or {}).get("prompts") or {}).get("sha256"),
        "model": model.get("name") or study.get("model"),
        "weights_sha256": model.get("weights_sha256"),
        "device": " / ".join(str(v) for v in (model.get("device"), model.get("runtime")) if v) or None,
        "version": (record or {}).get("medsam3d_version"),
        "timings": [(str(k).removesuffix("_s"), v) for k, v in timings.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)],
        "warnings": [_one_line(w) for w in _list((record or {}).get("warnings"))],
    }


def _prompt_text(record: dict[str, Any] | None) -> str | None:
    if not record:
        return None
    import json

    given = (record.get("prompts") or {}).get("given")
    return None if given is None else json.dumps(given, ensure_ascii=False)[:500]


def _followup(fu: dict[str, Any], index: int) -> dict[str, Any]:
    """One patient's (and modality's) follow-up: its plot, response rows, lesion tracks and rules."""
    timepoints = [t for t in _list(fu.get("timepoints")) if isinstance(t, dict)]
    case_ids = [t.get("case_id") for t in timepoints]
    tracks = []
    for lesion in _list(fu.get("lesions")):
        if not isinstance(lesion, dict):
            continue
        by_case = {b.get("case_id"): b for b in _list(lesion.get("by_timepoint")) if isinstance(b, dict)}
        cells = []
        for n, case in enumerate(case_ids):
            b = by_case.get(case, {})
            cells.append({"volume_ml": b.get("volume_ml"), "diameter_mm": b.get("diameter_mm"),
                          "status": b.get("status"), "label": b.get("label"),
                          "change": _at(lesion.get("volume_change_vs_baseline_pct"), n),
                          "diameter_change": _at(lesion.get("diameter_change_vs_baseline_pct"), n)})
        tracks.append({"track": lesion.get("track"), "name": lesion.get("name"), "organ": lesion.get("organ"),
                       "target": lesion.get("target"), "measurable": lesion.get("measurable"),
                       "lymph_node": lesion.get("lymph_node"), "cells": cells})
    response = []
    for r in _list(fu.get("response")):
        if not isinstance(r, dict):
            continue
        response.append({**{k: r.get(k) for k in (
            "case_id", "timepoint", "sum_diameters_mm", "change_vs_baseline_pct", "change_vs_nadir_pct", "recist",
            "recist_reason", "total_volume_ml", "volume_change_vs_baseline_pct", "volume_change_vs_nadir_pct",
            "volumetric", "volumetric_reason")},
            "new_lesions": [str(t) for t in _list(r.get("new_lesions"))],
            "disappeared": _disappeared(fu, r.get("case_id")),
            "notes": [str(n) for n in _list(r.get("notes"))],
            "recist_cls": _CATEGORY_CLASS.get(str(r.get("recist")), "neutral"),
            "volumetric_cls": _CATEGORY_CLASS.get(str(r.get("volumetric")), "neutral")})
    rules = fu.get("rules") if isinstance(fu.get("rules"), dict) else {}
    thresholds = rules.get("thresholds") if isinstance(rules.get("thresholds"), dict) else {}
    registration = [{"case_id": g.get("case_id"), "to": g.get("to"), "method": g.get("method"),
                     "metric": g.get("metric"), "note": g.get("note")}
                    for g in _list(fu.get("registration")) if isinstance(g, dict)]
    try:
        svg = volume_plot(timepoints, tracks, response, salt=f"fu{index}")
    except (ValueError, TypeError, RuntimeError, OSError) as exc:  # a plot that cannot be drawn costs the plot only
        logger.warning("volume plot of patient %s not drawn: %s", fu.get("patient_id"), exc)
        svg = None
    return {"patient_id": fu.get("patient_id"), "modality": fu.get("modality"), "baseline": fu.get("baseline"),
            "timepoints": timepoints, "tracks": tracks, "response": response, "svg": svg,
            "registration": registration, "prompts_transferred": bool(fu.get("prompts_transferred")),
            "rules": {k: rules.get(k) for k in ("matching", "recist", "volumetric") if rules.get(k)},
            "thresholds": [(str(k), v) for k, v in thresholds.items()]}


def _disappeared(fu: dict[str, Any], case_id: Any) -> list[str]:
    return [str(l.get("track")) for l in _list(fu.get("lesions")) if isinstance(l, dict)
            and any(b.get("case_id") == case_id and b.get("status") == "disappeared"
                    for b in _list(l.get("by_timepoint")) if isinstance(b, dict))]


def _settings(settings: Any) -> list[tuple[str, str]]:
    if not isinstance(settings, dict):
        return []
    return [(str(k), v if isinstance(v, str) else _compact(v)) for k, v in settings.items()]


def _compact(value: Any) -> str:
    import json

    try:
        return json.dumps(value, ensure_ascii=False, default=str)[:300]
    except (TypeError, ValueError):
        return str(value)[:300]


# ---------------------------------------------------------------------------------------------- pictures

def _study_pictures(study: Any, outdir: Path) -> dict[str, Any]:
    """The study's overlays and 3D snapshot as data URIs (None with a note where a file is missing)."""
    if not isinstance(study, dict):
        return {"overlays": [], "snapshot": None}
    files = study.get("files") if isinstance(study.get("files"), dict) else {}
    overlays = []
    for item in _list(files.get("overlays")):
        if not isinstance(item, dict):
            continue
        uri, missing = _data_uri(item.get("path"), outdir)
        overlays.append({"label": item.get("label"), "name": item.get("name"), "slice": item.get("slice"),
                         "src": uri, "missing": missing})
    snapshot = None
    if files.get("snapshot"):
        uri, missing = _data_uri(files["snapshot"], outdir)
        snapshot = {"src": uri, "missing": missing}
    return {"overlays": overlays, "snapshot": snapshot}


def _data_uri(rel: Any, outdir: Path) -> tuple[str | None, str | None]:
    """(data URI, None) for a picture inside ``outdir``, or (None, why it is not shown)."""
    if not rel:
        return None, "no file named"
    target = (outdir / str(rel)).resolve()
    try:
        target.relative_to(outdir.resolve())
    except ValueError:
        return None, "outside the batch's folder, not inlined"
    mime = _MIME.get(target.suffix.lower())
    if mime is None:
        return None, f"not a picture ({target.suffix or 'no suffix'})"
    try:
        data = target.read_bytes()
    except OSError as exc:
        logger.warning("picture %s not inlined: %s", rel, exc.strerror or exc)
        return None, "file missing"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", None


# ---------------------------------------------------------------------------------------------- small helpers

def _sorted_studies(paired: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Studies per patient in time order (the manifest's order when orders cannot be compared)."""
    try:
        return sorted(paired, key=lambda p: (str(p[0].get("patient_id")), _list(p[0].get("order")),
                                             p[0].get("row") or 0))
    except TypeError:
        return sorted(paired, key=lambda p: str(p[0].get("patient_id")))


def _modality(study: dict[str, Any]) -> Any:
    record = study.get("record") if isinstance(study.get("record"), dict) else {}
    return (record.get("input") or {}).get("modality") or (study.get("metadata") or {}).get("modality")


def _row_class(status: str, flags: Any) -> str:
    if status == "failed":
        return "failed"
    if status == "skipped":
        return "skipped"
    return "flagged" if flags else ""


def _range(value: Any) -> tuple[float, float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return float(value[0]), float(value[1])
    return None


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else []


def _at(values: Any, n: int) -> Any:
    values = _list(values)
    return values[n] if n < len(values) else None


def _one_line(text: Any) -> str | None:
    if text is None:
        return None
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= 300 else line[:299] + "…"


def _num(value: Any, digits: int = 1) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "–"
    return f"{value:+.1f} %"


def _seconds(value: Any) -> str:
    return _num(value, 1) + " s" if isinstance(value, (int, float)) else "–"
