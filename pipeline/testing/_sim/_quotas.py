"""The simulator's quotas: token buckets for requests and tokens per minute, and their headers.

``rpm`` and ``tpm`` are token buckets holding ``burst_s`` seconds of quota, refilled
continuously. A request is admitted when each bucket holds at least ``min(cost, capacity)``.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable

from pipeline.testing._sim._config import SimConfig

__all__ = ["Bucket", "Quotas", "format_duration"]


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


class Bucket:
    """A token bucket of ``per_minute / 60 * burst_s`` capacity, refilled continuously."""

    __slots__ = ("capacity", "level", "limit", "rate", "stamp")

    def __init__(self, per_minute: int, burst_s: float, now: float) -> None:
        self.limit = per_minute
        self.rate = per_minute / 60.0
        self.capacity = self.rate * burst_s
        self.level = self.capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        """Add what flowed in since the last refill, up to the capacity."""
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, cost: float) -> float:
        """Return how long until ``cost`` (at most the capacity) can be taken; 0 if now."""
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def remaining(self) -> int:
        """Return the whole units the bucket holds now (never negative)."""
        return max(0, int(self.level))

    def reset_s(self) -> float:
        """Return the seconds until the bucket is full again."""
        return max(0.0, (self.capacity - self.level) / self.rate)


class Quotas:
    """The request and token buckets of one simulator, built from its configuration.

    Args:
        config: Where ``rpm``, ``tpm`` and ``burst_s`` come from.
        clock: Monotonic clock in seconds; the buckets start full now.
    """

    def __init__(self, config: SimConfig, clock: Callable[[], float]) -> None:
        self.clock = clock
        now = clock()
        self.rpm = Bucket(config.rpm, config.burst_s, now) if config.rpm else None
        self.tpm = Bucket(config.tpm, config.burst_s, now) if config.tpm else None

    def reconfigured(self, old: SimConfig, new: SimConfig) -> Quotas:
        """Return the quotas for ``new``: a bucket whose quota did not change is kept as is."""
        fresh = Quotas(new, self.clock)
        if (new.rpm, new.burst_s) == (old.rpm, old.burst_s):
            fresh.rpm = self.rpm
        if (new.tpm, new.burst_s) == (old.tpm, old.burst_s):
            fresh.tpm = self.tpm
        return fresh

    def admit(self, cost: int) -> tuple[float, str]:
        """Take one request and ``cost`` tokens; if refused, return (wait, which bucket)."""
        rpm, tpm = self.rpm, self.tpm
        if rpm is None and tpm is None:
            return 0.0, ""
        now = self.clock()
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

    def headers(self, *, anthropic: bool = False) -> dict[str, str]:
        """Return the rate-limit headers (OpenAI's or Anthropic's); none without quotas."""
        headers: dict[str, str] = {}
        if self.rpm is None and self.tpm is None:
            return headers
        now = self.clock()
        for kind, bucket in (("requests", self.rpm), ("tokens", self.tpm)):
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
