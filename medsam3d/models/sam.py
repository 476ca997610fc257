"""SAM (ViT-B/L/H) and MedSAM (ViT-B) from a local checkpoint, each with its own preprocessing.

* **SAM** (``segment_anything.SamPredictor`` contract): uint8 RGB, longest side resized to
  1024 (aspect kept), ImageNet pixel mean/std normalisation, padded to 1024x1024; boxes
  scaled by the same factor.
* **MedSAM** (bowang-lab/MedSAM inference): the slice is resized to 1024x1024 *without*
  keeping the aspect ratio, min-max normalised to [0, 1], fed to the image encoder
  directly (no SAM pixel mean/std); boxes are scaled by 1024/[W, H, W, H]; the 256x256
  logits are upsampled to the slice size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ModelError, require
from .base import (blend_features, file_sha256, load_into, load_state_dict, region_embedding, require_checkpoint,
                   resolve_device)

log = logging.getLogger(__name__)

ARCHITECTURES = {"sam-vit-b": "vit_b", "sam-vit-l": "vit_l", "sam-vit-h": "vit_h", "medsam": "vit_b"}


class _SamFamily:
    """A SAM-architecture model (``name`` among :data:`ARCHITECTURES`) from a local checkpoint;
    ``trust_checkpoint`` allows unpickling one that is not weights-only (see
    :func:`~medsam3d.models.base.load_state_dict`)."""

    size = 1024
    blend = staticmethod(blend_features)

    def __init__(self, name: str, checkpoint: str | Path | None, device: str | None = "auto", *,
                 trust_checkpoint: bool = False):
        require_checkpoint(name, checkpoint)
        if name not in ARCHITECTURES:
            raise ModelError(f"expected a SAM-family model among {', '.join(ARCHITECTURES)}, found {name!r}")
        require("segment_anything", f"model '{name}'", extra="sam")
        from segment_anything import sam_model_registry

        self.name = name
        self.runtime = "torch"
        self.can_blend = True
        self.device = resolve_device(device)
        state, self.trust_checkpoint = load_state_dict(checkpoint, name, trust_checkpoint=trust_checkpoint)
        net = sam_model_registry[ARCHITECTURES[name]](checkpoint=None)
        load_into(net, state, checkpoint, name)
        self.net = net.eval().to(self.device)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.checkpoint = str(checkpoint)
        self.weights_sha256 = file_sha256(checkpoint)
        import torch

        from .decoder import BoxDecoder

        self._torch = torch
        self._decoder = BoxDecoder(self.net.prompt_encoder, self.net.mask_decoder).eval().to(self.device)

    def _decode(self, embedding, boxes_model: np.ndarray, crop_hw, out_hw):
        torch = self._torch
        if not len(boxes_model):  # the decoder does not take an empty batch
            return np.zeros((0, *out_hw), bool), np.zeros(0, np.float32)
        box_t = torch.as_tensor(boxes_model, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            logits, iou = self._decoder(embedding, box_t)
            logits = torch.nn.functional.interpolate(logits, size=(self.size, self.size), mode="bilinear",
                                                     align_corners=False)
            logits = logits[:, :, : crop_hw[0], : crop_hw[1]]
            logits = torch.nn.functional.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)
        return (logits[:, 0] > 0).cpu().numpy(), iou[:, 0].float().cpu().numpy()


class SAM(_SamFamily):
    """Original Segment Anything: the ``SamPredictor`` preprocessing."""

    def encode(self, images: Sequence[np.ndarray]) -> list[Any]:
        from segment_anything.utils.transforms import ResizeLongestSide

        torch = self._torch
        transform = ResizeLongestSide(self.size)
        out = []
        for image in images:
            rgb = np.repeat((np.clip(image, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
            resized = transform.apply_image(rgb)
            x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1)[None].float()
            with torch.inference_mode():
                emb = self.net.image_encoder(self.net.preprocess(x))
            out.append((emb, resized.shape[:2], image.shape))
        return out

    def decode(self, features, boxes):
        from segment_anything.utils.transforms import ResizeLongestSide

        emb, resized_hw, hw = features
        boxes = ResizeLongestSide(self.size).apply_boxes(np.asarray(boxes, np.float32).reshape(-1, 4), hw)
        return self._decode(emb, boxes, resized_hw, hw)

    def region_embedding(self, features, mask):
        """Mean embedding inside ``mask`` and around it (:func:`~medsam3d.models.base.region_embedding`)."""
        return region_embedding(features[0], mask, features[1], input_size=self.size)


class MedSAM(_SamFamily):
    """MedSAM: 1024x1024 stretch, [0, 1] min-max, encoder called directly."""

    @staticmethod
    def prepare(image: np.ndarray) -> np.ndarray:
        from skimage.transform import resize

        x = resize(np.asarray(image, np.float32), (1024, 1024), order=3, preserve_range=True, anti_aliasing=True)
        lo, hi = float(x.min()), float(x.max())
        return ((x - lo) / max(hi - lo, 1e-8)).astype(np.float32)

    def encode(self, images: Sequence[np.ndarray]) -> list[Any]:
        torch = self._torch
        out = []
        for image in images:
            x = torch.from_numpy(self.prepare(image))[None, None].expand(1, 3, -1, -1).to(self.device)
            with torch.inference_mode():
                out.append((self.net.image_encoder(x), image.shape))
        return out

    def decode(self, features, boxes):
        emb, (h, w) = features
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4) / np.array([w, h, w, h], np.float32) * 1024
        return self._decode(emb, boxes, (self.size, self.size), (h, w))

    def region_embedding(self, features, mask):
        """Mean embedding inside ``mask`` and around it (the image is stretched over the whole input)."""
        return region_embedding(features[0], mask, (self.size, self.size), input_size=self.size)
