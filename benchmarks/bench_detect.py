"""Benchmark: text-prompt detection, its accuracy where a reference exists, and its time beside segmentation.

Rows (``benchmarks/results/<date>_<cpuN|gpu>_detect.json``, see ``results_file.py``):

``anatomy-accuracy``
    The weight-free ``ct-anatomy`` detector against references on real CT:

    * **bones** on ``totalseg_ct_dicom`` (20 slices, 512 x 512) against TotalSegmentator's labels
      (vertebrae T11/T12, humeri, ribs 6-12; model output, not a manual annotation, resampled in
      world space onto the CT's grid). Dice, and the share of each group found.
    * **lungs** on ``dcmqi_ct3slice`` (3 slices at the lung bases, 512 x 512), the only shared
      CT that shows lung (the sarcoma CTs are cropped around the tumour, the TotalSegmentator slab
      shows under 1 mL). There are no lung labels, so the reference is made here, by another
      method than the detector's: SimpleITK's ``ConnectedThreshold`` (-1100..-400 HU) grown
      from the seed points in ``LUNG_SEEDS`` (picked by looking at slice 1, each checked to lie
      below -400 HU), holes filled slice by slice (vessels). It was inspected as an overlay
      picture: both lung bases, no stomach or oesophageal gas. Both methods threshold the same
      HU, so the Dice checks which components are lung and the left/right split, not the
      boundary.
``anatomy-time``
    Seconds per target (a fresh detector each time: the body outline it needs is included) on
    a 512 x 512 x 100 CT made of the TotalSegmentator CT and its mirror in k, repeated
    (continuous anatomy), and, beside it, the engine's segmentation of the left lung on the
    3-slice CT seeded by the detector's box (the baseline the detection time is compared to).
``learned-time``
    Each learned backend (``grounding-dino``, ``kosmos-2``, ``sam3``) built at its published
    size (``transformers``' default configuration) with random weights, saved and loaded
    through the path real weights take, in its own process: load seconds, seconds per slice
    of a 512 x 512 CT (batch 1 and batch ``--batch``), peak memory, and the scan of a
    512 x 512 x 100 volume projected from the measured time per slice: every ``stride``-th
    slice (25 at stride 4), plus ``stride - 1`` slices either side of each slice with a
    hit (an object spanning 20 slices adds about 20 more). Random weights find random
    things, so only the times mean anything.

Usage: python benchmarks/bench_detect.py [--data ../shared/data] [--backends B ...] [--slices 2] [--batch 4]
                                         [--device cpu|cuda] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from results_file import ResultsFile

BONE_GROUPS = {"vertebrae": [32, 33], "humeri": [69, 70], "ribs": [*range(97, 104), *range(109, 116)]}
#: (i, j) on every slice of dcmqi_ct3slice, inside the lungs (i grows to the patient's left)
LUNG_SEEDS = {"right": [(170, 150)], "left": [(380, 370), (410, 190)]}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def totalseg(data: Path):
    """The TotalSegmentator CT and its labels resampled onto the CT's grid (in world space)."""
    import SimpleITK as sitk

    import medsam3d as m3

    volume = m3.load(data / "totalseg_ct_dicom/example_ct_dicom")
    seg = sitk.ReadImage(str(data / "totalseg_ct_dicom/example_seg_dicom.nii.gz"))
    affine = np.asarray(volume.affine, float)
    matrix = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    ref = sitk.Image([int(n) for n in volume.shape], sitk.sitkUInt8)
    ref.SetSpacing(spacing.tolist())
    ref.SetDirection((matrix / spacing).ravel().tolist())
    ref.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]).tolist())
    labels = sitk.GetArrayFromImage(sitk.Resample(seg, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    return volume, labels.transpose(2, 1, 0)


def lung_reference(volume) -> dict[str, np.ndarray]:
    """Left and right lung by seeded region growing (see the module docstring)."""
    import SimpleITK as sitk
    from scipy import ndimage

    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array.transpose(2, 1, 0)).astype(np.float32))
    out = {}
    for side, seeds in LUNG_SEEDS.items():
        points = [(i, j, k) for i, j in seeds for k in range(volume.shape[2])]
        assert all(volume.array[p] < -400 for p in points), f"a {side} seed lies outside the lung"
        grown = sitk.GetArrayFromImage(sitk.ConnectedThreshold(image, seedList=points, lower=-1100, upper=-400))
        grown = grown.transpose(2, 1, 0).astype(bool)
        out[side] = np.stack([ndimage.binary_fill_holes(grown[:, :, k]) for k in range(grown.shape[2])], axis=2)
    return out


