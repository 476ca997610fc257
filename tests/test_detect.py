"""Text prompts: the Detector protocol, its registry and plugins, and text objects resolved to boxes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medsam3d import PromptError, Volume
from medsam3d.detect import (Detection, Detector, available_detectors, load_detector, register_detector,
                             resolve_text_prompts)
from medsam3d.detect.registry import DETECTOR_REGISTRY
from medsam3d.errors import DetectorError, ModelError
from medsam3d.prompts import BoxPrompt, ObjectPrompt, parse_prompts

from synthetic import install_plugin

SHAPE = (48, 40, 30)
#: (centre (i, j, k) in voxels, radius in mm, intensity); voxels are 1 x 1 x 2 mm
SPHERES = (((14, 12, 10), 7.0, 1.0), ((34, 26, 20), 5.0, 0.8))


def sphere_masks() -> list[np.ndarray]:
    ii, jj, kk = np.indices(SHAPE)
    return [((ii - c[0]) ** 2 + (jj - c[1]) ** 2 + (2 * (kk - c[2])) ** 2) <= r**2 for c, r, _ in SPHERES]


@pytest.fixture(scope="module")
def volume() -> Volume:
    array = np.random.default_rng(0).normal(0.1, 0.03, SHAPE).astype(np.float32)
    for mask, (_, _, value) in zip(sphere_masks(), SPHERES):
        array[mask] = value
    return Volume(array, np.diag([1.0, 1.0, 2.0, 1.0]), {"modality": "MR"})


class BrightBlobDetector:
    """A real (classical) detector: voxels above ``threshold``, one detection per connected blob
    of at least ``min_voxels``: its box on its largest slice, its slice range and mask; the score
    is the blob's mean intensity. It answers the texts of its small vocabulary only."""

    vocabulary = ("lesion", "bright blob")

    def __init__(self, threshold: float = 0.5, min_voxels: int = 20, name: str = "bright-blobs"):
        self.name, self.threshold, self.min_voxels = name, threshold, min_voxels
        self.calls = 0

    def detect(self, volume, text, *, progress=None):
        if text not in self.vocabulary:
            raise PromptError(f"expected a text among {', '.join(self.vocabulary)} for detector '{self.name}', "
                              f"found {text!r}")
        self.calls += 1
        labels, n = ndimage.label(volume.array > self.threshold)
        found = []
        for value in range(1, n + 1):
            mask = labels == value
            if mask.sum() < self.min_voxels:
                continue
            areas = mask.sum(axis=(0, 1))
            k = int(np.argmax(areas))
            ii, jj = np.nonzero(mask[:, :, k])
            ks = np.flatnonzero(areas)
            found.append(Detection(text, float(volume.array[mask].mean()), k,
                                   (int(ii.min()), int(jj.min()), int(ii.max()), int(jj.max())),
                                   (int(ks[0]), int(ks[-1])), mask, self.name))
            if progress is not None:
                progress(value, n, f"blob {value}")
        return found


@pytest.fixture
def registered():
    register_detector("bright-blobs", BrightBlobDetector, description="bright blobs (test)")
    yield
    DETECTOR_REGISTRY.remove("bright-blobs")


def _expected_box(mask):
    areas = mask.sum(axis=(0, 1))
    k = int(np.argmax(areas))
    ii, jj = np.nonzero(mask[:, :, k])
    ks = np.flatnonzero(areas)
    return BoxPrompt(k, (int(ii.min()), int(jj.min()), int(ii.max()), int(jj.max()))), (int(ks[0]), int(ks[-1]))


def test_the_test_detector_follows_the_protocol(volume):
    detector = BrightBlobDetector()
    assert isinstance(detector, Detector)
    seen = []
    found = detector.detect(volume, "lesion", progress=lambda d, t, m: seen.append(m))
    assert len(found) == 2 and len(seen) == 2
    for detection, truth in zip(found, sphere_masks()):
        assert np.array_equal(detection.mask, truth)


