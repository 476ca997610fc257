"""From 2D detections to 3D seeds (medsam3d.detect.tracks) on synthetic detections whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medsam3d import PromptError, Volume
from medsam3d.detect import Detection, register_detector, resolve_text_prompts
from medsam3d.detect.registry import DETECTOR_REGISTRY
from medsam3d.detect.tracks import (
    SliceHit,
    TrackingDetector,
    TrackOptions,
    find_tracks,
    iou,
    link,
)
from medsam3d.errors import DetectorError
from medsam3d.prompts import ObjectPrompt

SHAPE = (64, 56, 40)


def make_volume(*blobs: tuple[tuple[int, int, int, int], tuple[int, int], float]) -> Volume:
    """Boxes of intensity ``value`` on slices ``k0..k1``: ((i0, j0, i1, j1), (k0, k1), value)."""
    array = np.zeros(SHAPE, np.float32)
    for (i0, j0, i1, j1), (k0, k1), value in blobs:
        array[i0 : i1 + 1, j0 : j1 + 1, k0 : k1 + 1] = value
    return Volume(array, np.diag([1.0, 1.0, 2.0, 1.0]), {"modality": "MR"})


class BlobDetector2D:
    """A 2D detector: one box per bright blob of the slice, scored by its mean intensity; with
    ``hallucinate``, a slice where it finds nothing gets a box over the whole slice (what Grounding
    DINO does when the target is absent); with ``masks``, each box comes with the blob's mask."""

    def __init__(self, *, hallucinate: bool = False, masks: bool = False):
        self.hallucinate, self.masks = hallucinate, masks
        self.calls = 0

    def __call__(self, image: np.ndarray):
        self.calls += 1
        labels, n = ndimage.label(image > 0.05)
        answers = []
        for value in range(1, n + 1):
            ii, jj = np.nonzero(labels == value)
            box = (float(ii.min()), float(jj.min()), float(ii.max()), float(jj.max()))
            score = float(image[labels == value].mean())
            answers.append((box, score, labels == value) if self.masks else (box, score))
        if not answers and self.hallucinate:
            answers.append(((0.0, 0.0, image.shape[0] - 1.0, image.shape[1] - 1.0), 0.45))
        return answers


OPTIONS = TrackOptions(stride=4, box_threshold=0.1, min_slices=3, min_score=0.3)


def test_a_true_track_gives_its_key_slice_box_and_range():
    volume = make_volume(((10, 12, 30, 28), (8, 20), 0.9))
    volume.array[8:34, 12:29, 14] = 0.9  # the largest box: slice 14
    detector = BlobDetector2D()
    (d,) = find_tracks(volume, detector, "lesion", source="blobs", options=OPTIONS)
    assert d.rejected is None and d.slice == 14 and d.box == (8, 12, 33, 28) and d.z_range == (8, 20)
    assert d.score == pytest.approx(0.9) and d.source == "blobs" and d.mask is None
    assert detector.calls < SHAPE[2]  # a stride, then around the hits: not every slice
    hallucinating = BlobDetector2D(hallucinate=True)  # its slice-covering boxes call for no refinement
    find_tracks(volume, hallucinating, "lesion", options=OPTIONS)
    assert hallucinating.calls == detector.calls


def test_a_hallucinated_full_slice_box_is_rejected_and_the_true_track_kept():
    volume = make_volume(((10, 12, 30, 28), (8, 20), 0.9))
    found = find_tracks(volume, BlobDetector2D(hallucinate=True), "lesion", options=OPTIONS)
    kept = [d for d in found if d.rejected is None]
    assert len(kept) == 1 and kept[0].z_range == (8, 20)
    (covering,) = [d for d in found if d.rejected]  # one proposal for the slice-covering boxes of the scan
    assert "covers 100% of the slice (> 80%) on" in covering.rejected
    # a classical detector (learned=False) is not judged on its box size
    classic = find_tracks(volume, BlobDetector2D(hallucinate=True), "lesion",
                          options=TrackOptions(stride=4, box_threshold=0.1, min_slices=3, learned=False))
    assert sum(d.rejected is None for d in classic) > 1


