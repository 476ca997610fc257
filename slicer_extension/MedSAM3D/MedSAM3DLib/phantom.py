"""A synthetic phantom for the module's self-test: a bright ellipsoid in noise (numpy only).

The self-test (``MedSAM3DTest._phantom`` in ``MedSAM3D.py``) puts it into a new scalar volume
node with the bridge's ``update_volume_node`` (the array and its ``IJKToRAS``) and places a
markups ROI at the returned centre and size. ``tests/test_slicer_extension.py`` calls the
same :func:`phantom` (its voxel count against the analytic volume, and the in-process and
server backends on it), so the phantom the self-test segments inside Slicer is the one
checked outside it.
"""

from __future__ import annotations

import math

import numpy as np

#: the phantom's grid and ellipsoid (mm): an axial stack, LPS-like voxel axes as a DICOM CT has them
SHAPE_IJK = (96, 96, 40)
SPACING_IJK = (0.8, 0.8, 2.0)
RADII_MM = (18.0, 13.0, 15.0)


def phantom(seed: int = 0, shape_ijk=SHAPE_IJK, spacing_ijk=SPACING_IJK, radii_mm=RADII_MM):
    """Return ``(array_ijk, ijk_to_ras, roi_center_ras, roi_size_mm, analytic_ml)``.

    ``array_ijk`` is float32, indexed ``[i, j, k]`` (medsam3d's order; a Slicer node wants its
    transpose, ``[k, j, i]``); ``ijk_to_ras`` is 4x4 with i towards L and j towards P (the
    direction a DICOM CT's columns and rows run), k towards S. The ellipsoid (value about 400,
    noise SD 15, background about 100) is centred in the volume; the ROI is its bounding box
    enlarged by 2 mm on each side.
    """
    rng = np.random.default_rng(seed)
    si, sj, sk = spacing_ijk
    ijk_to_ras = np.array([[-si, 0, 0, 0], [0, -sj, 0, 0], [0, 0, sk, 0], [0, 0, 0, 1]], float)
    ijk_to_ras[:3, 3] = [si * (shape_ijk[0] - 1) / 2, sj * (shape_ijk[1] - 1) / 2, -sk * (shape_ijk[2] - 1) / 2 + 40.0]
    centre_ijk = (np.asarray(shape_ijk, float) - 1) / 2
    i, j, k = np.meshgrid(*(np.arange(n, dtype=float) for n in shape_ijk), indexing="ij")
    a, b, c = radii_mm
    inside = (((i - centre_ijk[0]) * si / a) ** 2 + ((j - centre_ijk[1]) * sj / b) ** 2
              + ((k - centre_ijk[2]) * sk / c) ** 2) <= 1.0
    array = np.where(inside, 400.0, 100.0) + rng.normal(0.0, 15.0, shape_ijk)
    centre_ras = ijk_to_ras[:3, :3] @ centre_ijk + ijk_to_ras[:3, 3]
    roi_size = np.array([2 * a + 4.0, 2 * b + 4.0, 2 * c + 4.0])
    analytic_ml = 4.0 / 3.0 * math.pi * a * b * c / 1000.0
    return array.astype(np.float32), ijk_to_ras, centre_ras, roi_size, analytic_ml
