"""The HTTP API v1 of ``medsam3d serve`` (FastAPI): :func:`create_app` builds it from settings.

Routes (every one but ``/health`` and ``/openapi.json`` needs ``Authorization: Bearer TOKEN``
when the server has a token): ``POST /v1/sessions`` (the raw bytes of a volume) ->
``GET``/``DELETE /v1/sessions/{sid}``; ``POST /v1/sessions/{sid}/segment`` and ``/refine`` ->
a job; ``GET /v1/jobs/{jid}`` (polling), ``/events`` (server-sent events), ``DELETE`` (cancel),
``/record``, ``/labels``, ``/mesh``. Errors are ``{"detail": "<one line>"}`` with a 4xx status
(400 bad input, 401 token, 404 unknown id, 408 upload stalled, 409 not finished, 413 too large,
422 bad prompt or body, 429 too many, 503 busy); a 5xx is a bug. The token is checked before a
request's body is read or parsed. An error never shows the server's temporary folder: paths in
it read ``<upload>``. The guide's server page has the details. The gate in front of the routes
(token, Host, sizes, request log) is :mod:`.guard`; the bodies, their checks and each error's
status are :mod:`.requests`; an upload's streaming and loading :mod:`.uploads`.

The request log holds methods, route templates (``/v1/sessions/{sid}``), statuses and times;
the server's own lines hold session and job ids, shapes and timings: never a file name, a
query string or anything read from the image's header.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from ..errors import Medsam3dError, PromptError, VolumeIOError, require

require("fastapi", "the medsam3d server", extra="server")
require("uvicorn", "the medsam3d server", extra="server")

import fastapi  # noqa: E402 - after the one-line message of a missing extra
from fastapi import Depends, Header, Query, Request  # noqa: E402
from fastapi.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.requests import ClientDisconnect  # noqa: E402

from . import ServerSettings  # noqa: E402
from .guard import Guard  # noqa: E402
from .jobs import FINAL_STATES, Job, JobRunner, JobStateError, NotFoundError  # noqa: E402
from .requests import (RefineRequest, RequestError, SegmentRequest, add_error_handlers, check_finite,  # noqa: E402
                       engine_options, text_detectors)
from .sessions import ServerSession, SessionStore  # noqa: E402
from .uploads import load_upload, receive_upload, upload_suffix  # noqa: E402

log = logging.getLogger(__name__)

#: seconds between two keep-alive comments of an event stream
KEEPALIVE_S = 15.0


def create_app(settings: ServerSettings | None = None, *, model=None):
    """The FastAPI application of ``settings`` (default: :class:`ServerSettings`'s defaults).

    ``model``: a loaded :class:`~medsam3d.models.SliceModel` to serve (tests, a host process
    that has one); otherwise the settings' model is loaded now, once, and shared by every
    session. The server's temporary folder, its sessions and its worker live as long as the
    application: they are closed when it shuts down (its lifespan's end) or the process exits.
    """
    import atexit

    from .. import __version__

    settings = settings or ServerSettings()
    if settings.token is not None and not (settings.token.isascii() and settings.token.isprintable()):
        raise Medsam3dError("expected a token of printable ASCII characters, found other characters; write one with: "
                            "python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
    if model is None:
        from ..models import load_model, set_threads

        if settings.threads is not None:
            set_threads(settings.threads)
        t0 = time.perf_counter()
        model = load_model(settings.model_name, checkpoint=settings.checkpoint, device=settings.device,
                           trust_checkpoint=settings.trust_checkpoint)
        log.info("model %s loaded on %s in %.1f s", model.name, model.device, time.perf_counter() - t0)
    store = SessionStore(settings, model)

    def finished(job: Job) -> None:
        try:
            store.get(job.session_id)  # touches it: the TTL counts from the job's end
        except NotFoundError:
            pass

    hidden = re.compile("|".join(re.escape(p) for p in sorted({str(store.root), os.path.realpath(store.root)},
                                                               key=len, reverse=True)) + r"""[^\s'"(),;]*""")

    def scrub(text: str) -> str:
        """``text`` with every path inside the server's temporary folder replaced by ``<upload>``."""
        return hidden.sub("<upload>", text)

    runner = JobRunner(max_queue=settings.max_queue, on_finish=finished, scrub=scrub)

    def shutdown() -> None:
        runner.close()
        store.close()

    atexit.register(shutdown)

    @asynccontextmanager
    async def lifespan(_app):
        log.info("serving %s on %s:%d (token %s; at most %d sessions x %d MB of embeddings, TTL %.0f s)",
                 model.name, settings.host, settings.port, "required" if settings.token else "not required",
                 settings.max_sessions, settings.cache_mb, settings.session_ttl_s)
        yield
        shutdown()
        atexit.unregister(shutdown)

    app = fastapi.FastAPI(
        title="medsam3d", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
        openapi_url="/openapi.json",
        description="Prompt-driven 3D segmentation of medical volumes: sessions, prompts, refines (HTTP API v1).")
    app.state.settings, app.state.store, app.state.runner, app.state.model = settings, store, runner, model

    add_error_handlers(app, scrub)
    app.add_middleware(Guard, settings=settings)

    # --- auth (checked first by Guard, before any body is read; again here for the schema) ---
    token = settings.token.encode("ascii") if settings.token else None

    bearer = HTTPBearer(auto_error=False, description="the server's token (--token-file)")

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        given = credentials.credentials.encode("latin-1", "replace") if credentials is not None else b""
        if not hmac.compare_digest(given, token):
            raise fastapi.HTTPException(401, "expected the header Authorization: Bearer <token>, found none or a "
                                             "wrong token", headers={"WWW-Authenticate": "Bearer"})

    v1 = fastapi.APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    # --- routes ----------------------------------------------------------------------------
    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness, versions and the model (no token needed)."""
        return {"status": "ok", "medsam3d_version": __version__,
                "model": {"name": model.name, "device": str(model.device), "runtime": model.runtime,
                          "weights_sha256": model.weights_sha256},
                "versions": _versions(), "sessions": store.count(), "max_sessions": settings.max_sessions,
                "token_required": token is not None}

    @v1.post("/sessions", status_code=201, openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def open_session(request: Request, series_uid: str | None = Query(None, pattern=r"^[0-9.]{1,64}$"),
                           x_filename: str | None = Header(None)) -> JSONResponse:
        """Open a session with an uploaded volume: the raw bytes of a NIfTI, NRRD, MetaImage or MGH file,
        or a zip of one DICOM series (``X-Filename`` gives the format by its suffix)."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/octet-stream":
            raise VolumeIOError(f"expected Content-Type: application/octet-stream (the file's raw bytes), found "
                                f"{kind[:40] or 'none'}")
        suffix = upload_suffix(x_filename)
        limit = settings.max_upload_mb << 20
        folder = await run_in_threadpool(store.reserve)
        t0 = time.perf_counter()
        try:
            path = folder / f"upload{suffix}"
            size = await receive_upload(request, path, limit, ClientDisconnect, settings.upload_idle_s)
            volume = await run_in_threadpool(
                load_upload, path, suffix, series_uid=series_uid, max_voxels=settings.max_voxels,
                max_unzipped_bytes=settings.max_unzipped_mb << 20, max_zip_files=settings.max_zip_files)
            session = store.open(folder, volume, input_name=f"upload{suffix}")
        except BaseException:
            store.release(folder)
            raise
        log.info("session %s opened: shape %s, %.1f MB uploaded, %.2f s", session.id, list(volume.shape),
                 size / 1e6, time.perf_counter() - t0)
        return JSONResponse(_describe(session, store), status_code=201)

    @v1.get("/sessions/{sid}")
    def get_session(sid: str) -> dict[str, Any]:
        """The session's volume, its current objects and its embedding cache."""
        session = store.get(sid)
        info = session.engine.model.info()
        return {**_describe(session, store),
                "objects": [{"label": o.label, "name": o.name} for o in session.engine.objects],
                "cache": {k: info[k] for k in ("entries", "bytes", "hits", "misses", "max_bytes")}}

    @v1.delete("/sessions/{sid}", status_code=204)
    def delete_session(sid: str) -> Response:
        """Close the session: its jobs are cancelled, its files deleted."""
        store.delete(sid)
        return Response(status_code=204)

    @v1.post("/sessions/{sid}/segment", status_code=202)
    def segment(sid: str, body: SegmentRequest) -> JSONResponse:
        """Segment the prompts (replacing the session's): a job; its record, labels and meshes when done."""
        from ..prompts import prompts_from

        session = store.get(sid)
        options = engine_options(body.options)
        check_finite(body.prompts)
        objects = prompts_from(body.prompts, session.volume)  # a bad prompt: 422 now, not a failed job later
        text_detectors(objects, options)
        prompts, mesh = body.prompts, body.mesh

        def work(progress):
            return session.engine.segment(prompts, progress=progress, mesh=mesh, options=options, check=job.check)

        job = Job(session.id, "segment", work)
        return _submit(session, job)

    @v1.post("/sessions/{sid}/refine", status_code=202)
    def refine(sid: str, body: RefineRequest) -> JSONResponse:
        """Add (or replace) a box on one slice of an object and segment again with the cached embeddings."""
        from ..prompts import parse_prompts

        session = store.get(sid)
        parse_prompts({"version": 1, "objects": [{"name": "refine", "slice": body.slice, "box": body.box}]},
                      session.volume)  # a box outside the slice: 422 now
        pending = any(not j.final and j.kind == "segment" for j in store.jobs_of(session))
        if not pending:  # else the segmentation before it decides (the job fails with one line)
            known = session.engine.objects
            if not known:
                raise PromptError("expected a segmentation to refine, found none in this session; POST "
                                  "/v1/sessions/{sid}/segment first")
            if not any(body.object in (o.label, o.name) for o in known):
                names = ", ".join(f"{o.name!r} (label {o.label})" for o in known)
                raise PromptError(f"expected an object of this session ({names}), found {body.object!r}")
        obj, k, box, replace, mesh = body.object, body.slice, list(body.box), body.replace, body.mesh

        def work(progress):
            return session.engine.refine(obj, slice=k, box=box, replace=replace, progress=progress, mesh=mesh,
                                         check=job.check)

        job = Job(session.id, "refine", work)
        return _submit(session, job)

    def _submit(session: ServerSession, job: Job) -> JSONResponse:
        """Attach the job to its session (404 if it closed meanwhile), then queue it: a session deleted
        from now on cancels it."""
        store.add_job(session, job)
        try:
            runner.submit(job)
        except BaseException:
            store.remove_job(session, job)
            raise
        return JSONResponse({"job_id": job.job_id}, status_code=202)

    @v1.get("/jobs/{jid}")
    def get_job(jid: str) -> dict[str, Any]:
        """The job's state and progress (poll this, or stream /events)."""
        job, _ = store.job(jid)
        return job.view()

    @v1.get("/jobs/{jid}/events")
    async def job_events(jid: str, request: Request) -> StreamingResponse:
        """Server-sent events: the job's JSON at each change, ending at a final state."""
        job, _ = store.job(jid)

        async def stream():
            sent, quiet = -1, time.monotonic()
            while True:
                version = job.version
                if version != sent:
                    view = job.view()
                    sent, quiet = version, time.monotonic()
                    yield f"id: {version}\ndata: {json.dumps(view)}\n\n"
                    if view["state"] in FINAL_STATES:
                        return
                elif time.monotonic() - quiet > KEEPALIVE_S:
                    quiet = time.monotonic()
                    yield ": keep-alive\n\n"
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.1)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @v1.delete("/jobs/{jid}", status_code=202)
    def cancel_job(jid: str) -> JSONResponse:
        """Cancel: a queued job at once, a running one when the engine next reports progress."""
        job, _ = store.job(jid)
        if not job.final:
            job.cancel()
            log.info("job %s: cancel asked", job.job_id)
        return JSONResponse(job.view(), status_code=202)

    @v1.get("/jobs/{jid}/record")
    def job_record(jid: str) -> JSONResponse:
        """The case record (the CLI's --json report)."""
        job, _ = store.job(jid)
        return JSONResponse(_result(job).to_dict())

    @v1.get("/jobs/{jid}/labels")
    def job_labels(jid: str, format: str = Query("seg.nrrd")) -> StreamingResponse:
        """The label map on the session volume's grid, as a Slicer .seg.nrrd or a NIfTI .nii.gz."""
        from ..io import save

        if format not in ("seg.nrrd", "nii.gz"):
            raise RequestError(f"expected format seg.nrrd or nii.gz, found {format[:20]!r}")
        job, session = store.job(jid)
        record = _result(job)
        path = session.folder / f"{job.job_id}-labels.{format}"
        with session.lock:
            _open_session(session)
            if not path.exists():
                save(record.labels, path, reference=session.volume)
                job.files[f"labels.{format}"] = path
            return _file(path, f"labels.{format}")

    @v1.get("/jobs/{jid}/mesh")
    def job_mesh(jid: str, label: int | None = Query(None, ge=1), format: str = Query("stl")) -> StreamingResponse:
        """One object's surface in RAS mm (STL or VTP); ``label`` default: the first object's."""
        from ..mesh import label_mesh, write_mesh

        if format not in ("stl", "vtp"):
            raise RequestError(f"expected format stl or vtp, found {format[:20]!r}")
        job, session = store.job(jid)
        record = _result(job)
        objects = {o.label: o for o in record.objects}
        value = label if label is not None else next(iter(objects), None)
        if value not in objects:
            raise RequestError(f"expected a label among {sorted(objects)}, found {label}")
        if not objects[value].voxels:
            raise RequestError(f"expected a segmented object, found label {value} empty: it has no surface")
        path = session.folder / f"{job.job_id}-mesh{value}.{format}"
        with session.lock:
            _open_session(session)
            if not path.exists():
                write_mesh(label_mesh(record.labels, value), path, label=value)
                job.files[f"mesh{value}.{format}"] = path
            return _file(path, f"label{value}.{format}")

    app.include_router(v1)
    return app


def _open_session(session: ServerSession) -> None:
    """404 when the session was deleted or expired (call under its lock: nothing is written into it then)."""
    if session.closed:
        raise NotFoundError("expected a job of an open session, found its session deleted or expired; open one "
                            "with POST /v1/sessions")


def _file(path: Path, filename: str) -> StreamingResponse:
    """The file at ``path`` as a download, opened now (under the session's lock): deleting the session
    afterwards does not cut the answer short."""
    handle = open(path, "rb")
    size = os.fstat(handle.fileno()).st_size

    def chunks():
        with handle:
            while chunk := handle.read(1 << 20):
                yield chunk

    return StreamingResponse(chunks(), media_type="application/octet-stream",
                             headers={"Content-Length": str(size),
                                      "Content-Disposition": f'attachment; filename="{filename}"'})


def _result(job: Job):
    """The record of a finished job, or 409 naming its state."""
    if job.state != "done":
        why = f" ({job.error})" if job.error else ""
        raise JobStateError(f"expected a done job, found it {job.state}{why}; poll GET /v1/jobs/{{jid}} until done")
    return job.result


def _describe(session: ServerSession, store: SessionStore) -> dict[str, Any]:
    from ..preprocess import guess_modality

    volume = session.volume
    return {"session_id": session.id, "shape": list(volume.shape), "spacing": [float(s) for s in volume.spacing],
            "affine": [[float(v) for v in row] for row in volume.affine], "axcodes": "".join(volume.axcodes),
            "modality": guess_modality(volume)[0], "expires_in_s": round(store.expires_in(session), 1)}


def _versions() -> dict[str, str | None]:
    import platform
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("numpy", "torch", "onnxruntime", "SimpleITK", "nibabel", "fastapi", "uvicorn"):
        try:
            out[name.lower()] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name.lower()] = None
    return out
