"""Griffe extension: read the reStructuredText bits of medsam3d's docstrings as Markdown.

The docstrings cross-reference with Sphinx roles (``:func:`medsam3d.load```, ``:class:`~x.Y```)
and open literal blocks with ``::``. mkdocstrings renders docstrings as Markdown, where
both would show as typed; this turns a role into a code span of its target (the last part
after ``~``, the text of ``text <target>``), a paragraph-ending ``::`` into ``:`` (the
indented block after it is a code block in Markdown too), and a doctest example (lines from
``>>>`` to the next blank line, which Markdown would read as nested quotes) into a fenced
``pycon`` block without its ``# doctest:`` directives.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const|ref|term):`([^`]+)`")
_LITERAL = re.compile(r"(?<=\S)::[ \t]*$", re.MULTILINE)
_DIRECTIVE = re.compile(r"\s*#\s*doctest:.*$")


def _target(text: str) -> str:
    match = re.fullmatch(r"(.*?)\s*<(.+)>", text)
    if match:
        return match.group(1)
    if text.startswith("~"):
        return text[1:].rsplit(".", 1)[-1]
    return text.lstrip(".") if text.startswith(".") else text


def _doctests(text: str) -> str:
    out: list[str] = []
    lines = text.split("\n")
    n = 0
    while n < len(lines):
        line = lines[n]
        if not line.lstrip().startswith(">>>"):
            out.append(line)
            n += 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        block = []
        while n < len(lines) and lines[n].strip():
            block.append(_DIRECTIVE.sub("", lines[n][len(indent):] if lines[n].startswith(indent) else lines[n]))
            n += 1
        out += [f"{indent}```pycon", *(f"{indent}{b}" for b in block), f"{indent}```"]
    return "\n".join(out)


def rst_to_markdown(text: str) -> str:
    text = _ROLE.sub(lambda m: f"`{_target(m.group(1))}`", text)
    return _doctests(_LITERAL.sub(":", text))


class RstRoles(griffe.Extension):
    """Rewrite every docstring as it is loaded (see the module docstring)."""

    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
