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

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..errors import BatchError, Medsam3dError
from .store import ResultStore, lesion_facts
from .worker import LABELS_NRRD, ModelSpec, Task, run_task

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]

ENGINES = ("local", "ray")
#: exit code of ``medsam3d batch`` when the batch finished but some studies failed
EXIT_FAILED_STUDIES = 3
RESULTS_FORMAT = "medsam3d-batch-results/1"
#: the file that marks a study folder as the batch's own (only such a folder is ever replaced)
STUDY_MARKER = ".medsam3d-study"
#: failures that recur with the same inputs: kept, not run again, unless --retry-failed (a worker that died,
#: a full disk or a missing GPU may not recur, so those studies run again)
STICKY_STAGES = ("load", "prompts", "segment", "crash")
#: a study that was running when the batch stopped this many times is recorded as failed ("crash")
MAX_CRASHES = 2
#: the names of the batch's own files in the output folder, which no study folder may take
RESERVED_NAMES = ("results.sqlite", "results.sqlite-wal", "results.sqlite-shm", "results.csv", "results.json",
                  "report.html")
CSV_COLUMNS = ("case_id", "patient_id", "timepoint", "modality", "status", "label", "name", "volume_ml",
               "volume_ml_low", "volume_ml_high", "long_axis_mm", "short_axis_mm", "max_diameter_3d_mm",
               "touches_border", "flags", "track", "error")


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
    _prepare_outdir(outdir)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    spec = ModelSpec(model_name, str(checkpoint) if checkpoint is not None else None, device, threads)
    settings = {**_jsonable(options), "fast": fast}
    base = {"medsam3d_version": __version__, "settings": settings}
    manifest_sha = hashlib.sha256(Path(manifest).read_bytes()).hexdigest()
    with _OutdirLock(outdir), _open_store(outdir) as store:
        _clean_staging(outdir)  # left by a killed run: never committed, so never in the database
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

        with _executor(engine, spec, workers=workers, address=ray_address) as execute:
            for level in _levels(studies):
                tasks = []
                for study in level:
                    key = _study_key(study, base, keys, spec, rtstruct=rtstruct, register=register, known=known)
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
                        source = _source_of(study, studies, store, outdir) if study.prompts.kind == "from" else None
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
                            files = _place_study(outdir, study.case_id, result)
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
        _write_exports(results, outdir, pseudonymise=pseudonymise, report=report)
        failures = results["failures"]
    summary = BatchSummary(total=len(studies), done=counts["done"], skipped=counts["skipped"], failed=counts["failed"],
                           outdir=outdir, seconds=time.perf_counter() - t0, run_id=run_id, failures=failures,
                           peak_rss_mb=peak[0] or None)
    log.info("%s", summary.line())
    return summary


# --- the output folder -------------------------------------------------------------------------

def _prepare_outdir(outdir: Path) -> None:
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchError(f"expected a writable output folder, found '{outdir}' cannot be created ({exc.strerror}); "
                         "choose another -o") from None
    if not os.access(outdir, os.W_OK):
        raise BatchError(f"expected a writable output folder, found '{outdir}' read-only; choose another -o")


def _clean_staging(outdir: Path) -> None:
    staging = outdir / ".staging"
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)


def _open_store(outdir: Path) -> ResultStore:
    import sqlite3

    path = outdir / "results.sqlite"
    try:
        return ResultStore(path)
    except sqlite3.DatabaseError as exc:
        raise BatchError(f"expected the batch's results database at {path}, found a file SQLite cannot use ({exc}); "
                         "move it away or choose another -o") from None


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a directory's entries are synced by syncing the directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _OutdirLock:
    """One batch at a time per output folder (an advisory lock, released when the process dies)."""

    def __init__(self, outdir: Path):
        self.path = outdir / ".lock"
        self.handle = None

    def __enter__(self):
        import fcntl

        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise BatchError(f"expected no other batch writing to '{self.path.parent}', found one running; "
                             "wait for it or choose another -o") from None
        return self

    def __exit__(self, *exc):
        self.handle.close()


