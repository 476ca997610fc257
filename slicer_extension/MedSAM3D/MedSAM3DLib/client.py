"""A client for the ``medsam3d serve`` HTTP API v1, in the standard library only.

Vendored in the Slicer module so that a Slicer that talks to a server needs neither torch nor
medsam3d nor any package beyond Python's own (``urllib``, ``json``). It implements the API as
specified for issue 25:

========================================  =====================================================
call                                      route
========================================  =====================================================
:meth:`Client.health`                     ``GET /health``
:meth:`Client.create_session`             ``POST /v1/sessions`` (the volume's bytes: NIfTI, NRRD,
                                          or a .zip of one DICOM series; ``X-Filename`` names it)
:meth:`Client.session`                    ``GET /v1/sessions/{sid}``
:meth:`Client.delete_session`             ``DELETE /v1/sessions/{sid}``
:meth:`Client.segment`                    ``POST /v1/sessions/{sid}/segment`` -> job id
:meth:`Client.refine`                     ``POST /v1/sessions/{sid}/refine`` -> job id
:meth:`Client.job`, :meth:`Client.wait`   ``GET /v1/jobs/{jid}`` (polled)
:meth:`Client.events`                     ``GET /v1/jobs/{jid}/events`` (server-sent events)
:meth:`Client.cancel`                     ``DELETE /v1/jobs/{jid}``
:meth:`Client.record`                     ``GET /v1/jobs/{jid}/record``
:meth:`Client.labels`                     ``GET /v1/jobs/{jid}/labels?format=seg.nrrd|nii.gz``
:meth:`Client.mesh`                       ``GET /v1/jobs/{jid}/mesh?label=N&format=stl|vtp``
========================================  =====================================================

Every error the server reports (``{"detail": "..."}`` with a 4xx or 5xx status) is raised as
:class:`ServerError` with the status and the server's one-line detail; a server that cannot be
reached raises :class:`ConnectionFailed`. The token is sent as ``Authorization: Bearer``; the
client never logs it. Proxies from the environment are ignored for loopback addresses (a
``http_proxy`` would otherwise swallow ``http://127.0.0.1:...``).

Where the token may go:

* redirects are never followed (urllib's default handler would resend ``Authorization`` to
  wherever a ``3xx`` points, another host included): a redirect is raised as
  :class:`Redirected`, with the ``Location`` it names, so the user can enter that URL;
* the token is sent over plain ``http://`` only to a loopback host (``127.0.0.1``, ``::1``,
  ``localhost``: an SSH tunnel ends there); to any other host the client refuses
  (:class:`InsecureTransport`) unless it was made with ``allow_insecure_http=True`` (the
  module's "Allow insecure HTTP" box, unticked by default and not saved). ``https://`` is
  always allowed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, Iterator, Optional

API_VERSION = "v1"
FINAL_STATES = ("done", "failed", "cancelled")
#: the suffixes the server reads (its format is told by the file name's suffix)
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".zip")


class ClientError(Exception):
    """Base class of the client's errors."""


class ConnectionFailed(ClientError):
    """The server could not be reached (refused, timed out, name unknown)."""


class ServerError(ClientError):
    """The server answered with an error status; ``status`` and ``detail`` say which and why."""

    def __init__(self, status: int, detail: str, route: str = ""):
        self.status = int(status)
        self.detail = detail
        self.route = route
        super().__init__(f"{route}: HTTP {status}: {detail}" if route else f"HTTP {status}: {detail}")


class Redirected(ServerError):
    """The server answered with a redirect (``3xx``), which the client does not follow (the token
    would go along); ``location`` is where it pointed."""

    def __init__(self, status: int, location: str, route: str = ""):
        self.location = location
        super().__init__(status, f"the server redirects to {location or '(no Location)'}; the client does not "
                                 "follow redirects (the token would go along): enter the final URL instead", route)


class InsecureTransport(ClientError):
    """A token would travel in clear text (``http://`` to a host other than this machine)."""


class JobFailed(ClientError):
    """A job ended in state ``failed``; ``job`` is its last state (``job["error"]`` says why)."""

    def __init__(self, job: Dict[str, Any]):
        self.job = job
        super().__init__(f"job {job.get('job_id')} failed: {job.get('error') or 'no reason given'}")


class JobCancelled(ClientError):
    """A job ended in state ``cancelled``."""

    def __init__(self, job: Dict[str, Any]):
        self.job = job
        super().__init__(f"job {job.get('job_id')} was cancelled")


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Raise :class:`Redirected` instead of following a redirect (with the Authorization header)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        route = urllib.parse.urlsplit(req.full_url).path
        try:
            fp.close()
        except Exception:  # noqa: BLE001 - the response is dropped either way
            pass
        raise Redirected(code, newurl, f"{req.get_method()} {route}")


