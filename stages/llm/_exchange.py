"""One run of the caller, and how each request of it goes from the cache to an answer.

The caller (:mod:`stages.llm._caller`) makes an :class:`Exchange` when a run starts and drops
it when the run ends. It holds what all workers share for that run: the API key, the
:class:`~stages.llm._admission.Admission` (limiter, concurrency, seats), the
:class:`~stages.llm._transport.HTTPTransport` (one aiohttp session) and the
:class:`~stages.llm._output.Ledger` (tokens and cost). :meth:`Exchange.request` takes one
request through, in order:

1. the response cache (a hit sends nothing and costs nothing);
2. the rate limiter and a concurrency slot (:meth:`Exchange.send`);
3. the HTTP attempt: an error response is classified by the provider and the retry policy
   (:func:`~stages.llm._retry.refusal`), slowing everyone down on 429/503/529 and stopping the
   run on a rejected key or an empty account;
4. the retry policy for failed attempts (:meth:`~stages.llm._retry.Retry.after`);
5. accounting (the estimate settled with the limiter, tokens and cost counted).

:meth:`Exchange.call` does the same around a user ``call=`` instead of HTTP.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp

from pipeline._envelope import Envelope
from pipeline._errors import FatalError, ItemError, NotStartedError, QuotaExhaustedError
from pipeline._stage import Outbox
from stages.llm._admission import Admission, states_limits
from stages.llm._cache import ResponseCache, request_key
from stages.llm._errors import AuthenticationError, LLMCallError
from stages.llm._output import CallerTotals, Ledger, Output, call_hook
from stages.llm._providers import SENSITIVE_HEADERS, Answer, Endpoint, HTTPFailure, Provider
from stages.llm._retry import (
    OVERLOAD_CODES,
    Retry,
    classify_exception,
    event_code,
    refusal,
    stream_failure,
)
from stages.llm._sse import StreamError
from stages.llm._transport import HTTP, HTTPTransport, encode_body, parse_answer

Scrub = Callable[[str], str]


def missing_key(key_env: str | None) -> str:
    """Return what to do when no API key was found in ``key_env``."""
    if not key_env:
        return "give one in the provider's auth header (HTTP(headers=...))"
    return (
        f"${key_env} is not set: export {key_env}=... (or name another variable with"
        " --api-key-env, HTTP(api_key_env=...) in Python)"
    )


def key_problem(provider: Provider, http: HTTP, env: str | None) -> str | None:
    """Say why a run cannot start for want of an API key, or return ``None``.

    A key is needed when its variable was named (``HTTP(api_key_env=...)``) or the server is the
    provider's own public host; not with a credential header given, nor for another server.
    """
    if not env or os.environ.get(env):
        return None
    auth = {k.lower() for k in http.headers} & SENSITIVE_HEADERS
    if http.api_key_env is None and (auth or not provider.needs_key()):
        return None
    return f"no API key found for {provider.base_url}: {missing_key(env)}"


def usable_answer(raw: bytes | None, endpoint: str, count: int) -> Answer | None:
    """Decode a cached answer; ``None`` unless it is whole for ``endpoint`` and ``count`` inputs.

    An undecodable entry, an answer without text, or embeddings for another number of inputs
    is not used (the request is sent instead).
    """
    if raw is None:
        return None
    try:
        answer = Answer.from_bytes(raw)
    except (ValueError, TypeError):
        return None
    if endpoint == "embeddings":
        if answer.embeddings is None or len(answer.embeddings) != count:
            return None
    elif answer.text is None:
        return None
    return answer


class Exchange:
    """What all workers of one caller share during a run, and the path of each request.

    Args:
        key: The API key read for this run (``None`` without one).
        admission: The run's limiter, concurrency and seats.
        transport: The run's HTTP session (``None`` with a user ``call``).
        ledger: The run's token and cost accounting.
        provider: The provider adapter (``None`` with a user ``call``).
        endpoint: ``"chat"`` or ``"embeddings"``.
        retry: The retry policy.
        output: The output options (streaming and ``on_delta``).
        cache: The response cache, if any.
        totals: The run's counters.
        log: The stage's logger.
        scrub: Removes secrets from the text of errors.
        key_env: The variable the key came from, for a rejected key's message.
    """

    def __init__(
        self,
        *,
        key: str | None,
        admission: Admission,
        transport: HTTPTransport | None,
        ledger: Ledger,
        provider: Provider | None,
        endpoint: Endpoint,
        retry: Retry,
        output: Output,
        cache: ResponseCache | None,
        totals: CallerTotals,
        log: logging.Logger | logging.LoggerAdapter[Any],
        scrub: Scrub,
        key_env: str | None,
    ) -> None:
        self.key = key
        self.admission = admission
        self.transport = transport
        self.ledger = ledger
        self.provider = provider
        self.endpoint = endpoint
        self.retry = retry
        self.output = output
        self.cache = cache
        self.totals = totals
        self.log = log
        self.scrub = scrub
        self.key_env = key_env
        self.provider_name = provider.name if provider is not None else "call"
        self.chat_url = ""
        self.chat_parts: tuple[str, str] | None = None
        self.succeeded = False

    # -- the HTTP path -------------------------------------------------------------------------

    async def request(
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
            payload = encode_body(body)
        cache = self.cache
        key: str | None = None
        if cache is not None:
            assert body is not None
            key = request_key(url, body)
            hit = await self._cached(env, cache, key, count)
            if hit is not None:
                return hit, 0.0, True
        admission = self.admission  # the tokens to reserve, if a limiter will ask (0: later)
        estimate = admission.estimate(len(payload)) if admission.limited else 0
        retry = self.retry
        # The first attempt runs bare (see Retry.run); this is the same, without a closure.
        env.attempts += 1
        try:
            if deadline is None:
                answer = await self.send(env, outbox, url, payload, count, estimate)
            else:
                answer = await retry.within(
                    deadline, lambda: self.send(env, outbox, url, payload, count, estimate), env
                )
        except LLMCallError as error:
            answer = await retry.after(
                env,
                outbox,
                lambda: self.send(env, outbox, url, payload, count, estimate),
                deadline,
                error,
                log=self.log,
                scrub=self.scrub,
            )
        cost = self.account(outbox, answer, estimate)
        if key is not None:
            assert cache is not None
            await cache.put(key, answer.to_bytes())
        return answer, cost, False

    async def _cached(
        self, env: Envelope[Any], cache: ResponseCache, key: str, count: int
    ) -> Answer | None:
        """Return the cached answer for ``key`` if there is a usable one."""
        answer = usable_answer(await cache.get(key), self.endpoint, count)
        if answer is None:
            return None
        self.totals.cache_hits += 1
        on_delta = self.output.on_delta
        if on_delta is not None and answer.text:
            await call_hook(on_delta, env, answer.text)
        return answer

    def account(self, outbox: Outbox[Any], answer: Answer, estimate: int) -> float:
        """Count an answer's tokens and cost, and settle its estimate with the limiter."""
        usage = answer.usage
        if usage is not None:
            self.admission.settle(estimate, usage.prompt_tokens, usage.completion_tokens)
        reserved = RESERVED.get()
        if reserved:
            RESERVED.set(0.0)
        return self.ledger.account(outbox, answer, reserved)

    async def send(
        self,
        env: Envelope[Any],
        outbox: Outbox[Any],
        url: str,
        payload: bytes,
        count: int,
        estimate: int,
    ) -> Answer:
        """Make one HTTP attempt and return the answer; raise :class:`LLMCallError` if not.

        Once the run was asked to stop, no attempt starts: :class:`NotStartedError`.
        """
        if outbox.stopping:
            raise NotStartedError(f"not started: the run is stopping ({outbox.stop_reason})")
        transport = self.transport
        assert transport is not None
        admission = self.admission
        prompt_tokens = max(1, len(payload) // 4)
        ledger = self.ledger
        reserved = 0.0
        if ledger.budget is not None:  # a spending limit: reserve the worst case first
            reserved = await ledger.reserve(
                outbox, prompt_tokens, admission.completion_default or 0
            )
        totals = self.totals
        admitted = started = False  # the limiter gave a turn; the request was started
        try:
            if admission.limited:
                tokens = estimate or admission.estimate(len(payload))  # limited since request()
                await admission.acquire(outbox, tokens, input_tokens=prompt_tokens)
                admitted = True
            # A slot is held only for the HTTP attempt itself (not while waiting for the limiter).
            await admission.take_slot(outbox)
            started = True
            totals.in_flight += 1
            try:
                answer = await transport.post(url, payload, self._receive, env, count)
            except StreamError as exc:
                raise self._stream_failed(exc) from None
            finally:
                totals.in_flight -= 1
                admission.concurrency.release()
        except BaseException:
            if reserved:
                ledger.release(reserved)  # a failed attempt is not billed
            raise
        finally:
            if admitted:
                admission.ended(sent=started)  # once its answer was observed, a no-op
        if reserved:
            RESERVED.set(reserved)
        admission.concurrency.success()
        self.succeeded = True
        return answer

    async def _receive(
        self, resp: aiohttp.ClientResponse, env: Envelope[Any], count: int
    ) -> Answer:
        """Read one response: an error, a stream or a body."""
        transport = self.transport
        provider = self.provider
        assert transport is not None and provider is not None
        headers = resp.headers
        statuses = self.totals.statuses
        statuses[resp.status] = statuses.get(resp.status, 0) + 1
        admission = self.admission
        raw_headers = resp.raw_headers
        if admission.limited or states_limits(raw_headers):  # what observe() checks first
            admission.observe(headers, raw_headers)
        if not 200 <= resp.status < 300:
            raw = await transport.body(resp)
            failure = provider.classify(resp.status, headers, raw)
            raise self._refused(failure, headers, str(resp.url))
        output = self.output
        if output.stream and headers.get("Content-Type", "").startswith("text/event-stream"):
            return await transport.stream(resp, provider, env, output.on_delta)
        length = resp.content_length
        if resp.content.is_eof() and (length is None or length <= transport.limit):
            raw = await resp.read()  # it came whole with its headers (what body() does first)
        else:
            raw = await transport.body(resp)
        return parse_answer(provider, self.endpoint, raw, count, self.scrub)

    def _refused(
        self, failure: HTTPFailure, headers: Mapping[str, str], url: str = ""
    ) -> Exception:
        """The error of an error response; slow down, or stop the run, as it says."""
        if failure.status in (404, 405) and self.provider is not None:
            shown = url.split("?", 1)[0]
            failure = dataclasses.replace(
                failure,
                message=f"{failure.message} (POST {shown}; {self.provider.not_found_hint()})",
            )
        if failure.status == 401 and not self.key and not self.succeeded:
            no_key = AuthenticationError(
                self.scrub(
                    f"{self.provider_name} requires an API key and none was sent"
                    f" ({failure.describe()}): {missing_key(self.key_env)}"
                )
            )
            self.admission.fatal = self.admission.fatal or no_key
            return no_key
        error = refusal(
            failure,
            headers,
            provider=self.provider_name,
            first=not self.succeeded,
            key_env=self.key_env,
            scrub=self.scrub,
        )
        admission = self.admission
        retry_after = getattr(error, "retry_after", None)
        if not self.retry.honours(retry_after):
            retry_after = None  # its row is dead-lettered: nobody waits (max_retry_after)
        elif retry_after is not None and failure.overload:
            self.totals.wait_for(retry_after, f"the server asked to retry after {retry_after:g}s "
                                 f"(HTTP {failure.status})")  # fmt: skip
        if failure.status == 429 and failure.overload:
            admission.throttled(headers, retry_after)
        elif failure.overload:
            admission.overloaded()
        if isinstance(error, FatalError) and admission.fatal is None:
            admission.fatal = error  # no worker sends another request from now on
        return error

    def _stream_failed(self, exc: StreamError) -> Exception:
        """The error of a failed stream; slow down, or stop the run, as its event says."""
        error = stream_failure(exc, provider=self.provider_name, scrub=self.scrub)
        admission = self.admission
        if isinstance(error, QuotaExhaustedError):
            admission.fatal = admission.fatal or error
            return error
        code = event_code(exc)
        if code == "overloaded_error":
            admission.overloaded()
        elif code in OVERLOAD_CODES:
            admission.throttled({}, None)  # a rate limit mid-stream, no headers to judge by
        return error

    # -- a user call ---------------------------------------------------------------------------

    async def call(
        self,
        env: Envelope[Any],
        outbox: Outbox[Any],
        call: Callable[[Any], Awaitable[Any]],
        deadline: float | None,
    ) -> tuple[Any, int]:
        """Return what ``call(record)`` returned, and the tokens reserved for it.

        The call gets the limiter, a slot and the retry policy like an HTTP request; an
        exception it raises is classified by :func:`~stages.llm._retry.classify_exception`.
        """
        record = env.value
        admission = self.admission
        estimate = admission.estimate(len(str(record)))

        async def attempt() -> Any:
            admitted = started = False
            try:
                if admission.limited:
                    await admission.acquire(outbox, estimate)
                    admitted = True
                async with admission.slot(outbox):
                    started = True
                    result = await self._call_foreign(call, record)
            finally:
                if admitted:
                    admission.ended(sent=started)
            admission.concurrency.success()
            self.succeeded = True
            return result

        raw = await self.retry.run(env, outbox, attempt, deadline, log=self.log, scrub=self.scrub)
        return raw, estimate

    async def _call_foreign(self, call: Callable[[Any], Awaitable[Any]], record: Any) -> Any:
        """Return ``call(record)``; an exception it raises is classified (:meth:`_foreign`)."""
        try:
            return await call(record)
        except (ItemError, FatalError):
            raise
        except Exception as exc:
            raise self._foreign(exc) from exc

    def _foreign(self, exc: Exception) -> Exception:
        """Classify an exception of the user's ``call``; slow down on 429, 503 and 529."""
        error = classify_exception(exc, self.scrub)
        if isinstance(error, LLMCallError) and error.status == 429:
            honoured = self.retry.honours(error.retry_after)
            self.admission.throttled({}, error.retry_after if honoured else None)
        elif isinstance(error, LLMCallError) and error.status in (503, 529):
            self.admission.overloaded()
        return error


RESERVED: contextvars.ContextVar[float] = contextvars.ContextVar("llm_reserved", default=0.0)
"""The budget reservation of the calling task's last successful attempt, until accounted."""

__all__ = ["RESERVED", "Exchange", "key_problem", "missing_key", "usable_answer"]
