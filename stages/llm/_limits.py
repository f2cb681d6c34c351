"""Rate limits, adaptive concurrency and the parsing of providers' rate-limit headers.

:class:`RateLimiter` keeps two GCRA buckets on a monotonic clock, one for requests and one for
tokens. GCRA stores a single number per bucket, the *theoretical arrival time* (``tat``): the
moment the bucket would be full again if nothing more were sent. A request costing ``n`` units
may start once the debt left at that moment fits in the bucket, that is at
``tat - (capacity - n) / rate``. Every :meth:`RateLimiter.acquire` computes that instant,
reserves it at once (advancing ``tat``) and then sleeps exactly once for the difference, so
callers are served in order of arrival and no task ever polls.

:class:`AdaptiveConcurrency` bounds how many requests are in flight and adapts the bound with
AIMD: one more slot after ``limit`` successes in a row, half as many after an overload.
"""

from __future__ import annotations

import collections
import dataclasses
import email.utils
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, NamedTuple, Protocol

import anyio
from anyio import sleep

from pipeline._errors import ConfigError

log = logging.getLogger("pipeline.limits")

_INF = math.inf


class Limiter(Protocol):
    """What a calling stage needs from a rate limiter (local or shared through Redis)."""

    async def acquire(self, tokens: int = 0) -> float:
        """Wait until one request carrying about ``tokens`` tokens may go; return the wait."""
        ...

    def reconcile(self, estimated: int, actual: int) -> None:
        """Correct the token budget once the real usage of a request is known."""
        ...

    def pause(self, seconds: float) -> None:
        """Hold every later request back for ``seconds`` (a 429's Retry-After)."""
        ...

    def observe(self, headers: Mapping[str, str]) -> None:
        """Learn from a response's rate-limit headers."""
        ...


# --------------------------------------------------------------------------- header parsing

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """Return the seconds in an OpenAI-style duration such as ``1s``, ``6m0s`` or ``12ms``.

    The format is Go's: numbers with units ``h``, ``m``, ``s``, ``ms``, ``us``, ``ns`` run
    together (``1h2m3.5s``). A bare number is taken as seconds.

    Raises:
        ValueError: ``text`` is not a duration.
    """
    stripped = text.strip()
    try:
        seconds = float(stripped)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(stripped):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if pos == 0 or pos != len(stripped):
            raise ValueError(
                f"not a duration: {text!r} (expected e.g. '1s', '6m0s', '12ms')"
            ) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {text!r} (must be a finite number >= 0)")
    return seconds


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    """Return the headers keyed by lower-case name (plain dicts are case-sensitive)."""
    return {str(name).lower(): value for name, value in headers.items()}


