"""The server's gate (ASGI middleware, see :class:`Guard`): the token, the Host check of a server
without a token, the body size limits and the request log, all before a route sees a request."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

import fastapi

from . import ServerSettings, is_loopback

log = logging.getLogger(__name__)

#: what a refused request may still send, read and dropped, so that its client reads the answer
DRAIN_BYTES = 64 << 20
#: seconds a refused request's client may pause its body before the server stops reading it
DRAIN_IDLE_S = 2.0
#: the routes without ids, logged by their path when no route template is known
_PLAIN_PATHS = ("/health", "/openapi.json")


class Guard:
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
