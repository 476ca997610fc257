"""The batch's HTML report and the pseudonymisation of shared results.

A realistic results dict (two patients, three and two time points, one failed study, flags,
follow-up dicts as the spec describes them, overlay PNGs drawn from the real sarcoma case)
is rendered, then opened in a real headless Chromium: the page must hold its tables, plots
and pictures and load nothing from outside. A real name and MRN planted in the paths, the
metadata, the DICOM attributes and an error message must not survive pseudonymisation.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import shared
from synthetic import ThresholdModel, ellipsoid

import medsam3d as m3
from medsam3d.batch.html import render_report, write_report
from medsam3d.batch.privacy import pseudonymise

CHROMIUM = Path("/usr/bin/chromium")
HOSTILE = '<script>alert("x")</script>'
NAME, MRN, DOB = "Doe^Jane", "0048213", "1961-04-12"
IDENTITY = ("Doe^Jane", "DOE_JANE", "Jane Doe", "Jane", MRN, DOB, "19610412", "1.2.826.0.1.3680043.2.1125.77")


def _record() -> dict:
    """A real CaseRecord (run_case with a weight-free model on a synthetic ellipsoid), as a dict."""
    mask = ellipsoid((48, 44, 24), (22, 20, 12), (10, 8, 7))
    affine = np.diag([-0.8, 0.9, 2.5, 1.0])
    volume = m3.Volume(np.where(mask, 200.0, 10.0).astype(np.float32), affine, {"modality": "CT"})
    ii, jj = np.flatnonzero(mask[:, :, 12].any(1)), np.flatnonzero(mask[:, :, 12].any(0))
    prompts = {"version": 1, "objects": [{"name": "tumour", "slice": 12,
                                          "box": [int(ii[0]), int(jj[0]), int(ii[-1]), int(jj[-1])]}]}
    record = m3.run_case(volume, prompts, model=ThresholdModel(), window="percentile", zoom=None, taper=None,
                         measure=True, case_id="x")
    return record.to_dict()


def _study_record(base: dict, case_id: str, folder: str, volume_ml: float, flags: list[str]) -> dict:
    record = copy.deepcopy(base)
    record["case_id"] = case_id
    image = f"/data/pacs/{folder}/ct_{case_id}.nii.gz"
    record["input"].update(path=image, sha256="ab" * 32, modality="CT",
                           dicom={"PatientName": NAME, "PatientID": MRN, "PatientBirthDate": DOB.replace("-", ""),
                                  "StudyInstanceUID": "1.2.826.0.1.3680043.2.1125.77"})
    record["prompts"]["source"] = f"/data/pacs/{folder}/prompts.json"
    record["model"].update(name="litemedsam", weights_sha256="cd" * 32, device="cpu", runtime="onnxruntime",
                           checkpoint="/home/reader/weights/lite_medsam.pth")
    record["outputs"] = {"labels": f"/home/reader/out/{folder}/{case_id}.seg.nrrd", "report": None,
                         "meshes": [f"/home/reader/out/{folder}/{case_id}.stl"], "pictures": []}
    record["warnings"] = [f"window chosen from {image}"]
    obj = record["objects"][0]
    obj.update(volume_ml=volume_ml, volume_ml_range=[volume_ml * 0.8, volume_ml * 1.3 if flags else volume_ml * 1.05],
               flags=flags, touches_border="touches_border" in flags)
    return record


def _lesion(study: dict, name: str, label: int, volume: float, long_mm: float, short_mm: float, flags=()) -> dict:
    return {"case_id": study["case_id"], "patient_id": study["patient_id"], "timepoint": study["timepoint"],
            "label": label, "name": name, "volume_ml": volume, "long_axis_mm": long_mm, "short_axis_mm": short_mm,
            "max_diameter_3d_mm": long_mm * 1.1, "centroid_ras": [1.0, 2.0, 3.0],
            "touches_border": "touches_border" in flags, "flags": list(flags),
            "volume_ml_range": [volume * 0.9, volume * (1.4 if "wide_volume_range" in flags else 1.05)]}


def _followup_p01() -> dict:
    cases = ["P01-T0", "P01-T1", "P01-T2"]
    return {
        "patient_id": "P01", "modality": "CT", "baseline": "P01-T0",
        "timepoints": [{"case_id": c, "timepoint": t, "order": [0, 738900 + 60 * n]}
                       for n, (c, t) in enumerate(zip(cases, ["2024-01-10", "2024-03-12", "2024-05-20"]))],
        "registration": [{"case_id": c, "to": "P01-T0", "method": "rigid", "metric": 0.91,
                          "matrix": np.eye(4).tolist(), "note": None} for c in cases[1:]],
        "lesions": [
            {"track": "L1", "name": HOSTILE, "organ": "thigh", "lymph_node": False, "measurable": True, "target": True,
             "by_timepoint": [{"case_id": c, "label": 1, "volume_ml": v, "diameter_mm": d, "status": s}
                              for c, v, d, s in zip(cases, [120.0, 40.5, 95.0], [80.0, 52.0, 70.0],
                                                    ["baseline", "present", "present"])],
             "volume_change_vs_baseline_pct": [None, -66.3, -20.8], "volume_change_vs_nadir_pct": [None, None, 134.6],
             "diameter_change_vs_baseline_pct": [None, -35.0, -12.5]},
            {"track": "L2", "name": "node", "organ": "groin", "lymph_node": True, "measurable": True, "target": True,
             "by_timepoint": [{"case_id": "P01-T0", "label": 2, "volume_ml": 8.0, "diameter_mm": 16.0,
                               "status": "baseline"},
                              {"case_id": "P01-T1", "label": 2, "volume_ml": 3.0, "diameter_mm": 11.0, "status": "present"},
                              {"case_id": "P01-T2", "label": None, "volume_ml": None, "diameter_mm": None,
                               "status": "disappeared"}],
             "volume_change_vs_baseline_pct": [None, -62.5, -100.0], "volume_change_vs_nadir_pct": [None, None, None],
             "diameter_change_vs_baseline_pct": [None, -31.3, -100.0]},
            {"track": "L3", "name": "satellite", "organ": "thigh", "lymph_node": False, "measurable": True,
             "target": False,
             "by_timepoint": [{"case_id": "P01-T0", "label": None, "volume_ml": None, "diameter_mm": None,
                               "status": "baseline"},
                              {"case_id": "P01-T1", "label": None, "volume_ml": None, "diameter_mm": None,
                               "status": "present"},
                              {"case_id": "P01-T2", "label": 3, "volume_ml": 6.2, "diameter_mm": 14.0, "status": "new"}],
             "volume_change_vs_baseline_pct": [None, None, None], "volume_change_vs_nadir_pct": [None, None, None],
             "diameter_change_vs_baseline_pct": [None, None, None]},
        ],
        "response": [
            {"case_id": "P01-T0", "timepoint": "2024-01-10", "sum_diameters_mm": 96.0, "change_vs_baseline_pct": None,
             "change_vs_nadir_pct": None, "recist": "baseline", "recist_reason": "baseline",
             "total_volume_ml": 128.0, "volume_change_vs_baseline_pct": None, "volume_change_vs_nadir_pct": None,
             "volumetric": "baseline", "volumetric_reason": "baseline", "new_lesions": [], "notes": []},
            {"case_id": "P01-T1", "timepoint": "2024-03-12", "sum_diameters_mm": 63.0, "change_vs_baseline_pct": -34.4,
             "change_vs_nadir_pct": -34.4, "recist": "PR", "recist_reason": "sum of diameters -34.4 % vs baseline (<= -30 %)",
             "total_volume_ml": 43.5, "volume_change_vs_baseline_pct": -66.0, "volume_change_vs_nadir_pct": -66.0,
             "volumetric": "PR", "volumetric_reason": "total volume -66.0 % vs baseline (<= -65.7 %)",
             "new_lesions": [], "notes": []},
            {"case_id": "P01-T2", "timepoint": "2024-05-20", "sum_diameters_mm": 70.0, "change_vs_baseline_pct": -27.1,
             "change_vs_nadir_pct": 11.1, "recist": "PD", "recist_reason": "new lesion L3",
             "total_volume_ml": 101.2, "volume_change_vs_baseline_pct": -20.9, "volume_change_vs_nadir_pct": 132.6,
             "volumetric": "PD", "volumetric_reason": "new lesion L3; total volume +132.6 % vs nadir (>= +72.8 %)",
             "new_lesions": ["L3"], "notes": ["L2 disappeared (node < 10 mm)", "prompts transferred from P01-T0"]},
        ],
        "prompts_transferred": True,
        "rules": {"matching": "centroid distance after rigid registration, 15 mm", "recist": "RECIST 1.1 (target lesions)",
                  "volumetric": "total volume vs baseline and nadir", "thresholds": {"pr_pct": -65.7, "pd_pct": 72.8}},
    }


def _followup_p02() -> dict:
    return {"patient_id": "P02", "modality": "CT", "baseline": "P02-T0",
            "timepoints": [{"case_id": "P02-T0", "timepoint": "baseline", "order": [1, 0.0]}],
            "registration": [],
            "lesions": [{"track": "L1", "name": "tumour", "organ": "arm", "lymph_node": False, "measurable": True,
                         "target": True, "by_timepoint": [{"case_id": "P02-T0", "label": 1, "volume_ml": 33.0,
                                                           "diameter_mm": 41.0, "status": "baseline"}],
                         "volume_change_vs_baseline_pct": [None], "volume_change_vs_nadir_pct": [None],
                         "diameter_change_vs_baseline_pct": [None]}],
            "response": [{"case_id": "P02-T0", "timepoint": "baseline", "sum_diameters_mm": 41.0,
                          "change_vs_baseline_pct": None, "change_vs_nadir_pct": None, "recist": "baseline",
                          "recist_reason": "baseline", "total_volume_ml": 33.0, "volume_change_vs_baseline_pct": None,
                          "volume_change_vs_nadir_pct": None, "volumetric": "baseline", "volumetric_reason": "baseline",
                          "new_lesions": [], "notes": ["P02-T1 failed: no follow-up time point"]}],
            "prompts_transferred": False,
            "rules": {"matching": "single time point", "recist": "RECIST 1.1", "volumetric": "total volume",
                      "thresholds": {"pr_pct": -65.7, "pd_pct": 72.8}}}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """(outdir, results): a batch's output folder with overlay PNGs and the results dict naming them."""
    image_path = shared("ibsi_sts_041/nifti/CT_image.nii.gz")
    mask_path = shared("ibsi_sts_041/nifti/CT_mask.nii.gz")
    pytest.importorskip("matplotlib", reason="the overlays and plots are drawn with matplotlib")
    from medsam3d.render import axial_overlay

    outdir = tmp_path_factory.mktemp("batch")
    image = m3.load(image_path)
    overlay = axial_overlay(image, m3.load_labels(mask_path, image), outdir / "overlay.png", label=1)
    base = _record()

    plan = [  # case, patient, time point, order, folder, volume, flags, status
        ("P01-T0", "P01", "2024-01-10", [0, 738900], "DOE_JANE", 128.0, [], "done"),
        ("P01-T1", "P01", "2024-03-12", [0, 738960], "DOE_JANE", 43.5, ["wide_volume_range"], "done"),
        ("P01-T2", "P01", "2024-05-20", [0, 739020], "DOE_JANE", 101.2, ["touches_border"], "done"),
        ("P02-T0", "P02", "baseline", [1, 0.0], "SMITH_ALAN", 33.0, [], "done"),
        ("P02-T1", "P02", "week 12", [1, 12.0], "SMITH_ALAN", None, [], "failed"),
    ]
    studies, lesions = [], []
    for n, (case, patient, tp, order, folder, volume, flags, status) in enumerate(plan):
        files = {"labels": f"{case}/labels.seg.nrrd", "nifti": None, "dicom_seg": None, "sr": None, "rtstruct": None,
                 "record": f"{case}/record.json", "measurements": f"{case}/measurements.csv", "meshes": [],
                 "snapshot": None, "overlays": []}
        if status == "done":
            (outdir / case).mkdir()
            shutil.copy(overlay, outdir / case / "overlay_1.png")
            files["overlays"] = [{"label": 1, "name": "tumour" if patient == "P02" else HOSTILE, "slice": 30,
                                  "path": f"{case}/overlay_1.png"}]
            if case == "P01-T0":
                shutil.copy(overlay, outdir / case / "snapshot.png")
                files["snapshot"] = f"{case}/snapshot.png"
            if case == "P01-T2":  # a picture the batch named but that is gone: said so, not fatal
                files["overlays"].append({"label": 3, "name": "satellite", "slice": 31, "path": f"{case}/gone.png"})
        error = None if status == "done" else \
            f"expected a readable image, found none at /data/pacs/{folder}/ct_{case}.nii.gz; check the path\nTraceback..."
        study = {"case_id": case, "patient_id": patient, "timepoint": tp, "order": order, "row": n + 2,
                 "status": status,
                 "metadata": {"patient_name": "Jane Doe" if patient == "P01" else "Alan Smith",
                              "MRN": MRN if patient == "P01" else "0077120",
                              "date_of_birth": DOB if patient == "P01" else "1950-02-02", "arm": "B"},
                 "image": f"/data/pacs/{folder}/ct_{case}.nii.gz",
                 "prompts": f"/data/pacs/{folder}/prompts.json" if tp != "week 12" else "from:P02-T0",
                 "error": error, "stage": None if status == "done" else "load", "flags": flags, "files": files,
                 "timings": {"load_s": 1.2, "segment_s": 14.8, "total_s": 17.0} if status == "done" else {"load_s": 0.1},
                 "record": _study_record(base, case, folder, volume, flags) if status == "done" else None}
        studies.append(study)
        if status == "done":
            if patient == "P01":
                fu = _followup_p01()
                index = [t["case_id"] for t in fu["timepoints"]].index(case)
                for track in fu["lesions"]:
                    cell = track["by_timepoint"][index]
                    if cell["volume_ml"] is not None:
                        lesions.append(_lesion(study, track["name"], cell["label"], cell["volume_ml"],
                                               cell["diameter_mm"], cell["diameter_mm"] * 0.6,
                                               flags if cell["label"] == 1 else ()))
            else:
                lesions.append(_lesion(study, "tumour", 1, volume, 41.0, 30.0, flags))
    results = {
        "format": "medsam3d-batch-results/1", "created": "2026-12-06T10:00:00+00:00", "medsam3d_version": m3.__version__,
        "manifest": {"path": "/home/reader/DOE_JANE_and_others/manifest.csv", "sha256": "ef" * 32},
        "settings": {"outdir": "/home/reader/out", "device": "cpu", "followup": True},
        "summary": {"total": 5, "done": 4, "skipped": 0, "failed": 1},
        "studies": studies, "lesions": lesions, "followup": [_followup_p01(), _followup_p02()],
        "failures": [{"case_id": s["case_id"], "row": s["row"], "stage": s["stage"], "error": s["error"]}
                     for s in studies if s["status"] == "failed"],
    }
    return outdir, results


