"""Kosmos-2 (Peng et al. 2023) through ``transformers``: a grounded phrase in, boxes out, per slice.

Kosmos-2 writes a box as two location tokens (the top-left and bottom-right cells of a
32 x 32 grid) after ``<phrase> text</phrase><object>``. Its boxes come without scores, so
the decoding is constrained to that grammar and the scores are read from the model's own
probabilities: given the prompt ``<grounding><phrase> text</phrase>``, the first box's
score is the probability (over the whole vocabulary) that the model opens a box, and each
further box (up to ``max_objects``, joined by ``</delimiter_of_multi_objects/>``) is scored
by that probability times the probabilities of each delimiter before it. Location tokens
are chosen greedily and decoded as ``transformers`` does (cell edges, or cell centres when the corners
differ in both row and column); each slice is padded to a square first, so that the
processor's resize and centre crop see all of it. Boxes under ``box_threshold`` are dropped; the tracking
(:mod:`..tracks`) then rejects boxes seen on isolated slices and boxes covering most of
the slice, as for Grounding DINO.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ...errors import DetectorError
from .common import LearnedDetector, pixel_box

GRID = 32  # location tokens per side: 1024 tokens <patch_index_0000>...<patch_index_1023>


class Kosmos2Detector(LearnedDetector):
    """Kosmos-2 on the slices of a volume; options as :class:`~.common.LearnedDetector`, and ``max_objects``."""

    name = "kosmos-2"
    title = "Kosmos-2"
    model_class = "AutoModelForImageTextToText"
    model_types = ("kosmos-2",)
    known = ("microsoft/kosmos-2-patch14-224",)
    default_box_threshold = 0.3

    own_options: ClassVar[dict[str, Any]] = {"max_objects": 3}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        tok = self.processor.tokenizer
        ids = {t: tok.convert_tokens_to_ids(t) for t in ("<object>", "</object>", "</delimiter_of_multi_objects/>")}
        self._patches = [tok.convert_tokens_to_ids(f"<patch_index_{n:04d}>") for n in range(GRID * GRID)]
        if any(v is None or v == tok.unk_token_id for v in [*ids.values(), *self._patches]):
            raise DetectorError(f"expected Kosmos-2's grounding tokens in the tokenizer of {self.folder}, found them "
                                "missing; download the whole model folder again")
        self._open, self._close, self._delimiter = ids["<object>"], ids["</object>"], ids[
            "</delimiter_of_multi_objects/>"]

    def _own(self, key: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DetectorError(f"expected {key} as a positive integer for detector 'kosmos-2', found {value!r}")
        self.max_objects = value

    def _answer(self, images: list[np.ndarray], text: str) -> list[list[tuple]]:
        import torch

        prompt = f"<grounding><phrase> {text}</phrase>"
        # padded to a square (top left), so that the processor's resize and centre crop keep the whole slice
        squares = [_square(image) for image in images]
        inputs = self.processor(images=squares, text=[prompt] * len(images), return_tensors="pt").to(self.device)
        start = inputs["input_ids"].shape[1]
        grammar = _Grammar(start, self._open, self._close, self._delimiter, self._patches, self.max_objects)
        out = self.model.generate(**inputs, max_new_tokens=3 * self.max_objects + 1, do_sample=False, num_beams=1,
                                  logits_processor=[grammar], eos_token_id=self._close,
                                  pad_token_id=self.processor.tokenizer.pad_token_id,
                                  output_logits=True, return_dict_in_generate=True)
        probs = [torch.softmax(step.float(), dim=-1) for step in out.logits]
        patch_index = {t: n for n, t in enumerate(self._patches)}
        answers = []
        for row, image in enumerate(images):
            h, w = image.shape[:2]
            tokens = out.sequences[row, start:].tolist()
            boxes, score, corners = [], 1.0, []
            for step, token in enumerate(tokens):
                if token in (self._open, self._delimiter):
                    score *= float(probs[step][row, token])
                elif token in patch_index:
                    corners.append(patch_index[token])
                    if len(corners) == 2:
                        box = grid_box(*corners, w, h)
                        if box is not None:
                            boxes.append((box, score))
                        corners = []
                else:
                    break
            answers.append(boxes)
        return answers


def grid_box(top_left: int, bottom_right: int, width: int, height: int) -> tuple[float, ...] | None:
    """Two location tokens' box, decoded as ``transformers`` does, in inclusive pixels of a ``width`` x
    ``height`` slice that was padded to a square at its top left (None: the box lies in the padding)."""
    from transformers.models.kosmos2.processing_kosmos2 import patch_index_to_coordinate

    side = max(width, height)
    x0, y0, x1, y1 = (v * side for v in patch_index_to_coordinate(top_left, bottom_right, GRID))
    x0, x1, y0, y1 = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
    if x0 >= width or y0 >= height:
        return None
    return pixel_box((x0, y0, x1, y1), width, height)


def _square(image: np.ndarray) -> np.ndarray:
    """The image padded with black to a square, anchored at its top left corner."""
    h, w = image.shape[:2]
    side = max(h, w)
    if h == w:
        return image
    out = np.zeros((side, side, *image.shape[2:]), image.dtype)
    out[:h, :w] = image
    return out


class _Grammar:
    """A logits processor that lets the model write boxes only: ``<object>`` (loc loc) (delimiter loc loc)*
    ``</object>``, at most ``max_objects`` boxes."""

    def __init__(self, start: int, open_: int, close: int, delimiter: int, patches: list[int],
                 max_objects: int) -> None:
        self.start, self.open, self.close, self.delimiter = start, open_, close, delimiter
        self.patches, self.max_objects = patches, max_objects

    def __call__(self, input_ids, scores):
        import torch

        allowed = torch.full_like(scores, float("-inf"))
        for row in range(input_ids.shape[0]):
            written = input_ids[row, self.start:].tolist()
            if not written:
                choice = [self.open]
            elif written[-1] in (self.open, self.delimiter) or (len(written) >= 2 and written[-2] in
                                                                 (self.open, self.delimiter)):
                choice = self.patches
            elif sum(t == self.delimiter for t in written) + 1 < self.max_objects:
                choice = [self.close, self.delimiter]
            else:
                choice = [self.close]
            allowed[row, choice] = scores[row, choice]
        return allowed
