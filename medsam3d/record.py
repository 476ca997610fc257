"""The result record of one case: what was segmented, from what, how, and what it measures.

:func:`medsam3d.run_case` returns a :class:`CaseRecord`; the CLI's ``segment --json``, the
batch runner and the server write the same record. It serialises to JSON with a
``schema_version``; the schema ships with the package as a strict JSON Schema
(``medsam3d/schemas/report.schema.json``: no unknown properties anywhere), and
:func:`validate_report` checks a report against it. Fields that differ between two runs of
the same case (times, output paths, the creation time) carry ``"x-volatile": true`` in the
schema; :func:`stable_view` drops them, so that two entry points can be compared.

Versioning: a new optional field raises the minor version (``1.1``), a removed or
re-typed field the major version. The schema is strict, so a reader validates the reports
of its own major version up to its own minor version; a report of another major version is
refused with a message saying so before the schema is applied.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .errors import Medsam3dError
from .volume import Volume

SCHEMA_VERSION = "1.4"
SCHEMA_FILE = Path(__file__).with_name("schemas") / "report.schema.json"

#: an object whose volume range (the engine's alternatives) spans more than this fraction of its volume is flagged
WIDE_RANGE = 0.25


class ReportError(Medsam3dError):
    """A report that does not follow the schema."""


@dataclass
class ObjectRecord:
    """One segmented object: its volume, the range of the engine's alternatives, and where it lies."""

    label: int
    name: str
    text: str | None
    voxels: int
    volume_ml: float
    #: the smallest and largest volume among the result and the engine's alternative segmentations
    #: (the chain vote's members): a spread, not a confidence interval; None without a vote
    volume_ml_range: list[float] | None
    alternatives: int
    slices: list[int] | None
    touches_border: bool
    border_planes: list[str]
    boxes: list[dict[str, Any]]
    z_range: list[int] | None
    mean_score: float
    interpolated_slices: list[int]
    stopped: dict[str, str]
    voxels_lost_to_overlap: int
    voxels_removed_by_taper: int
    #: ``empty`` (nothing segmented), ``touches_border`` (the volume may be a lower bound),
    #: ``wide_volume_range`` (the alternatives differ by more than :data:`WIDE_RANGE` of the volume)
    flags: list[str] = field(default_factory=list)
    #: ``{"whole": row, "lesions": [row, ...]}`` from :func:`medsam3d.measure`, or None
    measurements: dict[str, Any] | None = None
    #: the surface written for this object (triangles, enclosed mL, watertight, path), or None
    mesh: dict[str, Any] | None = None


@dataclass
class CaseRecord:
    """Everything one case produced, JSON-ready through :meth:`to_dict` (see the module docstring)."""

    input: dict[str, Any]
    prompts: dict[str, Any]
    model: dict[str, Any]
    window: dict[str, Any]
    settings: dict[str, Any]
    objects: list[ObjectRecord]
    encoded: dict[str, int]
    timings: dict[str, float]
    outputs: dict[str, Any]
    case_id: str | None = None
    warnings: list[str] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    schema_version: str = SCHEMA_VERSION
    medsam3d_version: str = field(default_factory=lambda: _version())
    #: the label map itself (on the input's grid), for scripts; not part of the JSON
    labels: Volume | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        first = ("schema_version", "medsam3d_version", "case_id", "created")
        names = [*first, *(f.name for f in fields(self) if f.name not in first and f.name != "labels")]
        out = {name: getattr(self, name) for name in names}
        out["objects"] = [asdict(o) for o in self.objects]
        return _jsonable(out)

    def to_json(self, **kwargs) -> str:
        """The report as JSON text (strict JSON: a NaN or infinity is an error, not written)."""
        return json.dumps(self.to_dict(), **{"indent": 2, "allow_nan": False, **kwargs})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CaseRecord":
        """Read a report back (validated first)."""
        validate_report(data)
        data = dict(data)
        data["objects"] = [ObjectRecord(**o) for o in data["objects"]]
        return cls(**data)

    def object(self, label_or_name: int | str) -> ObjectRecord:
        for obj in self.objects:
            if label_or_name in (obj.label, obj.name):
                return obj
        raise KeyError(label_or_name)


def _version() -> str:
    from . import __version__

    return __version__


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def object_records(labels: Volume, engine_objects: list[dict[str, Any]],
                   measurements: list[dict[str, Any]] | None = None) -> list[ObjectRecord]:
    """The record of each object the engine returned (:class:`medsam3d.pipeline.SegmentationResult`).

    Volumes are counted on ``labels`` (voxels x voxel volume, exact on any grid); the range
    scales the volume by the engine's ``alternatives``; ``measurements`` (rows of
    :func:`medsam3d.measure`) are attached to the label they describe.
    """
    from .measure import border_planes

    records = []
    for obj in engine_objects:
        mask = labels.array == obj["label"]
        voxels = int(mask.sum())
        volume_ml = voxels * labels.voxel_volume_mm3 / 1000.0
        ratios = obj["alternatives"]
        spread = [volume_ml * min(1.0, *ratios), volume_ml * max(1.0, *ratios)] if ratios and voxels else None
        border = border_planes(mask) if voxels else []
        flags = ["empty"] if not voxels else []
        if border:
            flags.append("touches_border")
        if spread and spread[1] - spread[0] > WIDE_RANGE * volume_ml:
            flags.append("wide_volume_range")
        rows = [r for r in measurements or () if r["label"] == obj["label"]]
        records.append(ObjectRecord(
            label=obj["label"], name=obj["name"], text=obj.get("text"), voxels=voxels, volume_ml=volume_ml,
            volume_ml_range=spread, alternatives=len(ratios), slices=obj["slices"], touches_border=bool(border),
            border_planes=border, boxes=obj["boxes"], z_range=obj["z_range"], mean_score=obj["mean_score"],
            interpolated_slices=obj["interpolated_slices"], stopped=dict(obj["stopped"]),
            voxels_lost_to_overlap=obj["voxels_lost_to_overlap"], voxels_removed_by_taper=obj["voxels_removed_by_taper"],
            flags=flags,
            measurements={"whole": next((r for r in rows if r["component"] == 0), None),
                          "lesions": [r for r in rows if r["component"] > 0]} if measurements is not None else None,
        ))
    return records


