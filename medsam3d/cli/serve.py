"""``medsam3d serve``: the HTTP server (:mod:`medsam3d.server`) under uvicorn.

Refuses to start (one line, exit code 2) when it would listen beyond loopback without a token,
or send a token over plain HTTP beyond loopback without TLS (``--ssl-keyfile`` and
``--ssl-certfile``) or ``--allow-insecure-http`` (a TLS reverse proxy in front).
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
from pathlib import Path

from ..errors import Medsam3dError
from ._common import _fail, _non_negative_float, _positive_int

log = logging.getLogger("medsam3d.server")

#: the shortest token accepted beyond loopback
MIN_TOKEN_CHARS = 16


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``medsam3d serve`` (the command's parser calls this)."""
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 or a LAN address needs "
                        "a token and TLS)")
    p.add_argument("--port", type=_positive_int, default=8000, help="TCP port (default 8000)")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token", help="the bearer token clients send (visible to other users in the process list: "
                                      "prefer --token-file)")
    auth.add_argument("--token-file", type=Path, help="a file holding the bearer token (its first line)")
    p.add_argument("--max-upload-mb", type=_positive_int, default=1024, metavar="N",
                   help="largest upload in MB (default 1024)")
    p.add_argument("--max-unzipped-mb", type=_positive_int, default=4096, metavar="N",
                   help="largest zipped DICOM series once unpacked, in MB (default 4096)")
    p.add_argument("--max-voxels", type=_positive_int, default=1 << 28, metavar="N",
                   help="largest volume in voxels (default 268435456 = 512 x 512 x 1024)")
    p.add_argument("--max-sessions", type=_positive_int, default=4, metavar="N", help="open sessions at most (4)")
    p.add_argument("--session-ttl", type=_non_negative_float, default=1800.0, metavar="S",
                   help="close a session idle for S seconds and delete its files (default 1800)")
    p.add_argument("--cache-mb", type=_positive_int, default=512, metavar="N",
                   help="each session's embedding cache in MB (default 512; all sessions: N x --max-sessions)")
    p.add_argument("--max-queue", type=_positive_int, default=8, metavar="N", help="jobs waiting at most (8)")
    p.add_argument("--upload-timeout", type=_non_negative_float, default=30.0, metavar="S",
                   help="refuse an upload (408) whose bytes stop coming for S seconds (default 30)")
    p.add_argument("--model", default="litemedsam", help="litemedsam (default, bundled), medsam, sam-vit-b/l/h")
    p.add_argument("--checkpoint", type=Path, help="weights file (required for medsam and sam-*)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint that only loads by unpickling Python objects (runs code from the file)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="cap the CPU threads used (torch, ONNX Runtime)")
    p.add_argument("--ssl-keyfile", type=Path, help="TLS private key (PEM), passed to uvicorn")
    p.add_argument("--ssl-certfile", type=Path, help="TLS certificate chain (PEM), passed to uvicorn")
    p.add_argument("--allow-insecure-http", action="store_true",
                   help="serve plain HTTP beyond loopback (only behind a reverse proxy that terminates TLS)")


def settings_from_args(args: argparse.Namespace):
    """The :class:`~medsam3d.server.ServerSettings` of the command line, or one line saying why the
    server must not start (see the module docstring)."""
    from ..server import ServerSettings, is_loopback

    token = args.token
    if args.token_file is not None:
        token = _read_token(args.token_file)
    if token is not None:
        token = token.strip()
        if not token or any(c.isspace() for c in token) or not token.isprintable():
            raise Medsam3dError("expected a token of printable characters without spaces, found an empty or "
                                "blank one; write one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
        if not token.isascii():
            raise Medsam3dError("expected a token of ASCII characters (an HTTP header carries no others), found "
                                "others; write one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
    tls = (args.ssl_keyfile, args.ssl_certfile)
    if any(tls) and not all(tls):
        raise Medsam3dError("expected both --ssl-keyfile and --ssl-certfile for TLS, found only one")
    for path in tls:
        if path is not None and not Path(path).is_file():
            raise Medsam3dError(f"expected a PEM file at {path}, found nothing readable there")
    if not is_loopback(args.host):
        if token is None:
            raise Medsam3dError(f"expected --token-file (or --token) when listening beyond loopback (--host "
                                f"{args.host}), found none; add a token, or listen on 127.0.0.1")
        if len(token) < MIN_TOKEN_CHARS:
            raise Medsam3dError(f"expected a token of at least {MIN_TOKEN_CHARS} characters beyond loopback, found "
                                f"{len(token)}; use python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
        if not all(tls) and not args.allow_insecure_http:
            raise Medsam3dError(f"expected TLS (--ssl-keyfile and --ssl-certfile) when listening beyond loopback "
                                f"(--host {args.host}) with a token, found none; or give --allow-insecure-http "
                                "behind a reverse proxy that terminates TLS")
    return ServerSettings(
        host=args.host, port=args.port, token=token, max_upload_mb=args.max_upload_mb,
        max_unzipped_mb=args.max_unzipped_mb, max_voxels=args.max_voxels, max_sessions=args.max_sessions,
        session_ttl_s=args.session_ttl, cache_mb=args.cache_mb, max_queue=args.max_queue,
        upload_idle_s=args.upload_timeout, model_name=args.model,
        checkpoint=str(args.checkpoint) if args.checkpoint else None, device=args.device,
        trust_checkpoint=args.trust_checkpoint, threads=args.threads)


def _read_token(path: Path) -> str:
    try:
        info = os.stat(path)
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Medsam3dError(f"expected a readable token file at {path}, found it unreadable "
                            f"({type(exc).__name__}); check the path") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the token file can be read by other users: chmod 600 it")
    lines = text.splitlines()
    return lines[0] if lines else ""


def _cmd_serve(args: argparse.Namespace) -> int:
    """Check the options, load the model once, and serve until interrupted (exit code 0)."""
    try:
        settings = settings_from_args(args)
        from ..errors import require

        require("fastapi", "the medsam3d server", extra="server")
        uvicorn = require("uvicorn", "the medsam3d server", extra="server")
    except Medsam3dError as exc:
        return _fail(str(exc))
    from ..server import create_app

    for name in ("medsam3d.server", "uvicorn.error"):  # the server's own lines: ids, shapes, timings
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    for name in ("medsam3d.io", "medsam3d.session"):  # their info lines name files and series
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).getEffectiveLevel()))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                ssl_keyfile=str(args.ssl_keyfile) if args.ssl_keyfile else None,
                ssl_certfile=str(args.ssl_certfile) if args.ssl_certfile else None,
                timeout_graceful_shutdown=5, server_header=False)
    return 0
