"""A whole file-to-file LLM job: settings, the caller they build, and the run with resume.

This is what ``python -m pipeline run``, the HTTP server (``POST /v1/jobs``) and the Ray engine
share. :class:`JobSettings` holds every setting of a job (the CLI flags, a job file's keys, a
server request's fields) and validates them; :func:`build_caller` makes the
:class:`~stages.llm._caller.LLMCaller` those settings describe; :func:`run_job` runs the job on the
local engine::

    source (JSONL/CSV/Parquet, skipping rows a previous run finished)
      -> [Batcher, embeddings only] -> LLMCaller -> output sink (journal)
    dead letters -> dead-letter sink (journal)

on a crash-safe :class:`~pipeline.jobs._journal.Journal`: rows are committed one by one to journals
next to the output, ``resume=True`` continues an interrupted job exactly once, and the output
and dead-letter files are published atomically when every row has an answer or a dead-letter
record. See ``docs/jobs.md`` for the files and formats.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import logging
import math
import os
import socket
import string
import sys
import time
import typing
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

import anyio
import anyio.to_thread

from pipeline._compat import tomllib
from pipeline._envelope import Envelope, Failed
from pipeline._errors import ConfigError, FatalError
from pipeline.jobs._journal import Journal
from stages.llm._limits import Limiter

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from stages.llm._caller import LLMCaller

log = logging.getLogger("pipeline.job")

Endpoint = Literal["chat", "embeddings"]
ProviderName = Literal["openai", "azure", "anthropic"]
FileFormat = Literal["jsonl", "csv", "tsv", "parquet"]

PATH_FIELDS = ("input", "output", "dead_letter", "cache", "summary_json")
"""Settings that name files or directories of the machine the job runs on."""

FINGERPRINT_FIELDS = (
    "model",
    "prompt",
    "system",
    "endpoint",
    "provider",
    "params",
    "json_output",
    "output_field",
    "id_field",
    "input_format",
    "output_format",
)
"""Settings that define a job's answers: resuming with any of them changed is refused."""

