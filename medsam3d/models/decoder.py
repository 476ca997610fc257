"""The SAM box decoder (prompt encoder + two-way transformer + mask head), reordered for speed.

Every Segment-Anything-family model here (SAM, MedSAM, LiteMedSAM) decodes a box with the
same mask decoder: 7 tokens (IoU, 4 mask tokens, 2 box corners) and the 64x64x256 image
embedding attend to each other in a two-way transformer. Written as in segment-anything,
each box projects all 4096 image tokens through the attention's 256->128 linear maps, ten
times per box (1.3 of its 1.7 GMAC). The projections are linear, so the products can be
taken in the other order: the 7 tokens times 8 heads (56 rows) meet the 256 image channels
directly, which halves those products. Mathematically the result is the reference's
(the key bias only shifts each softmax row by a constant, and value bias passes through
rows that sum to one); in float32 the logits differ by less than 5e-5. Only the single-mask
output (``multimask_output=False``) is computed, as the engine uses.

Measured on a 2-core CPU, one real CT slice's embedding, ms per decode of 1 / 5 / 8 boxes:
ONNX Runtime 38 / 198 / 330 (segment-anything's order) -> 26 / 130 / 201 (this one);
PyTorch 60 / - / 831 -> 44 / - / 467. :class:`ReferenceBoxDecoder` keeps the original order.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _heads(attn) -> tuple[int, int]:
    return attn.num_heads, attn.internal_dim // attn.num_heads


def token_to_image(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``attn(q, k, v)`` for few queries (N, T, C) over many keys (B, M, C), B = 1 or N,
    without projecting the M keys and values: (q Wq)(k Wk)^T = ((q Wq) Wk) k^T, A (v Wv) = (A v) Wv."""
    h, d = _heads(attn)
    n, t, c = q.shape
    qh = attn.q_proj(q).reshape(n, t, h, d).transpose(1, 2)  # N, H, T, d
    qk = qh @ attn.k_proj.weight.reshape(h, d, c)  # N, H, T, C  (the key bias adds a constant per row)
    logits = qk.reshape(n, h * t, c) @ k.transpose(1, 2)  # N, H*T, M
    weights = torch.softmax(logits / math.sqrt(d), dim=-1)
    mixed = (weights @ v).reshape(n, h, t, c)  # N, H, T, C
    out = mixed @ attn.v_proj.weight.reshape(h, d, c).transpose(1, 2)  # N, H, T, d
    out = out + attn.v_proj.bias.reshape(h, 1, d)  # rows of the weights sum to one
    return attn.out_proj(out.transpose(1, 2).reshape(n, t, h * d))


def image_to_token(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``attn(q, k, v)`` for many queries (B, M, C), B = 1 or N, over few keys (N, T, C), without
    projecting the M queries or their outputs: (q Wq + bq) kh^T = q (Wq^T kh^T) + bq kh^T and
    out_proj(A vh) = A (vh Wo) + bo."""
    h, d = _heads(attn)
    n, t, c = k.shape
    m = q.shape[1]
    kh = attn.k_proj(k).reshape(n, t, h, d).transpose(1, 2)  # N, H, T, d
    wq = attn.q_proj.weight.reshape(h, d, c)
    qk = (wq.transpose(1, 2) @ kh.transpose(2, 3))  # N, H, C, T
    qk = qk.permute(0, 2, 1, 3).reshape(n, c, h * t)
    bias = (kh @ attn.q_proj.bias.reshape(h, d, 1)).reshape(n, 1, h * t)
    logits = (q @ qk + bias).reshape(n, m, h, t)
    weights = torch.softmax(logits / math.sqrt(d), dim=-1).reshape(n, m, h * t)
    vh = attn.v_proj(v).reshape(n, t, h, d).transpose(1, 2)  # N, H, T, d
    wo = attn.out_proj.weight.reshape(c, h, d).permute(1, 2, 0)  # H, d, C
    vo = (vh @ wo).reshape(n, h * t, c)
    return weights @ vo + attn.out_proj.bias


class _Decoder(nn.Module):
    """(1, 256, 64, 64) image embedding and (N, 4) boxes in model pixels -> (N, 1, 256, 256)
    mask logits and (N, 1) predicted IoU, from a segment-anything ``PromptEncoder`` and
    ``MaskDecoder`` (their weights are shared, not copied). One module, so it exports to ONNX."""

    def __init__(self, prompt_encoder, mask_decoder):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("dense_pe", prompt_encoder.get_dense_pe().detach().clone())


class BoxDecoder(_Decoder):
    """The decoder with its attention products reordered (see the module's docstring)."""

    def forward(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pe, md = self.prompt_encoder, self.mask_decoder
        tr = md.transformer
        corners = pe._embed_boxes(boxes)  # N, 2, C
        n = corners.shape[0]
        out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(n, -1, -1), corners], dim=1)  # N, T, C
        _, c, hh, ww = embedding.shape
        src = embedding + pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        keys = src.flatten(2).transpose(1, 2)  # 1, M, C (shared until the first image update)
        key_pe = self.dense_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in tr.layers:
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + tokens
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            queries = layer.norm2(queries + token_to_image(layer.cross_attn_token_to_image, queries + tokens,
                                                           keys + key_pe, keys))
            queries = layer.norm3(queries + layer.mlp(queries))
            keys = layer.norm4(keys + image_to_token(layer.cross_attn_image_to_token, keys + key_pe,
                                                     queries + tokens, queries))
        queries = tr.norm_final_attn(queries + token_to_image(tr.final_attn_token_to_image, queries + tokens,
                                                              keys + key_pe, keys))
        keys = keys.expand(n, -1, -1)
        upscaled = md.output_upscaling(keys.transpose(1, 2).reshape(n, c, hh, ww))  # N, C/8, 4H, 4W
        hyper = md.output_hypernetworks_mlps[0](queries[:, 1])  # N, C/8: the first mask token only
        logits = (hyper.unsqueeze(1) @ upscaled.flatten(2)).reshape(n, 1, *upscaled.shape[2:])
        iou = md.iou_prediction_head(queries[:, 0])[:, :1]
        return logits, iou


class ReferenceBoxDecoder(_Decoder):
    """The same inputs and outputs as :class:`BoxDecoder`, through segment-anything's own code
    (``PromptEncoder`` then ``MaskDecoder(multimask_output=False)``): the reference LiteMedSAM
    algorithm, as the benchmark's naive loop runs it, and what the tests compare with."""

    def forward(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes[:, None, :], masks=None)
        return self.mask_decoder(image_embeddings=embedding, image_pe=self.dense_pe, sparse_prompt_embeddings=sparse,
                                 dense_prompt_embeddings=dense, multimask_output=False)


DECODERS = {"fast": BoxDecoder, "reference": ReferenceBoxDecoder}
