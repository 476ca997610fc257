"""Model adapters: the real LiteMedSAM weights, preprocessing contracts, clear load errors."""

import numpy as np
import pytest
import torch

from medsam3d import ModelError
from medsam3d.models import load_model, resolve_device
from medsam3d.models.litemedsam import LiteMedSAM, bundled_checkpoint
from medsam3d.models.sam import MedSAM


def test_bundled_weights_are_verified(litemedsam):
    path, sha = bundled_checkpoint()
    assert path.is_file() and litemedsam.weights_sha256 == sha
    assert sha == "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


def test_litemedsam_preprocessing_contract():
    image = np.linspace(0, 1, 100 * 200, dtype=np.float32).reshape(100, 200)
    x, (h, w) = LiteMedSAM.prepare(image)
    assert x.shape == (256, 256) and (h, w) == (128, 256)
    assert x[:h].max() == pytest.approx(1.0) and x[:h].min() == pytest.approx(0.0)
    assert not x[h:].any()  # padded at the bottom


def test_medsam_preprocessing_stretches_to_1024():
    image = np.random.default_rng(0).random((100, 200)).astype(np.float32) * 50
    x = MedSAM.prepare(image)
    assert x.shape == (1024, 1024) and x.min() == pytest.approx(0) and x.max() == pytest.approx(1)


def test_litemedsam_segments_a_bright_disc(litemedsam):
    yy, xx = np.mgrid[:160, :160]
    image = (0.2 + 0.6 * (((yy - 80) ** 2 + (xx - 70) ** 2) < 30**2)).astype(np.float32)
    (features,) = litemedsam.encode([image])
    masks, scores = litemedsam.decode(features, np.array([[38, 48, 102, 112]]))
    truth = ((yy - 80) ** 2 + (xx - 70) ** 2) < 30**2
    assert masks.shape == (1, 160, 160)
    assert 2 * (masks[0] & truth).sum() / (masks[0].sum() + truth.sum()) > 0.9
    assert scores[0] > 0.5


def test_onnx_and_torch_models_agree(litemedsam):
    if litemedsam.runtime != "onnxruntime":
        pytest.skip("onnxruntime is not installed: the torch encoder and decoder are the only ones")
    torch_model = load_model("litemedsam", device="cpu", runtime="torch")
    yy, xx = np.mgrid[:120, :100]
    image = (0.3 * np.random.default_rng(1).random((120, 100)) + 0.5 * (((yy - 60) ** 2 + (xx - 45) ** 2) < 25**2))
    a = litemedsam.encode([image.astype(np.float32)])[0]
    b = torch_model.encode([image.astype(np.float32)])[0]
    assert torch.allclose(a[0], b[0], atol=1e-4)
    boxes = np.array([[30, 15, 90, 75], [33, 18, 87, 72], [5, 5, 40, 40]])
    masks_a, scores_a = litemedsam.decode(a, boxes)  # the ONNX decoder, batched
    masks_b, scores_b = torch_model.decode(a, boxes)  # the PyTorch decoder on the same embedding
    assert masks_a[0].sum() > 1000 and np.abs(scores_a - scores_b).max() < 1e-4
    assert all((ma != mb).sum() <= 2 for ma, mb in zip(masks_a, masks_b))
    for model in (litemedsam, torch_model):  # no boxes: no masks (not an error deep in the decoder)
        masks, scores = model.decode(a, np.zeros((0, 4)))
        assert masks.shape == (0, 120, 100) and scores.shape == (0,)


def test_the_reordered_box_decoder_is_segment_anythings(litemedsam):
    # BoxDecoder takes the attention products in another order (about 1.6x faster); its logits
    # must be the reference's: with LiteMedSAM's real weights on a real CT slice's embedding,
    # and with segment-anything's own (SAM ViT-B sized) decoder classes, randomly initialised
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    from medsam3d.models.decoder import BoxDecoder, ReferenceBoxDecoder

    net = litemedsam.net
    torch.manual_seed(0)
    sam_prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                               mask_in_chans=16).eval()
    sam_decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256).eval()
    yy, xx = np.mgrid[:160, :140]
    slice_ = (0.2 * np.random.default_rng(3).random((160, 140)) + 0.6 * (((yy - 80) ** 2 + (xx - 60) ** 2) < 30**2))
    lite_embedding = litemedsam.encode([slice_.astype(np.float32)])[0][0]
    cases = [(net.prompt_encoder, net.mask_decoder, lite_embedding, 256),
             (sam_prompt, sam_decoder, torch.randn(1, 256, 64, 64), 1024)]
    for prompt_encoder, mask_decoder, embedding, size in cases:
        fast = BoxDecoder(prompt_encoder, mask_decoder).eval()
        reference = ReferenceBoxDecoder(prompt_encoder, mask_decoder).eval()
        for n in (1, 3):
            boxes = torch.tensor([[20 + 9 * i, 30, 150 + 5 * i, 170] for i in range(n)], dtype=torch.float32)
            boxes = boxes * size / 256
            with torch.inference_mode():
                logits, iou = fast(embedding, boxes)
                ref_logits, ref_iou = reference(embedding, boxes)
            assert logits.shape == ref_logits.shape == (n, 1, 256, 256) and iou.shape == ref_iou.shape == (n, 1)
            scale = float(ref_logits.abs().max())
            assert float((logits - ref_logits).abs().max()) < 1e-4 * max(scale, 1.0)
            assert float((iou - ref_iou).abs().max()) < 1e-4
            assert int(((logits > 0) != (ref_logits > 0)).sum()) <= 2
    with pytest.raises(ModelError, match="expected decoder fast or reference, found 'slow'"):
        LiteMedSAM(decoder="slow")
    with pytest.raises(ModelError, match="found onnx"):
        LiteMedSAM(runtime="onnx", decoder="reference")


