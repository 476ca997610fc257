"""Model adapters: the real LiteMedSAM weights, preprocessing contracts, clear load errors."""

import os

import numpy as np
import pytest
import torch

from medsam3d import ModelError
from medsam3d.models import (MODELS, available_models, describe_model, load_model, model_spec, register_model,
                             resolve_device, set_threads)
from medsam3d.models.base import file_sha256, load_into, load_state_dict
from medsam3d.models.litemedsam import LiteMedSAM, bundled_checkpoint
from medsam3d.models.registry import MODEL_REGISTRY
from medsam3d.models.sam import MedSAM

PROTOCOL = {"name", "device", "runtime", "checkpoint", "weights_sha256", "trust_checkpoint", "can_blend"}


def test_bundled_weights_are_verified(litemedsam):
    path, sha = bundled_checkpoint()
    assert path.is_file() and litemedsam.weights_sha256 == sha
    assert PROTOCOL <= set(vars(litemedsam))  # set by the adapter itself, not inherited defaults
    assert describe_model(litemedsam) == {"name": "litemedsam", "device": "cpu", "runtime": litemedsam.runtime,
                                          "checkpoint": str(path), "weights_sha256": sha, "trust_checkpoint": False}
    assert litemedsam.runtime in ("torch", "onnxruntime") and litemedsam.can_blend
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
    assert np.allclose(a[0], b[0].numpy(), atol=1e-4)  # ONNX Runtime gives numpy, PyTorch tensors
    boxes = np.array([[30, 15, 90, 75], [33, 18, 87, 72], [5, 5, 40, 40]])
    masks_a, scores_a = litemedsam.decode(a, boxes)  # the ONNX decoder, batched
    masks_b, scores_b = torch_model.decode(a, boxes)  # the PyTorch decoder on the same embedding
    assert (torch_model.decode(b, boxes)[0] == masks_b).mean() > 0.999 and litemedsam.decode(b, boxes)[0].shape == masks_a.shape
    assert masks_a[0].sum() > 1000 and np.abs(scores_a - scores_b).max() < 1e-4
    assert all((ma != mb).sum() <= 2 for ma, mb in zip(masks_a, masks_b))
    for model in (litemedsam, torch_model):  # no boxes: no masks (not an error deep in the decoder)
        masks, scores = model.decode(a, np.zeros((0, 4)))
        assert masks.shape == (0, 120, 100) and scores.shape == (0,)


def test_the_reordered_box_decoder_is_segment_anythings(litemedsam):
    # BoxDecoder takes the attention products in another order (about 1.6x faster); its logits
    # must be the reference's: with LiteMedSAM's real weights on a real CT slice's embedding,
    # and with segment-anything's own (SAM ViT-B sized) decoder classes, randomly initialised
    pytest.importorskip("segment_anything", reason="needs segment-anything (the sam extra: pip install -e '.[sam]')")
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
    lite_embedding = torch.as_tensor(litemedsam.encode([slice_.astype(np.float32)])[0][0])
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
        assert np.allclose(features[0], alone[0], atol=1e-5) and features[1:] == alone[1:]


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
    pytest.importorskip("segment_anything", reason="needs segment-anything (the sam extra: pip install -e '.[sam]')")
    from segment_anything import sam_model_registry

    from medsam3d.models.decoder import BoxDecoder, ReferenceBoxDecoder

    torch.manual_seed(0)
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), path)
    embedding = torch.randn(1, 256, 64, 64)
    boxes = np.array([[28, 23, 72, 67], [20, 10, 100, 80]])
    for name, features in (("sam-vit-b", (embedding, (768, 1024), (90, 120))), ("medsam", (embedding, (90, 120)))):
        model = load_model(name, checkpoint=path, device="cpu")
        assert PROTOCOL <= set(vars(model))  # set by the adapter itself, not inherited defaults
        assert describe_model(model) == {"name": name, "device": "cpu", "runtime": "torch", "checkpoint": str(path),
                                         "weights_sha256": file_sha256(path), "trust_checkpoint": False}
        assert model.can_blend
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
    pytest.importorskip("segment_anything", reason="needs segment-anything (the sam extra: pip install -e '.[sam]')")
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



# ---------------------------------------------------------------- the registry, plugins, checkpoints, threads


