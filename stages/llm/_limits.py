"""Rate limits that follow the provider's own accounting.

:class:`RateLimiter` models each of the provider's buckets (requests, tokens, and Anthropic's
separate input and output tokens per minute) with GCRA on a monotonic clock. A bucket stores a
single number, the *theoretical arrival time* (``tat``): the moment it would be full again if
nothing more were sent. A request costing ``n`` units may go once the debt left at that moment
fits in the bucket, at ``tat - (capacity - n) / rate``.

What the model trusts:

* **The server's accounting.** A response's ``x-ratelimit-remaining-*`` /
  ``anthropic-ratelimit-*-remaining`` and ``-reset`` headers set the bucket: ``remaining``
  units are there now, less what this limiter let through after the request that carried them
  (each :meth:`RateLimiter.acquire` takes a ticket, so the count is exact whatever order the
  answers come back in), and ``remaining + reset * rate`` is the server's capacity. A fresh
  key's bucket of 600 requests is 600 requests now, not half a second's worth.
* **Configured limits as a ceiling and a first guess.** ``rpm``/``tpm``/``itpm``/``otpm`` cap
  the rate and the capacity (never more than a minute's worth); until headers arrive the
  bucket holds ``burst_s`` seconds of the rate (one second when not configured). A limit the
  server states that is lower than the configured one replaces it.
* **Short windows when the server enforces them.** Some servers enforce 600 RPM as 10 per
  second while their headers report the minute. When 429s arrive while the headers say
  plenty remains and this limiter sent faster than the rate in the last second, it switches to
  a smooth rate (no bursts) for good, and says so once in the log.

Waiting callers queue in arrival order. Only the first of them sleeps, until its turn or until
the state changes (a header, a pause, a refund), then takes its turn and wakes the next: no
task polls, and a turn that headers bring forward is taken at once.

:meth:`RateLimiter.throttled` tells a quota 429 (the headers show the bucket empty, or the
Retry-After is long: every worker waits) from an isolated one (plenty remaining: an
overloaded replica; only that row backs off).
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

import anyio
from anyio import sleep

from pipeline._errors import ConfigError
from stages.llm._concurrency import AdaptiveConcurrency as AdaptiveConcurrency
from stages.llm._ratelimit_headers import RateLimitInfo as RateLimitInfo
from stages.llm._ratelimit_headers import parse_duration as parse_duration
from stages.llm._ratelimit_headers import parse_rate_limit_headers as parse_rate_limit_headers
from stages.llm._ratelimit_headers import parse_retry_after as parse_retry_after

log = logging.getLogger("pipeline.limits")

_INF = math.inf
_EPS = 1e-9

KINDS = ("requests", "tokens", "input_tokens", "output_tokens")
"""The buckets a limiter keeps, in the order of its per-bucket tuples."""

Verdict = Literal["quota", "isolated", "short_window"]
"""What a 429 means: ``quota`` (every worker waits), ``isolated`` (only its row backs off),
``short_window`` (the server enforces in short windows: the limiter has switched to a smooth
rate; the row goes back through it)."""

GUESS_S = 1.0
"""Seconds of each rate a bucket holds before the server's headers say, when not configured."""
SMOOTH_S = 0.1
"""Seconds of each rate a bucket holds in short-window mode (at least one unit)."""
LONG_RETRY_AFTER_S = 10.0
"""A Retry-After at least this long is a quota signal whatever the headers say."""
LOW_WATER = 0.1
"""A 429 with less than this share of the limit remaining is a quota 429."""
DETECT_429S = 3
"""429s with plenty remaining, within a second, that reveal short-window enforcement."""
DETECT_SHARE = 0.2
"""... and the share of the requests sent in that second they must be."""


