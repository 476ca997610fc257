"""SAM 3 (Segment Anything with Concepts, Meta 2025) through ``transformers``: a text in, instance masks out.

Per slice, SAM 3 answers a noun phrase with instance masks, boxes and scores; the score is
the instance's probability times the image-level *presence* score, the model's own guard
against naming something that is not there. A box is kept when its score reaches
``box_threshold`` (default 0.5, above the 0.3 of ``transformers``' post-processing: a false
instance costs a whole 3D object here), a mask pixel when its
probability reaches ``mask_threshold``. The masks of a track, stacked over its slices, are
the detection's ``mask`` (``medsam3d detect --labels`` writes them as the result); its key
box seeds the engine (``segment --text``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .common import LearnedDetector, pixel_box


class Sam3Detector(LearnedDetector):
    """SAM 3 on the slices of a volume; options as :class:`~.common.LearnedDetector`, and ``mask_threshold``."""

    name = "sam3"
    title = "SAM 3"
    model_class = "Sam3Model"
    model_types = ("sam3",)
    known = ("facebook/sam3",)
    default_box_threshold = 0.5

    own_options: ClassVar[dict[str, Any]] = {"mask_threshold": 0.5}

    def _answer(self, images: list[np.ndarray], text: str) -> list[list[tuple]]:
        inputs = self.processor(images=images, text=[text] * len(images), return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        sizes = [img.shape[:2] for img in images]
        results = self.processor.post_process_instance_segmentation(
            outputs, threshold=self.options.box_threshold, mask_threshold=self.mask_threshold, target_sizes=sizes)
        out = []
        for r, (h, w) in zip(results, sizes):
            masks = r["masks"].cpu().numpy().astype(bool)
            out.append([(pixel_box(box.tolist(), w, h), float(score), masks[n].T)
                        for n, (box, score) in enumerate(zip(r["boxes"], r["scores"])) if masks[n].any()])
        return out
