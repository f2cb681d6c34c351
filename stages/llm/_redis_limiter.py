"""A rate limiter shared by many processes and machines through Redis (extra ``[redis]``).

Every worker of every process that uses the same provider, API key and model reserves its turn
in one Redis hash, ``llmpipe:{provider}:{key_fingerprint}:{model}``, with a single Lua script:
the script reads the server's clock (``TIME``, so machines with skewed clocks agree), applies
any pause and token correction this process has to report, computes with GCRA the earliest
instant at which one more request and its estimated tokens fit both buckets, reserves that
instant and returns how long to wait. The caller then sleeps exactly that long, once: no
polling and no second round trip. It is the same algorithm as :class:`pipeline.RateLimiter`,
with its state in Redis instead of in memory, and needs no Redis module (managed Redis works).

:meth:`RedisRateLimiter.pause`, :meth:`~RedisRateLimiter.reconcile` and
:meth:`~RedisRateLimiter.observe` are synchronous, as the :class:`~stages.llm._limits.Limiter`
protocol wants: they take effect in this process at once and reach Redis with this process's
next script call (the next ``acquire``, which a retry after a 429 makes right away) or an
explicit :meth:`~RedisRateLimiter.flush`. Turns other processes reserved before a pause
reached Redis are kept (at most one per waiting worker); every turn reserved after it waits.

If Redis becomes unreachable mid-job the limiter either stops the run with
:class:`RedisUnavailableError` or, with ``fallback="local"``, carries on alone with a local
:class:`~stages.llm._limits.RateLimiter` at ``fallback_share`` of the limits (each process
assumes it shares the quota with others), logging a warning. The local limiter starts after
the last turn this process had already reserved in Redis, so the two never overlap. It never
falls back to no limit.
"""

from __future__ import annotations

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
from stages.llm._limits import LimiterStatistics, RateLimiter, parse_rate_limit_headers

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from stages.llm._limits import Limiter

log = logging.getLogger("pipeline.redis_limiter")

Fallback = Literal["error", "local"]

# KEYS[1]: the limiter's hash. ARGV: requests/s, tokens/s (0 = no limit), burst seconds,
# estimated tokens, pause seconds to apply, tokens to charge (+) or refund (-), reserve (1/0).
# Fields: req and tok (theoretical arrival times), pause (paused until), last (last turn given).
_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local key = KEYS[1]
local req_rate = tonumber(ARGV[1])
local tok_rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local pause_s = tonumber(ARGV[5])
local correction = tonumber(ARGV[6])
local reserve = tonumber(ARGV[7])

local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', key, 'req', 'tok', 'pause', 'last')
local req_tat = tonumber(state[1]) or 0
local tok_tat = tonumber(state[2]) or 0
local pause_until = tonumber(state[3]) or 0
local last = tonumber(state[4]) or 0

if pause_s > 0 then pause_until = math.max(pause_until, now + pause_s) end
if correction ~= 0 and tok_rate > 0 then
  tok_tat = tok_tat + correction / tok_rate  -- a tat in the past is a full bucket
end

local wait = 0
if reserve == 1 then
  local start = math.max(now, pause_until, last)
  if req_rate > 0 then
    local capacity = math.max(burst * req_rate, 1)
    start = math.max(start, req_tat - math.max(capacity - 1, 0) / req_rate)
  end
  if tok_rate > 0 then
    local capacity = math.max(burst * tok_rate, 1)
    start = math.max(start, tok_tat - math.max(capacity - cost, 0) / tok_rate)
  end
  if req_rate > 0 then req_tat = math.max(req_tat, start) + 1 / req_rate end
  if tok_rate > 0 then tok_tat = math.max(tok_tat, start) + cost / tok_rate end
  last = start
  wait = start - now
end

local function fmt(x) return string.format('%.6f', x) end
redis.call('HSET', key, 'req', fmt(req_tat), 'tok', fmt(tok_tat), 'pause', fmt(pause_until),
  'last', fmt(last))