class Limiter(Protocol):
    """What a calling stage needs from a rate limiter (local or shared through Redis).

    ``observe``, ``settle`` and ``throttled`` apply to the request the calling task acquired
    last (its ticket); a task that acquired nothing gets the plain behaviour.
    """

    async def acquire(
        self, tokens: int = 0, *, input_tokens: int | None = None, output_tokens: int = 0
    ) -> float:
        """Wait until one request may go; return the wait.

        Args:
            tokens: Estimated tokens of the request (the ``tpm`` bucket).
            input_tokens: Its prompt tokens (``itpm``); ``tokens`` when not given.
            output_tokens: Output tokens reserved (``otpm``): ``max_tokens``.
        """

    def reconcile(self, estimated: int, actual: int) -> None:
        """Correct the token bucket once the real usage of a request is known."""

    def settle(self, input_tokens: int, output_tokens: int) -> None:
        """Correct every token bucket to the real usage of the task's last request."""

    def pause(self, seconds: float) -> None:
        """Hold every later request back for ``seconds`` (a 429's Retry-After)."""

    def observe(self, headers: Mapping[str, str]) -> None:
        """Learn from a response's rate-limit headers."""

    def ended(self, *, sent: bool = True) -> None:
        """The task's request ended: answered, or failed (``sent=False``: it never left)."""

    def throttled(self, headers: Mapping[str, str], retry_after: float | None) -> Verdict:
        """Classify a 429 and act on it (pause on a quota 429); return the verdict."""


class LimiterStatistics(NamedTuple):
    """A snapshot of a :class:`RateLimiter`.

    Attributes:
        acquired: Requests let through so far.
        waited_s: Seconds callers spent waiting in :meth:`RateLimiter.acquire`, summed.
        paused_until: Clock time a pause lasts until, or ``None`` when not paused.
        rpm: Requests per minute in force (configured or learned), ``None`` if unlimited.
        tpm: Tokens per minute in force, ``None`` if unlimited.
        learned: Whether a limit was taken from the server's headers.
        itpm: Input tokens per minute in force, ``None`` if unlimited.
        otpm: Output tokens per minute in force, ``None`` if unlimited.
        burst: Requests the request bucket holds (the server's capacity once its headers
            say), ``None`` without a request limit.
        smooth: Whether short-window enforcement was detected (no bursts since).
        quota_429s: 429s that showed the quota used up (every worker waited).
        isolated_429s: 429s while plenty remained (only their row backed off).
    """

    acquired: int
    waited_s: float
    paused_until: float | None
    rpm: float | None
    tpm: float | None
    learned: bool
    itpm: float | None = None
    otpm: float | None = None
    burst: float | None = None
    smooth: bool = False
    quota_429s: int = 0
    isolated_429s: int = 0


Costs = tuple[float, float, float, float]


