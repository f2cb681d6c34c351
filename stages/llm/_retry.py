"""The retry policy of the LLM caller: what is worth another attempt, when, and how often.

:class:`Retry` is both the options a user gives (``Retry(max_retries=6, deadline_s=120)``)
and the policy the caller runs every row's attempts through (:meth:`Retry.run`):

- an attempt that raises a *retryable* :class:`~stages.llm._errors.LLMCallError` (connection
  error, timeout, 408/409/429/5xx/529, a truncated stream, a malformed 200 body) is tried again,
  anything else ends the row at once;
- the wait before the next attempt is exponential backoff with full jitter and a cap
  (``uniform(0, min(backoff_cap, backoff_base * 2**n))``), never shorter than the server's
  ``Retry-After``;
- a row makes at most ``1 + max_retries`` attempts and never runs past its ``deadline_s``:
  a wait that would end past the deadline dead-letters the row now instead of sleeping blindly;
- a server may not make a row wait longer than ``max_retry_after``: a ``Retry-After`` past it
  (a daily quota's ``86400``) dead-letters the row at once, saying what the server asked.

The first attempt runs bare (most rows need none of this, and tenacity costs tens of
microseconds per row, and tens of milliseconds to import: a job that never retries never
imports it); only its failure starts a tenacity loop, which replays that failure as
its attempt 1 so the stop and wait strategies see every attempt. While a row waits for its
next attempt its worker gives up its seat (:data:`stages.llm._admission.CURRENT_SEAT`), so a
spare worker keeps the request slot busy.

Which exceptions of a user ``call=`` (an SDK's) are retryable is decided here too
(:func:`classify_exception`), by the same rules as HTTP statuses.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import anyio

from pipeline._envelope import Envelope
from pipeline._errors import ConfigError, QuotaExhaustedError
from pipeline._stage import OnError, Outbox
from pipeline._tracing import recording_span
from stages.llm._admission import CURRENT_SEAT
from stages.llm._errors import (
    AuthenticationError,
    DeadlineExceededError,
    LLMCallError,
    is_retryable,
)
from stages.llm._limits import parse_retry_after
from stages.llm._providers import QUOTA_CODES, RETRY_STATUSES, HTTPFailure
from stages.llm._sse import StreamError, StreamErrorEvent

if TYPE_CHECKING:
    from tenacity import RetryCallState

R = TypeVar("R")
Scrub = Callable[[str], str]

_perf = time.perf_counter

OVERLOAD_CODES = frozenset({"overloaded_error", "rate_limit_error", "rate_limit_exceeded"})
"""Error codes of a stream's error event that ask us to slow down."""


def _keep(text: str) -> str:
    return text