def test_text_objects_become_one_object_per_detection(volume):
    doc = {"version": 2, "objects": [{"name": "lesion", "text": "lesion"},
                                     {"name": "node", "slice": 5, "box": [2, 2, 8, 8]}]}
    objects = parse_prompts(doc, volume)
    assert [(o.name, o.label, o.text, o.boxes) for o in objects] == [("lesion", 1, "lesion", []),
                                                                      ("node", 2, None, [BoxPrompt(5, (2, 2, 8, 8))])]
    resolved = resolve_text_prompts(volume, objects, BrightBlobDetector())
    assert [(o.name, o.label) for o in resolved] == [("lesion", 1), ("lesion 2", 3), ("node", 2)]
    assert resolved[2] is objects[1]  # a box object passes through unchanged
    for obj, truth, (_, _, value) in zip(resolved, sphere_masks(), SPHERES):  # best score first: the brighter
        box, z_range = _expected_box(truth)
        assert obj.boxes == [box] and obj.z_range == z_range
        assert obj.text == "lesion" and obj.detector == "bright-blobs" and obj.score == pytest.approx(value)
        assert ObjectPrompt.from_dict(obj.as_dict()) == obj
    assert resolve_text_prompts(volume, resolved, None) == resolved  # nothing left to resolve: no detector needed


def test_names_and_labels_of_extra_detections_avoid_the_others(volume):
    objects = [ObjectPrompt("lesion", 2, text="lesion"), ObjectPrompt("lesion 2", 1, [BoxPrompt(3, (1, 1, 5, 5))]),
               ObjectPrompt("cyst", 3, [BoxPrompt(3, (1, 1, 5, 5))])]
    resolved = resolve_text_prompts(volume, objects, BrightBlobDetector())
    assert [(o.name, o.label) for o in resolved] == [("lesion", 2), ("lesion 3", 4), ("lesion 2", 1), ("cyst", 3)]


def test_detectors_by_name_from_the_registry_and_from_the_prompt_file(volume, registered):
    assert "bright-blobs" in available_detectors()
    detector = load_detector("bright-blobs", threshold=0.9)
    assert isinstance(detector, BrightBlobDetector) and detector.threshold == 0.9
    objects = parse_prompts([{"name": "tumour", "text": "lesion"}], volume)  # a bare list with text: version 2
    resolved = resolve_text_prompts(volume, objects, "bright-blobs")  # two blobs: one object each
    assert [(o.name, o.label, o.detector) for o in resolved] == [("tumour", 1, "bright-blobs"),
                                                                  ("tumour 2", 2, "bright-blobs")]
    named = parse_prompts({"version": 2, "objects": [{"name": "a", "text": "lesion", "detector": "bright-blobs"}]},
                          volume)
    assert named[0].detector == "bright-blobs"
    resolved = resolve_text_prompts(volume, named, None)  # the object names its detector
    assert [o.name for o in resolved] == ["a", "a 2"]
    with pytest.raises(DetectorError, match="expected options among min_voxels, name, threshold for detector "
                                            "'bright-blobs', found colour"):
        load_detector("bright-blobs", colour="red")
    with pytest.raises(DetectorError, match="registered already"):
        register_detector("bright-blobs", BrightBlobDetector, description="again")


def test_a_text_without_a_detector_names_the_registered_ones(volume):
    objects = [ObjectPrompt("liver", 1, text="liver")]
    if not available_detectors():
        with pytest.raises(PromptError, match="^expected a detector for the text 'liver' of object 'liver', found "
                                              "none chosen; none is installed: install a detector plugin"):
            resolve_text_prompts(volume, objects, None)
    register_detector("bright-blobs", BrightBlobDetector, description="bright blobs (test)")
    try:
        with pytest.raises(PromptError, match="choose one of .*bright-blobs.* \\(--detector NAME\\), or draw a box"):
            resolve_text_prompts(volume, objects, None)
    finally:
        DETECTOR_REGISTRY.remove("bright-blobs")


def test_a_target_found_nowhere_is_an_error_not_an_empty_result(volume):
    objects = [ObjectPrompt("lesion", 1, text="lesion")]
    with pytest.raises(PromptError, match="found it nowhere: not found by detector 'bright-blobs'; check the text"):
        resolve_text_prompts(volume, objects, BrightBlobDetector(threshold=2.0))
    with pytest.raises(PromptError, match="expected a text among lesion, bright blob .* found 'liver'"):
        resolve_text_prompts(volume, [ObjectPrompt("liver", 1, text="liver")], BrightBlobDetector())


