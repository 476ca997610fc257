"""Text prompts in the batch (a manifest's ``text:WHAT`` rows) and in the server (``{"name", "text"}`` entries)."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import pytest
from conftest import shared

from medsam3d.batch.manifest import ManifestError, PromptSource, read_manifest
from medsam3d.batch.worker import engine_options

CT = "dcmqi_ct3slice/ct-3slice"


def _manifest(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_the_detector_of_a_study_row_then_batch_then_ct_anatomy(tmp_path):
    columns = ("case_id", "patient_id", "timepoint", "image", "prompts", "detector")
    (tmp_path / "ct.nii.gz").write_bytes(b"")
    (tmp_path / "p.json").write_text("{}")
    rows = [{"case_id": "a", "patient_id": "P", "timepoint": "1", "image": "ct.nii.gz", "prompts": "text:left lung"},
            {"case_id": "b", "patient_id": "Q", "timepoint": "1", "image": "ct.nii.gz", "prompts": "text:lungs",
             "detector": "CT-Anatomy"},
            {"case_id": "c", "patient_id": "R", "timepoint": "1", "image": "ct.nii.gz", "prompts": "p.json"}]
    a, b, c = read_manifest(_manifest(tmp_path / "m.csv", rows, columns))
    assert a.prompts == PromptSource("text", "left lung") and a.detector is None and b.detector == "ct-anatomy"
    assert a.metadata == {}  # the detector column is the manifest's, not metadata
    assert engine_options({}, a)["detector"] == "ct-anatomy"
    assert engine_options({"detector": "other"}, a)["detector"] == "other"
    assert engine_options({"detector": "other"}, b)["detector"] == "ct-anatomy"
    assert "detector" not in engine_options({}, c)  # a prompt file's text objects: the batch's detector only
    for prompts, detector, message in (("text:lungs", "/models/gdino", "expected a detector among ct-anatomy"),
                                       ("text:lungs", "no-such", "expected a detector among"),
                                       ("10,10,40,40@1", "ct-anatomy", "a detector answers texts")):
        bad = [{**rows[0], "prompts": prompts, "detector": detector}]
        with pytest.raises(ManifestError, match=message):
            read_manifest(_manifest(tmp_path / "bad.csv", bad, columns))


def test_a_manifest_text_row_runs_with_ct_anatomy_by_default(tmp_path):
    """Two text rows on the shared 3-slice CT: 'left lung' is found, segmented and reported with the
    detector's proposals; 'liver' (outside ct-anatomy's vocabulary) fails at the prompts, in one line."""
    from medsam3d.batch.runner import run_batch
    from medsam3d.record import validate_report

    ct = shared(CT)
    rows = [{"case_id": "lung", "patient_id": "P1", "timepoint": "1", "image": str(ct), "prompts": "text:left lung"},
            {"case_id": "liver", "patient_id": "P2", "timepoint": "1", "image": str(ct), "prompts": "text:liver"}]
    manifest = _manifest(tmp_path / "m.csv", rows, ("case_id", "patient_id", "timepoint", "image", "prompts"))
    summary = run_batch(manifest, tmp_path / "out", engine="local", workers=1, fast=True, zoom=None)
    assert (summary.done, summary.failed) == (1, 1)
    record = json.loads((tmp_path / "out" / "lung" / "record.json").read_text())
    validate_report(record)
    (proposal,) = record["prompts"]["detections"]
    assert proposal["kept"] and proposal["name"] == "left lung" and proposal["detector"] == "ct-anatomy (classical)"
    assert record["settings"]["detector"] == "ct-anatomy" and record["objects"][0]["voxels"] > 0
    db = sqlite3.connect(tmp_path / "out" / "results.sqlite")
    ((stage, error),) = db.execute("SELECT stage, error FROM failures WHERE case_id = 'liver'")
    assert "detector 'ct-anatomy' can find (body, lungs" in error and "\n" not in error, (stage, error)


# --- the server -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from synthetic import ThresholdModel
    from test_server import TOKEN, serving

    from medsam3d.server import ServerSettings

    settings = ServerSettings(token=TOKEN, workdir=tmp_path_factory.mktemp("server"))
    with serving(settings, ThresholdModel()) as client:
        yield client


@pytest.fixture(scope="module")
def ct_session(text_server, tmp_path_factory):
    import medsam3d as m3

    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    m3.save(m3.load(shared(CT)), path)
    status, session = text_server.upload(path.read_bytes())
    assert status == 201, session
    return session["session_id"]


def test_a_server_request_with_a_text_entry_is_answered_by_ct_anatomy(text_server, ct_session):
    from medsam3d.record import validate_report

    job = text_server.segment(ct_session, {"version": 2, "objects": [{"name": "lung", "text": "left lung"}]})
    assert job["state"] == "done", job
    status, record = text_server.json("GET", f"/v1/jobs/{job['job_id']}/record")
    assert status == 200
    validate_report(record)
    assert record["settings"]["detector"] == "ct-anatomy"
    assert record["prompts"]["resolved"][0]["text"] == "left lung"
    assert [(d["kept"], d["name"]) for d in record["prompts"]["detections"]] == [(True, "lung")]
    # the detector option names a registered detector
    job = text_server.segment(ct_session, {"version": 2, "objects": [{"name": "lung", "text": "lungs"}]},
                              {"detector": "ct-anatomy"})
    assert job["state"] == "done", job


def test_a_server_detector_is_a_registered_name_never_a_path(text_server, ct_session):
    text = {"version": 2, "objects": [{"name": "lung", "text": "left lung"}]}
    for body, expected in (
            ({"prompts": text, "options": {"detector": "/models/gdino"}}, "detector"),
            ({"prompts": text, "options": {"detector": "no-such"}}, "expected a detector among ct-anatomy"),
            ({"prompts": text, "options": {"detector_weights": "/models/gdino"}}, "detector_weights"),
            ({"prompts": {"version": 2, "objects": [{"name": "l", "text": "lungs", "detector": "no-such"}]}},
             "expected a detector among")):
        status, answer = text_server.json("POST", f"/v1/sessions/{ct_session}/segment", body)
        assert status == 422 and expected in answer["detail"] and "\n" not in answer["detail"], (body, answer)
    # a text the detector cannot answer fails the job with the vocabulary, in one line
    job = text_server.segment(ct_session, {"version": 2, "objects": [{"name": "l", "text": "liver"}]})
    assert job["state"] == "failed" and "can find (body, lungs" in job["error"] and "\n" not in job["error"]
