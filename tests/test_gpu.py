"""The CUDA path, where a GPU exists (CI has none: these tests skip there, with the reason)."""

import numpy as np
import pytest
import torch

import medsam3d as m3
from medsam3d.models import load_model

from conftest import EXAMPLES, dice

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (none here); the CPU path is tested everywhere")

CASE = EXAMPLES / "sts041_ct"


@pytest.fixture(scope="module")
def gpu_model():
    return load_model("litemedsam", device="cuda")


def test_cuda_encoder_and_decoder_agree_with_cpu(litemedsam, gpu_model):
    assert gpu_model.device == "cuda" and gpu_model.runtime == "torch"
    image = m3.load(CASE / "CT_image.nii.gz").array[:, :, 23].T.astype(np.float32)
    image = np.clip((image + 160) / 400, 0, 1)
    cpu_f, gpu_f = litemedsam.encode([image])[0], gpu_model.encode([image])[0]
    # TF32 matrix products on the GPU: close, not bit-equal
    assert np.allclose(cpu_f[0], gpu_f[0].float().cpu().numpy(), atol=5e-2)
    box = np.array([[57, 57, 100, 109]], np.float32)
    m_cpu, s_cpu = litemedsam.decode(cpu_f, box)
    m_gpu, s_gpu = gpu_model.decode(gpu_f, box)
    assert dice(m_cpu[0], m_gpu[0]) >= 0.98 and abs(float(s_cpu[0]) - float(s_gpu[0])) < 0.02


def test_segment_on_cuda_matches_cpu(litemedsam, gpu_model):
    image = m3.load(CASE / "CT_image.nii.gz")
    prompts = {"version": 1, "objects": [{"name": "sarcoma", "slice": 23, "box": [57, 57, 100, 109],
                                          "z_range": [17, 29]}]}
    cpu = m3.segment(image, prompts, model=litemedsam)
    gpu = m3.segment(image, prompts, model=gpu_model)
    assert gpu.labels.same_grid(image) and gpu.model["device"] == "cuda"
    assert gpu.objects[0]["slices"] == [17, 29] and gpu.encoded_slices <= 13
    assert dice(cpu.labels.array == 1, gpu.labels.array == 1) >= 0.95