def test_an_isolated_detection_and_a_low_score_track_are_rejected_with_their_reasons():
    volume = make_volume(((10, 12, 30, 28), (8, 20), 0.9), ((40, 40, 50, 50), (30, 30), 0.9),
                         ((40, 5, 50, 15), (24, 36), 0.2))
    found = find_tracks(volume, BlobDetector2D(), "lesion", options=OPTIONS)
    reasons = {d.z_range: d.rejected for d in found}
    assert reasons[(8, 20)] is None
    assert reasons[(30, 30)] == "seen on 1 slice (< 3): an isolated detection"
    assert reasons[(24, 36)] == "mean score 0.20 < 0.30"
    assert [d.rejected is None for d in found] == [True, False, False]  # kept first


def test_two_lesions_give_two_detections_and_two_named_objects():
    volume = make_volume(((5, 5, 15, 15), (4, 12), 0.8), ((40, 30, 55, 48), (20, 34), 0.9))
    detector = TrackingDetector("test-2d", lambda text: BlobDetector2D(masks=True), stride=4, box_threshold=0.1)
    found = detector.detect(volume, "lesion")
    assert sorted(d.z_range for d in found) == [(4, 12), (20, 34)] and all(d.rejected is None for d in found)
    assert all(d.mask is not None and d.mask.sum() > 0 for d in found)
    proposals: list[dict] = []
    objects = resolve_text_prompts(volume, [ObjectPrompt("lesion", 1, text="lesion")], detector,
                                   proposals=proposals)
    assert [(o.name, o.label) for o in objects] == [("lesion", 1), ("lesion 2", 2)]
    assert objects[0].z_range == (20, 34)  # the better track (score x slices) first
    assert [(p["kept"], p["name"]) for p in proposals] == [(True, "lesion"), (True, "lesion 2")]


def test_one_missed_slice_is_bridged_two_are_not():
    # two boxes, each on slices 4..16; the detector misses each box's slice 10 (one) or slices 9-10 (two)
    hits = {k: [SliceHit(k, (5, 5, 20, 20), 0.9)] for k in range(4, 17) if k != 10}
    (track,) = link(hits, TrackOptions())
    assert track.slices == [k for k in range(4, 17) if k != 10]
    hits.pop(9)
    assert [t.slices[0] for t in link(hits, TrackOptions())] == [4, 11]
    # a box that moved away (IoU under link_iou) starts its own track
    hits = {4: [SliceHit(4, (5, 5, 20, 20), 0.9)], 5: [SliceHit(5, (30, 30, 45, 45), 0.9)]}
    assert len(link(hits, TrackOptions())) == 2
    assert iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)


def test_an_absent_target_gives_no_object_and_a_not_found_error_with_the_reasons():
    volume = make_volume(((40, 40, 50, 50), (30, 30), 0.9))  # only an isolated speck
    detector = TrackingDetector("test-2d", lambda text: BlobDetector2D(hallucinate=True), stride=4,
                                box_threshold=0.1, min_slices=3)
    found = detector.detect(volume, "tumor")
    assert found and all(d.rejected for d in found)
    proposals: list[dict] = []
    with pytest.raises(PromptError, match=r"not found by detector 'test-2d' \(\d+ proposal\(s\) rejected: .*covers "
                                          r"100% of the slice"):
        resolve_text_prompts(volume, [ObjectPrompt("tumor", 1, text="tumor")], detector, proposals=proposals)
    assert proposals and not any(p["kept"] for p in proposals) and all(p["reason"] for p in proposals)


def test_the_detect_command_says_not_found_with_exit_2(tmp_path, capsys):
    import argparse

    import medsam3d as m3
    from medsam3d.cli._common import _fail
    from medsam3d.cli.detect import add_detect_arguments
    from medsam3d.errors import Medsam3dError

    path = tmp_path / "empty.nii.gz"
    m3.save(make_volume(((40, 40, 50, 50), (30, 30), 0.9)), path)
    register_detector("test-2d", lambda **o: TrackingDetector("test-2d", lambda t: BlobDetector2D(hallucinate=True),
                                                              box_threshold=0.1, **o), description="test")
    try:
        parser = argparse.ArgumentParser(prog="medsam3d")
        add_detect_arguments(parser)
        args = parser.parse_args([str(path), "--text", "tumor", "--detector", "test-2d", "-o",
                                  str(tmp_path / "p.json")])
        try:
            rc = args.func(args)
        except Medsam3dError as exc:
            rc = _fail(str(exc))
    finally:
        DETECTOR_REGISTRY.remove("test-2d")
    captured = capsys.readouterr()
    assert rc == 2 and "not found: 'tumor'" in captured.err and captured.err.count("\n") == 1
    assert "rejected 'tumor'" in captured.out and not (tmp_path / "p.json").exists()


