"""One study, as a worker runs it: load, prompt, segment, measure, write, return files.

A worker (the driver's own process, a process of a local pool, or a Ray actor) keeps its model
loaded between studies. It writes a study's outputs into a temporary folder and returns them
as bytes with the record, so that the driver, which alone writes into the output folder and
the database, needs no filesystem shared with the workers.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: the files of a study's folder; ``NAME_label<N>`` variants are written for several objects
LABELS_NRRD = "labels.seg.nrrd"
LABELS_NIFTI = "labels.nii.gz"
DICOM_SEG = "seg.dcm"
DICOM_SR = "sr.dcm"
RTSTRUCT = "rtstruct.dcm"
RECORD = "record.json"
MEASUREMENTS = "measurements.csv"
SNAPSHOT = "snapshot.png"
MESH = "meshes/surface.stl"

MEASUREMENT_COLUMNS = ("label", "name", "component", "voxels", "volume_ml", "mesh_volume_ml", "surface_mm2",
                       "sphericity", "max_diameter_3d_mm", "long_axis_mm", "short_axis_mm", "axial_slice",
                       "touches_border")


@dataclass(frozen=True)
class ModelSpec:
    """What a worker loads once and keeps: a model's name, weights and device, and its thread cap."""

    name: str = "litemedsam"
    checkpoint: str | None = None
    device: str = "auto"
    threads: int | None = None


@dataclass(frozen=True)
class Task:
    """A study to run, in plain picklable data (Ray and process pools send it to the worker)."""

    study: Any  # medsam3d.batch.manifest.Study
    options: dict[str, Any] = field(default_factory=dict)  # the engine's options (JSON-able), and "fast"
    rtstruct: bool = False
    register: bool = True
    #: for ``from:CASE_ID``: the source study's image path, series and label map (bytes of a .seg.nrrd)
    source: dict[str, Any] | None = None


_MODELS: dict[ModelSpec, Any] = {}


def cap_threads(threads: int | None) -> None:
    """Cap this worker's threads: torch, ONNX Runtime, medsam3d's pool and SimpleITK (registration)."""
    if threads is None:
        return
    import SimpleITK as sitk

    from ..models import set_threads

    set_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def worker_model(spec: ModelSpec):
    """The model of this process for ``spec``, loaded on first use and kept."""
    if spec not in _MODELS:
        from ..models import load_model

        cap_threads(spec.threads)
        _MODELS[spec] = load_model(spec.name, checkpoint=spec.checkpoint, device=spec.device)
    return _MODELS[spec]


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0, 1)


def engine_options(options: dict[str, Any], study) -> dict[str, Any]:
    """The engine's keyword options for a study: the batch's, then the manifest row's window, modality
    and detector. A ``text:`` study's detector is the row's, else the batch's, else ``ct-anatomy``
    (weight-free); a prompt file's text objects take the row's or the batch's."""
    out = {k: v for k, v in options.items() if k != "fast"}
    detector = getattr(study, "detector", None) or out.get("detector")
    if detector is None and study.prompts.kind == "text":
        detector = "ct-anatomy"
    if detector is not None:
        out["detector"] = detector
    if options.get("fast"):
        from ..propagate import PropagationConfig

        out["config"] = PropagationConfig.fast()
    if study.window:
        out["window"] = study.window
    if study.modality and "modality" not in out:
        from ..preprocess import MODALITIES

        if study.modality.upper() in MODALITIES:
            out["modality"] = study.modality.upper()
    return out


def run_task(task: Task, spec: ModelSpec) -> dict[str, Any]:
    """Run one study; never raises for a bad study: a failure comes back with its stage and one-line error."""
    from ..errors import Medsam3dError

    study = task.study
    t0 = time.perf_counter()
    stage = "load"
    try:
        from ..io import load

        volume = load(study.image, series_uid=study.series_uid)
        stage = "prompts"
        transfer = None
        if study.prompts.kind == "from":
            prompts, transfer = _transferred_prompts(task, volume)
        else:
            from .manifest import study_prompts

            prompts = study_prompts(study, volume)
        stage = "model"
        model = worker_model(ModelSpec(study.model or spec.name, str(study.checkpoint) if study.checkpoint
                                       else spec.checkpoint, spec.device, spec.threads))
        stage = "segment"
        files, record = _segment_and_write(task, volume, prompts, model)
    except Medsam3dError as exc:
        return {"case_id": study.case_id, "status": "failed", "stage": stage, "error": _one_line(exc),
                "peak_rss_mb": peak_rss_mb()}
    except MemoryError:
        return {"case_id": study.case_id, "status": "failed", "stage": stage,
                "error": "ran out of memory; run fewer workers or give the study a smaller image",
                "peak_rss_mb": peak_rss_mb()}
    except Exception as exc:  # a bug or an unforeseen input: recorded, and the batch goes on
        log.exception("study %s failed unexpectedly at %s", study.case_id, stage)
        return {"case_id": study.case_id, "status": "failed", "stage": stage,
                "error": f"unexpected {type(exc).__name__}: {_one_line(exc)} (a bug: please report it)",
                "peak_rss_mb": peak_rss_mb()}
    timings = {**(record.get("timings") or {}), **record.pop("batch_timings", {})}
    timings["study_s"] = round(time.perf_counter() - t0, 3)
    timings["worker_peak_rss_mb"] = peak_rss_mb()
    return {"case_id": study.case_id, "status": "done", "record": record, "files": files, "transfer": transfer,
            "timings": timings, "peak_rss_mb": peak_rss_mb(), "pid": os.getpid()}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _transferred_prompts(task: Task, volume):
    """``from:CASE_ID``: the source study's segmentation carried onto this study as its prompts."""
    from ..errors import PromptError
    from ..followup import transfer_prompts
    from ..io import load, load_labels

    source = task.source
    if source is None or source.get("labels") is None:
        raise PromptError(f"expected a done study '{task.study.prompts.value}' to take the prompts from, "
                          "found none (it failed or has no label map); fix it and run the batch again")
    source_image = load(source["image"], series_uid=source.get("series_uid"))
    with tempfile.TemporaryDirectory(prefix="medsam3d-from-") as tmp:
        path = Path(tmp) / LABELS_NRRD
        path.write_bytes(source["labels"])
        source_labels = load_labels(path, reference=source_image)
    prompts, registration = transfer_prompts(source_labels, source_image, volume, register=task.register)
    registration = {**registration, "case_id": task.study.case_id, "to": task.study.prompts.value}
    return prompts, {"from": task.study.prompts.value, "registration": registration}