def describe_input(volume: Volume, path: str | Path | None = None) -> dict[str, Any]:
    """The input as the record names it: where it came from, its content hash and its grid.

    ``sha256`` is the file's when the image is one file. When it is several (a DICOM series in
    slice order; a header and its data file: ``.hdr``/``.img``, ``.mhd``, ``.nhdr``), it is the
    SHA-256 of the list of the files' own SHA-256 digests, one hex digest per line.
    """
    meta = volume.meta
    files = [Path(f) for f in meta.get("dicom_files") or ()]
    source = path if path is not None else meta.get("source")
    if not files and source is not None and Path(source).is_file():
        files = [Path(source), *_data_files(Path(source))]
    digests = [_file_sha256(f) for f in files]
    digest = digests[0] if len(digests) == 1 else \
        hashlib.sha256("".join(d + "\n" for d in digests).encode()).hexdigest() if digests else None
    return {
        "path": str(source) if source is not None else None,
        "format": meta.get("format"),
        "sha256": digest,
        "files": len(files),
        "series_uid": meta.get("series_uid"),
        "modality": meta.get("modality"),
        "grid": {"shape": [int(n) for n in volume.shape], "spacing": [float(s) for s in volume.spacing],
                 "axcodes": "".join(volume.axcodes), "affine": np.asarray(volume.affine, float).tolist()},
    }


def _data_files(header: Path) -> list[Path]:
    """The data file(s) a header file names (Analyze/NIfTI pair, MetaImage, detached NRRD)."""
    name = header.name.lower()
    if name.endswith(".hdr"):
        return [p for p in (header.with_suffix(".img"), header.with_suffix(".IMG")) if p.is_file()][:1]
    if name.endswith((".mhd", ".nhdr")):
        key = "elementdatafile" if name.endswith(".mhd") else "data file"
        with open(header, "rb") as handle:
            for raw in handle.read(64 * 1024).decode("latin-1").splitlines():
                field, sep, value = raw.replace(":", "=", 1).partition("=")
                if sep and field.strip().lower() in (key, "datafile"):
                    candidate = header.parent / value.strip()
                    return [candidate] if candidate.is_file() else []
    return []


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The report's JSON Schema (draft 2020-12), as shipped in ``medsam3d/schemas``."""
    return json.loads(SCHEMA_FILE.read_text())


def validate_report(report: dict[str, Any]) -> None:
    """Raise :class:`ReportError` (one line: where, what) unless ``report`` follows the schema."""
    import jsonschema

    if not isinstance(report, dict):
        raise ReportError(f"expected a medsam3d report (a JSON object), found {type(report).__name__}")
    major = str(report.get("schema_version", "")).split(".")[0]
    if "schema_version" in report and major != SCHEMA_VERSION.split(".")[0]:
        raise ReportError(f"expected a report of schema {SCHEMA_VERSION.split('.')[0]}.x, found "
                          f"{report.get('schema_version')!r}; use the medsam3d version that wrote it")
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(report), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ReportError(f"expected a medsam3d report following schema {SCHEMA_VERSION}, found at {where}: "
                          f"{first.message[:200]}{more}")


def volatile_paths(node: dict[str, Any] | None = None, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths (tuples of keys; ``*`` for every item of an array) of the fields the schema marks volatile."""
    node = schema() if node is None else node
    found = [prefix] if node.get("x-volatile") else []
    for key, sub in node.get("properties", {}).items():
        found += volatile_paths(_deref(sub), prefix + (key,))
    if isinstance(node.get("items"), dict):
        found += volatile_paths(_deref(node["items"]), prefix + ("*",))
    for alternative in node.get("oneOf", []) + node.get("anyOf", []):
        found += [p for p in volatile_paths(_deref(alternative), prefix) if p not in found]
    return found


def _deref(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref and ref.startswith("#/$defs/"):
        target = schema()["$defs"][ref.split("/")[-1]]
        return {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def stable_view(report: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``report`` without its volatile fields (for comparing entry points or runs)."""
    out = json.loads(json.dumps(report))
    for path in sorted(volatile_paths(), key=len, reverse=True):
        _drop(out, path)
    return out


def _drop(node: Any, path: tuple[str, ...]) -> None:
    if not path:
        return
    head, rest = path[0], path[1:]
    if head == "*":
        for item in node if isinstance(node, list) else ():
            _drop(item, rest)
    elif isinstance(node, dict) and head in node:
        if rest:
            _drop(node[head], rest)
        else:
            del node[head]