def test_a_batch_encodes_as_its_images_one_by_one(litemedsam):
    # the sections are encoded in one batch; the ONNX export takes one image per run
    rng = np.random.default_rng(2)
    images = [rng.random(shape).astype(np.float32) for shape in ((120, 100), (64, 200), (90, 90))]
    batch = litemedsam.encode(images)
    for image, features in zip(images, batch):
        (alone,) = litemedsam.encode([image])
        assert torch.allclose(features[0], alone[0], atol=1e-5) and features[1:] == alone[1:]


def test_missing_and_wrong_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="--checkpoint PATH"):
        load_model("medsam")
    with pytest.raises(ModelError, match="found nothing"):
        load_model("sam-vit-b", checkpoint=tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot load"):
        load_model("litemedsam", checkpoint=junk)
    with pytest.raises(ModelError, match="among"):
        load_model("sam-vit-x")


def test_sam_family_adapters_load_a_checkpoint_and_decode_as_segment_anything(tmp_path):
    # no SAM or MedSAM weights can be fetched here: a ViT-B of segment-anything's own build with
    # seeded random weights, saved as a checkpoint, is loaded by both adapters, whose decode (box
    # scaling, the shared BoxDecoder, the logits' resizing) must give segment-anything's decoder's
    # masks. The embedding is random too: a ViT-B encodes a 1024 px image in 15 s on 2 cores.
    from segment_anything import sam_model_registry

    from medsam3d.models.decoder import BoxDecoder, ReferenceBoxDecoder

    torch.manual_seed(0)
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), path)
    embedding = torch.randn(1, 256, 64, 64)
    boxes = np.array([[28, 23, 72, 67], [20, 10, 100, 80]])
    for name, features in (("sam-vit-b", (embedding, (768, 1024), (90, 120))), ("medsam", (embedding, (90, 120)))):
        model = load_model(name, checkpoint=path, device="cpu")
        assert isinstance(model._decoder, BoxDecoder)
        masks, scores = model.decode(features, boxes)
        assert masks.shape == (2, 90, 120) and masks.dtype == bool and scores.shape == (2,)
        assert all(0 < m.sum() < m.size for m in masks)  # not a trivially equal empty or full mask
        model._decoder = ReferenceBoxDecoder(model.net.prompt_encoder, model.net.mask_decoder).eval()
        ref_masks, ref_scores = model.decode(features, boxes)
        assert np.abs(scores - ref_scores).max() < 1e-4
        assert all((a != b).sum() <= 2 for a, b in zip(masks, ref_masks))


def test_the_sam_adapter_segments_a_slice_as_segment_anythings_predictor(tmp_path):
    """The whole SAM path (grey slice to RGB, resize, normalisation, encoder, box, decoder, the
    logits back on the slice) against segment-anything's own SamPredictor, on a real CT slice.
    No SAM weights can be fetched here: a ViT-B with seeded random weights stands in, so the masks
    mean nothing, but any difference in how the two prepare the image or the box shows. About 30 s
    on 2 cores (two 1024 px ViT-B encodings)."""
    import medsam3d as m3
    from segment_anything import SamPredictor, sam_model_registry

    from conftest import EXAMPLES

    torch.manual_seed(0)
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), path)
    model = load_model("sam-vit-b", checkpoint=path, device="cpu")
    ct = m3.load(EXAMPLES / "sts041_ct" / "CT_image.nii.gz").array[:, :, 23].T  # rows = j, columns = i
    image = np.clip((ct + 160) / 400, 0, 1).astype(np.float32)  # soft-tissue window
    boxes = np.array([[57, 57, 100, 109], [40, 30, 120, 140]])
    features = model.encode([image])[0]
    masks, scores = model.decode(features, boxes)

    predictor = SamPredictor(model.net)
    predictor.set_image(np.repeat((image * 255).astype(np.uint8)[..., None], 3, axis=2))
    assert torch.allclose(features[0], predictor.features, atol=1e-5)
    for box, mask, score in zip(boxes, masks, scores):
        ref_masks, ref_scores, _ = predictor.predict(box=box, multimask_output=False)
        assert mask.shape == ref_masks[0].shape == image.shape
        assert 0 < ref_masks[0].sum() < ref_masks[0].size  # neither empty nor full: a real comparison
        assert (mask != ref_masks[0]).sum() <= 2 and abs(float(score) - float(ref_scores[0])) < 1e-4


def test_sam_checkpoint_of_the_wrong_family_is_refused(tmp_path, litemedsam):
    path = tmp_path / "lite.pth"
    torch.save(litemedsam.net.state_dict(), path)
    with pytest.raises(ModelError, match="incompatible"):
        load_model("sam-vit-b", checkpoint=path)


def test_device_resolution():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA"):
            resolve_device("cuda")
    with pytest.raises(ModelError, match="expected a device"):
        resolve_device("tpu")


def test_missing_dependency_names_the_package_to_install():
    from medsam3d.errors import MissingDependencyError, require

    with pytest.raises(MissingDependencyError, match="expected the Python package 'no-such-pkg'.*pip install no-such-pkg"):
        require("no_such_pkg", "a feature")