def _seconds(value: str | None) -> float | None:
    """Return a finite, non-negative float from ``value``, or ``None``."""
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Return how many seconds a server asked us to wait, or ``None`` if it did not say.

    ``retry-after-ms`` (milliseconds, a float) wins; else ``retry-after`` as seconds or an
    HTTP date (a date in the past means 0). Negative, non-finite or unparsable values count as
    absent. Header names are case-insensitive.

    Args:
        headers: Response headers (a dict or aiohttp's ``CIMultiDictProxy``).
        now: The current Unix time, for HTTP dates; defaults to :func:`time.time`.
    """
    lowered = _lower(headers)
    millis = _seconds(lowered.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000.0
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    seconds = _seconds(raw)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    current = time.time() if now is None else now
    return max(when.timestamp() - current, 0.0)


@dataclasses.dataclass(frozen=True, slots=True)
class RateLimitInfo:
    """What a response's rate-limit headers say; any field may be unknown (``None``).

    Limits are per minute, as both OpenAI and Anthropic state them. A reset is the number of
    seconds until the bucket is full again.
    """

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float | None = None


_FRACTION = re.compile(r"(\.\d{6})\d+")


def _parse_reset(value: str | None, now: float) -> float | None:
    """Return seconds from ``now`` to a reset given as a duration or an RFC 3339 timestamp."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        pass
    text = _FRACTION.sub(r"\1", value.strip()).replace("Z", "+00:00").replace("z", "+00:00")
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(when.timestamp() - now, 0.0)


def _count(value: str | None) -> int | None:
    number = _seconds(value)
    return None if number is None else int(number)


def parse_rate_limit_headers(
    headers: Mapping[str, str], *, now: float | None = None
) -> RateLimitInfo | None:
    """Parse OpenAI's ``x-ratelimit-*`` or Anthropic's ``anthropic-ratelimit-*`` headers.

    OpenAI resets are durations (``6m0s``); Anthropic's are RFC 3339 timestamps, turned into
    seconds from ``now``. For Anthropic the combined ``tokens`` headers are preferred over
    ``input-tokens``. Unparsable values are left unknown rather than raising.

    Args:
        headers: Response headers (a dict or aiohttp's ``CIMultiDictProxy``).
        now: The current Unix time, for timestamps; defaults to :func:`time.time`.

    Returns:
        The parsed values, or ``None`` when the response carries no rate-limit header.
    """
    lowered = _lower(headers)
    current = time.time() if now is None else now
    if any(name.startswith("x-ratelimit-") for name in lowered):

        def openai(field: str, kind: str) -> str | None:
            return lowered.get(f"x-ratelimit-{field}-{kind}")

        get = openai
    elif any(name.startswith("anthropic-ratelimit-") for name in lowered):
        tokens = "tokens" if "anthropic-ratelimit-tokens-limit" in lowered else "input-tokens"

        def anthropic(field: str, kind: str) -> str | None:
            kind = tokens if kind == "tokens" else kind
            return lowered.get(f"anthropic-ratelimit-{kind}-{field}")

        get = anthropic
    else:
        return None
    return RateLimitInfo(
        limit_requests=_count(get("limit", "requests")),
        remaining_requests=_count(get("remaining", "requests")),
        reset_requests=_parse_reset(get("reset", "requests"), current),
        limit_tokens=_count(get("limit", "tokens")),
        remaining_tokens=_count(get("remaining", "tokens")),
        reset_tokens=_parse_reset(get("reset", "tokens"), current),
    )


# --------------------------------------------------------------------------- rate limiter


class LimiterStatistics(NamedTuple):
    """A snapshot of a :class:`RateLimiter`.

    Attributes:
        acquired: Requests let through (or reserved) so far.
        waited_s: Seconds callers spent waiting in :meth:`RateLimiter.acquire`, summed.
        paused_until: Clock time a pause lasts until, or ``None`` when not paused.
        rpm: Requests per minute in force (configured or learned), ``None`` if unlimited.
        tpm: Tokens per minute in force, ``None`` if unlimited.
        learned: Whether a limit was taken from the server's headers.
    """

    acquired: int
    waited_s: float
    paused_until: float | None
    rpm: float | None
    tpm: float | None
    learned: bool


class _Bucket:
    """One GCRA bucket: ``rate`` units per second, ``burst_s`` seconds' worth of capacity.

    While ``now < pace_until`` the rate is at most ``pace`` (a server said its budget is low);
    a ``pace`` of 0 lets nothing through before ``pace_until``.
    """

    __slots__ = ("burst_s", "pace", "pace_until", "per_minute", "rate", "tat")

    def __init__(self, per_minute: float | None, burst_s: float) -> None:
        self.per_minute = per_minute
        self.rate = None if per_minute is None else per_minute / 60.0
        self.burst_s = burst_s
        self.tat = -_INF
        self.pace = _INF
        self.pace_until = -_INF

    def rate_at(self, now: float) -> float | None:
        rate = self.rate if self.rate is not None else _INF
        if now < self.pace_until:
            rate = min(rate, self.pace)
        return None if rate == _INF else rate

    def ready(self, cost: float, now: float) -> float:
        """Return the earliest time a request costing ``cost`` units fits in the bucket."""
        rate = self.rate_at(now)
        if rate is None:
            return -_INF
        if rate <= 0:
            return self.pace_until
        capacity = max(self.burst_s * rate, 1.0)
        # A cost larger than the whole bucket goes alone, once the bucket is full.
        return self.tat - max(capacity - cost, 0.0) / rate

    def take(self, cost: float, start: float, now: float) -> None:
        rate = self.rate_at(now)
        if rate is not None and rate > 0:
            self.tat = max(self.tat, start) + cost / rate

    def adjust(self, delta: float, now: float) -> None:
        """Charge ``delta`` more units (or refund them).

        A ``tat`` in the past means a full bucket however far back it is, so a refund never
        credits more than a full bucket.
        """
        rate = self.rate_at(now)
        if rate is not None and rate > 0:
            self.tat += delta / rate


class RateLimiter:
    """Requests-per-minute and tokens-per-minute limits shared by every worker of a process.

    Each :meth:`acquire` reserves the earliest instant at which one more request (and its
    estimated tokens) fits both buckets and then sleeps once until then; callers proceed in
    the order they arrived. A bucket holds ``burst_s`` seconds of its rate (at least one unit),
    so after an idle spell a short burst goes at once, then requests are evenly spaced.

    Args:
        rpm: Requests per minute, or ``None`` for no request limit.
        tpm: Tokens per minute, or ``None`` for no token limit.
        burst_s: Seconds' worth of each rate that may go at once after an idle spell.
        learn: Adopt the limits a server states in its headers when none was configured
            (and lower a configured limit the server says is too high). The slow-down on a
            low ``remaining`` applies either way.
        clock: A monotonic clock in seconds (a fake one in tests).
    """

    LOW_WATER = 0.1
    """Below this fraction of the stated limit, requests are paced (see :meth:`observe`)."""

    def __init__(
        self,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        burst_s: float = 0.5,
        learn: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number > 0 or None, got {value!r}")
        if not (burst_s >= 0 and math.isfinite(burst_s)):
            raise ConfigError(f"burst_s must be a finite number >= 0, got {burst_s!r}")
        self._configured = (rpm, tpm)
        self._requests = _Bucket(rpm, burst_s)
        self._tokens = _Bucket(tpm, burst_s)
        self._learn = learn
        self._learned = False
        self._clock = clock
        self._paused_until = -_INF
        self._shifted = 0.0  # total time reservations were pushed back by pauses
        self._last_start = -_INF
        self._acquired = 0
        self._waited = 0.0

    def __repr__(self) -> str:
        stats = self.statistics()
        return (
            f"RateLimiter(rpm={stats.rpm!r}, tpm={stats.tpm!r}, burst_s={self._requests.burst_s})"
        )

    async def acquire(self, tokens: int = 0) -> float:
        """Wait until one request carrying an estimated ``tokens`` may go.

        A request costing more tokens than the whole bucket is let through alone once the
        bucket is full, rather than never. If a pause starts while a caller waits, its turn
        moves back by the pause too.

        Cancelling a waiter gives its reservation back when nobody reserved after it (and no
        pause moved it); otherwise its turn stays spent, erring on the slow side.

        Returns:
            The seconds spent waiting.
        """
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        clock = self._clock
        now = clock()
        requests, tokens_bucket = self._requests, self._tokens
        start = max(
            now,
            self._paused_until,
            self._last_start,
            requests.ready(1.0, now),
            tokens_bucket.ready(tokens, now),
        )
        before = (requests.tat, tokens_bucket.tat, self._last_start)
        requests.take(1.0, start, now)
        tokens_bucket.take(tokens, start, now)
        self._last_start = start
        self._acquired += 1
        after = (requests.tat, tokens_bucket.tat, start)
        shifted = self._shifted
        target = start
        try:
            while (delay := target - clock()) > 0:
                await sleep(delay)
                target = max(start + self._shifted - shifted, self._paused_until)
        except BaseException:
            if (requests.tat, tokens_bucket.tat, self._last_start) == after and (
                self._shifted == shifted
            ):
                requests.tat, tokens_bucket.tat, self._last_start = before
                self._acquired -= 1
            raise
        waited = clock() - now
        self._waited += waited
        return waited

    def reconcile(self, estimated: int, actual: int) -> None:
        """Charge (or refund) the difference between estimated and actual tokens of a request.

        A refund never makes the bucket fuller than full; under steady load it is exact.
        """
        self._tokens.adjust(actual - estimated, self._clock())

    def pause(self, seconds: float) -> None:
        """Hold every request back until ``seconds`` from now (a 429's Retry-After).

        Later acquires wait until then, and so do callers already waiting: the turns they
        reserved move back by the added pause, keeping their spacing. An existing pause is
        extended, never shortened.
        """
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        now = self._clock()
        until = now + seconds
        begin = max(now, self._paused_until)
        if until <= begin:
            return
        shift = until - begin
        self._paused_until = until
        self._shifted += shift
        for bucket in (self._requests, self._tokens):
            if bucket.tat > now:
                bucket.tat += shift
        if self._last_start > now:
            self._last_start += shift

    def observe(self, headers: Mapping[str, str]) -> None:
        """Learn from ``x-ratelimit-*`` or ``anthropic-ratelimit-*`` response headers.

        With ``learn`` on, a limit the server states is adopted when none was configured, and
        replaces a configured one that is higher.

        When ``remaining`` falls below :attr:`LOW_WATER` of the limit, requests are paced until
        the reset at the remaining budget spread over the time to the reset, but never slower
        than the limit spread over its minute (``limit / 60`` per second): servers refill
        their buckets continuously at that rate, so going slower would only waste quota. With
        nothing remaining, the local bucket is emptied too, so the next request waits for the
        server to refill what it costs (one request: ``60 / limit`` seconds) rather than for
        the whole reset. Only when the server states no limit at all (and none is configured)
        is the remaining budget spread over the reset as it is, and nothing remaining waits
        for the reset.
        """
        info = parse_rate_limit_headers(headers)
        if info is None:
            return
        now = self._clock()
        self._update(self._requests, self._configured[0], info.limit_requests, now)
        self._update(self._tokens, self._configured[1], info.limit_tokens, now)
        self._slow_down(
            self._requests, info.limit_requests, info.remaining_requests, info.reset_requests, now
        )
        self._slow_down(
            self._tokens, info.limit_tokens, info.remaining_tokens, info.reset_tokens, now
        )

    def lower(self, *, rpm: float | None = None, tpm: float | None = None) -> None:
        """Lower the configured limits to ``rpm``/``tpm`` where they are lower (or unset).

        Used when several users share one limiter (jobs on one API key): the strictest wins.
        """
        now = self._clock()
        configured_rpm, configured_tpm = self._configured
        if rpm is not None and (configured_rpm is None or rpm < configured_rpm):
            self._rescale(self._requests, rpm, now)
            configured_rpm = rpm
        if tpm is not None and (configured_tpm is None or tpm < configured_tpm):
            self._rescale(self._tokens, tpm, now)
            configured_tpm = tpm
        self._configured = (configured_rpm, configured_tpm)

    @staticmethod
    def _rescale(bucket: _Bucket, per_minute: float, now: float) -> None:
        rate = per_minute / 60.0
        if bucket.rate is not None and bucket.tat > now:
            bucket.tat = now + (bucket.tat - now) * bucket.rate / rate  # keep the debt
        bucket.rate = rate
        bucket.per_minute = per_minute

    def _update(
        self, bucket: _Bucket, configured: float | None, limit: int | None, now: float
    ) -> None:
        if not self._learn or limit is None or limit <= 0:
            return
        if configured is not None and limit >= configured:
            return
        if bucket.rate != limit / 60.0:
            self._rescale(bucket, limit, now)
            self._learned = True
            log.info("rate limit learned from the server: %s per minute", limit)

    def _slow_down(
        self,
        bucket: _Bucket,
        limit: int | None,
        remaining: int | None,
        reset: float | None,
        now: float,
    ) -> None:
        if remaining is None or reset is None or reset <= 0:
            return
        if limit is not None and remaining > self.LOW_WATER * limit:
            return
        pace = remaining / reset
        per_minute = limit if limit is not None and limit > 0 else bucket.per_minute
        if per_minute is not None:
            pace = max(pace, per_minute / 60.0)  # never slower than the server refills
        bucket.pace = pace
        bucket.pace_until = now + reset
        if remaining <= 0:
            rate = bucket.rate_at(now)
            if rate is not None and rate > 0:
                # the server's bucket is empty: so is ours, and the next request waits for
                # the server to refill what it costs
                capacity = max(bucket.burst_s * rate, 1.0)
                bucket.tat = max(bucket.tat, now + capacity / rate)

    def statistics(self) -> LimiterStatistics:
        """Return counters and the limits in force."""
        now = self._clock()
        return LimiterStatistics(
            acquired=self._acquired,
            waited_s=self._waited,
            paused_until=self._paused_until if self._paused_until > now else None,
            rpm=self._requests.per_minute,
            tpm=self._tokens.per_minute,
            learned=self._learned,
        )


# --------------------------------------------------------------------------- concurrency


class AdaptiveConcurrency:
    """A concurrency limit that adapts to overload with AIMD.

    ``success()`` after ``limit`` successes raises the limit by one; ``overload()`` (a 429, 503
    or 529) halves it, at most once per window: overloads reported before every request that
    was in flight at the last decrease has finished are part of the same burst and ignored.
    Lowering the limit never interrupts holders; fewer are admitted until they drop below it.
    Waiters are admitted in arrival order.

    Args:
        limit: Starting number of concurrent slots.
        minimum: The limit never goes below this.
        maximum: The limit never goes above this.
        adaptive: With ``False`` the limit stays fixed (a plain semaphore).
    """

    def __init__(
        self, *, limit: int = 16, minimum: int = 1, maximum: int = 256, adaptive: bool = True
    ) -> None:
        if not 1 <= minimum <= limit <= maximum:
            raise ConfigError(
                f"need 1 <= minimum <= limit <= maximum, got {minimum=}, {limit=}, {maximum=}"
            )
        self._limit = limit
        self.minimum = minimum
        self.maximum = maximum
        self.adaptive = adaptive
        self._in_use = 0
        self._waiters: collections.deque[anyio.Event] = collections.deque()
        self._successes = 0
        self._holdoff = 0  # releases still to come from requests in flight at the last decrease

    def __repr__(self) -> str:
        return (
            f"AdaptiveConcurrency(limit={self._limit}, minimum={self.minimum}, "
            f"maximum={self.maximum}, adaptive={self.adaptive})"
        )

    @property
    def limit(self) -> int:
        """The current number of slots."""
        return self._limit

    @property
    def in_use(self) -> int:
        """Slots held right now."""
        return self._in_use

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one concurrency slot for the body of the ``async with``."""
        if self._in_use < self._limit and not self._waiters:
            self._in_use += 1
        else:
            granted = anyio.Event()
            self._waiters.append(granted)
            try:
                await granted.wait()
            except BaseException:
                if granted.is_set():
                    self._release()
                else:
                    self._waiters.remove(granted)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        self._in_use -= 1
        if self._holdoff:
            self._holdoff -= 1
        self._admit()

    def _admit(self) -> None:
        while self._waiters and self._in_use < self._limit:
            self._in_use += 1
            self._waiters.popleft().set()

    def success(self) -> None:
        """Record a request that went through; every ``limit`` of them add one slot."""
        if not self.adaptive:
            return
        self._successes += 1
        if self._successes >= self._limit:
            self._successes = 0
            if self._limit < self.maximum:
                self._limit += 1
                self._admit()

    def overload(self) -> None:
        """Record an overload (429/503/529): halve the limit, once per burst of overloads."""
        if not self.adaptive or self._holdoff:
            return
        self._limit = max(self.minimum, self._limit // 2)
        self._successes = 0
        self._holdoff = self._in_use


if TYPE_CHECKING:

    def _conforms(limiter: RateLimiter) -> Limiter:
        return limiter