class TinySAM:
    """A plugin model of one file's worth: a real torch module (a 3x3 convolution) whose weights come
    from a checkpoint; it segments what its filtered image shows above 0.5 inside each box."""

    can_blend = False

    def __init__(self, name, checkpoint, device="auto", *, trust_checkpoint=False, gain=1.0):
        self.name, self.device, self.runtime = name, resolve_device(device), "torch"
        self.net = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
        state, self.trust_checkpoint = load_state_dict(checkpoint, "TinySAM", trust_checkpoint=trust_checkpoint)
        load_into(self.net, state, checkpoint, "TinySAM")
        self.checkpoint, self.weights_sha256 = str(checkpoint), file_sha256(checkpoint)
        self.can_blend = False
        self.gain = gain

    def encode(self, images):
        with torch.inference_mode():
            return [self.net(torch.as_tensor(np.asarray(im, np.float32))[None, None])[0, 0].numpy() * self.gain
                    for im in images]

    def decode(self, features, boxes):
        masks = np.zeros((len(boxes), *features.shape), bool)
        for mask, (x0, y0, x1, y1) in zip(masks, np.asarray(boxes, int).reshape(-1, 4)):
            mask[y0 : y1 + 1, x0 : x1 + 1] = features[y0 : y1 + 1, x0 : x1 + 1] > 0.5
        return masks, np.full(len(boxes), 0.9, np.float32)

    @staticmethod
    def blend(fa, fb, w):
        raise NotImplementedError("TinySAM cannot blend embeddings (can_blend is False)")


def identity_conv_state():
    net = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        net.weight.zero_()
        net.weight[0, 0, 1, 1] = 1.0
    return net.state_dict()


def touch(path):
    open(path, "w").close()


class Payload:
    """What a malicious checkpoint pickles: unpickling it calls ``touch(marker)``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return touch, (str(self.marker),)


@pytest.fixture
def tiny_model():
    register_model("tiny-sam", TinySAM, needs_checkpoint=True, description="a 3x3 convolution (test)")
    yield "tiny-sam"
    MODEL_REGISTRY.remove("tiny-sam")


def test_the_builtins_are_registered_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys, medsam3d.models as m; names = m.available_models(); spec = m.model_spec('sam-vit-h'); "
            "print(','.join(names), spec.needs_checkpoint, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["litemedsam,medsam,sam-vit-b,sam-vit-l,sam-vit-h", "True", "False"]
    assert MODELS == ("litemedsam", "medsam", "sam-vit-b", "sam-vit-l", "sam-vit-h")
    assert available_models()[:5] == MODELS
    assert not model_spec("litemedsam").needs_checkpoint and model_spec("LiteMedSAM ").description


def test_an_unknown_model_is_one_line_listing_the_known_ones():
    with pytest.raises(ModelError) as info:
        load_model("sam-vit-x")
    assert str(info.value) == ("expected a model among litemedsam, medsam, sam-vit-b, sam-vit-l, sam-vit-h, found "
                               "'sam-vit-x'; add one with medsam3d.models.register_model or the 'medsam3d.models' "
                               "entry point group")
    with pytest.raises(ModelError, match="expected options among decoder, decoder_weights, runtime for model "
                                         "'litemedsam', found colour"):
        load_model("litemedsam", colour="red")


def test_a_registered_model_loads_by_name(tmp_path, tiny_model):
    path = tmp_path / "tiny.pth"
    torch.save(identity_conv_state(), path)
    assert tiny_model in available_models()
    model = load_model(tiny_model, checkpoint=path, device="cpu", gain=2.0)
    assert describe_model(model) == {"name": "tiny-sam", "device": "cpu", "runtime": "torch", "checkpoint": str(path),
                                     "weights_sha256": file_sha256(path), "trust_checkpoint": False}
    image = np.zeros((20, 30), np.float32)
    image[5:10, 8:20] = 0.4  # x 2.0 (gain) > 0.5
    masks, scores = model.decode(model.encode([image])[0], np.array([[0, 0, 29, 19], [0, 0, 10, 19]]))
    assert masks[0].sum() == 60 and masks[1].sum() == 15 and scores.shape == (2,)
    with pytest.raises(ModelError, match="--checkpoint PATH for model 'tiny-sam'"):
        load_model(tiny_model)
    with pytest.raises(ModelError, match="registered already"):
        register_model(tiny_model, TinySAM, needs_checkpoint=True, description="again")
    # a "module:attribute" factory is imported when the model is first loaded
    register_model("tiny-sam-lazy", "test_models:TinySAM", needs_checkpoint=True, description="lazy")
    try:
        assert load_model("tiny-sam-lazy", checkpoint=path).name == "tiny-sam-lazy"
    finally:
        MODEL_REGISTRY.remove("tiny-sam-lazy")


def test_plugins_that_break_the_protocol_are_refused(tmp_path):
    class Nameless:  # no runtime, checkpoint...: a model that skips attributes
        name = "half"

        def __init__(self, name, checkpoint, device, *, trust_checkpoint=False):
            pass

    register_model("half", Nameless, needs_checkpoint=False, description="incomplete")
    register_model("bad-factory", "no_such_module:build", needs_checkpoint=False, description="missing")
    try:
        with pytest.raises(ModelError, match="SliceModel protocol, found Nameless without device, runtime, "
                                             "checkpoint, weights_sha256, trust_checkpoint, can_blend, encode"):
            load_model("half")
        with pytest.raises(ModelError, match="plugin 'bad-factory' at no_such_module:build, found it not importable"):
            load_model("bad-factory")
    finally:
        MODEL_REGISTRY.remove("half")
        MODEL_REGISTRY.remove("bad-factory")
    with pytest.raises(ModelError, match="'package.module:attribute' string"):
        register_model("x", "no-colon", needs_checkpoint=False, description="")
    with pytest.raises(ModelError, match="lower case"):
        register_model("Big", TinySAM, needs_checkpoint=False, description="")
    with pytest.raises(ModelError, match="built-in 'medsam'"):
        MODEL_REGISTRY.remove("medsam")


PLUGIN = """
from medsam3d.models.registry import ModelSpec
from test_models import TinySAM

