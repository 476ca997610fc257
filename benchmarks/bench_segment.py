"""Benchmark: medsam3d vs the naive LiteMedSAM loop on the labelled shared cases.

Measures, per case and method, Dice, 95th-percentile Hausdorff distance (MONAI), volume
error, whether the reference volume lies in the result's ``volume_ml_range`` (the spread of
the engine's own alternative segmentations, see the README), wall seconds of the
segmentation (each method first runs once on a small synthetic volume, so model loading,
imports and first calls are excluded for every method), the number of images encoded
(slices plus orthogonal sections), the peak resident memory of the process that ran it
(each run is its own subprocess; read when the method is done, before the scoring, whose
distance transforms need more than the method on large volumes), with ``--device cuda`` the peak GPU memory allocated by
torch, and the SHA-256 of the label map (unchanged masks have unchanged hashes).

Writes the run to one JSON file, ``benchmarks/results/<YYYY-MM-DD>_<cpuN|gpu-name>_<label>.json``
(see ``results_file.py``; ``--json PATH`` writes it there instead), whose rows hold ``case``,
``modality``, ``method``, ``model``, ``weights_sha256``, ``dice``, ``hd95_mm``, ``volume_ml``,
``reference_ml``, ``volume_error`` (a fraction), ``range_holds_reference`` (null for the naive
loop), ``seconds``, ``encoded``, ``peak_mb``, ``peak_gpu_mb``, ``volume_ml_range`` and
``mask_sha256`` (of the label map as uint8 bytes in the input's index order). Prints a row per
run as it goes and, at the end, the table of ``table.py``.

Methods
  naive-3d : the reference LiteMedSAM 3D-box algorithm: from the middle slice of the
             reference box up and down through its z range, every slice encoded alone
             (whole slice, batch 1, PyTorch, segment-anything's own mask decoder), next box =
             previous mask's box + 5 px, falling back to the original box when a mask is empty.
  ours-3d  : medsam3d with the same prompt (middle-slice box + z_range), default settings
             (orthogonal guidance, stride 3, chain vote; ONNX Runtime encoder and decoder on a CPU,
             batches of 8 slices with PyTorch on a GPU).
  ours-2d  : medsam3d with one tight 2D box on the slice where the tumour is largest,
             no z range (the realistic prompt).
  ours-3d-fast, ours-2d-fast : as ours-3d and ours-2d with the speed preset
             PropagationConfig.fast() (the CLI's --fast): blended embeddings, stride 4,
             with a 3D box sections at the key box's centre only and a looser chain cap.
  ours-3d-blend : as ours-3d with PropagationConfig(blend_embeddings=True): where the
             strided walk's neighbours disagree, the slice between is decoded on blended
             neighbour embeddings instead of being encoded (the CLI's --blend-embeddings).
  ours-3d-nozoom, ours-2d-nozoom : as ours-3d and ours-2d on whole slices (zoom=None, the
             CLI's --no-zoom) instead of a crop around the prompt.

``--organs`` runs ORGAN_CASES instead of the tumours (see there).

``--model NAME --checkpoint PATH`` runs the ``ours-*`` methods with another model of
``medsam3d.models`` (``medsam``, ``sam-vit-b/l/h``, or LiteMedSAM with other weights); the
naive loop stays the reference LiteMedSAM algorithm, so every figure is still against it.
Each row names the model and its weights' SHA-256.

The label of the results file: ``tumours`` (the default cases) or ``organs``, or ``subset``
with ``--cases``; ``-<model>`` and ``-<mm>mm`` are added for another model or ``--slice-mm``;
``--label`` sets it.

Usage: python benchmarks/bench_segment.py [--data ../shared/data] [--cases NAME ... | --organs] [--methods M ...]
                                          [--device cpu|cuda] [--slice-mm MM] [--label LABEL] [--json out.json]
                                          [--model NAME --checkpoint PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import ResultsFile
from table import markdown_table

CASES = {
    "sts041-ct": ("ibsi_sts_041/nifti/CT_image.nii.gz", "ibsi_sts_041/nifti/CT_mask.nii.gz"),
    "sts041-mr": ("ibsi_sts_041/nifti/MR_T1_image.nii.gz", "ibsi_sts_041/nifti/MR_T1_mask.nii.gz"),
    "sts001-ct": ("ibsi_sts_more/STS_001/CT_image.nii.gz", "ibsi_sts_more/STS_001/CT_mask.nii.gz"),
    "sts001-mr": ("ibsi_sts_more/STS_001/MR_T1_image.nii.gz", "ibsi_sts_more/STS_001/MR_T1_mask.nii.gz"),
    "sts010-ct": ("ibsi_sts_more/STS_010/CT_image.nii.gz", "ibsi_sts_more/STS_010/CT_mask.nii.gz"),
    "sts010-mr": ("ibsi_sts_more/STS_010/MR_T1_image.nii.gz", "ibsi_sts_more/STS_010/MR_T1_mask.nii.gz"),
    "brain2-mr": ("pyradiomics/brain2_image.nrrd", "pyradiomics/brain2_label.nrrd"),
    "breast1-mr": ("pyradiomics/breast1_image.nrrd", "pyradiomics/breast1_label.nrrd"),
}
#: organs and vessels of one abdominal CT (512 x 512 x 20, 0.98 x 0.98 x 2 mm; ``--organs``), against
#: TotalSegmentator's labels (model output, not a manual reference; value = the label's index there).
#: Not in the default run: the engine's targets are tumours'. Most reach the slab's ends, where the
#: labels are truncated; the 3D box's z range then spans the whole slab.
_TS = ("totalseg_ct_dicom/example_ct_dicom", "totalseg_ct_dicom/example_seg_dicom.nii.gz")
ORGAN_CASES = {f"ts-{name}-ct": (*_TS, label) for name, label in (
    ("spleen", 1), ("liver", 5), ("stomach", 6), ("pancreas", 7), ("adrenal-r", 8), ("colon", 20),
    ("vertebra-t12", 32), ("aorta", 52), ("ivc", 63), ("portal-vein", 64), ("spinal-cord", 79))}
METHODS = ("naive-3d", "ours-3d", "ours-2d", "ours-3d-fast", "ours-2d-fast", "ours-3d-blend", "ours-3d-nozoom",
           "ours-2d-nozoom")
DEFAULT_METHODS = METHODS[:5]


def bbox2d(mask):
    ii = np.flatnonzero(mask.any(axis=1))
    jj = np.flatnonzero(mask.any(axis=0))
    return [int(ii[0]), int(jj[0]), int(ii[-1]), int(jj[-1])]


def prompts_for(ref: np.ndarray) -> dict[str, dict]:
    ks = np.flatnonzero(ref.any(axis=(0, 1)))
    k_mid = int((ks[0] + ks[-1]) // 2)
    if not ref[:, :, k_mid].any():
        k_mid = int(ks[np.argmin(np.abs(ks - k_mid))])
    k_big = int(np.argmax(ref.sum(axis=(0, 1))))
    return {
        "3d": {"version": 1, "objects": [{"name": "tumor", "slice": k_mid, "box": bbox2d(ref[:, :, k_mid]),
                                          "z_range": [int(ks[0]), int(ks[-1])]}]},
        "2d": {"version": 1, "objects": [{"name": "tumor", "slice": k_big, "box": bbox2d(ref[:, :, k_big])}]},
    }


def naive_loop(model, images: np.ndarray, prompt: dict) -> np.ndarray:
    """The reference algorithm (see module docstring); images is the windowed (I, J, K) volume."""
    obj = prompt["objects"][0]
    k_mid, box0 = obj["slice"], obj["box"]
    z0, z1 = obj["z_range"]
    I, J, _ = images.shape
    out = np.zeros(images.shape, bool)

    def run(k, box):
        features = model.encode([images[:, :, k].T])[0]
        mask, _ = model.decode(features, np.array([box]))
        return mask[0].T

    out[:, :, k_mid] = run(k_mid, box0)
    for direction in (+1, -1):
        prev = out[:, :, k_mid]
        k = k_mid + direction
        while z0 <= k <= z1:
            if prev.any():
                b = bbox2d(prev)
                box = [max(0, b[0] - 5), max(0, b[1] - 5), min(I - 1, b[2] + 5), min(J - 1, b[3] + 5)]
            else:
                box = box0
            out[:, :, k] = run(k, box)
            prev = out[:, :, k]
            k += direction
    from medsam3d.fuse import largest_component

    return largest_component(out)


def _warm_up(model, run) -> None:
    """The method once on a small synthetic volume (a noisy ball, 5 slices, with a 3D box) before
    the timed run, so that one-off costs are charged to no method: loading the model, a GPU's
    start-up (CUDA context, kernel selection), the first calls of each runtime and the modules
    imported on first use (nibabel, for a NRRD input, took 0.5 s of medsam3d's first call)."""
    import medsam3d as m3

    ii, jj, kk = np.mgrid[:48, :48, :7]
    ball = ((ii - 24) ** 2 + (jj - 24) ** 2 + 9 * (kk - 3) ** 2) < 12**2
    array = 100.0 * ball + np.random.default_rng(0).normal(0.0, 10.0, ball.shape)
    volume = m3.Volume(array.astype(np.float32), np.diag([1.0, 1.0, 3.0, 1.0]))
    run(volume, {"version": 1, "objects": [{"name": "ball", "slice": 3, "box": [12, 12, 36, 36], "z_range": [1, 5]}]})


def _sync(model) -> None:
    if str(getattr(model, "device", "cpu")).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def resample_case(image, ref: np.ndarray, slice_mm: float | None = None, matrix: int | None = None,
                  dtype=np.float32):
    """The case resampled to ``slice_mm`` slices along k and/or a ``matrix`` x ``matrix`` grid in
    plane, over the same field of view (linear for the image, the reference's linear
    interpolation > 0.5 for the mask), its voxels of type ``dtype``."""
    from scipy import ndimage

    import medsam3d as m3

    old = np.array(image.shape, float)
    new = old.copy()
    if slice_mm:
        new[2] = round(old[2] * image.spacing[2] / slice_mm)
    if matrix:
        new[:2] = matrix
    factor = tuple(new / old)
    array = ndimage.zoom(image.array.astype(np.float32), factor, order=1, grid_mode=True, mode="nearest")
    if np.issubdtype(dtype, np.integer):
        array = np.round(array)
    mask = ndimage.zoom(ref.astype(np.float32), factor, order=1, grid_mode=True, mode="nearest") > 0.5
    affine = np.array(image.affine)
    for axis in range(3):
        step = old[axis] / new[axis]  # new voxel n sits at old index (n + 0.5) * step - 0.5
        affine[:3, 3] += affine[:3, axis] * (0.5 * step - 0.5)
        affine[:3, axis] *= step
    return m3.Volume(array.astype(dtype), affine, image.meta), mask


def resampled_files(data: Path, case: str, slice_mm: float | None, matrix: int | None,
                    cases: dict | None = None) -> tuple[Path, Path]:
    """The case resampled (:func:`resample_case`) and written once to a temporary folder, so that
    the measured process reads it as a user's file and its peak memory is the method's alone. A
    CT on a ``matrix`` grid is stored as int16, as clinical CT comes."""
    import tempfile

    import medsam3d as m3

    source = hashlib.sha256(str(Path(data).resolve()).encode()).hexdigest()[:8]  # another --data: another file
    folder = Path(tempfile.gettempdir()) / "medsam3d-bench" / f"{case}-{slice_mm or 0:g}mm-{matrix or 0}px-{source}"
    image_file, mask_file = folder / "image.nii.gz", folder / "mask.nii.gz"
    if not mask_file.is_file():
        image_path, mask_path, *label = {**CASES, **ORGAN_CASES, **(cases or {})}[case]
        image = m3.load(data / image_path)
        ref = m3.load_labels(data / mask_path, image).array == (label[0] if label else 1)
        dtype = np.int16 if matrix and case.endswith("-ct") else np.float32
        image, ref = resample_case(image, ref, slice_mm, matrix, dtype)
        folder.mkdir(parents=True, exist_ok=True)
        from medsam3d.io import to_nibabel

        for volume, path in ((image, image_file), (m3.Volume(ref.astype(np.uint8), image.affine), mask_file)):
            partial = path.with_name("partial-" + path.name)  # whole files only: an interrupted run leaves none
            to_nibabel(volume).to_filename(str(partial))
            os.replace(partial, path)
    return image_file, mask_file


def run_one(data: Path, case: str, method: str, device: str = "cpu", slice_mm: float | None = None,
            model_name: str = "litemedsam", checkpoint: Path | None = None, cases: dict | None = None,
            model_options: dict | None = None, matrix: int | None = None) -> dict:
    """One case and method, measured (see the module doc). ``cases`` adds case tables to CASES and
    ORGAN_CASES (``bench_generalise.py``'s); ``model_options`` go to ``load_model`` for the ``ours-*``
    methods (e.g. LiteMedSAM's ``decoder_weights``)."""
    import medsam3d as m3
    from medsam3d.models import load_model
    from medsam3d.pipeline import segment
    from medsam3d.preprocess import apply_window, choose_window

    image_path, mask_path, *label = {**CASES, **ORGAN_CASES, **(cases or {})}[case]
    if slice_mm or matrix:
        image_file, mask_file = resampled_files(data, case, slice_mm, matrix, cases)
        image = m3.load(image_file)
        ref = m3.load_labels(mask_file, image).array == 1
    else:
        image = m3.load(data / image_path)
        ref = m3.load_labels(data / mask_path, image).array == (label[0] if label else 1)
    prompt = prompts_for(ref)["2d" if "-2d" in method else "3d"]
    from medsam3d.propagate import PropagationConfig

    config = PropagationConfig.fast() if method.endswith("-fast") else PropagationConfig(
        blend_embeddings=method.endswith("-blend"))
    if method == "naive-3d":
        from medsam3d.models.litemedsam import LiteMedSAM

        model = LiteMedSAM(device=device, runtime="torch", decoder="reference")  # segment-anything's decoder

        def run(volume, prompt):
            return naive_loop(model, apply_window(volume.array, choose_window(volume)), prompt)

        _warm_up(model, run)
        t0 = time.perf_counter()
        pred = run(image, prompt)
        _sync(model)
        seconds = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the method's, not the scoring's
        labels = pred
        encoded = prompt["objects"][0]["z_range"][1] - prompt["objects"][0]["z_range"][0] + 1
        spread = None
    else:
        model = load_model(model_name, checkpoint=checkpoint, device=device, **(model_options or {}))

        def run(volume, prompt):
            zoom = None if method.endswith("-nozoom") else 1.0
            return segment(volume, prompt, model=model, config=config, zoom=zoom)

        _warm_up(model, run)
        t0 = time.perf_counter()
        result = run(image, prompt)
        _sync(model)
        seconds = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the method's, not the scoring's
        labels = result.labels.array
        pred = labels == 1
        encoded = result.encoded_slices + result.settings["encoded_sections"]
        from medsam3d.record import object_records

        spread = object_records(result.labels, result.objects)[0].volume_ml_range
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    p = torch.from_numpy(pred[None, None].astype(np.float32))
    r = torch.from_numpy(ref[None, None].astype(np.float32))
    dice = float(compute_dice(p, r, include_background=True)[0, 0])
    hd95 = float(compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                            spacing=list(image.spacing))[0, 0]) if pred.any() else float("nan")
    vol_pred = pred.sum() * image.voxel_volume_mm3 / 1000
    vol_ref = ref.sum() * image.voxel_volume_mm3 / 1000
    return {"case": case, "modality": "MR" if case.endswith("-mr") else "CT", "method": method,
            "model": model.name, "weights_sha256": model.weights_sha256,
            "dice": round(dice, 4), "hd95_mm": round(hd95, 2),
            "volume_ml": round(vol_pred, 2), "reference_ml": round(vol_ref, 2),
            "volume_error": round((vol_pred - vol_ref) / vol_ref, 4),
            "range_holds_reference": bool(spread[0] <= vol_ref <= spread[1]) if spread else None,
            "seconds": round(seconds, 2), "encoded": int(encoded),
            "peak_mb": round(peak_mb, 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.startswith("cuda") else None,
            "volume_ml_range": [round(v, 2) for v in spread] if spread else None,
            "mask_sha256": hashlib.sha256(np.ascontiguousarray(labels, dtype=np.uint8).tobytes()).hexdigest()}


def _in_range(row: dict) -> str:
    """Whether the reference volume lies in the result's ``volume_ml_range`` (its vote's spread)."""
    return "-" if row.get("range_holds_reference") is None else "in" if row["range_holds_reference"] else "out"


def _label(args) -> str:
    """The results file's label (see the module doc)."""
    if args.label:
        return args.label
    label = "organs" if args.organs else "tumours" if args.cases == list(CASES) else "subset"
    if args.model != "litemedsam" or args.checkpoint:
        label += f"-{args.model}"
    if args.slice_mm:
        label += f"-{args.slice_mm:g}mm"
    if args.matrix:
        label += f"-{args.matrix}px"
    return label


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=[*CASES, *ORGAN_CASES])
    parser.add_argument("--organs", action="store_true", help="the organs and vessels of ORGAN_CASES instead")
    parser.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--label", help="the results file's label (default: see the module doc)")
    parser.add_argument("--json", type=Path, help="write the results file here instead of benchmarks/results/")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where every method runs")
    parser.add_argument("--slice-mm", type=float, help="resample every case along k to slices this thick first "
                        "(e.g. 2: the 3.27 mm sarcomas become 50-slice tumours)")
    parser.add_argument("--matrix", type=int, help="resample every case in plane to MATRIX x MATRIX over the same field "
                        "of view first (a CT then stored as int16): with --slice-mm 1 --matrix 512, clinical thin-slice CT")
    parser.add_argument("--model", default="litemedsam", help="the model of the ours-* methods (see medsam3d.models)")
    parser.add_argument("--checkpoint", type=Path, help="its weights file (required for medsam and sam-*)")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.organs:
        args.cases = list(ORGAN_CASES)
    if args.one:
        print(json.dumps(run_one(args.data, *args.one, device=args.device, slice_mm=args.slice_mm,
                                 model_name=args.model, checkpoint=args.checkpoint, matrix=args.matrix)))
        return 0
    if not args.data.is_dir():
        print(f"shared data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    if args.checkpoint is not None and not args.checkpoint.is_file():
        print(f"expected a weights file at {args.checkpoint}, found none; check --checkpoint", file=sys.stderr)
        return 2
    if args.model != "litemedsam" and args.checkpoint is None:
        print(f"expected --checkpoint PATH for model '{args.model}' (its weights are not bundled), found none",
              file=sys.stderr)
        return 2
    model_args = ["--model", args.model] + (["--checkpoint", str(args.checkpoint.resolve())] if args.checkpoint else [])
    results = ResultsFile("segment", _label(args), device=args.device, path=args.json)
    w = max(11, *map(len, args.cases))
    header = (f"{'case':<{w}} {'method':<14} {'dice':>6} {'hd95mm':>7} {'vol_mL':>8} {'ref_mL':>8} {'vol_err':>8} "
              f"{'range':>5} {'sec':>7} {'enc':>4} {'peakMB':>7}")
    if args.model != "litemedsam" or args.checkpoint:
        print(f"# ours-* methods: model {args.model}, weights {args.checkpoint or 'bundled'}; naive-3d: LiteMedSAM")
    print(header, flush=True)
    for case in args.cases:
        if args.slice_mm or args.matrix:  # once per case, outside the measured processes
            resampled_files(args.data, case, args.slice_mm, args.matrix)
        for method in args.methods:
            thinner = (["--slice-mm", str(args.slice_mm)] if args.slice_mm else []) + (
                ["--matrix", str(args.matrix)] if args.matrix else [])
            out = subprocess.run([sys.executable, __file__, "--data", str(args.data), "--device", args.device,
                                  *thinner, *model_args, "--one", case, method], check=False, capture_output=True,
                                 text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if out.returncode != 0:
                print(f"{case:<{w}} {method:<14} FAILED: {out.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results.add(row)
            print(f"{case:<{w}} {method:<14} {row['dice']:6.3f} {row['hd95_mm']:7.1f} {row['volume_ml']:8.2f} "
                  f"{row['reference_ml']:8.2f} {row['volume_error']:+8.1%} {_in_range(row):>5} {row['seconds']:7.1f} "
                  f"{row['encoded']:4d} {row['peak_mb']:7.0f}"
                  + (f" gpu {row['peak_gpu_mb']:.0f} MB" if row.get("peak_gpu_mb") else ""), flush=True)
    path = results.finish()
    if results.doc["rows"]:
        print("\n" + markdown_table(results.doc), end="")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
