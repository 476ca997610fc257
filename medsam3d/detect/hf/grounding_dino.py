"""Grounding DINO (Liu et al. 2023) through ``transformers``: a text in, scored boxes out, per slice.

The text is lower-cased and ends with a period, as the model was trained. A box is kept
when its score (its best text token's probability, as ``transformers``' post-processing
computes it) reaches ``box_threshold`` and at least one of its tokens reaches
``text_threshold`` (the words it names; none: the box names nothing of the text and is
dropped); the defaults (0.35, 0.25) are those of the Grounded-SAM demo. Boxes covering most of the slice (the model's answer when the target is
absent) and detections on isolated slices are rejected by the tracking (:mod:`..tracks`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .common import LearnedDetector, pixel_box


class GroundingDinoDetector(LearnedDetector):
    """Grounding DINO on the slices of a volume; options as :class:`~.common.LearnedDetector`, and
    ``text_threshold``."""

    name = "grounding-dino"
    title = "Grounding DINO"
    model_class = "AutoModelForZeroShotObjectDetection"
    model_types = ("grounding-dino",)
    known = ("IDEA-Research/grounding-dino-tiny", "IDEA-Research/grounding-dino-base")
    default_box_threshold = 0.35

    own_options: ClassVar[dict[str, Any]] = {"text_threshold": 0.25}

    def _answer(self, images: list[np.ndarray], text: str) -> list[list[tuple]]:
        query = text.lower().rstrip(".") + "."
        inputs = self.processor(images=images, text=[query] * len(images), return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        sizes = [img.shape[:2] for img in images]
        results = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.options.box_threshold, text_threshold=self.text_threshold,
            target_sizes=sizes)
        # a box none of whose words reaches text_threshold names nothing of the text: dropped
        return [[(pixel_box(box.tolist(), w, h), float(score))
                 for box, score, words in zip(r["boxes"], r["scores"], r["text_labels"]) if words.strip()]
                for r, (h, w) in zip(results, sizes)]
