"""The server's configuration (:class:`ServerConfig`) and the error a refused request raises."""

from __future__ import annotations

import dataclasses
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

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        for name in ("max_jobs", "max_upload_bytes", "max_rows", "max_enrich_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server setting {name} must be >= 1, got {getattr(self, name)}")
        if self.max_queued < 0:
            raise ConfigError(f"server setting max_queued must be >= 0, got {self.max_queued}")
        if self.token is not None and len(self.token) < 16:
            raise ConfigError("the server token must be at least 16 characters long")

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
        """Remove the server's secrets from a text."""
        for secret in self.secrets():
            text = text.replace(secret, "***")
        return text


class RequestError(Exception):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
