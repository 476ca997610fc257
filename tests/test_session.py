"""Session: the model warm and the embeddings cached between prompts; a refine encodes only new pixels."""

from __future__ import annotations

import numpy as np
import pytest

import medsam3d as m3
from medsam3d.session import CachedModel

from conftest import EXAMPLES
from synthetic import ThresholdModel, ellipsoid

CASE = EXAMPLES / "sts041_ct"


def _ball():
    mask = ellipsoid((48, 44, 24), (22, 20, 12), (10, 8, 7))
    volume = m3.Volume(np.where(mask, 200.0, 10.0).astype(np.float32), np.diag([0.8, 0.9, 2.5, 1.0]),
                       {"modality": "MR"})
    return volume, {"version": 1, "objects": [{"name": "ball", "slice": 12, "box": [12, 12, 32, 28]}]}


def test_a_second_run_encodes_nothing_and_gives_the_same_labels():
    volume, prompts = _ball()
    inner = ThresholdModel()
    session = m3.Session(volume, model=inner, window="percentile", zoom=None)
    first = session.segment(prompts)
    encoded = inner.encoded
    assert encoded > 0 and session.model.misses == encoded
    second = session.segment(prompts)
    assert inner.encoded == encoded and session.model.hits >= encoded
    assert np.array_equal(first.labels.array, second.labels.array)
    fresh = m3.segment(volume, prompts, model=ThresholdModel(), window="percentile", zoom=None)
    assert np.array_equal(first.labels.array, fresh.labels.array)


def test_a_refine_is_a_fresh_segmentation_of_the_new_prompts_without_new_encodings():
    volume, prompts = _ball()
    inner = ThresholdModel()
    session = m3.Session(volume, model=inner, window="percentile", zoom=None)
    session.segment(prompts)
    before = inner.encoded
    refined = session.refine("ball", slice=9, box=[15, 15, 29, 25])  # a slice the first run encoded
    assert inner.encoded == before
    assert [b.slice for b in session.objects[0].boxes] == [12, 9]
    fresh = m3.segment(volume, session.objects, model=ThresholdModel(), window="percentile", zoom=None)
    assert np.array_equal(refined.labels.array, fresh.labels.array)
    replaced = session.refine(1, slice=9, box=[14, 14, 30, 26])
    assert [b.box for b in session.objects[0].boxes if b.slice == 9] == [(14, 14, 30, 26)]
    assert replaced.labels.array.any() and inner.encoded == before


def test_refined_prompts_segment_nothing_and_are_what_refine_segments():
    volume, prompts = _ball()
    inner = ThresholdModel()
    session = m3.Session(volume, model=inner, window="percentile", zoom=None)
    session.segment(prompts)
    before, objects = inner.encoded, list(session.objects)
    hits = session.model.hits
    refined = session.refined_prompts("ball", slice=9, box=[15, 15, 29, 25])
    assert inner.encoded == before and session.model.hits == hits  # the engine did not run
    assert session.objects == objects  # the session is unchanged
    assert [b.slice for b in refined[0].boxes] == [12, 9]
    record = session.run(refined)  # one pass: the record of the refined prompts
    assert record.object("ball").voxels == int((session.refine("ball", slice=9, box=[15, 15, 29, 25]).labels.array
                                                == 1).sum())
    assert session.objects == refined
    with pytest.raises(m3.PromptError, match="'ball' \\(label 1\\)"):
        session.refined_prompts("kidney", slice=9, box=[15, 15, 29, 25])


@pytest.mark.parametrize("call, message", [
    (lambda s: s.refine("ball", slice=9, box=[15, 15, 29, 25]), "call segment\\(\\) first"),
    (lambda s: s.run(), "call segment\\(\\) first"),
    (lambda s: s.refined_prompts("ball", slice=9, box=[15, 15, 29, 25]), "call segment\\(\\) first"),
])
def test_a_session_without_prompts_says_what_to_do(call, message):
    volume, _ = _ball()
    with pytest.raises(m3.PromptError, match=message):
        call(m3.Session(volume, model=ThresholdModel()))


def test_refine_names_the_objects_it_knows_and_checks_the_box():
    volume, prompts = _ball()
    session = m3.Session(volume, model=ThresholdModel(), window="percentile", zoom=None)
    session.segment(prompts)
    with pytest.raises(m3.PromptError, match="'ball' \\(label 1\\)"):
        session.refine("kidney", slice=9, box=[15, 15, 29, 25])
    with pytest.raises(m3.PromptError, match="inside the slice"):
        session.refine("ball", slice=9, box=[15, 15, 290, 25])


def test_the_cache_is_bounded_in_bytes_and_drops_the_oldest():
    inner = ThresholdModel()
    cached = CachedModel(inner, max_bytes=3 * 64 * 64 * 4)  # three 64 x 64 float32 'embeddings'
    images = [np.full((64, 64), v, np.float32) for v in range(5)]
    cached.encode(images[:3])
    assert cached.info()["entries"] == 3 and inner.encoded == 3
    cached.encode(images[3:])  # the two oldest go
    assert cached.info()["entries"] == 3 and cached.nbytes <= cached.max_bytes
    cached.encode([images[4], images[2]])  # still there: no encoding
    assert inner.encoded == 5
    cached.encode([images[0], images[0]])  # gone: encoded again, once
    assert inner.encoded == 6 and cached.misses == 6


@pytest.mark.slow
def test_a_refine_with_the_real_model_encodes_nothing_new(litemedsam):
    """LiteMedSAM on the example sarcoma: a box added on a slice the first run encoded is decoded
    against cached embeddings only, and the result is what a fresh segmentation gives."""
    session = m3.Session(CASE / "CT_image.nii.gz", model=litemedsam)
    prompts = {"version": 1, "objects": [{"name": "sarcoma", "slice": 23, "box": [57, 57, 100, 109],
                                          "z_range": [20, 26]}]}
    first = session.segment(prompts).objects[0]
    misses = session.model.misses
    assert misses > 0
    walked = [k for k in range(20, 27) if k != 23 and k not in first["interpolated_slices"]]
    refined = session.refine("sarcoma", slice=walked[0], box=[62, 60, 96, 104])
    assert session.model.misses == misses
    fresh = m3.segment(session.volume, session.objects, model=litemedsam)
    assert np.array_equal(refined.labels.array, fresh.labels.array)
    record = session.run()
    assert record.object("sarcoma").voxels == int((refined.labels.array == 1).sum())
    assert session.model.misses == misses