MODEL = ModelSpec("tiny-plugin", TinySAM, needs_checkpoint=True, description="an installed plugin")
"""


def test_a_model_plugin_is_found_by_its_entry_point(tmp_path, monkeypatch):
    """One module and its package's metadata (as pip installs them): the model loads by name."""
    from synthetic import install_plugin

    install_plugin(tmp_path, monkeypatch, "tiny_plugin", PLUGIN, "medsam3d.models", "tiny-plugin = tiny_plugin:MODEL")
    assert "tiny-plugin" in available_models() and "tiny-plugin" not in MODELS
    path = tmp_path / "tiny.pth"
    torch.save(identity_conv_state(), path)
    assert model_spec("tiny-plugin").needs_checkpoint
    assert load_model("tiny-plugin", checkpoint=path).checkpoint == str(path)
    with pytest.raises(ModelError, match="--checkpoint PATH"):
        load_model("tiny-plugin")


def test_a_pickled_checkpoint_is_refused_unless_trusted(tmp_path, tiny_model, caplog):
    """weights_only=False runs code from the file: here the checkpoint touches a file when unpickled."""
    plain, pickled, marker = tmp_path / "plain.pth", tmp_path / "pickled.pth", tmp_path / "code-ran"
    torch.save(identity_conv_state(), plain)
    torch.save({"model": identity_conv_state(), "args": Payload(marker)}, pickled)
    assert load_model(tiny_model, checkpoint=plain, trust_checkpoint=True).trust_checkpoint is False  # safe anyway
    with pytest.raises(ModelError) as info:
        load_model(tiny_model, checkpoint=pickled)
    assert str(info.value) == (
        f"expected a weights-only TinySAM checkpoint at {pickled}, found one that pickles Python objects (global "
        "test_models.touch), which torch refuses to load safely; unpickling it can run code from the file: if you "
        "trust where it came from, pass --trust-checkpoint (trust_checkpoint=True)")
    assert not marker.exists()
    with caplog.at_level("WARNING", logger="medsam3d.models.base"):
        model = load_model(tiny_model, checkpoint=pickled, trust_checkpoint=True)
    assert marker.exists()  # the file's code ran: what the opt-in allows
    assert model.trust_checkpoint is True and describe_model(model)["trust_checkpoint"] is True
    assert any("trust_checkpoint=True" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    state, unpickled = load_state_dict(plain, "TinySAM")
    assert not unpickled and set(state) == {"weight"}


def test_litemedsam_and_medsam_refuse_a_pickled_checkpoint_unless_trusted(tmp_path, litemedsam):
    """A user's LiteMedSAM checkpoint saved with its training arguments (a Python object)."""
    from argparse import Namespace

    path = tmp_path / "lite_with_args.pth"
    torch.save({"model": litemedsam.net.state_dict(), "args": Namespace(lr=1e-4)}, path)
    with pytest.raises(ModelError, match="^expected a weights-only LiteMedSAM checkpoint at .*global "
                                         "argparse.Namespace.*pass --trust-checkpoint"):
        load_model("litemedsam", checkpoint=path, device="cpu", runtime="torch")
    model = load_model("litemedsam", checkpoint=path, device="cpu", runtime="torch", trust_checkpoint=True)
    assert describe_model(model) == {"name": "litemedsam", "device": "cpu", "runtime": "torch",
                                     "checkpoint": str(path), "weights_sha256": file_sha256(path),
                                     "trust_checkpoint": True}
    with pytest.raises(ModelError, match="^expected a weights-only medsam checkpoint"):
        MedSAM("medsam", path, "cpu")  # the SAM family's adapters refuse it the same way, before building


def test_set_threads_caps_torch_onnxruntime_and_the_thread_pool():
    from medsam3d import _parallel

    before = torch.get_num_threads()
    try:
        model = load_model("litemedsam", device="cpu", threads=1)
        assert torch.get_num_threads() == 1 and _parallel.thread_cap() == 1
        if model.runtime == "onnxruntime":
            for session in (model._ort, model._ort_decoder):
                assert session.get_session_options().intra_op_num_threads == 1
        assert _parallel.map_threads(lambda x: x * 2, [1, 2, 3]) == [2, 4, 6]
    finally:
        set_threads(None)
    assert torch.get_num_threads() == before and _parallel.thread_cap() is None
    with pytest.raises(ModelError, match="thread count >= 1"):
        set_threads(0)
    with pytest.raises(ModelError, match="thread count >= 1"):
        set_threads(True)


def test_the_bundled_model_runs_on_onnx_runtime_without_importing_torch(litemedsam):
    # the exports are cached by the fixture's model: a new process needs neither torch nor its
    # 400 MB, and segments as the model with torch loaded does
    import subprocess
    import sys

    if litemedsam.runtime != "onnxruntime":
        pytest.skip("onnxruntime is not installed: the torch encoder and decoder are the only ones")
    code = ("import sys, numpy as np, medsam3d as m3; m = m3.load_model('litemedsam', device='cpu'); "
            "yy, xx = np.mgrid[:150, :120]; im = (0.2 + 0.6 * (((yy - 70) ** 2 + (xx - 60) ** 2) < 30 ** 2)); "
            "masks, scores = m.decode(m.encode([im.astype(np.float32)])[0], np.array([[28, 38, 92, 102]])); "
            "print(m.runtime, 'torch' in sys.modules, int(masks.sum()), round(float(scores[0]), 4))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    yy, xx = np.mgrid[:150, :120]
    image = (0.2 + 0.6 * (((yy - 70) ** 2 + (xx - 60) ** 2) < 30**2)).astype(np.float32)
    masks, scores = litemedsam.decode(litemedsam.encode([image])[0], np.array([[28, 38, 92, 102]]))
    assert out == ["onnxruntime", "False", str(int(masks.sum())), str(round(float(scores[0]), 4))]
    assert litemedsam.net is not None  # the PyTorch network is still there when asked for


def test_the_bilinear_resize_is_torchs():
    from medsam3d.models.litemedsam import resize_bilinear

    rng = np.random.default_rng(4)
    for shape, size in (((3, 200, 137), (611, 419)), ((2, 256, 256), (100, 90)), ((1, 37, 256), (80, 512))):
        x = (rng.standard_normal(shape) * 5).astype(np.float32)
        ours = resize_bilinear(x, size)
        theirs = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=size, mode="bilinear",
                                                 align_corners=False)[:, 0].numpy()
        assert ours.shape == (shape[0], *size) and np.abs(ours - theirs).max() < 1e-3


def test_a_thread_cap_set_before_torch_is_imported_reaches_it_when_it_is(litemedsam):
    import subprocess
    import sys

    if litemedsam.runtime != "onnxruntime":
        pytest.skip("onnxruntime is not installed: the torch encoder and decoder are the only ones")
    code = ("import sys, medsam3d as m3; m = m3.load_model('litemedsam', device='cpu', threads=1); "
            "print('torch' in sys.modules, m._ort.get_session_options().intra_op_num_threads); "
            "m.net; import torch; print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "1", "1"]


def test_a_damaged_onnx_export_is_made_again(litemedsam, tmp_path):
    import shutil
    import subprocess
    import sys

    from medsam3d.models.litemedsam import _onnx_paths, bundled_checkpoint

    if litemedsam.runtime != "onnxruntime":
        pytest.skip("onnxruntime is not installed: the torch encoder and decoder are the only ones")
    paths = _onnx_paths(bundled_checkpoint()[1], None, torch.__version__)  # the bundled weights' exports
    for path in paths.values():
        shutil.copy(path, tmp_path / path.name)
    damaged = tmp_path / paths["decoder2"].name
    damaged.write_bytes(b"not a model")
    code = "import medsam3d as m3; print(m3.load_model('litemedsam', device='cpu').runtime)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MEDSAM3D_CACHE": str(tmp_path)})
    assert out.stdout.split() == ["onnxruntime"] and "exporting it again" in out.stderr
    assert damaged.stat().st_size > 1_000_000  # exported again from the weights