BUILTIN_PRICES: dict[str, tuple[float, float]] = {
    # USD per 1M (prompt, completion) tokens, list prices; override with a job file's [prices].
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-3.5-turbo": (0.50, 1.50),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "text-embedding-3-small": (0.02, 0.0),
    "text-embedding-3-large": (0.13, 0.0),
    "text-embedding-ada-002": (0.10, 0.0),
    "claude-3-5-haiku": (0.80, 4.00),
    "claude-3-5-sonnet": (3.00, 15.00),
    "claude-3-7-sonnet": (3.00, 15.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-3-haiku": (0.25, 1.25),
    "claude-3-opus": (15.00, 75.00),
}

_SENSITIVE_HEADERS = frozenset({"authorization", "api-key", "x-api-key", "proxy-authorization"})


def price_for(model: str, prices: Mapping[str, tuple[float, float]]) -> tuple[float, float] | None:
    """Return the price of ``model``: an exact entry, else the longest entry it starts with."""
    if model in prices:
        return prices[model]
    matches = [name for name in prices if model.startswith(name)]
    return prices[max(matches, key=len)] if matches else None


# -- settings ------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class JobSettings:
    """Every setting of a file job; built from CLI flags, a job file or a server request.

    Construction checks each value's type and range and raises
    :class:`~pipeline._errors.ConfigError` saying which setting is wrong and why. Input and
    output may be left out (a server fills them in); :func:`run_job` requires them.

    Attributes:
        input: The input file (JSONL, CSV, TSV or Parquet by extension), ``-`` for stdin.
        output: The output file (format by extension); published when the job completes.
        model: The model name (Azure: the deployment).
        prompt: ``str.format`` template over each row's fields (``"Say hello to {name}"``);
            without it a row must hold ``messages`` or ``prompt`` (chat) or ``text`` (embeddings).
        system: The system prompt (literal text).
        base_url: The API root (default: the provider's, or ``$OPENAI_BASE_URL``...).
        api_key_env: The environment variable holding the API key (the key itself is never a
            setting).
        endpoint: ``chat`` or ``embeddings``.
        provider: ``openai`` (any compatible server), ``azure`` or ``anthropic``.
        concurrency: Fixed requests in flight; ``None`` adapts it up to ``max_concurrency``.
        max_concurrency: Ceiling of the adaptive concurrency.
        rpm: Requests per minute allowed.
        tpm: Tokens per minute allowed.
        max_retries: Retries per row after the first attempt.
        timeout: Seconds one attempt may take.
        deadline: Seconds a row may take, retries and waits included.
        stream: Stream chat answers (server-sent events).
        ordered: Publish the output in input order (rows are journaled as they finish).
        id_field: The field holding each row's key (default: the line number).
        output_field: The field the answer is written to.
        json_output: Parse each answer as JSON (the output field holds the object).
        dead_letter: The dead-letter file (default ``OUTPUT.failed.jsonl``).
        resume: Continue an interrupted job with the same settings.
        overwrite: Delete an interrupted job's files and start over.
        cache: Directory of a response cache shared by runs and jobs.
        budget: Stop reading input once this run has cost this many US dollars.
        summary_json: Where to write the summary as JSON.
        trace: ``console`` or ``otlp``: export OpenTelemetry spans.
        quiet: No progress output.
        limiter: ``redis://host:port/db``: share the rate limits with other processes.
        engine: ``local`` or ``ray``.
        ray_address: The Ray cluster to use with ``engine="ray"``.
        params: Extra request body fields (``temperature``, ``max_tokens``, ``seed``...).
        headers: Extra HTTP headers.
        prices: USD per 1M prompt and completion tokens by model, over the built-in table.
        input_format: Force the input format instead of guessing from the extension.
        output_format: Force the output format instead of guessing from the extension.
        batch_size: Rows per embeddings request.
        grace: Seconds rows in flight may take to finish after a stop (Ctrl-C), then cancelled.
    """

    input: str | None = None
    output: str | None = None
    model: str = ""
    prompt: str | None = None
    system: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    endpoint: Endpoint = "chat"
    provider: ProviderName = "openai"
    concurrency: int | None = None
    max_concurrency: int = 64
    rpm: float | None = None
    tpm: float | None = None
    max_retries: int = 4
    timeout: float = 600.0
    deadline: float | None = None
    stream: bool = False
    ordered: bool = False
    id_field: str | None = None
    output_field: str = "response"
    json_output: bool = False
    dead_letter: str | None = None
    resume: bool = False
    overwrite: bool = False
    cache: str | None = None
    budget: float | None = None
    summary_json: str | None = None
    trace: Literal["console", "otlp"] | None = None
    quiet: bool = False
    limiter: str | None = None
    engine: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    prices: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    input_format: FileFormat | None = None
    output_format: FileFormat | None = None
    batch_size: int = 64
    grace: float = 30.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, _check_type(field.name, getattr(self, field.name)))
        self._check_values()

    def _check_values(self) -> None:
        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if value is not None and (value < 0 or (value == 0 and not allow_zero)):
                need = ">= 0" if allow_zero else "> 0"
                raise ConfigError(f"setting {name!r} must be {need}, got {value!r}")

        for name in ("concurrency", "max_concurrency", "rpm", "tpm", "timeout", "deadline"):
            positive(name)
        for name in ("budget", "batch_size"):
            positive(name)
        positive("max_retries", allow_zero=True)
        positive("grace", allow_zero=True)
        for name in ("model", "output_field", "id_field", "api_key_env"):
            value = getattr(self, name)
            if value is not None and not value.strip() and name != "model":
                raise ConfigError(f"setting {name!r} must not be empty")
        if self.prompt is not None:
            try:
                list(string.Formatter().parse(self.prompt))
            except ValueError as error:
                raise ConfigError(
                    f"prompt template {self.prompt!r} is malformed: {error}"
                    " (write {{ and }} for literal braces)"
                ) from None
        if self.endpoint == "embeddings":
            if self.stream:
                raise ConfigError("stream applies to chat, not to the embeddings endpoint")
            if self.json_output:
                raise ConfigError("json_output applies to chat, not to the embeddings endpoint")
            if self.provider == "anthropic":
                raise ConfigError("provider 'anthropic' has no embeddings endpoint")
        if self.limiter is not None and urlsplit(self.limiter).scheme not in (
            "redis",
            "rediss",
            "unix",
        ):
            raise ConfigError(
                "limiter must be a redis:// URL (redis://host:port/db),"
                f" got {_safe_url(self.limiter)!r}"
            )
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite contradict each other: choose one")
        if self.output == "-":
            raise ConfigError(
                "output must be a file: a job journals rows next to it and publishes it"
                " atomically when it completes; '-' (stdout) is not supported"
            )
        if (
            self.input
            and self.output
            and os.path.abspath(self.input) == os.path.abspath(self.output)
        ):
            raise ConfigError(f"output {self.output!r} is the input file; it would be overwritten")
        if self.budget is not None and self.price() is None:
            raise ConfigError(
                f"budget needs the price of model {self.model!r}: add it to the job file as"
                f' [prices] "{self.model}" = [usd_per_1M_prompt, usd_per_1M_completion]'
            )
        if (
            self.json_output
            and self.provider in ("openai", "azure")
            and "response_format" not in self.params
            and self.prompt is not None
            and "json" not in (self.prompt + (self.system or "")).lower()
        ):
            raise ConfigError(
                "json_output asks OpenAI-compatible servers for JSON mode, which requires the"
                " word 'JSON' in the prompt or system prompt: add it (\"Answer in JSON: ...\"),"
                " or pass your own response_format param"
            )

    # -- building --------------------------------------------------------------------------

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, allow_paths: bool = True, where: str = "settings"
    ) -> JobSettings:
        """Build settings from a mapping (a parsed job file, a JSON request body).

        Keys may use ``-`` or ``_`` (``max-retries`` or ``max_retries``).

        Args:
            data: The settings by name.
            allow_paths: Accept settings that name local files (:data:`PATH_FIELDS`); a
                server passes ``False`` so a request cannot read or write its files, then
                fills in the paths it chose with :meth:`replace`.
            where: Where the mapping came from, for error messages (a file name).

        Raises:
            ConfigError: An unknown setting, a wrong type or value, or a forbidden path.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a table of settings, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        given: dict[str, Any] = {}
        for raw_key, value in data.items():
            key = str(raw_key).replace("-", "_")
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{where}: unknown setting {raw_key!r}{hint}")
            if key in given:
                raise ConfigError(f"{where}: setting {key!r} is given twice")
            if not allow_paths and key in PATH_FIELDS and value is not None:
                raise ConfigError(
                    f"{where}: setting {key!r} names a file path, which is not accepted here"
                )
            given[key] = value
        try:
            return cls(**given)
        except ConfigError as error:
            if where == "settings":
                raise
            raise ConfigError(f"{where}: {error}") from None

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> JobSettings:
        """Read a job file; relative paths in it are relative to the file's directory."""
        return cls.from_mapping(read_job_file(path), where=os.fspath(path))

    def replace(self, **changes: Any) -> JobSettings:
        """Return a copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    # -- views -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-ready data, with credential-like header values masked."""
        data = dataclasses.asdict(self)
        data["headers"] = {
            k: ("***" if k.lower() in _SENSITIVE_HEADERS else v) for k, v in self.headers.items()
        }
        data["prices"] = {k: list(v) for k, v in self.prices.items()}
        return data

    def fingerprint(self) -> dict[str, Any]:
        """Return the settings that define the job's answers (stored in its checkpoint)."""
        return {name: getattr(self, name) for name in FINGERPRINT_FIELDS}

    def all_prices(self) -> dict[str, tuple[float, float]]:
        """Return the built-in price table updated with :attr:`prices`."""
        return {**BUILTIN_PRICES, **self.prices}

    def price(self) -> tuple[float, float] | None:
        """Return the model's price (USD per 1M prompt, completion tokens), if known."""
        return price_for(self.model, self.all_prices()) if self.model else None

    def dead_letter_path(self) -> str | None:
        """Return the dead-letter file (``OUTPUT.failed.jsonl`` unless set)."""
        if self.dead_letter:
            return self.dead_letter
        return None if self.output is None else self.output + ".failed.jsonl"

    def require_paths(self) -> None:
        """Check that the job names its input and output (and a model).

        Raises:
            ConfigError: Something a run needs is missing.
        """
        if not self.input:
            raise ConfigError("no input file: give INPUT (or 'input' in the job file)")
        if not self.output:
            raise ConfigError("no output file: give -o OUTPUT (or 'output' in the job file)")
        if not self.model:
            raise ConfigError("no model: give --model (or 'model' in the job file)")


