"""Detectors by name: registered at run time or by an installed package's entry points.

The entry point group is ``medsam3d.detectors``; an entry point names a detector and points
to its factory (or to a :class:`~medsam3d.models.registry.PluginSpec`). A factory is called
as ``factory(**options)`` and returns a :class:`~medsam3d.detect.base.Detector` whose
``name`` is its registry name. Nothing is imported until a detector is loaded.
"""

from __future__ import annotations

from typing import Any

from ..errors import DetectorError
from ..models.registry import Factory, PluginSpec, Registry
from .base import Detector

DETECTOR_REGISTRY = Registry("detector", "medsam3d.detectors", PluginSpec, DetectorError,
                             "add one with medsam3d.detect.register_detector or the 'medsam3d.detectors' "
                             "entry point group", "Detector", ("name", "detect"))


def register_detector(name: str, factory: Factory | str, *, description: str, replace: bool = False) -> None:
    """Make ``name`` loadable by :func:`load_detector`; ``factory`` is a callable or
    ``"package.module:attribute"`` (imported on first load), called as ``factory(**options)``."""
    DETECTOR_REGISTRY.add(PluginSpec(name, factory, description=description), replace=replace)


def available_detectors() -> tuple[str, ...]:
    """The names :func:`load_detector` accepts (registered, then installed plugins)."""
    return DETECTOR_REGISTRY.names()


def load_detector(name: str, **options: Any) -> Detector:
    """Build the detector ``name`` with its ``options`` (thresholds, weights folder...)."""
    if not isinstance(name, str) or not name.strip():
        installed = ", ".join(available_detectors()) or "none installed"
        raise DetectorError(f"expected a detector name ({installed}), found {name!r}")
    name = name.strip().lower()
    return DETECTOR_REGISTRY.build(name, (), {}, options)


DETECTOR_REGISTRY.add(PluginSpec("ct-anatomy", "medsam3d.detect.anatomy:AnatomyDetector",
                                 description="weight-free CT anatomy by Hounsfield units: body, lungs (left/right), "
                                             "airways, bones, fat"), builtin=True)
for _name, _factory, _description in (
        ("grounding-dino", "medsam3d.detect.hf.grounding_dino:GroundingDinoDetector",
         "Grounding DINO (transformers; weights from a local folder or the Hugging Face cache): boxes for any text"),
        ("kosmos-2", "medsam3d.detect.hf.kosmos2:Kosmos2Detector",
         "Kosmos-2 (transformers; local weights): grounded phrases as boxes, scored by the model's probabilities"),
        ("sam3", "medsam3d.detect.hf.sam3:Sam3Detector",
         "SAM 3 (transformers; local weights): instance masks and boxes for a noun phrase, with a presence score")):
    DETECTOR_REGISTRY.add(PluginSpec(_name, _factory, description=_description), builtin=True)
