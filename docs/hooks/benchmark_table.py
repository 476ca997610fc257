"""MkDocs hook: replace a line holding only ``<!-- benchmark-table -->`` with the latest benchmark table.

The table comes from the benchmark's machine-readable results through ``benchmarks/table.py``
(imported by file path, since ``benchmarks/`` is not a package):
``markdown_table(json.load(open(latest_results())))``. While that module or a results file
does not exist, the marker becomes a one-line note, so ``mkdocs build --strict`` passes either
way; an error inside an existing ``table.py`` fails the build, so a broken table is not hidden.
"""

from __future__ import annotations

import importlib.util
import json
import re
import logging
from pathlib import Path

MARKER = "<!-- benchmark-table -->"
NO_RESULTS = ("*No benchmark results were found when this page was built "
              "(`benchmarks/table.py` and a results file are needed; see [Contributing](contributing.md)).*")

log = logging.getLogger("mkdocs.hooks.benchmark_table")


def _table_module(root: Path):
    path = root / "benchmarks" / "table.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("medsam3d_benchmarks_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def benchmark_table(root: Path) -> str:
    """The Markdown table of the latest results under ``root``, or a one-line note when there are none."""
    module = _table_module(root)
    if module is None:
        return NO_RESULTS
    try:
        results = module.latest_results()
    except FileNotFoundError:
        return NO_RESULTS
    if results is None or not Path(results).is_file():
        return NO_RESULTS
    with open(results, encoding="utf-8") as handle:
        data = json.load(handle)
    table = module.markdown_table(data)
    try:
        name = Path(results).resolve().relative_to(root).as_posix()
    except ValueError:
        name = Path(results).name
    return f"{table.rstrip()}\n\n*Generated from `{name}` when this page was built.*"


def on_page_markdown(markdown: str, page, config, files) -> str:
    pattern = re.compile(rf"^[ \t]*{re.escape(MARKER)}[ \t]*$", re.MULTILINE)  # a line of its own
    if not pattern.search(markdown):
        return markdown
    root = Path(config["config_file_path"]).resolve().parent
    table = benchmark_table(root)
    return pattern.sub(lambda _: table, markdown)
