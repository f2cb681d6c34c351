"""How the simulator enforces quotas the ways providers do, and what requests cost.

A :class:`Meter` is one quota (requests, tokens, input tokens or output tokens per minute):

* a **bucket** of ``burst_s`` seconds of the quota, refilled continuously, is what the rate-limit
  headers report (``burst_s=60``: a fresh key's whole minute at once, as OpenAI and Anthropic
  start one);
* with ``window_s`` set, the quota is **also enforced in short windows**: a second bucket of
  ``window_s`` seconds of it (600 RPM with ``window_s=1``: at most 10 per second), which the
  headers do not show, as providers that quantize their limits do.

``itpm`` and ``otpm`` are Anthropic's separate input and output token limits: the input meter
takes a request's prompt tokens, the output meter its completion tokens; Anthropic routes report
them as ``anthropic-ratelimit-input-tokens-*`` and ``-output-tokens-*``.

Spend: with ``price_prompt`` and ``price_completion`` (USD per million tokens) the counters
add up ``spent_usd`` over the answered requests (:func:`cost_usd`).
"""

from __future__ import annotations

__all__ = ["Bucket", "Meter", "cost_usd"]


class Bucket:
    """A token bucket of ``per_minute / 60 * seconds`` capacity, refilled continuously."""

    __slots__ = ("capacity", "level", "limit", "rate", "stamp")

    def __init__(self, per_minute: int, seconds: float, now: float) -> None:
        self.limit = per_minute
        self.rate = per_minute / 60.0
        self.capacity = self.rate * seconds
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


class Meter:
    """One quota: the bucket the headers report, and an unreported short-window bucket.

    Args:
        per_minute: The quota.
        burst_s: Seconds of quota the reported bucket holds.
        window_s: Seconds of quota the short-window bucket holds; ``None``: no short window.
        now: The clock now; both buckets start full.
    """

    __slots__ = ("bucket", "window")

    def __init__(self, per_minute: int, burst_s: float, window_s: float | None, now: float) -> None:
        self.bucket = Bucket(per_minute, burst_s, now)
        self.window = None if window_s is None else Bucket(per_minute, window_s, now)

    def wait(self, cost: float, now: float) -> float:
        """Refill; return how long until ``cost`` fits both buckets (0: now)."""
        self.bucket.refill(now)
        wait = self.bucket.wait(cost)
        if self.window is not None:
            self.window.refill(now)
            wait = max(wait, self.window.wait(cost))
        return wait

    def take(self, cost: float) -> None:
        """Take ``cost`` from both buckets (the level may go below zero for a big cost)."""
        self.bucket.level -= cost
        if self.window is not None:
            self.window.level -= cost


def cost_usd(prompt_tokens: int, completion_tokens: int, prices: tuple[float, float]) -> float:
    """Return what an answer costs at ``prices`` (USD per million prompt, completion tokens)."""
    return (prompt_tokens * prices[0] + completion_tokens * prices[1]) / 1e6
