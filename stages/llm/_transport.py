"""How the caller's requests travel: one pooled aiohttp session per run, and reading answers.

:class:`HTTP` holds the options (``HTTP(headers={...}, timeout=60, api_key_env="MY_KEY")``),
including the response cache in front of the wire (a hit sends nothing). For one run the
caller opens an :class:`HTTPTransport`: one ``aiohttp.ClientSession`` whose connection pool is
as large as the concurrency ceiling, with the provider's headers and the API key set once.

:meth:`HTTPTransport.post` sends one request and hands the response to the caller's reader,
turning what can go wrong on the way into the retry policy's terms: a connection error or
timeout is a retryable :class:`~stages.llm._errors.LLMCallError`, an invalid URL stops the run.
The readers here take a whole body (:meth:`HTTPTransport.body`: the idle timeout bounds a body
that stalls after its headers) or a server-sent event stream (:meth:`HTTPTransport.stream`:
aiohttp's ``sock_read`` bounds its silences), and :func:`parse_answer` turns a body into an
:class:`~stages.llm._providers.Answer` with the provider's parser and the library's JSON codec
(orjson when installed: response bodies are the caller's hottest parse).

Request bodies are encoded with the standard library's encoder (:func:`encode_body`) because a
one-message chat body is assembled from pre-encoded parts (:mod:`stages.llm._prompt`) that must
match it byte for byte, and because text that is not valid Unicode must fail its row rather
than be escaped into a request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiohttp
import anyio

from pipeline._envelope import Envelope
from pipeline._errors import ConfigError, FatalError, ItemError
from pipeline._json import loads_api
from stages.llm._cache import ResponseCache
from stages.llm._deadline import SHARED_DEADLINES, Deadlines
from stages.llm._errors import LLMCallError
from stages.llm._output import DeltaHook, call_hook, short
from stages.llm._providers import Answer, Endpoint, Provider, ResponseFormatError
from stages.llm._sse import SSEDecoder

R = TypeVar("R")
Scrub = Callable[[str], str]

_NO_LIMIT = contextlib.nullcontext()
"""The attempt's context when aiohttp bounds its total time itself (Python 3.10)."""

ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
"""The request body encoder: compact, UTF-8 text kept as is."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HTTP:
    """How requests reach the server.

    Args:
        api_key_env: Environment variable holding the key, read when the run starts
            (default ``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY`` or ``AZURE_OPENAI_API_KEY``).
            A variable named here explicitly must be set; the default may be unset (local
            servers such as vLLM or Ollama need no key).
        headers: Extra HTTP headers for every request.
        connect_timeout: Seconds to open a connection.
        timeout: Seconds one attempt may take in total.
        idle_timeout: Seconds a stream may stay silent between chunks (or a body stall after
            its headers) before the attempt is retried.
        max_response_bytes: The largest response body (or stream) read: a larger one fails
            its row (not retried) as soon as its ``Content-Length`` or its bytes so far say so,
            without being read whole.
        cache: A :class:`~stages.llm._cache.ResponseCache`: answers are looked up before
            sending and stored after.

    Raises:
        ConfigError: A timeout that is not positive.
    """

    api_key_env: str | None = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    connect_timeout: float = 10.0
    timeout: float = 600.0
    idle_timeout: float = 60.0
    max_response_bytes: int = 10_000_000
    cache: ResponseCache | None = None

    def __post_init__(self) -> None:
        for label in ("timeout", "connect_timeout", "idle_timeout", "max_response_bytes"):
            value = getattr(self, label)
            if value <= 0:
                raise ConfigError(f"{label} must be > 0, got {value}")
        object.__setattr__(self, "headers", dict(self.headers or {}))


class HTTPTransport:
    """One run's HTTP session: pooled connections, timeouts, reading bodies and streams.

    Args:
        http: The caller's HTTP options.
        headers: Headers of every request (the provider's, the user's and the key's).
        max_connections: Size of the connection pool (the concurrency ceiling).
        stream: Whether answers are streamed (the idle timeout then bounds each read).
        scrub: Removes secrets from the text of the errors raised here.
    """

    __slots__ = ("deadlines", "http", "limit", "scrub", "session")

    def __init__(
        self,
        http: HTTP,
        headers: Mapping[str, str],
        *,
        max_connections: int,
        stream: bool,
        scrub: Scrub,
    ) -> None:
        self.http = http
        self.limit = http.max_response_bytes  # the largest body read
        self.scrub = scrub
        # The total time of an attempt is bounded by one timer for all of them (Deadlines; by
        # aiohttp, with a timer per request, on Python 3.10). The idle timeout bounds the
        # silence between reads of a stream (aiohttp's sock_read).
        self.deadlines = Deadlines(http.timeout) if SHARED_DEADLINES else None
        timeouts = aiohttp.ClientTimeout(
            total=None if SHARED_DEADLINES else http.timeout,
            sock_connect=http.connect_timeout,
            sock_read=http.idle_timeout if stream else None,
        )
        connector = aiohttp.TCPConnector(
            limit=max_connections,
            limit_per_host=max_connections,
            ttl_dns_cache=300,
            keepalive_timeout=30,
        )
        self.session = aiohttp.ClientSession(
            connector=connector, headers=dict(headers), timeout=timeouts
        )

    async def aclose(self) -> None:
        """Close the session (shielded: a cancelled close would hide the run's own error)."""
        if self.deadlines is not None:
            self.deadlines.close()
        with anyio.CancelScope(shield=True):
            await self.session.close()

    async def post(
        self,
        url: str,
        payload: bytes,
        receive: Callable[[aiohttp.ClientResponse, Envelope[Any], int], Awaitable[R]],
        env: Envelope[Any],
        count: int,
    ) -> R:
        """POST ``payload`` and return what ``receive(response, env, count)`` makes of it.

        Raises:
            LLMCallError: A connection error or timeout (retryable), or what ``receive`` raised.
            FatalError: The URL is invalid.
        """
        http = self.http
        deadlines = self.deadlines
        try:
            with _NO_LIMIT if deadlines is None else deadlines.attempt():
                async with self.session.post(url, data=payload) as resp:
                    return await receive(resp, env, count)
        except (LLMCallError, FatalError):
            raise
        except aiohttp.ConnectionTimeoutError:
            raise LLMCallError(
                f"could not connect within {http.connect_timeout:g}s", retryable=True
            ) from None
        except aiohttp.ServerTimeoutError:
            raise LLMCallError(
                f"stream idle for more than {http.idle_timeout:g}s", retryable=True
            ) from None
        except TimeoutError:
            raise LLMCallError(
                f"request timed out after {http.timeout:g}s", retryable=True
            ) from None
        except aiohttp.InvalidURL as exc:
            raise FatalError(self.scrub(f"invalid URL {url!r}: {exc}")) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise LLMCallError(
                self.scrub(f"connection error: {type(exc).__name__}: {exc}"), retryable=True
            ) from None

    async def body(self, resp: aiohttp.ClientResponse) -> bytes:
        """Read a whole body; once the headers are in, it may not take ``idle_timeout``.

        (A stream's silences are bounded by aiohttp's ``sock_read`` instead; a plain request
        may legitimately wait long for its headers while the model generates.)
        """
        limit = self.http.max_response_bytes
        length = resp.content_length
        if length is not None and length > limit:
            raise self.too_large(f"{length:,} bytes (Content-Length)", resp.status)
        if resp.content.is_eof():
            # the whole body came with the headers (most small answers): no timer
            return await resp.read()
        raw: bytes | None = None
        with anyio.move_on_after(self.http.idle_timeout):
            raw = await self._read_at_most(resp, limit)
        if raw is None:
            raise LLMCallError(
                f"response body stalled for more than {self.http.idle_timeout:g}s",
                retryable=True,
            )
        return raw

    async def _read_at_most(self, resp: aiohttp.ClientResponse, limit: int) -> bytes:
        """Read a body of unknown or announced length, failing once it passes ``limit``."""
        parts: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise self.too_large(f"more than {limit:,} bytes so far", resp.status)
            parts.append(chunk)
        return b"".join(parts)

    def too_large(self, what: str, status: int) -> LLMCallError:
        """The error of a response past ``max_response_bytes`` (not retried: it would be again)."""
        limit = self.http.max_response_bytes
        return LLMCallError(
            f"response body too large: {what}, over max_response_bytes ({limit:,}); "
            "not read further",
            status=status,
            retryable=False,
        )

    async def stream(
        self,
        resp: aiohttp.ClientResponse,
        provider: Provider,
        env: Envelope[Any],
        on_delta: DeltaHook | None,
    ) -> Answer:
        """Read a server-sent event stream into an answer, passing each delta to ``on_delta``.

        Raises:
            StreamError: The stream was cut, malformed, or carried an error event.
        """
        decoder = SSEDecoder()
        assembler = provider.stream_assembler()
        limit = self.http.max_response_bytes
        size = 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise self.too_large(f"a stream of more than {limit:,} bytes so far", resp.status)
            for event in decoder.feed(chunk):
                delta = assembler.feed(event)
                if on_delta is not None and delta:
                    await call_hook(on_delta, env, delta)
        decoder.close()
        result = assembler.result()
        return Answer(result.text, result.finish_reason, result.usage, result.model)


def parse_answer(
    provider: Provider, endpoint: Endpoint, raw: bytes, count: int, scrub: Scrub
) -> Answer:
    """Read a 200 body as the endpoint's answer (``count`` vectors for embeddings).

    Raises:
        LLMCallError: The body is not JSON or not the endpoint's answer (retryable).
    """
    try:
        data = loads_api(raw)
    except ValueError:
        snippet = short(raw.decode("utf-8", "replace").strip(), 120)
        raise LLMCallError(
            scrub(f"server answered 200 with a non-JSON body: {snippet!r}"),
            status=200,
            retryable=True,
        ) from None
    try:
        if endpoint == "embeddings":
            return provider.parse_embeddings(data, count)
        return provider.parse_chat(data)
    except ResponseFormatError as exc:
        raise LLMCallError(
            scrub(f"malformed answer: {exc}"), status=200, retryable=exc.retryable
        ) from None


def encode_body(body: Any) -> bytes:
    """Return a request body as compact UTF-8 JSON.

    Raises:
        ItemError: The body holds text that is not valid Unicode (a lone surrogate).
    """
    try:
        return ENCODER.encode(body).encode()
    except UnicodeEncodeError as exc:
        raise ItemError(f"the request holds text that is not valid Unicode: {exc}") from None


__all__ = ["ENCODER", "HTTP", "HTTPTransport", "encode_body", "parse_answer"]
