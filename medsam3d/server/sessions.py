"""The server's sessions: one uploaded volume each, its embedding cache, its jobs, its files.

Every file a session has (the upload, an unpacked DICOM series, label maps and meshes asked
for) lives in its own folder inside the server's temporary folder (``tempfile.mkdtemp``),
deleted with the session: by ``DELETE /v1/sessions/{sid}``, when it has been idle for the TTL
(a job queued or running keeps it open), or when the server stops. At most ``max_sessions``
are open, counting uploads in progress; each has its own
:class:`~medsam3d.session.CachedModel` bounded to ``cache_mb`` around the one shared model,
so the embeddings of all sessions take at most ``cache_mb`` x ``max_sessions``.

The server's folder is named ``medsam3d-server-<pid>-...``: at startup, the folders of that
name left by a server process that no longer runs (killed before it could clean up), owned by
this user, in the same parent folder, are deleted.

A deleted (or expired) session is marked ``closed`` under its lock before its files go: a label
map or surface being written finishes first, and a later one gets 404; a job is attached to its
session under the store's lock, only while the session is open, so that deleting the session
cancels every job it has.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..session import CachedModel, Session
from ..volume import Volume
from . import ServerSettings
from .jobs import Job, NotFoundError, ServerLimitError

log = logging.getLogger(__name__)

#: the prefix of the server's temporary folder; the process id and a random part follow
ROOT_PREFIX = "medsam3d-server-"
_ROOT_NAME = re.compile(re.escape(ROOT_PREFIX) + r"(\d+)-")


class EngineSession(Session):
    """A :class:`medsam3d.Session` whose :meth:`segment` goes through :func:`medsam3d.run_case`,
    so that a segmentation and a refine (which calls :meth:`segment` with the updated prompts)
    both return the :class:`~medsam3d.record.CaseRecord` the CLI writes. The engine options of
    the last segmentation stay for the refines that follow it, which is what lets a refine find
    its slices' embeddings in the cache (another window or crop would be other images)."""

    def __init__(self, volume: Volume, *, model: CachedModel, input_name: str | None = None):
        super().__init__(volume, model=model)
        self.last_options: dict[str, Any] = {}
        self.last_mesh = False
        self.input_name = input_name
        self.record = None

    def segment(self, prompts, *, progress=None, mesh: bool | None = None, options: dict[str, Any] | None = None,
                check: Callable[[], None] | None = None, **_):
        """Segment ``prompts`` with ``options`` (default: the last segmentation's) and publish the
        record as the session's; ``mesh`` None: the last segmentation's. ``check`` is called before
        the engine starts and after it returns, before anything is published: it raises to stop a
        cancelled job (the session then stays as it was)."""
        from ..prompts import ObjectPrompt
        from ..run import run_case

        options = dict(self.last_options if options is None else options)
        mesh = self.last_mesh if mesh is None else bool(mesh)
        if check is not None:
            check()
        before = self.model.misses
        record = run_case(self.volume, prompts, model=self.model, progress=progress, measure=True, mesh=mesh,
                          **options)
        if check is not None:
            check()  # cancelled while the engine fused, measured or meshed: nothing is published
        if self.input_name is not None:  # the server's own name for the upload, never its temporary path
            record.input = {**record.input, "path": self.input_name}
        self.objects = [ObjectPrompt.from_dict(o) for o in record.prompts["resolved"]]
        self.last_options = options
        self.last_mesh = mesh
        self.record = record
        log.info("segmentation: %d object(s), %d new encodings (%d cached)", len(self.objects),
                 self.model.misses - before, self.model.info()["entries"])
        return record

    def refine(self, obj, *, slice: int, box, replace: bool = True, progress=None, mesh: bool | None = None,
               check: Callable[[], None] | None = None, **_):
        return super().refine(obj, slice=slice, box=box, replace=replace, progress=progress, mesh=mesh, check=check)


class ServerSession:
    """One open session: its id, folder, engine session, jobs and last use (monotonic seconds)."""

    def __init__(self, session_id: str, folder: Path, engine: EngineSession):
        self.id = session_id
        self.folder = folder
        self.engine = engine
        self.jobs: list[Job] = []
        self.last_used = time.monotonic()
        self.lock = threading.Lock()
        #: set (under :attr:`lock`) when the session is deleted or expires: nothing more is written
        self.closed = False

    @property
    def volume(self) -> Volume:
        return self.engine.volume

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def busy(self) -> bool:
        return any(not job.final for job in self.jobs)


