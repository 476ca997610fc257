"""The batch's results: the document (``results.json``) with each patient's follow-up, the CSV, the report."""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

from .store import ResultStore, lesion_facts

log = logging.getLogger(__name__)

RESULTS_FORMAT = "medsam3d-batch-results/1"
CSV_COLUMNS = ("case_id", "patient_id", "timepoint", "modality", "status", "label", "name", "volume_ml",
               "volume_ml_low", "volume_ml_high", "long_axis_mm", "short_axis_mm", "max_diameter_3d_mm",
               "touches_border", "flags", "track", "error")




def collect_results(store: ResultStore, studies: list, outdir: Path, *, manifest: Path, manifest_sha256: str,
                    settings: dict[str, Any], register: bool = True) -> dict[str, Any]:
    """The results document (``results.json``) from the database, with each patient's follow-up."""
    from .. import __version__

    order = {s.case_id: s for s in studies}
    entries, lesions, failures = [], [], []
    for row in store.studies():
        study = order.get(row["case_id"])
        if study is None:
            continue
        record = json.loads(row["record"]) if row["record"] else None
        files = json.loads(row["files"]) if row["files"] else {}
        flags = sorted({f for o in (record or {}).get("objects", []) for f in o.get("flags", [])})
        entries.append({"case_id": row["case_id"], "patient_id": row["patient_id"], "timepoint": row["timepoint"],
                        "order": json.loads(row["sort_key"]), "row": row["row"], "modality": row["modality"],
                        "status": row["status"], "metadata": json.loads(row["metadata"] or "{}"),
                        "image": row["image"], "prompts": row["prompts"], "error": row["error"], "stage": row["stage"],
                        "flags": flags, "files": files, "timings": json.loads(row["timings"] or "{}"),
                        "record": record})
        if row["status"] == "failed":
            failures.append({"case_id": row["case_id"], "row": row["row"], "stage": row["stage"],
                             "error": row["error"]})
        for obj in (record or {}).get("objects", []):
            lesions.append({"case_id": row["case_id"], "patient_id": row["patient_id"],
                            "timepoint": row["timepoint"], "modality": row["modality"], **lesion_facts(obj)})
    entries.sort(key=lambda e: (e["patient_id"], e["order"], e["case_id"]))
    followup = _follow_up(entries, order, register=register, store=store)
    done = sum(e["status"] == "done" for e in entries)
    return {"format": RESULTS_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "medsam3d_version": __version__,
            "manifest": {"path": str(manifest), "sha256": manifest_sha256}, "settings": settings,
            "summary": {"total": len(entries), "done": done, "failed": len(entries) - done,
                        "skipped": (store.runs()[-1].get("skipped") or 0) if store.runs() else 0},
            "studies": entries, "lesions": lesions, "followup": followup, "failures": failures}


def _follow_up(entries: list[dict[str, Any]], studies: dict[str, Any], *, register: bool,
               store: ResultStore) -> list[dict[str, Any]]:
    """Each patient's done studies followed over time (see :mod:`medsam3d.followup`); a
    registration whose two studies are unchanged is taken from the database."""
    from ..followup import follow_up
    from ..io import load

    done = [e for e in entries if e["status"] == "done"]
    inputs = []
    for e in done:
        thickness = _axial_spacing(e["record"]["input"]["grid"]["affine"])
        entry = {"case_id": e["case_id"], "patient_id": e["patient_id"], "timepoint": e["timepoint"],
                 "order": e["order"], "modality": e["modality"],
                 "lesions": [{**lesion_facts(o), "slice_thickness_mm": thickness} for o in e["record"]["objects"]],
                 "prompts_transferred": studies[e["case_id"]].prompts.kind == "from"}
        transfer = (e["files"] or {}).get("transfer")
        if transfer and transfer.get("registration"):  # registered onto its source: re-used if that is the baseline
            entry["registration"] = transfer["registration"]
        inputs.append(entry)
    if not inputs:
        return []
    keys = {e["case_id"]: (store.study(e["case_id"]) or {"key": ""})["key"] for e in done}
    baselines: dict[tuple, dict[str, Any]] = {}
    for entry in sorted(inputs, key=lambda e: e["order"]):
        baseline = baselines.setdefault((entry["patient_id"], entry["modality"]), entry)
        pair = f"{keys[entry['case_id']]}:{keys[baseline['case_id']]}:{register}"
        cached = store.registration(pair) if baseline is not entry and "registration" not in entry else None
        if cached is not None:
            entry["registration"] = {**cached, "case_id": entry["case_id"], "to": baseline["case_id"]}

    def load_image(case_id: str):
        study = studies[case_id]
        return load(study.image, series_uid=study.series_uid)

    try:
        followed = follow_up(inputs, load_image=load_image, register=register)
    except Exception as exc:  # the studies are committed: their exports must still be written
        log.error("the follow-up could not be computed (%s: %s); the results are written without it",
                  type(exc).__name__, " ".join(str(exc).split())[:200])
        return []
    store.save_registrations({f"{keys[r['case_id']]}:{keys[r['to']]}:{register}": r
                              for patient in followed for r in patient.get("registration", [])
                              if r.get("case_id") in keys and r.get("to") in keys})
    return followed


