"""The guide cannot rot: the tutorial's commands run, the site builds strictly, the README stays short."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import EXAMPLES, REPO

DOCS = REPO / "docs"
TUTORIAL = DOCS / "tutorial.md"
README = REPO / "README.md"
README_MAX_LINES = 150

_FENCE = re.compile(r"^(`{3,}|~{3,})[^\n]*\n(.*?)^\1[ \t]*$", re.MULTILINE | re.DOTALL)
_PATH_LIKE = re.compile(r"\.(nii|nii\.gz|nrrd|mha|json|png|stl|obj|ply|vtp|dcm|csv)$")


def code_blocks(markdown: str) -> list[str]:
    """The bodies of the fenced code blocks of a Markdown text, in order."""
    return [match.group(2) for match in _FENCE.finditer(markdown)]


def commands(markdown: str, program: str = "medsam3d") -> list[list[str]]:
    """Every ``$ program ...`` line of the code blocks (a trailing backslash continues it), split."""
    found = []
    for block in code_blocks(markdown):
        lines = iter(block.splitlines())
        for line in lines:
            if not line.startswith(f"$ {program} "):
                continue
            text = line[2:]
            while text.endswith("\\"):
                text = text[:-1] + " " + next(lines, "").strip()
            found.append(shlex.split(text))
    return found


def named_files(argv: list[str]) -> list[str]:
    """The arguments of a command line that name a file (inputs and outputs)."""
    return [a for a in argv[1:] if not a.startswith("-") and _PATH_LIKE.search(a)]


def python_blocks(markdown: str) -> list[str]:
    return [match.group(2) for match in _FENCE.finditer(markdown) if match.group(0).split("\n", 1)[0].strip("`~ ")
            == "python"]


# ---------------------------------------------------------------------------------------------------------------
# the tutorial


def test_tutorial_has_commands():
    argvs = commands(TUTORIAL.read_text(encoding="utf-8"))
    assert argvs, f"expected '$ medsam3d ...' lines in {TUTORIAL}, found none"
    assert any(a[1] == "segment" for a in argvs), "expected the tutorial to segment the example"
    for argv in argvs:
        for path in named_files(argv):
            if path.startswith("examples/"):
                assert (REPO / path).is_file(), f"the tutorial names {path}, which is not in the repository"


def test_command_extraction():
    text = "x\n```console\n$ medsam3d info a.nii.gz\nprinted\n$ medsam3d mesh l.nrrd \\\n    -o 'o u.stl'\n```\n" \
           "```bash\nmedsam3d not-a-prompt\n```\n"
    assert commands(text) == [["medsam3d", "info", "a.nii.gz"], ["medsam3d", "mesh", "l.nrrd", "-o", "o u.stl"]]
    assert named_files(["medsam3d", "segment", "a.nii.gz", "--json", "r.json", "--view", "3d"]) == ["a.nii.gz", "r.json"]


@pytest.mark.parametrize("page", [TUTORIAL, README], ids=lambda p: p.name)
def test_python_blocks_compile(page):
    for n, code in enumerate(python_blocks(page.read_text(encoding="utf-8"))):
        compile(code, f"{page.name}, python block {n + 1}", "exec")


@pytest.mark.slow
def test_tutorial_commands_run(tmp_path):
    """Run every ``$ medsam3d`` command of the tutorial in order, from a folder where
    ``examples/`` is reachable as in the repository root; each must exit 0 and leave the
    files it names."""
    (tmp_path / "examples").symlink_to(EXAMPLES, target_is_directory=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reports = []
    for argv in commands(TUTORIAL.read_text(encoding="utf-8")):
        run = subprocess.run([sys.executable, "-m", "medsam3d", *argv[1:]], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=900)
        shown = " ".join(argv)
        print(f"$ {shown}\n{run.stdout}{run.stderr}")
        assert run.returncode == 0, f"'{shown}' exited {run.returncode}:\n{run.stdout}\n{run.stderr}"
        for path in named_files(argv):
            assert (tmp_path / path).is_file(), f"'{shown}' left no {path}"
        if argv[1] == "segment" and "--json" in argv:
            reports.append(tmp_path / argv[argv.index("--json") + 1])
    assert reports, "expected the tutorial's segment command to write a report (--json)"
    from medsam3d.record import validate_report

    for report in reports:
        validate_report(json.loads(report.read_text()))


# ---------------------------------------------------------------------------------------------------------------
# the site


def _load_hook(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", DOCS / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_table_hook(tmp_path):
    hook = _load_hook("benchmark_table")
    assert hook.benchmark_table(tmp_path) == hook.NO_RESULTS  # no benchmarks/table.py yet
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "table.py").write_text(
        "from pathlib import Path\n"
        "def latest_results():\n"
        "    found = sorted(Path(__file__).parent.glob('results*.json'))\n"
        "    return found[-1] if found else None\n"
        "def markdown_table(results):\n"
        "    rows = ['| case | Dice |', '|---|---|'] + [f\"| {r['case']} | {r['dice']:.3f} |\" for r in results['rows']]\n"
        "    return '\\n'.join(rows)\n")
    assert hook.benchmark_table(tmp_path) == hook.NO_RESULTS  # a table module but no results file
    (bench / "results_1.json").write_text(json.dumps({"rows": [{"case": "a", "dice": 0.5}]}))
    (bench / "results_2.json").write_text(json.dumps({"rows": [{"case": "b", "dice": 0.75}]}))
    table = hook.benchmark_table(tmp_path)
    assert "| b | 0.750 |" in table and "| a |" not in table and "benchmarks/results_2.json" in table

    class Page:  # only what the hook reads
        pass

    page_text = f"# Accuracy\n\n{hook.MARKER}\n"
    out = hook.on_page_markdown(page_text, Page(), {"config_file_path": str(tmp_path / "mkdocs.yml")}, None)
    assert hook.MARKER not in out and "| b | 0.750 |" in out


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, (f"README.md has {len(lines)} lines; keep it under {README_MAX_LINES} "
                                           "and move details into docs/")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    test_commands = [line for line in lines if line.startswith("pip install -e \".[test]\"")]
    assert test_commands, "expected the README's test command ('pip install -e \".[test]\" ...')"
    assert test_commands[0] in ci.splitlines(), ".ci/run must run the README's test command verbatim"


def test_mkdocs_build_strict(tmp_path):
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
               if importlib.util.find_spec(m.split(".")[0]) is None
               or (("." in m) and importlib.util.find_spec(m) is None)]
    if missing:
        pytest.skip(f"needs MkDocs with the Material theme and mkdocstrings[python] ({', '.join(missing)} not "
                    "installed): pip install -e \".[docs]\"")
    site = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                          "-d", str(site)], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    accuracy = (site / "accuracy" / "index.html").read_text(encoding="utf-8")
    assert "benchmark-table" not in accuracy, "the benchmark-table marker was not replaced"
    for page in ("tutorial", "api/run_case", "api/session", "api/record"):
        assert (site / page / "index.html").is_file(), f"the site has no {page} page"
