"""Text prompts: detectors find what a text names, as boxes (and optionally masks) that seed the engine.

A detector follows :class:`Detector` (``name``; ``detect(volume, text, *, progress=None)``
returns :class:`Detection` objects in the volume's voxel indices). Detectors are plugins
(:func:`register_detector`, or the ``medsam3d.detectors`` entry point group) loaded by name
with :func:`load_detector`; ``ct-anatomy`` (:mod:`medsam3d.detect.anatomy`, weight-free CT
anatomy) is built in. :func:`resolve_text_prompts` turns the
``text`` objects of a version-2 prompt file into box objects, one per detection.
:mod:`medsam3d.detect.tracks` links a 2D detector's boxes across slices into 3D tracks
(:class:`TrackingDetector`), rejecting what is no object, with the reason.
"""

from __future__ import annotations

from .base import Detection, Detector
from .registry import available_detectors, load_detector, register_detector
from .resolve import resolve_text_prompts
from .tracks import TrackingDetector, TrackOptions, find_tracks

__all__ = ["Detection", "Detector", "TrackOptions", "TrackingDetector", "available_detectors", "find_tracks",
           "load_detector", "register_detector", "resolve_text_prompts"]
