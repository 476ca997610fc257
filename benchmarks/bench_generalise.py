"""Benchmark: generalisation, on tumours split by patient into a tuning half and a check half, plus organs.

The split (issue 27), fixed before anything was run or tuned and recorded here (``SPLIT``) and in
every results file:

* Patients, not volumes, are split: a patient's CT and MR tumour (the same GTV) always fall in
  the same half, so no half sees the other's tumour in another modality.
* The five patients the engine's defaults were already chosen on (``bench_segment.py``'s CASES:
  STS_041, STS_001, STS_010 and the small pyradiomics lesions brain2 and breast1) go to the
  tuning half: a check half that held them would overstate the engine.
* The 14 patients of ``ibsi_sts_tune`` with a CT or MR tumour are sorted by tumour volume within
  two strata, CT + MR patients (8) and MR-only patients (6), and paired neighbour by neighbour
  (``PAIRS``); a coin of ``numpy.random.default_rng(SEED)`` per pair sends one of each pair to
  each half. Both halves thus get CT and MR tumours and the same spread of sizes (78 mL to
  1.5 L); the check half has 4 CT and 7 MR tumours from 7 patients, none seen before.
  STS_009 and STS_020 have PET only and are left out (``EXCLUDED``): the engine is not tuned for
  PET and their masks are the CT/MR GTV carried onto the PET grid.
* ``HOLD_OUT``: two tuning-half patients (a second draw of the same generator) held back from
  fitting by ``finetune_decoder.py`` for its early stopping; they stay in the tuning half here.

Organs are part of every run (``ORGANS``, TotalSegmentator's labels of the abdominal CT DICOM,
a model's output, not a manual reference; the slab holds no kidney): spleen, liver and stomach
(the issue's targets) and the 3D boxes that hold a neighbouring organ, measured on these labels
with the protocol's 3D box: the spleen's box holds 29,350 stomach voxels (22 % of the spleen's
own), the stomach's holds colon and aorta, the colon's holds stomach (38 % of its own) and the
portal vein's box holds more liver than portal vein. Organ settings are chosen on the other
structures of the same CT (``ORGANS_TUNE``: aorta, inferior vena cava, spinal cord, pancreas,
right adrenal gland, vertebra T12; half ``organs-tune``), never on ``ORGANS``. One patient's
organs are a weak split: a setting chosen on its vessels is checked on its organs, not on
another body.

``--slice-mm MM --matrix N`` resample the cases first (``bench_segment.resampled_files``):
``--slice-mm 0.86 --matrix 512`` turns STS_005's CT into the issue's clinical 512 x 512 x 300
CT (int16, a 178-slice tumour).

Protocols (``bench_segment.py``'s methods, run through its ``run_one``, one subprocess each):
``naive-3d`` the reference LiteMedSAM loop (the baseline, measured in the same run), ``ours-3d``
the reference's 3D box (middle-slice box + z range), ``ours-2d`` one tight box on the largest
slice. ``--weights original|adapted|both`` runs the ``ours-*`` methods with the bundled
decoder, with adapted decoder weights (``--adapted PATH``, from ``finetune_decoder.py``) or
both, side by side; the naive loop always runs the original LiteMedSAM.

Reported per half (tune / check / organs-tune / organs) and modality, per method and weights: mean Dice, median
absolute and median signed volume error, how many cases fall below the naive loop's Dice, and
the median per-case ratio of seconds to the naive loop's. Rows as ``bench_segment.py``'s, plus
``half``, ``patient`` and ``weights``; the results file (``benchmarks/results/``, label
``generalise-<half>``) also records the split.

Usage: python benchmarks/bench_generalise.py [--data ../shared/data] [--half tune|check|all] [--cases NAME ...]
           [--methods naive-3d ours-3d ours-2d] [--weights original|adapted|both --adapted PATH] [--no-organs]
       python benchmarks/bench_generalise.py --summarise RESULTS.json ...   (the tables of earlier runs)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_segment
from results_file import ResultsFile

SEED = 27
#: the patients bench_segment.py's defaults were chosen on: tuning half by rule
ALREADY_TUNED = ("STS_041", "STS_001", "STS_010", "brain2", "breast1")
#: ibsi_sts_tune patients paired by tumour volume within their stratum (CT + MR, then MR only)
PAIRS = (("STS_024", "STS_015"), ("STS_018", "STS_023"), ("STS_004", "STS_026"), ("STS_005", "STS_022"),
         ("STS_007", "STS_016"), ("STS_011", "STS_017"), ("STS_021", "STS_013"))
#: the outcome of one coin per pair (``split_patients()``), fixed here before any run
SPLIT = {
    "tune": ALREADY_TUNED + ("STS_024", "STS_023", "STS_004", "STS_005", "STS_016", "STS_011", "STS_013"),
    "check": ("STS_015", "STS_018", "STS_026", "STS_022", "STS_007", "STS_017", "STS_021"),
}
HOLD_OUT = ("STS_005", "STS_013")
EXCLUDED = {"STS_009": "PET only", "STS_020": "PET only"}
#: the modalities with a tumour mask and image per ibsi_sts_tune patient (PET left out)
_TUNE_SET = {"STS_004": "CT MR", "STS_005": "CT MR", "STS_007": "MR", "STS_011": "MR", "STS_013": "MR",
             "STS_015": "CT MR", "STS_016": "MR", "STS_017": "MR", "STS_018": "CT MR", "STS_021": "MR",
             "STS_022": "CT MR", "STS_023": "CT MR", "STS_024": "CT MR", "STS_026": "CT MR"}


def split_patients(seed: int = SEED) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    """The split and the hold-out as drawn (the constants above must equal it; a test of the
    script's own consistency, run by ``--check-split``)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tune, check = [], []
    for a, b in PAIRS:
        first = int(rng.integers(2)) == 0
        tune.append(a if first else b)
        check.append(b if first else a)
    hold = tuple(str(p) for p in rng.choice(sorted(tune), 2, replace=False))
    return {"tune": ALREADY_TUNED + tuple(tune), "check": tuple(check)}, hold


def _tumour_cases() -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    cases, patient = {}, {}
    for name, files in bench_segment.CASES.items():
        cases[name] = files
        stem = name.split("-")[0]
        patient[name] = "STS_" + stem[3:] if stem.startswith("sts") else stem
    for pid, modalities in _TUNE_SET.items():
        for modality in modalities.split():
            prefix = {"CT": "CT", "MR": "MR_T1"}[modality]
            name = f"sts{pid[4:]}-{modality.lower()}"
            cases[name] = (f"ibsi_sts_tune/{pid}/{prefix}_image.nii.gz", f"ibsi_sts_tune/{pid}/{prefix}_mask.nii.gz")
            patient[name] = pid
    return cases, patient


TUMOURS, PATIENT = _tumour_cases()
ORGANS = {name: bench_segment.ORGAN_CASES[name] for name in
          ("ts-spleen-ct", "ts-liver-ct", "ts-stomach-ct", "ts-colon-ct", "ts-portal-vein-ct")}
#: the other structures of the same CT, on which organ settings are chosen (``ORGANS`` checks them)
ORGANS_TUNE = {name: bench_segment.ORGAN_CASES[name] for name in
               ("ts-aorta-ct", "ts-ivc-ct", "ts-spinal-cord-ct", "ts-pancreas-ct", "ts-adrenal-r-ct",
                "ts-vertebra-t12-ct")}
METHODS = ("naive-3d", "ours-3d", "ours-2d")


def half_of(case: str) -> str:
    if case in ORGANS:
        return "organs"
    if case in ORGANS_TUNE:
        return "organs-tune"
    return next(h for h, patients in SPLIT.items() if PATIENT[case] in patients)


def _run(data: Path, case: str, method: str, adapted: Path | None, grid: list[str]) -> dict | str:
    cmd = [sys.executable, __file__, "--data", str(data), *grid, "--one", case, method]
    if adapted is not None:
        cmd += ["--adapted", str(adapted)]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        return f"FAILED: {out.stderr.strip().splitlines()[-1:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (half, modality, method, weights): see the module doc."""
    naive = {r["case"]: r for r in rows if r["method"] == "naive-3d"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["half"], r["modality"], r["method"], r["weights"]), []).append(r)
    out = []
    order = {"tune": 0, "check": 1, "organs-tune": 2, "organs": 3}
    for (half, modality, method, weights), rs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], *kv[0][1:])):
        errors = [r["volume_error"] for r in rs]
        vs = [r for r in rs if r["case"] in naive]
        below = sum(r["dice"] < naive[r["case"]]["dice"] for r in vs) if method != "naive-3d" else None
        ratio = statistics.median(r["seconds"] / naive[r["case"]]["seconds"] for r in vs) if vs else None
        out.append({"half": half, "modality": modality, "method": method, "weights": weights, "n": len(rs),
                    "mean_dice": round(statistics.fmean(r["dice"] for r in rs), 4),
                    "median_abs_volume_error": round(statistics.median(abs(e) for e in errors), 4),
                    "median_signed_volume_error": round(statistics.median(errors), 4),
                    "below_naive": below, "n_vs_naive": len(vs),
                    "median_seconds_ratio": round(ratio, 3) if ratio is not None else None,
                    "seconds_total": round(sum(r["seconds"] for r in rs), 1)})
    return out


