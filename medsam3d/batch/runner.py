"""``run_batch``: a manifest of studies -> a folder per study, a results database, follow-up, a report.

The driver reads and checks the whole manifest before any work, decides which studies to
skip (their inputs, prompts, settings, medsam3d version and model weights hash to the key of
their stored result), runs the rest on an engine (``local``: this process or a pool of
worker processes; ``ray``: Ray actors on a local or remote cluster), each worker loading its
model once, and commits each study as it arrives: its folder is moved into place whole, then
its rows are written in one transaction. Studies whose prompts come ``from:`` another study
run after it. At the end it follows each patient over time and writes ``results.json``,
``results.csv`` and ``report.html``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import BatchError
from .engines import Executor
from .keys import FileHashes, levels, settings_json, source_of, study_key
from .outdir import STUDY_MARKER, OutdirLock, clean_staging, open_store, place_study, prepare_outdir
from .results import collect_results, write_exports
from .worker import ModelSpec, Task

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]

ENGINES = ("local", "ray")
#: exit code of ``medsam3d batch`` when the batch finished but some studies failed
EXIT_FAILED_STUDIES = 3
#: failures that recur with the same inputs: kept, not run again, unless --retry-failed (a worker that died,
#: a full disk or a missing GPU may not recur, so those studies run again)
STICKY_STAGES = ("load", "prompts", "segment", "crash")
#: a study that was running when the batch stopped this many times is recorded as failed ("crash")
MAX_CRASHES = 2
#: the names of the batch's own files in the output folder, which no study folder may take
RESERVED_NAMES = ("results.sqlite", "results.sqlite-wal", "results.sqlite-shm", "results.csv", "results.json",
                  "report.html")


@dataclass
class BatchSummary:
    """What a batch run did; ``exit_code`` is 0 when no study failed, else :data:`EXIT_FAILED_STUDIES`."""

    total: int
    done: int
    skipped: int
    failed: int
    outdir: Path
    seconds: float
    run_id: int
    failures: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_mb: float | None = None

    @property
    def exit_code(self) -> int:
        return 0 if self.failed == 0 else EXIT_FAILED_STUDIES

    def line(self) -> str:
        return (f"{self.total} studies: {self.done} done, {self.skipped} skipped (unchanged), {self.failed} failed "
                f"in {self.seconds:.1f} s -> {self.outdir}")


def run_batch(manifest: str | os.PathLike, outdir: str | os.PathLike, *, engine: str = "local", workers: int = 1,
              ray_address: str | None = None, force: bool = False, retry_failed: bool = False,
              model_name: str = "litemedsam", checkpoint: str | os.PathLike | None = None, device: str = "auto",
              threads: int | None = None, rtstruct: bool = False, register: bool = True,
              pseudonymise: bool = False, report: bool = True, progress: Progress | None = None,
              **options) -> BatchSummary:
    """Run every study of a manifest (see :mod:`medsam3d.batch.manifest`) into ``outdir``.

    Parameters
    ----------
    engine : "local" or "ray"
        ``local`` runs in this process (``workers=1``) or in a pool of ``workers`` processes;
        ``ray`` runs ``workers`` Ray actors on the cluster at ``ray_address`` (or a local one
        started here), each asking for a GPU when the cluster has one.
    force : bool
        Recompute every study, even those whose stored result is current.
    retry_failed : bool
        Run again the studies that failed with the same inputs (by default they are kept as
        failed, since they would fail the same way).
    threads : int, optional
        Threads per worker (default: the machine's cores shared among the workers).
    rtstruct : bool
        Also write an RTSTRUCT for DICOM inputs.
    register : bool
        Register follow-up studies rigidly onto the baseline for matching and prompt transfer.
    pseudonymise : bool
        Replace patient names and identifiers in the shared outputs (report, CSV, JSON) by the
        manifest's ids.
    progress : callable(done, total, message), optional
        Called after each study.
    **options
        The engine's options (:func:`medsam3d.segment`), and ``fast=True`` for its speed preset.
    """
    from .. import __version__
    from ..run import check_engine_options
    from .manifest import read_manifest

    t0 = time.perf_counter()
    if engine not in ENGINES:
        raise BatchError(f"expected --engine local or ray, found {engine!r}")
    if workers < 1:
        raise BatchError(f"expected at least 1 worker, found {workers}")
    fast = bool(options.pop("fast", False))
    check_engine_options(options)
    studies = read_manifest(manifest)  # every row checked before any work
    for study in studies:
        if study.case_id.lower() in RESERVED_NAMES:
            raise BatchError(f"expected case_ids other than the batch's own files ({', '.join(RESERVED_NAMES)}), "
                             f"found '{study.case_id}' in row {study.row}; rename it")
    outdir = Path(outdir)
    prepare_outdir(outdir)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    spec = ModelSpec(model_name, str(checkpoint) if checkpoint is not None else None, device, threads)
    settings = {**settings_json(options), "fast": fast}
    base = {"medsam3d_version": __version__, "settings": settings}
    manifest_sha = hashlib.sha256(Path(manifest).read_bytes()).hexdigest()
    with OutdirLock(outdir), open_store(outdir) as store:
        clean_staging(outdir)  # left by a killed run: never committed, so never in the database
        run_id = store.start_run(engine=engine, workers=workers, version=__version__, manifest=str(manifest),
                                 manifest_sha256=manifest_sha, total=len(studies))
        counts = {"done": 0, "skipped": 0, "failed": 0}
        known = FileHashes(store)
        peak = [0.0]
        keys: dict[str, str] = {}
        finished = 0

        def report_progress(message: str) -> None:
            if progress is not None:
                progress(finished, len(studies), message)

        def record_failure(study, stage: str, error: str) -> None:
            nonlocal finished
            store.commit_failed(study, key=keys[study.case_id], run_id=run_id, stage=stage, error=error)
            counts["failed"] += 1
            finished += 1
            message = f"{study.case_id}: failed at {stage}: {error}"
            log.info("%s", message)
            report_progress(message)

        with Executor(engine, spec, workers=workers, address=ray_address) as execute:
            for level in levels(studies):
                tasks = []
                for study in level:
                    key = study_key(study, base, keys, spec, rtstruct=rtstruct, register=register, known=known)
                    known.save()
                    keys[study.case_id] = key
                    old = store.study(study.case_id)
                    if not force and old is not None and old["key"] == key and (
                            (old["status"] == "done" and (outdir / study.case_id / STUDY_MARKER).is_file())
                            or (old["status"] == "failed" and old["stage"] in STICKY_STAGES and not retry_failed)):
                        store.refresh(study)  # a corrected patient, time point or metadata column counts now
                        counts["skipped" if old["status"] == "done" else "failed"] += 1  # still failed
                        finished += 1
                        report_progress(f"{study.case_id}: unchanged ({old['status']}), not run again")
                        continue
                    if store.crashes(study.case_id, key) >= MAX_CRASHES:
                        record_failure(study, "crash", f"the batch stopped {MAX_CRASHES} times while this study "
                                       "ran (a crash, the out-of-memory killer or a kill); check its image, or run "
                                       "it alone with medsam3d segment; --retry-failed tries it again")
                        continue
                    try:
                        source = source_of(study, studies, store, outdir) if study.prompts.kind == "from" else None
                    except OSError as exc:
                        record_failure(study, "prompts", f"could not read the label map of "
                                       f"'{study.prompts.value}' ({exc.strerror}); run the batch again")
                        continue
                    tasks.append(Task(study, options={**options, "fast": fast}, rtstruct=rtstruct,
                                      register=register, source=source))
                by_case = {t.study.case_id: t.study for t in tasks}
                for result in execute(tasks, lambda t: store.start(t.study.case_id, keys[t.study.case_id])):
                    study = by_case[result["case_id"]]
                    peak[0] = max(peak[0], result.get("peak_rss_mb") or 0.0)
                    if result["status"] == "done":
                        try:
                            files = place_study(outdir, study.case_id, result)
                        except (OSError, BatchError) as exc:
                            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                            result = {"status": "failed", "stage": "write",
                                      "error": f"could not write the study's folder: {reason}"}
                    if result["status"] == "done":
                        store.commit_done(study, key=keys[study.case_id], run_id=run_id, record=result["record"],
                                          files=files, timings=result["timings"])
                        counts["done"] += 1
                        finished += 1
                        report_progress(f"{study.case_id}: done")
                    else:
                        record_failure(study, result["stage"], result["error"])
        store.finish_run(run_id, done=counts["done"], skipped=counts["skipped"], failed=counts["failed"])
        results = collect_results(store, studies, outdir, manifest=Path(manifest), manifest_sha256=manifest_sha,
                                  settings={**settings, "model": model_name, "checkpoint": spec.checkpoint,
                                            "device": device, "engine": engine, "workers": workers},
                                  register=register)
        write_exports(results, outdir, pseudonymise=pseudonymise, report=report)
        failures = results["failures"]
    summary = BatchSummary(total=len(studies), done=counts["done"], skipped=counts["skipped"], failed=counts["failed"],
                           outdir=outdir, seconds=time.perf_counter() - t0, run_id=run_id, failures=failures,
                           peak_rss_mb=peak[0] or None)
    log.info("%s", summary.line())
    return summary


