"""Shared fixtures: the real cases in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDSAM3D_SHARED_DATA", REPO.parent / "shared" / "data"))
EXAMPLES = REPO / "examples"


def shared(relative: str) -> Path:
    """Path of a shared case; skips the test with a clear reason when it is absent."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"needs the shared data set ({path} not found; set MEDSAM3D_SHARED_DATA to its folder)")
    return path


def make_volume(shape=(20, 24, 12), spacing=(0.7, 0.9, 2.5), axcodes="RAS", oblique_deg=0.0, dtype=np.int16,
                seed=0):
    """A random volume on a chosen grid: flipped/permuted axes and an optional oblique rotation."""
    from medsam3d import Volume

    rng = np.random.default_rng(seed)
    axes = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    rot = np.zeros((3, 3))
    for col, code in enumerate(axcodes):
        world, sign = axes[code]
        rot[world, col] = sign
    if oblique_deg:
        t = np.radians(oblique_deg)
        rz = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(t / 2), -np.sin(t / 2)], [0, np.sin(t / 2), np.cos(t / 2)]])
        rot = rz @ rx @ rot
    affine = np.eye(4)
    affine[:3, :3] = rot * np.asarray(spacing)
    affine[:3, 3] = rng.uniform(-100, 100, 3)
    array = rng.integers(-1000, 1000, size=shape).astype(dtype)
    return Volume(array, affine, {"modality": "CT"})


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Derived files (the ONNX export of the encoder) go to a temporary cache, not the user's."""
    old = os.environ.get("MEDSAM3D_CACHE")
    os.environ["MEDSAM3D_CACHE"] = str(tmp_path_factory.mktemp("medsam3d-cache"))
    yield
    if old is None:
        os.environ.pop("MEDSAM3D_CACHE", None)
    else:
        os.environ["MEDSAM3D_CACHE"] = old


@pytest.fixture(scope="session")
def litemedsam():
    """The real LiteMedSAM with its bundled weights (loaded once per session)."""
    from medsam3d.models import load_model

    return load_model("litemedsam", device="cpu")


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))
