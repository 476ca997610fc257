"""The learned detectors (Grounding DINO, Kosmos-2, SAM 3) through transformers, with tiny random models.

No pretrained weights can be fetched here, so each test builds a tiny, randomly initialised
model from a small configuration, saves it as real weights are saved (safetensors, processor
files) and loads it through the path real weights take. What they find is random: these
tests check the plumbing (loading, slices, boxes, masks, tracks, thresholds), the error
paths and the report, not the answers.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_volume, shared

pytest.importorskip("transformers", reason="the learned detectors need the 'detect' extra (transformers)")

from medsam3d.cli import main
from medsam3d.detect import Detection, load_detector
from medsam3d.detect.hf.random_models import BACKENDS, save_random_model
from medsam3d.errors import DetectorError

CT = "ibsi_sts_041/nifti/CT_image.nii.gz"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A folder per backend holding its tiny random model, as a downloaded model folder looks."""
    root = tmp_path_factory.mktemp("detectors")
    return {b: save_random_model(b, root / b) for b in BACKENDS}


@pytest.fixture(scope="module")
def ct_like():
    """A CT-like volume (HU, air around a soft-tissue body) on an anisotropic grid."""
    rng = np.random.default_rng(0)
    volume = make_volume(shape=(48, 40, 14), spacing=(0.8, 0.8, 3.0), dtype=np.int16)
    array = np.full(volume.shape, -1000, np.int16)
    array[6:42, 5:35] = 40 + rng.integers(-20, 20, (36, 30, 14))
    array[20:30, 15:25, 4:10] = 120
    return type(volume)(array, volume.affine)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_gives_tracks_in_voxel_indices(backend, tiny, ct_like):
    if backend == "kosmos-2":  # square slices: the random model's boxes may all lie in a non-square slice's padding
        ct_like = type(ct_like)(ct_like.array[:40], ct_like.affine)
    detector = load_detector(backend, weights=tiny[backend], box_threshold=0.0, min_score=0.0, stride=3,
                             batch_size=3)
    found = detector.detect(ct_like, "tumor")
    I, J, K = ct_like.shape
    assert found and all(isinstance(d, Detection) and d.source == backend for d in found)
    kept = [d for d in found if d.rejected is None]
    assert kept and found[:len(kept)] == kept  # kept ones first
    for d in found:
        assert 0 <= d.box[0] <= d.box[2] < I and 0 <= d.box[1] <= d.box[3] < J and 0 <= d.slice < K
        assert d.z_range[0] <= d.slice <= d.z_range[1]
    for d in kept:
        assert d.z_range[1] - d.z_range[0] + 1 >= 2  # min_slices: no isolated detection is kept
    assert 1 <= detector.timings["slices"] and detector.timings["detect_s"] > 0
    if backend == "sam3":  # instance masks on the volume's grid, only on the track's slices
        d = next(d for d in kept if d.mask is not None)
        assert d.mask.shape == ct_like.shape and d.mask.any()
        k = np.flatnonzero(d.mask.any(axis=(0, 1)))
        assert d.z_range[0] <= k.min() and k.max() <= d.z_range[1]
    else:
        assert all(d.mask is None for d in found)


def test_slices_are_shown_with_rows_along_j_and_boxes_come_back_in_voxels():
    from medsam3d.detect.hf.common import pixel_box, slice_images
    from medsam3d.preprocess import Window

    plane = np.zeros((30, 20), np.float32)
    plane[25, 3] = 1000.0  # voxel i=25, j=3 of a non-square slice
    image = slice_images([plane], Window("CT", "ct-window", 0.0, 1000.0))[0]
    assert image.shape == (20, 30, 3) and (image[3, 25] == 255).all() and image.sum() == 3 * 255
    assert pixel_box((25.0, 3.0, 26.0, 4.0), 30, 20) == (25.0, 3.0, 25.0, 3.0)  # pixel edges -> that voxel
    assert pixel_box((-5.0, -5.0, 100.0, 100.0), 30, 20) == (0.0, 0.0, 29.0, 19.0)


