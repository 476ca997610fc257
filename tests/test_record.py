"""run_case and its record: outputs committed together, the report schema, CLI and API alike."""

from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest

import medsam3d as m3
from medsam3d.cli import main
from medsam3d.propagate import PropagationConfig
from medsam3d.record import ReportError, schema, stable_view, validate_report, volatile_paths

from conftest import EXAMPLES
from synthetic import ThresholdModel, ellipsoid

CASE = EXAMPLES / "sts041_ct"


def _case():
    """A bright ellipsoid (14 slices) in a flipped, anisotropic grid, and a 2D box on its middle slice."""
    mask = ellipsoid((48, 44, 24), (22, 20, 12), (10, 8, 7))
    affine = np.diag([-0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [10, -20, 5]
    volume = m3.Volume(np.where(mask, 200.0, 10.0).astype(np.float32), affine, {"modality": "MR"})
    ii, jj = np.flatnonzero(mask[:, :, 12].any(1)), np.flatnonzero(mask[:, :, 12].any(0))
    prompts = {"version": 1, "objects": [{"name": "ball", "slice": 12,
                                          "box": [int(ii[0]), int(jj[0]), int(ii[-1]), int(jj[-1])]}]}
    return volume, mask, prompts


def test_run_case_writes_every_output_and_a_valid_record(tmp_path):
    volume, mask, prompts = _case()
    outputs = {"labels": tmp_path / "ball.seg.nrrd", "report": tmp_path / "ball.json", "mesh": tmp_path / "ball.stl"}
    record = m3.run_case(volume, prompts, model=ThresholdModel(), outputs=outputs, window="percentile", zoom=None,
                         taper=None, case_id="case-1")
    obj = record.object("ball")
    labels = m3.load_labels(outputs["labels"], volume)
    assert obj.voxels == int((labels.array == 1).sum()) > 0.9 * mask.sum()
    assert obj.volume_ml == pytest.approx(obj.voxels * 0.8 * 0.9 * 2.5 / 1000, rel=1e-12)
    assert obj.measurements["whole"]["voxels"] == obj.voxels and obj.measurements["lesions"] == []
    assert obj.mesh["watertight"] and obj.mesh["volume_ml"] == pytest.approx(obj.volume_ml, rel=0.1)
    report = json.loads(outputs["report"].read_text())
    validate_report(report)
    assert report == json.loads(json.dumps(record.to_dict()))
    assert report["case_id"] == "case-1" and report["schema_version"] == m3.SCHEMA_VERSION
    assert report["prompts"]["given"] == prompts and report["prompts"]["resolved"][0]["boxes"][0]["slice"] == 12
    assert report["outputs"] == {"labels": str(outputs["labels"]), "report": str(outputs["report"]),
                                 "meshes": [str(outputs["mesh"])], "pictures": []}
    assert report["input"]["sha256"] is None and report["input"]["grid"]["axcodes"] == "LAS"
    assert report["model"] == {"name": "threshold", "device": "cpu", "runtime": "numpy", "checkpoint": None,
                               "weights_sha256": None, "trust_checkpoint": False}
    assert m3.CaseRecord.from_dict(report).to_dict() == report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ball.json", "ball.seg.nrrd", "ball.stl"]


def test_a_failing_output_leaves_no_output_behind(tmp_path, monkeypatch):
    """The label map and the mesh are written before the picture; when the picture fails, none stays."""
    import medsam3d.render

    def broken(*args, **kwargs):
        raise m3.Medsam3dError("expected a display for the picture, found none")

    monkeypatch.setattr(medsam3d.render, "render_meshes", broken)
    volume, _, prompts = _case()
    outputs = {"labels": tmp_path / "l.nii.gz", "report": tmp_path / "r.json", "mesh": tmp_path / "m.stl",
               "picture": tmp_path / "p.png"}
    with pytest.raises(m3.Medsam3dError, match="display"):
        m3.run_case(volume, prompts, model=ThresholdModel(), outputs=outputs, window="percentile", zoom=None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("outputs, message", [
    ({"report": "r.txt"}, "ending in .json"),
    ({"mesh": "m.nii.gz"}, "ending in .stl"),
    ({"picture": "p.jpg"}, "ending in .png"),
    ({"labels": "no/l.nii.gz"}, "existing output folder"),
    ({"labels": "l.dcm"}, "DICOM source series"),
    ({"pictures": "p.png"}, "expected outputs among"),
    ({"labels": "/sys/out.nii.gz"}, "where files can be written"),  # read-only, even for root
    ({"report": "/proc/r.json"}, "where files can be written"),
])
def test_outputs_are_checked_before_the_model_loads(tmp_path, monkeypatch, outputs, message):
    import medsam3d.models

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model loaded although an output cannot be written")

    monkeypatch.setattr(medsam3d.models, "load_model", must_not_load)
    volume, _, prompts = _case()
    with pytest.raises(m3.Medsam3dError, match=message):
        m3.run_case(volume, prompts, outputs={k: tmp_path / v for k, v in outputs.items()})
    assert list(tmp_path.iterdir()) == []


def _report():
    volume, _, prompts = _case()
    return m3.run_case(volume, prompts, model=ThresholdModel(), window="percentile", zoom=None).to_dict()


@pytest.mark.parametrize("spoil, where", [
    (lambda r: r.update(extra=1), "(top level)"),
    (lambda r: r["objects"][0].update(colour="red"), "objects/0"),
    (lambda r: r["objects"][0].update(volume_ml="12 mL"), "objects/0/volume_ml"),
    (lambda r: r["objects"][0]["measurements"]["whole"].update(volume_cc=1.0), "objects/0/measurements"),
    (lambda r: r["settings"]["propagation"].pop("stride"), "settings/propagation"),
    (lambda r: r["input"]["grid"].update(axcodes="XYZ"), "input/grid/axcodes"),
    (lambda r: r.pop("schema_version"), "(top level)"),
    (lambda r: r.update(schema_version="2.0"), "found '2.0'; use the medsam3d version that wrote it"),
])
def test_a_malformed_report_fails_the_schema(spoil, where):
    report = _report()
    validate_report(report)
    spoil(report)
    with pytest.raises(ReportError) as info:
        validate_report(report)
    assert where in str(info.value) and len(str(info.value).splitlines()) == 1


def test_the_schema_is_strict_and_names_every_engine_setting():
    def walk(node, path=""):
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, path
        for key, sub in node.get("properties", {}).items():
            walk(sub, f"{path}/{key}")
        for sub in node.get("$defs", {}).values():
            walk(sub, path)

    walk(schema())
    names = set(schema()["properties"]["settings"]["properties"]["propagation"]["properties"])
    assert names == {f.name for f in fields(PropagationConfig)}
    assert ("timings",) in volatile_paths() and ("objects", "*", "mesh", "path") in volatile_paths()


def test_stable_view_drops_only_what_differs_between_runs():
    a, b = _report(), _report()
    assert a != b or a["timings"] == b["timings"]  # times differ (almost always)
    assert stable_view(a) == stable_view(b)
    assert "timings" not in stable_view(a) and "objects" in stable_view(a) and "model" in stable_view(a)


@pytest.mark.slow
def test_cli_and_api_give_the_same_record_on_the_example(tmp_path, litemedsam):
    """The CLI's segment is a thin layer over run_case: the same record, but for times and paths."""
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"version": 1, "objects": [
        {"name": "sarcoma", "slice": 23, "box": [57, 57, 100, 109], "z_range": [21, 25]}]}))
    image = CASE / "CT_image.nii.gz"
    cli_report = tmp_path / "cli.json"
    assert main(["segment", str(image), "--prompts", str(prompts), "-o", str(tmp_path / "cli.seg.nrrd"),
                 "--json", str(cli_report), "--measure", "--fast", "--no-progress", "--case-id", "sts041"]) == 0
    record = m3.run_case(image, prompts, model=litemedsam, measure=True, config=PropagationConfig.fast(),
                         case_id="sts041", outputs={"labels": tmp_path / "api.seg.nrrd"})
    cli = json.loads(cli_report.read_text())
    validate_report(cli)
    validate_report(record.to_dict())
    assert stable_view(cli) == stable_view(record.to_dict())
    assert cli["input"]["sha256"] == record.input["sha256"] and len(cli["input"]["sha256"]) == 64
    assert record.object("sarcoma").volume_ml > 0 and record.object(1).slices == [21, 25]
    a, b = m3.load(tmp_path / "cli.seg.nrrd"), m3.load(tmp_path / "api.seg.nrrd")
    assert np.array_equal(a.array, b.array)