async def _back_off(outbox: Outbox[Any], seconds: float) -> None:
    """Sleep before a retry; a stop of the run ends it (NotStartedError: no new attempt)."""
    with outbox.unless_stopped():
        await anyio.sleep(seconds)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Retry:
    """How a row's failed requests are retried.

    Args:
        max_retries: Retries after the first attempt (attempts are ``1 + max_retries``).
        backoff_base: First backoff ceiling in seconds (doubles per retry, full jitter); also
            how long every worker pauses after a 429 that gives no ``Retry-After``.
        backoff_cap: Largest backoff ceiling in seconds.
        deadline_s: Overall time a row may take, waits and retries included (``None``: none).
        max_retry_after: The longest ``Retry-After`` honoured, in seconds: a row the server
            asks to wait longer is dead-lettered at once with the server's figure, and nobody
            else is paused for it (``None``: any wait is honoured).
        on_error: What to do with an unexpected exception, one that is not a failed request
            (see :data:`pipeline._stage.OnError`).

    Raises:
        ConfigError: A negative count or a non-positive time.
    """

    max_retries: int = 4
    backoff_base: float = 0.5
    backoff_cap: float = 8.0
    deadline_s: float | None = None
    max_retry_after: float | None = 600.0
    on_error: OnError = "dead_letter"

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_base < 0:
            raise ConfigError(f"backoff_base must be >= 0, got {self.backoff_base}")
        if self.backoff_cap <= 0:
            raise ConfigError(f"backoff_cap must be > 0, got {self.backoff_cap}")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ConfigError(f"deadline_s must be > 0 or None, got {self.deadline_s}")
        if self.max_retry_after is not None and self.max_retry_after < 0:
            raise ConfigError(f"max_retry_after must be >= 0 or None, got {self.max_retry_after}")

    def honours(self, retry_after: float | None) -> bool:
        """Whether a server's ``Retry-After`` of ``retry_after`` seconds is waited for."""
        cap = self.max_retry_after
        return retry_after is None or cap is None or retry_after <= cap

    def deadline(self, started: float) -> float | None:
        """Return the ``perf_counter`` time a row started at ``started`` must be done by."""
        return None if self.deadline_s is None else started + self.deadline_s

    async def run(
        self,
        env: Envelope[Any],
        outbox: Outbox[Any],
        attempt: Callable[[], Awaitable[R]],
        deadline: float | None,
        *,
        log: logging.Logger | logging.LoggerAdapter[Any],
        scrub: Scrub = _keep,
    ) -> R:
        """Run ``attempt`` until it succeeds, a non-retryable error, the attempts or deadline.

        Raises:
            LLMCallError: The last error, saying why the row gave up (a
                :class:`DeadlineExceededError` when the deadline ended it).
        """
        env.attempts += 1
        try:
            return await self.within(deadline, attempt, env)
        except LLMCallError as error:
            return await self.after(env, outbox, attempt, deadline, error, log=log, scrub=scrub)

    async def after(
        self,
        env: Envelope[Any],
        outbox: Outbox[Any],
        attempt: Callable[[], Awaitable[R]],
        deadline: float | None,
        error: LLMCallError,
        *,
        log: logging.Logger | logging.LoggerAdapter[Any],
        scrub: Scrub = _keep,
    ) -> R:
        """Retry after a failed first attempt (``error``) with tenacity, or give up now."""
        from tenacity import AsyncRetrying, retry_if_exception  # a job with no retry never loads it

        policy = RowPolicy(self, deadline, log=log, scrub=scrub)
        if not error.retryable:
            raise self.final(error, env, policy) from None
        seat = CURRENT_SEAT.get()
        if seat is not None:  # let a spare worker take a new row while this one waits
            seat.give_up()
        pending: LLMCallError | None = error
        retrying = AsyncRetrying(
            stop=policy.stop,
            wait=policy.wait,
            retry=retry_if_exception(is_retryable),
            sleep=functools.partial(_back_off, outbox),
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
                    result = await self.within(deadline, attempt, env)
        except LLMCallError as final:
            raise self.final(final, env, policy) from None
        return result  # type: ignore[return-value]

    async def within(
        self, deadline: float | None, attempt: Callable[[], Awaitable[R]], env: Envelope[Any]
    ) -> R:
        """Run one attempt, cut at the row's deadline.

        Raises:
            DeadlineExceededError: The deadline passed before the attempt ended.
        """
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

    def final(self, error: LLMCallError, env: Envelope[Any], policy: RowPolicy) -> LLMCallError:
        """Turn the last error of a row into the error it is dead-lettered with."""
        attempts = env.attempts
        if isinstance(error, DeadlineExceededError) or not error.retryable:
            error.attempts = attempts
            return error
        if policy.too_long and not policy.past_deadline:
            message = (
                f"the server asked to retry after {error.retry_after:g}s, longer than "
                f"max_retry_after ({self.max_retry_after:g}s) allows; not waiting "
                f"(attempt {attempts}): {error}"
            )
            cls: type[LLMCallError] = LLMCallError
        elif policy.past_deadline:
            if error.retry_after is not None and policy.wanted >= error.retry_after:
                why = (
                    f"server asked to retry after {error.retry_after:g}s, past the row's "
                    f"deadline of {self.deadline_s:g}s"
                )
            else:
                why = f"row deadline of {self.deadline_s:g}s reached"
            message = f"{why} after {attempts} attempt(s): {error}"
            cls = DeadlineExceededError
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


class RowPolicy:
    """The tenacity stop/wait callables for one row: attempts, backoff, Retry-After, deadline.

    Args:
        retry: The caller's retry options.
        deadline: The ``perf_counter`` time the row must be done by, or ``None``.
        log: Where a failed attempt is noted (at DEBUG: it is per request).
        scrub: Removes secrets from an error's text before it is logged or traced.
    """

    __slots__ = ("deadline", "log", "past_deadline", "retry", "scrub", "too_long", "wanted")

    def __init__(
        self,
        retry: Retry,
        deadline: float | None,
        *,
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        scrub: Scrub = _keep,
    ) -> None:
        self.retry = retry
        self.deadline = deadline
        self.log = log or logging.getLogger("stages.llm")
        self.scrub = scrub
        self.past_deadline = False
        self.too_long = False  # the server asked for a wait past max_retry_after
        self.wanted = 0.0

    def wait(self, state: RetryCallState) -> float:
        """Full-jitter exponential backoff, capped, but never less than the server's Retry-After.

        Attempt ``n`` waits a random time in ``[0, min(backoff_cap, backoff_base * 2**(n-1))]``:
        the ceiling doubles per retry of the row, so its delays grow (on average: each draw is
        uniform under the ceiling, which is what spreads the rows' retries apart). A
        ``Retry-After`` the server sent is the least the row waits; the draw only lengthens it
        once the ceiling passes it (a row the server keeps refusing backs off further).
        """
        retry = self.retry
        ceiling = min(retry.backoff_cap, retry.backoff_base * 2 ** (state.attempt_number - 1))
        delay = random.uniform(0.0, ceiling)
        error = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(error, "retry_after", None)
        if isinstance(retry_after, (int, float)) and retry_after > delay:
            delay = float(retry_after)
            self.too_long = not retry.honours(delay)
        self.wanted = delay
        return delay

    def stop(self, state: RetryCallState) -> bool:
        """Stop after the last attempt, at a wait past ``max_retry_after``, or at the deadline."""
        if state.attempt_number >= 1 + self.retry.max_retries:
            return True
        if self.deadline is not None and _perf() + state.upcoming_sleep >= self.deadline:
            self.past_deadline = True
            return True
        return self.too_long

    def before_sleep(self, state: RetryCallState) -> None:
        """Note the retry on the row's span (never at INFO in the log: it is per request)."""
        error = state.outcome.exception() if state.outcome is not None else None
        text = self.scrub(str(error))
        span = recording_span()
        if span is not None:
            span.add_event(
                "llm.retry",
                {
                    "attempt": state.attempt_number,
                    "delay_s": state.upcoming_sleep or 0.0,
                    "error": text,
                },
            )
        self.log.debug(
            "attempt %d failed (%s); retrying in %.2fs",
            state.attempt_number,
            text,
            state.upcoming_sleep or 0.0,
        )


def classify_exception(exc: Exception, scrub: Scrub = _keep) -> Exception:
    """Map an exception from a user ``call`` (e.g. an SDK's) to the retry decision.

    An exception with an HTTP status (``status_code`` or ``status``) is retried like that
    status would be, honouring the ``Retry-After`` of its ``response``; timeouts and connection
    errors are retried; anything else is returned as it is (not retried).
    """
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        status = getattr(exc, "status", None)
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    retry_after = parse_retry_after(headers) if headers is not None else None
    message = scrub(f"{type(exc).__name__}: {exc}")
    if isinstance(status, int):
        retryable = status in RETRY_STATUSES or status >= 500
        return LLMCallError(message, status=status, retryable=retryable, retry_after=retry_after)
    name = type(exc).__name__
    if isinstance(exc, (TimeoutError, ConnectionError, aiohttp.ClientConnectionError)) or (
        "Timeout" in name or "Connection" in name
    ):
        return LLMCallError(message, retryable=True)
    return exc


def refusal(
    failure: HTTPFailure,
    headers: Mapping[str, str],
    *,
    provider: str,
    first: bool,
    key_env: str | None,
    scrub: Scrub = _keep,
) -> Exception:
    """Return the error an error response stands for.

    Args:
        failure: What the provider says the response means.
        headers: The response headers (for ``Retry-After``).
        provider: The provider's name, for the message.
        first: Whether no request of the run has succeeded yet (a 401 then stops the run).
        key_env: The variable the key came from, for the message.
        scrub: Removes secrets from the provider's message.

    Returns:
        :class:`QuotaExhaustedError` for a lack of money or quota, :class:`AuthenticationError`
        for a 401 before any success (both stop the run), else an :class:`LLMCallError` that is
        retryable when the status is, with the server's ``Retry-After``.
    """
    described = scrub(failure.describe())
    if failure.quota:
        return QuotaExhaustedError(
            f"{provider} refused for lack of quota or credit ({described}); "
            "retrying cannot help: add credit or raise the spend limit, then resume the job",
            status=failure.status,
            code=failure.code,
        )
    if failure.status == 401 and first:
        hint = f" from ${key_env}" if key_env else ""
        return AuthenticationError(
            f"{provider} rejected the API key{hint} on the first requests "
            f"({described}); stopping rather than failing every row"
        )
    return LLMCallError(
        described,
        status=failure.status,
        code=failure.code,
        retryable=failure.retryable,
        retry_after=parse_retry_after(headers) if failure.retryable else None,
    )


def stream_failure(exc: StreamError, *, provider: str, scrub: Scrub = _keep) -> Exception:
    """Return the error a failed stream stands for: out of quota (stops the run) or retryable."""
    code = event_code(exc)
    if code in QUOTA_CODES:
        return QuotaExhaustedError(
            scrub(
                f"{provider} refused mid-stream for lack of quota or credit ({exc}); "
                "retrying cannot help"
            ),
            status=200,
            code=code,
        )
    return LLMCallError(scrub(f"stream failed: {type(exc).__name__}: {exc}"), retryable=True)


def event_code(error: StreamError) -> str | None:
    """Return the error code of a stream's error event (``None`` for a cut or bad stream)."""
    if isinstance(error, StreamErrorEvent):
        code = error.code if isinstance(error.code, str) else None
        return code or error.error_type
    return None


__all__ = [
    "OVERLOAD_CODES",
    "Retry",
    "RowPolicy",
    "classify_exception",
    "event_code",
    "refusal",
    "stream_failure",
]