def _place_study(outdir: Path, case_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """Write a study's files into a staging folder, then swap it in for the study's folder whole.

    A folder of that name is replaced only if the batch wrote it (it holds :data:`STUDY_MARKER`):
    an output folder that also holds data never loses a folder that is not the batch's."""
    final = outdir / case_id
    if final.exists() and not (final / STUDY_MARKER).is_file():
        raise BatchError(f"'{final}' exists and was not written by medsam3d batch; move it away or choose another -o")
    staging = outdir / ".staging" / f"{case_id}.{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    for rel, data in {**result["files"], STUDY_MARKER: b"written by medsam3d batch\n"}.items():
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    old = outdir / ".staging" / f"{case_id}.old.{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    _fsync_dir(outdir)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    names = sorted(result["files"])
    record = result["record"]
    overlays = record.pop("batch_files", {}).get("overlays", [])
    prefix = f"{case_id}/"
    files = {"labels": prefix + LABELS_NRRD, "nifti": _rel(prefix, "labels.nii.gz", names),
             "dicom_seg": _rel(prefix, "seg.dcm", names), "sr": _rel(prefix, "sr.dcm", names),
             "rtstruct": _rel(prefix, "rtstruct.dcm", names), "record": prefix + "record.json",
             "measurements": prefix + "measurements.csv",
             "meshes": [prefix + n for n in names if n.startswith("meshes/")],
             "snapshot": _rel(prefix, "snapshot.png", names),
             "overlays": [{**o, "path": prefix + o["path"]} for o in overlays]}
    if result.get("transfer") is not None:
        files["transfer"] = result["transfer"]
    return files


def _rel(prefix: str, name: str, names: list[str]) -> str | None:
    return prefix + name if name in names else None


# --- keys and order ----------------------------------------------------------------------------

def _sha256_files(paths: Iterable[Path], known: FileHashes) -> str:
    """One digest of the files' names and contents (each file's digest from ``known`` when unchanged)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + known.sha256(path).encode() + b"\n")
    return digest.hexdigest()


class FileHashes:
    """SHA-256 of files, re-read only when a file's size or modification time changed since the
    database last saw it (a batch of hundreds of large DICOM studies is not hashed again on each run)."""

    def __init__(self, store: ResultStore | None = None):
        self.store = store
        self.fresh: dict[str, tuple[int, int, str]] = {}

    def sha256(self, path: Path) -> str:
        from ..models.base import file_sha256

        info = path.stat()
        cached = self.store.file_hash(str(path)) if self.store is not None else None
        if cached is not None and cached[:2] == (info.st_size, info.st_mtime_ns):
            return cached[2]
        digest = file_sha256(path)
        self.fresh[str(path)] = (info.st_size, info.st_mtime_ns, digest)
        return digest

    def save(self) -> None:
        if self.store is not None and self.fresh:
            self.store.save_file_hashes(self.fresh)
            self.fresh = {}


def _content_hash(path: Path, known: FileHashes) -> str:
    """The content of an image file (with its detached data file) or of every file under a folder."""
    from ..record import _data_files

    try:
        if path.is_dir():
            return "dir:" + _sha256_files(sorted(p for p in path.rglob("*") if p.is_file()), known)
        if path.is_file():
            return "file:" + _sha256_files([path, *_data_files(path)], known)
    except OSError as exc:
        return f"unreadable:{path}:{exc.errno}"
    return f"missing:{path}"


def _weights_id(spec: ModelSpec, study) -> str:
    """The model's weights by hash, without loading the model."""
    from ..models.base import file_sha256

    name = study.model or spec.name
    checkpoint = str(study.checkpoint) if study.checkpoint else spec.checkpoint
    if checkpoint:
        try:
            return f"{name}:{file_sha256(checkpoint)}"
        except OSError:
            return f"{name}:missing:{checkpoint}"
    if name == "litemedsam":
        from ..models.litemedsam import bundled_checkpoint

        return f"{name}:{bundled_checkpoint()[1]}"
    return name


def _study_key(study, base: dict[str, Any], keys: dict[str, str], spec: ModelSpec, *, rtstruct: bool,
               register: bool, known: FileHashes) -> str:
    """SHA-256 of everything a study's result depends on (``--rtstruct`` only for DICOM folders,
    ``--no-register`` only for prompts taken ``from:`` another study)."""
    prompts = study.prompts
    if prompts.kind in ("file", "rtstruct", "seg"):
        prompt_id = _content_hash(Path(prompts.value), known)
    elif prompts.kind == "from":
        prompt_id = "from:" + keys.get(prompts.value, "?")
    else:
        prompt_id = f"{prompts.kind}:{prompts.value}"
    parts = {**base, "image": _content_hash(Path(study.image), known), "series_uid": study.series_uid,
             "window": study.window, "modality": study.modality, "prompts": prompt_id,
             "weights": _weights_id(spec, study), "device": spec.device}
    if rtstruct and Path(study.image).is_dir():
        parts["rtstruct"] = True
    if prompts.kind == "from":
        parts["register"] = register
    if study.detector:
        parts["detector"] = study.detector
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _levels(studies: list) -> list[list]:
    """Studies in waves: those taking prompts ``from:`` another study come in a wave after it."""
    by_id = {s.case_id: s for s in studies}
    depth: dict[str, int] = {}

    def level(study, seen=()) -> int:
        if study.case_id not in depth:
            if study.prompts.kind == "from" and study.prompts.value in by_id and study.case_id not in seen:
                depth[study.case_id] = 1 + level(by_id[study.prompts.value], (*seen, study.case_id))
            else:
                depth[study.case_id] = 0
        return depth[study.case_id]

    for s in studies:
        level(s)
    waves: list[list] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for s in studies:
        waves[depth[s.case_id]].append(s)
    return waves


def _source_of(study, studies: list, store: ResultStore, outdir: Path) -> dict[str, Any] | None:
    """What a ``from:`` study needs of its source: its image and its label map (None if it has none)."""
    source = next(s for s in studies if s.case_id == study.prompts.value)
    row = store.study(source.case_id)
    labels = outdir / source.case_id / LABELS_NRRD
    if row is None or row["status"] != "done" or not labels.is_file():
        return None  # the worker then fails the study with a one-line error
    return {"case_id": source.case_id, "image": str(source.image), "series_uid": source.series_uid,
            "labels": labels.read_bytes()}


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in options.items():
        out[k] = asdict(v) if hasattr(v, "__dataclass_fields__") else v
    return out


# --- engines -----------------------------------------------------------------------------------

class _executor:
    """``with _executor(...) as execute: for result in execute(tasks, on_start)``: results as they finish.

    At most one task per worker is handed out at a time, and ``on_start(task)`` is called just
    before, so that the studies the database marks as in flight are the ones really running."""

    def __init__(self, engine: str, spec: ModelSpec, *, workers: int, address: str | None):
        self.engine, self.spec, self.workers, self.address = engine, spec, workers, address
        self._pool = None
        self._ray_started = False
        self._actors: list = []
        self._actor_class = None

    def __enter__(self) -> Callable[..., Iterator[dict[str, Any]]]:
        return self.run

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._actors:
            import ray

            for actor in self._actors:
                ray.kill(actor)
        if self._ray_started:
            import ray

            ray.shutdown()

    def run(self, tasks: list[Task], on_start: Callable[[Task], None]) -> Iterator[dict[str, Any]]:
        if not tasks:
            return
        if self.engine == "ray":
            yield from self._ray(tasks, on_start)
        elif self.workers == 1:
            for task in tasks:
                on_start(task)
                yield run_task(task, self.spec)
        else:
            yield from self._processes(tasks, on_start)

    # local worker processes
    def _new_pool(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_watch_parent, initargs=(os.getpid(),))

    def _processes(self, tasks: list[Task], on_start) -> Iterator[dict[str, Any]]:
        """A pool of processes. When one dies, the pool breaks and every study it was running is
        suspect: each runs again alone, and one that breaks the pool alone is that study's failure."""
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        queue = list(tasks)
        suspects: set[str] = set()
        running: dict[Any, Task] = {}
        while queue or running:
            if self._pool is None:
                self._pool = self._new_pool()
            while queue and len(running) < self.workers:
                alone = queue[0].study.case_id in suspects
                if alone and running or any(t.study.case_id in suspects for t in running.values()):
                    break
                task = queue.pop(0)
                on_start(task)
                running[self._pool.submit(run_task, task, self.spec)] = task
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            broken = []
            for future in done:
                task = running.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    broken.append(task)
            if broken:  # the pool is unusable: every study still in it shares the suspicion
                broken += list(running.values())
                running.clear()
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
                for task in broken:
                    if task.study.case_id in suspects and len(broken) == 1:
                        yield _died(task, "the worker process died while running this study (twice; a crash or "
                                          "the out-of-memory killer); run fewer workers or check its image")
                    else:
                        suspects.add(task.study.case_id)
                        queue.insert(0, task)

    # Ray actors
    def _ray(self, tasks: list[Task], on_start) -> Iterator[dict[str, Any]]:
        from ..errors import require

        ray = require("ray", "the Ray engine", extra="ray")
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise BatchError(f"expected a Ray cluster at {self.address or 'a new local one'}, found none "
                                 f"({' '.join(str(exc).split())[:160]}); check --ray-address") from None
            self._ray_started = True
        if not self._actors:
            self._start_actors(ray)
        idle = list(self._actors)
        queue = list(tasks)
        pending: dict[Any, tuple[Task, Any]] = {}
        while queue or pending:
            while queue and idle:
                actor, task = idle.pop(), queue.pop(0)
                on_start(task)
                pending[actor.run.remote(task)] = (task, actor)
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            task, actor = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # the actor's process died: only its study fails
                self._actors.remove(actor)
                replacement = self._actor_class.remote(self.spec)
                self._actors.append(replacement)
                idle.append(replacement)
                yield _died(task, f"the Ray worker died while running this study "
                                  f"({' '.join(str(exc).split())[:120]}); run the batch again to retry it")
                continue
            except ray.exceptions.RayError as exc:
                idle.append(actor)
                yield _died(task, f"Ray could not run this study ({type(exc).__name__}); run the batch again")
                continue
            idle.append(actor)
            yield result

    def _start_actors(self, ray) -> None:
        """``workers`` actors, each with the CPUs it can have on one node and a GPU (or a share) when there is one."""
        import dataclasses

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        cpus = max(1, min(self.spec.threads or 1, int(max((n.get("CPU", 1) for n in nodes), default=1))))
        gpus = ray.cluster_resources().get("GPU", 0)
        gpu_share = min(1.0, gpus / self.workers) if gpus else 0
        self.spec = dataclasses.replace(self.spec, threads=cpus)
        self._actor_class = ray.remote(num_cpus=cpus, num_gpus=gpu_share)(RayStudyWorker)
        self._actors = [self._actor_class.remote(self.spec) for _ in range(self.workers)]
        try:
            ray.get([a.ready.remote() for a in self._actors], timeout=RAY_READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise BatchError(f"expected {self.workers} Ray workers with {cpus} CPU(s)"
                             f"{f' and {gpu_share:g} GPU' if gpu_share else ''} each, found the cluster could not "
                             f"start them in {RAY_READY_TIMEOUT_S} s (it has {ray.cluster_resources()}); use fewer "
                             "--workers or --threads") from None


#: how long Ray may take to place and start the workers before the batch gives up
RAY_READY_TIMEOUT_S = 300


def _died(task: Task, error: str) -> dict[str, Any]:
    return {"case_id": task.study.case_id, "status": "failed", "stage": "worker", "error": error}


def _watch_parent(parent: int) -> None:
    """In a pool worker: exit when the batch that started it is gone (a killed driver leaves no orphans)."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="medsam3d-parent-watch").start()


class RayStudyWorker:
    """A Ray actor: loads its model once (on first study) and runs studies one at a time."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        from .worker import cap_threads

        cap_threads(spec.threads)

    def ready(self) -> bool:
        return True

    def run(self, task: Task) -> dict[str, Any]:
        return run_task(task, self.spec)


# --- results -----------------------------------------------------------------------------------

def collect_results(store: ResultStore, studies: list, outdir: Path, *, manifest: Path, manifest_sha256: str,
                    settings: dict[str, Any], register: bool = True) -> dict[str, Any]:
    """The results document (``results.json``) from the database, with each patient's follow-up."""
    from .. import __version__

    order = {s.case_id: s for s in studies}
    entries, lesions, failures = [], [], []
    for row in store.studies():
        study = order.get(row["case_id"])
        if study is None:
            continue
        record = json.loads(row["record"]) if row["record"] else None
        files = json.loads(row["files"]) if row["files"] else {}
        flags = sorted({f for o in (record or {}).get("objects", []) for f in o.get("flags", [])})
        entries.append({"case_id": row["case_id"], "patient_id": row["patient_id"], "timepoint": row["timepoint"],
                        "order": json.loads(row["sort_key"]), "row": row["row"], "modality": row["modality"],
                        "status": row["status"], "metadata": json.loads(row["metadata"] or "{}"),
                        "image": row["image"], "prompts": row["prompts"], "error": row["error"], "stage": row["stage"],
                        "flags": flags, "files": files, "timings": json.loads(row["timings"] or "{}"),
                        "record": record})
        if row["status"] == "failed":
            failures.append({"case_id": row["case_id"], "row": row["row"], "stage": row["stage"],
                             "error": row["error"]})
        for obj in (record or {}).get("objects", []):
            lesions.append({"case_id": row["case_id"], "patient_id": row["patient_id"],
                            "timepoint": row["timepoint"], "modality": row["modality"], **lesion_facts(obj)})
    entries.sort(key=lambda e: (e["patient_id"], e["order"], e["case_id"]))
    followup = _follow_up(entries, order, register=register, store=store)
    done = sum(e["status"] == "done" for e in entries)
    return {"format": RESULTS_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "medsam3d_version": __version__,
            "manifest": {"path": str(manifest), "sha256": manifest_sha256}, "settings": settings,
            "summary": {"total": len(entries), "done": done, "failed": len(entries) - done,
                        "skipped": (store.runs()[-1].get("skipped") or 0) if store.runs() else 0},
            "studies": entries, "lesions": lesions, "followup": followup, "failures": failures}


def _follow_up(entries: list[dict[str, Any]], studies: dict[str, Any], *, register: bool,
               store: ResultStore) -> list[dict[str, Any]]:
    """Each patient's done studies followed over time (see :mod:`medsam3d.followup`); a
    registration whose two studies are unchanged is taken from the database."""
    from ..followup import follow_up
    from ..io import load

    done = [e for e in entries if e["status"] == "done"]
    inputs = []
    for e in done:
        thickness = _axial_spacing(e["record"]["input"]["grid"]["affine"])
        entry = {"case_id": e["case_id"], "patient_id": e["patient_id"], "timepoint": e["timepoint"],
                 "order": e["order"], "modality": e["modality"],
                 "lesions": [{**lesion_facts(o), "slice_thickness_mm": thickness} for o in e["record"]["objects"]],
                 "prompts_transferred": studies[e["case_id"]].prompts.kind == "from"}
        transfer = (e["files"] or {}).get("transfer")
        if transfer and transfer.get("registration"):  # registered onto its source: re-used if that is the baseline
            entry["registration"] = transfer["registration"]
        inputs.append(entry)
    if not inputs:
        return []
    keys = {e["case_id"]: (store.study(e["case_id"]) or {"key": ""})["key"] for e in done}
    baselines: dict[tuple, dict[str, Any]] = {}
    for entry in sorted(inputs, key=lambda e: e["order"]):
        baseline = baselines.setdefault((entry["patient_id"], entry["modality"]), entry)
        pair = f"{keys[entry['case_id']]}:{keys[baseline['case_id']]}:{register}"
        cached = store.registration(pair) if baseline is not entry and "registration" not in entry else None
        if cached is not None:
            entry["registration"] = {**cached, "case_id": entry["case_id"], "to": baseline["case_id"]}

    def load_image(case_id: str):
        study = studies[case_id]
        return load(study.image, series_uid=study.series_uid)

    try:
        followed = follow_up(inputs, load_image=load_image, register=register)
    except Exception as exc:  # the studies are committed: their exports must still be written
        log.error("the follow-up could not be computed (%s: %s); the results are written without it",
                  type(exc).__name__, " ".join(str(exc).split())[:200])
        return []
    store.save_registrations({f"{keys[r['case_id']]}:{keys[r['to']]}:{register}": r
                              for patient in followed for r in patient.get("registration", [])
                              if r.get("case_id") in keys and r.get("to") in keys})
    return followed


def _axial_spacing(affine: list[list[float]]) -> float:
    """The spacing of the voxel axis closest to the superior direction (the slice thickness of an axial series)."""
    import numpy as np

    columns = np.asarray(affine, float)[:3, :3]
    axis = int(np.argmax(np.abs(columns[2]) / np.linalg.norm(columns, axis=0)))
    return round(float(np.linalg.norm(columns[:, axis])), 4)


def results_csv(results: dict[str, Any]) -> str:
    """One row per lesion per study (a failed study: one row with its error), with the metadata columns."""
    tracks = {}
    for patient in results.get("followup", []):
        for lesion in patient.get("lesions", []):
            for point in lesion.get("by_timepoint", []):
                if point.get("label") is not None:
                    tracks[(point["case_id"], point["label"])] = lesion["track"]
    meta_columns = sorted({k for s in results["studies"] for k in s.get("metadata", {})})
    renamed = {k: f"meta_{k}" if k in CSV_COLUMNS else k for k in meta_columns}  # never overrides a result
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*CSV_COLUMNS, *renamed.values()], lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    for study in results["studies"]:
        base = {renamed[k]: _cell(v) for k, v in study.get("metadata", {}).items()}
        base.update({"case_id": study["case_id"], "patient_id": _cell(study["patient_id"]),
                     "timepoint": study["timepoint"], "modality": study.get("modality"), "status": study["status"],
                     "error": _cell(study.get("error"))})
        objects = (study.get("record") or {}).get("objects", [])
        if not objects:
            writer.writerow(base)
        for obj in objects:
            f = lesion_facts(obj)
            lo, hi = f["volume_ml_range"] or (None, None)
            writer.writerow({**base, **{k: f[k] for k in ("label", "volume_ml", "long_axis_mm",
                                                          "short_axis_mm", "max_diameter_3d_mm")},
                             "name": _cell(f["name"]),
                             "volume_ml_low": lo, "volume_ml_high": hi, "touches_border": int(f["touches_border"]),
                             "flags": ";".join(f["flags"]), "track": tracks.get((study["case_id"], f["label"]))})
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    """A text cell a spreadsheet will not run as a formula (``=``, ``+``, ``-``, ``@`` first: quoted)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _write_exports(results: dict[str, Any], outdir: Path, *, pseudonymise: bool, report: bool) -> None:
    from ..io._atomic import atomic_path

    shared = results
    if pseudonymise:
        from .privacy import pseudonymise as pseudonymised

        shared = pseudonymised(results)
    with atomic_path(outdir / "results.json") as tmp:
        tmp.write_text(json.dumps(shared, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    with atomic_path(outdir / "results.csv") as tmp:
        tmp.write_text(results_csv(shared), encoding="utf-8")
    if report:
        from .html import write_report

        write_report(results, outdir, pseudonymise=pseudonymise)