class SessionStore:
    """Open, find, expire and delete sessions within the settings' limits (see the module docstring)."""

    def __init__(self, settings: ServerSettings, model):
        self.settings = settings
        self.model = model
        parent = Path(settings.workdir) if settings.workdir is not None else Path(tempfile.gettempdir())
        remove_stale_roots(parent)
        self.root = Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-", dir=parent))  # mode 0700
        self._sessions: dict[str, ServerSession] = {}
        self._jobs: dict[str, Job] = {}
        self._pending = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        sweep = settings.sweep_s if settings.sweep_s is not None else min(30.0, max(1.0, settings.session_ttl_s / 10))
        self._sweeper = threading.Thread(target=self._sweep, args=(sweep,), name="medsam3d-sessions", daemon=True)
        self._sweeper.start()

    # --- opening -------------------------------------------------------------------------
    def reserve(self) -> Path:
        """A new session's folder, counted against ``max_sessions`` until :meth:`open` or :meth:`release`."""
        with self._lock:
            if len(self._sessions) + self._pending >= self.settings.max_sessions:
                raise ServerLimitError(f"expected at most {self.settings.max_sessions} open sessions, found them all "
                                       "in use; close one (DELETE /v1/sessions/ID) or wait for an idle one to expire")
            self._pending += 1
        try:
            return Path(tempfile.mkdtemp(prefix="s-", dir=self.root))
        except OSError:
            self.release(None)
            raise

    def release(self, folder: Path | None) -> None:
        """Give back a reservation whose upload failed, and delete its folder."""
        with self._lock:
            self._pending -= 1
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def open(self, folder: Path, volume: Volume, input_name: str | None = None) -> ServerSession:
        """The session of a loaded volume in a reserved folder; ``input_name``: what its records call
        the input (the server's name for the upload, not its path)."""
        engine = EngineSession(volume, model=CachedModel(self.model, int(self.settings.cache_mb) << 20),
                               input_name=input_name)
        session = ServerSession(secrets.token_urlsafe(16), folder, engine)
        with self._lock:
            self._pending -= 1
            self._sessions[session.id] = session
        return session

    # --- finding -------------------------------------------------------------------------
    def get(self, session_id: str) -> ServerSession:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise NotFoundError("expected an open session, found none with this id (unknown, expired or deleted); "
                                "open one with POST /v1/sessions")
        session.touch()
        return session

    def add_job(self, session: ServerSession, job: Job) -> None:
        """Keep ``job`` with its session, which must still be open (404 otherwise): a job attached
        here is cancelled when its session is deleted. The oldest finished jobs beyond ``keep_jobs``
        are forgotten."""
        with self._lock:
            if session.closed or self._sessions.get(session.id) is not session:
                raise NotFoundError("expected an open session, found none with this id (expired or deleted "
                                    "meanwhile); open one with POST /v1/sessions")
            session.jobs.append(job)
            self._jobs[job.job_id] = job
            finished = [j for j in session.jobs if j.final]
            for old in finished[: max(0, len(session.jobs) - self.settings.keep_jobs)]:
                session.jobs.remove(old)
                self._jobs.pop(old.job_id, None)
                _remove_files(old)

    def remove_job(self, session: ServerSession, job: Job) -> None:
        """Forget a job the worker refused (its queue full, the server stopping)."""
        with self._lock:
            if job in session.jobs:
                session.jobs.remove(job)
            self._jobs.pop(job.job_id, None)

    def jobs_of(self, session: ServerSession) -> list[Job]:
        """A snapshot of the session's jobs (the list changes under the store's lock)."""
        with self._lock:
            return list(session.jobs)

    def job(self, job_id: str) -> tuple[Job, ServerSession]:
        with self._lock:
            job = self._jobs.get(job_id)
            session = self._sessions.get(job.session_id) if job is not None else None
        if job is None or session is None:
            raise NotFoundError("expected a job of an open session, found none with this id (unknown, forgotten, "
                                "or its session expired or was deleted)")
        session.touch()
        return job, session

    def count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def expires_in(self, session: ServerSession) -> float:
        return max(0.0, self.settings.session_ttl_s - (time.monotonic() - session.last_used))

    # --- closing -------------------------------------------------------------------------
    def delete(self, session_id: str, reason: str = "deleted") -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
            if session is not None:
                for job in session.jobs:
                    self._jobs.pop(job.job_id, None)
        if session is None:
            raise NotFoundError("expected an open session, found none with this id (unknown, expired or deleted)")
        with session.lock:  # a label map or surface being written finishes first; later ones get 404
            session.closed = True
        for job in session.jobs:
            job.cancel()
        session.engine.model.clear()
        shutil.rmtree(session.folder, ignore_errors=True)
        log.info("session %s %s (files removed)", session.id, reason)

    def expire(self) -> list[str]:
        """Delete the sessions idle for longer than the TTL (not those with a job queued or running)."""
        now = time.monotonic()
        with self._lock:
            idle = [s.id for s in self._sessions.values()
                    if now - s.last_used > self.settings.session_ttl_s and not s.busy()]
        for session_id in idle:
            try:
                self.delete(session_id, reason="expired")
            except NotFoundError:  # deleted meanwhile
                pass
        return idle

    def _sweep(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.expire()
            except Exception:  # noqa: BLE001 - the sweeper must keep running
                log.exception("sweeping idle sessions failed")

    def close(self) -> None:
        """Stop sweeping and delete every session and the server's temporary folder."""
        self._stop.set()
        with self._lock:
            ids = list(self._sessions)
        for session_id in ids:
            try:
                self.delete(session_id, reason="closed at shutdown")
            except NotFoundError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def remove_stale_roots(parent: Path) -> list[Path]:
    """Delete the folders ``medsam3d-server-<pid>-*`` in ``parent`` that this user owns and whose
    process no longer runs (a server killed before it could clean up); the others are left."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _ROOT_NAME.match(entry.name)
        if match is None:
            continue
        try:
            info = entry.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or _alive(int(match.group(1))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    if removed:
        log.info("removed %d temporary folder(s) left by server processes that no longer run", len(removed))
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id of ours: leave it
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or a number we cannot ask about: leave it
    return True


def _remove_files(job: Job) -> None:
    for path in job.files.values():
        try:
            Path(path).unlink()
        except OSError:
            pass