class Client:
    """One ``medsam3d serve`` server at ``url`` (``http://host:port``), with its ``token``.

    ``timeout`` bounds each HTTP request (an upload of a large volume may need more: pass
    ``timeout`` to :meth:`create_session`). The token may also come from the environment
    variable ``MEDSAM3D_TOKEN`` (read when the client is made, so that it need not be stored
    in a scene file). With a token, a plain ``http://`` URL to a host other than this machine
    raises :class:`InsecureTransport` unless ``allow_insecure_http`` (see the module docstring).
    """

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 60.0,
                 allow_insecure_http: bool = False):
        url = (url or "").strip()
        if "://" not in url:
            url = "http://" + url
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(f"expected a server URL like http://127.0.0.1:8000, found {url!r}")
        self.url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self.token = token if token is not None else os.environ.get("MEDSAM3D_TOKEN") or None
        self.timeout = float(timeout)
        self.allow_insecure_http = bool(allow_insecure_http)
        loopback = _is_loopback(parts.hostname)
        if self.token and parts.scheme == "http" and not loopback and not self.allow_insecure_http:
            raise InsecureTransport(
                f"refusing to send the token in clear text to {parts.hostname} over http://; use the server's "
                "https:// address or an SSH tunnel (ssh -L 8000:127.0.0.1:8000 host, then http://127.0.0.1:8000), "
                "or tick 'Allow insecure HTTP' if this network is trusted")
        handlers = [_RefuseRedirects()] + ([urllib.request.ProxyHandler({})] if loopback else [])
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:  # never the token
        return f"Client({self.url!r}, token={'set' if self.token else 'none'})"

    # ------------------------------------------------------------------ transport
    def _request(self, method: str, route: str, *, body: Optional[bytes] = None, json_body: Any = None,
                 headers: Optional[Dict[str, str]] = None, query: Optional[Dict[str, Any]] = None,
                 timeout: Optional[float] = None, stream: bool = False):
        url = self.url + route
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body, allow_nan=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.setdefault("Accept", "application/json")
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            response = self._opener.open(request, timeout=self.timeout if timeout is None else timeout)
        except urllib.error.HTTPError as exc:
            raise ServerError(exc.code, _detail(exc), f"{method} {route}") from None
        except urllib.error.URLError as exc:
            raise ConnectionFailed(f"could not reach the medsam3d server at {self.url} ({exc.reason}); "
                                   "check that `medsam3d serve` runs there and the URL") from None
        except (ConnectionError, TimeoutError, OSError) as exc:
            raise ConnectionFailed(f"could not reach the medsam3d server at {self.url} ({exc})") from None
        if stream:
            return response
        with response:
            return response.status, response.headers, response.read()

    def _json(self, method: str, route: str, **kwargs) -> Any:
        status, headers, data = self._request(method, route, **kwargs)
        if status == 204 or not data:
            return None
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ServerError(status, f"expected JSON, found {data[:80]!r}", f"{method} {route}") from None

    # ------------------------------------------------------------------ server
    def health(self) -> Dict[str, Any]:
        """``GET /health``: status, medsam3d version, the model (name, device, runtime), sessions."""
        return self._json("GET", "/health")

    # ------------------------------------------------------------------ sessions
    def create_session(self, data: bytes, filename: str, *, series_uid: Optional[str] = None,
                       timeout: Optional[float] = None) -> Dict[str, Any]:
        """Upload a volume (its file's bytes; ``filename``'s suffix names the format) -> the session.

        Returns ``{"session_id", "shape": [I, J, K], "spacing", "affine", "axcodes", "modality",
        "expires_in_s"}``.
        """
        name = os.path.basename(filename)
        if not name.lower().endswith(VOLUME_SUFFIXES):
            raise ClientError(f"expected a volume file name ending in {', '.join(VOLUME_SUFFIXES)}, found {name!r}")
        return self._json("POST", f"/{API_VERSION}/sessions", body=bytes(data), query={"series_uid": series_uid},
                          headers={"Content-Type": "application/octet-stream", "X-Filename": name},
                          timeout=timeout if timeout is not None else max(self.timeout, 600.0))

    def create_session_from_file(self, path: str, **kwargs) -> Dict[str, Any]:
        """:meth:`create_session` with a file's content and name."""
        with open(path, "rb") as handle:
            return self.create_session(handle.read(), os.path.basename(path), **kwargs)

    def session(self, session_id: str) -> Dict[str, Any]:
        """``GET /v1/sessions/{sid}``: the session, its objects and embedding cache."""
        return self._json("GET", f"/{API_VERSION}/sessions/{_quote(session_id)}")

    def delete_session(self, session_id: str) -> None:
        """``DELETE /v1/sessions/{sid}`` (the server deletes its files)."""
        self._json("DELETE", f"/{API_VERSION}/sessions/{_quote(session_id)}")

    # ------------------------------------------------------------------ jobs
    def segment(self, session_id: str, prompts: Any, *, options: Optional[Dict[str, Any]] = None,
                mesh: bool = False) -> str:
        """Start segmenting ``prompts`` (a medsam3d prompt document) -> the job id."""
        body = {"prompts": prompts, "options": dict(options or {}), "mesh": bool(mesh)}
        return self._json("POST", f"/{API_VERSION}/sessions/{_quote(session_id)}/segment", json_body=body)["job_id"]

    def refine(self, session_id: str, obj: Any, slice_index: int, box, *, replace: bool = True) -> str:
        """Start a refine: one more box ``[i0, j0, i1, j1]`` on slice ``slice_index`` for object
        ``obj`` (name or label), re-using the session's embeddings -> the job id."""
        body = {"object": obj, "slice": int(slice_index), "box": [int(v) for v in box], "replace": bool(replace)}
        return self._json("POST", f"/{API_VERSION}/sessions/{_quote(session_id)}/refine", json_body=body)["job_id"]

    def job(self, job_id: str) -> Dict[str, Any]:
        """``GET /v1/jobs/{jid}``: state, progress ``{"done", "total", "message"}``, error."""
        return self._json("GET", f"/{API_VERSION}/jobs/{_quote(job_id)}")

    def cancel(self, job_id: str) -> None:
        """``DELETE /v1/jobs/{jid}``: ask the job to stop (it ends ``cancelled`` at its next progress step)."""
        self._json("DELETE", f"/{API_VERSION}/jobs/{_quote(job_id)}")

    def wait(self, job_id: str, *, poll_s: float = 0.5, timeout: Optional[float] = None,
             on_progress: Optional[Callable[[Dict[str, Any]], None]] = None,
             should_cancel: Optional[Callable[[], bool]] = None) -> Dict[str, Any]:
        """Poll a job until it ends; return its final state when ``done``.

        ``on_progress(job)`` is called at each poll; when ``should_cancel()`` turns true the job is
        cancelled (once) and waited for. Raises :class:`JobFailed`, :class:`JobCancelled`, or
        :class:`TimeoutError` after ``timeout`` seconds (the job is then cancelled).
        """
        start = time.monotonic()
        cancelled = False
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            state = job.get("state")
            if state == "done":
                return job
            if state == "failed":
                raise JobFailed(job)
            if state == "cancelled":
                raise JobCancelled(job)
            if not cancelled and should_cancel is not None and should_cancel():
                self.cancel(job_id)
                cancelled = True
            if timeout is not None and time.monotonic() - start > timeout:
                if not cancelled:
                    self.cancel(job_id)
                raise TimeoutError(f"job {job_id} did not finish within {timeout:.0f} s (cancelled)")
            time.sleep(poll_s)

    def events(self, job_id: str, *, timeout: Optional[float] = None) -> Iterator[Dict[str, Any]]:
        """The job's states as the server pushes them (``text/event-stream``), up to a final one."""
        response = self._request("GET", f"/{API_VERSION}/jobs/{_quote(job_id)}/events", stream=True,
                                 headers={"Accept": "text/event-stream"}, timeout=timeout)
        with response:
            data_lines = []
            for raw in response:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("data:"):
                    data_lines.append(line[5:].lstrip())
                elif not line and data_lines:
                    event = json.loads("\n".join(data_lines))
                    data_lines = []
                    yield event
                    if event.get("state") in FINAL_STATES:
                        return

    def record(self, job_id: str) -> Dict[str, Any]:
        """``GET /v1/jobs/{jid}/record``: the case record (the CLI's ``--json``), once the job is done."""
        return self._json("GET", f"/{API_VERSION}/jobs/{_quote(job_id)}/record")

    def labels(self, job_id: str, fmt: str = "seg.nrrd") -> bytes:
        """``GET /v1/jobs/{jid}/labels``: the label map's file bytes (``seg.nrrd`` or ``nii.gz``) on the
        session volume's grid."""
        if fmt not in ("seg.nrrd", "nii.gz"):
            raise ClientError(f"expected a labels format seg.nrrd or nii.gz, found {fmt!r}")
        return self._request("GET", f"/{API_VERSION}/jobs/{_quote(job_id)}/labels", query={"format": fmt},
                             headers={"Accept": "application/octet-stream"})[2]

    def mesh(self, job_id: str, label: int, fmt: str = "stl") -> bytes:
        """``GET /v1/jobs/{jid}/mesh``: one object's surface (RAS mm) as ``stl`` or ``vtp`` bytes."""
        if fmt not in ("stl", "vtp"):
            raise ClientError(f"expected a mesh format stl or vtp, found {fmt!r}")
        return self._request("GET", f"/{API_VERSION}/jobs/{_quote(job_id)}/mesh",
                             query={"label": int(label), "format": fmt},
                             headers={"Accept": "application/octet-stream"})[2]


def _quote(value: str) -> str:
    return urllib.parse.quote(str(value), safe="")


def _detail(exc: "urllib.error.HTTPError") -> str:
    """The server's one-line ``detail`` (or the body's start, or the reason)."""
    try:
        data = exc.read()
    except Exception:  # noqa: BLE001 - a broken body still has a status
        data = b""
    try:
        detail = json.loads(data.decode("utf-8")).get("detail")
        if isinstance(detail, str):
            return detail
        if detail is not None:
            return json.dumps(detail)[:300]
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        pass
    text = data.decode("utf-8", "replace").strip().splitlines()
    return text[0][:300] if text else str(exc.reason)