def test_bad_answers_and_options_are_one_line_errors():
    volume = make_volume(((10, 12, 30, 28), (8, 20), 0.9))
    with pytest.raises(DetectorError, match="answer \\(box, score\\[, mask\\]\\) on slice 0"):
        find_tracks(volume, lambda image: [5], "x")
    with pytest.raises(DetectorError, match="min <= max"):
        find_tracks(volume, lambda image: [((5, 5, 1, 1), 0.5)], "x")
    with pytest.raises(DetectorError, match="tracking options among stride"):
        TrackingDetector("t", lambda text: BlobDetector2D(), strides=3)
    for bad, expected in (({"stride": 0}, "stride as an integer >= 1"), ({"stride": 2.5}, "stride as an integer"),
                          ({"min_slices": True}, "min_slices as an integer"), ({"max_tracks": 0}, "max_tracks"),
                          ({"box_threshold": 1.5}, r"box_threshold as a number in \[0, 1\]"),
                          ({"min_score": "0.3"}, "min_score as a number"), ({"key": "size"}, "key 'area'")):
        with pytest.raises(DetectorError, match=expected) as info:
            TrackOptions(**bad)
        assert "\n" not in str(info.value) and "TrackOptions(" not in str(info.value)
    with pytest.raises(DetectorError, match="reason of a rejected"):
        Detection("x", 0.5, 1, (1, 1, 4, 4), rejected="")


def test_the_record_lists_the_proposals_kept_and_rejected(tmp_path):
    """run_case with a 2D detector and a weight-free model: every track is in prompts.detections."""
    import json

    from synthetic import ThresholdModel

    import medsam3d as m3
    from medsam3d.record import validate_report

    volume = make_volume(((10, 12, 30, 28), (8, 20), 0.9), ((40, 40, 50, 50), (32, 32), 0.9))
    detector = TrackingDetector("test-2d", lambda text: BlobDetector2D(hallucinate=True), box_threshold=0.1,
                                min_slices=3)
    record = m3.run_case(volume, {"version": 2, "objects": [{"name": "lesion", "text": "lesion"}]},
                         model=ThresholdModel(), detector=detector, outputs={"report": tmp_path / "r.json"})
    report = json.loads((tmp_path / "r.json").read_text())
    validate_report(report)
    detections = report["prompts"]["detections"]
    assert [(d["kept"], d["name"], d["z_range"]) for d in detections if d["kept"]] == [(True, "lesion", [8, 20])]
    reasons = [d["reason"] for d in detections if not d["kept"]]
    assert any("isolated" in r for r in reasons) and any("covers 100%" in r for r in reasons)
    assert report["timings"]["detect_s"] >= 0 and record.objects[0].voxels > 0


def test_a_batched_detector_gets_batch_size_slices_at_a_time_and_the_same_answer():
    volume = make_volume(((10, 10, 20, 22), (5, 17), 0.9), ((40, 30, 50, 40), (25, 31), 0.8))
    single = BlobDetector2D()

    class Batched:
        batch_size = 3

        def __init__(self):
            self.sizes = []

        def __call__(self, image):
            raise AssertionError("a batched detector is asked through detect_many")

        def detect_many(self, images):
            self.sizes.append(len(images))
            return [single(image) for image in images]

    batched = Batched()
    one = find_tracks(volume, BlobDetector2D(), "lesion")
    many = find_tracks(volume, batched, "lesion")
    assert [(d.slice, d.box, d.z_range, d.rejected) for d in one] == \
           [(d.slice, d.box, d.z_range, d.rejected) for d in many]
    assert max(batched.sizes) == 3 and sum(batched.sizes) == single.calls
