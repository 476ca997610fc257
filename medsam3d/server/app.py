"""The HTTP API v1 of ``medsam3d serve`` (FastAPI): :func:`create_app` builds it from settings.

Routes (every one but ``/health`` and ``/openapi.json`` needs ``Authorization: Bearer TOKEN``
when the server has a token): ``POST /v1/sessions`` (the raw bytes of a volume) ->
``GET``/``DELETE /v1/sessions/{sid}``; ``POST /v1/sessions/{sid}/segment`` and ``/refine`` ->
a job; ``GET /v1/jobs/{jid}`` (polling), ``/events`` (server-sent events), ``DELETE`` (cancel),
``/record``, ``/labels``, ``/mesh``. Errors are ``{"detail": "<one line>"}`` with a 4xx status
(400 bad input, 401 token, 404 unknown id, 408 upload stalled, 409 not finished, 413 too large,
422 bad prompt or body, 429 too many, 503 busy); a 5xx is a bug. The token is checked before a
request's body is read or parsed. An error never shows the server's temporary folder: paths in
it read ``<upload>``. The guide's server page has the details.

The request log holds methods, route templates (``/v1/sessions/{sid}``), statuses and times;
the server's own lines hold session and job ids, shapes and timings: never a file name, a
query string or anything read from the image's header.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Union

from ..errors import GeometryError, Medsam3dError, PromptError, VolumeIOError, require

require("fastapi", "the medsam3d server", extra="server")
require("uvicorn", "the medsam3d server", extra="server")

import fastapi  # noqa: E402 - after the one-line message of a missing extra
from fastapi import Depends, Header, Query, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402
from starlette.requests import ClientDisconnect  # noqa: E402

from . import ServerSettings, is_loopback  # noqa: E402
from .jobs import FINAL_STATES, Job, JobRunner, JobStateError, NotFoundError, ServerBusyError, ServerLimitError  # noqa: E402,E501
from .sessions import ServerSession, SessionStore  # noqa: E402
from .uploads import UploadTimeout, UploadTooLarge, load_upload, upload_suffix  # noqa: E402

log = logging.getLogger(__name__)

#: what a refused request may still send, read and dropped, so that its client reads the answer
DRAIN_BYTES = 64 << 20
#: seconds a refused request's client may pause its body before the server stops reading it
DRAIN_IDLE_S = 2.0
#: seconds between two keep-alive comments of an event stream
KEEPALIVE_S = 15.0
#: the parts of a validation error's location that name a type of a union, not a field
_TYPE_TAG = re.compile(r"^(int|str|float|bool|dict|list)(\[.*\])?$")
#: the routes without ids, logged by their path when no route template is known
_PLAIN_PATHS = ("/health", "/openapi.json")


class RequestError(Medsam3dError, ValueError):
    """A request whose body or query is not what the route takes (HTTP 422)."""


_STATUS = ((UploadTooLarge, 413), (UploadTimeout, 408), (ServerLimitError, 429), (ServerBusyError, 503),
           (NotFoundError, 404), (JobStateError, 409), (PromptError, 422), (RequestError, 422), (VolumeIOError, 400),
           (GeometryError, 400))


def status_of(exc: Medsam3dError) -> int:
    """The HTTP status of a medsam3d error (see the module docstring); 400 for any other."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 400


class EngineOptions(BaseModel):
    """The engine's options a client may set (the model and its checkpoint are the server's)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    fast: bool = Field(False, description="the speed preset (CLI --fast)")
    taper: float | None = Field(None, ge=0, le=10, allow_inf_nan=False,
                                description="end-slice taper power (default 2; 0: off; at most 10)")
    zoom: bool = Field(True, description="encode a crop around the prompts (false: whole slices)")
    stride: int | None = Field(None, ge=1, le=64, description="encode every N-th slice first")
    window: str | None = Field(None, max_length=64, description="CT preset, LEVEL,WIDTH, percentile or roi")
    modality: str | None = Field(None, max_length=8, description="CT, MR, PT or US")
    detector: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                 description="the registered detector that answers text prompts "
                                             "(default ct-anatomy; a name, never a path or weights)")


class SegmentRequest(BaseModel):
    """Prompts (a medsam3d prompt document, version 1 or 2), engine options, and whether to mesh."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompts: Union[dict[str, Any], list[Any]]
    options: EngineOptions = Field(default_factory=EngineOptions)
    mesh: bool = False


