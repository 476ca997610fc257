"""Benchmark: how the result depends on the prompt (Dice and volume error, no timings).

On the labelled shared cases of ``bench_segment.py`` (the same prompts are derived from the
reference masks), medsam3d with the default settings is run with variants of the prompt:

  exact    : the benchmark's prompt (3D: middle-slice box + z range; 2D: the tight box on the
             slice where the tumour is largest)
  loose10  : every side of the box moved out by 10 % of the box's size
  tight5, tight10 : every side moved in by 5 % or 10 %
  shift10  : the box shifted by 10 % of its size along i and j
  loose10z : (3D only) loose10, and the z range one slice longer at each end
  two      : (2D only) two tight boxes, at a third and two thirds of the tumour's slices
  three    : (2D only) three tight boxes, at a quarter, the largest slice and three quarters

One process loads the model once; identical slice images are encoded once (the variants share
most slices), which changes no result. Prints per case ``Dice/volume error`` and per modality
the mean Dice and median |volume error|, and writes the run to one JSON file,
``benchmarks/results/<YYYY-MM-DD>_<cpuN|gpu-name>_prompts-<kind>.json`` (see ``results_file.py``),
a row per case and variant: ``case``, ``modality``, ``kind``, ``variant``, ``dice``,
``volume_error`` and ``mask_sha256``.

Usage: python benchmarks/bench_prompts.py [--data ../shared/data] [--kind 2d|3d] [--variants V ...]
                                          [--cases NAME ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_segment import CASES, bbox2d, prompts_for  # noqa: E402
from results_file import ResultsFile  # noqa: E402

VARIANTS = ("exact", "loose10", "tight5", "tight10", "shift10", "loose10z", "two", "three")


def variant_prompt(ref: np.ndarray, kind: str, variant: str) -> dict | None:
    """The prompt document of ``variant`` (see the module doc), or None where it does not apply."""
    doc = copy.deepcopy(prompts_for(ref)[kind])
    obj = doc["objects"][0]
    I, J, K = ref.shape
    ks = np.flatnonzero(ref.any(axis=(0, 1)))
    if variant in ("two", "three"):
        if kind != "2d":
            return None
        z0, z1 = int(ks[0]), int(ks[-1])
        picks = ([z0 + (z1 - z0) / 3, z0 + 2 * (z1 - z0) / 3] if variant == "two"
                 else [z0 + (z1 - z0) / 4, obj["slice"], z0 + 3 * (z1 - z0) / 4])
        slices = sorted({int(k) for k in picks if ref[:, :, int(k)].any()})
        doc["objects"] = [{"name": "tumor", "slice": k, "box": bbox2d(ref[:, :, k])} for k in slices]
        return doc
    if variant == "loose10z" and kind != "3d":
        return None
    i0, j0, i1, j1 = obj["box"]
    wi, wj = i1 - i0 + 1, j1 - j0 + 1
    grow = {"exact": 0.0, "loose10": 0.1, "loose10z": 0.1, "tight5": -0.05, "tight10": -0.1, "shift10": 0.0}[variant]
    shift = 0.1 if variant == "shift10" else 0.0
    box = [i0 - grow * wi + shift * wi, j0 - grow * wj + shift * wj, i1 + grow * wi + shift * wi,
           j1 + grow * wj + shift * wj]
    box = [int(round(v)) for v in box]
    obj["box"] = [max(0, box[0]), max(0, box[1]), min(I - 1, box[2]), min(J - 1, box[3])]
    if variant == "loose10z":
        obj["z_range"] = [max(0, obj["z_range"][0] - 1), min(K - 1, obj["z_range"][1] + 1)]
    return doc


def _cached(model):
    """``model`` whose encode() returns the stored embedding of an image it has seen (same bytes)."""
    encode, store = model.encode, {}

    def cached(images):
        keys = [hashlib.sha1(np.ascontiguousarray(im, np.float32).tobytes() + str(np.shape(im)).encode()).hexdigest()
                for im in images]
        todo = [n for n, key in enumerate(keys) if key not in store]
        if todo:
            for n, features in zip(todo, encode([images[n] for n in todo])):
                store[keys[n]] = features
        return [store[key] for key in keys]

    model.encode = cached
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--kind", choices=["2d", "3d"], default="2d")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", type=Path, help="write the results file here instead of benchmarks/results/")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"shared data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    import medsam3d as m3
    from medsam3d.models import load_model

    model = _cached(load_model("litemedsam"))
    results = ResultsFile("prompts", f"prompts-{args.kind}", path=args.json)
    cases = {}
    for case in args.cases:
        image_path, mask_path = CASES[case]
        image = m3.load(args.data / image_path)
        cases[case] = (image, m3.load_labels(args.data / mask_path, image).array == 1)
    print(f"{args.kind} box, defaults; per case: Dice/volume error", flush=True)
    for variant in args.variants:
        rows = []
        for case, (image, ref) in cases.items():
            doc = variant_prompt(ref, args.kind, variant)
            if doc is None:
                continue
            labels = m3.segment(image, doc, model=model).labels.array
            pred = labels == 1
            rows.append((case, 2 * (pred & ref).sum() / (pred.sum() + ref.sum()), (pred.sum() - ref.sum()) / ref.sum()))
            results.add({"case": case, "modality": "MR" if case.endswith("-mr") else "CT", "kind": args.kind,
                         "variant": variant, "dice": round(float(rows[-1][1]), 4),
                         "volume_error": round(float(rows[-1][2]), 4),
                         "mask_sha256": hashlib.sha256(np.ascontiguousarray(labels, np.uint8).tobytes()).hexdigest()})
        if not rows:
            continue
        means = []
        for group in ("ct", "mr"):
            sel = [r for r in rows if r[0].endswith(group)]
            if sel:
                means.append(f"{group.upper()} {np.mean([r[1] for r in sel]):.3f} / "
                             f"{np.median([abs(r[2]) for r in sel]):.0%}")
        print(f"{variant:<9} " + " ".join(f"{c}={d:.3f}/{e:+.0%}" for c, d, e in rows) + "  |  " + "  ".join(means),
              flush=True)
    print(f"results: {results.finish()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
