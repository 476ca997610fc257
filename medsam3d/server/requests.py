"""What a request may say: the bodies of the routes (pydantic models), their checks beyond the
schema, and the HTTP status of each medsam3d error."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import GeometryError, Medsam3dError, PromptError, VolumeIOError
from .jobs import JobStateError, NotFoundError, ServerBusyError, ServerLimitError
from .uploads import UploadTimeout, UploadTooLarge

log = logging.getLogger(__name__)

#: the parts of a validation error's location that name a type of a union, not a field
_TYPE_TAG = re.compile(r"^(int|str|float|bool|dict|list)(\[.*\])?$")


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
    prompts: dict[str, Any] | list[Any]
    options: EngineOptions = Field(default_factory=EngineOptions)
    mesh: bool = False


class RefineRequest(BaseModel):
    """A box on one slice of an existing object (name or label), replacing its box there or added."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    object: int | str
    slice: int = Field(ge=0)
    box: list[int] = Field(min_length=4, max_length=4)
    replace: bool = True
    mesh: bool | None = Field(None, description="surface properties in the record (default: the segmentation's)")


def engine_options(options) -> dict[str, Any]:
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


def text_detectors(objects, options: dict[str, Any]) -> None:
    """Text entries: their detectors must be registered names; without one, ``ct-anatomy`` answers them."""
    texts = [o for o in objects if o.text is not None and not o.boxes]
    for obj in texts:
        if obj.detector is not None:
            _registered_detector(obj.detector)
    if texts and "detector" not in options:
        options["detector"] = "ct-anatomy"


def check_finite(value: Any) -> None:
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


def add_error_handlers(app, scrub) -> None:
    """Answer every error of ``app`` with ``{"detail": "<one line>"}``: a medsam3d error with its status
    (:func:`status_of`), a body that fails the schema with 422 naming its first wrong field, and
    anything else with 500 (logged: a bug). ``scrub`` hides the server's temporary folder in the line."""

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


def _one_line(text: str) -> str:
    return str(text).replace("\r", " ").replace("\n", " ").strip()
