"""The model interface: encode a slice once, decode any number of boxes against it."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from ..errors import ModelError

log = logging.getLogger(__name__)


@dataclass
class Embedding:
    """A slice (or a crop of it) encoded by a model, with what is needed to map boxes back.

    ``offset`` (i0, j0) and ``size`` (width, height) locate the encoded crop in the slice,
    in pixels; ``features`` is model-specific.
    """

    features: Any
    offset: tuple[int, int]
    size: tuple[int, int]


class SliceModel(Protocol):
    """What the propagation engine needs from a Segment-Anything-family model.

    Every attribute is required (the engine and the report read them without fall-backs):
    ``name`` (the registry name), ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``),
    ``runtime`` (what runs the network: ``torch``, ``onnxruntime``...), ``checkpoint`` (the
    weights file, or None), ``weights_sha256``, ``trust_checkpoint`` (True only when the
    checkpoint was unpickled with the user's explicit consent, see :func:`load_state_dict`)
    and ``can_blend`` (whether :meth:`blend` works; see ``PropagationConfig.blend_embeddings``).
    """

    name: str
    device: str
    runtime: str
    checkpoint: str | None
    weights_sha256: str | None
    trust_checkpoint: bool
    can_blend: bool

    def encode(self, images: Sequence[np.ndarray]) -> list[Any]:
        """Encode 2D float32 images in [0, 1] (rows x columns), batched; one feature object each."""
        ...

    def decode(self, features: Any, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masks (N, rows, cols) bool and quality scores (N,) for boxes (N, 4) xyxy in image pixels."""
        ...

    def blend(self, fa: Any, fb: Any, w: float) -> Any:
        """Features of a slice between two encoded ones, ``w`` of the way from ``fa`` to ``fb``
        (only called when ``can_blend``)."""
        ...

    # Optional: ``region_embedding(features, mask)``, the mean embedding vector inside a mask of the
    # encoded image and around it (see :func:`region_embedding`). A model without it still works;
    # the engine then ends an object without a slice range where the sections' first range ends
    # (``PropagationConfig.extend_min_rel``).


#: what :func:`medsam3d.models.load_model` checks a model built by a plugin's factory for
SLICE_MODEL_ATTRIBUTES = ("name", "device", "runtime", "checkpoint", "weights_sha256", "trust_checkpoint", "can_blend",
                          "encode", "decode", "blend")


def describe_model(model: SliceModel) -> dict[str, Any]:
    """The model as the report records it."""
    return {"name": model.name, "device": str(model.device), "runtime": model.runtime,
            "checkpoint": model.checkpoint, "weights_sha256": model.weights_sha256,
            "trust_checkpoint": bool(model.trust_checkpoint)}


def blend_features(fa, fb, w: float):
    """Features of a slice between two encoded slices: (1 - w) x a + w x b.

    Every adapter's features are a tuple whose first item is the embedding tensor and whose
    other items describe the image geometry (the same for all slices of one volume and crop).
    Neighbouring slices' embeddings differ little, so a linear blend stands in for the
    encoding of a slice between two encoded ones (``PropagationConfig.blend_embeddings``).
    """
    return (fa[0] * (1 - w) + fb[0] * w, *fa[1:])


def region_embedding(embedding, mask: np.ndarray, content_hw: tuple[int, int], *, input_size: int,
                     ring_cells: int = 2) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The mean vector of a (1, C, G, G) image embedding over the grid cells whose centres fall in
    ``mask`` (rows x columns of the encoded image), and over a ring ``ring_cells`` wide around
    them (None where the ring is empty); None when no cell's centre is in the mask.

    The image filled ``content_hw`` (rows, columns) at the top left of the model's square
    ``input_size`` input (the letterbox of SAM and LiteMedSAM; a stretch to the whole input
    passes ``(input_size, input_size)``).
    """
    from scipy import ndimage

    if not isinstance(embedding, np.ndarray):  # a tensor
        embedding = embedding.detach().float().cpu().numpy()
    grid = np.asarray(embedding, np.float32)[0]
    g = grid.shape[-1]
    h, w = mask.shape
    centres = (np.arange(g) + 0.5) * input_size / g
    rows = np.minimum((centres * h / content_hw[0]).astype(int), h - 1)
    cols = np.minimum((centres * w / content_hw[1]).astype(int), w - 1)
    valid = (centres < content_hw[0])[:, None] & (centres < content_hw[1])[None, :]
    inside = valid & np.asarray(mask, bool)[rows][:, cols]
    if not inside.any():
        return None
    ring = ndimage.binary_dilation(inside, iterations=ring_cells) & ~inside & valid
    return grid[:, inside].mean(axis=1), (grid[:, ring].mean(axis=1) if ring.any() else None)


def resolve_device(device: str | None) -> str:
    """``auto`` -> cuda, then mps, then cpu; an explicit device must be available.

    ``cpu``, and ``auto`` on a Linux host with no GPU device node, are answered without
    importing torch (which alone takes about 400 MB of memory), so that a model that runs on
    ONNX Runtime need not load it."""
    device = (device or "auto").lower()
    if device == "cpu" or (device == "auto" and "torch" not in sys.modules and _no_gpu_device_nodes()):
        return "cpu"
    torch = import_torch()

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("expected a CUDA GPU for --device cuda, found none; use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError("expected Apple MPS for --device mps, found none; use --device cpu or auto")
    if not (device == "cpu" or device == "mps" or device.startswith("cuda")):
        raise ModelError(f"expected a device among auto, cpu, cuda, cuda:N, mps, found {device!r}")
    return device


def _no_gpu_device_nodes() -> bool:
    """True on Linux where neither NVIDIA (``/dev/nvidia*``), AMD ROCm (``/dev/kfd``) nor WSL
    (``/dev/dxg``) GPU device nodes exist: no GPU runtime can then be available to torch."""
    import glob

    return sys.platform.startswith("linux") and not (glob.glob("/dev/nvidia*") or os.path.exists("/dev/kfd")
                                                     or os.path.exists("/dev/dxg"))


_torch_threads_before_cap: int | None = None


def set_threads(n: int | None) -> None:
    """Cap the CPU threads of this process's model work at ``n`` (None: lift the cap).

    Caps torch's intra-op threads, the intra-op threads of the ONNX Runtime sessions built
    afterwards (LiteMedSAM's; a model already loaded keeps its sessions, so call this, or
    ``load_model(..., threads=n)``, before loading) and medsam3d's own small thread pool. For a
    server or a Ray worker that shares its cores. Lifting the cap gives torch back the thread
    count it had before the first cap.
    """
    import operator

    from .._parallel import set_thread_cap

    if n is not None:
        try:
            count = -1 if isinstance(n, bool) else operator.index(n)
        except TypeError:
            count = -1
        if count < 1:
            raise ModelError(f"expected a thread count >= 1 (or None: no cap), found {n!r}")
        n = count
    set_thread_cap(n)
    if "torch" in sys.modules:  # else the cap reaches torch when a model imports it (import_torch)
        _cap_torch(sys.modules["torch"], n)


def _cap_torch(torch, n: int | None) -> None:
    global _torch_threads_before_cap
    if n is not None:
        if _torch_threads_before_cap is None:
            _torch_threads_before_cap = torch.get_num_threads()
        torch.set_num_threads(n)
    elif _torch_threads_before_cap is not None:
        torch.set_num_threads(_torch_threads_before_cap)
        _torch_threads_before_cap = None


def import_torch():
    """torch, with the thread cap of :func:`set_threads` applied (a cap set before torch was first
    imported, as the bundled LiteMedSAM on ONNX Runtime never imports it)."""
    import torch

    from .._parallel import thread_cap

    if thread_cap() is not None and torch.get_num_threads() != thread_cap():
        _cap_torch(torch, thread_cap())
    return torch


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def require_checkpoint(name: str, checkpoint: str | Path | None) -> None:
    """Refuse a model whose weights are not bundled when no checkpoint path is given."""
    if checkpoint is None:
        raise ModelError(f"expected --checkpoint PATH for model '{name}' (its weights are not bundled), "
                         "found none; download the official .pth once and give its path")


def load_state_dict(path: str | Path, what: str, *, trust_checkpoint: bool = False) -> tuple[dict, bool]:
    """torch.load a checkpoint on the CPU, weights only unless the user trusts the file.

    Returns the state dict and whether the file was unpickled (True only with
    ``trust_checkpoint``, when the weights-only load refused it). Unpickling can run any code
    the file holds, so a checkpoint that pickles Python objects (a training script's
    arguments, a whole ``nn.Module``) is refused with a one-line :class:`ModelError` unless the
    caller opts in; the opt-in is logged as a warning.
    """
    import pickle

    torch = import_torch()
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"expected a {what} checkpoint file at {path}, found nothing; give the path to the .pth file")
    unpickled = False
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            refused = _unsafe_global(str(exc))
            if refused is None and not trust_checkpoint:
                raise
            if not trust_checkpoint:
                raise ModelError(
                    f"expected a weights-only {what} checkpoint at {path}, found one that pickles Python objects "
                    f"({refused}), which torch refuses to load safely; unpickling it can run code from the file: "
                    "if you trust where it came from, pass --trust-checkpoint (trust_checkpoint=True)") from None
            log.warning("unpickling the %s checkpoint %s (trust_checkpoint=True): it is not weights-only and "
                        "loading it can run code from the file", what, path)
            state = torch.load(str(path), map_location="cpu", weights_only=False)
            unpickled = True
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"expected a PyTorch {what} checkpoint at {path}, found a file torch cannot load "
                         f"({type(exc).__name__}: {_first_reason(str(exc))})") from None
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"expected a state dict in {path}, found {type(state).__name__}")
    return state, unpickled


def _unsafe_global(message: str) -> str | None:
    """What a weights-only load refused to import ("GLOBAL module.Name"), or None for other failures."""
    match = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    return f"global {match.group(1)}" if match else None


def _first_reason(message: str) -> str:
    """The informative line of a torch.load error (after "WeightsUnpickler error:"), shortened."""
    tail = message.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return (lines[0] if lines else message.strip())[:120]


def load_into(module, state: dict, path: str | Path, what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)[:160]]
        raise ModelError(f"expected {what} weights in {path}, found incompatible tensors ({first[0].strip()[:160]}); "
                         "check --model matches the checkpoint") from None
