"""medsam3d over HTTP: sessions that keep a volume and its slice embeddings, prompts, refines.

``medsam3d serve`` runs :func:`create_app` under uvicorn (the ``server`` extra: FastAPI and
uvicorn). One model is loaded per server process and shared by every session; each session
holds one uploaded volume, its own bounded embedding cache (:class:`medsam3d.session.CachedModel`)
and the results of its last jobs. Jobs (segmentations, refines) run one at a time in a worker
thread, report progress and can be cancelled. The HTTP API (v1) and the security model are in
the guide's server page (``docs/server.md``).

Nothing here imports FastAPI until :func:`create_app` is called.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["ServerSettings", "create_app", "is_loopback"]

#: the API's version, the first part of every route but /health and /openapi.json
API_VERSION = "v1"


@dataclass(frozen=True)
class ServerSettings:
    """What a server is allowed to do, and with which model.

    Limits: an upload holds at most ``max_upload_mb`` MB (a zipped DICOM series at most
    ``max_unzipped_mb`` MB and ``max_zip_files`` files once unpacked) and at most ``max_voxels``
    voxels; at most ``max_sessions`` sessions are open, each idle one closes after
    ``session_ttl_s`` seconds (its files deleted); each session's embedding cache holds at most
    ``cache_mb`` MB; at most ``max_queue`` jobs wait for the worker; each session keeps the
    results of its last ``keep_jobs`` jobs; an upload whose body pauses for more than
    ``upload_idle_s`` seconds is refused (408) and its slot given back. ``token`` (printable
    ASCII): the bearer token every route but ``/health`` and ``/openapi.json`` then requires
    (required beyond loopback: see
    :func:`medsam3d.cli.serve.settings_from_args`). ``workdir``: the folder the server's own
    temporary folder is made in (default: the system's). The model (``model_name``,
    ``checkpoint``, ``device``, ``trust_checkpoint``, ``threads``) comes from the command line
    only, never from a request.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_upload_mb: int = 1024
    max_unzipped_mb: int = 4096
    max_zip_files: int = 10000
    max_voxels: int = 1 << 28
    max_sessions: int = 4
    session_ttl_s: float = 1800.0
    cache_mb: int = 512
    max_queue: int = 8
    keep_jobs: int = 8
    max_json_kb: int = 1024
    upload_idle_s: float = 30.0
    model_name: str = "litemedsam"
    checkpoint: str | None = None
    device: str = "auto"
    trust_checkpoint: bool = False
    threads: int | None = None
    workdir: str | os.PathLike | None = None
    #: seconds between two sweeps for idle sessions (default: a tenth of the TTL, 1 to 30 s)
    sweep_s: float | None = None

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def memory_bound_mb(self) -> int:
        """The embedding caches' bound over all sessions (MB): ``cache_mb`` x ``max_sessions``."""
        return self.cache_mb * self.max_sessions

    def as_dict(self) -> dict[str, Any]:
        """The settings without the token (for logs and /health)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "token"}
        out["workdir"] = str(self.workdir) if self.workdir is not None else None
        return out


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``; any other
    name or address (0.0.0.0, ::, a host name) listens, or may listen, beyond this machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def create_app(settings: ServerSettings | None = None, *, model=None):
    """The FastAPI application (see :func:`medsam3d.server.app.create_app`)."""
    from .app import create_app as _create_app

    return _create_app(settings, model=model)