def _segment_and_write(task: Task, volume, prompts, model) -> tuple[dict[str, bytes], dict[str, Any]]:
    """run_case into a temporary folder, then the other label formats, overlays and the measurements table."""
    from ..io import save
    from ..run import run_case

    study = task.study
    dicom = _dicom_outputs_possible(volume)
    with tempfile.TemporaryDirectory(prefix="medsam3d-study-") as tmp:
        root = Path(tmp)
        (root / "meshes").mkdir()
        outputs = {"labels": root / LABELS_NRRD, "mesh": root / MESH, "picture": root / SNAPSHOT}
        record = run_case(volume, prompts, outputs=outputs, model=model, mesh=True, case_id=study.case_id,
                          **engine_options(task.options, study))
        t_extra = time.perf_counter()
        save(record.labels, root / LABELS_NIFTI, reference=volume)
        if dicom:
            _dicom_files(record, volume, root, rtstruct=task.rtstruct)
        overlays = _overlays(volume, record, root)
        (root / MEASUREMENTS).write_text(_measurements_csv(record), encoding="utf-8")
        data = record.to_dict()
        data["batch_timings"] = {"extra_outputs_s": round(time.perf_counter() - t_extra, 3)}
        data["outputs"] = _relative_outputs(data["outputs"], root)
        import json

        extra = data.pop("batch_timings")
        (root / RECORD).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        data["batch_timings"] = extra
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    data["batch_files"] = {"overlays": overlays}
    return files, data


def _dicom_files(record, volume, root: Path, *, rtstruct: bool) -> None:
    """The DICOM SEG, the SR that references it and, on request, the RTSTRUCT, when there is
    something to write (DICOM has no empty segmentation; an empty result stays a .seg.nrrd)."""
    from ..errors import Medsam3dError
    from ..io.dicomseg import write_dicom_seg
    from ..io.dicomsr import write_measurement_sr
    from ..io.rtstruct_write import write_rtstruct

    if not any(obj.voxels for obj in record.objects):
        record.warnings.append("no DICOM SEG, SR or RTSTRUCT: every object is empty")
        return
    rows = [obj.measurements["whole"] for obj in record.objects if obj.voxels and obj.measurements
            and obj.measurements.get("whole")]
    try:
        write_dicom_seg(record.labels, root / DICOM_SEG, volume)
        write_measurement_sr(record.labels, root / DICOM_SR, seg=root / DICOM_SEG, reference=volume,
                             measurements=rows)
        if rtstruct:
            write_rtstruct(record.labels, root / RTSTRUCT, reference=volume)
    except Medsam3dError as exc:
        for name in (DICOM_SEG, DICOM_SR, RTSTRUCT):
            (root / name).unlink(missing_ok=True)
        record.warnings.append(f"no DICOM outputs: {exc}")
        log.warning("study %s: no DICOM outputs: %s", record.case_id, exc)


def _dicom_outputs_possible(volume) -> bool:
    """Whether this input can have a DICOM SEG and SR (a DICOM series with the UIDs they reference)."""
    from ..errors import Medsam3dError
    from ..run import CaseOutputs

    if not volume.meta.get("dicom_files"):
        return False
    try:
        CaseOutputs(labels="seg.dcm", sr="sr.dcm").check_source(volume)
    except Medsam3dError as exc:
        log.warning("no DICOM SEG/SR for this study: %s", exc)
        return False
    return True


def _relative_outputs(value: Any, root: Path) -> Any:
    """The record's output paths relative to the study's folder (they were written in a temporary one)."""
    if isinstance(value, dict):
        return {k: _relative_outputs(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative_outputs(v, root) for v in value]
    if isinstance(value, str) and value.startswith(str(root)):
        return Path(value).relative_to(root).as_posix()
    return value


def _overlays(volume, record, root: Path) -> list[dict[str, Any]]:
    """An axial overlay of each non-empty object on its largest slice, with its RECIST axes."""
    from ..render import axial_overlay

    out = []
    for obj in record.objects:
        if not obj.voxels:
            continue
        whole = (obj.measurements or {}).get("whole")
        name = f"overlay_label{obj.label}.png"
        axial_overlay(volume, record.labels, root / name, label=obj.label, measurement=whole)
        out.append({"label": obj.label, "name": obj.name, "slice": (whole or {}).get("axial_slice"), "path": name})
    return out


def _measurements_csv(record) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["case_id", *MEASUREMENT_COLUMNS], extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for obj in record.objects:
        m = obj.measurements or {}
        for row in ([m["whole"]] if m.get("whole") else []) + list(m.get("lesions") or []):
            writer.writerow({"case_id": record.case_id, **row, "name": obj.name})
    return buffer.getvalue()
