"""``run_case``: one case end to end (load, segment, measure, mesh, render, write) -> a record.

The CLI's ``segment``, the batch runner, the server and the Slicer module all call this one
function, so that they produce the same :class:`~medsam3d.record.CaseRecord` for the same
input. Every output path is checked before the model loads, and the outputs of one run are
committed together: a failure at any step leaves none of them behind.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import Medsam3dError, VolumeIOError
from .record import CaseRecord, describe_input, object_records
from .volume import Volume

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class CaseOutputs:
    """Where :func:`run_case` writes; every path is optional.

    ``labels``: the label map (``.nii.gz``, ``.nrrd``, ``.seg.nrrd``, ``.dcm`` DICOM SEG);
    ``report``: the record as JSON; ``mesh``: one surface per object (``.stl``, ``.obj``,
    ``.ply``, ``.vtp``; with several objects, ``NAME_label<N>.ext``); ``picture``: a PNG of
    the surfaces; ``rtstruct``: the objects' contours as a DICOM RTSTRUCT (``.dcm``, a DICOM
    input); ``sr``: the measurements as a DICOM SR (TID 1500, ``.dcm``) referencing the DICOM
    SEG written as ``labels``.
    """

    labels: str | os.PathLike | None = None
    report: str | os.PathLike | None = None
    mesh: str | os.PathLike | None = None
    picture: str | os.PathLike | None = None
    rtstruct: str | os.PathLike | None = None
    sr: str | os.PathLike | None = None

    @classmethod
    def of(cls, value: "CaseOutputs | dict[str, Any] | None") -> "CaseOutputs":
        if value is None or isinstance(value, cls):
            return value or cls()
        if isinstance(value, dict):
            unknown = set(value) - {"labels", "report", "mesh", "picture", "rtstruct", "sr"}
            if unknown:
                raise Medsam3dError(f"expected outputs among labels, report, mesh, picture, rtstruct, sr, found "
                                    f"{sorted(unknown)}")
            return cls(**value)
        raise Medsam3dError(f"expected outputs as a dict or CaseOutputs, found {type(value).__name__}")

    def check(self) -> None:
        """Refuse, before any work, a path that could not be written or whose format is unknown."""
        from .io import check_output
        from .io._atomic import check_output_path, full_suffix
        from .mesh import MESH_SUFFIXES

        if self.labels is not None:
            check_output(self.labels)
        if self.report is not None:
            if full_suffix(self.report) != ".json":
                raise VolumeIOError(f"expected a report path ending in .json, found '{Path(self.report).name}'")
            check_output_path(self.report)
        if self.mesh is not None:
            if full_suffix(self.mesh) not in MESH_SUFFIXES:
                raise VolumeIOError(f"expected a mesh path ending in {', '.join(MESH_SUFFIXES)}, "
                                    f"found '{Path(self.mesh).name}'")
            check_output_path(self.mesh)
        if self.picture is not None:
            if full_suffix(self.picture) != ".png":
                raise VolumeIOError(f"expected a picture path ending in .png, found '{Path(self.picture).name}'")
            check_output_path(self.picture)
        for what, path, option in (("RTSTRUCT", self.rtstruct, "--rtstruct"), ("DICOM SR", self.sr, "--sr")):
            if path is not None:
                if full_suffix(path) != ".dcm":
                    raise VolumeIOError(f"expected the {what} path ({option}) to end in .dcm, found "
                                        f"'{Path(path).name}'")
                check_output_path(path)
        if self.sr is not None and (self.labels is None or full_suffix(self.labels) != ".dcm"):
            found = f"'{Path(self.labels).name}'" if self.labels is not None else "none"
            raise VolumeIOError(f"expected the labels output as a DICOM SEG (.dcm) for the DICOM SR (--sr), which "
                                f"references its segments, found {found}; write the labels as .dcm (-o NAME.dcm) "
                                "from a DICOM input, or drop --sr")
        dicom = [(what, _same_path(path)) for what, path in (("labels", self.labels), ("rtstruct", self.rtstruct),
                                                             ("sr", self.sr)) if path is not None]
        for n, (what, key) in enumerate(dicom):
            for other, other_key in dicom[n + 1:]:
                if key == other_key:
                    raise VolumeIOError(f"expected the {what} and {other} outputs to be different files, found both "
                                        f"at {key}; give each its own name")

    def check_source(self, volume: Volume) -> None:
        """Refuse, before the model loads, DICOM outputs an input cannot have (one line each; the SR and
        RTSTRUCT first, whose remedy is to drop them, then the label map's)."""
        if self.sr is not None:
            from .io.dicomsr import check_sr_source

            check_sr_source(volume)
        if self.rtstruct is not None:
            from .io.rtstruct_write import check_rtstruct_source

            check_rtstruct_source(volume)
        if self.labels is not None:
            from .io import check_output

            check_output(self.labels, reference=volume)  # DICOM SEG needs a DICOM input

    def check_not_inputs(self, volume: Volume, prompts: Any) -> None:
        """Refuse an output that would overwrite the image or the prompt file it is made from."""
        inputs = [Path(f) for f in volume.meta.get("dicom_files") or ()]
        for source in (volume.meta.get("source"), prompts if isinstance(prompts, (str, os.PathLike)) else None):
            if source is not None:
                inputs.append(Path(source))
        taken = {_same_file_key(p) for p in inputs} - {None}
        for what, path in (("labels", self.labels), ("report", self.report), ("mesh", self.mesh),
                           ("picture", self.picture), ("rtstruct", self.rtstruct), ("sr", self.sr)):
            if path is not None and _same_file_key(Path(path)) in taken - {None}:
                raise VolumeIOError(f"expected the {what} output to be a new file, found it is an input of this "
                                    f"case ({path}); choose another name")


def check_engine_options(options: dict[str, Any]) -> None:
    """Refuse, before any work, an option :func:`medsam3d.segment` does not take (one line, the known ones)."""
    from .pipeline import ENGINE_OPTIONS as known

    unknown = sorted(set(options) - set(known))
    if unknown:
        raise Medsam3dError(f"expected engine options among {', '.join(known)}, found {', '.join(map(repr, unknown))}")


def run_case(image: Volume | str | os.PathLike, prompts: Any, *, outputs: CaseOutputs | dict[str, Any] | None = None,
             measure: bool = True, mesh: bool = False, model=None, model_name: str = "litemedsam",
             checkpoint: str | os.PathLike | None = None, device: str = "auto", trust_checkpoint: bool = False,
             threads: int | None = None, series_uid: str | None = None, allow_tilt: bool = False,
             volume_index: int | None = None, case_id: str | None = None, progress: Progress | None = None,
             **options) -> CaseRecord:
    """Segment one case and return its record; write the outputs asked for.

    Parameters
    ----------
    image : Volume or path
        A volume, or an image file or DICOM folder (``series_uid`` picks a series,
        ``allow_tilt`` accepts a gantry-tilted one, ``volume_index`` picks a 4D file's volume).
    prompts : prompt document, list of entries or ObjectPrompts, or a path
        As :func:`medsam3d.segment` takes them (see :mod:`medsam3d.prompts`). The record keeps
        them as given and as resolved to voxel boxes.
    outputs : CaseOutputs or dict, optional
        ``labels``, ``report``, ``mesh``, ``picture``, ``rtstruct``, ``sr`` paths. All are
        checked before the model loads and committed together at the end. The record's
        ``outputs`` names them (``rtstruct`` and ``sr`` only when asked for).
    measure : bool
        Add each object's measurements (:func:`medsam3d.measure`, per lesion) to the record
        (implied by ``outputs.sr``: the SR holds them).
    mesh : bool
        Build each object's surface and record its properties (implied by ``outputs.mesh``).
    model : SliceModel, optional
        A loaded model, reused across calls (a :class:`medsam3d.Session`'s model keeps its
        embedding cache); otherwise ``model_name``, ``checkpoint``, ``device`` and
        ``trust_checkpoint`` load one (see :func:`medsam3d.load_model`).
    threads : int, optional
        Cap the threads of torch, ONNX Runtime and medsam3d's own pool (for a worker that
        shares a machine).
    progress : callable(done, total, message), optional
        Called as the work advances.
    **options
        The engine's options (:func:`medsam3d.segment`): ``window``, ``modality``, ``overlap``,
        ``taper``, ``zoom``, ``stride``, ``config``, ``detector``...
    """
    from .io import as_volume, load
    from .io._atomic import OutputSet
    from .models import load_model, set_threads
    from .pipeline import segment
    from .prompts import prompts_from

    t0 = time.perf_counter()
    check_engine_options(options)
    outputs = CaseOutputs.of(outputs)
    outputs.check()
    if threads is not None:
        set_threads(threads)
    if isinstance(image, (str, os.PathLike)):
        volume = load(image, series_uid=series_uid, allow_tilt=allow_tilt, volume_index=volume_index)
    else:
        volume = as_volume(image)
    objects = prompts_from(prompts, volume)  # checked first: the record's copy below reads a valid file
    outputs.check_not_inputs(volume, prompts)
    outputs.check_source(volume)  # DICOM SEG, RTSTRUCT and SR need a DICOM input
    measure = measure or outputs.sr is not None
    given = _given_prompts(prompts)
    if model is None:
        model = load_model(model_name, checkpoint=checkpoint, device=device, trust_checkpoint=trust_checkpoint)
    t_load = time.perf_counter()
    result = segment(volume, objects, model=model, progress=progress, **options)
    t_seg = time.perf_counter()
    rows = None
    if measure:
        from .measure import measure as measure_labels

        rows = measure_labels(result.labels, image=volume)
    t_measure = time.perf_counter()
    records = object_records(result.labels, result.objects, rows)
    record = CaseRecord(
        case_id=case_id, input=describe_input(volume, image if isinstance(image, (str, os.PathLike)) else None),
        prompts={**given, "resolved": [o.as_dict() for o in result.prompts],
                 **({"detections": result.detections} if result.detections else {})}, model=result.model,
        window=result.window.as_dict(), settings={k: v for k, v in result.settings.items() if k != "encoded_sections"},
        objects=records, encoded={"slices": result.encoded_slices, "sections": result.settings["encoded_sections"]},
        timings={}, outputs={"labels": None, "report": None, "meshes": [], "pictures": []}, labels=result.labels,
    )
    with OutputSet() as staged:
        t_mesh = time.perf_counter()
        if mesh or outputs.mesh is not None:
            _meshes(result.labels, records, outputs.mesh, staged, record)
        t_picture = time.perf_counter()
        if outputs.picture is not None:
            from .render import render_meshes

            if any(r.voxels for r in records):
                render_meshes(result.labels, staged.staged(outputs.picture))
                record.outputs["pictures"].append(str(outputs.picture))
            else:
                record.warnings.append("no picture: every object is empty")
        t_write = time.perf_counter()
        if outputs.labels is not None:
            from .io import save

            labels_file = staged.staged(outputs.labels)
            save(result.labels, labels_file, reference=volume)
            record.outputs["labels"] = str(outputs.labels)
        if outputs.rtstruct is not None:
            from .io.rtstruct_write import write_rtstruct

            write_rtstruct(result.labels, staged.staged(outputs.rtstruct), reference=volume)
            record.outputs["rtstruct"] = str(outputs.rtstruct)
        if outputs.sr is not None:
            from .io.dicomsr import write_measurement_sr

            write_measurement_sr(result.labels, staged.staged(outputs.sr), seg=labels_file, reference=volume,
                                 measurements=rows)
            record.outputs["sr"] = str(outputs.sr)
        record.outputs["report"] = str(outputs.report) if outputs.report is not None else None
        end = time.perf_counter()
        record.timings = {"load_s": t_load - t0, "segment_s": t_seg - t_load, "measure_s": t_measure - t_seg,
                          "mesh_s": t_picture - t_mesh, "picture_s": t_write - t_picture, "write_s": end - t_write,
                          "total_s": end - t0}
        if result.detect_seconds is not None:  # the detectors' share of segment_s
            record.timings["detect_s"] = result.detect_seconds
        record.timings = {k: round(v, 3) for k, v in record.timings.items()}
        if outputs.report is not None:
            staged.staged(outputs.report).write_text(record.to_json() + "\n")
        staged.commit()
    for obj in records:
        if obj.touches_border:
            log.info("object %r (label %d) reaches the image border (%s): if it goes on beyond the image, its "
                     "volume (%.2f mL) is a lower bound", obj.name, obj.label, ", ".join(obj.border_planes), obj.volume_ml)
    return record


def _same_path(path: str | os.PathLike) -> Path:
    """An output path made absolute without following links, to compare two outputs' names."""
    return Path(os.path.abspath(path))


def _same_file_key(path: Path) -> tuple[int, int] | None:
    """(device, inode) of an existing file, or None (no file there, or a path the system refuses)."""
    try:
        info = path.stat()
    except (OSError, ValueError):
        return None
    return (info.st_dev, info.st_ino) if path.is_file() else None


def _given_prompts(prompts: Any) -> dict[str, Any]:
    """The prompts as the user gave them, for the record: a file's content and hash, or the value itself."""
    from .prompts import ObjectPrompt

    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        data = path.read_bytes() if path.is_file() else b""
        import hashlib

        try:
            given = json.loads(data.decode("utf-8")) if data else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            given = None  # prompts_from reports what is wrong with the file
        return {"source": str(path), "sha256": hashlib.sha256(data).hexdigest() if data else None, "given": given}
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, ObjectPrompt) for p in prompts):
        return {"source": None, "sha256": None, "given": [p.as_dict() for p in prompts]}
    return {"source": None, "sha256": None, "given": json.loads(json.dumps(prompts, default=str))}


def _meshes(labels: Volume, records, path, staged, record: CaseRecord) -> None:
    """Each object's surface (RAS, patient space): its properties into the record, written when ``path`` is given."""
    from .mesh import write_label_meshes

    meshes = write_label_meshes(labels, [r.label for r in records if r.voxels], path, staged,
                                names_from=[r.label for r in records])
    for obj in records:
        if obj.label not in meshes:
            continue
        out, props = meshes[obj.label]
        if out is not None:
            record.outputs["meshes"].append(str(out))
        obj.mesh = {"path": str(out) if out else None, "space": "RAS", "triangles": int(props["triangles"]),
                    "volume_ml": props["volume_mm3"] / 1000.0, "area_mm2": float(props["area_mm2"]),
                    "watertight": bool(props["watertight"])}