def test_kosmos2_location_tokens_map_onto_the_whole_slice():
    from medsam3d.detect.hf.kosmos2 import grid_box

    # a 64 x 40 slice padded to 64 x 64: a cell is 2 x 2 pixels
    assert grid_box(0, 0, 64, 40) == (0.0, 0.0, 1.0, 1.0)  # one cell: its edges
    assert grid_box(0, 19 * 32 + 31, 64, 40) == (1.0, 1.0, 62.0, 38.0)  # two corners: cell centres
    assert grid_box(25 * 32, 26 * 32 + 3, 64, 40) is None  # wholly in the padding below the slice
    assert grid_box(5 * 32 + 9, 2 * 32 + 4, 64, 40) == grid_box(2 * 32 + 4, 5 * 32 + 9, 64, 40)


def test_kosmos2_scores_are_probabilities_and_boxes_at_most_max_objects(tiny):
    detector = load_detector("kosmos-2", weights=tiny["kosmos-2"], box_threshold=0.0, max_objects=2)
    answers = detector.answer([np.full((64, 64, 3), 100, np.uint8)] * 3, "tumor")
    assert len(answers) == 3
    for boxes in answers:
        assert 1 <= len(boxes) <= 2  # the constrained decoding always writes a box, at most max_objects
        for (x0, y0, x1, y1), score in boxes:
            assert 0.0 < score <= 1.0 and 0 <= x0 <= x1 <= 63 and 0 <= y0 <= y1 <= 63


def test_thresholds_filter_and_max_tracks_ranks(tiny, ct_like):
    # the random Kosmos-2 opens a box with a probability far below 0.5: nothing passes
    assert load_detector("kosmos-2", weights=tiny["kosmos-2"], box_threshold=0.5).detect(ct_like, "tumor") == []
    found = load_detector("grounding-dino", weights=tiny["grounding-dino"], box_threshold=0.0, min_score=0.0,
                          max_tracks=1).detect(ct_like, "tumor")
    assert sum(d.rejected is None for d in found) == 1
    assert any("max_tracks 1" in (d.rejected or "") for d in found)


def test_weights_errors_are_one_line_and_name_what_to_do(tiny, tmp_path):
    with pytest.raises(DetectorError, match="IDEA-Research/grounding-dino-tiny") as err:
        load_detector("grounding-dino", weights=tmp_path / "absent")
    assert "\n" not in str(err.value) and "--detector-weights" in str(err.value)
    with pytest.raises(DetectorError, match="model_type sam3.*found model_type 'grounding-dino'"):
        load_detector("sam3", weights=tiny["grounding-dino"])
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny["sam3"], pickled)
    for f in pickled.glob("*.safetensors"):
        f.rename(f.with_name("pytorch_model.bin"))
    with pytest.raises(DetectorError, match="pickled, which can run code"):
        load_detector("sam3", weights=pickled)
    with pytest.raises(DetectorError, match="expected options among"):
        load_detector("sam3", weights=tiny["sam3"], no_such_option=1)
    detector = load_detector("sam3", weights=tiny["sam3"])
    with pytest.raises(DetectorError, match="expected a text"):
        detector.detect(make_volume(), "  ")


