"""A simulated OpenAI-compatible (and Anthropic, Azure, Paradigm) LLM server with fault injection.

Used by the tests, the demo, the benchmarks and ``python -m pipeline sim``: a real aiohttp server
on a real socket, cheap enough to be the baseline's server in benchmarks (pre-encoded constant
bytes, templated stream chunks, no per-request logging).

Routes:

* ``POST /v1/chat/completions``: JSON, or server-sent events with ``"stream": true``
  (``chat.completion.chunk`` objects: a role chunk, one chunk per word, a ``finish_reason``
  chunk, a usage chunk when ``stream_options.include_usage``, then ``data: [DONE]``).
* ``POST /v1/embeddings``: ``input`` a string, a list of strings or token arrays;
  ``encoding_format`` ``float`` or ``base64``; ``dimensions``.
* ``GET /v1/models``.
* ``POST /v1/messages``: the Anthropic Messages API (JSON or typed SSE events, ``x-api-key``).
* ``POST /openai/deployments/{deployment}/chat/completions?api-version=...`` and
  ``.../embeddings``: Azure OpenAI style (``api-key`` header; ``api-version`` required).
* The OpenAI routes again under ``/api/v2`` instead of ``/v1`` (LightOn Paradigm).
* ``GET /sim/counters``, ``POST /sim/reset``, ``GET``/``POST /sim/config``: observe, zero, and
  replace the configuration live (``POST`` a JSON object of :class:`SimConfig` fields; fields
  left out take their defaults).

The answer is a deterministic function of the request, so tests can check correctness:

* content is ``"echo: " + <text of the last user message>`` (message content may be a string or
  a list of ``{"type": "text"}`` parts); with ``response_format`` of type ``json_object`` or
  ``json_schema`` it is the JSON object ``{"echo": <text>}`` instead;
* tokens are counted as ``max(1, len(text) // 4)``; prompt tokens are that rule applied to the
  total length of every message's text (plus ``system`` for Anthropic), completion tokens to
  the answer, embedding tokens to each input;
* ``max_tokens`` (or ``max_completion_tokens``) cuts the answer at a word boundary so that its
  completion tokens do not exceed it (the first word is always kept); the finish reason is then
  ``"length"`` (Anthropic ``"max_tokens"``), otherwise ``"stop"`` (``"end_turn"``). A cut JSON
  answer is invalid JSON, as it would be from a real model;
* an embedding is the unit vector of ``dim`` little-endian int16 values taken from the
  SHAKE-256 digest of the UTF-8 text (:func:`embedding_for`).

Faults: for request number ``n`` (counted from 0 in arrival order, all routes but ``/sim``), one
uniform draw of ``random.Random(seed * 1_000_003 + n)`` picks at most one fault, each kind
taking its rate's share of [0, 1) in this order: ``reset`` (connection aborted with a TCP RST,
no response), ``error_5xx`` (500/502/503), ``error_429`` (rate limit with ``retry-after`` of
``retry_after_s``), ``quota_429`` (429 ``insufficient_quota``, no ``retry-after`` since waiting
will not help; Anthropic: 400 "credit balance is too low"), ``overloaded`` (Anthropic 529
``overloaded_error``; not applied on other routes), ``non_json`` (200 with an HTML page),
``truncate`` (a stream ends cleanly but before ``finish_reason``/``[DONE]``/``message_stop``; a
JSON body is cut: full ``Content-Length``, half the bytes, then the connection closes),
``malformed`` (a stream gets one non-JSON chunk half-way, then goes on; a JSON body is
syntactically broken), ``stall`` (half the response is sent, then nothing for ``stall_s``
seconds, then the connection closes), ``stream_error`` (a stream carries an error event half-way
and ends: ``{"error": ...}`` for OpenAI, ``event: error`` overloaded for Anthropic; streams only).
A fault drawn for a route it does not apply to is not injected. The same draw then gives the
latency jitter, uniform in ``latency_ms +/- jitter_ms`` (never below zero), applied before the
first byte of every admitted response. A run is therefore deterministic given the request order.

Quotas: ``rpm`` and ``tpm`` are token buckets holding ``burst_s`` seconds of quota, refilled
continuously (providers enforce limits over short windows, not per minute). A request costs one
request and its prompt plus completion tokens; it is admitted when each bucket holds at least
``min(cost, capacity)`` (so an oversized request waits for a full bucket rather than forever,
and then drives the bucket negative). A refused request gets a 429 ``rate_limit_exceeded`` with
``retry-after`` (whole seconds, rounded up) and ``retry-after-ms``. Authentication (401 when
``require_key`` is set and the key differs) is checked before quotas, quotas before faults.

Headers: when ``rpm`` (``tpm``) is set, every response of the LLM routes (errors included,
aborted connections aside) carries
``x-ratelimit-limit-requests`` (``-tokens``) with the per-minute quota,
``x-ratelimit-remaining-requests`` with what the bucket holds now, and
``x-ratelimit-reset-requests`` with the time until it is full again in OpenAI's duration format
(``120ms``, ``1.5s``, ``6m0s``); Anthropic routes use ``anthropic-ratelimit-requests-limit``,
``-remaining`` and ``-reset`` (an RFC 3339 time). Without quotas these headers are omitted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import datetime
import functools
import hashlib
import hmac
import json
import math
import random
import signal
import socket
import struct
import sys
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any

from aiohttp import web

from pipeline._errors import ConfigError

__all__ = [
    "FAULTS",
    "SimConfig",
    "Simulator",
    "embedding_for",
    "format_duration",
    "main",
    "serve",
    "tokens",
]

FAULTS = (
    "reset",
    "error_5xx",
    "error_429",
    "quota_429",
    "overloaded",
    "non_json",
    "truncate",
    "malformed",
    "stall",
    "stream_error",
)
"""Fault kinds, in the order they share the unit interval of the per-request draw."""

_CHAT_FAULTS = frozenset(FAULTS) - {"overloaded"}
_ANTHROPIC_FAULTS = frozenset(FAULTS)
_EMBED_FAULTS = frozenset(FAULTS) - {"overloaded", "stream_error"}
_STREAM_ONLY = frozenset({"stream_error"})


def tokens(text: str) -> int:
    """Return the simulator's token count of ``text``: ``max(1, len(text) // 4)``."""
    return max(1, len(text) // 4)


def embedding_for(text: str, dim: int) -> list[float]:
    """Return the simulator's deterministic unit embedding of ``text`` with ``dim`` values."""
    ints = struct.unpack(f"<{dim}h", hashlib.shake_256(text.encode()).digest(2 * dim))
    norm = math.sqrt(sum(v * v for v in ints)) or 1.0
    return [v / norm for v in ints]


def format_duration(seconds: float) -> str:
    """Format a duration like OpenAI's rate-limit reset headers: ``120ms``, ``1.5s``, ``6m0s``."""
    ms = math.ceil(seconds * 1000 - 1e-9)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    hours, minutes = divmod(minutes, 60)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    out = f"{hours}h" if hours else ""
    if hours or minutes:
        out += f"{minutes}m"
    return f"{out}{secs}s"


# --------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(kw_only=True)
class SimConfig:
    """How the simulated server behaves (see the module docstring for the exact rules).

    Attributes:
        latency_ms: Mean delay before the first byte of a response.
        jitter_ms: Half-width of the uniform jitter added to ``latency_ms``.
        tokens_per_s: Generation speed: stream chunks are paced (and JSON answers delayed) to
            this many completion tokens per second; 0 sends everything at once.
        rpm: Requests-per-minute quota, or ``None`` for no limit.
        tpm: Tokens-per-minute quota, or ``None`` for no limit.
        burst_s: Seconds of quota each token bucket holds.
        error_5xx: Rate of 500/502/503 answers.
        error_429: Rate of 429 ``rate_limit_exceeded`` answers (with ``retry-after``).
        quota_429: Rate of 429 ``insufficient_quota`` answers.
        overloaded: Rate of Anthropic 529 ``overloaded_error`` answers.
        reset: Rate of connections aborted without a response.
        truncate: Rate of streams ended early / bodies cut short.
        malformed: Rate of responses with a non-JSON chunk or body.
        stall: Rate of responses that stop half-way for ``stall_s``.
        stall_s: How long a stalled response holds the connection before closing it.
        stream_error: Rate of streams carrying a mid-stream error event.
        non_json: Rate of 200 answers with an HTML body.
        seed: Seed of the per-request fault draws.
        require_key: API key every request must present (``None`` accepts anything).
        retry_after_s: ``retry-after`` of the ``error_429`` fault.
        embedding_dim: Length of embedding vectors (a request's ``dimensions`` overrides it).
        max_batch: Most inputs one embeddings request may carry.
        model: Model name reported when a request names none.
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    tokens_per_s: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    burst_s: float = 1.0
    error_5xx: float = 0.0
    error_429: float = 0.0
    quota_429: float = 0.0
    overloaded: float = 0.0
    reset: float = 0.0
    truncate: float = 0.0
    malformed: float = 0.0
    stall: float = 0.0
    stall_s: float = 5.0
    stream_error: float = 0.0
    non_json: float = 0.0
    seed: int = 0
    require_key: str | None = None
    retry_after_s: float = 1.0
    embedding_dim: int = 8
    max_batch: int = 2048
    model: str = "sim-1"

    def __post_init__(self) -> None:
        hints = _hints()
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            hint = hints[field.name]
            if value is None and type(None) in typing.get_args(hint):
                continue
            if float in (hint, *typing.get_args(hint)):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"SimConfig.{field.name} must be a number, got {value!r}")
                value = float(value)
                setattr(self, field.name, value)
                if not math.isfinite(value) or value < 0:
                    raise ConfigError(f"SimConfig.{field.name} must be >= 0, got {value!r}")
            elif int in (hint, *typing.get_args(hint)):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"SimConfig.{field.name} must be an integer, got {value!r}")
            elif not isinstance(value, str):
                raise ConfigError(f"SimConfig.{field.name} must be a string, got {value!r}")
        for name in FAULTS:
            if getattr(self, name) > 1:
                raise ConfigError(
                    f"SimConfig.{name} is a rate in [0, 1], got {getattr(self, name)}"
                )
        total = sum(getattr(self, name) for name in FAULTS)
        if total > 1 + 1e-9:
            raise ConfigError(f"SimConfig fault rates add up to {total:g}, more than 1")
        for name in ("rpm", "tpm"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(
                    f"SimConfig.{name} must be > 0 or None, got {getattr(self, name)}"
                )
        if self.burst_s <= 0:
            raise ConfigError(f"SimConfig.burst_s must be > 0, got {self.burst_s}")
        if self.embedding_dim < 1 or self.max_batch < 1:
            raise ConfigError("SimConfig.embedding_dim and max_batch must be >= 1")

    def __repr__(self) -> str:
        changed = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value != field.default:
                shown = "'***'" if field.name == "require_key" else repr(value)
                changed.append(f"{field.name}={shown}")
        return f"SimConfig({', '.join(changed)})"

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """Return the fields as JSON-ready data (``require_key`` masked unless ``redact=False``)."""
        data = dataclasses.asdict(self)
        if redact and data["require_key"] is not None:
            data["require_key"] = "***"
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimConfig:
        """Build a config from a mapping of field names (unknown names are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown SimConfig field(s) {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(names))}"
            )
        return cls(**data)

    @property
    def randomized(self) -> bool:
        """Whether requests need a random draw (some fault rate or jitter is set)."""
        return self.jitter_ms > 0 or any(getattr(self, name) for name in FAULTS)


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(SimConfig)


