"""The LLM caller: one stage that sends each row to a chat or embeddings API, and never loses it.

:class:`LLMCaller` turns a record into a request (a ``str.format`` template over its fields),
sends it over one pooled aiohttp session per run, and emits the answer merged into the record
(or as a :class:`Completion`). Around every request it applies, in order:

1. the response cache (a hit sends nothing);
2. the rate limiter (``acquire(estimated tokens)``, reconciled with the real usage after);
3. a concurrency slot, held only for the HTTP attempt itself: a row waiting for its retry
   backoff or for the rate limiter holds no slot;
4. the retry policy (tenacity): exponential backoff with full jitter and a cap, ``1 +
   max_retries`` attempts, the row's overall deadline, ``Retry-After`` and ``x-should-retry``.

What happens on each kind of failure:

==========================================  =================================================
connection error, timeout, idle stream      retried
408, 409, 429 rate limit, 5xx, 529          retried; 429/503/529 also pause the limiter for
                                            every worker and shrink the adaptive concurrency
truncated/malformed stream, error event,    retried (a truncated stream is never accepted)
non-JSON or malformed 200 body
400, 403, 404, 422 (or x-should-retry:      dead letter with the status and the provider's
false)                                      message, never retried
401 before any request of the run           :class:`AuthenticationError` stops the job: a
succeeded                                   rejected key would fail every row the same way;
                                            after a success, a 401 only dead-letters the row
429 ``insufficient_quota`` and the other    :class:`~pipeline._errors.QuotaExhaustedError`
money codes                                 stops the job (retrying cannot help)
Retry-After beyond the row's deadline       dead letter now, instead of sleeping blindly
retries or deadline exhausted               dead letter naming the last error and attempts
==========================================  =================================================

The API key is read from the environment when the run starts, sent only in the provider's
auth header, returned by :meth:`LLMCaller.secrets` so the runtime redacts it everywhere, and
scrubbed from every message this module builds.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import importlib
import inspect
import json
import os
import random
import re
import string
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from json.encoder import encode_basestring
from typing import Any, Literal, TypeVar

import aiohttp
import anyio
from opentelemetry import trace
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from pipeline._envelope import Envelope
from pipeline._errors import ConfigError, FatalError, ItemError, MissingFieldError
from pipeline._errors import QuotaExhaustedError as QuotaExhaustedError
from pipeline._stage import Inbox, ItemStage, OnError, Outbox
from stages._batch import split_batch
from stages.llm._cache import ResponseCache, request_key
from stages.llm._limits import AdaptiveConcurrency, Limiter, RateLimiter, parse_retry_after
from stages.llm._providers import (
    QUOTA_CODES,
    Answer,
    Endpoint,
    HTTPFailure,
    Provider,
    ProviderName,
    ResponseFormatError,
    make_provider,
)
from stages.llm._sse import (
    AnthropicStreamAssembler,
    ChatStreamAssembler,
    SSEDecoder,
    StreamError,
    StreamErrorEvent,
    StreamResult,
    Usage,
)

R = TypeVar("R")
Output = Literal["merge", "completion"]
DeltaHook = Callable[[Envelope[Any], str], Awaitable[None] | None]
CallHook = Callable[[Any], Awaitable[Any]]

_perf = time.perf_counter
_REDACTED = "***"
_LEARN_AFTER = 16  # answers seen before the completion estimate follows their average
_OVERLOAD_CODES = frozenset({"overloaded_error", "rate_limit_error", "rate_limit_exceeded"})
_SENSITIVE_HEADERS = frozenset({"authorization", "api-key", "x-api-key", "proxy-authorization"})
_FENCE = re.compile(r"^```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?```$", re.DOTALL)


@dataclasses.dataclass(frozen=True, slots=True)
class Price:
    """What a model costs, in US dollars per million tokens.

    Attributes:
        prompt: USD per 1M prompt (input) tokens.
        completion: USD per 1M completion (output) tokens.
    """

    prompt: float
    completion: float

    def cost(self, usage: Usage) -> float:
        """Return the cost of ``usage`` in USD."""
        return (usage.prompt_tokens * self.prompt + usage.completion_tokens * self.completion) / 1e6


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    """The full answer for one row (``output="completion"``).

    Attributes:
        text: The generated text (chat), ``None`` for embeddings.
        parsed: The validated JSON object (or pydantic model) with structured output.
        usage: Tokens the server reported for this row, ``None`` when unknown.
        model: The model that answered, as the server names it.
        finish_reason: Why generation stopped (``"stop"``, ``"length"``, ``"end_turn"``...).
        attempts: HTTP attempts made for the row (retries and re-asks included).
        latency_s: Seconds from the first attempt to the answer, waits included.
        embedding: The vector (embeddings).
        cost_usd: What the row cost per the price table (0.0 when unknown or cached).
        cached: Whether the answer came from the response cache.
    """

    text: str | None
    parsed: Any = None
    usage: Usage | None = None
    model: str | None = None
    finish_reason: str | None = None
    attempts: int = 1
    latency_s: float = 0.0
    embedding: list[float] | None = None
    cost_usd: float = 0.0
    cached: bool = False


class LLMCallError(ItemError):
    """A request for one row failed; dead-lettered once retries cannot help.

    Args:
        message: What failed, with the provider's message (API key redacted).
        status: The HTTP status, when there was a response.
        code: The provider's error code or type.
        retryable: Whether another attempt may succeed.
        retry_after: Seconds the server asked us to wait, if it said.
        attempts: Attempts made so far.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message, status=status, attempts=attempts)
        self.code = code
        self.retryable = retryable
        self.retry_after = retry_after


class DeadlineExceededError(LLMCallError):
    """The row's overall deadline (``deadline_s``) passed before it got an answer."""


class InvalidOutputError(ItemError):
    """The answer is not valid JSON for the schema, even after the re-asks."""


class AuthenticationError(FatalError):
    """The server rejected the API key before any request of the run succeeded."""

    def __init__(self, message: str, *, status: int | None = 401) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(slots=True)
class CallerTotals:
    """What the caller did in its last run, beyond the stage counters.

    Attributes:
        limiter_wait_s: Seconds rows spent waiting for the rate limiter, summed.
        slot_wait_s: Seconds rows spent waiting for a concurrency slot, summed.
        cache_hits: Answers served from the response cache.
        reasks: Follow-up requests made because an answer failed validation.
        rate_limited: Responses that asked us to slow down (429, 503, 529).
        unknown_usage: Answers whose token usage the server did not report.
    """

    limiter_wait_s: float = 0.0
    slot_wait_s: float = 0.0
    cache_hits: int = 0
    reasks: int = 0
    rate_limited: int = 0
    unknown_usage: int = 0


class _RunState:
    """What all workers of the caller share during one run."""

    __slots__ = (
        "chat_parts",
        "chat_url",
        "completion_mean",
        "completions_seen",
        "concurrency",
        "fatal",
        "key",
        "limited",
        "limiter",
        "seats",
        "session",
        "stopping",
        "succeeded",
        "warned",
    )

    def __init__(
        self,
        key: str | None,
        limiter: Limiter,
        concurrency: AdaptiveConcurrency,
        session: aiohttp.ClientSession | None,
        limited: bool,
    ) -> None:
        self.key = key
        self.limiter = limiter
        self.concurrency = concurrency
        self.session = session
        # Whether the limiter can hold a request back. A run's own limiter with no rpm/tpm
        # lets everything through at once until a 429 pauses it or a response states a limit
        # to learn: until then asking it costs time and changes nothing, so it is skipped.
        self.limited = limited
        self.chat_url = ""
        self.chat_parts: tuple[str, str] | None = None
        self.seats = _Seats(concurrency)  # see LLMCaller.run
        self.succeeded = False
        self.stopping = False
        self.fatal: FatalError | None = None  # the error that is stopping the run
        self.warned: set[str] = set()
        self.completion_mean = 0.0  # moving average of completion tokens per answer
        self.completions_seen = 0

    def observe_completion(self, tokens: int) -> None:
        """Fold one answer's completion tokens into the moving average."""
        self.completions_seen += 1
        if self.completions_seen == 1:
            self.completion_mean = float(tokens)
        else:
            self.completion_mean += (tokens - self.completion_mean) * 0.05