local horizon = math.max(req_tat, tok_tat, pause_until, last) - now
redis.call('PEXPIRE', key, math.ceil((math.max(horizon, 0) + 60) * 1000))
return string.format('%.6f', wait)
"""


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


class RedisRateLimiter:
    """Requests-per-minute and tokens-per-minute limits shared through Redis.

    Implements the :class:`~stages.llm._limits.Limiter` protocol. Build it with :meth:`from_url`
    (or pass a ``redis.asyncio.Redis`` client), use it from any number of workers, processes
    and machines, and :meth:`aclose` it at the end (or use ``async with``).

    Args:
        client: A ``redis.asyncio.Redis`` client (closed by :meth:`aclose`).
        rpm: Requests per minute for everyone on this key together; ``None``: no limit.
        tpm: Tokens per minute for everyone on this key together; ``None``: no limit.
        provider: Provider name, part of the Redis key.
        api_key: The API key whose quota is shared; only its fingerprint is used.
        model: Model name, part of the Redis key.
        burst_s: Seconds' worth of each rate that may go at once after an idle spell.
        learn: Adopt limits stated in response headers when none was configured (and lower a
            configured one the server says is too high).
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
        provider: str = "default",
        api_key: str | None = None,
        model: str = "default",
        burst_s: float = 0.5,
        learn: bool = True,
        fallback: Fallback = "error",
        fallback_share: float = 0.5,
        url: str = "redis",
    ) -> None:
        for name, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number > 0 or None, got {value!r}")
        if not (burst_s >= 0 and math.isfinite(burst_s)):
            raise ConfigError(f"burst_s must be a finite number >= 0, got {burst_s!r}")
        if fallback not in ("error", "local"):
            raise ConfigError(f"fallback must be 'error' or 'local', got {fallback!r}")
        if not 0 < fallback_share <= 1:
            raise ConfigError(f"fallback_share must be in (0, 1], got {fallback_share!r}")
        if fallback == "local" and rpm is None and tpm is None:
            raise ConfigError("fallback='local' needs rpm= or tpm= to fall back to a share of")
        fingerprint = key_fingerprint(api_key) if api_key else "nokey"
        self.key = f"llmpipe:{provider}:{fingerprint}:{model}"
        self.url = redact_url(url)
        self._client = client
        self._script = client.register_script(_SCRIPT)
        self._configured = (rpm, tpm)
        self._rpm, self._tpm = rpm, tpm
        self._burst_s = burst_s
        self._learn = learn
        self._learned = False
        self._fallback: Fallback = fallback
        self._share = fallback_share
        self._local: RateLimiter | None = None
        self._paused_until = -math.inf  # this process's view, on the monotonic clock
        self._pending_pause: float | None = None  # a pause deadline not yet sent to Redis
        self._pending_tokens = 0  # token corrections not yet sent to Redis
        self._acquired = 0
        self._waited = 0.0
        self._last_tokens = 0  # the estimate of the latest acquire, for an exhausted budget
        self._reserved_until = -math.inf  # the latest turn this process got from Redis

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        provider: str = "default",
        api_key: str | None = None,
        model: str = "default",
        burst_s: float = 0.5,
        learn: bool = True,
        fallback: Fallback = "error",
        fallback_share: float = 0.5,
        timeout: float = 2.0,
    ) -> RedisRateLimiter:
        """Connect (lazily) to ``redis://host:port/db`` and return a limiter on it.

        Args:
            url: A ``redis://`` or ``rediss://`` URL; a password in it never appears in
                messages.
            rpm: See :class:`RedisRateLimiter`.
            tpm: See :class:`RedisRateLimiter`.
            provider: See :class:`RedisRateLimiter`.
            api_key: See :class:`RedisRateLimiter`.
            model: See :class:`RedisRateLimiter`.
            burst_s: See :class:`RedisRateLimiter`.
            learn: See :class:`RedisRateLimiter`.
            fallback: See :class:`RedisRateLimiter`.
            fallback_share: See :class:`RedisRateLimiter`.
            timeout: Seconds to connect and to wait for each reply before Redis counts as
                unreachable.
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
        return cls(
            client,
            rpm=rpm,
            tpm=tpm,
            provider=provider,
            api_key=api_key,
            model=model,
            burst_s=burst_s,
            learn=learn,
            fallback=fallback,
            fallback_share=fallback_share,
            url=url,
        )

    def __repr__(self) -> str:
        return (
            f"RedisRateLimiter(url={self.url!r}, key={self.key!r}, rpm={self._rpm!r}, "
            f"tpm={self._tpm!r})"
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

    async def acquire(self, tokens: int = 0) -> float:
        """Wait until one request carrying an estimated ``tokens`` may go.

        One script call reserves the turn; the caller then sleeps once until it. A turn
        reserved by a caller that is then cancelled stays spent (errs on the slow side).

        Returns:
            The seconds spent waiting.

        Raises:
            RedisUnavailableError: Redis cannot be reached and ``fallback="error"``.
        """
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        self._last_tokens = tokens
        if self._local is not None:
            return await self._local.acquire(tokens)
        started = time.monotonic()
        wait = await self._call(tokens, reserve=True)
        if wait is None:  # Redis was lost just now: the local limiter took over
            assert self._local is not None
            return await self._local.acquire(tokens)
        self._acquired += 1
        target = max(time.monotonic() + wait, self._paused_until)
        self._reserved_until = max(self._reserved_until, target)
        while (delay := target - time.monotonic()) > 0:
            await anyio.sleep(delay)
            target = max(target, self._paused_until)
        waited = time.monotonic() - started
        self._waited += waited
        return waited

    async def flush(self) -> None:
        """Send a pending pause or token correction to Redis now instead of with the next turn.

        Raises:
            RedisUnavailableError: Redis cannot be reached and ``fallback="error"``.
        """
        if self._local is None and (self._pending_pause is not None or self._pending_tokens):
            await self._call(0, reserve=False)

    async def _call(self, tokens: int, *, reserve: bool) -> float | None:
        """Run the script once; return the wait, or ``None`` after falling back to local."""
        from redis.exceptions import ConnectionError, TimeoutError

        pause_deadline, correction = self._pending_pause, self._pending_tokens
        pause_s = 0.0 if pause_deadline is None else max(pause_deadline - time.monotonic(), 0.0)
        args = (
            self._rpm / 60.0 if self._rpm is not None else 0,
            self._tpm / 60.0 if self._tpm is not None else 0,
            self._burst_s,
            tokens,
            pause_s,
            correction,
            1 if reserve else 0,
        )
        try:
            reply: Any = await self._script(keys=[self.key], args=args)
        except (ConnectionError, TimeoutError, OSError) as error:
            self._unreachable(error)
            return None
        if self._pending_pause == pause_deadline:
            self._pending_pause = None
        self._pending_tokens -= correction
        return max(float(reply), 0.0)

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
        local = RateLimiter(
            rpm=None if self._rpm is None else self._rpm * share,
            tpm=None if self._tpm is None else self._tpm * share,
            burst_s=self._burst_s,
            learn=False,
        )
        # Turns this process already reserved in Redis still go at their times: the local
        # limiter starts after the last of them, so the two never add up.
        remaining_pause = max(self._paused_until, self._reserved_until) - time.monotonic()
        if remaining_pause > 0:
            local.pause(remaining_pause)
        self._local = local
        log.warning(
            "the shared rate limiter's Redis at %s is unreachable (%s); this process goes on "
            "alone at %.0f%% of the limits (rpm=%s, tpm=%s)",
            self.url,
            reason,
            share * 100,
            local.statistics().rpm,
            local.statistics().tpm,
        )

    def reconcile(self, estimated: int, actual: int) -> None:
        """Charge (or refund) the difference between estimated and actual tokens.

        The correction reaches Redis with the next script call.
        """
        if self._local is not None:
            self._local.reconcile(estimated, actual)
        else:
            self._pending_tokens += actual - estimated

    def pause(self, seconds: float) -> None:
        """Hold back every request on this key, in every process, for ``seconds``.

        Callers of this process wait at once; other processes from the moment the pause
        reaches Redis (the next ``acquire`` or :meth:`flush` here). Extends, never shortens.
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

    def observe(self, headers: Mapping[str, str]) -> None:
        """Learn limits from rate-limit headers; an exhausted budget pauses the whole key.

        With ``learn`` on, a stated limit is adopted when none was configured, and replaces a
        configured one that is higher. ``remaining`` at 0 pauses everyone for as long as the
        server needs to refill one request (``60 / limit`` seconds; for tokens, the last
        request's estimated tokens) but no longer than the reset: servers refill their
        buckets continuously, so waiting for the whole reset would waste quota. When the
        server states no limit (and none is in force) the pause lasts until the reset.
        """
        if self._local is not None:
            self._local.observe(headers)
            return
        info = parse_rate_limit_headers(headers)
        if info is None:
            return
        if self._learn:
            self._rpm = self._adopt(self._configured[0], self._rpm, info.limit_requests)
            self._tpm = self._adopt(self._configured[1], self._tpm, info.limit_tokens)
        for remaining, reset, limit, cost in (
            (info.remaining_requests, info.reset_requests, info.limit_requests or self._rpm, 1),
            (info.remaining_tokens, info.reset_tokens, info.limit_tokens or self._tpm, None),
        ):
            if remaining != 0 or not reset:
                continue
            if limit:
                units = self._last_tokens if cost is None else cost
                reset = min(reset, units * 60.0 / limit)
            self.pause(reset)

    def _adopt(
        self, configured: float | None, current: float | None, limit: int | None
    ) -> float | None:
        if limit is None or limit <= 0 or (configured is not None and limit >= configured):
            return current
        if current != limit:
            self._learned = True
            log.info("shared rate limit learned from the server: %s per minute", limit)
        return float(limit)

    def statistics(self) -> LimiterStatistics:
        """Return this process's counters and the limits it applies."""
        if self._local is not None:
            local = self._local.statistics()
            return local._replace(
                acquired=local.acquired + self._acquired,
                waited_s=local.waited_s + self._waited,
                learned=self._learned,
            )
        now = time.monotonic()
        return LimiterStatistics(
            acquired=self._acquired,
            waited_s=self._waited,
            paused_until=self._paused_until if self._paused_until > now else None,
            rpm=self._rpm,
            tpm=self._tpm,
            learned=self._learned,
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