# --------------------------------------------------------------------------------------------
# Server state


class _Bucket:
    """A token bucket of ``per_minute / 60 * burst_s`` capacity, refilled continuously."""

    __slots__ = ("capacity", "level", "limit", "rate", "stamp")

    def __init__(self, per_minute: int, burst_s: float, now: float) -> None:
        self.limit = per_minute
        self.rate = per_minute / 60.0
        self.capacity = self.rate * burst_s
        self.level = self.capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, cost: float) -> float:
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def remaining(self) -> int:
        return max(0, int(self.level))

    def reset_s(self) -> float:
        return max(0.0, (self.capacity - self.level) / self.rate)


class _Counters:
    __slots__ = (
        "by_route",
        "completion_tokens",
        "concurrent",
        "concurrent_max",
        "faults",
        "first",
        "last",
        "per_second",
        "prompt_tokens",
        "requests",
        "throttled",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.by_route: dict[str, dict[str, int]] = {}
        self.faults: dict[str, int] = {}
        self.throttled = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.concurrent = 0
        self.concurrent_max = 0
        self.first: float | None = None
        self.last: float | None = None
        self.per_second: dict[int, int] = {}


class _Aborted(web.Response):
    """Returned after the connection was aborted on purpose; aiohttp's write fails quietly."""


_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_HTML = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
_5XX = {
    500: b'{"error":{"message":"The server had an error while processing your request. Sorry '
    b'about that!","type":"server_error","param":null,"code":null}}',
    502: b'{"error":{"message":"Bad gateway.","type":"server_error","param":null,"code":null}}',
    503: b'{"error":{"message":"The engine is currently overloaded, please try again later.",'
    b'"type":"server_error","param":null,"code":null}}',
}
_RATE_LIMITED = (
    b'{"error":{"message":"Rate limit reached for requests. Please try again later.",'
    b'"type":"requests","param":null,"code":"rate_limit_exceeded"}}'
)
_QUOTA = (
    b'{"error":{"message":"You exceeded your current quota, please check your plan and billing '
    b'details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}'
)
_UNAUTHORIZED = (
    b'{"error":{"message":"Incorrect API key provided. You can find your API key at '
    b'https://platform.openai.com/account/api-keys.","type":"invalid_request_error",'
    b'"param":null,"code":"invalid_api_key"}}'
)
_A_ERRORS = {
    "overloaded": (529, "overloaded_error", "Overloaded"),
    "error_5xx": (500, "api_error", "Internal server error"),
    "error_429": (429, "rate_limit_error", "Number of requests has exceeded your rate limit."),
    "throttled": (429, "rate_limit_error", "Number of requests has exceeded your rate limit."),
    "quota_429": (
        400,
        "invalid_request_error",
        "Your credit balance is too low to access the Anthropic API. "
        "Please go to Plans & Billing to upgrade or purchase credits.",
    ),
    "unauthorized": (401, "authentication_error", "invalid x-api-key"),
}
_STREAM_ERROR = (
    b'data: {"error":{"message":"The server had an error while processing your request.",'
    b'"type":"server_error","code":"server_error"}}\n\n'
)
_A_STREAM_ERROR = (
    b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
    b'"message":"Overloaded"}}\n\n'
)
_DONE = b"data: [DONE]\n\n"


def _dumps(obj: Any) -> bytes:
    """Encode a response body: compact JSON, UTF-8."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _openai_error(status: int, message: str, headers: Any = None) -> web.Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    }
    return web.Response(status=status, body=_dumps(body), content_type=_JSON, headers=headers)


def _anthropic_error(status: int, kind: str, message: str, headers: Any = None) -> web.Response:
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.Response(status=status, body=_dumps(body), content_type=_JSON, headers=headers)


def _text_of(content: Any) -> str:
    """Return the text of a message's content (a string or a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _pieces(content: str, max_tokens: int | None) -> tuple[list[str], bool]:
    """Split the answer into one piece per word; cut it to ``max_tokens``; say if cut."""
    words = content.split(" ")
    pieces = [words[0], *(" " + w for w in words[1:])]
    if max_tokens is None:
        return pieces, False
    total = 0
    for i, piece in enumerate(pieces):
        if i and max(1, (total + len(piece)) // 4) > max_tokens:
            return pieces[:i], True
        total += len(piece)
    return pieces, False


class _Answer:
    """What the simulator answers to one chat/messages request."""

    __slots__ = ("completion_tokens", "cut", "model", "pieces", "prompt_tokens", "text")

    def __init__(self, model: str, pieces: list[str], cut: bool, prompt_tokens: int) -> None:
        self.model = model
        self.pieces = pieces
        self.cut = cut
        self.text = "".join(pieces)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = tokens(self.text)


class _BadRequest(Exception):
    pass


def _answer(req: Any, default_model: str, *, anthropic: bool) -> _Answer:
    """Compute the deterministic answer to a chat request, or raise :class:`_BadRequest`."""
    if not isinstance(req, dict):
        raise _BadRequest("the request body must be a JSON object")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty array")
    chars = 0
    last_user = ""
    for message in messages:
        if not isinstance(message, dict):
            raise _BadRequest("each message must be an object")
        text = _text_of(message.get("content"))
        chars += len(text)
        if message.get("role") == "user":
            last_user = text
    if anthropic:
        chars += len(_text_of(req.get("system")))
    limit = req.get("max_completion_tokens", req.get("max_tokens"))
    if anthropic and limit is None:
        raise _BadRequest("max_tokens: Field required")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise _BadRequest(f"max_tokens must be a positive integer, got {limit!r}")
    response_format = req.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in (
        "json_object",
        "json_schema",
    ):
        content = json.dumps({"echo": last_user}, ensure_ascii=False)
    else:
        content = "echo: " + last_user
    pieces, cut = _pieces(content, limit)
    model = req.get("model")
    return _Answer(
        model if isinstance(model, str) else default_model, pieces, cut, max(1, chars // 4)
    )


Handler = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


class Simulator:
    """The simulated server's state: configuration, quotas and counters.

    Build its aiohttp application with :meth:`make_app`, or use :func:`serve` which also binds
    a socket and fills in :attr:`url`.

    Args:
        config: The behaviour (defaults: no latency, no faults, no quotas).
        clock: Monotonic clock in seconds (inject one to test quotas without waiting).

    Attributes:
        base_url: ``http://host:port`` once served.
    """

    def __init__(
        self, config: SimConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self.base_url: str | None = None
        self._closing: asyncio.Event | None = None
        self._config = SimConfig()
        self._rpm: _Bucket | None = None
        self._tpm: _Bucket | None = None
        self._c = _Counters()
        self._t0 = clock()
        self.configure(config or SimConfig())

    # ---- public API ------------------------------------------------------------------------

    @property
    def config(self) -> SimConfig:
        """The current configuration."""
        return self._config

    def configure(self, config: SimConfig) -> None:
        """Replace the configuration; quota buckets restart full if the quotas changed."""
        old, now = self._config, self._clock()
        self._config = config
        if (config.rpm, config.burst_s) != (old.rpm, old.burst_s) or self._rpm is None:
            self._rpm = _Bucket(config.rpm, config.burst_s, now) if config.rpm else None
        if (config.tpm, config.burst_s) != (old.tpm, old.burst_s) or self._tpm is None:
            self._tpm = _Bucket(config.tpm, config.burst_s, now) if config.tpm else None
        self._faults = [(name, getattr(config, name)) for name in FAULTS if getattr(config, name)]
        self._randomized = config.randomized

    @property
    def url(self) -> str:
        """The OpenAI base URL (``http://host:port/v1``), once served."""
        if self.base_url is None:
            raise RuntimeError("the simulator is not serving yet; use `async with serve()`")
        return self.base_url + "/v1"

    def reset(self) -> None:
        """Zero the counters and the request numbering; refill the quota buckets."""
        self._c = _Counters()
        self._t0 = self._clock()
        now = self._t0
        config = self._config
        self._rpm = _Bucket(config.rpm, config.burst_s, now) if config.rpm else None
        self._tpm = _Bucket(config.tpm, config.burst_s, now) if config.tpm else None

    def counters(self) -> dict[str, Any]:
        """Return the counters as JSON-ready data.

        Keys: ``requests`` (total), ``by_route`` (route -> status -> count; ``"reset"`` for
        aborted connections, ``"disconnected"`` when the client left), ``faults`` (kind ->
        count), ``throttled`` (429s from the quota buckets), ``http_429`` (all 429s),
        ``prompt_tokens`` and ``completion_tokens`` (of answered requests), ``concurrent`` and
        ``concurrent_max`` (requests in flight), and ``timestamps``: ``first_s``/``last_s``
        (seconds since start or reset), ``mean_rps``, ``peak_rps`` (most requests in one
        whole second) and ``peak_rpm`` (most in any 60 consecutive seconds).
        """
        c = self._c
        per_second = c.per_second
        peak_rpm = 0
        if per_second:
            seconds = sorted(per_second)
            window, lo = 0, 0
            for sec in seconds:
                window += per_second[sec]
                while seconds[lo] <= sec - 60:
                    window -= per_second[seconds[lo]]
                    lo += 1
                peak_rpm = max(peak_rpm, window)
        span = (c.last - c.first) if c.first is not None and c.last is not None else 0.0
        return {
            "requests": c.requests,
            "by_route": {route: dict(statuses) for route, statuses in c.by_route.items()},
            "faults": dict(c.faults),
            "throttled": c.throttled,
            "http_429": sum(s.get("429", 0) for s in c.by_route.values()),
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "concurrent": c.concurrent,
            "concurrent_max": c.concurrent_max,
            "timestamps": {
                "first_s": c.first,
                "last_s": c.last,
                "mean_rps": c.requests / span if span > 0 else None,
                "peak_rps": max(per_second.values(), default=0),
                "peak_rpm": peak_rpm,
            },
        }

    def make_app(self) -> web.Application:
        """Return a new aiohttp application serving this simulator."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        r = app.router
        for prefix in ("/v1", "/api/v2"):
            r.add_post(
                f"{prefix}/chat/completions",
                self._instrument(f"{prefix}/chat/completions", self._chat),
            )
            r.add_post(
                f"{prefix}/embeddings", self._instrument(f"{prefix}/embeddings", self._embed)
            )
            r.add_get(f"{prefix}/models", self._instrument(f"{prefix}/models", self._models))
        r.add_post("/v1/messages", self._instrument("/v1/messages", self._messages))
        azure = "/openai/deployments/{deployment}"
        r.add_post(
            f"{azure}/chat/completions",
            self._instrument(f"{azure}/chat/completions", self._azure_chat),
        )
        r.add_post(
            f"{azure}/embeddings", self._instrument(f"{azure}/embeddings", self._azure_embed)
        )
        r.add_get("/sim/counters", self._get_counters)
        r.add_post("/sim/reset", self._post_reset)
        r.add_get("/sim/config", self._get_config)
        r.add_post("/sim/config", self._post_config)
        return app

    # ---- plumbing --------------------------------------------------------------------------

    async def _on_startup(self, app: web.Application) -> None:
        self._closing = asyncio.Event()

    async def _on_shutdown(self, app: web.Application) -> None:
        if self._closing is not None:
            self._closing.set()

    def _instrument(self, route: str, fn: Handler) -> Callable[[web.Request], Awaitable[Any]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            c = self._c
            n = c.requests
            c.requests = n + 1
            now = self._clock() - self._t0
            if c.first is None:
                c.first = now
            c.last = now
            second = int(now)
            c.per_second[second] = c.per_second.get(second, 0) + 1
            c.concurrent += 1
            if c.concurrent > c.concurrent_max:
                c.concurrent_max = c.concurrent
            status = "disconnected"
            try:
                response = await fn(request, n)
                status = "reset" if isinstance(response, _Aborted) else str(response.status)
                return response
            except ConnectionError:  # the client left mid-response: not a server error
                return _Aborted(status=599)
            finally:
                c.concurrent -= 1
                statuses = c.by_route.get(route)
                if statuses is None:
                    statuses = c.by_route[route] = {}
                statuses[status] = statuses.get(status, 0) + 1

        return handler

    def _fault(self, n: int) -> tuple[str | None, float]:
        """Draw request ``n``'s fault (or None) and its delay before the first byte."""
        config = self._config
        delay = config.latency_ms
        if not self._randomized:
            return None, delay / 1000.0
        rng = random.Random(config.seed * 1_000_003 + n)
        draw = rng.random()
        fault = None
        edge = 0.0
        for name, rate in self._faults:
            edge += rate
            if draw < edge:
                fault = name
                break
        if config.jitter_ms:
            delay = max(0.0, delay + rng.uniform(-config.jitter_ms, config.jitter_ms))
        return fault, delay / 1000.0

    def _count_fault(self, fault: str) -> None:
        faults = self._c.faults
        faults[fault] = faults.get(fault, 0) + 1

    def _key_ok(self, request: web.Request, *, anthropic: bool = False) -> bool:
        want = self._config.require_key
        if want is None:
            return True
        headers = request.headers
        got = headers.get("x-api-key") if anthropic else headers.get("api-key")
        if got is None:
            auth = headers.get("Authorization", "")
            if auth[:7].lower() == "bearer ":
                got = auth[7:].strip()
        return got is not None and hmac.compare_digest(got.encode(), want.encode())

    def _admit(self, cost: int) -> tuple[float, str]:
        """Take one request and ``cost`` tokens from the quotas; return (wait, which) if refused."""
        rpm, tpm = self._rpm, self._tpm
        if rpm is None and tpm is None:
            return 0.0, ""
        now = self._clock()
        wait, which = 0.0, ""
        if rpm is not None:
            rpm.refill(now)
            wait, which = rpm.wait(1), "requests"
        if tpm is not None:
            tpm.refill(now)
            token_wait = tpm.wait(cost)
            if token_wait > wait:
                wait, which = token_wait, "tokens"
        if wait > 0:
            return wait, which
        if rpm is not None:
            rpm.level -= 1
        if tpm is not None:
            tpm.level -= cost
        return 0.0, ""

    def _limit_headers(self, *, anthropic: bool = False) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self._rpm is None and self._tpm is None:
            return headers
        now = self._clock()
        for kind, bucket in (("requests", self._rpm), ("tokens", self._tpm)):
            if bucket is None:
                continue
            bucket.refill(now)
            if anthropic:
                at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
                    seconds=bucket.reset_s()
                )
                headers[f"anthropic-ratelimit-{kind}-limit"] = str(bucket.limit)
                headers[f"anthropic-ratelimit-{kind}-remaining"] = str(bucket.remaining())
                headers[f"anthropic-ratelimit-{kind}-reset"] = at.isoformat(
                    timespec="milliseconds"
                ).replace("+00:00", "Z")
            else:
                headers[f"x-ratelimit-limit-{kind}"] = str(bucket.limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(bucket.remaining())
                headers[f"x-ratelimit-reset-{kind}"] = format_duration(bucket.reset_s())
        return headers

    async def _hold(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the server is shutting down."""
        closing = self._closing
        if closing is None:
            await asyncio.sleep(seconds)
            return
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(closing.wait(), seconds)

    @staticmethod
    def _abort(request: web.Request, *, rst: bool) -> _Aborted:
        """Close the connection now: with a TCP RST (``rst``) or a plain FIN after sent data."""
        transport = request.transport
        if transport is not None:
            if rst:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                transport.abort()
            else:
                transport.close()
        return _Aborted(status=599)

    async def _read_json(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except ValueError:
            raise _BadRequest(
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly.)"
            ) from None

    async def _cut_body(
        self, request: web.Request, body: bytes, fault: str, content_type: str, headers: Any
    ) -> web.StreamResponse:
        """Send half of ``body`` under its full length, then stall or close (truncate)."""
        response = web.StreamResponse(status=200, headers=headers)
        response.content_type = content_type
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        if fault == "stall":
            await self._hold(self._config.stall_s)
        self._abort(request, rst=False)
        return response

    # ---- OpenAI chat -----------------------------------------------------------------------

    async def _chat(self, request: web.Request, n: int) -> web.StreamResponse:
        return await self._openai_chat(request, n, None)

    async def _azure_chat(self, request: web.Request, n: int) -> web.StreamResponse:
        if "api-version" not in request.query:
            return _openai_error(404, "Resource not found (api-version query parameter missing)")
        return await self._openai_chat(request, n, request.match_info["deployment"])

    async def _openai_chat(
        self, request: web.Request, n: int, deployment: str | None
    ) -> web.StreamResponse:
        if not self._key_ok(request):
            return self._unauthorized()
        try:
            req = await self._read_json(request)
            answer = _answer(req, deployment or self._config.model, anthropic=False)
        except _BadRequest as error:
            return _openai_error(400, str(error), self._limit_headers())
        if deployment is not None:
            answer.model = deployment
        wait, which = self._admit(answer.prompt_tokens + answer.completion_tokens)
        headers = self._limit_headers()
        if wait:
            self._c.throttled += 1
            return self._throttled(wait, which, headers)
        fault, delay = self._fault(n)
        stream = req.get("stream") is True
        if fault is not None and (
            fault not in _CHAT_FAULTS or (fault in _STREAM_ONLY and not stream)
        ):
            fault = None
        early = await self._fault_prelude(request, fault, delay, n, headers)
        if early is not None:
            return early
        c = self._c
        c.prompt_tokens += answer.prompt_tokens
        c.completion_tokens += answer.completion_tokens
        if stream:
            options = req.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            return await self._chat_stream(request, n, answer, usage, fault, headers)
        body = self._chat_body(n, answer)
        return await self._json_answer(request, body, fault, answer, headers)

    def _unauthorized(self) -> web.Response:
        return web.Response(
            status=401, body=_UNAUTHORIZED, content_type=_JSON, headers=self._limit_headers()
        )

    def _throttled(self, wait: float, which: str, headers: dict[str, str]) -> web.Response:
        headers["retry-after"] = str(max(1, math.ceil(wait)))
        headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
        body = (
            _RATE_LIMITED if which == "requests" else _RATE_LIMITED.replace(b"requests", b"tokens")
        )
        return web.Response(status=429, body=body, content_type=_JSON, headers=headers)

    async def _json_answer(
        self,
        request: web.Request,
        body: bytes,
        fault: str | None,
        answer: _Answer,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Send a whole JSON answer, cut or broken by its fault, after the token pacing."""
        if fault in ("truncate", "stall"):
            return await self._cut_body(request, body, fault, _JSON, headers)
        if fault == "malformed":
            body = body[: len(body) // 2]
        pace = self._config.tokens_per_s
        if pace:
            await asyncio.sleep(answer.completion_tokens / pace)
        return web.Response(body=body, content_type=_JSON, headers=headers)

    async def _fault_prelude(
        self,
        request: web.Request,
        fault: str | None,
        delay: float,
        n: int,
        headers: dict[str, str],
    ) -> web.StreamResponse | None:
        """Count the fault, wait the latency, and return a fault's whole response, if it has one.

        ``None`` means: go on and answer (possibly with a fault applied to the answer itself).
        """
        if fault is not None:
            self._count_fault(fault)
            if fault == "reset":
                if delay:
                    await asyncio.sleep(delay)
                return self._abort(request, rst=True)
        if delay:
            await asyncio.sleep(delay)
        if fault is not None:
            return self._openai_fault(fault, n, headers)
        return None

    def _openai_fault(self, fault: str, n: int, headers: dict[str, str]) -> web.Response | None:
        """Return the whole response of a fault that replaces the answer, else None."""
        if fault == "error_5xx":
            # its own stream: reusing the fault draw's seed ties the status to the draw that
            # picked the fault, and one of the three statuses then hardly ever came up
            status = random.Random(f"{self._config.seed}:{n}:status").choice((500, 502, 503))
            return web.Response(
                status=status, body=_5XX[status], content_type=_JSON, headers=headers
            )
        if fault == "error_429":
            retry = self._config.retry_after_s
            headers["retry-after"] = str(max(1, math.ceil(retry)))
            headers["retry-after-ms"] = str(math.ceil(retry * 1000))
            return web.Response(status=429, body=_RATE_LIMITED, content_type=_JSON, headers=headers)
        if fault == "quota_429":
            return web.Response(status=429, body=_QUOTA, content_type=_JSON, headers=headers)
        if fault == "non_json":
            return web.Response(status=200, body=_HTML, content_type="text/html", headers=headers)
        return None

    def _chat_body(self, n: int, answer: _Answer) -> bytes:
        return _dumps(
            {
                "id": f"chatcmpl-sim{n}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": answer.model,
                "system_fingerprint": "fp_sim",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer.text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "length" if answer.cut else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": answer.prompt_tokens,
                    "completion_tokens": answer.completion_tokens,
                    "total_tokens": answer.prompt_tokens + answer.completion_tokens,
                },
            }
        )

    async def _chat_stream(
        self,
        request: web.Request,
        n: int,
        answer: _Answer,
        include_usage: bool,
        fault: str | None,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        head = (
            f'data: {{"id":"chatcmpl-sim{n}","object":"chat.completion.chunk",'
            f'"created":{int(time.time())},"model":{json.dumps(answer.model)},'
            f'"system_fingerprint":"fp_sim","choices":[{{"index":0,"delta":'
        ).encode()
        tail = b'"logprobs":null,"finish_reason":null}]' + (
            b',"usage":null}\n\n' if include_usage else b"}\n\n"
        )
        first = head + b'{"role":"assistant","content":"","refusal":null},' + tail
        chunks = [
            head + b'{"content":' + json.dumps(piece, ensure_ascii=False).encode() + b"}," + tail
            for piece in answer.pieces
        ]
        reason = b'"length"' if answer.cut else b'"stop"'
        end = [head + b'{},"logprobs":null,"finish_reason":' + reason + b"}]"]
        end[0] += b',"usage":null}\n\n' if include_usage else b"}\n\n"
        if include_usage:
            usage = (
                f'{{"prompt_tokens":{answer.prompt_tokens},'
                f'"completion_tokens":{answer.completion_tokens},'
                f'"total_tokens":{answer.prompt_tokens + answer.completion_tokens}}}'
            )
            end.append(
                head.split(b',"choices":')[0] + f',"choices":[],"usage":{usage}}}\n\n'.encode()
            )
        end.append(_DONE)
        return await self._send_stream(request, first, chunks, answer.pieces, end, fault, headers)

    async def _send_stream(
        self,
        request: web.Request,
        first: bytes,
        chunks: list[bytes],
        pieces: list[str],
        end: list[bytes],
        fault: str | None,
        headers: dict[str, str],
        *,
        anthropic: bool = False,
    ) -> web.StreamResponse:
        """Send an SSE response: ``first``, the content ``chunks`` paced, then ``end``."""
        pace = self._config.tokens_per_s
        if fault is None and not pace:
            body = b"".join((first, *chunks, *end))
            return web.Response(body=body, headers={**headers, **_SSE_HEADERS})
        response = web.StreamResponse(status=200, headers={**headers, **_SSE_HEADERS})
        await response.prepare(request)
        half = len(chunks) // 2
        if fault == "malformed":
            broken = (chunks[half] if chunks else first)[:-2]
            chunks = [*chunks[:half], broken[: len(broken) // 2] + b"\n\n", *chunks[half:]]
            pieces = [*pieces[:half], "", *pieces[half:]]
        elif fault is not None:  # truncate, stall, stream_error: cut half-way
            chunks, pieces = chunks[:half], pieces[:half]
        loop = asyncio.get_running_loop()
        started = loop.time()
        buffer = [first]
        chars = 0
        for chunk, piece in zip(chunks, pieces, strict=True):
            if pace:
                chars += len(piece)
                due = started + chars / 4 / pace - loop.time()
                if due > 0.002:
                    await response.write(b"".join(buffer))
                    buffer.clear()
                    await asyncio.sleep(due)
            buffer.append(chunk)
        if fault == "stall":
            await response.write(b"".join(buffer))
            await self._hold(self._config.stall_s)
            self._abort(request, rst=False)
            return response
        if fault == "stream_error":
            buffer.append(_A_STREAM_ERROR if anthropic else _STREAM_ERROR)
        elif fault != "truncate":
            buffer.extend(end)
        await response.write(b"".join(buffer))
        await response.write_eof()
        return response

    # ---- Anthropic -------------------------------------------------------------------------

    async def _messages(self, request: web.Request, n: int) -> web.StreamResponse:
        if not self._key_ok(request, anthropic=True):
            return _anthropic_error(
                *_A_ERRORS["unauthorized"], headers=self._limit_headers(anthropic=True)
            )
        try:
            req = await self._read_json(request)
            answer = _answer(req, self._config.model, anthropic=True)
        except _BadRequest as error:
            return _anthropic_error(
                400, "invalid_request_error", str(error), self._limit_headers(anthropic=True)
            )
        wait, _ = self._admit(answer.prompt_tokens + answer.completion_tokens)
        headers = self._limit_headers(anthropic=True)
        if wait:
            self._c.throttled += 1
            headers["retry-after"] = str(max(1, math.ceil(wait)))
            return _anthropic_error(*_A_ERRORS["throttled"], headers=headers)
        fault, delay = self._fault(n)
        stream = req.get("stream") is True
        if fault in _STREAM_ONLY and not stream:
            fault = None
        if fault is not None:
            self._count_fault(fault)
            if fault == "reset":
                if delay:
                    await asyncio.sleep(delay)
                return self._abort(request, rst=True)
        if delay:
            await asyncio.sleep(delay)
        if fault in _A_ERRORS:
            assert fault is not None
            if fault == "error_429":
                headers["retry-after"] = str(max(1, math.ceil(self._config.retry_after_s)))
            return _anthropic_error(*_A_ERRORS[fault], headers=headers)
        if fault == "non_json":
            return web.Response(status=200, body=_HTML, content_type="text/html", headers=headers)
        c = self._c
        c.prompt_tokens += answer.prompt_tokens
        c.completion_tokens += answer.completion_tokens
        stop = "max_tokens" if answer.cut else "end_turn"
        if stream:
            return await self._messages_stream(request, n, answer, stop, fault, headers)
        body = _dumps(
            {
                "id": f"msg_sim{n}",
                "type": "message",
                "role": "assistant",
                "model": answer.model,
                "content": [{"type": "text", "text": answer.text}],
                "stop_reason": stop,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": answer.prompt_tokens,
                    "output_tokens": answer.completion_tokens,
                },
            }
        )
        return await self._json_answer(request, body, fault, answer, headers)

    async def _messages_stream(
        self,
        request: web.Request,
        n: int,
        answer: _Answer,
        stop: str,
        fault: str | None,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        def event(kind: str, payload: str) -> bytes:
            return f'event: {kind}\ndata: {{"type":"{kind}"{payload}}}\n\n'.encode()

        start = _dumps(
            {
                "id": f"msg_sim{n}",
                "type": "message",
                "role": "assistant",
                "model": answer.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": 1},
            }
        ).decode()
        first = (
            event("message_start", f',"message":{start}')
            + event("content_block_start", ',"index":0,"content_block":{"type":"text","text":""}')
            + event("ping", "")
        )
        head = (
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"text_delta","text":'
        )
        chunks = [
            head + json.dumps(piece, ensure_ascii=False).encode() + b"}}\n\n"
            for piece in answer.pieces
        ]
        end = [
            event("content_block_stop", ',"index":0')
            + event(
                "message_delta",
                f',"delta":{{"stop_reason":"{stop}","stop_sequence":null}},'
                f'"usage":{{"output_tokens":{answer.completion_tokens}}}',
            )
            + event("message_stop", "")
        ]
        return await self._send_stream(
            request, first, chunks, answer.pieces, end, fault, headers, anthropic=True
        )

    # ---- embeddings and models -------------------------------------------------------------

    async def _embed(self, request: web.Request, n: int) -> web.StreamResponse:
        return await self._embeddings(request, n, None)

    async def _azure_embed(self, request: web.Request, n: int) -> web.StreamResponse:
        if "api-version" not in request.query:
            return _openai_error(404, "Resource not found (api-version query parameter missing)")
        return await self._embeddings(request, n, request.match_info["deployment"])

    def _embedding_inputs(self, req: Any) -> tuple[list[str], int, str]:
        if not isinstance(req, dict):
            raise _BadRequest("the request body must be a JSON object")
        raw = req.get("input")
        if isinstance(raw, str):
            texts = [raw]
        elif isinstance(raw, list) and raw:
            if all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
                texts = [" ".join(map(str, raw))]  # one token array
            elif all(isinstance(x, str) for x in raw):
                texts = raw
            elif all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in raw):
                texts = [" ".join(map(str, x)) for x in raw]
            else:
                raise _BadRequest("'input' must be a string, strings, or token arrays")
        else:
            raise _BadRequest("'input' must be a non-empty string or array")
        if len(texts) > self._config.max_batch:
            raise _BadRequest(
                f"'input' has {len(texts)} items; at most {self._config.max_batch} per request"
            )
        dim = req.get("dimensions", self._config.embedding_dim)
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 65536:
            raise _BadRequest(f"'dimensions' must be a positive integer, got {dim!r}")
        encoding = req.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise _BadRequest(f"'encoding_format' must be 'float' or 'base64', got {encoding!r}")
        return texts, dim, encoding

    async def _embeddings(
        self, request: web.Request, n: int, deployment: str | None
    ) -> web.StreamResponse:
        if not self._key_ok(request):
            return self._unauthorized()
        try:
            req = await self._read_json(request)
            texts, dim, encoding = self._embedding_inputs(req)
        except _BadRequest as error:
            return _openai_error(400, str(error), self._limit_headers())
        cost = sum(tokens(t) for t in texts)
        wait, which = self._admit(cost)
        headers = self._limit_headers()
        if wait:
            self._c.throttled += 1
            return self._throttled(wait, which, headers)
        fault, delay = self._fault(n)
        if fault is not None and fault not in _EMBED_FAULTS:
            fault = None
        early = await self._fault_prelude(request, fault, delay, n, headers)
        if early is not None:
            return early
        self._c.prompt_tokens += cost
        data: list[dict[str, Any]] = []
        for i, text in enumerate(texts):
            vector = embedding_for(text, dim)
            value: Any = (
                base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
                if encoding == "base64"
                else vector
            )
            data.append({"object": "embedding", "index": i, "embedding": value})
        model = deployment or req.get("model")
        body = _dumps(
            {
                "object": "list",
                "data": data,
                "model": model if isinstance(model, str) else "sim-embed-1",
                "usage": {"prompt_tokens": cost, "total_tokens": cost},
            }
        )
        if fault in ("truncate", "stall"):
            assert fault is not None
            return await self._cut_body(request, body, fault, _JSON, headers)
        if fault == "malformed":
            body = body[: len(body) // 2]
        return web.Response(body=body, content_type=_JSON, headers=headers)

    async def _models(self, request: web.Request, n: int) -> web.StreamResponse:
        if not self._key_ok(request):
            return self._unauthorized()
        models = [self._config.model, "sim-embed-1"]
        body = {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "sim"} for m in models],
        }
        return web.json_response(body)

    # ---- control ---------------------------------------------------------------------------

    async def _get_counters(self, request: web.Request) -> web.Response:
        return web.json_response(self.counters())

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response(self.counters())

    async def _get_config(self, request: web.Request) -> web.Response:
        return web.json_response(self._config.to_dict())

    async def _post_config(self, request: web.Request) -> web.Response:
        try:
            data = json.loads(await request.read())
            if not isinstance(data, dict):
                raise ConfigError("the body must be a JSON object of SimConfig fields")
            config = SimConfig.from_dict(data)
        except (ValueError, TypeError) as error:
            return _openai_error(400, f"invalid simulator config: {error}")
        self.configure(config)
        return web.json_response(config.to_dict())


# --------------------------------------------------------------------------------------------
# Serving


@asynccontextmanager
async def serve(
    config: SimConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[Simulator]:
    """Serve a :class:`Simulator` on ``host:port`` (``port=0``: a free port) for the block.

    Yields:
        The simulator, with ``url`` (``http://127.0.0.1:PORT/v1``) and ``counters()``.
    """
    sim = Simulator(config)
    runner = web.AppRunner(
        sim.make_app(), handle_signals=False, access_log=None, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
        await site.start()
        bound = runner.addresses[0]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        if ":" in shown:
            shown = f"[{shown}]"
        sim.base_url = f"http://{shown}:{bound[1]}"
        yield sim
    finally:
        await runner.cleanup()


def _flag_parser(hint: Any) -> Callable[[str], Any]:
    args = typing.get_args(hint)
    base = next((a for a in args if a is not type(None)), hint) if args else hint

    def parse(text: str) -> Any:
        if args and type(None) in args and text.lower() in ("none", "null", ""):
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {getattr(base, '__name__', base)}, got {text!r}"
            ) from None

    return parse


def main(argv: list[str] | None = None) -> int:
    """Run the simulator until Ctrl-C (``python -m pipeline sim``); return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline sim",
        description="Simulated OpenAI-compatible LLM server with quotas and fault injection.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (8000; 0 = any free port)")
    hints = _hints()
    for field in dataclasses.fields(SimConfig):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=_flag_parser(hints[field.name]),
            default=None,
            help=f"(default: {field.default})",
        )
    args = parser.parse_args(argv)
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(SimConfig)
        if getattr(args, f.name) is not None
    }
    try:
        config = SimConfig(**given)
    except ConfigError as error:
        parser.error(str(error))

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        async with serve(config, host=args.host, port=args.port) as sim:
            print(f"simulated LLM server on {sim.url}  {config!r}", flush=True)
            await stop.wait()

    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on CPython/Unix
            asyncio.run(run())
        else:
            uvloop.run(run())
    except KeyboardInterrupt:
        pass
    except OSError as error:
        print(f"cannot serve on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    return 0