class _Seats:
    """Which workers may take a new row: as many as the concurrency limit, now.

    A worker holding a seat takes rows one after the other; the others wait here without
    touching the inbox. A worker gives its seat up while its row waits to be retried (so a
    spare worker keeps the request slot busy), and when the adaptive limit went down.
    Waiters are admitted in arrival order.
    """

    __slots__ = ("concurrency", "taken", "waiting")

    def __init__(self, concurrency: AdaptiveConcurrency) -> None:
        self.concurrency = concurrency
        self.taken = 0
        self.waiting: collections.deque[anyio.Event] = collections.deque()

    async def take(self) -> None:
        """Wait for a seat."""
        if self.taken < self.concurrency.limit and not self.waiting:
            self.taken += 1
            return
        granted = anyio.Event()
        self.waiting.append(granted)
        try:
            await granted.wait()
        except BaseException:
            if granted.is_set():
                self.give_back()
            else:
                self.waiting.remove(granted)
            raise

    def give_back(self) -> None:
        """Free a seat (and admit waiters the limit allows)."""
        self.taken -= 1
        self.admit()

    def admit(self) -> None:
        """Seat waiters while the limit allows (it may have grown since they came)."""
        limit = self.concurrency.limit
        while self.waiting and self.taken < limit:
            self.taken += 1
            self.waiting.popleft().set()


class _Seat:
    """One worker's seat, given up while its row waits to be retried."""

    __slots__ = ("held", "seats")

    def __init__(self, seats: _Seats) -> None:
        self.seats = seats
        self.held = False

    async def take(self) -> None:
        await self.seats.take()
        self.held = True

    def give_up(self) -> None:
        if self.held:
            self.held = False
            self.seats.give_back()


_SEAT: contextvars.ContextVar[_Seat | None] = contextvars.ContextVar("llm_seat", default=None)


class _Template:
    """A ``str.format`` template over a record's fields, with errors that name the field."""

    __slots__ = ("fields", "text")

    def __init__(self, text: str) -> None:
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ConfigError(f"prompt template {text!r} is malformed: {exc}") from None
        self.text = text
        self.fields = tuple(name for _, name, _, _ in parsed if name is not None)

    def render(self, record: Any) -> str:
        """Fill the template from ``record`` (a mapping, or any value as ``{value}``/``{}``).

        Raises:
            MissingFieldError: A field the template names is missing from the record.
        """
        try:
            if isinstance(record, Mapping):
                return self.text.format_map(record)
            return self.text.format(record, value=record)
        except (KeyError, IndexError, AttributeError, TypeError):
            raise self._missing(record) from None

    def _missing(self, record: Any) -> MissingFieldError:
        formatter = string.Formatter()
        args: tuple[Any, ...] = () if isinstance(record, Mapping) else (record,)
        kwargs: Mapping[str, Any] = record if isinstance(record, Mapping) else {"value": record}
        auto = 0
        for name in self.fields:
            field = name
            if field == "":
                field, auto = str(auto), auto + 1
            try:
                formatter.get_field(field, args, kwargs)
            except (KeyError, IndexError, AttributeError, TypeError):
                return MissingFieldError(field, _available(record))
        return MissingFieldError(self.fields[0] if self.fields else "?", _available(record))


def _available(record: Any) -> Sequence[str]:
    if isinstance(record, Mapping):
        return [str(k) for k in record]
    return ["value"]


def _parse_json_text(text: str) -> Any:
    """Parse a JSON answer, tolerating surrounding whitespace and a Markdown code fence."""
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    return json.loads(stripped)