def test_region_embedding_reads_the_cells_under_a_mask_through_the_letterbox():
    """A (1, C, 64, 64) embedding of a 100 x 200 image letterboxed into a 256 input (content 128 x 256
    at the top left): a cell belongs to the pixel at its centre, cells of the padding belong to none."""
    from medsam3d.models.base import region_embedding

    grid = np.zeros((1, 2, 64, 64), np.float32)
    grid[0, 0, 10:20, 30:40] = 1.0   # channel 0: one inside the region
    grid[0, 1] = 5.0                 # channel 1: constant everywhere, padding included
    grid[0, 1, 32:] = -100.0         # ...except the padding rows (content ends at row 128 = cell 32)
    mask = np.zeros((100, 200), bool)
    # cells 10..19 x 30..39 have centres at rows (r + 0.5) * 4 * 100 / 128 and columns (c + 0.5) * 4 * 200 / 256
    rows = ((np.arange(64) + 0.5) * 4 * 100 / 128).astype(int)
    cols = ((np.arange(64) + 0.5) * 4 * 200 / 256).astype(int)
    mask[rows[10] : rows[19] + 1, cols[30] : cols[39] + 1] = True
    inside, ring = region_embedding(grid, mask, (128, 256), input_size=256)
    assert inside == pytest.approx([1.0, 5.0]) and ring == pytest.approx([0.0, 5.0])
    # a mask reaching the image's last rows: the padding's cells never count, inside or in the ring
    low = np.zeros((100, 200), bool)
    low[90:, 50:60] = True
    inside, ring = region_embedding(grid, low, (128, 256), input_size=256)
    assert inside[1] == pytest.approx(5.0) and ring[1] == pytest.approx(5.0)
    # no cell's centre in a one-pixel mask between centres, and a torch tensor is read like an array
    tiny = np.zeros((100, 200), bool)
    tiny[0, 0] = True
    assert region_embedding(torch.from_numpy(grid), tiny, (128, 256), input_size=256) is None


