"""medsam3d: prompt-driven 3D segmentation of medical volumes for tumour volumetry.

The public API: :func:`load` and :func:`save` (volumes and label maps on their exact grid),
:func:`segment` (the engine), :func:`run_case` (one case end to end, returning a
:class:`CaseRecord`), :class:`Session` (a volume and a warm model kept open between
prompts), :func:`measure`, and :func:`load_model` / :func:`set_threads` for the models.
Heavy libraries (torch, ONNX Runtime, VTK) are imported when first needed.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import GeometryError, Medsam3dError, ModelError, PromptError, VolumeIOError  # noqa: E402
from .io import list_dicom_series, load, load_dicom, load_labels, load_rtstruct, save  # noqa: E402
from .volume import Volume, reorient  # noqa: E402

# imported, not wrapped: a wrapper named like its module is replaced by the module itself as soon as
# anything imports medsam3d.measure (then m3.measure(...) raised "'module' object is not callable")
from .measure import measure  # noqa: E402
from .models import load_model, set_threads  # noqa: E402
from .pipeline import SegmentationResult, segment  # noqa: E402
from .record import SCHEMA_VERSION, CaseRecord, ObjectRecord, validate_report  # noqa: E402
from .run import CaseOutputs, run_case  # noqa: E402
from .session import Session  # noqa: E402

__all__ = [
    "SCHEMA_VERSION", "CaseOutputs", "CaseRecord", "GeometryError", "Medsam3dError", "ModelError", "ObjectRecord",
    "PromptError", "SegmentationResult", "Session", "Volume", "VolumeIOError", "__version__", "list_dicom_series",
    "load", "load_dicom", "load_labels", "load_model", "load_rtstruct", "measure", "reorient", "run_case", "save",
    "segment", "set_threads", "validate_report",
]
