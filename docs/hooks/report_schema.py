"""MkDocs hook: publish ``medsam3d/schemas/report.schema.json`` with the site and describe it.

The schema file is added to the site as ``schemas/report.schema.json``, and the marker
``<!-- report-schema -->`` (a line of its own) in a page becomes a link to it and a table of the report's
top-level properties (type, required, volatile, description), read from the schema itself
when the site is built. Without the file the marker becomes a one-line note.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

MARKER = "<!-- report-schema -->"
SCHEMA = Path("medsam3d") / "schemas" / "report.schema.json"
SITE_PATH = "schemas/report.schema.json"


def _schema_path(config) -> Path:
    return Path(config["config_file_path"]).resolve().parent / SCHEMA


def on_files(files, config):
    from mkdocs.structure.files import File

    path = _schema_path(config)
    if path.is_file():
        files.append(File.generated(config, SITE_PATH, abs_src_path=str(path)))
    return files


def _type(node: dict) -> str:
    if "$ref" in node:
        return "object"
    kind = node.get("type", "any")
    if isinstance(kind, list):
        kind = " or ".join(kind)
    if kind == "array" and isinstance(node.get("items"), dict):
        item = node["items"]
        kind = f"array of {_type(item)}"
    return kind


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def schema_section(schema: dict, link: str) -> str:
    required = set(schema.get("required", []))
    properties = schema.get("properties", {})
    described = any(node.get("description") for node in properties.values())
    rows = ["| property | type | required | differs between runs |" + (" description |" if described else ""),
            "|---|---|---|---|" + ("---|" if described else "")]
    for name, node in properties.items():
        row = (f"| `{name}` | {_cell(_type(node))} | {'yes' if name in required else 'no'} | "
               f"{'yes' if node.get('x-volatile') else ''} |")
        rows.append(row + (f" {_cell(node.get('description', ''))} |" if described else ""))
    title = schema.get("title", "report schema")
    version = properties.get("schema_version", {}).get("pattern", "")
    head = f"The schema file: [`{SCHEMA.as_posix()}`]({link}) ({_cell(title)}"
    head += f"; `schema_version` matches `{version}`)." if version else ")."
    if schema.get("description"):
        head += f" {_cell(schema['description'])}"
    return head + "\n\n" + "\n".join(rows)


def on_page_markdown(markdown: str, page, config, files) -> str:
    pattern = re.compile(rf"^[ \t]*{re.escape(MARKER)}[ \t]*$", re.MULTILINE)  # a line of its own
    if not pattern.search(markdown):
        return markdown
    path = _schema_path(config)
    if not path.is_file():
        text = f"*The schema file `{SCHEMA.as_posix()}` was not found when this page was built.*"
    else:
        depth = page.file.src_uri.count("/")
        link = "../" * depth + SITE_PATH
        text = schema_section(json.loads(path.read_text(encoding="utf-8")), link)
    return pattern.sub(lambda _: text, markdown)
