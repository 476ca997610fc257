"""Jobs: segmentations and refines, run one at a time in one worker thread, with progress and cancel.

One worker per process: the model is shared by every session and a CPU has no room for two
segmentations at once, so jobs queue (at most ``max_queue`` waiting: a further one is refused
with 429). A job reports ``progress`` ``(done, total, message)`` each time the engine reports
it (after each encoded batch of slices). Cancelling a queued job ends it at once; cancelling a
running one sets a flag that the next progress report turns into a private exception, which
the engine lets through and the worker records as ``cancelled``. The flag is also checked
(:meth:`Job.check`) before the engine starts and after it returns, before the session takes
the results: a job cancelled while the engine fused, measured or meshed (stages that report no
progress) publishes nothing and ends ``cancelled``. The session keeps its previous prompts and
results, and the embeddings encoded so far stay in its cache. Only jobs still queued count
against ``max_queue`` (a cancelled one waiting in the queue does not).
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import Medsam3dError

log = logging.getLogger(__name__)

#: the states a job ends in
FINAL_STATES = ("done", "failed", "cancelled")


class ServerLimitError(Medsam3dError):
    """Too many sessions open or jobs waiting (HTTP 429): try again later."""


class ServerBusyError(Medsam3dError):
    """The server is shutting down or cannot take work now (HTTP 503)."""


class NotFoundError(Medsam3dError, LookupError):
    """No such session or job (HTTP 404): unknown, expired or deleted."""


class JobStateError(Medsam3dError):
    """A job's result asked for before it is done (HTTP 409)."""


class _Cancelled(Exception):
    """Raised from the engine's progress callback to stop a cancelled job."""


Work = Callable[[Callable[[int, int, str], None]], Any]


@dataclass
class Job:
    """One segmentation or refine of one session; :meth:`view` is what the API shows of it."""

    session_id: str
    kind: str
    work: Work = field(repr=False)
    job_id: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    state: str = "queued"
    done: int = 0
    total: int = 0
    message: str = "queued"
    error: str | None = None
    result: Any = field(default=None, repr=False)
    created: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    #: bumped at every change, so that a stream of events sends each state once
    version: int = 0
    files: dict[str, Any] = field(default_factory=dict, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def view(self) -> dict[str, Any]:
        with self._lock:
            return {"job_id": self.job_id, "session_id": self.session_id, "kind": self.kind, "state": self.state,
                    "progress": {"done": self.done, "total": self.total, "message": self.message},
                    "error": self.error}

    def _set(self, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(self, key, value)
            self.version += 1

    def progress(self, done: int, total: int, message: str) -> None:
        """The engine's progress callback: records the step, or stops the job when it is cancelled."""
        if self._cancel.is_set():
            raise _Cancelled()
        self._set(done=int(done), total=int(total), message=str(message))

    def check(self) -> None:
        """Stop here (a private exception the worker records as ``cancelled``) when the job is cancelled."""
        if self._cancel.is_set():
            raise _Cancelled()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Ask the job to stop: at once when queued, at the engine's next progress report when running."""
        self._cancel.set()
        with self._lock:
            if self.state == "queued":
                self.state, self.message = "cancelled", "cancelled before it started"
                self.version += 1


class JobRunner:
    """The worker thread and its bounded queue (see the module docstring)."""

    def __init__(self, *, max_queue: int, on_finish: Callable[[Job], None] | None = None,
                 scrub: Callable[[str], str] | None = None):
        self.max_queue = int(max_queue)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._queued: dict[str, Job] = {}  # in the queue, not yet taken by the worker
        self._scrub = scrub or (lambda text: text)
        self._lock = threading.Lock()
        self._closed = False
        self._on_finish = on_finish
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._run, name="medsam3d-jobs", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._closed:
                raise ServerBusyError("expected a running server, found it shutting down; try again later")
            if self._count_waiting() >= self.max_queue:
                raise ServerLimitError(f"expected at most {self.max_queue} jobs waiting, found the queue full; "
                                       "try again when a job has finished")
            self._queued[job.job_id] = job
        self._queue.put(job)
        log.info("job %s queued (%s, session %s)", job.job_id, job.kind, job.session_id)
        return job

    def waiting(self) -> int:
        """The jobs waiting for the worker (queued and not cancelled)."""
        with self._lock:
            return self._count_waiting()

    def _count_waiting(self) -> int:
        return sum(1 for job in self._queued.values() if not job.final)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._queued.pop(job.job_id, None)
            with job._lock:
                if job.state != "queued":  # cancelled while it waited
                    continue
                job.state, job.message = "running", "started"
                job.version += 1
            self.current = job
            t0 = time.perf_counter()
            try:
                result = job.work(job.progress)
            except _Cancelled:
                job._set(state="cancelled", message="cancelled", seconds=time.perf_counter() - t0)
                log.info("job %s cancelled after %.1f s", job.job_id, time.perf_counter() - t0)
            except Medsam3dError as exc:
                job._set(state="failed", error=self._scrub(_one_line(str(exc))), message="failed",
                         seconds=time.perf_counter() - t0)
                log.info("job %s failed after %.1f s (%s)", job.job_id, time.perf_counter() - t0, type(exc).__name__)
            except Exception as exc:  # a bug: keep serving, say so
                log.exception("job %s: internal error", job.job_id)
                job._set(state="failed", error=f"internal error: {type(exc).__name__} (see the server's log)",
                         message="failed", seconds=time.perf_counter() - t0)
            else:
                job._set(state="done", result=result, message="done", done=max(job.done, job.total),
                         seconds=time.perf_counter() - t0)
                log.info("job %s done in %.1f s", job.job_id, time.perf_counter() - t0)
            finally:
                self.current = None
                if self._on_finish is not None:
                    try:
                        self._on_finish(job)
                    except Exception:  # noqa: BLE001 - bookkeeping must not stop the worker
                        log.exception("job %s: after-job bookkeeping failed", job.job_id)

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, cancel the waiting and the running one, and stop the worker."""
        with self._lock:
            self._closed = True
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
        current = self.current
        if current is not None:
            current.cancel()
        self._queue.put(None)
        self._thread.join(timeout)


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ").strip()
