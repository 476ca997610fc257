"""The server over real HTTP on loopback, beside ``medsam3d segment`` for the same prompt.

On the bundled example (``examples/sts041_ct``, its prompt file), from a fresh server process
(``medsam3d serve`` on a free port, the model loaded once): the time to start and load the
model, to open a session (upload and load the volume), the first segmentation (submit to done),
a refine (a box on a slice inside the first box: its new encodings are counted), and, in the same
run, ``medsam3d segment`` from a fresh process (imports and model load included) with the same
prompts, whose label map must equal the server's. Then the server's resident memory (VmRSS)
with 1 and with 4 open sessions, each after a segmentation.

    python benchmarks/bench_server.py [--device cpu] [--threads N]

Writes ``benchmarks/results/<date>_<cpuN>_server.json`` (see ``results_file.py``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import ResultsFile  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CASE = REPO / "examples" / "sts041_ct"
IMAGE = CASE / "CT_image.nii.gz"
PROMPTS = CASE / "prompts.json"
#: a second box inside the example's box, on a slice the first segmentation encoded (chosen from its record)
REFINE_BOX = [62, 60, 96, 104]
TOKEN = "bench-token-0123456789abcdef"
#: starts the server without the ``serve`` sub-command registered (the same function behind it)
SERVE = ("import sys, argparse; from medsam3d.cli.serve import add_serve_arguments, _cmd_serve; "
         "p = argparse.ArgumentParser(); add_serve_arguments(p); sys.exit(_cmd_serve(p.parse_args(sys.argv[1:])))")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Api:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, data: bytes | None = None, headers: dict | None = None):
        headers = {"Authorization": f"Bearer {TOKEN}", **(headers or {})}
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=600) as resp:
            return resp.read()

    def json(self, method: str, path: str, body=None):
        data = json.dumps(body).encode() if body is not None else None
        raw = self.call(method, path, data, {"Content-Type": "application/json"} if body is not None else None)
        return json.loads(raw) if raw else None

    def open(self) -> str:
        raw = self.call("POST", "/v1/sessions", IMAGE.read_bytes(),
                        {"Content-Type": "application/octet-stream", "X-Filename": "case.nii.gz"})
        return json.loads(raw)["session_id"]

    def run(self, path: str, body) -> dict:
        job_id = self.json("POST", path, body)["job_id"]
        while True:
            job = self.json("GET", f"/v1/jobs/{job_id}")
            if job["state"] in ("done", "failed", "cancelled"):
                if job["state"] != "done":
                    raise RuntimeError(f"job {job['state']}: {job['error']}")
                return job
            time.sleep(0.05)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    prompts = json.loads(PROMPTS.read_text())
    results = ResultsFile("server", "server", device=args.device)
    port = _free_port()
    threads = ["--threads", str(args.threads)] if args.threads else []
    common = ["--device", args.device, *threads]
    work = Path(tempfile.mkdtemp(prefix="bench-server-"))
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-c", SERVE, "--port", str(port), "--token", TOKEN, "--max-sessions",
                               "4", *common], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = Api(port)
    rows = []
    try:
        while True:
            try:
                urllib.request.urlopen(api.base + "/health", timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError):
                if server.poll() is not None:
                    raise RuntimeError("the server did not start")
                time.sleep(0.2)
        start_s = time.perf_counter() - t0
        t = time.perf_counter()
        sid = api.open()
        open_s = time.perf_counter() - t
        t = time.perf_counter()
        job = api.run(f"/v1/sessions/{sid}/segment", {"prompts": prompts})
        segment_s = time.perf_counter() - t
        before = api.json("GET", f"/v1/sessions/{sid}")["cache"]
        first = json.loads(api.call("GET", f"/v1/jobs/{job['job_id']}/record"))["objects"][0]
        lo, hi = first["slices"]
        encoded = [k for k in range(lo, hi + 1) if k not in first["interpolated_slices"] and k != 23]
        refine_slice = min(encoded, key=lambda k: (abs(k - 26), k))  # on the first walk's stride when it can
        t = time.perf_counter()
        api.run(f"/v1/sessions/{sid}/refine", {"object": "sarcoma", "slice": refine_slice, "box": REFINE_BOX,
                                                "replace": True})
        refine_s = time.perf_counter() - t
        after = api.json("GET", f"/v1/sessions/{sid}")["cache"]
        served = work / "served.nii.gz"
        served.write_bytes(api.call("GET", f"/v1/jobs/{job['job_id']}/labels?format=nii.gz"))
        rss1 = _rss_mb(server.pid)

        # the same box as a 3D box (the first result's slice range as z_range), in a session of its own:
        # the sections then stay where they are, so a refine on an encoded slice encodes nothing
        box3d = {"version": 1, "objects": [{**prompts["objects"][0], "z_range": [lo, hi]}]}
        sid3 = api.open()
        t = time.perf_counter()
        job3 = api.run(f"/v1/sessions/{sid3}/segment", {"prompts": box3d})
        segment3_s = time.perf_counter() - t
        before3 = api.json("GET", f"/v1/sessions/{sid3}")["cache"]
        first3 = json.loads(api.call("GET", f"/v1/jobs/{job3['job_id']}/record"))["objects"][0]
        encoded3 = [k for k in range(lo, hi + 1) if k not in first3["interpolated_slices"] and k != 23]
        refine3_slice = min(encoded3, key=lambda k: (abs(k - 26), k))
        t = time.perf_counter()
        api.run(f"/v1/sessions/{sid3}/refine", {"object": "sarcoma", "slice": refine3_slice, "box": REFINE_BOX,
                                                 "replace": True})
        refine3_s = time.perf_counter() - t
        after3 = api.json("GET", f"/v1/sessions/{sid3}")["cache"]
        api.call("DELETE", f"/v1/sessions/{sid3}")

        t = time.perf_counter()
        cli_out = work / "cli.nii.gz"
        cli = [sys.executable, "-m", "medsam3d", "segment", str(IMAGE), "--prompts", str(PROMPTS), "-o", str(cli_out),
               "--no-progress", *common]
        subprocess.run(cli, check=True, stdout=subprocess.DEVNULL)
        cli_s = time.perf_counter() - t
        import medsam3d as m3

        same = bool(np.array_equal(m3.load_labels(served).array, m3.load_labels(cli_out).array))

        for _ in range(3):
            other = api.open()
            api.run(f"/v1/sessions/{other}/segment", {"prompts": prompts})
        rss4 = _rss_mb(server.pid)
        caches = api.json("GET", f"/v1/sessions/{sid}")["cache"]
        rows = [
            ("server start (model load)", start_s, ""),
            ("open session (upload 1.9 MB)", open_s, ""),
            ("first segmentation", segment_s, f"{before['misses']} encodings"),
            (f"refine (box on encoded slice {refine_slice})", refine_s, f"{after['misses'] - before['misses']} new encodings, "
                                                  f"{after['hits'] - before['hits']} cache hits"),
            ("medsam3d segment (fresh process)", cli_s, f"same labels as the server: {same}"),
            (f"first segmentation, 3D box (z_range {lo}-{hi})", segment3_s, f"{before3['misses']} encodings"),
            (f"refine, 3D box, box on encoded slice {refine3_slice}", refine3_s,
             f"{after3['misses'] - before3['misses']} new encodings, {after3['hits'] - before3['hits']} cache hits"),
        ]
        for what, seconds, note in rows:
            results.add({"measure": what, "seconds": round(seconds, 2), "note": note})
        results.add({"measure": "server VmRSS, 1 session", "mb": round(rss1, 1),
                     "note": f"cache {before['bytes'] / 2**20:.1f} MB after the first segmentation"})
        results.add({"measure": "server VmRSS, 4 sessions", "mb": round(rss4, 1),
                     "note": f"first session's cache {caches['bytes'] / 2**20:.1f} MB, {caches['entries']} entries"})
        results.add({"measure": "labels equal to medsam3d segment", "value": same})
    finally:
        server.terminate()
        server.wait(30)
    path = results.finish()
    print(f"{'measure':40s} {'value':>10s}  note")
    for row in results.doc["rows"]:
        value = row.get("seconds", row.get("mb", row.get("value")))
        unit = " s" if "seconds" in row else " MB" if "mb" in row else ""
        print(f"{row['measure']:40s} {str(value) + unit:>10s}  {row.get('note', '')}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