def test_a_text_prompt_through_run_case_is_recorded_as_proposed_and_resolved(tmp_path):
    """A v2 text entry answered by a detector (a real classical one, from test_detect): one object per
    blob, each with its text, detector and score in the record, which still follows the schema."""
    from test_detect import BrightBlobDetector

    mask = ellipsoid((48, 44, 24), (14, 14, 8), (5, 5, 3)) | ellipsoid((48, 44, 24), (34, 30, 15), (6, 5, 4))
    volume = m3.Volume(np.where(mask, 0.9, 0.1).astype(np.float32), np.diag([0.8, 0.9, 2.5, 1.0]), {"modality": "MR"})
    record = m3.run_case(volume, {"version": 2, "objects": [{"name": "lesion", "text": "lesion"}]},
                         model=ThresholdModel(), detector=BrightBlobDetector(), window="percentile", zoom=None,
                         taper=None, outputs={"report": tmp_path / "r.json"})
    report = json.loads((tmp_path / "r.json").read_text())
    validate_report(report)
    assert [o.name for o in record.objects] == ["lesion", "lesion 2"] and {o.text for o in record.objects} == {"lesion"}
    assert all(o.voxels > 0 for o in record.objects) and report["settings"]["detector"] == "bright-blobs"
    resolved = report["prompts"]["resolved"]
    assert [r["detector"] for r in resolved] == ["bright-blobs"] * 2 and all(r["score"] > 0.5 for r in resolved)
    assert report["prompts"]["given"]["objects"][0] == {"name": "lesion", "text": "lesion"}