def test_litemedsam_region_embedding_tells_a_tumour_from_its_surroundings(litemedsam):
    """On the example CT's tumour slice the mean embedding of the expert's mask is nearer its own mean
    than the ring's, and a mask of the muscle beside it nearer the ring's (what the engine's extension
    past the sections' first range reads, :func:`medsam3d.propagate.stops.embedding_check`)."""
    import medsam3d as m3

    from conftest import EXAMPLES

    image = m3.load(EXAMPLES / "sts041_ct" / "CT_image.nii.gz")
    ref = m3.load_labels(EXAMPLES / "sts041_ct" / "CT_mask.nii.gz", image).array == 1
    k = int(np.argmax(ref.sum(axis=(0, 1))))
    ct = np.clip((image.array[:, :, k].T + 160) / 400, 0, 1).astype(np.float32)  # rows = j, columns = i
    features = litemedsam.encode([ct])[0]
    tumour = ref[:, :, k].T
    inside, ring = litemedsam.region_embedding(features, tumour)
    direction = inside - ring
    moved = np.roll(tumour, tumour.any(axis=0).sum() + 6, axis=1)  # the same shape beside the tumour
    assert not (moved & tumour).any()
    other, _ = litemedsam.region_embedding(features, moved)
    rel = float((other - ring) @ direction / (direction @ direction))
    assert rel < 0.5, rel  # measured 0.21

    # a session's caching wrapper reads it through, and has none where the model has none
    from medsam3d.session import CachedModel
    from synthetic import ThresholdModel

    assert np.array_equal(CachedModel(litemedsam).region_embedding(features, tumour)[0], inside)
    assert getattr(CachedModel(ThresholdModel()), "region_embedding", None) is None
