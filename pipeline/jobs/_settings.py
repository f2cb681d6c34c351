"""A job's settings: what a CLI run, a job file and a server request describe.

:class:`JobSettings` holds every setting of a file job and checks each value at construction
(:func:`~pipeline._config.check_fields` for the types, :meth:`JobSettings._check_values` for
the ranges and contradictions); :func:`read_job_file` reads a TOML job file into a mapping of
settings; :func:`check_files` refuses, before anything starts, an input that cannot be read or
an output that cannot be written.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import errno
import math
import os
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

from pipeline._compat import load_toml
from pipeline._config import check_fields, type_name
from pipeline._errors import ConfigError
from stages.files._pipes import is_stream
from stages.llm._providers import SENSITIVE_HEADERS
from stages.llm._routing import Deployment, Routing, deployment_from_mapping
from stages.llm._template import PromptTemplate

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
        rpm: Requests per minute allowed (a ceiling; the server's headers say what is there).
        tpm: Tokens per minute allowed.
        itpm: Input tokens per minute allowed (Anthropic's separate limit).
        otpm: Output tokens per minute allowed (Anthropic's; ``max_tokens`` is reserved).
        burst: Seconds' worth of the limits that may go at once, at most (default: what the
            server's headers say its bucket holds).
        max_retries: Retries per row after the first attempt.
        timeout: Seconds one attempt may take.
        deadline: Seconds a row may take, retries and waits included.
        max_retry_after: The longest ``Retry-After`` waited for (seconds); a row the server
            asks to wait longer is dead-lettered at once, with the server's figure.
        max_response_mb: The largest response body read, in MB; a larger one dead-letters
            its row without being read whole.
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
        max_line_bytes: The longest JSON Lines input row (16 MiB): a longer line is read past
            in bounded memory and dead-lettered by its line number.
        encoding: The text encoding of a CSV or TSV input (``utf-8``; ``latin-1``,
            ``cp1252``... any ASCII-compatible one). JSONL is UTF-8 by definition.
        batch_size: Rows per embeddings request.
        grace: Seconds the requests in flight may take to finish after a stop (Ctrl-C,
            SIGTERM, a cancel), then they are abandoned (sent again on resume). No new
            request is sent after a stop.
        batch_api: Send the requests through the provider's Batch API (half price, answered
            within 24 hours) instead of online; see ``docs/batch.md``.
        batch_max_rows: Most rows per batch (default: the provider's limit).
        batch_poll: Seconds between checks on the batches (backing off while none changes).
        batch_fallback: Where rows of failed, expired or cancelled batches go: ``batch`` (a
            new batch) or ``online``.
        cancel_batches: Cancel the job's batches still running on the provider, then stop.
        batch_prices: USD per 1M prompt and completion tokens in batches, by model (default:
            half the online price).
        endpoints: Several endpoints to spread the rows over (a job file's ``[[endpoints]]``
            tables, ``--route`` flags): each a table of ``name``, ``base_url``,
            ``api_key_env``, ``model``, ``serves``, ``provider``, ``rpm``/``tpm``/``itpm``/
            ``otpm``, ``max_concurrency``, ``weight``, ``price``, ``headers`` (see
            ``docs/routing.md``). ``model`` then names the endpoints' model.
        fallbacks: Models to retry a row on when it fails on its model (``--fallback-model``).
        route_policy: ``headroom`` (where a request waits least) or ``cheapest``.
        null_as_empty: Render a null field of the prompt template as empty text (default: the
            row is dead-lettered, naming the field).
        csv_delimiter: The CSV input's field separator (default: detected from its header).
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
    itpm: float | None = None
    otpm: float | None = None
    burst: float | None = None
    max_retries: int = 4
    timeout: float = 600.0
    deadline: float | None = None
    max_retry_after: float = 600.0
    max_response_mb: float = 10.0
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
    max_line_bytes: int = 16 << 20
    encoding: str = "utf-8"
    batch_size: int = 64
    grace: float = 10.0
    batch_api: bool = False
    batch_max_rows: int | None = None
    batch_poll: float = 15.0
    batch_fallback: Literal["batch", "online"] = "batch"
    cancel_batches: bool = False
    batch_prices: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    endpoints: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    fallbacks: list[str] = dataclasses.field(default_factory=list)
    route_policy: Literal["headroom", "cheapest"] = "headroom"
    null_as_empty: bool = False
    csv_delimiter: str | None = None

    def __post_init__(self) -> None:
        check_fields(
            self,
            label=lambda name: f"setting {name!r}",
            checkers={
                "headers": _check_headers,
                "prices": _check_prices,
                "batch_prices": _check_prices,
                "endpoints": _check_endpoints,
                "fallbacks": _check_names,
            },
        )
        if self.endpoints and not self.model:
            self.model = self.deployments()[0].group
        self._check_values()
        self._check_routing()

    def _check_routing(self) -> None:
        if not self.endpoints:
            if self.fallbacks:
                raise ConfigError("fallbacks name models of [[endpoints]]: give the endpoints")
            return
        for name in ("rpm", "tpm", "itpm", "otpm", "base_url", "api_key_env"):
            if getattr(self, name) is not None:
                raise ConfigError(
                    f"setting {name!r} applies to a single endpoint: with [[endpoints]], set"
                    " it in each endpoint's table"
                )
        if self.batch_api:
            raise ConfigError("batch_api sends to one provider: drop [[endpoints]]")
        self.routing().chain(self.model)

    def deployments(self) -> list[Deployment]:
        """Return the endpoints as :class:`~stages.llm._routing.Deployment` objects."""
        return [
            deployment_from_mapping(table, where=f"endpoints[{index}]")
            for index, table in enumerate(self.endpoints)
        ]

    def routing(self, limiters: list[Any] | None = None) -> Routing:
        """Return the routing the settings describe (each endpoint given its limiter, if any).

        Raises:
            ConfigError: The endpoints or fallbacks are not valid.
        """
        deployments = self.deployments()
        if limiters is not None:
            deployments = [
                dataclasses.replace(d, limiter=limiter)
                for d, limiter in zip(deployments, limiters, strict=True)
            ]
        return Routing(endpoints=deployments, fallbacks=self.fallbacks, policy=self.route_policy)

    def _check_values(self) -> None:
        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if value is not None and (value < 0 or (value == 0 and not allow_zero)):
                need = ">= 0" if allow_zero else "> 0"
                raise ConfigError(f"setting {name!r} must be {need}, got {value!r}")

        for name in ("concurrency", "max_concurrency", "rpm", "tpm", "itpm", "otpm", "timeout",
                     "deadline", "max_response_mb", "budget", "batch_size", "batch_max_rows",
                     "batch_poll", "max_line_bytes"):  # fmt: skip
            positive(name)
        for name in ("max_retry_after", "burst", "max_retries", "grace"):
            positive(name, allow_zero=True)
        _check_encoding(self.encoding)
        for name in ("model", "output_field", "id_field", "api_key_env"):
            value = getattr(self, name)
            if value is not None and not value.strip() and name != "model":
                raise ConfigError(f"setting {name!r} must not be empty")
        if self.prompt is not None:
            try:
                PromptTemplate(self.prompt)
            except ConfigError as error:
                raise ConfigError(f"{error} (write {{{{ and }}}} for literal braces)") from None
        if self.csv_delimiter is not None:
            self.csv_delimiter = _delimiter(self.csv_delimiter)
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
                f" got {safe_url(self.limiter)!r}"
            )
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite contradict each other: choose one")
        if (self.cancel_batches or self.batch_max_rows is not None) and not self.batch_api:
            raise ConfigError("cancel_batches and batch_max_rows apply to batch_api jobs")
        if self.batch_api and self.stream:
            raise ConfigError("batch_api answers whole responses: drop stream")
        if self.batch_api and self.engine == "ray":
            raise ConfigError("batch_api runs on its own engine: drop engine='ray'")
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
            k: ("***" if k.lower() in SENSITIVE_HEADERS else v) for k, v in self.headers.items()
        }
        data["prices"] = {k: list(v) for k, v in self.prices.items()}
        data["batch_prices"] = {k: list(v) for k, v in self.batch_prices.items()}
        data["endpoints"] = [
            {
                **table,
                "headers": {
                    k: ("***" if k.lower() in SENSITIVE_HEADERS else v)
                    for k, v in (table.get("headers") or {}).items()
                },
            }
            for table in self.endpoints
        ]
        return data

    def fingerprint(self) -> dict[str, Any]:
        """Return the settings that define the job's answers (stored in its checkpoint)."""
        found = {name: getattr(self, name) for name in FINGERPRINT_FIELDS}
        if self.encoding != "utf-8":  # only then: checkpoints of earlier versions still match
            found["encoding"] = self.encoding
        return found

    def all_prices(self) -> dict[str, tuple[float, float]]:
        """Return the built-in price table updated with :attr:`prices`."""
        return {**BUILTIN_PRICES, **self.prices}

    def batch_price(self) -> tuple[float, float] | None:
        """Return the configured batch price of the model (``None``: half the online price)."""
        return price_for(self.model, self.batch_prices) if self.model else None

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