@pytest.fixture(scope="module")
def shared_report(batch):
    """The pseudonymised report (the one meant to be sent on), written into the batch's folder."""
    outdir, results = batch
    return write_report(results, outdir, pseudonymise=True)


@pytest.fixture(scope="module")
def chromium(shared_report, tmp_path_factory):
    """(DOM as Chromium built it, screenshot path): two headless launches for the whole module."""
    if not CHROMIUM.exists():
        pytest.skip(f"needs headless Chromium ({CHROMIUM} not found; apt-get install chromium)")
    work = tmp_path_factory.mktemp("chromium")
    common = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
              f"--user-data-dir={work / 'profile'}", "--disable-extensions", "--hide-scrollbars"]
    url = shared_report.resolve().as_uri()
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False,
                         env={"HOME": str(work), "PATH": "/usr/bin:/bin"})
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = work / "report.png"
    run = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,4000", url], capture_output=True,
                         text=True, timeout=120, check=False, env={"HOME": str(work), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    return dom.stdout, shot


def test_report_holds_every_part_and_renders_without_network(chromium):
    dom, shot = chromium
    summary = re.search(r'<table class="summary">.*?</table>', dom, re.DOTALL).group(0)
    # header; P01: 2 + 2 + 2 objects (L3 new at T2, L2 gone); P02: 1 object and the failed study's row
    assert summary.count("<tr") == 1 + 6 + 2
    assert summary.count('class="failed"') == 1 and summary.count('class="flagged"') >= 2
    assert dom.count("<svg") >= 2 and "volume (mL)" in dom  # one plot per patient, its text as text
    images = re.findall(r'<img [^>]*src="([^"]*)"', dom)
    assert len(images) == 5 and all(src.startswith("data:image/png;base64,") for src in images)
    assert "Overlay not available (file missing)" in dom
    failures = re.search(r'<table class="failures">.*?</table>', dom, re.DOTALL).group(0)
    assert "P02-T1" in failures and "Traceback" not in failures and "load" in failures
    refs = re.findall(r'\b(?:src|href)\s*=\s*["\']?\s*((?:https?:)?//[^"\'\s>]*)', dom, re.IGNORECASE)
    assert refs == [], refs
    assert "<link" not in dom and "@import" not in dom
    assert re.findall(r"url\(\s*['\"]?(?!#|data:)[^)]*\)", dom) == []  # only the plots' own clip paths
    assert "<script" not in dom.lower() and "&lt;script&gt;" in dom  # the hostile name is shown, not run
    assert shot.stat().st_size > 50_000


def test_report_text_is_complete_and_escaped(batch, tmp_path):
    outdir, results = batch
    path = write_report(results, outdir, path=tmp_path / "full.html")
    html = path.read_text(encoding="utf-8")
    assert "{{" not in html and "{%" not in html
    assert HOSTILE not in html and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    assert "<script" not in html.lower()
    for needle in ("RECIST", "PR", "PD", "pr_pct = -65.7", "pd_pct = 72.8", "new: L3", "gone: L2", "L2 disappeared",
                   "ab" * 32, "cd" * 32, "litemedsam", "/data/pacs/DOE_JANE/prompts.json", "ef" * 32,
                   "wide_volume_range", "touches_border", "no record", "Look at these first"):
        assert needle in html, needle
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left nothing behind


def test_missing_pieces_render(batch, tmp_path):
    _, results = batch
    bare = copy.deepcopy(results)
    bare["followup"] = []
    bare.pop("failures")
    bare.pop("summary")
    for study in bare["studies"]:
        study["record"] = None
        study["files"] = {"overlays": [{"label": 1, "name": "x", "slice": None, "path": "../../etc/passwd.png"}]}
    html = render_report(bare, tmp_path)
    assert "No follow-up in these results" in html and "P02-T1" in html
    assert "outside the batch" in html and "data:image" not in html
    assert "{{" not in html
    assert "No study failed" not in html  # the failed study still listed from the studies themselves
    assert render_report({}, tmp_path).count("<table") >= 2


def test_pseudonymise_removes_identity_everywhere(batch, shared_report):
    _, results = batch
    before = json.dumps(results)
    shared = pseudonymise(results)
    assert json.dumps(results) == before  # a copy; the original is untouched
    text = json.dumps(shared, ensure_ascii=False)
    html = shared_report.read_text(encoding="utf-8")
    for content in (text, html):
        for secret in (*IDENTITY, "SMITH_ALAN", "Alan Smith", "0077120", "/data/pacs", "/home/reader"):
            assert secret.lower() not in content.lower(), secret
        assert not re.search(r"(?<![A-Za-z])(doe|smith)(?![A-Za-z])", content, re.IGNORECASE)
    study = shared["studies"][0]
    assert study["patient_id"] == "P01" and study["case_id"] == "P01-T0"
    assert study["image"] == "<P01-T0>/image.nii.gz"
    assert study["record"]["input"]["path"] == "<P01-T0>/image.nii.gz"
    assert study["prompts"] == "<P01-T0>/prompts.json"  # the prompt file as the manifest names it
    assert study["record"]["model"]["checkpoint"] == "<checkpoint>/lite_medsam.pth"
    assert study["record"]["outputs"]["labels"] == "<P01-T0>/output-1.seg.nrrd"
    assert study["metadata"] == {"arm": "B"}
    assert "dicom" in study["record"]["input"] and study["record"]["input"]["dicom"] == {
        "StudyInstanceUID": "<removed>"}
    assert study["record"]["input"]["sha256"] == "ab" * 32 and study["files"]["overlays"][0]["path"] == \
        "P01-T0/overlay_1.png"
    assert shared["manifest"] == {"path": "<manifest>.csv", "sha256": "ef" * 32}
    assert shared["studies"][1]["prompts"] == "<P01-T1>/prompts.json"  # one file, named per study
    assert shared["failures"][0]["error"].startswith("expected a readable image, found none at <P02-T1>/image.nii.gz")
    assert shared["settings"]["outdir"] == "<path>"
    assert shared["studies"][0]["timepoint"] == "2024-01-10"  # scan dates are kept (documented)