def _safe_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_type(name: str, value: Any) -> Any:
    """Check (and normalise) one setting against its annotation; raise ConfigError if wrong."""
    hint = _hints()[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"setting {name!r} cannot be null")
    base = [a for a in args if a is not type(None)] if args else [hint]
    kind = base[0] if len(base) == 1 else hint
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(
                f"setting {name!r} must be one of {', '.join(map(repr, choices))}, got {value!r}"
            )
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"setting {name!r} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"setting {name!r} must be an integer, got {_type_name(value)}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"setting {name!r} must be a number, got {_type_name(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"setting {name!r} must be a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(f"setting {name!r} must be a string, got {_type_name(value)}")
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"setting {name!r} must be a table, got {_type_name(value)}")
        if name == "headers":
            for k, v in value.items():
                if not isinstance(k, str) or not isinstance(v, str):
                    raise ConfigError(f"header {k!r} must be a string, got {_type_name(v)}")
            return dict(value)
        if name == "prices":
            return {str(k): _check_price(str(k), v) for k, v in value.items()}
        return {str(k): v for k, v in value.items()}
    raise AssertionError(f"no checker for {name}: {hint}")  # pragma: no cover


def _check_price(model: str, value: Any) -> tuple[float, float]:
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        and all(math.isfinite(v) and v >= 0 for v in value)
    ):
        return float(value[0]), float(value[1])
    raise ConfigError(
        f"price of {model!r} must be [usd_per_1M_prompt, usd_per_1M_completion], got {value!r}"
    )


_HINTS: dict[str, Any] = {}


def _hints() -> dict[str, Any]:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(JobSettings))
    return _HINTS


