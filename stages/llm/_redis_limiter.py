"""A rate limiter shared by many processes and machines through Redis (extra ``[redis]``).

Every worker of every process that uses the same provider, API key and model takes its turn
in one Redis hash, ``llmpipe:{provider}:{key_fingerprint}:{model}``, through a single Lua
script. It is the model of :class:`~stages.llm._limits.RateLimiter` (GCRA buckets for
requests, tokens, input and output tokens that follow the server's accounting) with its state
in Redis, so N processes together run at the quota and never over it. The script reads the
server's clock (``TIME``, so machines with skewed clocks agree), applies what this process has
to report (a pause, token corrections, the latest rate-limit headers it saw, a switch to
short-window mode), and takes a turn if one is due within :data:`SLACK_S`; otherwise it says
how long to wait. Needs no Redis module (managed Redis works).

Shared state: each bucket's theoretical arrival time, its count of units ever taken (the
tickets that make a header's ``remaining`` exact: what any process sent after the answered
request is subtracted), the capacity the server's headers revealed, the pause, and the
short-window mode. Beside it, the requests ticketed and not ended yet, and those that ended
in the last :data:`~stages.llm._redis_script.KEEP_S` seconds with when (:meth:`ended`): a
request ticketed before the answered one but still open when its answer came may have
reached the server after it, so it is subtracted from that answer's ``remaining`` as well
(neither the server nor the later tickets counted it).

Within a process callers queue in arrival order and only the first of them talks to Redis;
it sleeps until its turn is near, or until this process learns something (headers, a pause,
a request ended), and at most :data:`RECHECK_S` so that what other processes learned is seen
too.

:meth:`RedisRateLimiter.pause`, :meth:`~RedisRateLimiter.settle`,
:meth:`~RedisRateLimiter.observe` and :meth:`~RedisRateLimiter.throttled` are synchronous, as
the :class:`~stages.llm._limits.Limiter` protocol wants: they take effect in this process at
once and reach Redis with this process's next script call (a waiting caller makes it at once)
or an explicit :meth:`~RedisRateLimiter.flush`.

If Redis becomes unreachable mid-job the limiter either stops the run with
:class:`RedisUnavailableError` or, with ``fallback="local"``, carries on alone with a local
:class:`~stages.llm._limits.RateLimiter` at ``fallback_share`` of the limits (each process
assumes it shares the quota with others), logging a warning. The local limiter starts after
the last turn this process had already taken in Redis, so the two never overlap. It never
falls back to no limit.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import anyio

from pipeline._errors import ConfigError, FatalError
from stages.llm._limits import (
    GUESS_S,
    KINDS,
    SMOOTH_S,
    Costs,
    LimiterStatistics,
    RateLimiter,
    ThrottleJudge,
    Ticket,
    Verdict,
    parse_rate_limit_headers,
    request_costs,
    short_window_message,
)
from stages.llm._redis_script import SCRIPT, Reply

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from stages.llm._limits import Limiter

log = logging.getLogger("pipeline.redis_limiter")

Fallback = Literal["error", "local"]

SLACK_S = 0.25
"""A turn due within this many seconds is taken at once (and slept for) rather than asked again."""
RECHECK_S = 0.5
"""The first caller in line asks Redis again at least this often while it waits."""


class RedisUnavailableError(FatalError):
    """The Redis server holding the shared rate limit cannot be reached."""


def key_fingerprint(api_key: str) -> str:
    """Return a short, stable SHA-256 fingerprint of an API key (never the key itself)."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:16]


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclasses.dataclass(slots=True)
class _Sync:
    """The latest rate-limit headers of one bucket, waiting to reach Redis."""

    remaining: float
    reset: float
    ticket: float
    capacity: float
    authoritative: bool
    request: float
    answered_at: float


