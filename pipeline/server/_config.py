"""The server's configuration (:class:`ServerConfig`) and the error a refused request raises."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from pipeline._errors import ConfigError

__all__ = ["DEFAULT_KEY_ENVS", "RequestError", "ServerConfig"]

DEFAULT_KEY_ENVS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AZURE_OPENAI_API_KEY")
"""The environment variables a request may name as ``api_key_env`` unless told otherwise."""


@dataclasses.dataclass(kw_only=True)
class ServerConfig:
    """How the server runs and what it accepts.

    Attributes:
        data_dir: Where jobs, their inputs and their results are kept.
        token: The bearer token every request must present (``None``: no authentication,
            for a loopback-only server).
        max_jobs: Jobs running at once; more wait as ``queued``.
        max_queued: Jobs waiting at most; past that a submission gets 429.
        max_upload_bytes: Largest request body (413 past it).
        max_rows: Most rows in one job (422 past it).
        max_enrich_rows: Most rows in one ``POST /v1/enrich``.
        base_url: The API root jobs use unless they name one of ``allowed_base_urls``.
        allowed_base_urls: Other API roots a request may name.
        allowed_key_envs: Environment variables a request may name as ``api_key_env``.
        progress_interval: Seconds between progress snapshots (events, live counters).
        shutdown_grace: Seconds a stopping server waits for its jobs to record their state.
        resume_on_start: Resume at start the jobs a stopped or killed server left unfinished.
        max_rpm: Requests per minute on one key and model, shared by every job and enrich call
            (``None``: what the provider's rate-limit headers say). A job may ask for less for
            itself, never more, and never changes what the other jobs get.
        max_tpm: Tokens per minute on one key and model, likewise.
        max_concurrency: Most requests in flight for one job (its ``concurrency`` and
            ``max_concurrency`` may be lower, never higher).
        max_jobs_per_token: Jobs running or waiting at once for one bearer token.
        max_streams_per_token: Event, result and dead-letter streams open at once for one
            bearer token (429 past it).
        max_connections: Open HTTP connections at most; it is lowered at start to fit under
            the descriptor limit. At the cap the connection idle the longest is closed for a
            new one, or the new one is refused when none is idle.
        header_timeout: Seconds a connection may take to send a request's headers (from its
            opening, or from the end of its previous response).
        keep_alive_timeout: Seconds an idle keep-alive connection stays open.
    """

    data_dir: Path
    token: str | None = None
    max_jobs: int = 4
    max_queued: int = 64
    max_upload_bytes: int = 64 << 20
    max_rows: int = 1_000_000
    max_enrich_rows: int = 100
    base_url: str | None = None
    allowed_base_urls: tuple[str, ...] = ()
    allowed_key_envs: tuple[str, ...] = DEFAULT_KEY_ENVS
    progress_interval: float = 0.2
    shutdown_grace: float = 10.0
    resume_on_start: bool = True
    max_rpm: float | None = None
    max_tpm: float | None = None
    max_concurrency: int = 64
    max_jobs_per_token: int = 16
    max_streams_per_token: int = 32
    max_connections: int = 1000
    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        for name in _AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise ConfigError(f"server setting {name} must be >= 1, got {getattr(self, name)}")
        if self.max_queued < 0:
            raise ConfigError(f"server setting max_queued must be >= 0, got {self.max_queued}")
        for name in ("max_rpm", "max_tpm", "header_timeout", "keep_alive_timeout"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"server setting {name} must be a number > 0, got {value!r}")
        if self.token is not None:
            _check_token(self.token)

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["token"] = "***" if self.token else None
        return f"ServerConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def secrets(self) -> list[str]:
        """Values that must never appear in a response or a log: the token and the keys."""
        found = [self.token] if self.token else []
        found += [os.environ[n] for n in self.allowed_key_envs if os.environ.get(n)]
        return [s for s in found if len(s) >= 4]

    def scrub(self, text: str) -> str:
        """Remove the server's secrets and where its data directory is from a text."""
        for secret in self.secrets():
            text = text.replace(secret, "***")
        where = str(self.data_dir.resolve())
        for place in (where, str(self.data_dir)):
            text = text.replace(place.rstrip(os.sep) + os.sep, "")
        return text.replace(where, "<data>")


_AT_LEAST_ONE = (
    "max_jobs",
    "max_upload_bytes",
    "max_rows",
    "max_enrich_rows",
    "max_concurrency",
    "max_jobs_per_token",
    "max_streams_per_token",
    "max_connections",
)


def _check_token(token: str) -> None:
    if token != token.strip():
        raise ConfigError(
            "the server token starts or ends with whitespace, which no client could send "
            "back (the Authorization header is trimmed): remove it"
        )
    if len(token) < 16:
        raise ConfigError("the server token must be at least 16 characters long")


class RequestError(Exception):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
