"""What an install of medsam3d weighs: the resolver's downloads, and a real fresh environment.

Two measurements, both as a new user gets them (no pip cache)::

    # what pip would take for an install: every file, its download size, the total
    python benchmarks/install_size.py report ".[test]"            # or any pip requirement: "."
    # a real install in a fresh virtual environment: wall time and `du` of the environment
    python benchmarks/install_size.py venv /tmp/venv-cpu -- torch==2.13.0 -- -e .

``report`` runs ``pip install --dry-run --ignore-installed --report`` in a throwaway
environment and sums the files it names: the size pip's report gives where it gives one,
else the local file's size (``file://`` indexes) or the server's Content-Length (a HEAD
request). ``venv`` creates DIR (which must not exist), then runs one ``pip install`` per
group of arguments separated by ``--`` (so a CPU torch can go in before the package), timing
each, and prints the environment's size and its largest packages. Sizes are in MB (10^6 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import venv
from pathlib import Path

MB = 1e6


def _size(item: dict) -> int | None:
    info = item.get("download_info") or {}
    url = info.get("url", "")
    for key in ("size",):  # newer pips may report it
        if isinstance(info.get(key), int):
            return info[key]
    if url.startswith("file://"):
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
        return path.stat().st_size if path.is_file() else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30) as r:
            return int(r.headers.get("Content-Length"))
    except Exception:
        return None


def report(requirement: str, pip_args: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="m3d-report-") as tmp:
        env = Path(tmp) / "env"
        venv.create(env, with_pip=True)
        out = Path(tmp) / "report.json"
        cmd = [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
               "--no-cache-dir", "--report", str(out), *pip_args, requirement]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        took = time.perf_counter() - t0
        data = json.loads(out.read_text())
    rows = []
    for item in data["install"]:
        meta = item["metadata"]
        rows.append((meta["name"], meta["version"], _size(item),
                     urllib.parse.urlparse(item["download_info"]["url"]).scheme))
    known = [r for r in rows if r[2] is not None]
    total = sum(r[2] for r in known)
    nvidia = sum(r[2] for r in known if r[0].lower().startswith(("nvidia", "cuda", "triton")))
    print(f"pip install {requirement} {' '.join(pip_args)}: {len(rows)} files, {total / MB:,.0f} MB to download "
          f"({nvidia / MB:,.0f} MB of them CUDA: nvidia-*, cuda-*, triton); resolved in {took:.0f} s")
    if len(known) < len(rows):
        print("  size unknown:", ", ".join(r[0] for r in rows if r[2] is None))
    for name, version, size, scheme in sorted(known, key=lambda r: -r[2])[:15]:
        print(f"  {size / MB:9.1f} MB  {name}=={version}  ({scheme})")


def du(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def make_venv(target: Path, groups: list[list[str]]) -> None:
    if target.exists():
        sys.exit(f"{target} exists: give a new folder")
    t0 = time.perf_counter()
    venv.create(target, with_pip=True)
    base = du(target)
    print(f"venv created in {time.perf_counter() - t0:.1f} s, {base / MB:.0f} MB (pip itself)")
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1"}
    for group in groups:
        t0 = time.perf_counter()
        subprocess.run([str(target / "bin" / "python"), "-m", "pip", "install", "-q", *group], check=True, env=env)
        print(f"pip install {' '.join(group)}: {time.perf_counter() - t0:.0f} s, environment now "
              f"{du(target) / MB:,.0f} MB")
    site = next(target.glob("lib/python*/site-packages"))
    sizes = sorted(((du(p), p.name) for p in site.iterdir() if p.is_dir() and not p.name.endswith("-info")),
                   reverse=True)
    print("largest in site-packages:", ", ".join(f"{name} {size / MB:,.0f}" for size, name in sizes[:12]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("report", help="what the resolver would download")
    r.add_argument("requirement")
    r.add_argument("pip_args", nargs="*", help="more pip options, after --")
    v = sub.add_parser("venv", help="a real install in a fresh environment")
    v.add_argument("target", type=Path)
    v.add_argument("groups", nargs=argparse.REMAINDER, help="-- pip args [-- pip args ...]")
    args = parser.parse_args(argv)
    if args.what == "report":
        report(args.requirement, args.pip_args)
    else:
        groups, current = [], []
        for a in args.groups:
            if a == "--":
                if current:
                    groups.append(current)
                current = []
            else:
                current.append(a)
        if current:
            groups.append(current)
        make_venv(args.target, groups)


if __name__ == "__main__":
    main()