def read_job_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML job file into a mapping of settings.

    Top-level keys are settings; the ``[params]``, ``[headers]`` and ``[prices]`` tables are
    the request parameters, extra headers and price overrides. Relative paths are made
    relative to the file's directory, so a job file works from any working directory.

    Raises:
        ConfigError: The file cannot be read or is not valid TOML.
    """
    text = os.fspath(path)
    try:
        with open(text, "rb") as f:
            data = tomllib.load(f)
    except OSError as error:
        raise ConfigError(f"cannot read job file {text!r}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"job file {text!r} is not valid TOML: {error}") from None
    base = os.path.dirname(os.path.abspath(text))
    for key in list(data):
        name = key.replace("-", "_")
        value = data[key]
        if name in PATH_FIELDS and isinstance(value, str) and value != "-":
            data[key] = os.path.join(base, os.path.expanduser(value))
    return data


# -- the caller ----------------------------------------------------------------------------


def build_caller(
    settings: JobSettings,
    *,
    cache: Any = None,
    limiter: Any = None,
    open_resources: bool = True,
    schema: Any = None,
) -> LLMCaller:
    """Return the :class:`~stages.llm._caller.LLMCaller` that ``settings`` describe.

    Every engine builds its caller here, so a job behaves the same wherever it runs.

    Args:
        settings: The job's settings.
        cache: A :class:`~stages.llm._cache.ResponseCache` to use instead of opening
            ``settings.cache``.
        limiter: A limiter to use instead of building one from ``settings.limiter``.
        open_resources: Open the cache and Redis limiter the settings name (when not given);
            release them with :func:`release_caller`.
        schema: A JSON schema dict or pydantic model every answer must satisfy (structured
            output; see ``Output(schema=...)``).

    Raises:
        ConfigError: The settings do not make a valid caller.
    """
    from stages.llm._caller import HTTP, Limits, LLMCaller, Output, Retry

    params = dict(settings.params)
    if (
        settings.json_output
        and settings.provider in ("openai", "azure")
        and "response_format" not in params
    ):
        params["response_format"] = {"type": "json_object"}
    price = settings.price()
    if cache is None and open_resources and settings.cache:
        from stages.llm._cache import ResponseCache

        cache = ResponseCache(settings.cache)
    caller = LLMCaller(
        model=settings.model,
        prompt=settings.prompt,
        system=settings.system,
        params=params,
        endpoint=settings.endpoint,
        provider=settings.provider,
        base_url=settings.base_url,
        limits=Limits(
            rpm=settings.rpm,
            tpm=settings.tpm,
            limiter=limiter,
            concurrency=settings.concurrency,
            max_concurrency=settings.max_concurrency,
        ),
        retry=Retry(max_retries=settings.max_retries, deadline_s=settings.deadline),
        output=Output(
            field=settings.output_field,
            json_output=settings.json_output,
            schema=schema,
            stream=settings.stream,
            prices={settings.model: price} if price is not None else None,
            budget_usd=settings.budget,
        ),
        http=HTTP(
            api_key_env=settings.api_key_env,
            headers=settings.headers,
            timeout=settings.timeout,
            cache=cache,
        ),
    )
    if limiter is None and open_resources and settings.limiter:
        from stages.llm._redis_limiter import RedisRateLimiter

        key_env = settings.api_key_env or (caller.provider.key_env if caller.provider else None)
        caller.limiter = RedisRateLimiter.from_url(
            settings.limiter,
            rpm=settings.rpm,
            tpm=settings.tpm,
            provider=settings.provider,
            api_key=os.environ.get(key_env) if key_env else None,
            model=settings.model,
        )
    return caller


async def release_caller(caller: LLMCaller) -> None:
    """Close the response cache and shared limiter of a caller made by :func:`build_caller`."""
    if caller.cache is not None:
        await caller.cache.aclose()
    aclose = getattr(caller.limiter, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


async def preflight(caller: LLMCaller, *, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Check that the caller's server accepts TCP connections.

    A wrong ``base_url`` would otherwise be retried and then dead-letter every row.

    Raises:
        FatalError: ``cannot reach http://host:port: connection refused`` (or the reason).
    """
    provider = caller.provider
    if provider is None:
        return
    parts = urlsplit(provider.base_url)
    host = parts.hostname
    if not host or parts.scheme not in ("http", "https"):
        raise ConfigError(f"base URL {_safe_url(provider.base_url)!r} is not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    shown = f"{parts.scheme}://{host}:{port}"
    reason: str | None = None
    try:
        with anyio.fail_after(timeout):
            stream = await anyio.connect_tcp(host, port)
        await stream.aclose()
    except TimeoutError:
        reason = f"no answer within {timeout:g}s"
    except OSError as error:
        reason = _os_reason(error)
    if reason is not None:
        raise FatalError(f"cannot reach {shown}: {reason}")


def _os_reason(error: BaseException) -> str:
    inner = error
    while isinstance(inner, OSError) and not inner.strerror and inner.__cause__ is not None:
        inner = inner.__cause__
    # anyio reports "all connection attempts failed" with the causes in a group
    for candidate in getattr(inner, "exceptions", ()) or ():
        if isinstance(candidate, OSError) and candidate.strerror:
            inner = candidate
            break
    if isinstance(inner, OSError) and not isinstance(inner, socket.gaierror) and inner.errno:
        text = os.strerror(inner.errno)  # asyncio words it "Connect call failed (...)"
    elif isinstance(inner, OSError) and inner.strerror:
        text = inner.strerror
    else:
        text = str(inner) or type(inner).__name__
    return text[0].lower() + text[1:]


# -- progress and summary ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class JobProgress:
    """A snapshot of a running job, given to ``on_progress`` about twice a second.

    Attributes:
        rows_total: Rows in the input (``None`` until counted, or for stdin).
        rows_done: Rows with an answer or a dead-letter record, earlier runs included.
        ok: Rows answered by this run.
        failed: Rows dead-lettered by this run.
        skipped: Rows a previous run had finished (resume).
        requests: HTTP requests sent.
        retries: Retries made.
        prompt_tokens: Prompt tokens reported by the server.
        completion_tokens: Completion tokens reported by the server.
        cost_usd: Cost so far per the price table.
        elapsed_s: Seconds since the run started.
        rows_per_s: Rows finished per second by this run.
        tokens_per_s: Tokens per second by this run.
        eta_s: Seconds left at the current rate, when the total is known.
        stopping: Why the job is stopping early, when it is.
        final: Whether this is the last snapshot of the run.
    """

    rows_total: int | None
    rows_done: int
    ok: int
    failed: int
    skipped: int
    requests: int
    retries: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    elapsed_s: float
    rows_per_s: float
    tokens_per_s: float
    eta_s: float | None
    stopping: str | None = None
    final: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Return the snapshot as JSON-ready data."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(slots=True)
class JobSummary:
    """What a job run did.

    Attributes:
        rows_in: Input rows this run read (rows finished by earlier runs not included).
        ok: Rows answered by this run.
        failed: Rows dead-lettered by this run.
        failed_by_cause: Dead-lettered rows by cause (``"LLMCallError (HTTP 400)"``...).
        requests: HTTP requests sent (retries included).
        retries: Retries made.
        prompt_tokens: Prompt tokens reported by the server.
        completion_tokens: Completion tokens reported by the server.
        cost_usd: Cost per the price table (0 when the model has no price).
        elapsed_s: Wall time of this run.
        rows_per_s: Rows finished per second by this run.
        resumed_skipped: Rows skipped because an earlier run had finished them.
        stopped: Why the run stopped before the end of the input (a budget, Ctrl-C).
        complete: Whether the job finished and its files were published.
        total_ok: Output rows of the whole job so far (earlier runs included).
        total_failed: Dead-letter records of the whole job so far.
        cache_hits: Answers served by the response cache.
        output: The output file.
        dead_letter: The dead-letter file.
        engine: The engine that ran the job.
    """

    rows_in: int = 0
    ok: int = 0
    failed: int = 0
    failed_by_cause: dict[str, int] = dataclasses.field(default_factory=dict)
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    elapsed_s: float = 0.0
    rows_per_s: float = 0.0
    resumed_skipped: int = 0
    stopped: str | None = None
    complete: bool = False
    total_ok: int = 0
    total_failed: int = 0
    cache_hits: int = 0
    output: str | None = None
    dead_letter: str | None = None
    engine: str = "local"

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as JSON-ready data."""
        data = dataclasses.asdict(self)
        data["cost_usd"] = round(self.cost_usd, 6)
        data["elapsed_s"] = round(self.elapsed_s, 3)
        data["rows_per_s"] = round(self.rows_per_s, 1)
        return data


class JobFailedError(FatalError):
    """A job stopped on a fatal error; the rows it finished stay in its journals (resumable).

    The message is the cause's; ``__cause__`` is the original exception.

    Attributes:
        summary: What the run did before it stopped.
    """

    def __init__(self, message: str, summary: JobSummary) -> None:
        super().__init__(message)
        self.summary = summary


class _Waitable(Protocol):
    async def wait(self) -> Any: ...


ProgressHook = Callable[[JobProgress], Awaitable[None] | None]


# -- running -------------------------------------------------------------------------------


def _cause(failed: Failed) -> str:
    if failed.status is not None:
        return f"{failed.error_type} (HTTP {failed.status})"
    return failed.error_type


def setup_failure(failed: Failed) -> FatalError | None:
    """Return the error that stops a job whose first requests fail as every row would.

    Before any row of a run succeeded, an HTTP 404/405 (a wrong URL path or model) or a
    connection failure (after the caller's retries) is the setup's fault, not the row's:
    dead-lettering it would dead-letter the whole file. ``None`` when ``failed`` is a row's own.
    Both engines apply it (the Ray engine per actor).
    """
    if failed.status in (404, 405):
        return FatalError(
            f"the first requests fail with HTTP {failed.status} before any succeeded"
            f" ({failed.message}): check the base URL and the model name"
        )
    connection = ("connection error", "could not connect")
    if failed.status is None and any(word in failed.message for word in connection):
        return FatalError(
            f"the server cannot be reached: the first requests failed before any succeeded"
            f" ({failed.message})"
        )
    return None


def _first_requests_rule(failed: Failed, job: _LocalJob) -> None:
    """Apply :func:`setup_failure` until the run's caller has answered a row."""
    caller = job.caller
    if job.ok or caller is None or failed.stage != caller.name or job.answered():
        return
    error = setup_failure(failed)
    if error is not None:
        raise error


def _make_dead_letter_sink(journal: Journal, job: _LocalJob) -> Any:
    from stages.files import DeadLetterSink

    causes = job.causes

    class CountingDeadLetterSink(DeadLetterSink):
        def payload(self, env: Envelope[Any]) -> bytes:
            if isinstance(env.value, Failed):
                _first_requests_rule(env.value, job)
                cause = _cause(env.value)
                causes[cause] = causes.get(cause, 0) + 1
            return super().payload(env)

    return CountingDeadLetterSink(journal.dead_letter, name="dead-letter")


def _make_tracer_provider(kind: str) -> TracerProvider:
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise ConfigError(
            "tracing needs the OpenTelemetry SDK: pip install 'llm-pipeline[otel]'"
        ) from None
    exporter: Any
    if kind == "console":
        exporter = ConsoleSpanExporter(out=sys.stderr)
    else:
        try:
            otlp = importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
        except ImportError:
            raise ConfigError(
                "trace 'otlp' needs the OTLP exporter: pip install 'llm-pipeline[otel]'"
            ) from None
        exporter = otlp.OTLPSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "llm-pipeline"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _check_files(settings: JobSettings) -> None:
    """Refuse early, in plain words, an input that cannot be read or an output dir missing."""
    assert settings.input is not None and settings.output is not None
    if settings.input != "-":
        if os.path.isdir(settings.input):
            raise ConfigError(f"input {settings.input!r} is a directory, not a file")
        try:
            with open(settings.input, "rb"):
                pass
        except OSError as error:
            raise ConfigError(
                f"cannot read input {settings.input!r}: {error.strerror or error}"
            ) from None
    for label, path in (("output", settings.output), ("dead letter", settings.dead_letter_path())):
        assert path is not None
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ConfigError(
                f"cannot write {label} {path!r}: directory {directory!r} does not exist"
            )
        if not os.access(directory, os.W_OK):
            raise ConfigError(
                f"cannot write {label} {path!r}: directory {directory!r} is not writable"
            )
        if os.path.isdir(path):
            raise ConfigError(f"{label} {path!r} is a directory, not a file")


async def _call_progress(hook: ProgressHook, progress: JobProgress) -> None:
    result = hook(progress)
    if inspect.isawaitable(result):
        await result


async def run_job(
    settings: JobSettings,
    *,
    on_progress: ProgressHook | None = None,
    stop_event: _Waitable | None = None,
    stop_reason: str = "stop requested",
    progress_interval: float = 0.5,
    limiter: Limiter | None = None,
) -> JobSummary:
    """Run a file job to the end (or until stopped) and return its summary.

    With ``settings.engine == "ray"`` the job runs on Ray (``stages._ray.run_job_on_ray``).

    Args:
        settings: The job; its input and output must be set.
        on_progress: Called (sync or async) with a :class:`JobProgress` every
            ``progress_interval`` seconds and once at the end.
        stop_event: An event (anyio or asyncio): once set, no new rows are read, rows in
            flight get ``settings.grace`` seconds to finish, then the run stops. The job
            stays resumable.
        stop_reason: The summary's ``stopped`` text when ``stop_event`` stops the job.
        progress_interval: Seconds between progress snapshots.
        limiter: A rate limiter shared with other jobs on the same API key (the HTTP server
            passes one per key), instead of one built from the settings.

    Returns:
        The summary; ``complete`` is true when the files were published.

    Raises:
        ConfigError: Invalid or contradictory settings, an unreadable input, a checkpoint
            that does not match the settings (:class:`~pipeline.jobs._journal.ResumeError`).
        JobFailedError: A fatal error stopped the job (a rejected key, no credit, an
            unreachable server, a full disk); what was done stays resumable.
    """
    settings.require_paths()
    if settings.engine == "ray":
        return await _run_on_ray(settings, on_progress, stop_event)
    job = _LocalJob(settings, on_progress, stop_event, stop_reason, progress_interval, limiter)
    return await job.run()


async def _run_on_ray(
    settings: JobSettings, on_progress: ProgressHook | None, stop_event: _Waitable | None
) -> JobSummary:
    try:
        ray_engine = importlib.import_module("stages._ray")
    except ImportError as error:
        raise ConfigError(
            f"engine 'ray' is not available ({error}): pip install 'llm-pipeline[ray]'"
        ) from None
    fn: Any = ray_engine.run_job_on_ray
    accepted = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {}
    if "on_progress" in accepted:
        kwargs["on_progress"] = on_progress
    if "stop_event" in accepted:
        kwargs["stop_event"] = stop_event
    if inspect.iscoroutinefunction(fn):
        result = await fn(settings, **kwargs)
    else:
        result = await anyio.to_thread.run_sync(lambda: fn(settings, **kwargs))
    if not isinstance(result, JobSummary):  # pragma: no cover - the Ray engine's contract
        raise TypeError(f"run_job_on_ray returned {type(result).__name__}, not JobSummary")
    return result


class _LocalJob:
    """One run of a job on the local engine."""

    def __init__(
        self,
        settings: JobSettings,
        on_progress: ProgressHook | None,
        stop_event: _Waitable | None,
        stop_reason: str,
        progress_interval: float,
        limiter: Limiter | None = None,
    ) -> None:
        self.settings = settings
        self.limiter = limiter
        self.on_progress = on_progress
        self.stop_event = stop_event
        self.stop_reason = stop_reason
        self.progress_interval = progress_interval
        self.started = time.perf_counter()
        self.total: int | None = None
        self.ok = 0
        self.causes: dict[str, int] = {}
        self.results: Any = None
        self.source: Any = None
        self.caller: LLMCaller | None = None
        self.journal: Journal | None = None
        self.stopped: str | None = None
        self.tracer: TracerProvider | None = None

    async def run(self) -> JobSummary:
        settings = self.settings
        await anyio.to_thread.run_sync(_check_files, settings)
        assert settings.input is not None and settings.output is not None
        journal = Journal(
            settings.output,
            dead_letter=settings.dead_letter,
            settings=settings.fingerprint(),
            input=settings.input,
            resume=settings.resume,
            overwrite=settings.overwrite,
            ordered=settings.ordered,
        )
        if settings.trace is not None:
            self.tracer = _make_tracer_provider(settings.trace)
        caller = await anyio.to_thread.run_sync(
            functools.partial(build_caller, settings, limiter=self.limiter)
        )
        self.caller = caller
        try:
            await preflight(caller, timeout=min(10.0, settings.timeout))
            await anyio.to_thread.run_sync(journal.open)
            self.journal = journal
            if journal.complete:  # a resume finished publishing what an earlier run left
                return self._summary(None, complete=True)
            return await self._run(journal, caller)
        except Exception as error:
            if self.journal is not None:  # a job that finished no row leaves nothing behind
                await anyio.to_thread.run_sync(journal.discard)
            if isinstance(error, FatalError) and not isinstance(error, JobFailedError):
                raise JobFailedError(str(error), self._summary(None)) from error
            raise
        finally:
            await release_caller(caller)
            if self.tracer is not None:  # the run never started
                await anyio.to_thread.run_sync(self.tracer.shutdown)

    async def _run(self, journal: Journal, caller: LLMCaller) -> JobSummary:
        from pipeline import Pipeline
        from stages._batch import Batcher
        from stages.files import open_sink, open_source

        settings = self.settings
        assert settings.input is not None
        source = open_source(
            settings.input,
            fmt=settings.input_format,
            id_field=settings.id_field,
            skip_keys=journal.done,
        )
        self.source = source
        stages: list[Any] = [source]
        if settings.endpoint == "embeddings":
            stages.append(Batcher(max_items=settings.batch_size, max_wait=0.02))
        stages.append(caller)
        stages.append(open_sink(journal.output, fmt=settings.output_format))
        tracer = self.tracer
        pipe = Pipeline(
            *stages,
            dead_letter=_make_dead_letter_sink(journal, self),
            name="job",
            tracing=tracer,
        )
        failure: Exception | None = None
        finished = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._count, settings.input)
                with anyio.CancelScope() as run_scope:
                    try:
                        async with pipe.open() as results:
                            self.results = results
                            if self.on_progress is not None:
                                tg.start_soon(self._progress_task)
                            if self.stop_event is not None:
                                tg.start_soon(self._stop_task, results, run_scope, finished)
                            async for _ in results:
                                self.ok += 1
                    except Exception as error:  # raised below, outside the task group
                        failure = error
                finished.set()
                tg.cancel_scope.cancel()
        finally:
            if tracer is not None:
                self.tracer = None
                await anyio.to_thread.run_sync(tracer.shutdown)
        report = self.results.report if self.results is not None else None
        if failure is not None:
            await anyio.to_thread.run_sync(journal.close)
            if isinstance(failure, (ConfigError, JobFailedError)):
                raise failure
            if isinstance(failure, FatalError):
                raise JobFailedError(str(failure), self._summary(report)) from failure
            if isinstance(failure, OSError):
                where = f" ({failure.filename})" if failure.filename else ""
                raise JobFailedError(
                    f"{failure.strerror or failure}{where}", self._summary(report)
                ) from failure
            raise failure
        assert report is not None
        self.stopped = self.stopped or report.stopped
        complete = report.complete and report.stopped is None
        if complete:
            try:
                await anyio.to_thread.run_sync(journal.commit)
            except OSError as error:
                raise JobFailedError(
                    f"cannot publish {settings.output!r}: {error.strerror or error}",
                    self._summary(report),
                ) from error
        else:
            await anyio.to_thread.run_sync(journal.close)
            if self.stopped is None:
                self.stopped = "cancelled"
        summary = self._summary(report, complete=complete)
        if self.on_progress is not None:
            await _call_progress(self.on_progress, self._progress(final=True))
        return summary

    async def _count(self, path: str) -> None:
        """Count the input's rows in a thread, for the progress total."""
        from stages.files import count_rows

        try:
            self.total = await anyio.to_thread.run_sync(
                lambda: count_rows(path, fmt=self.settings.input_format), abandon_on_cancel=True
            )
        except (OSError, ConfigError, ValueError) as error:  # the source reports it properly
            log.debug("cannot count the rows of %s: %s", path, error)

    async def _stop_task(
        self, results: Any, run_scope: anyio.CancelScope, finished: anyio.Event
    ) -> None:
        assert self.stop_event is not None
        await self.stop_event.wait()
        self.stopped = self.stop_reason
        results.stop(self.stop_reason)
        with anyio.move_on_after(self.settings.grace):
            await finished.wait()
        if not finished.is_set():
            log.warning(
                "rows in flight did not finish within %gs: cancelling them (they are sent"
                " again on resume)",
                self.settings.grace,
            )
            run_scope.cancel()

    async def _progress_task(self) -> None:
        assert self.on_progress is not None
        while True:
            await anyio.sleep(self.progress_interval)
            await _call_progress(self.on_progress, self._progress())

    def answered(self) -> bool:
        """Whether the caller has answered any row of this run (on its way to the sink)."""
        if self.results is None or self.caller is None:
            return False
        return any(s.name == self.caller.name and s.emitted for s in self.results.stats)

    def _counts(self) -> dict[str, Any]:
        stats = self.results.stats if self.results is not None else ()
        caller_name = self.caller.name if self.caller is not None else None
        found = {
            "failed": 0,
            "requests": 0,
            "retries": 0,
            "prompt": 0,
            "completion": 0,
            "cost": 0.0,
        }
        for s in stats:
            if s.name == "dead-letter":
                continue
            found["failed"] += s.failed
            if s.name == caller_name:
                found["requests"] += s.requests
                found["retries"] += s.retries
                found["prompt"] += s.prompt_tokens
                found["completion"] += s.completion_tokens
                found["cost"] += s.cost_usd
        return found

    def _progress(self, *, final: bool = False) -> JobProgress:
        counts = self._counts()
        elapsed = time.perf_counter() - self.started
        skipped = self.source.skipped if self.source is not None else 0
        done = self.ok + counts["failed"]
        rate = done / elapsed if elapsed > 0 else 0.0
        tokens = counts["prompt"] + counts["completion"]
        eta = None
        if self.total is not None and rate > 0:
            eta = max(self.total - skipped - done, 0) / rate
        stopping = self.stopped
        if stopping is None and self.results is not None:
            stopping = self.results.stop_reason
        return JobProgress(
            rows_total=self.total,
            rows_done=done + skipped,
            ok=self.ok,
            failed=counts["failed"],
            skipped=skipped,
            requests=counts["requests"],
            retries=counts["retries"],
            prompt_tokens=counts["prompt"],
            completion_tokens=counts["completion"],
            cost_usd=counts["cost"],
            elapsed_s=elapsed,
            rows_per_s=rate,
            tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
            eta_s=eta,
            stopping=stopping,
            final=final,
        )

    def _summary(self, report: Any, *, complete: bool = False) -> JobSummary:
        elapsed = time.perf_counter() - self.started
        counts = self._counts()
        failed = report.failed if report is not None else counts["failed"]
        rows_in = report.rows_in if report is not None else self.ok + failed
        journal = self.journal
        previous_ok = journal.previous_ok if journal is not None else 0
        previous_failed = journal.previous_failed if journal is not None else 0
        if journal is not None and journal.complete and report is None:
            # an earlier run's publish, finished now: count the published files' rows
            previous_ok, previous_failed = _published_counts(journal, self.settings)
        dead_letter = self.settings.dead_letter_path()
        if dead_letter is not None and not os.path.exists(dead_letter) and complete:
            dead_letter = None
        caller = self.caller
        return JobSummary(
            rows_in=rows_in,
            ok=self.ok,
            failed=failed,
            failed_by_cause=dict(sorted(self.causes.items(), key=lambda kv: (-kv[1], kv[0]))),
            requests=counts["requests"],
            retries=counts["retries"],
            prompt_tokens=counts["prompt"],
            completion_tokens=counts["completion"],
            cost_usd=counts["cost"],
            elapsed_s=elapsed,
            rows_per_s=(self.ok + failed) / elapsed if elapsed > 0 else 0.0,
            resumed_skipped=self.source.skipped if self.source is not None else 0,
            stopped=None if complete else self.stopped,
            complete=complete or (journal is not None and journal.complete),
            total_ok=previous_ok + self.ok,
            total_failed=previous_failed + failed,
            cache_hits=caller.totals.cache_hits if caller is not None else 0,
            output=self.settings.output,
            dead_letter=dead_letter,
        )


def _published_counts(journal: Journal, settings: JobSettings) -> tuple[int, int]:
    """Count the rows of the published files (a resume that only finished publishing)."""
    from stages.files import count_rows

    counts = []
    for path, fmt in (
        (journal.output_path, settings.output_format),
        (journal.dead_letter_path, "jsonl"),
    ):
        try:
            counts.append(count_rows(path, fmt=fmt) or 0)
        except (OSError, ConfigError, ValueError):
            counts.append(0)
    return counts[0], counts[1]


__all__ = [
    "BUILTIN_PRICES",
    "FINGERPRINT_FIELDS",
    "PATH_FIELDS",
    "JobFailedError",
    "JobProgress",
    "JobSettings",
    "JobSummary",
    "build_caller",
    "preflight",
    "price_for",
    "read_job_file",
    "release_caller",
    "run_job",
    "setup_failure",
]
