"""``python -m pipeline serve``: run the job service under uvicorn until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import uvicorn

from pipeline._errors import ConfigError
from pipeline.server._app import create_app
from pipeline.server._config import DEFAULT_KEY_ENVS, ServerConfig
from pipeline.server._connections import (
    BACKLOG,
    connection_cap,
    guarded_protocol,
    raise_nofile,
)
from pipeline.server._manager import JobManager

__all__ = [
    "DrainingServer",
    "build_parser",
    "config_from_args",
    "main",
    "reserved_descriptors",
    "uvicorn_config",
]


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose SIGTERM (or Ctrl-C) also drains the job manager at once.

    Uvicorn stops accepting connections and waits up to ``timeout_graceful_shutdown`` for open
    ones; meanwhile the jobs stop (their journals are their checkpoint), so their event streams
    end, and the lifespan's shutdown finds little left to wait for.
    """

    def __init__(
        self, config: uvicorn.Config, manager: JobManager, banner: str | None = None
    ) -> None:
        super().__init__(config)
        self.manager = manager
        self.banner = banner

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start as uvicorn does, then say where the service is and how it is protected."""
        await super().startup(sockets)
        if self.banner is None or not getattr(self, "servers", None):
            return
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                print(f"serving on http://{shown}:{port} {self.banner}", file=sys.stderr)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Drain the jobs, then let uvicorn shut down."""
        self.manager.drain_threadsafe()
        super().handle_exit(sig, frame)


def uvicorn_config(
    app: Any, config: ServerConfig, *, cap: int | None = None, **options: Any
) -> uvicorn.Config:
    """Return the uvicorn configuration that serves ``app`` with ``config``'s bounds.

    The HTTP protocol is uvicorn's own with a header timeout and a connection cap
    (:func:`~pipeline.server._connections.guarded_protocol`); keep-alive connections close
    after ``config.keep_alive_timeout`` idle seconds.

    Args:
        app: The ASGI app (:func:`~pipeline.server.create_app`).
        config: The server's configuration.
        cap: The connection cap (default ``config.max_connections``).
        options: More ``uvicorn.Config`` arguments (``host``, ``port``, ``log_level``...).
    """
    protocol = guarded_protocol(cap or config.max_connections, config.header_timeout)
    options.setdefault("lifespan", "on")
    options.setdefault("timeout_graceful_shutdown", 5)  # open streams must not hold jobs hostage
    return uvicorn.Config(
        app,
        http=protocol,
        timeout_keep_alive=max(1, round(config.keep_alive_timeout)),
        backlog=BACKLOG,
        **options,
    )


def reserved_descriptors(config: ServerConfig) -> int:
    """Descriptors the jobs may need besides client connections (files, provider sockets)."""
    return 64 + (config.max_jobs + 1) * (config.max_concurrency + 8)


log = logging.getLogger("pipeline.server")