def print_tables(rows: list[dict]) -> None:
    print("\n| half | mod | method | weights | n | mean Dice | med abs vol err | med signed | below naive | s / naive |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in summarise(rows):
        below = "-" if s["below_naive"] is None else f"{s['below_naive']}/{s['n_vs_naive']}"
        ratio = "-" if s["median_seconds_ratio"] is None else f"{s['median_seconds_ratio']:.2f}"
        print(f"| {s['half']} | {s['modality']} | {s['method']} | {s['weights']} | {s['n']} | {s['mean_dice']:.3f} | "
              f"{s['median_abs_volume_error']:.1%} | {s['median_signed_volume_error']:+.1%} | {below} | {ratio} |")
    organs = [r for r in rows if r["half"] in ("organs", "organs-tune")]
    if organs:
        print("\n| organ | half | method | weights | Dice | vol err | s |\n|---|---|---|---|---|---|---|")
        for r in sorted(organs, key=lambda r: (r["half"], r["case"], r["method"], r["weights"])):
            print(f"| {r['case']} | {r['half']} | {r['method']} | {r['weights']} | {r['dice']:.3f} | "
                  f"{r['volume_error']:+.1%} | {r['seconds']:.1f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--half", choices=("tune", "check", "all"), default="all")
    parser.add_argument("--cases", nargs="*", choices=[*TUMOURS, *ORGANS, *ORGANS_TUNE],
                        help="only these (organs included)")
    parser.add_argument("--no-organs", action="store_true", help="leave the organs out (they run by default)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--weights", choices=("original", "adapted", "both"), default="original")
    parser.add_argument("--adapted", type=Path, help="adapted decoder weights (finetune_decoder.py's .pt)")
    parser.add_argument("--slice-mm", type=float, help="resample the cases along k to slices this thick first")
    parser.add_argument("--matrix", type=int, help="and in plane to MATRIX x MATRIX over the same field of view "
                        "(--slice-mm 1 --matrix 512: the thin-slice clinical CT of the issue; CT stored as int16)")
    parser.add_argument("--label", help="the results file's label (default generalise-<half>, -<mm>mm, -<n>px)")
    parser.add_argument("--json", type=Path, help="write the results file here instead of benchmarks/results/")
    parser.add_argument("--summarise", nargs="+", type=Path, metavar="RESULTS", help="print the tables of results files")
    parser.add_argument("--check-split", action="store_true", help="verify SPLIT and HOLD_OUT against the seed")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check_split:
        drawn, hold = split_patients()
        ok = drawn == SPLIT and hold == HOLD_OUT
        print(f"split {'matches' if ok else 'DIFFERS from'} the seed {SEED}: {drawn} hold-out {hold}")
        return 0 if ok else 1
    if args.summarise:
        print_tables([row for path in args.summarise for row in json.loads(path.read_text())["rows"]])
        return 0
    if args.one:
        options = {"decoder_weights": str(args.adapted)} if args.adapted else None
        row = bench_segment.run_one(args.data, *args.one, cases={**TUMOURS, **ORGANS, **ORGANS_TUNE},
                                    model_options=options, slice_mm=args.slice_mm, matrix=args.matrix)
        print(json.dumps(row))
        return 0
    if not args.data.is_dir():
        print(f"shared data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    weights = ["original", "adapted"] if args.weights == "both" else [args.weights]
    if "adapted" in weights and (args.adapted is None or not args.adapted.is_file()):
        print(f"expected --adapted PATH to adapted decoder weights, found {args.adapted}", file=sys.stderr)
        return 2
    cases = args.cases or [c for c in TUMOURS if args.half == "all" or half_of(c) == args.half]
    if not args.no_organs and not args.cases:
        cases += list(ORGANS_TUNE) + list(ORGANS)
    grid = (["--slice-mm", str(args.slice_mm)] if args.slice_mm else []) + (
        ["--matrix", str(args.matrix)] if args.matrix else [])
    label = f"generalise-{args.half}" + (f"-{args.slice_mm:g}mm" if args.slice_mm else "") + (
        f"-{args.matrix}px" if args.matrix else "")
    for case in cases if grid else ():  # resampled once per case, outside the measured processes
        bench_segment.resampled_files(args.data, case, args.slice_mm, args.matrix, {**TUMOURS, **ORGANS, **ORGANS_TUNE})
    results = ResultsFile("generalise", args.label or label, path=args.json)
    results.doc.update(split={**SPLIT, "seed": SEED, "pairs": PAIRS, "hold_out": HOLD_OUT, "excluded": EXCLUDED},
                       adapted=str(args.adapted) if args.adapted else None,
                       grid={"slice_mm": args.slice_mm, "matrix": args.matrix},
                       adapted_sha256=_sha256(args.adapted) if args.adapted else None)
    print(f"{'case':<18} {'half':<6} {'method':<9} {'weights':<8} {'dice':>6} {'vol_mL':>8} {'ref_mL':>8} "
          f"{'vol_err':>8} {'sec':>7}", flush=True)
    # method-major: every case's naive loop first, then each protocol and weights in turn (an interrupted run
    # then lacks a whole protocol, not some cases' baselines)
    for method in args.methods:
        for w in ["original"] if method == "naive-3d" else weights:
            for case in cases:
                row = _run(args.data, case, method, args.adapted if w == "adapted" else None, grid)
                if isinstance(row, str):
                    print(f"{case:<18} {method:<9} {w:<8} {row}", flush=True)
                    continue
                row.update(half=half_of(case), patient=PATIENT.get(case, "totalseg"), weights=w)
                results.add(row)
                print(f"{case:<18} {row['half']:<6} {method:<9} {w:<8} {row['dice']:6.3f} {row['volume_ml']:8.1f} "
                      f"{row['reference_ml']:8.1f} {row['volume_error']:+8.1%} {row['seconds']:7.1f}", flush=True)
    path = results.finish()
    results.doc["summary"] = summarise(results.doc["rows"]) if results.doc["rows"] else []
    results._write()
    print_tables(results.doc["rows"])
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
