"""Studies per hour: ``medsam3d batch`` (local engine, 1 and 2 workers; a local Ray cluster)
beside a plain loop of ``medsam3d segment`` calls over the same studies, in the same run.

Each configuration is timed as a user runs it: one command from a fresh process, imports and
model loads included. The studies are shared sarcoma cases (CT and MR), each prompted with
its reference's 3D box (a box on the largest slice and the slice range). Every row gives the
wall time, studies per hour, the peak resident memory of a worker (the loop: of the largest
``segment`` process) and the Dice of each study against its reference, so that faster is
never bought with different masks.

    python benchmarks/bench_batch.py [--data ../shared/data] [--configs loop local1 local2 ray2] [--fast]

Writes ``benchmarks/results/<date>_<cpuN>_batch.json`` (see ``results_file.py``).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import ResultsFile  # noqa: E402

CASES = {  # case -> (image, reference mask), relative to the shared data folder
    "sts041-ct": ("ibsi_sts_041/nifti/CT_image.nii.gz", "ibsi_sts_041/nifti/CT_mask.nii.gz"),
    "sts041-mr": ("ibsi_sts_041/nifti/MR_T1_image.nii.gz", "ibsi_sts_041/nifti/MR_T1_mask.nii.gz"),
    "sts010-ct": ("ibsi_sts_more/STS_010/CT_image.nii.gz", "ibsi_sts_more/STS_010/CT_mask.nii.gz"),
    "sts010-mr": ("ibsi_sts_more/STS_010/MR_T1_image.nii.gz", "ibsi_sts_more/STS_010/MR_T1_mask.nii.gz"),
}
CONFIGS = ("loop", "local1", "local2", "ray2")


def _prompt_file(mask_path: Path, out: Path) -> Path:
    """The reference's 3D box: one box on its largest axial slice and its slice range."""
    import medsam3d as m3

    ref = m3.load_labels(mask_path).array == 1
    k = int(np.argmax(ref.sum(axis=(0, 1))))
    i, j = np.nonzero(ref[:, :, k])
    ks = np.nonzero(ref.any(axis=(0, 1)))[0]
    doc = {"version": 1, "objects": [{"name": "tumour", "slice": k, "box": [int(i.min()), int(j.min()),
                                                                             int(i.max()), int(j.max())],
                                      "z_range": [int(ks.min()), int(ks.max())]}]}
    out.write_text(json.dumps(doc))
    return out


def _dice(labels_path: Path, mask_path: Path) -> float:
    import medsam3d as m3

    ref = m3.load_labels(mask_path).array == 1
    pred = m3.load_labels(labels_path, m3.load_labels(mask_path)).array == 1
    return float(2 * (pred & ref).sum() / (pred.sum() + ref.sum()))


def _children_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def _run(command: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(command, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[2:4])} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--fast", action="store_true", help="the engine's speed preset in every configuration")
    parser.add_argument("--json", type=Path, help="write the results file here instead of benchmarks/results/")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"shared data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    results = ResultsFile("batch", "batch" + ("-fast" if args.fast else ""), path=args.json)
    medsam3d = [sys.executable, "-m", "medsam3d"]
    fast = ["--fast"] if args.fast else []
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        tmp = Path(tmp)
        manifest = tmp / "manifest.csv"
        with open(manifest, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["case_id", "patient_id", "timepoint", "image", "prompts"])
            for case in args.cases:
                image, mask = CASES[case]
                prompt = _prompt_file(args.data / mask, tmp / f"{case}.json")
                writer.writerow([case, case, "1", str(args.data / image), str(prompt)])
        n = len(args.cases)
        print(f"{n} studies ({', '.join(args.cases)}); per configuration: wall s, studies/h, worker peak MB, Dice",
              flush=True)
        baseline = None
        for config in args.configs:
            out = tmp / config
            peak_before = _children_peak_mb()
            if config == "loop":
                out.mkdir()
                t0 = time.perf_counter()
                for case in args.cases:
                    _run([*medsam3d, "segment", str(args.data / CASES[case][0]), "--prompts", str(tmp / f"{case}.json"),
                          "-o", str(out / f"{case}.seg.nrrd"), "--measure", "--no-progress", *fast])
                seconds = time.perf_counter() - t0
                peak = _children_peak_mb()
                labels = {case: out / f"{case}.seg.nrrd" for case in args.cases}
            else:
                workers = int(config[-1])
                engine = "ray" if config.startswith("ray") else "local"
                seconds = _run([*medsam3d, "batch", str(manifest), "-o", str(out), "--engine", engine, "--workers",
                                str(workers), "--no-progress", *fast])
                doc = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
                peaks = [s["timings"].get("worker_peak_rss_mb") for s in doc.get("studies", []) if s.get("timings")]
                peak = max([p for p in peaks if p] or [_children_peak_mb()])
                labels = {case: out / case / "labels.seg.nrrd" for case in args.cases}
            dice = {case: round(_dice(path, args.data / CASES[case][1]), 4) if path.is_file() else None
                    for case, path in labels.items()}
            per_hour = 3600.0 * n / seconds
            baseline = baseline or (per_hour if config == "loop" else None)
            row = {"config": config, "studies": n, "fast": args.fast, "seconds": round(seconds, 1),
                   "studies_per_hour": round(per_hour, 1), "peak_rss_mb": round(peak, 1), "dice": dice,
                   "vs_loop": round(per_hour / baseline, 2) if baseline else None,
                   "peak_before_mb": round(peak_before, 1)}
            results.add(row)
            print(f"{config:<7} {seconds:7.1f} s  {per_hour:6.1f} studies/h  "
                  f"{'x%.2f vs loop' % row['vs_loop'] if row['vs_loop'] else '':<14} peak {peak:6.0f} MB  "
                  + " ".join(f"{c}={d}" for c, d in dice.items()), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    print(f"results: {results.finish()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