def _axial_spacing(affine: list[list[float]]) -> float:
    """The spacing of the voxel axis closest to the superior direction (the slice thickness of an axial series)."""
    import numpy as np

    columns = np.asarray(affine, float)[:3, :3]
    axis = int(np.argmax(np.abs(columns[2]) / np.linalg.norm(columns, axis=0)))
    return round(float(np.linalg.norm(columns[:, axis])), 4)


def results_csv(results: dict[str, Any]) -> str:
    """One row per lesion per study (a failed study: one row with its error), with the metadata columns."""
    tracks = {}
    for patient in results.get("followup", []):
        for lesion in patient.get("lesions", []):
            for point in lesion.get("by_timepoint", []):
                if point.get("label") is not None:
                    tracks[(point["case_id"], point["label"])] = lesion["track"]
    meta_columns = sorted({k for s in results["studies"] for k in s.get("metadata", {})})
    renamed = {k: f"meta_{k}" if k in CSV_COLUMNS else k for k in meta_columns}  # never overrides a result
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*CSV_COLUMNS, *renamed.values()], lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    for study in results["studies"]:
        base = {renamed[k]: _cell(v) for k, v in study.get("metadata", {}).items()}
        base.update({"case_id": study["case_id"], "patient_id": _cell(study["patient_id"]),
                     "timepoint": study["timepoint"], "modality": study.get("modality"), "status": study["status"],
                     "error": _cell(study.get("error"))})
        objects = (study.get("record") or {}).get("objects", [])
        if not objects:
            writer.writerow(base)
        for obj in objects:
            f = lesion_facts(obj)
            lo, hi = f["volume_ml_range"] or (None, None)
            writer.writerow({**base, **{k: f[k] for k in ("label", "volume_ml", "long_axis_mm",
                                                          "short_axis_mm", "max_diameter_3d_mm")},
                             "name": _cell(f["name"]),
                             "volume_ml_low": lo, "volume_ml_high": hi, "touches_border": int(f["touches_border"]),
                             "flags": ";".join(f["flags"]), "track": tracks.get((study["case_id"], f["label"]))})
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    """A text cell a spreadsheet will not run as a formula (``=``, ``+``, ``-``, ``@`` first: quoted)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def write_exports(results: dict[str, Any], outdir: Path, *, pseudonymise: bool, report: bool) -> None:
    from ..io._atomic import atomic_path

    shared = results
    if pseudonymise:
        from .privacy import pseudonymise as pseudonymised

        shared = pseudonymised(results)
    with atomic_path(outdir / "results.json") as tmp:
        tmp.write_text(json.dumps(shared, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    with atomic_path(outdir / "results.csv") as tmp:
        tmp.write_text(results_csv(shared), encoding="utf-8")
    if report:
        from .html import write_report

        write_report(results, outdir, pseudonymise=pseudonymise)
