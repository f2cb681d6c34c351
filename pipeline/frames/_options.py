"""The options of a frame job, checked once, and the plan they make for a table's columns.

:class:`EnrichOptions` lists every option (the file job's settings plus what a table needs);
:func:`make_plan` checks them against the input's columns and returns a :class:`Plan`: the
job's :class:`~pipeline.jobs.JobSettings`, the columns a row needs, how a row becomes a request,
and the answer columns with their types.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from pipeline._errors import ConfigError
from pipeline._json import dumps
from pipeline.jobs import JobSettings

if TYPE_CHECKING:
    from pipeline.jobs import JobProgress

Kind = Literal["text", "string", "int", "float", "bool", "json", "vector"]
"""How an answer column is typed: Arrow/Polars ``string``, ``int64``, ``float64``, ``bool``,
JSON text (objects, arrays, unions), or a list of ``float64`` (embeddings)."""

OnError = Literal["null", "raise"]


class EnrichOptions(TypedDict, total=False):
    """Every option of :func:`~pipeline.frames.enrich` and its family (all keyword-only).

    The file job's settings (see :class:`~pipeline.jobs.JobSettings` for each one's meaning
    and checks): ``model``, ``prompt`` (a ``str.format`` template over the columns),
    ``system``, ``provider``, ``base_url``, ``api_key_env``, ``endpoint``, ``params``,
    ``headers``, ``stream``, ``concurrency``, ``max_concurrency``, ``rpm``, ``tpm``,
    ``max_retries``, ``timeout``, ``deadline``, ``json_output``, ``cache``, ``budget``,
    ``prices``, ``limiter``, ``batch_size`` (rows per embeddings request).

    What a table adds:

    - ``messages``: instead of ``prompt``, a list of chat messages whose ``content`` are
      templates over the columns, or the name of a column holding each row's messages.
    - ``schema``: structured output, a JSON schema dict or a pydantic model: the answer must
      be valid JSON matching it, and each of its properties becomes a column.
    - ``output_column``: the answer column (default ``response``; without ``schema``).
    - ``field_prefix``: prefix of the answer columns made from the schema's properties.
    - ``error_column``: the column holding why a row failed (default ``error``; null when
      the row succeeded).
    - ``on_error``: ``"null"`` (default): a failed row gets null answers and its error;
      ``"raise"``: the first failed row raises :class:`~pipeline.frames.RowFailedError`.
    - ``checkpoint``: a path: rows are journaled as they are answered, and running the same
      job again (after a crash, Ctrl-C or a kernel restart) sends only the rows not answered.
    - ``overwrite``: start the checkpoint over instead of resuming it.
    - ``dead_letter``: a JSON Lines file receiving a dead-letter record per failed row.
    - ``progress``: ``True`` for a progress bar (a notebook widget in Jupyter), ``False`` for
      none, or a callable receiving :class:`~pipeline.jobs.JobProgress` snapshots; default:
      a bar when in a notebook or a terminal.
    - ``chunk_rows``: rows per batch read from the input and per output batch (default 2048).
    - ``window``: most rows read ahead of the oldest unanswered row (default 16384); this
      bounds memory whatever the input's size.
    """

    model: str
    prompt: str | None
    system: str | None
    provider: Literal["openai", "azure", "anthropic"]
    base_url: str | None
    api_key_env: str | None
    endpoint: Literal["chat", "embeddings"]
    params: Mapping[str, Any]
    headers: Mapping[str, str]
    stream: bool
    concurrency: int | None
    max_concurrency: int
    rpm: float | None
    tpm: float | None
    max_retries: int
    timeout: float
    deadline: float | None
    json_output: bool
    cache: str | None
    budget: float | None
    prices: Mapping[str, tuple[float, float]]
    limiter: str | None
    batch_size: int
    messages: str | Sequence[Mapping[str, Any]] | None
    schema: Mapping[str, Any] | type | None
    output_column: str
    field_prefix: str
    error_column: str
    on_error: OnError
    checkpoint: str | None
    overwrite: bool
    dead_letter: str | None
    progress: bool | Callable[[JobProgress], Any] | None
    chunk_rows: int
    window: int


_JOB_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "system",
        "provider",
        "base_url",
        "api_key_env",
        "endpoint",
        "params",
        "headers",
        "stream",
        "concurrency",
        "max_concurrency",
        "rpm",
        "tpm",
        "max_retries",
        "timeout",
        "deadline",
        "json_output",
        "cache",
        "budget",
        "prices",
        "limiter",
        "batch_size",
    }
)
_ALL_OPTIONS = frozenset(EnrichOptions.__annotations__)
_JSON_TYPES: dict[str, Kind] = {
    "string": "string",
    "integer": "int",
    "number": "float",
    "boolean": "bool",
}
_ROOT = re.compile(r"[.\[]")


@dataclasses.dataclass(frozen=True)
class Column:
    """One answer column: its name, its type, and the schema property it holds (if any)."""

    name: str
    kind: Kind
    field: str | None = None


@dataclasses.dataclass
class Plan:
    """What a frame job does with each row, checked against the input's columns.

    Attributes:
        settings: The job's settings (no input or output file).
        schema: The structured-output schema given, if any.
        inputs: The columns a row's request is made from, in the input's order.
        messages: The chat messages template, each ``content`` a ``str.format`` template.
        messages_column: The column holding each row's messages.
        answers: The answer columns.
        error_column: The column holding why a row failed.
        on_error: ``"null"`` or ``"raise"``.
        checkpoint: The checkpoint path.
        overwrite: Start the checkpoint over.
        dead_letter: The dead-letter file.
        progress: The progress option as given.
        chunk_rows: Rows per batch.
        window: Most rows read ahead of the oldest unanswered one.
    """

    settings: JobSettings
    schema: Mapping[str, Any] | type | None
    inputs: list[str]
    messages: list[dict[str, Any]] | None
    messages_column: str | None
    answers: list[Column]
    error_column: str
    on_error: OnError
    checkpoint: str | None
    overwrite: bool
    dead_letter: str | None
    progress: bool | Callable[[JobProgress], Any] | None
    chunk_rows: int
    window: int

    @property
    def structured(self) -> bool:
        """Whether answers are JSON objects spread over one column per schema property."""
        return any(column.field is not None for column in self.answers)

    def output_names(self) -> list[str]:
        """Return the names of the columns a job adds, answers first, then the error column."""
        return [column.name for column in self.answers] + [self.error_column]

    def fingerprint(self) -> dict[str, Any]:
        """Return what defines the job's answers, for its checkpoint (never secrets)."""
        schema: Any = self.schema
        if isinstance(schema, type):
            schema = _model_schema(schema)
        return {
            **self.settings.fingerprint(),
            "columns": self.inputs,
            "messages": self.messages,
            "messages_column": self.messages_column,
            "schema": schema,
            "answers": [list(dataclasses.astuple(c)) for c in self.answers],
        }

    def render(self, row: Mapping[str, Any]) -> Any:
        """Return the record the caller receives for one row (the row, or its messages)."""
        if self.messages is not None:
            return {
                "messages": [
                    {**m, "content": m["content"].format_map(row)}
                    if isinstance(m.get("content"), str)
                    else dict(m)
                    for m in self.messages
                ]
            }
        if self.messages_column is not None:
            return {"messages": row[self.messages_column]}
        return row

    @staticmethod
    def digest(row: Mapping[str, Any]) -> str:
        """Return a short digest of a row's request fields (a resume re-sends changed rows)."""
        return hashlib.blake2b(dumps(row), digest_size=8).hexdigest()