class RedisRateLimiter:
    """Requests and tokens per minute shared through Redis, following the server's accounting.

    Implements the :class:`~stages.llm._limits.Limiter` protocol with the semantics of
    :class:`~stages.llm._limits.RateLimiter`. Build it with :meth:`from_url` (or pass a
    ``redis.asyncio.Redis`` client), use it from any number of workers, processes and
    machines, and :meth:`aclose` it at the end (or use ``async with``).

    Args:
        client: A ``redis.asyncio.Redis`` client (closed by :meth:`aclose`).
        rpm: Requests per minute for everyone on this key together; ``None``: no limit.
        tpm: Tokens per minute for everyone on this key together; ``None``: no limit.
        itpm: Input tokens per minute (Anthropic); ``None``: no limit.
        otpm: Output tokens per minute (Anthropic); ``None``: no limit.
        provider: Provider name, part of the Redis key.
        api_key: The API key whose quota is shared; only its fingerprint is used.
        model: Model name, part of the Redis key.
        burst_s: Seconds' worth of each rate that may go at once, at most; ``None``: as much
            as the server's headers say its bucket holds (one second before they arrive).
        learn: Follow the server's headers (limits, remaining capacity, short windows).
        fallback: ``"error"`` stops the run when Redis is unreachable; ``"local"`` goes on
            with a local limiter at ``fallback_share`` of the limits.
        fallback_share: Fraction of the limits a process may use alone after a fallback.
        url: The server's address for messages (any password is masked).
    """

    def __init__(
        self,
        client: Redis,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        itpm: float | None = None,
        otpm: float | None = None,
        provider: str = "default",
        api_key: str | None = None,
        model: str = "default",
        burst_s: float | None = None,
        learn: bool = True,
        fallback: Fallback = "error",
        fallback_share: float = 0.5,
        url: str = "redis",
    ) -> None:
        configured = (rpm, tpm, itpm, otpm)
        for name, value in zip(("rpm", "tpm", "itpm", "otpm"), configured, strict=True):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number > 0 or None, got {value!r}")
        if burst_s is not None and not (burst_s >= 0 and math.isfinite(burst_s)):
            raise ConfigError(f"burst_s must be a finite number >= 0 or None, got {burst_s!r}")
        if fallback not in ("error", "local"):
            raise ConfigError(f"fallback must be 'error' or 'local', got {fallback!r}")
        if not 0 < fallback_share <= 1:
            raise ConfigError(f"fallback_share must be in (0, 1], got {fallback_share!r}")
        if fallback == "local" and all(value is None for value in configured):
            raise ConfigError("fallback='local' needs rpm= or tpm= to fall back to a share of")
        fingerprint = key_fingerprint(api_key) if api_key else "nokey"
        self.key = f"llmpipe:{provider}:{fingerprint}:{model}"
        self.url = redact_url(url)
        self._client = client
        self._script = client.register_script(SCRIPT)
        self._configured = configured
        self._limits: list[float | None] = list(configured)
        self._burst_s = burst_s
        self._learn = learn
        self._learned = False
        self._fallback: Fallback = fallback
        self._share = fallback_share
        self._local: RateLimiter | None = None
        self._paused_until = -math.inf  # this process's view, on the monotonic clock
        self._pending_pause: float | None = None  # a pause deadline not yet sent to Redis
        self._pending_tokens = [0.0, 0.0, 0.0, 0.0]  # corrections not yet sent to Redis
        self._pending_sync: list[_Sync | None] = [None, None, None, None]
        self._pending_smooth = False
        self._smooth = False
        self._burst: float | None = None
        self._queue: collections.deque[anyio.Event] = collections.deque()
        self._head: anyio.CancelScope | None = None
        self._ticket: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar(
            f"redis-limiter-ticket-{id(self)}", default=None
        )
        # When the calling task's request ended (wall clock, comparable across processes on
        # one machine), and the ends not yet reported to Redis: (request id, when; -1 for a
        # request never sent).
        self._ended_at: contextvars.ContextVar[float | None] = contextvars.ContextVar(
            f"redis-limiter-ended-{id(self)}", default=None
        )
        self._pending_ends: list[tuple[int, float]] = []
        self._judge = ThrottleJudge()
        self._acquired = 0
        self._waited = 0.0
        self._reserved_until = -math.inf  # the latest turn this process got from Redis

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 2.0, **options: Any) -> RedisRateLimiter:
        """Connect (lazily) to ``redis://host:port/db`` and return a limiter on it.

        Args:
            url: A ``redis://`` or ``rediss://`` URL; a password in it never appears in
                messages.
            timeout: Seconds to connect and to wait for each reply before Redis counts as
                unreachable.
            **options: The keyword arguments of :class:`RedisRateLimiter`.
        """
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        client = Redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        )
        return cls(client, url=url, **options)

    def __repr__(self) -> str:
        rpm, tpm, itpm, otpm = self._limits
        return (
            f"RedisRateLimiter(url={self.url!r}, key={self.key!r}, rpm={rpm!r}, tpm={tpm!r}, "
            f"itpm={itpm!r}, otpm={otpm!r})"
        )

    async def __aenter__(self) -> RedisRateLimiter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def fallen_back(self) -> bool:
        """Whether Redis was lost and a local limiter took over."""
        return self._local is not None

    # -- taking turns ----------------------------------------------------------------------

    async def acquire(
        self, tokens: int = 0, *, input_tokens: int | None = None, output_tokens: int = 0
    ) -> float:
        """Wait until one request may go, and take its turn in Redis.

        Args:
            tokens: Estimated tokens of the request (the ``tpm`` bucket).
            input_tokens: Its prompt tokens (``itpm``); ``tokens`` when not given.
            output_tokens: Output tokens reserved for the answer (``otpm``).

        Returns:
            The seconds spent waiting.

        Raises:
            RedisUnavailableError: Redis cannot be reached and ``fallback="error"``.
        """
        costs = request_costs(tokens, input_tokens, output_tokens)
        if self._local is not None:
            return await self._local.acquire(
                tokens, input_tokens=input_tokens, output_tokens=output_tokens
            )
        started = time.monotonic()
        reply = await self._turn(costs)
        if reply is None:  # Redis was lost: the local limiter took over
            assert self._local is not None
            return await self._local.acquire(
                tokens, input_tokens=input_tokens, output_tokens=output_tokens
            )
        self._acquired += 1
        self._ticket.set(Ticket(costs, reply.counts))
        self._ended_at.set(None)
        self._judge.sent(time.monotonic(), costs)
        target = max(time.monotonic() + reply.wait, self._paused_until)
        self._reserved_until = max(self._reserved_until, target)
        try:
            while (delay := target - time.monotonic()) > 0:
                await anyio.sleep(delay)
                target = max(target, self._paused_until)
        except BaseException:
            self.ended(sent=False)  # cancelled before its turn: it will never be sent
            raise
        waited = time.monotonic() - started
        self._waited += waited
        return waited

    async def _turn(self, costs: Costs) -> Reply | None:
        """Queue behind this process's earlier callers; as the first, ask Redis for a turn."""
        queue = self._queue
        if not queue:
            reply = await self._call(costs, take=True)
            if reply is None or reply.taken:
                return reply
        turn = anyio.Event()
        queue.append(turn)
        try:
            if queue[0] is not turn:
                await turn.wait()
            while True:
                reply = await self._call(costs, take=True)
                if reply is None or reply.taken:
                    return reply
                delay = min(max(reply.wait - SLACK_S, 0.001), RECHECK_S)
                with anyio.CancelScope() as scope:
                    self._head = scope  # _wake() cancels it: something was learned
                    await anyio.sleep(delay)
                self._head = None
        finally:
            self._head = None
            if queue and queue[0] is turn:
                queue.popleft()
                if queue:
                    queue[0].set()
            else:
                queue.remove(turn)

    def _wake(self) -> None:
        if self._head is not None:
            self._head.cancel()

    async def flush(self) -> None:
        """Send pending pauses, corrections and headers to Redis now.

        Raises:
            RedisUnavailableError: Redis cannot be reached and ``fallback="error"``.
        """
        if self._local is None and self._pending():
            await self._call((0.0, 0.0, 0.0, 0.0), take=False)

    def _pending(self) -> bool:
        return (
            bool(self._pending_ends)
            or self._pending_pause is not None
            or self._pending_smooth
            or any(self._pending_tokens)
            or any(sync is not None for sync in self._pending_sync)
        )

    async def _call(self, costs: Costs, *, take: bool) -> Reply | None:
        """Run the script once; return its reply, or ``None`` after falling back to local."""
        from redis.exceptions import ConnectionError, TimeoutError

        pause_deadline = self._pending_pause
        pause_s = 0.0 if pause_deadline is None else max(pause_deadline - time.monotonic(), 0.0)
        corrections = list(self._pending_tokens)
        syncs = list(self._pending_sync)
        reported = len(self._pending_ends)
        smooth = self._pending_smooth
        args: list[float | int] = [
            1 if take else 0,
            SLACK_S,
            pause_s,
            1 if smooth else 0,
            GUESS_S,
            SMOOTH_S,
            -1 if self._burst_s is None else self._burst_s,
        ]
        for limit, cost, correction, sync in zip(
            self._limits, costs, corrections, syncs, strict=True
        ):
            args += [limit / 60.0 if limit is not None else 0, cost, correction]
            if sync is None:
                args += [0, 0, -1, -1, 0, -1, -1, -1]
            else:
                args += [
                    1,
                    sync.remaining,
                    sync.ticket,
                    sync.capacity,
                    int(sync.authoritative),
                    sync.reset,
                    sync.request,
                    sync.answered_at,
                ]
        for request, ended_at in self._pending_ends[:reported]:
            args += [request, ended_at]
        try:
            raw: Any = await self._script(keys=[self.key], args=args)
        except (ConnectionError, TimeoutError, OSError) as error:
            self._unreachable(error)
            return None
        del self._pending_ends[:reported]
        if self._pending_pause == pause_deadline:
            self._pending_pause = None
        for i, correction in enumerate(corrections):
            self._pending_tokens[i] -= correction
        for i, sync in enumerate(syncs):
            if self._pending_sync[i] is sync:
                self._pending_sync[i] = None
        if smooth:
            self._pending_smooth = False
        reply = Reply(raw)
        self._burst = reply.burst
        for i, per_minute in enumerate(reply.per_minute):
            if self._limits[i] is None and per_minute is not None:
                self._limits[i] = per_minute  # learned by another process
        if reply.smooth and not self._smooth:
            self._smooth = True
        if reply.paused_s > 0:
            self._paused_until = max(self._paused_until, time.monotonic() + reply.paused_s)
        return reply

    def _unreachable(self, error: BaseException) -> None:
        """Stop with a clear error, or fall back to a local limiter at the configured share."""
        if self._local is not None:
            return  # another worker's call failed first: one local limiter for everyone
        reason = f"{type(error).__name__}: {error}"
        if self._fallback == "error":
            raise RedisUnavailableError(
                f"the shared rate limiter's Redis at {self.url} is unreachable ({reason}); "
                "stopping rather than sending requests without a limit"
            ) from None
        share = self._share
        rpm, tpm, itpm, otpm = (None if v is None else v * share for v in self._limits)
        local = RateLimiter(
            rpm=rpm, tpm=tpm, itpm=itpm, otpm=otpm, burst_s=self._burst_s, learn=False
        )
        # Turns this process already took in Redis still go at their times: the local
        # limiter starts after the last of them, so the two never add up.
        remaining_pause = max(self._paused_until, self._reserved_until) - time.monotonic()
        if remaining_pause > 0:
            local.pause(remaining_pause)
        self._local = local
        self._wake()
        log.warning(
            "the shared rate limiter's Redis at %s is unreachable (%s); this process goes on "
            "alone at %.0f%% of the limits (rpm=%s, tpm=%s)",
            self.url,
            reason,
            share * 100,
            rpm,
            tpm,
        )

    # -- corrections and the server's word -------------------------------------------------

    def ended(self, *, sent: bool = True) -> None:
        """Say that the calling task's request ended now: answered, or failed (or never sent).

        Until then the request counts as *late* for every process: the server may not have
        counted it when it answered a request ticketed after it, so that answer's
        ``remaining`` is lowered by it. :meth:`observe` calls this (an answer's headers end
        the wait); the first word per acquire counts. Reaches Redis with the next script call.
        """
        if self._local is not None:
            return
        ticket = self._ticket.get()
        if ticket is None or self._ended_at.get() is not None:
            return
        at = time.time() if sent else -1.0
        self._ended_at.set(at)
        self._pending_ends.append((round(ticket.counts[0]), at))
        self._wake()

    def reconcile(self, estimated: int, actual: int) -> None:
        """Charge (or refund) the difference between estimated and actual tokens.

        The correction reaches Redis with the next script call.
        """
        if self._local is not None:
            self._local.reconcile(estimated, actual)
        else:
            self._pending_tokens[1] += actual - estimated

    def settle(self, input_tokens: int, output_tokens: int) -> None:
        """Correct every token bucket to the real usage of the calling task's last request."""
        if self._local is not None:
            self._local.settle(input_tokens, output_tokens)
            return
        ticket = self._ticket.get()
        if ticket is None:
            return
        actual = (float(input_tokens + output_tokens), float(input_tokens), float(output_tokens))
        for i, (used, cost) in enumerate(zip(actual, ticket.costs[1:], strict=True)):
            self._pending_tokens[i + 1] += used - cost
        self._ticket.set(dataclasses.replace(ticket, costs=(1.0, *actual)))
        self._wake()

    def pause(self, seconds: float) -> None:
        """Hold back every request on this key, in every process, for ``seconds``.

        Callers of this process wait at once; other processes from the moment the pause
        reaches Redis (the next script call here, or :meth:`flush`). Extends, never shortens.
        """
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        if self._local is not None:
            self._local.pause(seconds)
            return
        until = time.monotonic() + seconds
        if until > self._paused_until:
            self._paused_until = until
            self._pending_pause = until
            self._wake()

    def observe(self, headers: Mapping[str, str]) -> None:
        """Follow a response's rate-limit headers, for every process on this key.

        Limits the server states are adopted as :class:`~stages.llm._limits.RateLimiter`
        does; ``remaining`` and the capacity it reveals go to Redis with the next script call,
        where what every process took after this task's request is subtracted.
        """
        if self._local is not None:
            self._local.observe(headers)
            return
        info = parse_rate_limit_headers(headers)
        if info is None:
            return
        self.ended()  # the answer is here
        ticket = self._ticket.get()
        answered_at = self._ended_at.get()
        for i, kind in enumerate(KINDS):
            limit, remaining, reset = info.kind(kind)
            if limit is None and remaining is None:
                continue
            if self._learn:
                self._limits[i] = self._adopt(self._configured[i], self._limits[i], limit)
            current = self._limits[i]
            if current is None and remaining == 0 and reset:
                self.pause(reset)  # no rate known: wait for the server's reset
            if not self._learn or current is None or remaining is None:
                continue
            capacity = -1.0
            if reset is not None:
                server_rate = (limit if limit else current) / 60.0
                capacity = max(min(remaining + reset * server_rate, current), 1.0)
            sync = _Sync(
                remaining=float(remaining),
                reset=-1.0 if reset is None else reset,
                ticket=-1.0 if ticket is None else ticket.counts[i],
                capacity=capacity,
                authoritative=self._burst_s is None and current == limit,
                request=-1.0 if ticket is None else ticket.counts[0],
                answered_at=-1.0 if answered_at is None else answered_at,
            )
            pending = self._pending_sync[i]
            if pending is None or sync.ticket >= pending.ticket:
                self._pending_sync[i] = sync
        self._wake()

    def _adopt(
        self, configured: float | None, current: float | None, limit: int | None
    ) -> float | None:
        if limit is None or limit <= 0 or (configured is not None and limit >= configured):
            return current
        if current != limit:
            self._learned = True
            log.info("shared rate limit learned from the server: %s per minute", limit)
        return float(limit)

    def throttled(self, headers: Mapping[str, str], retry_after: float | None) -> Verdict:
        """Classify a 429 (see :class:`~stages.llm._limits.ThrottleJudge`), and act on it.

        ``quota`` pauses every process for the Retry-After; ``short_window`` switches the
        shared limiter to a smooth rate for every process on this key.
        """
        if self._local is not None:
            return self._local.throttled(headers, retry_after)
        info = parse_rate_limit_headers(headers)
        rates = tuple(None if v is None else v / 60.0 for v in self._limits)
        verdict = self._judge.judge(
            info, retry_after, self._ticket.get(), rates, self._smooth, time.monotonic()
        )
        if verdict == "quota" and retry_after is not None:
            self.pause(retry_after)
        elif verdict == "short_window" and info is not None:
            self._smooth = self._pending_smooth = True
            log.warning(short_window_message(info, self._limits[0]))
            self._wake()
        return verdict

    def statistics(self) -> LimiterStatistics:
        """Return this process's counters and the limits it applies."""
        if self._local is not None:
            local = self._local.statistics()
            return local._replace(
                acquired=local.acquired + self._acquired,
                waited_s=local.waited_s + self._waited,
                learned=self._learned,
                quota_429s=local.quota_429s + self._judge.quota,
                isolated_429s=local.isolated_429s + self._judge.isolated,
            )
        now = time.monotonic()
        rpm, tpm, itpm, otpm = self._limits
        return LimiterStatistics(
            acquired=self._acquired,
            waited_s=self._waited,
            paused_until=self._paused_until if self._paused_until > now else None,
            rpm=rpm,
            tpm=tpm,
            learned=self._learned,
            itpm=itpm,
            otpm=otpm,
            burst=self._burst,
            smooth=self._smooth,
            quota_429s=self._judge.quota,
            isolated_429s=self._judge.isolated,
        )

    async def aclose(self) -> None:
        """Send pending corrections (best effort) and close the Redis client."""
        try:
            if self._local is None:
                with anyio.move_on_after(1):
                    await self.flush()
        except RedisUnavailableError:
            pass
        finally:
            await self._client.aclose()


if TYPE_CHECKING:

    def _conforms(limiter: RedisRateLimiter) -> Limiter:
        return limiter