class RefineRequest(BaseModel):
    """A box on one slice of an existing object (name or label), replacing its box there or added."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    object: Union[int, str]
    slice: int = Field(ge=0)
    box: list[int] = Field(min_length=4, max_length=4)
    replace: bool = True
    mesh: bool | None = Field(None, description="surface properties in the record (default: the segmentation's)")


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

    # --- errors: one line each -------------------------------------------------------------
    @app.exception_handler(Medsam3dError)
    async def _medsam3d_error(_request, exc: Medsam3dError):
        return JSONResponse({"detail": scrub(_one_line(str(exc)))}, status_code=status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if not _TYPE_TAG.match(str(p))) or "request"
        more = f" ({len(errors) - 1} more)" if len(errors) > 1 else ""
        detail = f"expected a valid {where}, found: {first.get('msg')}{more}"
        return JSONResponse({"detail": scrub(_one_line(detail))}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        return JSONResponse({"detail": scrub(_one_line(str(exc.detail)))}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(_request, exc: Exception):
        log.error("internal error: %s", type(exc).__name__, exc_info=exc)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__} (see the server's log)"},
                            status_code=500)

    app.add_middleware(_Guard, settings=settings)

    # --- auth (checked first by _Guard, before any body is read; again here for the schema) ---
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
            size = await _receive(request, path, limit, ClientDisconnect, settings.upload_idle_s)
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
        options = _engine_options(body.options)
        _check_finite(body.prompts)
        objects = prompts_from(body.prompts, session.volume)  # a bad prompt: 422 now, not a failed job later
        _text_detectors(objects, options)
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


def _check_finite(value: Any) -> None:
    """422 when a JSON value holds NaN or an infinity (Python's JSON reader accepts them)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise RequestError(f"expected finite numbers in the prompts, found {item}")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


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


def _engine_options(options) -> dict[str, Any]:
    """The engine's keyword arguments for a request's options (checked: 422 on a bad one)."""
    from ..preprocess import MODALITIES, parse_window
    from ..propagate import PropagationConfig

    out: dict[str, Any] = {"zoom": 1.0 if options.zoom else None, "taper": 2.0 if options.taper is None else
                           float(options.taper), "config": PropagationConfig.fast() if options.fast
                           else PropagationConfig()}
    if options.stride is not None:
        out["stride"] = int(options.stride)
    if options.window is not None:
        parse_window(options.window)
        out["window"] = options.window
    if options.modality is not None:
        modality = options.modality.strip().upper()
        if modality not in MODALITIES:
            raise RequestError(f"expected a modality among {', '.join(MODALITIES)}, found {options.modality!r}")
        out["modality"] = modality
    if options.detector is not None:
        out["detector"] = _registered_detector(options.detector)
    return out


def _registered_detector(name: str) -> str:
    """``name`` if it is a registered detector (built with the server's defaults), else a 422."""
    from ..detect import available_detectors

    names = available_detectors()
    if name.strip().lower() not in names:
        raise RequestError(f"expected a detector among {', '.join(names)}, found {name!r}")
    return name.strip().lower()


def _text_detectors(objects, options: dict[str, Any]) -> None:
    """Text entries: their detectors must be registered names; without one, ``ct-anatomy`` answers them."""
    texts = [o for o in objects if o.text is not None and not o.boxes]
    for obj in texts:
        if obj.detector is not None:
            _registered_detector(obj.detector)
    if texts and "detector" not in options:
        options["detector"] = "ct-anatomy"


async def _receive(request, path: Path, limit: int, disconnect: type[Exception], idle_s: float) -> int:
    """Stream the request's body into ``path`` (a new file), stopping at ``limit`` bytes (413), or when
    no byte came for ``idle_s`` seconds (408)."""
    size = 0
    try:
        with open(path, "xb") as out:
            stream = request.stream().__aiter__()
            while True:
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), idle_s)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise UploadTimeout(f"expected the upload's bytes to keep coming, found none for {idle_s:g} s "
                                        f"(after {size >> 20} MB); send it again") from None
                size += len(chunk)
                if size > limit:  # the middleware reads and drops what follows (see _Guard)
                    raise UploadTooLarge(f"expected an upload of at most {limit >> 20} MB, found more; start the "
                                         "server with a larger --max-upload-mb, or crop the volume")
                out.write(chunk)
    except disconnect:
        raise VolumeIOError("expected the whole upload, found the connection closed before its end") from None
    if size == 0:
        raise VolumeIOError("expected the bytes of a volume in the request's body, found an empty body")
    return size


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


