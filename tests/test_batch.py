"""The batch runner end to end, with the real model on real images.

One manifest holds the example case (so that these tests run on a user's clone), a follow-up
of it made by moving the image rigidly (its prompts transferred ``from:`` the baseline),
three broken rows (a missing image, a bad prompt file, a file that is no image), and, when
``../shared/data`` is there, a DICOM CT prompted by its RTSTRUCT. It runs through the local
engine and a real local Ray cluster, and a run killed with SIGKILL is resumed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medsam3d.batch.runner import EXIT_FAILED_STUDIES, run_batch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sts041_ct"
SHARED = ROOT.parent / "shared" / "data"
DICOM_CT = SHARED / "ibsi_sts_041" / "dicom" / "CT"
FAST = {"fast": True}


MOTION = {"degrees": 4.0, "shift_mm": (5.0, -4.0, 3.0)}


def _motion(image):
    """A rotation about the superior axis through the image's centre and a shift (ITK's LPS mm)."""
    import SimpleITK as sitk

    transform = sitk.Euler3DTransform()
    transform.SetCenter(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    transform.SetRotation(0.0, 0.0, np.deg2rad(MOTION["degrees"]))
    transform.SetTranslation(MOTION["shift_mm"])
    return transform


def _moved_copy(src: Path, dst: Path) -> None:
    """The image moved rigidly by :data:`MOTION` (the patient moved between two scans)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(src))
    sitk.WriteImage(sitk.Resample(image, image, _motion(image), sitk.sitkLinear, -1024.0), str(dst))


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    columns = ["case_id", "patient_id", "timepoint", "image", "prompts", "series_uid", "arm"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("manifest")
    shutil.copy(EXAMPLE / "CT_image.nii.gz", root / "baseline.nii.gz")
    shutil.copy(EXAMPLE / "prompts.json", root / "prompts.json")
    _moved_copy(EXAMPLE / "CT_image.nii.gz", root / "followup.nii.gz")
    (root / "broken.json").write_text('{"version": 1, "objects": [')
    (root / "notes.nii.gz").write_text("this is no image")
    rows = [
        {"case_id": "P1_t0", "patient_id": "P1", "timepoint": "2024-01-10", "image": "baseline.nii.gz",
         "prompts": "prompts.json", "arm": "A"},
        {"case_id": "P1_t1", "patient_id": "P1", "timepoint": "2024-04-02", "image": "followup.nii.gz",
         "prompts": "from:P1_t0", "arm": "A"},
        {"case_id": "P2_missing", "patient_id": "P2", "timepoint": "1", "image": "nowhere.nii.gz",
         "prompts": "prompts.json", "arm": "B"},
        {"case_id": "P3_badprompt", "patient_id": "P3", "timepoint": "1", "image": "baseline.nii.gz",
         "prompts": "broken.json", "arm": "B"},
        {"case_id": "P4_notimage", "patient_id": "P4", "timepoint": "1", "image": "notes.nii.gz",
         "prompts": "prompts.json", "arm": "B"},
    ]
    if DICOM_CT.is_dir():
        rows.append({"case_id": "STS041_CT", "patient_id": "STS041", "timepoint": "1",
                     "image": str(DICOM_CT / "image"), "prompts": str(DICOM_CT / "mask" / "RS.dcm"), "arm": "C"})
    return _write_manifest(root / "manifest.csv", rows)


@pytest.fixture(scope="module")
def local_run(manifest, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("local") / "out"
    summary = run_batch(manifest, outdir, engine="local", workers=1, **FAST)
    return summary, outdir


def _labels_digest(path: Path) -> str:
    from medsam3d.io import load_labels

    labels = load_labels(path)
    return hashlib.sha256(np.ascontiguousarray(labels.array, dtype=np.uint16).tobytes()).hexdigest()


def test_local_engine_runs_every_study_and_records_failures(local_run, manifest):
    summary, outdir = local_run
    good = 3 if DICOM_CT.is_dir() else 2
    assert (summary.done, summary.failed, summary.skipped) == (good, 3, 0)
    assert summary.exit_code == EXIT_FAILED_STUDIES
    db = sqlite3.connect(outdir / "results.sqlite")
    status = dict(db.execute("SELECT case_id, status FROM studies"))
    assert status["P1_t0"] == status["P1_t1"] == "done"
    failures = {r[0]: (r[1], r[2]) for r in db.execute("SELECT case_id, stage, error FROM failures")}
    assert failures["P2_missing"][0] == "load" and "nowhere.nii.gz" in failures["P2_missing"][1]
    assert failures["P3_badprompt"][0] == "prompts" and "broken.json" in failures["P3_badprompt"][1]
    assert failures["P4_notimage"][0] == "load"
    assert all("\n" not in error for _, error in failures.values())
    for case_id in ("P1_t0", "P1_t1"):
        folder = outdir / case_id
        for name in ("labels.seg.nrrd", "labels.nii.gz", "record.json", "measurements.csv", "snapshot.png",
                     "overlay_label1.png", "meshes/surface.stl"):
            assert (folder / name).is_file(), f"{case_id}/{name}"
        from medsam3d.record import validate_report

        validate_report(json.loads((folder / "record.json").read_text()))
    assert not (outdir / "P2_missing").exists()
    assert not any((outdir / ".staging").glob("*"))
    # the lesions table holds the record's numbers
    (volume,) = db.execute("SELECT volume_ml FROM lesions WHERE case_id = 'P1_t0'").fetchone()
    record = json.loads((outdir / "P1_t0" / "record.json").read_text())
    assert volume == pytest.approx(record["objects"][0]["volume_ml"])
    assert 40 < volume < 80  # the expert's contour holds 60.6 mL


def test_prompt_transfer_and_follow_up(local_run):
    _, outdir = local_run
    results = json.loads((outdir / "results.json").read_text())
    t1 = next(s for s in results["studies"] if s["case_id"] == "P1_t1")
    assert t1["files"]["transfer"]["from"] == "P1_t0"
    v0, v1 = (next(s for s in results["studies"] if s["case_id"] == c)["record"]["objects"][0]["volume_ml"]
              for c in ("P1_t0", "P1_t1"))
    assert v1 == pytest.approx(v0, rel=0.15)  # the same tumour, moved
    (patient,) = [p for p in results["followup"] if p["patient_id"] == "P1"]
    assert [t["case_id"] for t in patient["timepoints"]] == ["P1_t0", "P1_t1"]
    (track,) = patient["lesions"]
    assert [p["status"] for p in track["by_timepoint"]] == ["baseline", "present"]
    assert patient["prompts_transferred"] is True
    assert patient["response"][1]["recist"] == "SD"
    registration = patient["registration"][-1]
    assert registration["method"] == "rigid"
    # the follow-up's segmentation, from transferred prompts, against the baseline's moved the known way
    import SimpleITK as sitk

    baseline = sitk.ReadImage(str(outdir / "P1_t0" / "labels.nii.gz"))
    expected = sitk.GetArrayFromImage(sitk.Resample(baseline, baseline, _motion(baseline), sitk.sitkNearestNeighbor))
    found = sitk.GetArrayFromImage(sitk.ReadImage(str(outdir / "P1_t1" / "labels.nii.gz")))
    dice = 2 * np.sum((expected > 0) & (found > 0)) / (np.sum(expected > 0) + np.sum(found > 0))
    assert dice > 0.85, dice


def test_results_csv_and_metadata(local_run):
    _, outdir = local_run
    with open(outdir / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_case = {r["case_id"]: r for r in rows}
    assert by_case["P1_t0"]["arm"] == "A" and by_case["P2_missing"]["status"] == "failed"
    assert float(by_case["P1_t0"]["volume_ml"]) > 0
    assert by_case["P1_t1"]["track"] == by_case["P1_t0"]["track"] != ""


def test_rerun_skips_unchanged_and_retries_failed_on_request(local_run, manifest):
    summary, outdir = local_run
    again = run_batch(manifest, outdir, engine="local", workers=1, **FAST)
    assert (again.done, again.skipped, again.failed) == (0, summary.done, 3)
    retried = run_batch(manifest, outdir, engine="local", workers=1, retry_failed=True, **FAST)
    assert (retried.done, retried.skipped, retried.failed) == (0, summary.done, 3)
    db = sqlite3.connect(outdir / "results.sqlite")
    assert db.execute("SELECT COUNT(*) FROM failures WHERE case_id = 'P2_missing'").fetchone()[0] == 2
    assert db.execute("SELECT COUNT(*) FROM studies").fetchone()[0] == summary.total
    assert db.execute("SELECT COUNT(*) FROM registrations").fetchone()[0] == 1  # P1_t1 onto P1_t0, kept


def test_bad_manifest_is_refused_before_anything_runs(tmp_path):
    path = _write_manifest(tmp_path / "m.csv", [
        {"case_id": "a", "patient_id": "p", "timepoint": "1", "image": "x.nii.gz", "prompts": "1,1,5,5@0"},
        {"case_id": "a", "patient_id": "q", "timepoint": "1", "image": "y.nii.gz", "prompts": "1,1,5,5@0"}])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "medsam3d", "batch", str(path), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "row" in proc.stderr
    assert not out.exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium (Debian's chromium) not installed")
def test_report_renders_in_chromium(local_run, tmp_path):
    _, outdir = local_run
    report = outdir / "report.html"
    html = report.read_text()
    import re

    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//|url\(\s*["']?(https?:)?//""", html)
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          report.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "<table" in dom and "<svg" in dom and 'src="data:image/png;base64,' in dom
    for case_id in ("P1_t0", "P1_t1", "P2_missing"):
        assert case_id in dom


@pytest.mark.skipif(not DICOM_CT.is_dir(), reason="../shared/data (the STS_041 DICOM CT) not present")
def test_dicom_study_gets_seg_and_sr(local_run):
    _, outdir = local_run
    folder = outdir / "STS041_CT"
    assert (folder / "seg.dcm").is_file() and (folder / "sr.dcm").is_file()
    import pydicom

    sr = pydicom.dcmread(folder / "sr.dcm")
    seg = pydicom.dcmread(folder / "seg.dcm")
    referenced = {e.value for e in sr.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    assert seg.SOPInstanceUID in referenced
    record = json.loads((folder / "record.json").read_text())
    assert record["objects"][0]["name"] == "GTV_Mass_CT"  # the RTSTRUCT's ROI became the object
    if shutil.which("dciodvfy"):
        for name in ("seg.dcm", "sr.dcm"):
            out = subprocess.run(["dciodvfy", str(folder / name)], capture_output=True, text=True)
            assert not [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")], name


def test_ray_engine_gives_the_local_results(manifest, local_run, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray (pip install medsam3d[ray]) not installed")
    _, local_out = local_run
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_batch(manifest, tmp_path / "ray", engine="ray", workers=2, **FAST)
    finally:
        ray.shutdown()
    local = json.loads((local_out / "results.json").read_text())
    remote = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert summary.failed == 3 and summary.done == local["summary"]["done"]
    for study in local["studies"]:
        if study["status"] != "done":
            continue
        assert _labels_digest(tmp_path / "ray" / study["case_id"] / "labels.seg.nrrd") == \
            _labels_digest(local_out / study["case_id"] / "labels.seg.nrrd"), study["case_id"]
    assert [(s["case_id"], s["status"]) for s in remote["studies"]] == \
        [(s["case_id"], s["status"]) for s in local["studies"]]


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
    except (OSError, StopIteration):
        return False
    return "Z" not in state.split()[1]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the worker processes")
def test_a_killed_batch_resumes_without_loss_or_duplicates(tmp_path):
    """Two worker processes; the driver alone gets SIGKILL, as the OOM killer would send it."""
    rows = [{"case_id": f"K{n}", "patient_id": f"K{n}", "timepoint": "1", "image": str(EXAMPLE / "CT_image.nii.gz"),
             "prompts": str(EXAMPLE / "prompts.json")} for n in range(3)]
    path = _write_manifest(tmp_path / "kill.csv", rows)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "medsam3d", "batch", str(path), "-o", str(out), "--fast", "--no-progress",
               "--workers", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 900
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if (out / "results.sqlite").is_file():
            try:
                with sqlite3.connect(f"file:{out / 'results.sqlite'}?mode=ro", uri=True, timeout=1) as db:
                    done = db.execute("SELECT COUNT(*) FROM studies WHERE status = 'done'").fetchone()[0]
            except sqlite3.OperationalError:
                continue
            if done >= 1:
                break
    assert proc.poll() is None, "the batch ended before it could be killed"
    workers = _children(proc.pid)
    assert workers, "the batch runs its studies in worker processes"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.5)
    assert not any(_alive(w) for w in workers), "worker processes outlived the killed batch"
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        committed = {r[0] for r in db.execute("SELECT case_id FROM studies WHERE status = 'done'")}
    assert 1 <= len(committed) < 3
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{3 - len(committed)} done, {len(committed)} skipped" in resumed.stdout
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT case_id) FROM studies WHERE status = 'done'").fetchone() \
            == (3, 3)
        assert db.execute("SELECT COUNT(*) FROM lesions").fetchone()[0] == 3
        assert db.execute("SELECT COUNT(*) FROM inflight").fetchone()[0] == 0
    for row in rows:
        json.loads((out / row["case_id"] / "record.json").read_text())
    assert not any((out / ".staging").glob("*"))


def test_a_folder_the_batch_did_not_write_is_never_replaced(tmp_path):
    from medsam3d.batch.outdir import place_study

    (tmp_path / "STS_001").mkdir()
    (tmp_path / "STS_001" / "CT_image.nii.gz").write_bytes(b"the user's data")
    result = {"files": {"labels.seg.nrrd": b"x"}, "record": {"objects": []}}
    with pytest.raises(Exception, match="not written by medsam3d batch"):
        place_study(tmp_path, "STS_001", result)
    assert (tmp_path / "STS_001" / "CT_image.nii.gz").read_bytes() == b"the user's data"
    place_study(tmp_path, "new", result)  # the batch's own folder: written, and replaced on the next run
    place_study(tmp_path, "new", {**result, "files": {"labels.seg.nrrd": b"y"}})
    assert (tmp_path / "new" / "labels.seg.nrrd").read_bytes() == b"y"


def test_pseudonymised_exports_hold_no_paths(local_run, manifest):
    summary, outdir = local_run
    again = run_batch(manifest, outdir, engine="local", workers=1, pseudonymise=True, **FAST)
    assert again.done == 0  # nothing recomputed: only the shared exports are rewritten
    secret = str(manifest.parent)  # the folder names a real export would carry (patient names, MRNs)
    for name in ("results.json", "results.csv", "report.html"):
        text = (outdir / name).read_text()
        assert secret not in text, name
        assert "P1_t0" in text
    database = sqlite3.connect(outdir / "results.sqlite")  # the database stays with the data, paths and all
    assert database.execute("SELECT image FROM studies WHERE case_id = 'P1_t0'").fetchone()[0].startswith(secret)


def test_force_recomputes_and_failed_studies_are_kept_until_retried(tmp_path):
    (tmp_path / "bad.json").write_text("[")
    path = _write_manifest(tmp_path / "m.csv", [
        {"case_id": "a", "patient_id": "p", "timepoint": "1", "image": "missing.nii.gz", "prompts": "1,1,5,5@0"},
        {"case_id": "b", "patient_id": "q", "timepoint": "1", "image": str(EXAMPLE / "CT_image.nii.gz"),
         "prompts": "bad.json"}])
    out = tmp_path / "out"
    counts = []
    for options in ({}, {}, {"force": True}, {"retry_failed": True}):
        summary = run_batch(path, out, report=False, **options)
        counts.append((summary.done, summary.skipped, summary.failed))
    assert counts == [(0, 0, 2)] * 4
    db = sqlite3.connect(out / "results.sqlite")
    # run 1 records both; run 2 keeps them (unchanged inputs fail the same way); --force and --retry-failed rerun
    assert [r[0] for r in db.execute("SELECT run_id FROM failures WHERE case_id = 'a' ORDER BY id")] == [1, 3, 4]
    (tmp_path / "bad.json").write_text('{"version": 1, "objects": [{"name": "t", "slice": 23, "box": [57, 57, 60]}]}')
    summary = run_batch(path, out, report=False)  # a changed prompt file: that study runs again by itself
    assert db.execute("SELECT COUNT(*) FROM failures WHERE case_id = 'b'").fetchone()[0] == 4
    assert db.execute("SELECT COUNT(*) FROM failures WHERE case_id = 'a'").fetchone()[0] == 3