def _delimiter(value: str) -> str:
    named = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}
    found = named.get(value.lower(), value)
    if len(found) != 1 or found in '\r\n"':
        raise ConfigError(
            f"setting 'csv_delimiter' must be one character (or tab, comma, semicolon, pipe),"
            f" got {value!r}"
        )
    return found


def safe_url(url: str) -> str:
    """Return ``url`` with its password (if any) masked, for messages and logs."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


def _check_headers(value: dict[str, Any]) -> dict[str, str]:
    for k, v in value.items():
        if not isinstance(v, str):
            raise ConfigError(f"header {k!r} must be a string, got {type_name(v)}")
    return value


def _check_endpoints(value: list[Any]) -> list[dict[str, Any]]:
    tables = []
    for index, table in enumerate(value):
        where = f"endpoints[{index}]"
        deployment_from_mapping(table, where=where)  # refuses a bad table, naming it
        tables.append({str(k).replace("-", "_"): v for k, v in table.items()})
    return tables


def _check_names(value: list[Any]) -> list[str]:
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"fallbacks must be model names, got {item!r}")
    return value


def _check_prices(value: dict[str, Any]) -> dict[str, tuple[float, float]]:
    return {k: _check_price(k, v) for k, v in value.items()}


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
            data = load_toml(f)
    except OSError as error:
        raise ConfigError(f"cannot read job file {text!r}: {error.strerror or error}") from None
    except ValueError as error:  # tomllib.TOMLDecodeError
        raise ConfigError(f"job file {text!r} is not valid TOML: {error}") from None
    base = os.path.dirname(os.path.abspath(text))
    for key in list(data):
        name = key.replace("-", "_")
        value = data[key]
        if name in PATH_FIELDS and isinstance(value, str) and value != "-":
            data[key] = os.path.join(base, os.path.expanduser(value))
    return data


def _check_encoding(encoding: str) -> None:
    """Refuse an unknown encoding, or one in which a newline or a comma is not one byte."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ConfigError(
            f"setting 'encoding': unknown encoding {encoding!r} (utf-8, latin-1, cp1252...)"
        ) from None
    if "\n,\t;".encode(encoding, "replace") != b"\n,\t;":
        raise ConfigError(
            f"setting 'encoding': {encoding!r} is not ASCII-compatible; convert the file to"
            " UTF-8 first (iconv -f ENCODING -t UTF-8)"
        )


def check_files(settings: JobSettings) -> None:
    """Refuse early, in plain words, an input that cannot be read or an output dir missing.

    Raises:
        ConfigError: The input is missing, unreadable or a directory; the output's or the
            dead-letter file's directory does not exist or is not writable.
    """
    assert settings.input is not None and settings.output is not None
    if settings.input != "-":
        if os.path.isdir(settings.input):
            raise ConfigError(f"input {settings.input!r} is a directory, not a file")
        try:
            if is_stream(settings.input):  # opening a FIFO waits for its writer: only check
                if not os.access(settings.input, os.R_OK):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            else:
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


__all__ = [
    "BUILTIN_PRICES",
    "FINGERPRINT_FIELDS",
    "PATH_FIELDS",
    "Endpoint",
    "FileFormat",
    "JobSettings",
    "ProviderName",
    "check_files",
    "price_for",
    "read_job_file",
    "safe_url",
]
