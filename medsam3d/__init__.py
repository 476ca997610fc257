"""medsam3d: prompt-driven 3D segmentation of medical volumes for tumour volumetry."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import GeometryError, Medsam3dError, ModelError, PromptError, VolumeIOError  # noqa: E402
from .io import list_dicom_series, load, load_dicom, load_labels, load_rtstruct, save  # noqa: E402
from .volume import Volume, reorient  # noqa: E402

__all__ = [
    "GeometryError", "Medsam3dError", "ModelError", "PromptError", "Volume", "VolumeIOError", "__version__",
    "list_dicom_series", "load", "load_dicom", "load_labels", "load_rtstruct", "reorient", "save",
]
