"""The accuracy-and-speed table of a ``bench_segment.py`` results file, in Markdown.

One row per method: mean Dice on the CT and MR cases, the median absolute volume error,
how often the reference volume lies in the result's range (the spread of the engine's own
alternatives), the summed seconds of the segmentation and their ratio to the naive
LiteMedSAM loop's on the same cases; below it, the run's environment. The user guide's
table is ``markdown_table(json.load(open(latest_results())))``.

Usage: python benchmarks/table.py [FILE]   (default: the latest results file)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def latest_results(folder: Path | str = RESULTS, label: str | None = "tumours") -> Path:
    """The results file of ``bench_segment.py`` in ``folder`` that started last (with ``label``,
    the default run's ``tumours``, unless None), finished runs first."""
    found = []
    for path in Path(folder).glob("*.json"):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if doc.get("benchmark") == "segment" and (label is None or doc.get("label") == label):
            found.append((doc.get("finished") is not None, doc.get("started") or "", path.name, path))
    if not found:
        raise FileNotFoundError(f"expected a bench_segment results file{f' labelled {label!r}' if label else ''} "
                                f"in {folder}, found none; run benchmarks/bench_segment.py")
    return max(found)[-1]


def method_summary(rows: list[dict]) -> list[dict]:
    """Per method (in the order they first appear): its cases, mean Dice on CT and MR (None
    without such cases), median |volume error|, the reference-in-range count, summed seconds
    and their ratio to the naive loop's on the same cases (None without naive rows)."""
    naive = {r["case"]: r for r in rows if r["method"] == "naive-3d"}
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]

        def mean_dice(modality: str) -> float | None:
            dice = [r["dice"] for r in group if r["modality"] == modality]
            return statistics.fmean(dice) if dice else None

        paired = [r for r in group if r["case"] in naive]
        naive_seconds = sum(naive[r["case"]]["seconds"] for r in paired)
        ranged = [r["range_holds_reference"] for r in group if r.get("range_holds_reference") is not None]
        out.append({"method": method, "cases": len(group), "dice_ct": mean_dice("CT"), "dice_mr": mean_dice("MR"),
                    "median_abs_volume_error": statistics.median(abs(r["volume_error"]) for r in group),
                    "in_range": (sum(ranged), len(ranged)) if ranged else None,
                    "seconds": sum(r["seconds"] for r in group),
                    "vs_naive": sum(r["seconds"] for r in paired) / naive_seconds if naive_seconds else None})
    return out


def environment_line(results: dict) -> str:
    """One line: when and where the run ran, on which versions."""
    env = results.get("environment", {})
    where = env.get("gpu") or f"{env.get('cores')}-core {env.get('cpu')}"
    ort = env.get("onnxruntime_threads") or "default"
    commit = (env.get("commit") or "unknown")[:10] + (" (with uncommitted changes)" if env.get("dirty") else "")
    return (f"{results.get('started', '')[:10]}, {where} ({env.get('device')}; torch {env.get('torch')} with "
            f"{env.get('torch_threads')} threads, ONNX Runtime {env.get('onnxruntime')} with {ort} threads), "
            f"Python {env.get('python')}, numpy {env.get('numpy')}, medsam3d {env.get('medsam3d')} at {commit}")


def markdown_table(results: dict) -> str:
    """The Markdown table of a results document (see the module doc)."""

    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = ["| method | cases | mean Dice CT | mean Dice MR | median abs volume error | reference in range "
             "| seconds | x naive |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in method_summary(results["rows"]):
        in_range = f"{s['in_range'][0]}/{s['in_range'][1]}" if s["in_range"] else "-"
        lines.append(f"| {s['method']} | {s['cases']} | {num(s['dice_ct'], '.3f')} | {num(s['dice_mr'], '.3f')} "
                     f"| {s['median_abs_volume_error']:.1%} | {in_range} | {s['seconds']:.0f} "
                     f"| {num(s['vs_naive'], '.2f')} |")
    return "\n".join(lines) + f"\n\n{environment_line(results)}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else latest_results()
    print(markdown_table(json.loads(path.read_text())), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
