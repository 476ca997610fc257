"""Randomly initialised detector models, saved in the layout real weights have (for tests and timing).

No pretrained weights can be fetched where medsam3d is tested, so its tests build these,
save them to a folder and load them through exactly the path real weights take
(:func:`.common.resolve_weights`, ``from_pretrained`` with ``local_files_only``). What
they find is random; they check the plumbing. ``size="tiny"`` builds models of a few
hundred thousand parameters; ``size="full"`` builds the published architectures
(``transformers``' default configurations, which its documentation gives as those of
``IDEA-Research/grounding-dino-tiny``, ``microsoft/kosmos-2-patch14-224`` and
``facebook/sam3``) for timing, since a tiny model's time means nothing. The tokenizers are
small stand-ins with the special tokens each processor needs: a text's tokens differ from
the real tokenizer's, its cost does not matter beside the image encoder's.
"""

from __future__ import annotations

from pathlib import Path

WORDS = ("liver", "tumor", "tumour", "lesion", "lung", "lungs", "left", "right", "kidney", "spleen", "bone",
         "a", "the", "mass", "nodule")
BACKENDS = ("grounding-dino", "kosmos-2", "sam3")


def save_random_model(backend: str, folder: str | Path, *, size: str = "tiny", seed: int = 0) -> Path:
    """Build ``backend``'s model (``tiny`` or ``full``) with random weights and save it with its processor."""
    import torch

    if backend not in BACKENDS or size not in ("tiny", "full"):
        raise ValueError(f"expected a backend among {', '.join(BACKENDS)} and size tiny or full, found "
                         f"{backend!r}, {size!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model, processor = {"grounding-dino": _grounding_dino, "kosmos-2": _kosmos2, "sam3": _sam3}[backend](size)
    model.eval().save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def _grounding_dino(size: str):
    import transformers as t

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS])}
    tokenizer = t.BertTokenizer(vocab=vocab)
    if size == "full":
        config = t.GroundingDinoConfig()
        image = t.GroundingDinoImageProcessor()
    else:
        config = t.GroundingDinoConfig(
            backbone_config=t.SwinConfig(image_size=128, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                         window_size=4, out_indices=[2, 3, 4]),
            text_config=t.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64),
            d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10, max_text_len=32, encoder_n_points=1,
            decoder_n_points=1)
        image = t.GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 128})
    return t.GroundingDinoForObjectDetection(config), t.GroundingDinoProcessor(image_processor=image,
                                                                               tokenizer=tokenizer)


def _kosmos2(size: str):
    import transformers as t

    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), (".", -2.0),
              *((f"▁{w}", -1.0) for w in WORDS), ("<mask>", 0.0)]
    tokenizer = t.XLMRobertaTokenizer(vocab=pieces)
    if size == "full":
        image = t.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
        processor = t.Kosmos2Processor(image, tokenizer)
        config = t.Kosmos2Config()
    else:
        image = t.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = t.Kosmos2Processor(image, tokenizer)
        config = t.Kosmos2Config(
            text_config={"vocab_size": len(processor.tokenizer), "embed_dim": 32, "layers": 1, "ffn_dim": 32,
                         "attention_heads": 2, "max_position_embeddings": 256},
            vision_config={"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "image_size": 32, "patch_size": 8})
    return t.Kosmos2ForConditionalGeneration(config), processor


def _sam3(size: str):
    import transformers as t

    letters = list("abcdefghijklmnopqrstuvwxyz.")
    vocab = {c: n for n, c in enumerate(letters)}
    vocab.update({f"{c}</w>": len(letters) + n for n, c in enumerate(letters)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer = t.CLIPTokenizer(vocab=vocab, merges=[])
    if size == "full":
        return t.Sam3Model(t.Sam3Config()), t.Sam3Processor(image_processor=t.Sam3ImageProcessor(),
                                                            tokenizer=tokenizer)
    backbone = t.Sam3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               image_size=56, patch_size=14, window_size=2, global_attn_indexes=[0, 1])
    config = t.Sam3Config(
        vision_config=t.Sam3VisionConfig(backbone_config=backbone, fpn_hidden_size=32, scale_factors=[2.0, 1.0]),
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 32,
                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"]},
        geometry_encoder_config=t.Sam3GeometryEncoderConfig(hidden_size=32, num_layers=1, num_attention_heads=4,
                                                            intermediate_size=64),
        detr_encoder_config=t.Sam3DETREncoderConfig(hidden_size=32, num_layers=1, num_attention_heads=4,
                                                    intermediate_size=64),
        detr_decoder_config=t.Sam3DETRDecoderConfig(hidden_size=32, num_layers=1, num_queries=5,
                                                    num_attention_heads=4, intermediate_size=64),
        mask_decoder_config=t.Sam3MaskDecoderConfig(hidden_size=32, num_upsampling_stages=2))
    image = t.Sam3ImageProcessor(size={"height": 56, "width": 56})
    return t.Sam3Model(config), t.Sam3Processor(image_processor=image, tokenizer=tokenizer)
