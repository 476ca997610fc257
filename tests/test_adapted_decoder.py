"""Adapted decoder weights (issue 27): built by a tiny training run, saved, loaded through the real path.

``LiteMedSAM(decoder_weights=PATH)`` (and ``load_model(..., decoder_weights=PATH)``) loads
adapted prompt-encoder/mask-decoder tensors over the bundled ones; the original stays the
default, one option away, and the ONNX Runtime decoder is exported from the adapted tensors
(keyed by the combined SHA-256), not taken from the original's cache.
"""

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medsam3d import ModelError
from medsam3d.models import load_model
from medsam3d.models.base import file_sha256
from medsam3d.models.litemedsam import ADAPTABLE, LiteMedSAM, bundled_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _disc(radius, shape=(140, 120), centre=(70, 60)):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) < radius**2


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A few steps of finetune_decoder's loss on one synthetic slice: a bright disc of radius 30
    whose target is its inner disc of radius 18 (the box stays the outer disc's), saved as the
    script saves it. Returns the file, the slice's embedding, the box and the target."""
    from finetune_decoder import sample_loss

    from medsam3d.models.decoder import BoxDecoder

    torch.manual_seed(0)
    model = LiteMedSAM(device="cpu", runtime="torch")
    image = (0.2 + 0.6 * _disc(30)).astype(np.float32) + 0.05 * np.random.default_rng(0).random((140, 120))
    (features,) = model.encode([image.astype(np.float32)])
    embedding = features[0].clone()
    target = _disc(18)
    box = np.array([28, 38, 92, 102], np.float32)  # x0, y0, x1, y1 around the outer disc
    params = [p for name, p in model.net.named_parameters() if name.startswith(ADAPTABLE)]
    for p in params:
        p.requires_grad_(True)
    decoder = BoxDecoder(model.net.prompt_encoder, model.net.mask_decoder).train()
    optimiser = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(6):
        loss, _ = sample_loss(torch, decoder, embedding, features[1], target, box)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    names = {name for name, _ in model.net.named_parameters() if name.startswith(ADAPTABLE)}
    path = tmp_path_factory.mktemp("adapted") / "adapted_decoder.pt"
    torch.save({k: v.detach().float() for k, v in model.net.state_dict().items() if k in names}, path)
    return path, features, box, target


def _dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.parametrize("runtime", ["torch", "auto"])
def test_adapted_decoder_loads_and_changes_the_masks(adapted, litemedsam, runtime):
    path, features, box, target = adapted
    model = load_model("litemedsam", device="cpu", runtime=runtime, decoder_weights=path)
    base = bundled_checkpoint()[1]
    assert model.weights_sha256 == hashlib.sha256(f"{base}+{file_sha256(path)}".encode()).hexdigest()
    assert model.weights_sha256 != litemedsam.weights_sha256 == base and model.decoder_weights == str(path)
    original, _ = litemedsam.decode(features, box[None])  # the default: the original decoder
    changed, _ = model.decode(features, box[None])
    assert _dice(changed[0], target) > _dice(original[0], target) + 0.05
    assert (changed[0] != original[0]).sum() > 100
    if runtime == "auto" and litemedsam.runtime == "onnxruntime":
        # the ONNX decoder that runs is the adapted one (exported from it, cached by the combined SHA-256)
        assert model.runtime == "onnxruntime"
        torch_model = LiteMedSAM(device="cpu", runtime="torch", decoder_weights=path)
        masks_onnx, _ = model.decode(features, box[None])
        masks_torch, _ = torch_model.decode(features, box[None])
        assert (masks_onnx != masks_torch).sum() <= 2
    again, _ = load_model("litemedsam", device="cpu").decode(features, box[None])  # still one option away
    assert (again == original).all()


def test_adapted_decoder_refuses_other_tensors(tmp_path):
    wrong = tmp_path / "encoder.pt"
    torch.save({"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ModelError, match="expected prompt_encoder.. and mask_decoder.. tensors"):
        LiteMedSAM(device="cpu", runtime="torch", decoder_weights=wrong)
    shape = tmp_path / "shape.pt"
    torch.save({"mask_decoder.iou_token.weight": torch.zeros(3, 3)}, shape)
    with pytest.raises(ModelError, match="tensor shapes"):
        LiteMedSAM(device="cpu", runtime="torch", decoder_weights=shape)
    unsafe = tmp_path / "pickled.pt"
    torch.save({"mask_decoder.iou_token.weight": torch.zeros(1, 256), "args": Path("x")}, unsafe)
    with pytest.raises(ModelError, match="weights-only"):
        LiteMedSAM(device="cpu", runtime="torch", decoder_weights=unsafe)


def test_the_split_is_by_patient_and_matches_its_seed():
    import bench_generalise as bg

    drawn, hold = bg.split_patients()
    assert drawn == bg.SPLIT and hold == bg.HOLD_OUT
    assert not set(bg.SPLIT["tune"]) & set(bg.SPLIT["check"]) and set(bg.HOLD_OUT) <= set(bg.SPLIT["tune"])
    assert set(bg.ALREADY_TUNED) <= set(bg.SPLIT["tune"])
    for half in ("tune", "check"):
        modalities = {bg.TUMOURS[c] and c.rsplit("-", 1)[1] for c in bg.TUMOURS if bg.half_of(c) == half}
        assert modalities == {"ct", "mr"}
