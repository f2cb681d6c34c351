"""What a request may set: a job's settings minus what names the server's files or resources.

``api_key_env`` must be a variable the server allows and ``base_url`` a URL it allows, so a
request cannot make the server send its key elsewhere; credential headers are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline._errors import ConfigError
from pipeline.jobs import JobSettings
from pipeline.server._config import RequestError, ServerConfig
from pipeline.server._limits import check_ceilings
from stages.llm._providers import SENSITIVE_HEADERS
from stages.llm._template import PromptTemplate

__all__ = ["OUTPUT", "SERVER_ONLY", "check_settings", "check_template", "job_settings"]

SERVER_ONLY = frozenset(
    {
        "resume",
        "overwrite",
        "limiter",
        "engine",
        "ray_address",
        "trace",
        "quiet",
        "input_format",
        "output_format",
        "grace",
    }
)
"""Settings a request may not give: the server decides them (or they name its resources)."""

OUTPUT = "output.jsonl"
"""The name of a job's output file in its directory."""


def _check_names(config: ServerConfig, given: Mapping[str, Any]) -> None:
    for name in sorted(given):
        if name in SERVER_ONLY:
            raise RequestError(422, f"setting {name!r} is decided by the server")
    _check_target(config, given, "")
    endpoints = given.get("endpoints")
    if isinstance(endpoints, list):
        for index, table in enumerate(endpoints):
            if isinstance(table, Mapping):
                table = {str(k).replace("-", "_"): v for k, v in table.items()}
                table.setdefault("api_key_env", table.get("key_env"))
                table.setdefault("base_url", table.get("url"))
                _check_target(config, table, f"endpoints[{index}]: ")
                check_ceilings(config, table)


def _check_target(config: ServerConfig, given: Mapping[str, Any], where: str) -> None:
    """Refuse a key variable, an API root or a credential header the server does not allow."""
    env = given.get("api_key_env")
    if env is not None and env not in config.allowed_key_envs:
        allowed = ", ".join(config.allowed_key_envs) or "none"
        raise RequestError(
            422, f"{where}api_key_env {env!r} is not allowed on this server (allowed: {allowed})"
        )
    url = given.get("base_url")
    if url is not None and url != config.base_url and url not in config.allowed_base_urls:
        raise RequestError(
            422,
            f"{where}base_url is not allowed on this server: its key is sent only to the API "
            "roots the server was started with (--base-url, --allow-base-url)",
        )
    headers = given.get("headers")
    if isinstance(headers, Mapping):
        for name in headers:
            if str(name).strip().lower() in SENSITIVE_HEADERS:
                raise RequestError(
                    422,
                    f"{where}header {name!r} carries a credential; the server uses its own key",
                )


def check_settings(config: ServerConfig, raw: Any) -> dict[str, Any]:
    """Validate a request's settings; return them normalised (``-`` keys as ``_``).

    Raises:
        RequestError: 422 naming the setting at fault.
    """
    if not isinstance(raw, Mapping):
        raise RequestError(422, "settings must be a JSON object")
    given = {str(k).replace("-", "_"): v for k, v in raw.items()}
    _check_names(config, given)
    try:
        settings = JobSettings.from_mapping(given, allow_paths=False)
        if settings.prompt is not None:
            PromptTemplate(settings.prompt)  # the whole template, now rather than per row
    except ConfigError as error:
        raise RequestError(422, str(error)) from None
    if not settings.model:
        raise RequestError(422, "setting 'model' is required")
    check_ceilings(config, given)
    return given


def check_template(
    given: Mapping[str, Any], first: Mapping[str, Any] | Sequence[str] | None
) -> None:
    """Check the prompt template against a job's first row (or its column names) now.

    A field the input does not have, or a value that cannot take its format spec, would fail
    every row: it is refused before anything is stored or sent.

    Raises:
        RequestError: 422 naming the field, with a did-you-mean and the available fields.
    """
    prompt = given.get("prompt")
    if not isinstance(prompt, str) or first is None:
        return
    try:
        PromptTemplate(prompt).check(first)
    except ConfigError as error:
        raise RequestError(422, str(error)) from None


def job_settings(
    config: ServerConfig,
    given: Mapping[str, Any],
    job_dir: Path | None = None,
    *,
    resume: bool,
    input_format: str = "jsonl",
) -> JobSettings:
    """Build the settings of one run from checked request settings.

    Args:
        config: The server's configuration (its default ``base_url``).
        given: Settings that passed :func:`check_settings`.
        job_dir: The job's directory (its input and output files), or ``None`` for an enrich
            batch, which has no files.
        resume: Whether the run resumes the job's journal.
        input_format: The format of the job's input file (``input.FORMAT`` in its directory).
    """
    settings = JobSettings.from_mapping(given, allow_paths=False)
    if settings.endpoints:  # each endpoint without a URL goes to the server's API root
        tables = [
            t if t.get("base_url") or t.get("url") else {**t, "base_url": config.base_url}
            for t in settings.endpoints
        ]
        settings = settings.replace(endpoints=tables)
    else:
        settings = settings.replace(base_url=settings.base_url or config.base_url)
    settings = settings.replace(
        max_concurrency=min(settings.max_concurrency, config.max_concurrency)
    )
    if job_dir is None:
        return settings
    return settings.replace(
        input=str(job_dir / f"input.{input_format}"),
        output=str(job_dir / OUTPUT),
        input_format=input_format,
        output_format="jsonl",
        quiet=True,
        grace=0.0,
        resume=resume,
    )
