"""Who may send now: the caller's limits, and how a run applies them to each request.

:class:`Limits` holds the options (``Limits(tpm=200_000, max_concurrency=128)``); the common
``rpm=`` is also a keyword of :class:`~stages.llm._caller.LLMCaller` itself. For one run the
caller opens an :class:`Admission`, which every request passes through in this order:

1. the rate limiter (:class:`~stages.llm._limits.RateLimiter`, or a shared one such as
   :class:`~stages.llm._redis_limiter.RedisRateLimiter`): ``acquire(estimated tokens)``,
   reconciled with the real usage after the answer (:meth:`Admission.estimate` says how many
   tokens to reserve);
2. a concurrency slot (:class:`~stages.llm._limits.AdaptiveConcurrency`, AIMD unless
   ``concurrency`` fixes it), held only for the HTTP attempt itself.

Before either, a worker needs a *seat* (:class:`Seats`): there are as many seats as the
concurrency limit, so the spare workers of the stage do not take rows they could not send.
A worker gives its seat up while its row waits for a retry (:data:`CURRENT_SEAT`).

A 429 (:meth:`Admission.throttled`) is judged by the limiter from its headers: a quota 429
(the bucket empty, or a long Retry-After) pauses the limiter for every worker and halves the
concurrency; an isolated one (plenty remaining: an overloaded replica) backs off its row only;
429s while the headers show plenty remaining, coming faster than the rate, reveal a server
enforcing in short windows and switch the limiter to a smooth rate. A 503 or 529
(:meth:`Admission.overloaded`) halves the concurrency; its row backs off, honouring any
Retry-After, and nobody else waits.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import operator
import time
from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from pipeline._errors import ConfigError, FatalError, NotStartedError
from pipeline._stage import Outbox
from pipeline._tracing import recording_span
from stages.llm._limits import AdaptiveConcurrency, Limiter, RateLimiter, Verdict
from stages.llm._output import CallerTotals

LEARN_AFTER = 16
"""Answers seen before the completion estimate follows their average."""

_perf = time.perf_counter
_LIMIT_HEADER_PREFIXES = (b"x-ratelimit-", b"anthropic-ratelimit-")
_LIMIT_HEADER_FIRST = frozenset(b"xXaA")
_NAME = operator.itemgetter(0)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """How fast and how wide the caller may send.

    Args:
        rpm: Requests per minute allowed (``None``: no limit, but 429s still pause): a ceiling
            and a first guess; the server's rate-limit headers say what is there.
        tpm: Tokens per minute allowed (estimated before, reconciled after each request).
        itpm: Input tokens per minute (Anthropic's separate limit), or ``None``.
        otpm: Output tokens per minute (Anthropic's): ``max_tokens`` is reserved for each
            request and what the answer did not use is returned.
        burst_s: Seconds' worth of each rate that may go at once, at most; ``None``: what the
            server's headers say its bucket holds (a fresh key's whole minute).
        limiter: A shared limiter (e.g. Redis-backed) used instead of ``rpm``/``tpm``.
        concurrency: Fixed number of requests in flight, or ``None`` to adapt it (AIMD) up to
            ``max_concurrency``.
        max_concurrency: Ceiling of the adaptive concurrency (and the connection pool size).
        workers: Rows handled at once (default twice the concurrency ceiling). As many as
            the ceiling take new rows; the others do only while rows wait to be retried, so
            a row in backoff does not idle a request slot.
        buffer: Inbox capacity (default the concurrency ceiling, at least 16): answers come
            back in bursts, and a burst that finds its next rows already waiting costs no
            wake-up per row.

    Raises:
        ConfigError: A concurrency below 1.
    """

    rpm: float | None = None
    tpm: float | None = None
    itpm: float | None = None
    otpm: float | None = None
    burst_s: float | None = None
    limiter: Limiter | None = None
    concurrency: int | None = None
    max_concurrency: int = 64
    workers: int | None = None
    buffer: int | None = None

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(
                f"concurrency must be >= 1 or None (adaptive), got {self.concurrency}"
            )
        if self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {self.max_concurrency}")

    @property
    def ceiling(self) -> int:
        """The most requests ever in flight at once."""
        return self.concurrency or self.max_concurrency


class Seats:
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

    def rebalance(self, seat: Seat) -> None:
        """Give ``seat`` up if the limit went down, or seat waiters if it went up."""
        limit = self.concurrency.limit
        if self.taken > limit:
            seat.give_up()
        elif self.waiting and self.taken < limit:
            self.admit()


class Seat:
    """One worker's seat, given up while its row waits to be retried."""

    __slots__ = ("held", "seats")

    def __init__(self, seats: Seats) -> None:
        self.seats = seats
        self.held = False

    async def take(self) -> None:
        """Wait for a seat and hold it."""
        await self.seats.take()
        self.held = True

    def give_up(self) -> None:
        """Free the seat, if held."""
        if self.held:
            self.held = False
            self.seats.give_back()


CURRENT_SEAT: contextvars.ContextVar[Seat | None] = contextvars.ContextVar("llm_seat", default=None)
"""The seat of the worker running the current row (``None`` outside a caller's worker)."""


class Admission:
    """One run's limiter, concurrency and seats, and the waits they cost.

    Args:
        limits: The caller's limits.
        limiter: The limiter to use (a shared one, or ``None`` for the run's own).
        totals: Where the waits and slow-downs of the run are counted.
        completion_default: Tokens to reserve for a chat answer until answers were seen
            (``max_tokens``); ``None`` for embeddings, which have no completion.
    """

    __slots__ = (
        "completion_default",
        "completion_mean",
        "completions_seen",
        "concurrency",
        "fatal",
        "limited",
        "limiter",
        "seats",
        "totals",
    )

    def __init__(
        self,
        limits: Limits,
        limiter: Limiter | None,
        totals: CallerTotals,
        completion_default: int | None,
    ) -> None:
        ceiling = limits.ceiling
        self.limiter: Limiter = limiter or RateLimiter(
            rpm=limits.rpm,
            tpm=limits.tpm,
            itpm=limits.itpm,
            otpm=limits.otpm,
            burst_s=limits.burst_s,
        )
        self.concurrency = AdaptiveConcurrency(
            limit=limits.concurrency or min(16, ceiling),
            minimum=1,
            maximum=ceiling,
            adaptive=limits.concurrency is None,
        )
        # Whether the limiter can hold a request back. A run's own limiter with no rpm/tpm
        # lets everything through at once until a 429 pauses it or a response states a limit
        # to learn: until then asking it costs time and changes nothing, so it is skipped.
        self.limited = limiter is not None or any(
            value is not None for value in (limits.rpm, limits.tpm, limits.itpm, limits.otpm)
        )
        self.seats = Seats(self.concurrency)
        self.fatal: FatalError | None = None  # the error stopping the run: send nothing more
        self.totals = totals
        self.completion_default = completion_default
        self.completion_mean = 0.0  # moving average of completion tokens per answer
        self.completions_seen = 0

    async def acquire(
        self, outbox: Outbox[Any], tokens: int, *, input_tokens: int | None = None
    ) -> None:
        """Wait for the limiter to allow a request of ``tokens``; count and trace the wait.

        ``input_tokens`` (the prompt's) go to the ``itpm`` bucket; the ``otpm`` bucket gets
        ``max_tokens`` (:attr:`completion_default`), returned in part by :meth:`settle`.

        Raises:
            NotStartedError: The run was asked to stop (Ctrl-C, a budget, a cancel) before the
                limiter allowed the request: it is not sent.
        """
        with outbox.unless_stopped():  # a stop ends the wait: the request is not sent
            waited = await self.limiter.acquire(
                tokens, input_tokens=input_tokens, output_tokens=self.completion_default or 0
            )
        if waited:
            self.totals.limiter_wait_s += waited
            outbox.stats.limiter_wait_s += waited
            span = recording_span()
            if span is not None:
                span.add_event("llm.limiter_wait", {"seconds": waited, "tokens": tokens})

    def slot(self, outbox: Outbox[Any]) -> AdmissionSlot:
        """Hold a concurrency slot for one request; count the wait and the request.

        Once the run is stopping (:attr:`fatal`: a rejected key, no credit), a request that
        gets its slot is not sent: it waits to be cancelled with the rest of the run. Once the
        run was asked to stop (:attr:`~pipeline.Outbox.stopping`), it is not sent either.

        Raises:
            NotStartedError: The run was asked to stop before the request got its slot.
        """
        return AdmissionSlot(self, outbox)

    async def take_slot(self, outbox: Outbox[Any]) -> None:
        """Take the slot :meth:`slot` holds; give it back with ``concurrency.release()``.

        Raises:
            NotStartedError: The run was asked to stop before the request got its slot.
        """
        concurrency = self.concurrency
        if not concurrency.try_acquire():  # none free: wait in line, and count the wait
            asked = _perf()
            await concurrency.acquire()
            waited = _perf() - asked
            totals = self.totals
            totals.slot_wait_s += waited
            totals.slot_waits += 1
            outbox.stats.limiter_wait_s += waited
            if waited > 0.001:
                span = recording_span()
                if span is not None:
                    span.add_event("llm.slot_wait", {"seconds": waited})
        try:
            if self.fatal is not None:
                await anyio.sleep_forever()
            if outbox.stopping:
                raise NotStartedError("not started: the run is stopping")
        except BaseException:
            concurrency.release()
            raise
        outbox.stats.requests += 1

    def ended(self, *, sent: bool = True) -> None:
        """The request the calling task was admitted for ended (``sent=False``: never sent).

        A limiter shared between processes counts a request not yet answered against the
        capacity an answer to a later one reports (see :class:`RedisRateLimiter`). After the
        answer's headers were observed this changes nothing.
        """
        self.limiter.ended(sent=sent)

    def observe(self, headers: Mapping[str, str], raw: Sequence[tuple[bytes, bytes]]) -> None:
        """Let the limiter learn from a response's rate-limit headers, if it has any."""
        if self.limited or states_limits(raw):
            self.limited = True
            self.limiter.observe(headers)

    def throttled(self, headers: Mapping[str, str], retry_after: float | None) -> Verdict:
        """A 429: let the limiter judge it (see the module docstring) and slow down as it says.

        Returns:
            ``quota``, ``short_window`` or ``isolated``.
        """
        self.totals.rate_limited += 1
        verdict = self.limiter.throttled(headers, retry_after)
        if verdict == "isolated":
            self.totals.isolated_429s += 1
            return verdict
        self.limited = True
        self.concurrency.overload()
        span = recording_span()
        if span is not None:
            span.add_event("llm.rate_limited", {"retry_after": retry_after or 0.0})
        return verdict

    def overloaded(self) -> None:
        """The server is overloaded (503, 529): fewer requests at once; the row backs off."""
        self.totals.rate_limited += 1
        self.concurrency.overload()

    def estimate(self, size: int) -> int:
        """Return the tokens to reserve for a request of ``size`` characters or bytes.

        A quarter of them, plus the completion a chat answer is expected to use: ``max_tokens``
        (256 when not set) until the run has seen enough answers, then a quarter more than
        their recent average (never more than ``max_tokens``). Reserving ``max_tokens`` for
        every answer would run a job far below its ``tpm`` when answers are short; the limiter
        is reconciled with the real usage afterwards either way.
        """
        completion = self.completion_default
        if completion is None:
            return max(1, size // 4)
        if self.completions_seen >= LEARN_AFTER:
            completion = min(completion, int(self.completion_mean * 1.25) + 1)
        return max(1, size // 4) + completion

    def settle(self, estimate: int, prompt_tokens: int, completion_tokens: int) -> None:
        """Fold an answer's real usage into the estimate and the limiter's account."""
        self.completions_seen += 1
        if self.completions_seen == 1:
            self.completion_mean = float(completion_tokens)
        else:
            self.completion_mean += (completion_tokens - self.completion_mean) * 0.05
        if self.limited:  # else nothing was charged (see ``limited``)
            self.limiter.settle(prompt_tokens, completion_tokens)


class AdmissionSlot:
    """``async with admission.slot(outbox)``: see :meth:`Admission.slot`.

    A class rather than an ``asynccontextmanager``: it is entered once per request, and a
    generator-based context manager costs several times as much.
    """

    __slots__ = ("admission", "outbox")

    def __init__(self, admission: Admission, outbox: Outbox[Any]) -> None:
        self.admission = admission
        self.outbox = outbox

    async def __aenter__(self) -> None:
        await self.admission.take_slot(self.outbox)

    async def __aexit__(self, *exc: object) -> None:
        self.admission.concurrency.release()


def states_limits(raw_headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Return whether a response carries rate-limit headers (cheaper than parsing them)."""
    if b"ratelimit-" not in b"\n".join(map(_NAME, raw_headers)).lower():
        return False  # the usual answer, found without a Python step per header
    for name, _ in raw_headers:
        if (
            name
            and name[0] in _LIMIT_HEADER_FIRST
            and name.lower().startswith(_LIMIT_HEADER_PREFIXES)
        ):
            return True
    return False


__all__ = [
    "CURRENT_SEAT",
    "LEARN_AFTER",
    "Admission",
    "AdmissionSlot",
    "Limits",
    "Seat",
    "Seats",
    "states_limits",
]