class OffsetDetector:
    """Returns fixed detections (a detector whose boxes spill over the volume's edge)."""

    name = "offset"

    def __init__(self, detections):
        self.detections = detections

    def detect(self, volume, text, *, progress=None):
        return list(self.detections)


def test_boxes_are_clipped_to_the_volume_and_degenerate_ones_dropped(volume):
    spill = Detection("lesion", 0.7, 4, (-5, 30, 10, 60))  # past j = 39
    outside = Detection("lesion", 0.9, 4, (60, 0, 70, 10))  # beyond i = 47: nothing left
    (obj,) = resolve_text_prompts(volume, [ObjectPrompt("m", 1, text="lesion")], OffsetDetector([spill, outside]))
    assert obj.boxes == [BoxPrompt(4, (0, 30, 10, 39))] and obj.detector == "offset" and obj.score == 0.7
    with pytest.raises(PromptError, match="by detector 'offset' \\(1 outside the volume or under 2 voxels\\)"):
        resolve_text_prompts(volume, [ObjectPrompt("m", 1, text="lesion")], OffsetDetector([outside]))
    wrong_grid = Detection("lesion", 0.5, 4, (1, 1, 5, 5), mask=np.zeros((2, 2, 2), bool))
    with pytest.raises(DetectorError, match="on the volume's grid"):
        resolve_text_prompts(volume, [ObjectPrompt("m", 1, text="lesion")], OffsetDetector([wrong_grid]))


@pytest.mark.parametrize("kwargs, message", [
    ({"box": (5, 1, 2, 3)}, "min <= max"),
    ({"box": (1, 2, 3)}, "min <= max"),
    ({"box": (1, "a", 3, 4)}, "integer voxel indices"),
    ({"score": float("nan")}, "finite score"),
    ({"z_range": (6, 9)}, "around slice 4"),
    ({"mask": np.zeros(SHAPE, np.uint8)}, "3D boolean"),
])
def test_malformed_detections_are_refused(kwargs, message):
    args = {"text": "x", "score": 0.5, "slice": 4, "box": (1, 1, 5, 5), **kwargs}
    with pytest.raises(DetectorError, match=message):
        Detection(**args)
    assert issubclass(DetectorError, ModelError)


def test_unknown_and_broken_detectors(volume):
    unknown = "^expected a detector (among .*|\\(none is installed\\)), found 'nope'; add one with medsam3d.detect"
    with pytest.raises(DetectorError, match=unknown):
        load_detector("nope")
    register_detector("not-a-detector", lambda: object(), description="returns no detector")
    register_detector("misnamed", lambda: BrightBlobDetector(name="other"), description="wrong name")
    try:
        with pytest.raises(DetectorError, match="follow the Detector protocol"):
            load_detector("not-a-detector")
        with pytest.raises(DetectorError, match="named so, found 'other'"):
            load_detector("misnamed")
    finally:
        DETECTOR_REGISTRY.remove("not-a-detector")
        DETECTOR_REGISTRY.remove("misnamed")


PLUGIN = '''
import numpy as np
from medsam3d.detect import Detection


class Brightest:
    """Finds the brightest voxel's neighbourhood (an installed plugin's detector)."""

    name = "brightest"

    def __init__(self, half: int = 3):
        self.half = half

    def detect(self, volume, text, *, progress=None):
        i, j, k = np.unravel_index(int(np.argmax(volume.array)), volume.shape)
        h = self.half
        return [Detection(text, 1.0, int(k), (int(i) - h, int(j) - h, int(i) + h, int(j) + h), source=self.name)]
'''


def test_a_detector_plugin_is_found_by_its_entry_point(volume, tmp_path, monkeypatch):
    """One module and its package's metadata (as pip installs them): medsam3d finds the detector."""
    install_plugin(tmp_path, monkeypatch, "brightest_plugin", PLUGIN, "medsam3d.detectors",
                   "brightest = brightest_plugin:Brightest")
    assert "brightest" in available_detectors()
    (obj,) = resolve_text_prompts(volume, [ObjectPrompt("peak", 1, text="anything")], "brightest")
    assert obj.boxes[0].box[2] - obj.boxes[0].box[0] == 6 and obj.detector == "brightest"
    assert load_detector("brightest", half=1).half == 1