def anatomy(data: Path, results: ResultsFile) -> None:
    import medsam3d as m3
    from medsam3d.detect import load_detector

    volume, labels = totalseg(data)
    bones = load_detector("ct-anatomy").detect(volume, "bones")[0].mask
    ref = np.isin(labels, [v for group in BONE_GROUPS.values() for v in group])
    row = {"kind": "anatomy-accuracy", "case": "totalseg_ct_dicom", "target": "bones", "reference":
           "TotalSegmentator labels (model output)", "dice": round(dice(bones, ref), 4),
           **{f"found_{g}": round(float((bones & np.isin(labels, v)).sum() / max(np.isin(labels, v).sum(), 1)), 4)
              for g, v in BONE_GROUPS.items()}}
    results.add(row)
    print(row)

    thorax = m3.load(data / "dcmqi_ct3slice/ct-3slice")
    refs = lung_reference(thorax)
    det = load_detector("ct-anatomy")
    for target, reference in (("left lung", refs["left"]), ("right lung", refs["right"]),
                              ("lungs", refs["left"] | refs["right"])):
        mask = det.detect(thorax, target)[0].mask
        row = {"kind": "anatomy-accuracy", "case": "dcmqi_ct3slice", "target": target,
               "reference": "seeded region growing (LUNG_SEEDS), holes filled", "dice": round(dice(mask, reference), 4),
               "volume_ml": round(float(mask.sum() * thorax.voxel_volume_mm3 / 1000), 2),
               "reference_ml": round(float(reference.sum() * thorax.voxel_volume_mm3 / 1000), 2)}
        results.add(row)
        print(row)

    big = m3.Volume(np.concatenate([volume.array, volume.array[:, :, ::-1]] * 3, axis=2)[:, :, :100],
                    volume.affine, {"modality": "CT"})
    for target in ("body", "bones", "fat", "lungs", "airways"):
        detector = load_detector("ct-anatomy")
        t0 = time.perf_counter()
        detector.detect(big, target)
        row = {"kind": "anatomy-time", "shape": list(big.shape), "target": target,
               "seconds": round(time.perf_counter() - t0, 2), "peak_mb": round(_peak_mb())}
        results.add(row)
        print(row)
    detector = load_detector("ct-anatomy")
    t0 = time.perf_counter()
    record = m3.run_case(thorax, {"version": 2, "objects": [{"name": "left lung", "text": "left lung"}]},
                         detector=detector)
    seconds = time.perf_counter() - t0
    row = {"kind": "anatomy-time", "shape": list(thorax.shape), "target": "left lung, detected then segmented",
           "detect_s": record.timings.get("detect_s"), "total_s": round(seconds, 2),
           "segment_s": record.timings.get("segment_s"), "peak_mb": round(_peak_mb())}
    results.add(row)
    print(row)


def learned_one(backend: str, n_slices: int, batch: int, device: str, data: Path) -> dict:
    """One backend at full size in this process (see the module docstring)."""
    import medsam3d as m3
    from medsam3d.detect import load_detector
    from medsam3d.detect.hf.common import slice_images
    from medsam3d.detect.hf.random_models import save_random_model
    from medsam3d.preprocess import choose_window

    with tempfile.TemporaryDirectory(prefix=f"bench-{backend}-") as folder:
        t0 = time.perf_counter()
        save_random_model(backend, folder, size="full")
        build_s = time.perf_counter() - t0
        import gc

        gc.collect()
        t0 = time.perf_counter()
        detector = load_detector(backend, weights=folder, device=device)
        load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in detector.model.parameters())
    volume = m3.load(data / "totalseg_ct_dicom/example_ct_dicom")
    images = slice_images([volume.array[:, :, k] for k in range(volume.shape[2])],
                          choose_window(volume, None, None))
    import torch

    def timed(batch_size: int, count: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for n in range(0, count, batch_size):
                detector.answer(images[n:n + batch_size], "tumor")
        return (time.perf_counter() - t0) / count

    timed(1, 1)  # first call: lazy initialisation
    per_slice_1 = timed(1, n_slices)
    per_slice_b = timed(batch, batch) if batch > 1 else per_slice_1
    best = min(per_slice_1, per_slice_b)
    return {"kind": "learned-time", "backend": backend, "parameters": params, "device": device,
            "build_s": round(build_s, 1), "load_s": round(load_s, 1), "slice_shape": list(volume.shape[:2]),
            "s_per_slice_batch1": round(per_slice_1, 3), "batch": batch, "s_per_slice_batch": round(per_slice_b, 3),
            "scan_100_stride4_s": round(25 * best, 1), "scan_100_stride4_plus_20_slice_object_s": round(45 * best, 1),
            "peak_mb": round(_peak_mb())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    parser.add_argument("--backends", nargs="*", default=["grounding-dino", "kosmos-2", "sam3"])
    parser.add_argument("--slices", type=int, default=2, help="slices timed at batch 1 per backend")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-anatomy", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(learned_one(args.one, args.slices, args.batch, args.device, args.data)))
        return
    results = ResultsFile("detect", "detect", device=args.device, path=args.json)
    if not args.no_anatomy:
        anatomy(args.data, results)
    for backend in args.backends:
        proc = subprocess.run([sys.executable, __file__, "--one", backend, "--slices", str(args.slices), "--batch",
                               str(args.batch), "--device", args.device, "--data", str(args.data)],
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            row = {"kind": "learned-time", "backend": backend, "error": proc.stderr.strip().splitlines()[-1:]}
        else:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        results.add(row)
        print(row)
    print(f"wrote {results.finish()}")


if __name__ == "__main__":
    main()
