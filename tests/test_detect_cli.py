"""``medsam3d detect`` and the text path end to end on a real CT (the ct-anatomy detector)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from conftest import shared
from medsam3d.cli.detect import add_detect_arguments, add_segment_text_arguments

CT = "dcmqi_ct3slice/ct-3slice"


def run(argv: list[str]) -> int:
    """The subcommand as medsam3d's parser builds it (the same argument functions)."""
    from medsam3d.cli._common import _fail
    from medsam3d.errors import Medsam3dError

    parser = argparse.ArgumentParser(prog="medsam3d")
    sub = parser.add_subparsers(required=True)
    add_detect_arguments(sub.add_parser("detect"))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Medsam3dError as exc:
        return _fail(str(exc))


def test_detect_writes_prompts_markups_and_labels(tmp_path, capsys):
    import medsam3d as m3
    from medsam3d.prompts import load_prompts

    ct = shared(CT)
    out, mrk, labels = tmp_path / "p.json", tmp_path / "p.mrk.json", tmp_path / "bones.nii.gz"
    assert run(["detect", str(ct), "--text", "left lung", "--text", "right lung", "-o", str(out),
                "--markups", str(mrk)]) == 0
    doc = json.loads(out.read_text())
    assert [o["name"] for o in doc["objects"]] == ["left lung", "right lung"]
    volume = m3.load(ct)
    from_file = load_prompts(out, volume)
    from_markups = load_prompts(mrk, volume)
    for a, b in zip(from_file, from_markups):  # the ROI covers the same box and slices
        assert a.z_range == b.z_range
        assert np.abs(np.subtract(a.boxes[0].box, b.boxes[0].box)).max() <= 1
    assert "seeds the engine" in capsys.readouterr().out
    assert run(["detect", str(ct), "--text", "bones", "--labels", str(labels)]) == 0
    assert m3.load(labels).array.max() == 1


def test_not_found_and_unknown_text_exit_2(tmp_path, capsys):
    ct = shared(CT)
    out = tmp_path / "p.json"
    assert run(["detect", str(ct), "--text", "trachea", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and err.count("\n") == 1 and not out.exists()
    assert run(["detect", str(ct), "--text", "liver", "-o", str(out)]) == 2
    assert "body, lungs, left lung" in capsys.readouterr().err


def test_segment_text_end_to_end(tmp_path):
    """--text 'left lung': ct-anatomy proposes the box, LiteMedSAM segments it, the report says so."""
    from medsam3d.cli.segment import _cmd_segment

    ct = shared(CT)
    parser = argparse.ArgumentParser()
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts")
    add_segment_text_arguments(src, parser)
    args = parser.parse_args(["--text", "left lung"])
    defaults = dict(input=ct, output=tmp_path / "lung.nii.gz", report=tmp_path / "r.json", mesh=None, picture=None,
                    rtstruct=None, sr=None, measure=False, model="litemedsam", checkpoint=None, device="cpu",
                    trust_checkpoint=False, threads=None, series_uid=None, allow_tilt=False, volume_index=None,
                    case_id=None, window=None, modality=None, overlap="score", no_zoom=True, stride=None,
                    taper=0.0, fast=True, blend_embeddings=False, no_progress=True, box=None, box_ras=None)
    for key, value in defaults.items():
        setattr(args, key, value)
    assert _cmd_segment(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    resolved = report["prompts"]["resolved"][0]
    assert resolved["text"] == "left lung" and resolved["detector"] == "ct-anatomy (classical)"
    assert report["settings"]["detector"] == "ct-anatomy"
    assert report["objects"][0]["voxels"] > 0
    # the report lists what the detector proposed, kept or rejected (schema 1.2)
    from medsam3d.record import validate_report

    validate_report(report)
    (proposal,) = report["prompts"]["detections"]
    assert proposal["kept"] and proposal["reason"] is None and proposal["name"] == "left lung"
    assert proposal["box"] == resolved["boxes"][0]["box"] and proposal["slice"] == resolved["boxes"][0]["slice"]
    assert proposal["detector"] == "ct-anatomy (classical)" and proposal["text"] == "left lung"
    assert 0 <= report["timings"]["detect_s"] <= report["timings"]["segment_s"]