def request_costs(tokens: float, input_tokens: float | None, output_tokens: float) -> Costs:
    """Return what one request costs in each bucket: (requests, tokens, input, output).

    Raises:
        ValueError: A token count is negative.
    """
    if tokens < 0 or output_tokens < 0 or (input_tokens is not None and input_tokens < 0):
        raise ValueError(
            f"tokens must be >= 0, got {tokens}, input {input_tokens}, output {output_tokens}"
        )
    return (
        1.0,
        float(tokens),
        float(tokens if input_tokens is None else input_tokens),
        float(output_tokens),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Ticket:
    """What one acquire took: the units of each bucket, and each bucket's count after it."""

    costs: Costs
    counts: Costs


class _Bucket:
    """One GCRA bucket of ``rate`` units per second.

    Its capacity is the server's once headers told it (``capacity``), capped by ``burst_s``
    seconds of the rate when configured, and ``GUESS_S`` seconds of the rate before that;
    ``SMOOTH_S`` seconds in short-window mode. While ``now < pace_until`` the rate is at most
    ``pace`` (a server said its budget is low and no rate is known); a ``pace`` of 0 lets
    nothing through before ``pace_until``. ``count`` is every unit ever taken (for tickets).
    """

    __slots__ = (
        "burst_s",
        "capacity",
        "count",
        "pace",
        "pace_until",
        "per_minute",
        "rate",
        "smooth",
        "tat",
    )

    def __init__(self, per_minute: float | None, burst_s: float | None) -> None:
        self.per_minute = per_minute
        self.rate = None if per_minute is None else per_minute / 60.0
        self.burst_s = burst_s
        self.capacity: float | None = None
        self.smooth = False
        self.tat = -_INF
        self.count = 0.0
        self.pace = _INF
        self.pace_until = -_INF

    def rate_at(self, now: float) -> float | None:
        rate = self.rate if self.rate is not None else _INF
        if now < self.pace_until:
            rate = min(rate, self.pace)
        return None if rate == _INF else rate

    def size(self, rate: float) -> float:
        """Return how many units the bucket holds at ``rate``."""
        if self.smooth:
            return max(rate * SMOOTH_S, 1.0)
        burst = self.burst_s
        if self.capacity is not None:
            units = self.capacity if burst is None else min(self.capacity, rate * burst)
        else:
            units = rate * (GUESS_S if burst is None else burst)
        return max(units, 1.0)

    def ready(self, cost: float, now: float) -> float:
        """Return the earliest time a request costing ``cost`` units fits in the bucket."""
        rate = self.rate_at(now)
        if rate is None:
            return -_INF
        if rate <= 0:
            return self.pace_until
        # A cost larger than the whole bucket goes alone, once the bucket is full.
        return self.tat - max(self.size(rate) - cost, 0.0) / rate

    def take(self, cost: float, now: float) -> None:
        self.count += cost
        rate = self.rate_at(now)
        if rate is not None and rate > 0:
            self.tat = max(self.tat, now) + cost / rate

    def adjust(self, delta: float, now: float) -> None:
        """Charge ``delta`` more units (or refund them); a past ``tat`` is a full bucket."""
        rate = self.rate_at(now)
        if rate is not None and rate > 0:
            self.tat += delta / rate

    def sync(
        self,
        remaining: float,
        reset: float | None,
        after: float,
        now: float,
        *,
        authoritative: bool,
    ) -> None:
        """Follow the server: ``remaining`` units, less ``after`` taken since.

        The bucket is full again (less ``after``) within ``reset`` seconds at the latest.

        ``authoritative``: the bucket runs at the server's own rate and capacity, so the
        server's count replaces this bucket's (a turn may come earlier). Otherwise (a lower
        configured rate, a configured burst, short-window mode) it only ever slows down.
        """
        rate = self.rate
        assert rate is not None
        size = self.size(rate)
        level = min(remaining - after, size)
        tat = now + (size - level) / rate
        if reset is not None:
            tat = min(tat, now + reset + after / rate)
        if authoritative or tat > self.tat:
            self.tat = tat

    def rescale(self, per_minute: float, now: float) -> None:
        rate = per_minute / 60.0
        if self.rate is not None and self.tat > now:
            self.tat = now + (self.tat - now) * self.rate / rate  # keep the debt
        self.rate = rate
        self.per_minute = per_minute


class ThrottleJudge:
    """Tells what a 429 means, from its headers, its Retry-After and recent sending.

    ``quota``: a Retry-After of at least :data:`LONG_RETRY_AFTER_S`, or headers showing a
    bucket with less than the request's cost (or ``LOW_WATER`` of its limit) remaining.
    ``short_window``: plenty remained, but :data:`DETECT_429S` such 429s (and at least
    :data:`DETECT_SHARE` of the requests sent) came within a second while a bucket was sent
    more than its rate: the server enforces its minute in short windows. ``isolated``
    otherwise (plenty remaining, or no headers at all): an overloaded replica.
    """

    def __init__(self) -> None:
        self._sent: collections.deque[tuple[float, Costs]] = collections.deque()
        self._plenty: collections.deque[float] = collections.deque()
        self.quota = 0
        self.isolated = 0

    def sent(self, now: float, costs: Costs) -> None:
        """Record a request let through at ``now``."""
        sent = self._sent
        sent.append((now, costs))
        while sent and sent[0][0] < now - 1.0:
            sent.popleft()

    def judge(
        self,
        info: RateLimitInfo | None,
        retry_after: float | None,
        ticket: Ticket | None,
        rates: tuple[float | None, ...],
        smooth: bool,
        now: float,
    ) -> Verdict:
        """Return the verdict on one 429 (and count it)."""
        long_wait = retry_after is not None and retry_after >= LONG_RETRY_AFTER_S
        if long_wait or (info is not None and self._used_up(info, ticket)):
            self.quota += 1
            return "quota"
        self.isolated += 1
        if info is None or smooth:
            return "isolated"
        recent = self._plenty
        recent.append(now)
        while recent and recent[0] <= now - 1.0:
            recent.popleft()
        enough = len(recent) >= max(DETECT_429S, DETECT_SHARE * len(self._sent))
        if enough and self._bursting(rates, now):
            return "short_window"
        return "isolated"

    @staticmethod
    def _used_up(info: RateLimitInfo, ticket: Ticket | None) -> bool:
        for i, kind in enumerate(KINDS):
            limit, remaining, _ = info.kind(kind)
            if remaining is None:
                continue
            cost = ticket.costs[i] if ticket is not None else (1.0 if i == 0 else 0.0)
            floor = LOW_WATER * limit if limit else 0.0
            if remaining < max(cost, 1.0) or remaining <= floor:
                return True
        return False

    def _bursting(self, rates: tuple[float | None, ...], now: float) -> bool:
        """Whether some bucket was sent clearly more than its rate over the last second."""
        for i, rate in enumerate(rates):
            if rate is not None:
                sent = sum(costs[i] for when, costs in self._sent if when > now - 1.0)
                if sent > rate * 1.2:  # a fifth over the rate: a burst
                    return True
        return False


def short_window_message(info: RateLimitInfo, rpm: float | None) -> str:
    """The one log line that says short-window enforcement was detected."""
    remaining = info.remaining_requests if info.remaining_requests is not None else "plenty"
    rate = f"{rpm:g} requests per minute" if rpm is not None else "its token rate"
    return (
        f"the server enforces its rate limit in short windows (429s while it reported "
        f"{remaining} requests remaining): going on at a smooth {rate}, without bursts"
    )


class RateLimiter:
    """Requests and tokens per minute, following the server's accounting, for one process.

    Args:
        rpm: Requests per minute (a ceiling and a first guess), or ``None``.
        tpm: Tokens per minute, or ``None``.
        itpm: Input tokens per minute (Anthropic), or ``None``.
        otpm: Output tokens per minute (Anthropic), or ``None``; ``max_tokens`` is reserved
            up front and what the answer did not use is returned by :meth:`settle`.
        burst_s: Seconds' worth of each rate that may go at once, at most. ``None``: as much
            as the server's headers say its bucket holds (one second before they arrive).
        learn: Follow the server's headers (its limits where lower than configured, its
            remaining capacity, its short windows). With ``False`` headers only slow down.
        clock: A monotonic clock in seconds (a fake one in tests).
    """

    LOW_WATER = LOW_WATER

    def __init__(
        self,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        itpm: float | None = None,
        otpm: float | None = None,
        burst_s: float | None = None,
        learn: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        configured = (rpm, tpm, itpm, otpm)
        for name, value in zip(("rpm", "tpm", "itpm", "otpm"), configured, strict=True):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number > 0 or None, got {value!r}")
        if burst_s is not None and not (burst_s >= 0 and math.isfinite(burst_s)):
            raise ConfigError(f"burst_s must be a finite number >= 0 or None, got {burst_s!r}")
        self._configured = configured
        self._buckets = tuple(_Bucket(limit, burst_s) for limit in configured)
        self._burst_s = burst_s
        self._learn = learn
        self._learned = False
        self._clock = clock
        self._paused_until = -_INF
        self._queue: collections.deque[anyio.Event] = collections.deque()
        self._head: anyio.CancelScope | None = None
        self._ticket: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar(
            f"limiter-ticket-{id(self)}", default=None
        )
        self._judge = ThrottleJudge()
        self._acquired = 0
        self._waited = 0.0

    def __repr__(self) -> str:
        stats = self.statistics()
        return (
            f"RateLimiter(rpm={stats.rpm!r}, tpm={stats.tpm!r}, itpm={stats.itpm!r}, "
            f"otpm={stats.otpm!r}, burst_s={self._burst_s!r})"
        )

    # -- taking turns ----------------------------------------------------------------------

    async def acquire(
        self, tokens: int = 0, *, input_tokens: int | None = None, output_tokens: int = 0
    ) -> float:
        """Wait until one request may go, and take its turn.

        A request costing more than a whole bucket goes alone once the bucket is full,
        rather than never. Callers go in arrival order; a cancelled caller takes nothing.

        Args:
            tokens: Estimated tokens of the request (the ``tpm`` bucket).
            input_tokens: Its prompt tokens (``itpm``); ``tokens`` when not given.
            output_tokens: Output tokens reserved for the answer (``otpm``).

        Returns:
            The seconds spent waiting.
        """
        costs = request_costs(tokens, input_tokens, output_tokens)
        clock = self._clock
        arrived = clock()
        if not self._queue and self._start(costs, arrived) <= arrived + _EPS:
            self._depart(costs, arrived)
            return 0.0
        await self._wait_in_line(costs)
        now = clock()
        self._depart(costs, now)
        waited = now - arrived
        self._waited += waited
        return waited

    async def _wait_in_line(self, costs: Costs) -> None:
        """Queue behind earlier callers; as the first in line, sleep until the turn is due."""
        turn = anyio.Event()
        queue = self._queue
        queue.append(turn)
        clock = self._clock
        try:
            if queue[0] is not turn:
                await turn.wait()
            while (delay := self._start(costs, now := clock()) - now) > _EPS:
                with anyio.CancelScope() as scope:
                    self._head = scope  # _wake() cancels it to recompute the turn
                    await sleep(delay)
                self._head = None
        finally:
            self._head = None
            if queue and queue[0] is turn:
                queue.popleft()
                if queue:
                    queue[0].set()
            else:
                queue.remove(turn)

    def _start(self, costs: Costs, now: float) -> float:
        start = self._paused_until
        for bucket, cost in zip(self._buckets, costs, strict=True):
            start = max(start, bucket.ready(cost, now))
        return start

    def _depart(self, costs: Costs, now: float) -> None:
        for bucket, cost in zip(self._buckets, costs, strict=True):
            bucket.take(cost, now)
        self._acquired += 1
        counts = tuple(bucket.count for bucket in self._buckets)
        self._ticket.set(Ticket(costs, counts))  # type: ignore[arg-type]
        self._judge.sent(now, costs)

    def _wake(self) -> None:
        """Make the first caller in line recompute its turn (the state changed)."""
        if self._head is not None:
            self._head.cancel()

    # -- corrections -----------------------------------------------------------------------

    def reconcile(self, estimated: int, actual: int) -> None:
        """Charge (or refund) the difference between estimated and actual tokens of a request.

        A refund never makes the bucket fuller than full; under steady load it is exact.
        """
        self._buckets[1].adjust(actual - estimated, self._clock())
        if actual < estimated:
            self._wake()

    def settle(self, input_tokens: int, output_tokens: int) -> None:
        """Correct every token bucket to the real usage of the calling task's last request.

        The ``tpm`` and ``itpm`` buckets are charged the difference from the estimate, the
        ``otpm`` bucket gets back the output tokens reserved but not used.
        """
        ticket = self._ticket.get()
        if ticket is None:
            return
        now = self._clock()
        actual = (float(input_tokens + output_tokens), float(input_tokens), float(output_tokens))
        for bucket, used, cost in zip(self._buckets[1:], actual, ticket.costs[1:], strict=True):
            bucket.adjust(used - cost, now)
        self._ticket.set(dataclasses.replace(ticket, costs=(1.0, *actual)))  # settled once
        self._wake()

    def pause(self, seconds: float) -> None:
        """Hold every request back until ``seconds`` from now (a 429's Retry-After).

        Callers already waiting wait too. An existing pause is extended, never shortened.
        """
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        until = self._clock() + seconds
        if until > self._paused_until:
            self._paused_until = until
            self._wake()

    def lower(
        self,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        itpm: float | None = None,
        otpm: float | None = None,
    ) -> None:
        """Lower the configured limits where the given ones are lower (or none was set).

        Used when several users share one limiter (jobs on one API key): the strictest wins.
        """
        now = self._clock()
        configured = list(self._configured)
        for i, limit in enumerate((rpm, tpm, itpm, otpm)):
            if limit is not None and (configured[i] is None or limit < configured[i]):  # type: ignore[operator]
                self._buckets[i].rescale(limit, now)
                configured[i] = limit
        self._configured = tuple(configured)  # type: ignore[assignment]
        self._wake()

    # -- the server's word -----------------------------------------------------------------

    def ended(self, *, sent: bool = True) -> None:
        """Nothing to do: one process knows the order of its own requests."""

    def observe(self, headers: Mapping[str, str]) -> None:
        """Follow a response's ``x-ratelimit-*`` or ``anthropic-ratelimit-*`` headers.

        With ``learn`` on, a limit the server states is adopted when none was configured, and
        replaces a configured one that is higher; the bucket then holds what the server says
        remains, less what was let through after this task's request (its ticket), and its
        capacity becomes the server's (``remaining + reset * rate``, at most a minute's worth
        and at most ``burst_s`` seconds of it). With ``learn`` off, or with no rate known,
        a low ``remaining`` only paces requests until the reset (see :meth:`_slow_down`).
        """
        info = parse_rate_limit_headers(headers)
        if info is None:
            return
        now = self._clock()
        ticket = self._ticket.get()
        for i, bucket in enumerate(self._buckets):
            limit, remaining, reset = info.kind(KINDS[i])
            if limit is None and remaining is None:
                continue
            self._adopt(bucket, self._configured[i], limit, now, KINDS[i])
            if self._learn and bucket.rate is not None and remaining is not None:
                if reset is not None and not bucket.smooth:
                    server_rate = limit / 60.0 if limit else bucket.rate
                    ceiling = bucket.per_minute if bucket.per_minute is not None else _INF
                    bucket.capacity = max(min(remaining + reset * server_rate, ceiling), 1.0)
                after = bucket.count - ticket.counts[i] if ticket is not None else 0.0
                authoritative = (
                    bucket.burst_s is None and not bucket.smooth and bucket.per_minute == limit
                )
                bucket.sync(remaining, reset, after, now, authoritative=authoritative)
            else:
                self._slow_down(bucket, limit, remaining, reset, now)
        self._wake()

    def _adopt(
        self, bucket: _Bucket, configured: float | None, limit: int | None, now: float, kind: str
    ) -> None:
        if not self._learn or limit is None or limit <= 0:
            return
        if configured is not None and limit >= configured:
            return
        if bucket.per_minute != limit:
            bucket.rescale(limit, now)
            self._learned = True
            log.info("rate limit learned from the server: %s %s per minute", limit, kind)

    def _slow_down(
        self,
        bucket: _Bucket,
        limit: int | None,
        remaining: int | None,
        reset: float | None,
        now: float,
    ) -> None:
        """Pace a bucket whose rate is not followed.

        Below ``LOW_WATER`` of the limit, the remaining budget is spread over the time to the
        reset, but never slower than the limit over its minute (servers refill
        continuously); with nothing remaining, the bucket empties too.
        """
        if remaining is None or reset is None or reset <= 0:
            return
        if limit is not None and remaining > self.LOW_WATER * limit:
            return
        pace = remaining / reset
        per_minute = limit if limit is not None and limit > 0 else bucket.per_minute
        if per_minute is not None:
            pace = max(pace, per_minute / 60.0)
        bucket.pace = pace
        bucket.pace_until = now + reset
        if remaining <= 0:
            rate = bucket.rate_at(now)
            if rate is not None and rate > 0:
                bucket.tat = max(bucket.tat, now + bucket.size(rate) / rate)

    def throttled(self, headers: Mapping[str, str], retry_after: float | None) -> Verdict:
        """Classify a 429 of the calling task's last request, and act on it.

        See :class:`ThrottleJudge` for the verdicts. ``quota`` pauses every worker for the
        Retry-After (the headers, already observed, emptied the bucket); ``short_window``
        switches the limiter to a smooth rate for good; ``isolated`` changes nothing here.
        """
        now = self._clock()
        info = parse_rate_limit_headers(headers)
        ticket = self._ticket.get()
        rates = tuple(bucket.rate for bucket in self._buckets)
        smooth = any(bucket.smooth for bucket in self._buckets)
        verdict = self._judge.judge(info, retry_after, ticket, rates, smooth, now)
        if verdict == "quota" and retry_after is not None:
            self.pause(retry_after)
        elif verdict == "short_window" and info is not None:
            self._go_smooth(info, now)
        return verdict

    def _go_smooth(self, info: RateLimitInfo, now: float) -> None:
        for bucket in self._buckets:
            if bucket.rate is not None:
                bucket.smooth = True
                # the window that refused us is full now; the burst before it is history
                bucket.tat = now + bucket.size(bucket.rate) / bucket.rate
        rpm = self._buckets[0].per_minute
        log.warning(short_window_message(info, rpm))
        self._wake()

    def statistics(self) -> LimiterStatistics:
        """Return counters and the limits in force."""
        now = self._clock()
        requests = self._buckets[0]
        rpm, tpm, itpm, otpm = (bucket.per_minute for bucket in self._buckets)
        return LimiterStatistics(
            acquired=self._acquired,
            waited_s=self._waited,
            paused_until=self._paused_until if self._paused_until > now else None,
            rpm=rpm,
            tpm=tpm,
            learned=self._learned,
            itpm=itpm,
            otpm=otpm,
            burst=None if requests.rate is None else requests.size(requests.rate),
            smooth=any(bucket.smooth for bucket in self._buckets),
            quota_429s=self._judge.quota,
            isolated_429s=self._judge.isolated,
        )


if TYPE_CHECKING:

    def _conforms(limiter: RateLimiter) -> Limiter:
        return limiter