def _loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m pipeline serve``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline serve",
        description="Serve LLM pipeline jobs over HTTP (FastAPI): submit, stream, cancel, resume.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (8000; 0 = any free port)")
    parser.add_argument("--data-dir", default="pipeline-data", help="where jobs are kept")
    parser.add_argument(
        "--token-env",
        default="PIPELINE_SERVER_TOKEN",
        help="environment variable holding the bearer token clients must send",
    )
    parser.add_argument("--max-jobs", type=int, default=4, help="jobs running at once (4)")
    parser.add_argument("--max-queued", type=int, default=64, help="jobs waiting at most (64)")
    parser.add_argument("--max-upload-mb", type=float, default=64.0, help="largest upload (64)")
    parser.add_argument("--max-rows", type=int, default=1_000_000, help="rows per job (1e6)")
    parser.add_argument("--max-enrich-rows", type=int, default=100, help="rows per /v1/enrich")
    parser.add_argument("--base-url", help="API root of jobs (default: the provider's)")
    parser.add_argument(
        "--allow-base-url", action="append", default=[], help="another API root jobs may name"
    )
    parser.add_argument(
        "--allow-key-env",
        action="append",
        default=None,
        help=f"a variable jobs may name as api_key_env (default: {', '.join(DEFAULT_KEY_ENVS)})",
    )
    parser.add_argument(
        "--no-resume-on-start",
        dest="resume_on_start",
        action="store_false",
        help="leave the jobs a stopped or killed server left as interrupted (default: resume)",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level (info)")
    _add_limits(parser)
    return parser


def _add_limits(parser: argparse.ArgumentParser) -> None:
    limits = parser.add_argument_group(
        "operator limits", "ceilings no request can raise (a job may ask for less for itself)"
    )
    limits.add_argument(
        "--max-rpm", type=float, help="requests/minute per API key and model, all jobs (none)"
    )
    limits.add_argument(
        "--max-tpm", type=float, help="tokens/minute per API key and model, all jobs (none)"
    )
    limits.add_argument(
        "--max-concurrency", type=int, default=64, help="requests in flight per job (64)"
    )
    limits.add_argument(
        "--max-jobs-per-token", type=int, default=16, help="jobs running or waiting (16)"
    )
    limits.add_argument(
        "--max-streams-per-token", type=int, default=32, help="open result/event streams (32)"
    )
    limits.add_argument(
        "--max-connections",
        type=int,
        default=1000,
        help="open connections (1000; lowered to fit the descriptor limit)",
    )
    limits.add_argument(
        "--header-timeout", type=float, default=10.0, help="seconds to send headers (10)"
    )
    limits.add_argument(
        "--keep-alive-timeout", type=float, default=5.0, help="idle keep-alive seconds (5)"
    )


def _check_not_self(base_url: str | None, host: str, port: int) -> None:
    """Refuse a ``--base-url`` that is this server's own address (the API would be itself)."""
    if not base_url or port == 0:
        return
    parts = urlsplit(base_url)
    same_host = parts.hostname == host or (_loopback(parts.hostname or "") and _loopback(host))
    if same_host and parts.port == port:
        raise ConfigError(
            f"--base-url {base_url} is this server's own address ({host}:{port}); start the "
            "simulated or real API on another port (python -m pipeline sim --port 8001)"
        )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Turn parsed arguments into a :class:`ServerConfig` (reading the token variable).

    Raises:
        ConfigError: A bad value, or a non-loopback host without a token.
    """
    token = os.environ.get(args.token_env) or None
    if token is None and not _loopback(args.host):
        raise ConfigError(
            f"refusing to listen on {args.host} without a token: set ${args.token_env} "
            "(clients then send 'Authorization: Bearer <token>'), or bind to 127.0.0.1"
        )
    _check_not_self(args.base_url, args.host, args.port)
    if not math.isfinite(args.max_upload_mb) or args.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    return ServerConfig(
        data_dir=Path(args.data_dir),
        token=token,
        max_jobs=args.max_jobs,
        max_queued=args.max_queued,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        max_rows=args.max_rows,
        max_enrich_rows=args.max_enrich_rows,
        base_url=args.base_url,
        allowed_base_urls=tuple(args.allow_base_url),
        allowed_key_envs=tuple(args.allow_key_env or DEFAULT_KEY_ENVS),
        resume_on_start=args.resume_on_start,
        max_rpm=args.max_rpm,
        max_tpm=args.max_tpm,
        max_concurrency=args.max_concurrency,
        max_jobs_per_token=args.max_jobs_per_token,
        max_streams_per_token=args.max_streams_per_token,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the server until Ctrl-C (``python -m pipeline serve``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot use data dir {args.data_dir!r}: {error}", file=sys.stderr)
        return 2
    app = create_app(config)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    nofile = raise_nofile()
    cap = connection_cap(config.max_connections, nofile, reserved_descriptors(config))
    server_config = uvicorn_config(
        app, config, cap=cap, host=args.host, port=args.port, log_level=args.log_level
    )
    auth = f"token from ${args.token_env}" if config.token else "none (loopback only)"
    banner = (
        f"(auth: {auth}; data dir: {config.data_dir.resolve()}; "
        f"connections: at most {cap} of {nofile} descriptors)"
    )
    server = DrainingServer(server_config, app.state.jobs, banner)
    try:
        server.run()
    except OSError as error:
        print(f"error: cannot serve on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    log.debug("served for %.1f s", time.monotonic() - started)
    return 0