def test_model_ids_resolve_from_the_cache_and_the_shared_folder_only(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    cache = tmp_path / "hub"
    snapshot = cache / "models--IDEA-Research--grounding-dino-tiny" / "snapshots" / "0123abcd"
    shutil.copytree(tiny["grounding-dino"], snapshot)
    (cache / "models--IDEA-Research--grounding-dino-tiny" / "refs").mkdir()
    (cache / "models--IDEA-Research--grounding-dino-tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("MEDSAM3D_DETECTORS", raising=False)
    assert load_detector("grounding-dino").folder == snapshot  # the default model id, from the cache
    assert load_detector("grounding-dino", weights="IDEA-Research/grounding-dino-tiny").folder == snapshot
    with pytest.raises(DetectorError, match="in the Hugging Face cache"):
        load_detector("grounding-dino", weights="IDEA-Research/grounding-dino-base")
    shared_folder = tmp_path / "detectors"
    shutil.copytree(tiny["kosmos-2"], shared_folder / "kosmos-2")
    monkeypatch.setenv("MEDSAM3D_DETECTORS", str(shared_folder))
    assert load_detector("kosmos-2").folder == shared_folder / "kosmos-2"


def test_cli_detect_and_segment_with_a_learned_detector(tiny, tmp_path, capsys):
    """The CLI end to end on a real CT: proposals to check (prompt file, Slicer ROIs), then the engine."""
    import medsam3d as m3

    ct = shared(CT)
    weights = str(tiny["grounding-dino"])
    prompts, mrk = tmp_path / "new" / "p.json", tmp_path / "p.mrk.json"
    opts = ["--detector", "grounding-dino", "--detector-weights", weights, "--detector-option", "box_threshold=0",
            "--detector-option", "min_score=0", "--detector-option", "max_tracks=2"]
    assert main(["detect", str(ct), "--text", "tumor", *opts, "-o", str(prompts), "--markups", str(mrk)]) == 0
    doc = json.loads(prompts.read_text())
    assert [o["name"] for o in doc["objects"]] == ["tumor", "tumor 2"]
    assert len(json.loads(mrk.read_text())["markups"]) == 2
    out = capsys.readouterr().out
    assert "max_tracks 2" in out and "seeds the engine" in out

    seg, report = tmp_path / "tumor.nii.gz", tmp_path / "record.json"
    assert main(["segment", str(ct), "--text", "tumor", *opts[:-2], "--detector-option", "max_tracks=1",
                 "-o", str(seg), "--json", str(report)]) == 0
    record = json.loads(report.read_text())
    detections = record["prompts"]["detections"]
    assert [d["kept"] for d in detections].count(True) == 1
    assert all(d["detector"] == "grounding-dino" for d in detections)
    assert any(not d["kept"] and d["reason"] for d in detections)
    assert record["timings"]["detect_s"] > 0
    assert [o["name"] for o in record["objects"]] == ["tumor"]
    assert m3.load_labels(seg, m3.load(ct)).shape == m3.load(ct).shape


def test_cli_errors_exit_2_with_one_line(tiny, tmp_path, capsys):
    volume = tmp_path / "ct.nii.gz"
    import medsam3d as m3

    m3.save(make_volume(), volume)
    for argv, expected in (
            (["--detector", "sam3", "--detector-weights", str(tmp_path / "none")], "expected SAM 3 weights"),
            (["--detector", "kosmos-2", "--detector-weights", str(tiny["kosmos-2"]), "--detector-option", "oops"],
             "KEY=VALUE"),
            (["--detector", "grounding-dino", "--detector-weights", str(tiny["grounding-dino"]), "--detector-option",
              "text_threshold=abc"], "text_threshold as a number in [0, 1]"),
            (["--detector", "grounding-dino", "--detector-weights", str(tiny["grounding-dino"]), "--detector-option",
              "stride=2.5"], "stride as an integer"),
            (["--detector", "kosmos-2", "--detector-weights", str(tiny["kosmos-2"]), "--detector-option",
              "box_threshold=0.9"], "not found")):
        out = tmp_path / "p.json"
        assert main(["detect", str(volume), "--text", "tumor", *argv, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.strip().count("\n") == 0 and not out.exists()


def test_a_batch_finds_a_learned_detector_by_name_with_its_folder_options(tiny, tmp_path, monkeypatch):
    """A manifest row 'text:tumor' with the detector column 'grounding-dino': the weights and their
    options come from $MEDSAM3D_DETECTORS/grounding-dino (a batch names detectors, never paths)."""
    import csv

    from medsam3d.batch.runner import run_batch

    ct = shared(CT)
    folder = tmp_path / "detectors" / "grounding-dino"
    shutil.copytree(tiny["grounding-dino"], folder)
    (folder / "medsam3d-detector.json").write_text(json.dumps({"box_threshold": 0, "min_score": 0,
                                                               "max_tracks": 1}))
    monkeypatch.setenv("MEDSAM3D_DETECTORS", str(tmp_path / "detectors"))
    assert load_detector("grounding-dino").options.max_tracks == 1
    assert load_detector("grounding-dino", max_tracks=2).options.max_tracks == 2  # a given option wins
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "patient_id", "timepoint", "image", "prompts", "detector"])
        writer.writerow(["s1", "P1", "1", str(ct), "text:tumor", "grounding-dino"])
    summary = run_batch(manifest, tmp_path / "out", engine="local", workers=1, fast=True)
    assert (summary.done, summary.failed) == (1, 0)
    record = json.loads((tmp_path / "out" / "s1" / "record.json").read_text())
    assert record["settings"]["detector"] == "grounding-dino"
    assert [d["kept"] for d in record["prompts"]["detections"]].count(True) == 1
    (folder / "medsam3d-detector.json").write_text('{"weights": "/elsewhere"}')
    with pytest.raises(DetectorError, match="not weights or device"):
        load_detector("grounding-dino")
