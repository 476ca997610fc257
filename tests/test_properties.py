"""Property-based tests (Hypothesis): the prompt parser and the geometry.

* The prompt parser, given any JSON document (or any bytes as a file, or any text as a ``--box``),
  returns objects or raises :class:`~medsam3d.PromptError`; never anything else. Valid boxes
  come back as they were given, by index and by their RAS corners.
* Index <-> RAS maps invert each other on any grid (flipped, permuted, oblique, anisotropic);
  reorienting moves no voxel in space and inverts exactly; a volume saved and loaded again has
  the same voxels, exactly, and the same affine: NIfTI stores it in float32 (``srow``), so it
  comes back as ``affine.astype(float32)`` exactly; NRRD/MHA store decimal text, to 1e-9 mm.
* A label map is accepted or refused by its values, whatever their dtype.

Each test's examples are bounded (``max_examples``, no deadline): the suite stays a few seconds.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import medsam3d as m3
from medsam3d import Medsam3dError, PromptError, Volume, reorient
from medsam3d.io import check_label_values
from medsam3d.prompts import BoxPrompt, ObjectPrompt, load_prompts, parse_box_option, parse_prompts

pytestmark = pytest.mark.filterwarnings("ignore")

BOUNDED = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

AXES = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
AXCODES = ["".join(c) for c in [("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S"), ("P", "I", "R"),
                                ("S", "L", "A"), ("I", "R", "P"), ("A", "S", "L"), ("R", "P", "I")]]


# ---------------------------------------------------------------------- grids
def _rotation(q) -> np.ndarray:
    w, x, y, z = np.asarray(q, float) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


@st.composite
def affines(draw, oblique: bool = True) -> np.ndarray:
    """Index-to-RAS affines: a permutation with flips (any axis codes), optionally rotated
    (oblique), anisotropic spacing, any origin."""
    codes = draw(st.sampled_from(AXCODES))
    base = np.zeros((3, 3))
    for col, code in enumerate(codes):
        world, sign = AXES[code]
        base[world, col] = sign
    if oblique and draw(st.booleans()):
        q = draw(st.tuples(*[st.floats(-1, 1, allow_nan=False)] * 4).filter(lambda v: np.linalg.norm(v) > 0.1))
        base = _rotation(q) @ base
    spacing = draw(st.tuples(*[st.floats(0.2, 5.0, allow_nan=False)] * 3))
    affine = np.eye(4)
    affine[:3, :3] = base * np.asarray(spacing)
    affine[:3, 3] = draw(st.tuples(*[st.floats(-500, 500, allow_nan=False)] * 3))
    return affine


shapes = st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 5))


@BOUNDED
@given(affines(), st.lists(st.tuples(*[st.floats(-50, 600, allow_nan=False)] * 3), min_size=1, max_size=8))
def test_index_and_ras_invert_each_other(affine, points):
    vol = Volume(np.zeros((2, 2, 2), np.uint8), affine)
    ijk = np.asarray(points)
    ras = vol.index_to_ras(ijk)
    np.testing.assert_allclose(vol.ras_to_index(ras), ijk, atol=1e-7)
    np.testing.assert_allclose(vol.index_to_ras(vol.ras_to_index(ras)), ras, atol=1e-7)
    # the affine's columns are the voxel steps: spacing, direction and volume follow from it
    np.testing.assert_allclose(vol.index_to_ras(ijk + [1, 0, 0]) - ras, np.broadcast_to(affine[:3, 0], ras.shape),
                               atol=1e-7)
    assert vol.voxel_volume_mm3 == pytest.approx(float(np.prod(vol.spacing)), rel=1e-9)


@BOUNDED
@given(affines(), shapes, st.sampled_from(AXCODES), st.integers(0, 2**31))
def test_reorient_moves_no_voxel_and_inverts_exactly(affine, shape, target, seed):
    array = np.random.default_rng(seed).integers(-1000, 1000, size=shape).astype(np.int16)
    vol = Volume(array, affine)
    out, reo = reorient(vol, tuple(target))
    assert np.array_equal(reo.invert(out.array), vol.array)
    assert sorted(out.shape) == sorted(vol.shape) and out.voxel_volume_mm3 == pytest.approx(vol.voxel_volume_mm3)
    ijk = np.indices(shape).reshape(3, -1).T
    new = np.rint(reo.source_to_target_index(ijk)).astype(int)
    assert np.array_equal(out.array[tuple(new.T)], array[tuple(ijk.T)])
    np.testing.assert_allclose(out.index_to_ras(new), vol.index_to_ras(ijk), atol=1e-6)
    back, _ = reorient(out, vol.axcodes)
    if not vol.is_oblique:  # an oblique grid's nearest axis codes need not name its own layout
        assert back.same_grid(vol) and np.array_equal(back.array, vol.array)


@st.composite
def volumes_to_save(draw):
    affine = draw(affines())
    shape = draw(shapes)
    dtype = draw(st.sampled_from([np.uint8, np.int16, np.uint16, np.int32, np.float32]))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        array = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 6)).astype(dtype)
    return Volume(array, affine)


@BOUNDED
@given(volumes_to_save(), st.sampled_from([".nii.gz", ".nii", ".nrrd", ".mha"]))
def test_save_and_load_keep_voxels_and_affine(vol, suffix):
    with tempfile.TemporaryDirectory() as folder:
        back = m3.load(m3.save(vol, Path(folder) / f"x{suffix}"))
    assert back.array.dtype == vol.array.dtype and np.array_equal(back.array, vol.array)
    if suffix.startswith(".nii"):  # NIfTI's sform is float32: the affine comes back as float32 exactly
        assert np.array_equal(back.affine, vol.affine.astype(np.float32).astype(np.float64))
    else:
        np.testing.assert_allclose(back.affine, vol.affine, rtol=1e-12, atol=1e-9)


@BOUNDED
@given(affines(), shapes, st.integers(0, 2**31), st.integers(1, 40))
def test_label_maps_round_trip_in_every_label_format(affine, shape, seed, n_labels):
    labels = np.random.default_rng(seed).integers(0, n_labels + 1, size=shape).astype(np.uint8)
    vol = Volume(labels, affine)
    with tempfile.TemporaryDirectory() as folder:
        for suffix in (".nii.gz", ".nrrd", ".seg.nrrd"):
            back = m3.load_labels(m3.save(vol, Path(folder) / f"x{suffix}"))
            assert np.array_equal(back.array, labels), suffix
            np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)


# ---------------------------------------------------------------------- label values
@BOUNDED
@given(st.sampled_from([np.uint8, np.int16, np.uint16, np.int32, np.int64, np.float32, np.float64]),
       st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=40))
def test_label_values_are_accepted_or_refused_by_what_they_are(dtype, values):
    with np.errstate(invalid="ignore", over="ignore"):
        array = np.asarray(values, np.float64)
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            array = np.nan_to_num(np.trunc(array), nan=0, posinf=info.max, neginf=info.min)
            array = np.clip(array, info.min, info.max)
        array = array.astype(dtype)
    vol = Volume(array.reshape(-1, 1, 1), np.eye(4))
    finite = np.isfinite(array.astype(np.float64))
    is_label_map = bool(finite.all() and np.all(array >= 0) and np.all(array == np.round(array))
                        and np.all(array <= 2**32 - 1) and len(np.unique(array[array != 0])) <= 255)
    try:
        out = check_label_values(vol, "x.nii.gz")
    except m3.VolumeIOError as exc:
        assert not is_label_map and "label" in str(exc) and "\n" not in str(exc)
    else:
        assert is_label_map and np.issubdtype(out.array.dtype, np.integer)
        assert np.array_equal(out.array.ravel(), array)


# ---------------------------------------------------------------------- the prompt parser
json_leaves = (st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats(allow_nan=True)
               | st.text(max_size=12))
json_values = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=20)
PROMPT_KEYS = ["name", "slice", "box", "z_range", "box_ras", "label", "text", "detector", "box_corners_ras"]
MARKUP_KEYS = ["type", "name", "center", "size", "orientation", "coordinateUnits", "coordinateSystem"]


def _near_valid(keys, special):
    """Dicts whose keys are mostly the real ones, with values of the right shape or anything."""
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), special | json_values, max_size=7)


numbers = st.integers(-5, 70) | st.floats(-1e3, 1e3) | st.sampled_from([float("nan"), float("inf"), True, 1e308])
prompt_entries = _near_valid(PROMPT_KEYS, st.lists(numbers, min_size=1, max_size=4)
                             | st.lists(st.lists(numbers, min_size=3, max_size=3), min_size=2, max_size=2)
                             | st.text(max_size=6))
markups = _near_valid(MARKUP_KEYS, st.sampled_from(["ROI", "Fiducial", "LPS", "RAS", "mm", "um"])
                      | st.lists(numbers, min_size=3, max_size=9))
documents = (json_values
             | st.fixed_dictionaries({"version": st.sampled_from([1, 2, 3, "1", None, 1.0]) | json_values,
                                      "objects": st.lists(prompt_entries, max_size=4) | json_values})
             | st.lists(prompt_entries, max_size=4)
             | st.fixed_dictionaries({"markups": st.lists(markups, max_size=3) | json_values}))


@pytest.fixture(scope="module")
def grid():
    rng = np.random.default_rng(1)
    affine = np.array([[-0.8, 0, 0, 100], [0, -0.8, 0, 80], [0, 0, 2.5, -60], [0, 0, 0, 1.0]])
    return Volume(rng.integers(-100, 100, size=(64, 48, 20)).astype(np.int16), affine)


@BOUNDED
@given(documents)
def test_any_document_parses_or_is_a_prompt_error(grid, doc):
    try:
        objects = parse_prompts(doc, grid)
    except PromptError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 2000
    else:
        assert objects and all(isinstance(o, ObjectPrompt) for o in objects)
        assert len({o.label for o in objects}) == len(objects)
        for obj in objects:
            for box in obj.boxes:
                assert 0 <= box.slice < 20 and 0 <= box.box[0] < box.box[2] < 64 and 0 <= box.box[1] < box.box[3] < 48


@BOUNDED
@given(st.binary(max_size=300) | documents.map(lambda d: json.dumps(d).encode()))
def test_any_file_loads_or_is_a_prompt_error(grid, content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prompts.json"
        path.write_bytes(content)
        try:
            load_prompts(path, grid)
        except Medsam3dError as exc:
            assert isinstance(exc, PromptError) and "\n" not in str(exc)


@BOUNDED
@given(st.text(max_size=40) | st.from_regex(r"-?\d{1,6},-?\d{1,6},-?\d{1,6},-?\d{1,6}@-?\d{1,5}(:-?\d+\.\.-?\d+)?",
                                             fullmatch=True))
def test_any_box_option_parses_or_is_a_prompt_error(grid, spec):
    try:
        entry = parse_box_option(spec)
    except PromptError:
        return
    try:
        parse_prompts([entry], grid)
    except PromptError:
        pass


@st.composite
def valid_boxes(draw, shape=(64, 48, 20)):
    i0 = draw(st.integers(0, shape[0] - 2))
    i1 = draw(st.integers(i0 + 1, shape[0] - 1))
    j0 = draw(st.integers(0, shape[1] - 2))
    j1 = draw(st.integers(j0 + 1, shape[1] - 1))
    k = draw(st.integers(0, shape[2] - 1))
    return k, (i0, j0, i1, j1)


@BOUNDED
@given(st.lists(valid_boxes(), min_size=1, max_size=4), st.booleans())
def test_valid_boxes_round_trip(grid, boxes, as_option):
    if as_option:
        entries = [parse_box_option(f"{b[0]},{b[1]},{b[2]},{b[3]}@{k}") for k, b in boxes]
        for n, entry in enumerate(entries):
            entry["name"] = f"object {n}"
    else:
        entries = [{"name": f"object {n}", "slice": k, "box": list(b)} for n, (k, b) in enumerate(boxes)]
    objects = parse_prompts({"version": 1, "objects": entries}, grid)
    assert [o.boxes for o in objects] == [[BoxPrompt(k, b)] for k, b in boxes]
    assert [o.label for o in objects] == list(range(1, len(boxes) + 1))
    again = [ObjectPrompt.from_dict(json.loads(json.dumps(o.as_dict()))) for o in objects]
    assert again == objects


@BOUNDED
@given(affines(oblique=False), valid_boxes(shape=(12, 10, 8)), st.integers(0, 7))
def test_a_box_given_by_its_ras_corners_comes_back(affine, box, k1):
    """The RAS corners of voxel centres (i0, j0, k0) and (i1, j1, k1), on any flipped or permuted
    grid, give back the box on the middle slice and the z range k0..k1."""
    vol = Volume(np.zeros((12, 10, 8), np.int16), affine)
    k0, (i0, j0, i1, j1) = box
    k0, k1 = min(k0, k1), max(k0, k1)
    a, b = vol.index_to_ras([i0, j0, k0]), vol.index_to_ras([i1, j1, k1])
    (obj,) = parse_prompts({"version": 1, "objects": [{"name": "m", "box_ras": [a.tolist(), b.tolist()]}]}, vol)
    assert obj.z_range == (k0, k1)
    assert obj.boxes == [BoxPrompt((k0 + k1) // 2, (i0, j0, i1, j1))]