class _Validator:
    """Validates parsed JSON against a JSON schema dict or a pydantic model class."""

    def __init__(self, schema: Mapping[str, Any] | type | None) -> None:
        self.schema = schema
        self._check: Callable[[Any], Any]
        if schema is None:
            self._check = lambda value: value
        elif isinstance(schema, Mapping):
            try:
                from jsonschema import (  # type: ignore[import-untyped,unused-ignore]
                    exceptions,
                    validators,
                )
            except ImportError as exc:  # pragma: no cover - the [schema] extra
                raise ConfigError(
                    "schema= needs jsonschema: pip install llm-pipeline[schema]"
                ) from exc
            cls = validators.validator_for(schema)
            try:
                cls.check_schema(schema)
            except exceptions.SchemaError as exc:
                raise ConfigError(f"schema is not a valid JSON schema: {exc.message}") from None
            validator = cls(schema)

            def check(value: Any) -> Any:
                error = exceptions.best_match(validator.iter_errors(value))
                if error is not None:
                    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                    raise ValueError(f"at {where}: {error.message}")
                return value

            self._check = check
        elif hasattr(schema, "model_validate"):
            model: Any = schema

            def check_model(value: Any) -> Any:
                try:
                    return model.model_validate(value)
                except Exception as exc:  # pydantic.ValidationError
                    raise ValueError(_short(str(exc), 800)) from None

            self._check = check_model
        else:
            raise ConfigError(
                f"schema must be a JSON schema dict or a pydantic model, not {schema!r}"
            )

    def __call__(self, text: str | None) -> Any:
        """Return the parsed, validated answer; raise ``ValueError`` saying what is wrong."""
        if text is None:
            raise ValueError("the answer has no text")
        try:
            value = _parse_json_text(text)
        except ValueError as exc:
            raise ValueError(f"not valid JSON ({exc})") from None
        return self._check(value)


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class LLMCaller(ItemStage[Any, Any]):
    """Send each row to an LLM API (chat or embeddings) with limits, retries and accounting.

    All arguments are keyword-only. The most used::

        LLMCaller(model="gpt-4o-mini", prompt="Say hello to {name}", rpm=500, tpm=200_000)

    Args:
        model: Model name (Azure: the deployment name unless ``deployment`` is given).
        prompt: ``str.format`` template over the record's fields (``"Hello {name}"``,
            ``"{user[name]}"``); other values are ``{value}``. A missing field dead-letters the
            row with :class:`~pipeline._errors.MissingFieldError`. Without a template a record
            is the prompt itself (a string), or a mapping with ``"messages"`` or ``"prompt"``.
        system: System prompt (literal text, not a template).
        endpoint: ``"chat"`` or ``"embeddings"`` (embeddings take batches from a Batcher).
        provider: ``"openai"`` (any OpenAI-compatible server), ``"azure"`` or ``"anthropic"``.
        base_url: API root; default ``$OPENAI_BASE_URL`` (``$ANTHROPIC_BASE_URL``,
            ``$AZURE_OPENAI_ENDPOINT``) else the provider's public URL. LightOn Paradigm:
            ``https://paradigm.lighton.ai/api/v2``.
        api_key_env: Environment variable holding the key, read when the run starts
            (default ``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY`` or ``AZURE_OPENAI_API_KEY``).
            A variable named here explicitly must be set; the default may be unset (local
            servers such as vLLM or Ollama need no key).
        deployment: Azure deployment name (default: ``model``).
        api_version: Azure ``api-version`` (default ``2024-10-21``).
        headers: Extra HTTP headers for every request.
        params: Extra body fields (``temperature``, ``max_tokens``, ``response_format``...).
        stream: Stream chat answers (SSE); deltas go to ``on_delta``.
        concurrency: Fixed number of requests in flight, or ``None`` to adapt it (AIMD) up to
            ``max_concurrency``.
        max_concurrency: Ceiling of the adaptive concurrency (and the connection pool size).
        rpm: Requests per minute allowed (``None``: no limit, but 429s still pause).
        tpm: Tokens per minute allowed (estimated before, reconciled after each request).
        limiter: A shared limiter (e.g. Redis-backed) used instead of ``rpm``/``tpm``.
        max_retries: Retries after the first attempt (attempts are ``1 + max_retries``).
        backoff_base: First backoff ceiling in seconds (doubles per retry, full jitter).
        backoff_cap: Largest backoff ceiling in seconds.
        deadline_s: Overall time a row may take, waits and retries included (``None``: none).
        connect_timeout: Seconds to open a connection.
        timeout: Seconds one attempt may take in total.
        idle_timeout: Seconds a stream may stay silent between chunks before it is retried.
        json_output: Parse the answer as JSON (``parsed``); implied by ``schema``.
        schema: JSON schema dict (jsonschema) or pydantic model the answer must satisfy.
        reask: How many times an invalid answer is sent back with the error to fix it.
        prices: USD per 1M prompt/completion tokens by model: ``{"gpt-4o": (2.5, 10.0)}``.
        budget_usd: Stop reading input once the run has cost this much (needs ``prices``).
        cache: A ``ResponseCache``: answers are looked up before sending and stored after.
        output: ``"merge"`` emits ``{**record, output_field: answer}``; ``"completion"`` emits
            a :class:`Completion`.
        output_field: Field name of the answer with ``output="merge"``.
        on_delta: Called with ``(envelope, text)`` for each streamed delta (sync or async);
            ``envelope.attempts`` tells which attempt a delta belongs to, since a retried
            stream starts again from the beginning.
        call: Escape hatch: ``async def call(record) -> result`` replaces the HTTP request and
            gets the same limiter, concurrency, retries, deadline and accounting. A returned
            string is the answer text; an object with ``usage`` is counted.
        name: Stage name (default ``"llm"``).
        workers: Rows handled at once (default twice the concurrency ceiling). As many as
            the ceiling take new rows; the others do only while rows wait to be retried, so
            a row in backoff does not idle a request slot.
        buffer: Inbox capacity (default the concurrency ceiling, at least 16): answers come
            back in bursts, and a burst that finds its next rows already waiting costs no
            wake-up per row.
        on_error: What to do with unexpected exceptions (see :data:`pipeline._stage.OnError`).
    """

    def __init__(
        self,
        *,
        model: str = "",
        prompt: str | None = None,
        system: str | None = None,
        endpoint: Endpoint = "chat",
        provider: ProviderName = "openai",
        base_url: str | None = None,
        api_key_env: str | None = None,
        deployment: str | None = None,
        api_version: str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
        stream: bool = False,
        concurrency: int | None = None,
        max_concurrency: int = 64,
        rpm: float | None = None,
        tpm: float | None = None,
        limiter: Limiter | None = None,
        max_retries: int = 4,
        backoff_base: float = 0.5,
        backoff_cap: float = 8.0,
        deadline_s: float | None = None,
        connect_timeout: float = 10.0,
        timeout: float = 600.0,
        idle_timeout: float = 60.0,
        json_output: bool = False,
        schema: Mapping[str, Any] | type | None = None,
        reask: int = 1,
        prices: Mapping[str, Price | tuple[float, float]] | None = None,
        budget_usd: float | None = None,
        cache: ResponseCache | None = None,
        output: Output = "merge",
        output_field: str = "response",
        on_delta: DeltaHook | None = None,
        call: CallHook | None = None,
        name: str | None = None,
        workers: int | None = None,
        buffer: int | None = None,
        on_error: OnError = "dead_letter",
    ) -> None:
        if call is None and not model:
            raise ConfigError("LLMCaller needs model= (or call= for a custom caller)")
        if endpoint not in ("chat", "embeddings"):
            raise ConfigError(f"endpoint must be 'chat' or 'embeddings', not {endpoint!r}")
        if output not in ("merge", "completion"):
            raise ConfigError(f"output must be 'merge' or 'completion', not {output!r}")
        if concurrency is not None and concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1 or None (adaptive), got {concurrency}")
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0 or reask < 0:
            raise ConfigError("max_retries and reask must be >= 0")
        for label, value in (
            ("timeout", timeout),
            ("connect_timeout", connect_timeout),
            ("idle_timeout", idle_timeout),
            ("backoff_cap", backoff_cap),
        ):
            if value <= 0:
                raise ConfigError(f"{label} must be > 0, got {value}")
        if deadline_s is not None and deadline_s <= 0:
            raise ConfigError(f"deadline_s must be > 0 or None, got {deadline_s}")
        if budget_usd is not None and not prices:
            raise ConfigError("budget_usd needs prices= to know what requests cost")
        try:
            self.provider: Provider | None = (
                None
                if call is not None
                else make_provider(
                    provider, base_url, deployment=deployment, api_version=api_version
                )
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.provider is not None and endpoint == "embeddings":
            if not self.provider.supports_embeddings:
                raise ConfigError(f"provider {provider!r} has no embeddings endpoint")
            if stream:
                raise ConfigError("stream=True applies to chat, not embeddings")
        ceiling = concurrency or max_concurrency
        super().__init__(
            name=name or "llm",
            workers=workers or 2 * ceiling,
            buffer=max(16, ceiling) if buffer is None else buffer,
            on_error=on_error,
        )
        self.model = model
        self.template = _Template(prompt) if prompt is not None else None
        self.system = system
        self.endpoint: Endpoint = endpoint
        self.provider_name: ProviderName = provider
        self.api_key_env = api_key_env
        self.headers = dict(headers or {})
        self.params = dict(params or {})
        self.stream = stream
        self.concurrency = concurrency
        self.max_concurrency = ceiling
        self.rpm = rpm
        self.tpm = tpm
        self.limiter = limiter
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.deadline_s = deadline_s
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.validator = _Validator(schema) if (json_output or schema is not None) else None
        self.reask = reask
        self.prices = {
            m: p if isinstance(p, Price) else Price(float(p[0]), float(p[1]))
            for m, p in (prices or {}).items()
        }
        self.budget_usd = budget_usd
        self.cache = cache
        self.output: Output = output
        self.output_field = output_field
        self.on_delta = on_delta
        self.call = call
        self.totals = CallerTotals()
        self._state: _RunState | None = None
        # the idle timeout bounds the silence between reads of a stream (aiohttp's sock_read)
        self._timeouts = aiohttp.ClientTimeout(
            total=timeout,
            sock_connect=connect_timeout,
            sock_read=idle_timeout if stream else None,
        )
        est = self.params.get("max_tokens") or self.params.get("max_completion_tokens")
        self._completion_estimate = int(est) if isinstance(est, int) else 256

    def __repr__(self) -> str:
        parts = [f"name={self.name!r}"]
        if self.call is not None:
            parts.append(f"call={getattr(self.call, '__qualname__', self.call)!s}")
        else:
            parts += [f"model={self.model!r}", f"provider={self.provider_name!r}"]
            parts.append(f"endpoint={self.endpoint!r}")
            if self.provider is not None:
                parts.append(f"base_url={self.provider.base_url!r}")
        if self.template is not None:
            parts.append(f"prompt={_short(self.template.text, 60)!r}")
        for label in ("stream", "concurrency", "rpm", "tpm", "deadline_s", "budget_usd"):
            value = getattr(self, label)
            if value not in (None, False):
                parts.append(f"{label}={value!r}")
        if self.headers:
            parts.append(f"headers=[{', '.join(sorted(self.headers))}]")  # names only
        parts.append(f"max_retries={self.max_retries}")
        parts.append(f"workers={self.workers}")
        return f"LLMCaller({', '.join(parts)})"

    # -- secrets -------------------------------------------------------------------------------

    def _key_env(self) -> str | None:
        if self.api_key_env is not None:
            return self.api_key_env
        return None if self.provider is None else self.provider.key_env

    def secrets(self) -> list[str]:
        """Return the values the runtime must redact from messages, logs and records."""
        found: list[str] = []
        if self._state is not None and self._state.key:
            found.append(self._state.key)
        env = self._key_env()
        if env and os.environ.get(env):
            found.append(os.environ[env])
        found += [v for k, v in self.headers.items() if k.lower() in _SENSITIVE_HEADERS and v]
        # "Bearer <key>" headers: the key alone too
        found += [v.split(None, 1)[1] for v in list(found) if v.lower().startswith("bearer ")]
        return [s for s in dict.fromkeys(found) if s]

    def _scrub(self, text: str) -> str:
        for secret in self.secrets():
            if len(secret) >= 4 and secret in text:
                text = text.replace(secret, _REDACTED)
        return text

    # -- lifespan ------------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Read the key, open the HTTP session and the limits for this run; close them after."""
        if self._state is not None:
            raise ConfigError(f"stage {self.name!r} is already running in another pipeline")
        key: str | None = None
        env = self._key_env()
        if self.call is None and env:
            key = os.environ.get(env) or None
            if key is None and self.api_key_env is not None:
                raise ConfigError(f"stage {self.name!r}: environment variable ${env} is not set")
        limiter = self.limiter or RateLimiter(rpm=self.rpm, tpm=self.tpm)
        concurrency = AdaptiveConcurrency(
            limit=self.concurrency or min(16, self.max_concurrency),
            minimum=1,
            maximum=self.max_concurrency,
            adaptive=self.concurrency is None,
        )
        self.totals = CallerTotals()
        session: aiohttp.ClientSession | None = None
        if self.provider is not None:
            connector = aiohttp.TCPConnector(
                limit=self.max_concurrency,
                limit_per_host=self.max_concurrency,
                ttl_dns_cache=300,
                keepalive_timeout=30,
            )
            headers = {**self.provider.base_headers(), **self.headers}
            headers.update(self.provider.auth_headers(key))
            session = aiohttp.ClientSession(
                connector=connector, headers=headers, timeout=self._timeouts
            )
        limited = self.limiter is not None or self.rpm is not None or self.tpm is not None
        state = _RunState(key, limiter, concurrency, session, limited)
        if self.provider is not None:
            state.chat_url = self.provider.url("chat", self.model)
            state.chat_parts = self._chat_parts()
        self._state = state
        try:
            yield
        finally:
            self._state = None
            if session is not None:
                # shielded: a cancelled close would replace the error that is ending the run
                with anyio.CancelScope(shield=True):
                    await session.close()

    @property
    def run_state(self) -> _RunState:
        """The state of the current run (only valid inside the stage's lifespan)."""
        if self._state is None:
            raise ConfigError(f"stage {self.name!r} is not running (use it in a Pipeline)")
        return self._state

    # -- handling rows -------------------------------------------------------------------------

    async def run(self, inbox: Inbox[Any], outbox: Outbox[Any]) -> None:
        """Handle rows one at a time, like :meth:`ItemStage.run`, taking a seat first.

        A worker takes a new row only with a seat, and there are as many seats as the
        concurrency limit (see :class:`_Seats`): the spare workers wait for one without
        touching the inbox, and get one only while a row waits to be retried (its worker gives
        the seat up) or when the adaptive limit grows. Without retries each row thus finds a
        request slot free instead of queueing for one, which would cost every row a wake-up.
        """
        state = self.run_state
        seats = state.seats
        concurrency = state.concurrency
        seat = _Seat(seats)
        token = _SEAT.set(seat)
        stats = outbox.stats
        handle = self.handle
        try:
            while True:
                if seat.held:
                    # the adaptive limit may have moved since the last row
                    limit = concurrency.limit
                    if seats.taken > limit:
                        seat.give_up()
                    elif seats.waiting and seats.taken < limit:
                        seats.admit()
                if not seat.held:
                    await seat.take()
                try:
                    env = await inbox.receive()
                except anyio.EndOfStream:
                    return
                started = _perf()
                try:
                    with outbox.span(env):
                        await handle(env, outbox)
                except Exception as error:  # cancellation is BaseException: never caught here
                    await outbox.handle_error(env, error)
                stats.busy_s += _perf() - started
        finally:
            seat.give_up()
            _SEAT.reset(token)

    async def handle(self, env: Envelope[Any], outbox: Outbox[Any]) -> None:
        """Answer one row, or every member of a batch envelope."""
        try:
            if env.members is None:
                value = await self._answer_row(env, outbox)
                await outbox.send(env.replace(value))
            elif self.endpoint == "embeddings" and self.call is None:
                await self._embed_batch(env, outbox)
            else:
                await self._each_member(env, outbox)
        except FatalError as error:
            state = self._state
            if state is not None:
                if state.fatal is not None and state.fatal is not error:
                    # Another worker already stopped the job for the same reason (requests in
                    # flight together all see the rejected key or the empty account): one error
                    # is enough. The run's task group is cancelling this worker.
                    await anyio.sleep_forever()
                state.fatal = error
            raise

    async def _each_member(self, env: Envelope[Any], outbox: Outbox[Any]) -> None:
        """Answer the members of a batch concurrently, each failing on its own."""
        fatal: list[BaseException] = []

        async def one(member: Envelope[Any]) -> None:
            try:
                value = await self._answer_row(member, outbox)
            except Exception as error:
                if self.should_dead_letter(error):
                    await outbox.fail(member, error)
                else:
                    fatal.append(error)
                    tg.cancel_scope.cancel()
                return
            await outbox.send(member.replace(value))

        assert env.members is not None
        async with anyio.create_task_group() as tg:
            for member in env.members:
                tg.start_soon(one, member)
        if fatal:
            raise fatal[0]

    async def _answer_row(self, env: Envelope[Any], outbox: Outbox[Any]) -> Any:
        """Return the output value for one row (merge or Completion)."""
        started = _perf()
        deadline = started + self.deadline_s if self.deadline_s is not None else None
        record = env.value
        if self.call is not None:
            answer, parsed, cost, raw = await self._via_call(env, outbox, deadline)
            result = parsed if self.validator is not None else raw
            return self._output(record, answer, result, env, started, cost, False, None, parsed)
        if self.endpoint == "embeddings":
            text = self._embedding_text(record)
            answer, cost, cached = await self._embed(env, outbox, [text], deadline)
            vector = answer.embeddings[0] if answer.embeddings else None
            return self._output(record, answer, vector, env, started, cost, cached, vector)
        answer, parsed, cost, cached = await self._chat(env, outbox, deadline)
        result = parsed if self.validator is not None else answer.text
        return self._output(record, answer, result, env, started, cost, cached, None, parsed)

    def _output(
        self,
        record: Any,
        answer: Answer,
        result: Any,
        env: Envelope[Any],
        started: float,
        cost: float,
        cached: bool,
        vector: list[float] | None,
        parsed: Any = None,
    ) -> Any:
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("llm.attempts", env.attempts)
            span.set_attribute("llm.cached", cached)
            if answer.usage is not None:
                span.set_attribute("llm.prompt_tokens", answer.usage.prompt_tokens)
                span.set_attribute("llm.completion_tokens", answer.usage.completion_tokens)
            if cost:
                span.set_attribute("llm.cost_usd", cost)
        if self.output == "merge":
            if isinstance(record, Mapping):
                return {**record, self.output_field: result}
            return {"value": record, self.output_field: result}
        return Completion(
            text=answer.text,
            parsed=parsed,
            usage=answer.usage,
            model=answer.model,
            finish_reason=answer.finish_reason,
            attempts=env.attempts,
            latency_s=_perf() - started,
            embedding=vector,
            cost_usd=cost,
            cached=cached,
        )

    # -- building requests ---------------------------------------------------------------------

    def _messages(self, record: Any) -> list[dict[str, Any]]:
        if self.template is not None:
            return [{"role": "user", "content": self.template.render(record)}]
        if isinstance(record, str):
            return [{"role": "user", "content": record}]
        if isinstance(record, Mapping):
            messages = record.get("messages")
            if isinstance(messages, list):
                return [dict(m) for m in messages]
            if isinstance(record.get("prompt"), str):
                return [{"role": "user", "content": record["prompt"]}]
        raise MissingFieldError("prompt", _available(record))

    def _embedding_text(self, record: Any) -> str:
        if self.template is not None:
            return self.template.render(record)
        if isinstance(record, str):
            return record
        if isinstance(record, Mapping):
            for field in ("text", "input", "prompt"):
                if isinstance(record.get(field), str):
                    return str(record[field])
        raise MissingFieldError("text", _available(record))

    def _estimate(self, size: int) -> int:
        """Return the tokens to reserve for a request of ``size`` characters or bytes.

        A quarter of them, plus the completion a chat answer is expected to use: ``max_tokens``
        (256 when not set) until the run has seen enough answers, then a quarter more than
        their recent average (never more than ``max_tokens``). Reserving ``max_tokens`` for
        every answer would run a job far below its ``tpm`` when answers are short; the limiter
        is reconciled with the real usage afterwards either way.
        """
        if self.endpoint != "chat":
            return max(1, size // 4)
        completion = self._completion_estimate
        state = self._state
        if state is not None and state.completions_seen >= _LEARN_AFTER:
            completion = min(completion, int(state.completion_mean * 1.25) + 1)
        return max(1, size // 4) + completion

    # -- chat ----------------------------------------------------------------------------------

    def _prompt_text(self, record: Any) -> str | None:
        """Return the one user message of ``record``, or ``None`` if it has other messages.

        Raises:
            MissingFieldError: A template field is missing from the record.
        """
        if self.template is not None:
            return self.template.render(record)
        if isinstance(record, str):
            return record
        if (
            isinstance(record, Mapping)
            and not isinstance(record.get("messages"), list)
            and isinstance(record.get("prompt"), str)
        ):
            return str(record["prompt"])
        return None  # _messages() reads it, or says what is missing

    def _chat_parts(self) -> tuple[str, str] | None:
        """Split the chat body of a one-message request around the message's JSON string.

        A row's body is then ``head + json_string(text) + tail``, byte for byte what encoding
        the whole body would give, without building and encoding the body per row. ``None``
        when the body cannot be split that way, or the cache needs the body itself for its key.
        """
        if self.provider is None or self.endpoint != "chat" or self.cache is not None:
            return None
        marker = "\x00llm-pipeline-prompt\x00"
        body = self.provider.chat_body(
            self.model, [{"role": "user", "content": marker}], self.system, self.params, self.stream
        )
        try:
            encoded = _ENCODER.encode(body)
        except (TypeError, ValueError):  # params that are not JSON: the slow path says so
            return None
        quoted = encode_basestring(marker)
        if encoded.count(quoted) != 1:
            return None
        head, tail = encoded.split(quoted)
        return head, tail

    async def _chat(
        self, env: Envelope[Any], outbox: Outbox[Any], deadline: float | None
    ) -> tuple[Answer, Any, float, bool]:
        state = self._state
        provider = self.provider
        assert state is not None and provider is not None
        url = state.chat_url
        messages: list[dict[str, Any]] | None = None
        text: str | None = None
        parts = state.chat_parts
        if parts is not None:
            text = self._prompt_text(env.value)
        if text is None:
            messages = self._messages(env.value)
        total_cost = 0.0
        any_cached = False
        for round_ in range(self.reask + 1):
            if messages is None:
                assert text is not None and parts is not None
                payload = _one_message_payload(parts, text)
                answer, cost, cached = await self._request(
                    env, outbox, url, None, 1, deadline, payload
                )
            else:
                body = provider.chat_body(
                    self.model, messages, self.system, self.params, self.stream
                )
                answer, cost, cached = await self._request(env, outbox, url, body, 1, deadline)
            total_cost += cost
            any_cached = any_cached or cached
            if self.validator is None:
                return answer, None, total_cost, any_cached
            try:
                parsed = self.validator(answer.text)
            except ValueError as exc:
                problem = str(exc)
                if round_ == self.reask:
                    raise InvalidOutputError(
                        self._scrub(f"invalid JSON output after {self.reask} re-ask(s): {problem}"),
                        attempts=env.attempts,
                    ) from None
                self.totals.reasks += 1
                if messages is None:
                    messages = [{"role": "user", "content": text}]
                messages = [
                    *messages,
                    {"role": "assistant", "content": answer.text or ""},
                    {
                        "role": "user",
                        "content": (
                            "Your answer is not valid: "
                            f"{problem}. Reply again with only the corrected JSON."
                        ),
                    },
                ]
                continue
            return answer, parsed, total_cost, any_cached
        raise AssertionError("unreachable")  # pragma: no cover

    # -- embeddings ----------------------------------------------------------------------------

    async def _embed(
        self, env: Envelope[Any], outbox: Outbox[Any], texts: list[str], deadline: float | None
    ) -> tuple[Answer, float, bool]:
        assert self.provider is not None
        url = self.provider.url("embeddings", self.model)
        body = self.provider.embeddings_body(self.model, texts, self.params)
        return await self._request(env, outbox, url, body, len(texts), deadline)

    async def _embed_batch(self, env: Envelope[Any], outbox: Outbox[Any]) -> None:
        """One request for a whole batch; vectors go back to the members in order."""
        assert env.members is not None
        started = _perf()
        deadline = started + self.deadline_s if self.deadline_s is not None else None
        good: list[Envelope[Any]] = []
        texts: list[str] = []
        for member in env.members:
            try:
                texts.append(self._embedding_text(member.value))
            except MissingFieldError as error:
                await outbox.fail(member, error)
                continue
            good.append(member)
        if not good:
            return
        batch = Envelope(
            [m.value for m in good],
            env.seq,
            env.key,
            env.origin,
            env.context,
            env.attempts,
            good,
            env.meta,
        )
        try:
            answer, cost, cached = await self._embed(batch, outbox, texts, deadline)
        except Exception as error:
            await outbox.handle_error(batch, error)
            return
        vectors = answer.embeddings or []
        share = cost / len(good)
        values = []
        for member, vector in zip(good, vectors, strict=True):
            member.attempts = batch.attempts
            single = dataclasses.replace(answer, usage=None, embeddings=[vector])
            values.append(
                self._output(member.value, single, vector, member, started, share, cached, vector)
            )
        for out in split_batch(batch, values):
            await outbox.send(out)

    # -- the escape hatch ----------------------------------------------------------------------

    async def _via_call(
        self, env: Envelope[Any], outbox: Outbox[Any], deadline: float | None
    ) -> tuple[Answer, Any, float, Any]:
        """Return ``(answer, parsed, cost, raw result)`` from the user's ``call``."""
        call = self.call
        assert call is not None
        record = env.value
        estimate = self._estimate(len(str(record)))

        async def attempt() -> Any:
            state = self.run_state
            if state.limited:
                await self._acquire(state, outbox, estimate)
            async with self._slot(state, outbox):
                try:
                    result = await call(record)
                except (ItemError, FatalError):
                    raise
                except Exception as exc:
                    raise self._classify_foreign(exc) from exc
            state.concurrency.success()
            state.succeeded = True
            return result

        raw = await self._retrying(env, outbox, attempt, deadline)
        answer = _answer_of(raw)
        cost = self._account(outbox, answer, estimate)
        parsed = None
        if self.validator is not None:
            try:
                parsed = self.validator(answer.text)
            except ValueError as exc:
                raise InvalidOutputError(
                    self._scrub(f"invalid JSON output: {exc}"), attempts=env.attempts
                ) from None
        return answer, parsed, cost, raw

    def _classify_foreign(self, exc: Exception) -> Exception:
        """Map an exception from a user ``call`` (e.g. an SDK's) to our retry decision."""
        status = getattr(exc, "status_code", None)
        if not isinstance(status, int):
            status = getattr(exc, "status", None)
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
        retry_after = parse_retry_after(headers) if headers is not None else None
        message = self._scrub(f"{type(exc).__name__}: {exc}")
        if isinstance(status, int):
            retryable = status in (408, 409, 429) or status >= 500
            if status in (429, 503, 529):
                self._overloaded(self.run_state, retry_after, rate_limited=status == 429)
            return LLMCallError(
                message, status=status, retryable=retryable, retry_after=retry_after
            )
        name = type(exc).__name__
        if isinstance(exc, (TimeoutError, ConnectionError, aiohttp.ClientConnectionError)) or (
            "Timeout" in name or "Connection" in name
        ):
            return LLMCallError(message, retryable=True)
        return exc

    # -- the request loop ----------------------------------------------------------------------

    async def _request(
        self,
        env: Envelope[Any],
        outbox: Outbox[Any],
        url: str,
        body: dict[str, Any] | None,
        count: int,
        deadline: float | None,
        payload: bytes | None = None,
    ) -> tuple[Answer, float, bool]:
        """Return ``(answer, cost, cached)`` for one request, with cache and retries.

        ``payload`` is the encoded ``body``; pass one of them (``body`` when there is a cache:
        its key is computed from the body).
        """
        if payload is None:
            assert body is not None
            payload = _encode(body)
        key: str | None = None
        if self.cache is not None:
            assert body is not None
            key = request_key(url, body)
            raw = await self.cache.get(key)
            if raw is not None:
                try:
                    answer = Answer.from_bytes(raw)
                except (ValueError, TypeError):
                    answer = None
                if answer is not None and self._fits(answer, count):
                    self.totals.cache_hits += 1
                    if self.on_delta is not None and answer.text:
                        await _call_hook(self.on_delta, env, answer.text)
                    return answer, 0.0, True
        estimate = self._estimate(len(payload))
        # The first attempt runs bare (see _retrying); this is the same, without a closure.
        env.attempts += 1
        try:
            if deadline is None:
                answer = await self._send(env, outbox, url, payload, count, estimate)
            else:
                answer = await self._within(
                    deadline, lambda: self._send(env, outbox, url, payload, count, estimate), env
                )
        except LLMCallError as error:
            answer = await self._retry(
                env,
                outbox,
                lambda: self._send(env, outbox, url, payload, count, estimate),
                deadline,
                error,
            )
        cost = self._account(outbox, answer, estimate)
        if key is not None:
            assert self.cache is not None
            await self.cache.put(key, answer.to_bytes())
        return answer, cost, False

    def _fits(self, answer: Answer, count: int) -> bool:
        if self.endpoint == "embeddings":
            return answer.embeddings is not None and len(answer.embeddings) == count
        return answer.text is not None

    async def _retrying(
        self,
        env: Envelope[Any],
        outbox: Outbox[Any],
        attempt: Callable[[], Awaitable[R]],
        deadline: float | None,
    ) -> R:
        """Run ``attempt`` until it succeeds, a non-retryable error, the attempts or deadline.

        The first attempt runs bare: most rows need no retry, and tenacity's machinery costs
        tens of microseconds per row. Its failure is replayed as tenacity's attempt 1 (see
        :meth:`_retry`), so the stop, wait and retry policy see every attempt.
        """
        env.attempts += 1
        try:
            return await self._within(deadline, attempt, env)
        except LLMCallError as error:
            return await self._retry(env, outbox, attempt, deadline, error)

    async def _retry(
        self,
        env: Envelope[Any],
        outbox: Outbox[Any],
        attempt: Callable[[], Awaitable[R]],
        deadline: float | None,
        error: LLMCallError,
    ) -> R:
        """Retry after a failed first attempt (``error``) with tenacity, or give up now."""
        policy = _RowPolicy(self, deadline)
        if not error.retryable:
            raise self._final(error, env, policy) from None
        seat = _SEAT.get()
        if seat is not None:  # let a spare worker take a new row while this one waits
            seat.give_up()
        pending: LLMCallError | None = error
        retrying = AsyncRetrying(
            stop=policy.stop,
            wait=policy.wait,
            retry=retry_if_exception(_is_retryable),
            sleep=anyio.sleep,
            before_sleep=policy.before_sleep,
            reraise=True,
        )
        stats = outbox.stats
        result: R | None = None
        try:
            async for trial in retrying:
                with trial:
                    if pending is not None:
                        replay, pending = pending, None
                        raise replay
                    stats.retries += 1
                    env.attempts += 1
                    result = await self._within(deadline, attempt, env)
        except LLMCallError as final:
            raise self._final(final, env, policy) from None
        return result  # type: ignore[return-value]

    async def _within(
        self, deadline: float | None, attempt: Callable[[], Awaitable[R]], env: Envelope[Any]
    ) -> R:
        if deadline is None:
            return await attempt()
        remaining = deadline - _perf()
        result: R | None = None
        done = False
        if remaining > 0:
            with anyio.move_on_after(remaining):
                result = await attempt()
                done = True
        if not done:
            raise DeadlineExceededError(
                f"row deadline of {self.deadline_s:g}s reached during attempt {env.attempts}",
                attempts=env.attempts,
            )
        return result  # type: ignore[return-value]

    def _final(self, error: LLMCallError, env: Envelope[Any], policy: _RowPolicy) -> LLMCallError:
        """Turn the last error of a row into the error it is dead-lettered with."""
        attempts = env.attempts
        if isinstance(error, DeadlineExceededError):
            error.attempts = attempts
            return error
        if not error.retryable:
            error.attempts = attempts
            return error
        if policy.past_deadline:
            if error.retry_after is not None and policy.wanted >= error.retry_after:
                why = (
                    f"server asked to retry after {error.retry_after:g}s, past the row's "
                    f"deadline of {self.deadline_s:g}s"
                )
            else:
                why = f"row deadline of {self.deadline_s:g}s reached"
            message = f"{why} after {attempts} attempt(s): {error}"
            cls: type[LLMCallError] = DeadlineExceededError
        else:
            message = f"gave up after {attempts} attempt(s): {error}"
            cls = LLMCallError
        return cls(
            message,
            status=error.status,
            code=error.code,
            retryable=False,
            retry_after=error.retry_after,
            attempts=attempts,
        )

    async def _acquire(self, state: _RunState, outbox: Outbox[Any], estimate: int) -> None:
        waited = await state.limiter.acquire(estimate)
        if waited:
            self.totals.limiter_wait_s += waited
            outbox.stats.limiter_wait_s += waited
            span = trace.get_current_span()
            if span.is_recording():
                span.add_event("llm.limiter_wait", {"seconds": waited, "tokens": estimate})

    @asynccontextmanager
    async def _slot(self, state: _RunState, outbox: Outbox[Any]) -> AsyncIterator[None]:
        asked = _perf()
        async with state.concurrency.slot():
            if state.fatal is not None:
                # the job is stopping (a rejected key, no credit): send nothing more, wait to
                # be cancelled with the rest of the run
                await anyio.sleep_forever()
            waited = _perf() - asked
            self.totals.slot_wait_s += waited
            outbox.stats.limiter_wait_s += waited
            if waited > 0.001:
                span = trace.get_current_span()
                if span.is_recording():
                    span.add_event("llm.slot_wait", {"seconds": waited})
            outbox.stats.requests += 1
            yield

    async def _send(
        self,
        env: Envelope[Any],
        outbox: Outbox[Any],
        url: str,
        payload: bytes,
        count: int,
        estimate: int,
    ) -> Answer:
        """Make one HTTP attempt and return the answer; raise :class:`LLMCallError` if not.

        This runs once per row, so it inlines what would otherwise be helper calls.
        """
        state = self._state
        provider = self.provider
        assert state is not None and provider is not None
        session = state.session
        assert session is not None
        if state.limited:
            await self._acquire(state, outbox, estimate)
        stats = outbox.stats
        asked = _perf()
        # A slot is held only for the HTTP attempt itself (not while waiting for the limiter).
        async with state.concurrency.slot():
            if state.fatal is not None:
                # the job is stopping (a rejected key, no credit): send nothing more, wait to
                # be cancelled with the rest of the run
                await anyio.sleep_forever()
            waited = _perf() - asked
            if waited > 0.001:
                self._slot_waited(outbox, waited)
            else:
                stats.limiter_wait_s += waited
                self.totals.slot_wait_s += waited
            stats.requests += 1
            try:
                async with session.post(url, data=payload, timeout=self._timeouts) as resp:
                    headers = resp.headers
                    if state.limited or _states_limits(resp.raw_headers):
                        state.limited = True
                        state.limiter.observe(headers)
                    if not 200 <= resp.status < 300:
                        raw = await self._read_body(resp)
                        raise self._http_error(
                            provider.classify(resp.status, headers, raw), headers
                        )
                    if self.stream and headers.get("Content-Type", "").startswith(
                        "text/event-stream"
                    ):
                        answer = await self._read_stream(env, resp)
                    elif resp.content.is_eof():
                        # the whole body came with the headers (most small answers): no timer
                        answer = self._parse_body(await resp.read(), count)
                    else:
                        answer = self._parse_body(await self._read_body(resp), count)
            except (LLMCallError, FatalError):
                raise
            except aiohttp.ConnectionTimeoutError:
                raise LLMCallError(
                    f"could not connect within {self.connect_timeout:g}s", retryable=True
                ) from None
            except aiohttp.ServerTimeoutError:
                raise LLMCallError(
                    f"stream idle for more than {self.idle_timeout:g}s", retryable=True
                ) from None
            except TimeoutError:
                raise LLMCallError(
                    f"request timed out after {self.timeout:g}s", retryable=True
                ) from None
            except aiohttp.InvalidURL as exc:
                raise FatalError(self._scrub(f"invalid URL {url!r}: {exc}")) from None
            except (aiohttp.ClientError, OSError) as exc:
                raise LLMCallError(
                    self._scrub(f"connection error: {type(exc).__name__}: {exc}"),
                    retryable=True,
                ) from None
            except StreamError as exc:
                raise self._stream_failure(state, exc) from None
        state.concurrency.success()
        state.succeeded = True
        return answer

    def _slot_waited(self, outbox: Outbox[Any], waited: float) -> None:
        """Count a noticeable wait for a concurrency slot, and note it on the row's span."""
        self.totals.slot_wait_s += waited
        outbox.stats.limiter_wait_s += waited
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event("llm.slot_wait", {"seconds": waited})

    def _stream_failure(self, state: _RunState, exc: StreamError) -> Exception:
        code = _event_code(exc)
        if code in QUOTA_CODES:
            quota = QuotaExhaustedError(
                self._scrub(
                    f"{self.provider_name} refused mid-stream for lack of quota or "
                    f"credit ({exc}); retrying cannot help"
                ),
                status=200,
                code=code,
            )
            state.fatal = state.fatal or quota
            return quota
        if code in _OVERLOAD_CODES:
            self._overloaded(state, None, rate_limited=code != "overloaded_error")
        return LLMCallError(
            self._scrub(f"stream failed: {type(exc).__name__}: {exc}"),
            retryable=True,
        )

    async def _read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        """Read a whole body; once the headers are in, it may not take ``idle_timeout``.

        (A stream's silences are bounded by aiohttp's ``sock_read`` instead; a plain request
        may legitimately wait long for its headers while the model generates.)
        """
        raw: bytes | None = None
        with anyio.move_on_after(self.idle_timeout):
            raw = await resp.read()
        if raw is None:
            raise LLMCallError(
                f"response body stalled for more than {self.idle_timeout:g}s", retryable=True
            )
        return raw

    def _parse_body(self, raw: bytes, count: int) -> Answer:
        provider = self.provider
        assert provider is not None
        try:
            data = _loads(raw)
        except ValueError:
            snippet = _short(raw.decode("utf-8", "replace").strip(), 120)
            raise LLMCallError(
                self._scrub(f"server answered 200 with a non-JSON body: {snippet!r}"),
                status=200,
                retryable=True,
            ) from None
        try:
            if self.endpoint == "embeddings":
                return provider.parse_embeddings(data, count)
            return provider.parse_chat(data)
        except ResponseFormatError as exc:
            raise LLMCallError(
                self._scrub(f"malformed answer: {exc}"), status=200, retryable=True
            ) from None

    async def _read_stream(self, env: Envelope[Any], resp: aiohttp.ClientResponse) -> Answer:
        decoder = SSEDecoder()
        assembler: ChatStreamAssembler | AnthropicStreamAssembler = (
            AnthropicStreamAssembler()
            if self.provider_name == "anthropic"
            else ChatStreamAssembler()
        )
        on_delta = self.on_delta
        async for chunk in resp.content.iter_any():
            for event in decoder.feed(chunk):
                delta = assembler.feed(event)
                if on_delta is not None and delta:
                    await _call_hook(on_delta, env, delta)
        decoder.close()
        return _answer_from_stream(assembler.result())

    def _http_error(self, failure: HTTPFailure, headers: Mapping[str, str]) -> Exception:
        state = self.run_state
        error = self._refusal(failure, state, headers)
        if isinstance(error, FatalError) and state.fatal is None:
            state.fatal = error  # no worker sends another request from now on
        return error

    def _refusal(
        self, failure: HTTPFailure, state: _RunState, headers: Mapping[str, str]
    ) -> Exception:
        described = self._scrub(failure.describe())
        if failure.quota:
            return QuotaExhaustedError(
                f"{self.provider_name} refused for lack of quota or credit ({described}); "
                "retrying cannot help: add credit or raise the spend limit, then resume the job",
                status=failure.status,
                code=failure.code,
            )
        if failure.status == 401 and not state.succeeded:
            env = self._key_env()
            hint = f" from ${env}" if env else ""
            return AuthenticationError(
                f"{self.provider_name} rejected the API key{hint} on the first requests "
                f"({described}); stopping rather than failing every row"
            )
        retry_after = parse_retry_after(headers) if failure.retryable else None
        if failure.overload:
            self._overloaded(state, retry_after, rate_limited=failure.status == 429)
        return LLMCallError(
            described,
            status=failure.status,
            code=failure.code,
            retryable=failure.retryable,
            retry_after=retry_after,
        )

    def _overloaded(
        self, state: _RunState, retry_after: float | None, *, rate_limited: bool
    ) -> None:
        """The server rate-limits us (429) or is overloaded (503, 529): slow down.

        The concurrency always shrinks. Every worker pauses when the server said for how long
        (Retry-After), and on a rate limit without one (for ``backoff_base``); an overloaded
        answer without Retry-After is one request's failure, and only its row backs off.
        """
        self.totals.rate_limited += 1
        state.concurrency.overload()
        if retry_after is None and not rate_limited:
            return
        state.limited = True
        state.limiter.pause(retry_after if retry_after is not None else self.backoff_base)
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event("llm.rate_limited", {"retry_after": retry_after or 0.0})

    # -- accounting ----------------------------------------------------------------------------

    def _account(self, outbox: Outbox[Any], answer: Answer, estimate: int) -> float:
        """Count tokens and cost of an answer; ask the run to stop at the budget."""
        state = self.run_state
        stats = outbox.stats
        usage = answer.usage
        if usage is None:
            self.totals.unknown_usage += 1
            return 0.0
        stats.prompt_tokens += usage.prompt_tokens
        stats.completion_tokens += usage.completion_tokens
        state.observe_completion(usage.completion_tokens)
        if state.limited:  # else the estimate was never charged (see _RunState.limited)
            state.limiter.reconcile(estimate, usage.total_tokens)
        price = self._price(answer.model)
        if price is None:
            return 0.0
        cost = price.cost(usage)
        stats.cost_usd += cost
        budget = self.budget_usd
        if budget is not None and stats.cost_usd >= budget and not state.stopping:
            state.stopping = True
            reason = f"budget of ${budget:g} reached by stage {self.name!r} (${stats.cost_usd:.4f})"
            self.log.warning("%s; no new rows are read, rows in flight finish", reason)
            outbox.request_stop(reason)
        return cost

    def _price(self, answered: str | None) -> Price | None:
        prices = self.prices
        if not prices:
            return None
        for name in (self.model, answered):
            if name and name in prices:
                return prices[name]
        if answered:  # "gpt-4o-2024-08-06" priced as "gpt-4o": the longest matching prefix
            matches = [m for m in prices if answered.startswith(m)]
            if matches:
                return prices[max(matches, key=len)]
        state = self.run_state
        if self.model not in state.warned:
            state.warned.add(self.model)
            self.log.warning("no price for model %r: its cost counts as 0", answered or self.model)
        return None


class _RowPolicy:
    """The tenacity stop/wait callables for one row: attempts, backoff, Retry-After, deadline."""

    __slots__ = ("caller", "deadline", "past_deadline", "wanted")

    def __init__(self, caller: LLMCaller, deadline: float | None) -> None:
        self.caller = caller
        self.deadline = deadline
        self.past_deadline = False
        self.wanted = 0.0

    def wait(self, state: RetryCallState) -> float:
        """Full-jitter exponential backoff, but never less than the server's Retry-After."""
        caller = self.caller
        ceiling = min(caller.backoff_cap, caller.backoff_base * 2 ** (state.attempt_number - 1))
        delay = random.uniform(0, ceiling)
        error = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(error, "retry_after", None)
        if isinstance(retry_after, (int, float)) and retry_after > delay:
            delay = float(retry_after)
        self.wanted = delay
        return delay

    def stop(self, state: RetryCallState) -> bool:
        """Stop after ``1 + max_retries`` attempts, or when the next try would miss the deadline."""
        if state.attempt_number >= 1 + self.caller.max_retries:
            return True
        if self.deadline is not None and _perf() + state.upcoming_sleep >= self.deadline:
            self.past_deadline = True
            return True
        return False

    def before_sleep(self, state: RetryCallState) -> None:
        """Note the retry on the row's span (never at INFO in the log: it is per request)."""
        error = state.outcome.exception() if state.outcome is not None else None
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(
                "llm.retry",
                {
                    "attempt": state.attempt_number,
                    "delay_s": state.upcoming_sleep or 0.0,
                    "error": self.caller._scrub(str(error)),
                },
            )
        self.caller.log.debug(
            "attempt %d failed (%s); retrying in %.2fs",
            state.attempt_number,
            self.caller._scrub(str(error)),
            state.upcoming_sleep or 0.0,
        )


_LIMIT_HEADER_PREFIXES = (b"x-ratelimit-", b"anthropic-ratelimit-")
_LIMIT_HEADER_FIRST = frozenset(b"xXaA")


def _states_limits(raw_headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Return whether a response carries rate-limit headers (cheaper than parsing them)."""
    for name, _ in raw_headers:
        if (
            name
            and name[0] in _LIMIT_HEADER_FIRST
            and name.lower().startswith(_LIMIT_HEADER_PREFIXES)
        ):
            return True
    return False


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)

_orjson: Any
try:
    _orjson = importlib.import_module("orjson")
except ImportError:  # pragma: no cover - orjson is an optional speed-up
    _orjson = None


def _loads(raw: bytes) -> Any:
    """Parse a response body: orjson when installed, else the stdlib on the decoded text.

    (``json.loads`` of bytes decodes with ``surrogatepass``, much slower than a plain decode.)
    What the fast path refuses (``NaN``, UTF-16, lone surrogates) goes to ``json.loads`` as
    is, which raises :class:`ValueError` if the body is not JSON at all.
    """
    try:
        if _orjson is not None:
            return _orjson.loads(raw)
        return json.loads(raw.decode())
    except ValueError:
        return json.loads(raw)


def _encode(body: Any) -> bytes:
    """Return a request body as compact UTF-8 JSON."""
    try:
        return _ENCODER.encode(body).encode()
    except UnicodeEncodeError as exc:
        raise ItemError(f"the request holds text that is not valid Unicode: {exc}") from None


def _one_message_payload(parts: tuple[str, str], text: str) -> bytes:
    """Return the body of a one-message chat request from its parts (see ``_chat_parts``)."""
    try:
        return (parts[0] + encode_basestring(text) + parts[1]).encode()
    except UnicodeEncodeError as exc:
        raise ItemError(f"the request holds text that is not valid Unicode: {exc}") from None


def _is_retryable(error: BaseException) -> bool:
    return isinstance(error, LLMCallError) and error.retryable


def _event_code(error: StreamError) -> str | None:
    if isinstance(error, StreamErrorEvent):
        code = error.code if isinstance(error.code, str) else None
        return code or error.error_type
    return None


async def _call_hook(hook: DeltaHook, env: Envelope[Any], text: str) -> None:
    result = hook(env, text)
    if inspect.isawaitable(result):
        await result


def _answer_from_stream(result: StreamResult) -> Answer:
    """Convert what a stream assembler returns into an :class:`Answer`."""
    return Answer(result.text, result.finish_reason, result.usage, result.model)


def _usage_of(usage: Any) -> Usage | None:
    if usage is None:
        return None
    if isinstance(usage, Usage):
        return usage
    get = usage.get if isinstance(usage, Mapping) else lambda k, d=None: getattr(usage, k, d)
    prompt = get("prompt_tokens", None)
    if prompt is None:
        prompt = get("input_tokens", None)
    completion = get("completion_tokens", None)
    if completion is None:
        completion = get("output_tokens", 0)
    if not isinstance(prompt, int):
        return None
    return Usage(prompt, completion if isinstance(completion, int) else 0)


def _answer_of(result: Any) -> Answer:
    """Read what a user ``call`` returned: a string, an Answer, a Completion, an SDK object."""
    if isinstance(result, Answer):
        return result
    if isinstance(result, str):
        return Answer(text=result)
    if isinstance(result, Completion):
        return Answer(result.text, result.finish_reason, result.usage, result.model)
    usage = result.get("usage") if isinstance(result, Mapping) else getattr(result, "usage", None)
    text = None
    choices = getattr(result, "choices", None)
    if choices:  # an OpenAI SDK ChatCompletion
        message = getattr(choices[0], "message", None)
        text = getattr(message, "content", None)
    elif isinstance(getattr(result, "content", None), str):  # a LangChain message
        text = result.content
    return Answer(text=text, usage=_usage_of(usage), model=getattr(result, "model", None))


__all__ = [
    "AuthenticationError",
    "CallerTotals",
    "Completion",
    "DeadlineExceededError",
    "InvalidOutputError",
    "LLMCallError",
    "LLMCaller",
    "Price",
]