def _model_schema(model: type) -> dict[str, Any]:
    schema = getattr(model, "model_json_schema", None)
    if schema is None:
        raise ConfigError(f"schema must be a JSON schema dict or a pydantic model, not {model!r}")
    result: dict[str, Any] = schema()
    return result


def _fields_of(template: str, where: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ConfigError(
            f"{where} template {template!r} is malformed: {error} (write {{{{ and }}}} for"
            " literal braces)"
        ) from None
    found = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        root = _ROOT.split(name, 1)[0]
        if not root or root.isdigit():
            raise ConfigError(
                f"{where} template {template!r} has a positional field {{{name}}}: name a"
                " column instead ({column})"
            )
        found.append(root)
    return found


def check_names(options: Mapping[str, Any]) -> None:
    """Refuse unknown options, suggesting the closest known one."""
    for name in options:
        if name not in _ALL_OPTIONS:
            close = difflib.get_close_matches(name, sorted(_ALL_OPTIONS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown option {name!r}{hint}")


def _answer_columns(
    options: Mapping[str, Any], schema: Any, endpoint: str, json_output: bool
) -> list[Column]:
    if schema is None:
        kind: Kind = "vector" if endpoint == "embeddings" else "json" if json_output else "text"
        return [Column(str(options.get("output_column", "response")), kind)]
    spec = _model_schema(schema) if isinstance(schema, type) else schema
    if not isinstance(spec, Mapping):
        raise ConfigError(f"schema must be a JSON schema dict or a pydantic model, not {spec!r}")
    properties = spec.get("properties")
    if not isinstance(properties, Mapping) or not properties:
        name = str(options.get("output_column", "response"))
        return [Column(name, _kind_of(spec))]
    prefix = str(options.get("field_prefix", ""))
    return [
        Column(prefix + str(name), _kind_of(sub), str(name)) for name, sub in properties.items()
    ]


def _kind_of(spec: Any) -> Kind:
    if not isinstance(spec, Mapping):
        return "json"
    declared = spec.get("type")
    if isinstance(declared, list):
        kinds = [t for t in declared if t != "null"]
        declared = kinds[0] if len(kinds) == 1 else None
    if declared is None and isinstance(spec.get("enum"), list):
        values = spec["enum"]
        if values and all(isinstance(v, str) for v in values):
            return "string"
    return _JSON_TYPES.get(declared, "json") if isinstance(declared, str) else "json"


def _structured_params(params: dict[str, Any], schema: Any, provider: str) -> dict[str, Any]:
    """Ask OpenAI-compatible servers for JSON that matches the schema (unless params do)."""
    if provider == "anthropic" or "response_format" in params:
        return params
    spec = _model_schema(schema) if isinstance(schema, type) else dict(schema)
    title = spec.get("title") if isinstance(spec.get("title"), str) else "answer"
    name = re.sub(r"[^A-Za-z0-9_-]", "_", str(title))[:64] or "answer"
    return {
        **params,
        "response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": spec}},
    }


def _request_inputs(
    options: Mapping[str, Any], columns: Sequence[str], endpoint: str
) -> tuple[list[str], list[dict[str, Any]] | None, str | None]:
    """Return the columns a request reads, the messages template, and the messages column."""
    prompt = options.get("prompt")
    messages = options.get("messages")
    shown = ", ".join(map(repr, columns)) or "none"
    if prompt is not None and messages is not None:
        raise ConfigError("give prompt= or messages=, not both")
    needed: list[str] = []
    template: list[dict[str, Any]] | None = None
    column: str | None = None
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt must be a template string, got {type(prompt).__name__}")
        needed = _fields_of(prompt, "prompt")
    elif isinstance(messages, str):
        column = messages
        needed = [messages]
    elif messages is not None:
        if not isinstance(messages, Sequence) or not all(isinstance(m, Mapping) for m in messages):
            raise ConfigError(
                "messages must be a column name or a list of messages"
                ' ({"role": "user", "content": "a template over the columns"})'
            )
        template = [dict(m) for m in messages]
        for i, message in enumerate(template):
            if isinstance(message.get("content"), str):
                needed += _fields_of(message["content"], f"messages[{i}] content")
    else:
        fallback = (
            ("text", "input", "prompt") if endpoint == "embeddings" else ("messages", "prompt")
        )
        found = next((c for c in fallback if c in columns), None)
        if found is None:
            raise ConfigError(
                "give prompt= (a template over the columns, like 'Summarize {text}') or"
                f" messages=; the input has no {' or '.join(map(repr, fallback))} column"
                f" (columns: {shown})"
            )
        needed = [found]
    for name in needed:
        if name not in columns:
            close = difflib.get_close_matches(name, [str(c) for c in columns], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"the template names {name!r}, not a column{hint}; columns: {shown}")
    wanted = set(needed)
    return [c for c in columns if c in wanted], template, column


def make_plan(options: Mapping[str, Any], columns: Sequence[str]) -> Plan:
    """Check ``options`` against the input's ``columns`` and return the job's plan.

    Raises:
        ConfigError: An unknown or invalid option, a template naming a missing column, an
            answer column that already exists.
    """
    check_names(options)
    schema = options.get("schema")
    job = {k: v for k, v in options.items() if k in _JOB_FIELDS}
    endpoint = str(job.get("endpoint", "chat"))
    provider = str(job.get("provider", "openai"))
    if schema is not None:
        if endpoint == "embeddings":
            raise ConfigError("schema applies to chat, not to the embeddings endpoint")
        job["json_output"] = True
        job["params"] = _structured_params(dict(job.get("params") or {}), schema, provider)
    inputs, template, messages_column = _request_inputs(
        options, [str(c) for c in columns], endpoint
    )
    if template is not None or messages_column is not None:
        job["prompt"] = None
    settings = JobSettings(**job)
    if not settings.model:
        raise ConfigError("no model: give model= (the simulator answers any name)")
    answers = _answer_columns(options, schema, settings.endpoint, settings.json_output)
    error_column = str(options.get("error_column", "error"))
    names = [c.name for c in answers] + [error_column]
    existing = set(map(str, columns))
    for name in names:
        if not name:
            raise ConfigError("answer and error column names must not be empty")
        if name in existing:
            raise ConfigError(
                f"the input already has a column {name!r}: choose another output_column=,"
                " field_prefix= or error_column= (or drop it)"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"answer and error columns must differ: {names}")
    on_error = options.get("on_error", "null")
    if on_error not in ("null", "raise"):
        raise ConfigError(f"on_error must be 'null' or 'raise', got {on_error!r}")
    chunk_rows = options.get("chunk_rows", 2048)
    window = options.get("window", 16384)
    for label, value in (("chunk_rows", chunk_rows), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{label} must be an integer >= 1, got {value!r}")
    return Plan(
        settings=settings,
        schema=schema,
        inputs=inputs,
        messages=template,
        messages_column=messages_column,
        answers=answers,
        error_column=error_column,
        on_error=on_error,
        checkpoint=_path(options.get("checkpoint"), "checkpoint"),
        overwrite=bool(options.get("overwrite", False)),
        dead_letter=_path(options.get("dead_letter"), "dead_letter"),
        progress=options.get("progress"),
        chunk_rows=chunk_rows,
        window=max(window, chunk_rows),
    )


def _path(value: Any, label: str) -> str | None:
    if value is None:
        return None
    import os

    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{label} must be a path, got {type(value).__name__}")
    return os.fspath(value)
