"""The machine-readable record of one benchmark run: one JSON file in ``benchmarks/results/``.

``benchmarks/results/<YYYY-MM-DD>_<device>_<label>.json`` (device: ``cpu<cores>`` or the GPU's
name) holds::

    {"format": "medsam3d-benchmark/1", "benchmark": "segment" | "prompts", "label": ...,
     "command": argv, "started": ISO time, "finished": ISO time (null while it runs),
     "environment": {...}, "rows": [...]}

``environment`` names what the figures depend on: the CPU model and cores, the threads of
torch and ONNX Runtime (null: ONNX Runtime's default, one per physical core), the device
(and GPU), the versions of Python, numpy, torch, ONNX Runtime and medsam3d, and the git
commit of the working tree with a ``dirty`` flag (uncommitted changes). The file is
rewritten after every row, so an interrupted run leaves what it measured.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

FORMAT = "medsam3d-benchmark/1"
RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git() -> dict:
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def environment(device: str = "cpu") -> dict:
    """What the run's figures depend on (see the module doc)."""
    import numpy
    import torch

    import medsam3d
    from medsam3d._parallel import thread_cap

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "onnxruntime_threads": thread_cap(), "device": device, "gpu": gpu,
            "python": platform.python_version(), "numpy": numpy.__version__, "torch": torch.__version__,
            "onnxruntime": ort_version, "medsam3d": medsam3d.__version__, **_git()}


def device_tag(env: dict) -> str:
    """``cpu<cores>``, or the GPU's name in lower case with dashes."""
    if env.get("gpu"):
        return re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-")
    return f"cpu{env['cores']}"


class ResultsFile:
    """One run's results file; :meth:`add` appends a row and rewrites the file."""

    def __init__(self, benchmark: str, label: str, device: str = "cpu", path: Path | None = None):
        started = dt.datetime.now().astimezone()
        env = environment(device)
        self.doc = {"format": FORMAT, "benchmark": benchmark, "label": label, "command": list(sys.argv),
                    "started": started.isoformat(timespec="seconds"), "finished": None, "environment": env,
                    "rows": []}
        if path is None:
            stem = f"{started:%Y-%m-%d}_{device_tag(env)}_{label}"
            path = RESULTS / f"{stem}.json"
            n = 2
            while path.exists():  # another run of the same day: keep both
                path = RESULTS / f"{stem}_{n}.json"
                n += 1
        self.path = Path(path)
        self._write()

    def add(self, row: dict) -> None:
        self.doc["rows"].append(row)
        self._write()

    def finish(self) -> Path:
        self.doc["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        self._write()
        return self.path

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        head = json.dumps({k: v for k, v in self.doc.items() if k != "rows"}, indent=1)
        rows = ",\n".join("  " + json.dumps(row) for row in self.doc["rows"])
        tmp.write_text(head[:-2] + ',\n "rows": [\n' + rows + "\n ]\n}\n")  # a row per line
        os.replace(tmp, self.path)
