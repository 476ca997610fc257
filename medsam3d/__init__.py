"""medsam3d: prompt-driven 3D segmentation of medical volumes for tumour volumetry."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import GeometryError, Medsam3dError, ModelError, PromptError, VolumeIOError  # noqa: E402
from .io import list_dicom_series, load, load_dicom, load_labels, load_rtstruct, save  # noqa: E402
from .volume import Volume, reorient  # noqa: E402

# imported, not wrapped: a wrapper named like its module is replaced by the module itself as soon as
# anything imports medsam3d.measure (then m3.measure(...) raised "'module' object is not callable")
from .measure import measure  # noqa: E402


def segment(volume, prompts, **kwargs):
    """Segment prompted objects in 3D (see :func:`medsam3d.pipeline.segment`)."""
    from .pipeline import segment as _segment

    return _segment(volume, prompts, **kwargs)


def load_model(name="litemedsam", checkpoint=None, device="auto", **kwargs):
    """Load a model adapter (see :func:`medsam3d.models.load_model`)."""
    from .models import load_model as _load_model

    return _load_model(name, checkpoint=checkpoint, device=device, **kwargs)

__all__ = [
    "GeometryError", "Medsam3dError", "ModelError", "PromptError", "Volume", "VolumeIOError", "__version__",
    "list_dicom_series", "load", "load_dicom", "load_labels", "load_model", "load_rtstruct", "measure", "reorient",
    "save", "segment",
]
