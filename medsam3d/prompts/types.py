"""The prompts of one object: boxes on slices (:class:`BoxPrompt`) grouped into :class:`ObjectPrompt`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import PromptError
from ._checks import _short

MAX_LABEL = 65535  # label maps are written as uint8, or uint16 past 255


@dataclass(frozen=True)
class BoxPrompt:
    """One box on one slice: ``box = (i_min, j_min, i_max, j_max)`` inclusive voxel indices."""

    slice: int
    box: tuple[int, int, int, int]

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0] + 1) * (self.box[3] - self.box[1] + 1)


@dataclass
class ObjectPrompt:
    """Every prompt of one object, its label value and optional slice bounds.

    ``text`` (prompt file version 2): what a detector is to find; an object with a text and no
    boxes waits for :func:`medsam3d.detect.resolve_text_prompts`, which gives it boxes and
    sets ``detector`` (the detector's name; in a prompt file, the one asked for) and
    ``score`` (the detection's).
    """

    name: str
    label: int
    boxes: list[BoxPrompt] = field(default_factory=list)
    z_range: tuple[int, int] | None = None
    text: str | None = None
    detector: str | None = None
    score: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``text``, ``detector`` and ``score`` only when set); see :meth:`from_dict`."""
        out = {"name": self.name, "label": self.label, "z_range": list(self.z_range) if self.z_range else None,
               "boxes": [{"slice": b.slice, "box": list(b.box)} for b in self.boxes]}
        out.update({key: value for key in ("text", "detector", "score")
                    if (value := getattr(self, key)) is not None})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ObjectPrompt:
        """The inverse of :meth:`as_dict`."""
        try:
            return cls(name=data["name"], label=int(data["label"]),
                       boxes=[BoxPrompt(int(b["slice"]), tuple(int(v) for v in b["box"])) for b in data["boxes"]],
                       z_range=tuple(data["z_range"]) if data.get("z_range") else None, text=data.get("text"),
                       detector=data.get("detector"), score=data.get("score"))
        except (KeyError, TypeError, ValueError) as exc:
            raise PromptError(f"expected an object prompt as ObjectPrompt.as_dict() writes it, found {_short(data)} "
                              f"({type(exc).__name__}: {exc})") from None