def test_an_output_that_would_overwrite_an_input_is_refused(tmp_path):
    volume, _, prompts = _case()
    image = m3.save(volume, tmp_path / "image.nii.gz")
    prompt_file = tmp_path / "p.json"
    prompt_file.write_text(json.dumps(prompts))
    for outputs in ({"report": prompt_file}, {"labels": image}):
        with pytest.raises(m3.VolumeIOError, match="is an input of this case"):
            m3.run_case(image, prompt_file, model=ThresholdModel(), outputs=outputs)
    assert json.loads(prompt_file.read_text()) == prompts and m3.load(image).same_grid(volume)


def test_an_unknown_engine_option_is_refused_before_any_work(monkeypatch):
    import medsam3d.models

    monkeypatch.setattr(medsam3d.models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    volume, _, prompts = _case()
    with pytest.raises(m3.Medsam3dError, match="expected engine options among .*found 'windw'"):
        m3.run_case(volume, prompts, windw="lung")
    with pytest.raises(m3.Medsam3dError, match="found 'measure'"):
        m3.Session(volume, model=ThresholdModel(), measure=False)


def test_the_engine_options_run_case_passes_on_are_segments_keyword_options():
    import inspect

    from medsam3d.pipeline import ENGINE_OPTIONS, segment

    keywords = {n for n, p in inspect.signature(segment).parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert set(ENGINE_OPTIONS) == keywords - {"model", "model_name", "checkpoint", "device", "progress"}