def _one_line(text: str) -> str:
    return str(text).replace("\r", " ").replace("\n", " ").strip()


class _Guard:
    """ASGI middleware: the token, the Host check of a server without a token, the body size limits,
    the request log.

    With a token, a request to ``/v1/...`` without ``Authorization: Bearer TOKEN`` (compared in
    constant time) gets 401 here, before its body is read or parsed: an unauthenticated client
    learns nothing from validation errors.

    A server without a token answers only requests addressed to a loopback name (127.0.0.1,
    localhost, ::1): a web page a browser on this machine shows cannot reach it through a name
    that resolves to 127.0.0.1 (DNS rebinding). A body whose Content-Length passes the route's
    limit (the upload's ``max_upload_mb``, else ``max_json_kb``) gets a 413 before it reaches a
    route; a chunked JSON body is counted as it arrives. Before any error answer, what is left of
    the request's body (at most :data:`DRAIN_BYTES`, while it keeps coming) is read and dropped,
    so that the client reads the answer. Each request is logged as method, route template,
    status and milliseconds.
    """

    def __init__(self, app, *, settings: ServerSettings):
        self.app = app
        self.settings = settings
        self.token = settings.token.encode("ascii") if settings.token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 0}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        upload = scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/sessions"
        limit = (self.settings.max_upload_mb << 20) if upload else (self.settings.max_json_kb << 10)
        seen = {"bytes": 0, "ended": scope["method"] in ("GET", "HEAD", "DELETE") and "content-length" not in headers
                and "transfer-encoding" not in headers}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if message["status"] >= 400:
                    await finish_body()
            await send(message)

        async def finish_body():
            """Read and drop the rest of a refused request's body before answering: a client that
            is still sending (urllib sends ``Connection: close``) would otherwise see the closed
            connection reset under it and never read the answer."""
            if seen["ended"] or (headers.get("expect", "").lower() == "100-continue" and not seen["bytes"]):
                return
            seen["ended"] = True
            await _drain(receive)

        async def receiving():
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                seen["ended"] = True
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > limit and not upload:  # the upload route counts its own (413)
                    raise fastapi.HTTPException(413, f"expected a request body of at most {limit >> 10} kB, found "
                                                     "more")
            return message

        try:
            refusal = self._refusal(scope, headers)
            if refusal is not None:
                await _answer(sending, *refusal)
            else:
                await self.app(scope, receiving, sending)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or (scope["path"] if scope["path"] in _PLAIN_PATHS else "(no route)")
            log.info("%s %s %d %.0f ms", scope["method"], path, status["code"],
                     1000 * (time.perf_counter() - t0))

    def _refusal(self, scope, headers: dict[str, str]) -> tuple[int, str, dict[str, str] | None] | None:
        """(status, one line, headers) of a request refused before it reaches a route, or None."""
        if self.token is not None and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            scheme, _, given = headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1"), self.token):
                return (401, "expected the header Authorization: Bearer <token>, found none or a wrong token",
                        {"WWW-Authenticate": "Bearer"})
        if self.settings.token is None:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if host and not is_loopback(name):
                return (400, "expected a request to a loopback name (127.0.0.1, localhost, ::1), found another Host; "
                             "a server reached by other names needs a token (--token-file)", None)
        length = headers.get("content-length")
        if length is not None:
            upload = scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/sessions"
            limit = (self.settings.max_upload_mb << 20) if upload else (self.settings.max_json_kb << 10)
            try:
                size = int(length)
            except ValueError:
                return 400, "expected a whole number as Content-Length, found another value", None
            if size > limit:
                what = f"an upload of at most {limit >> 20} MB" if upload else f"a body of at most {limit >> 10} kB"
                return 413, f"expected {what}, found Content-Length {size}; start the server with larger limits", None
        return None


async def _drain(receive) -> None:
    """Read and drop what is left of a request's body: at most :data:`DRAIN_BYTES`, while it keeps coming."""
    dropped = 0
    while dropped <= DRAIN_BYTES:
        try:
            message = await asyncio.wait_for(receive(), DRAIN_IDLE_S)
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _answer(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})
