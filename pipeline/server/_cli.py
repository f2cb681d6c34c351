"""``python -m pipeline serve``: run the job service under uvicorn until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path
from types import FrameType

import uvicorn

from pipeline._errors import ConfigError
from pipeline.server._app import create_app
from pipeline.server._config import DEFAULT_KEY_ENVS, ServerConfig
from pipeline.server._manager import JobManager

__all__ = ["DrainingServer", "build_parser", "config_from_args", "main"]


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose SIGTERM (or Ctrl-C) also drains the job manager at once.

    Uvicorn stops accepting connections and waits up to ``timeout_graceful_shutdown`` for open
    ones; meanwhile the jobs stop (their journals are their checkpoint), so their event streams
    end, and the lifespan's shutdown finds little left to wait for.
    """

    def __init__(self, config: uvicorn.Config, manager: JobManager) -> None:
        super().__init__(config)
        self.manager = manager

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Drain the jobs, then let uvicorn shut down."""
        self.manager.drain_threadsafe()
        super().handle_exit(sig, frame)


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
    return parser


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
    server_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        lifespan="on",
        timeout_graceful_shutdown=5,  # open result streams must not hold the jobs hostage
    )
    server = DrainingServer(server_config, app.state.jobs)
    try:
        server.run()
    except OSError as error:
        print(f"error: cannot serve on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    log.debug("served for %.1f s", time.monotonic() - started)
    return 0
