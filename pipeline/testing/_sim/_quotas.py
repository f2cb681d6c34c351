"""The simulator's quotas: requests, tokens, input and output tokens per minute, and headers.

Each quota is a :class:`~pipeline.testing._sim._enforcement.Meter`: a bucket of ``burst_s``
seconds of it (what the headers report), refilled continuously, and with ``window_s`` a
short-window bucket as well. A request is admitted when every meter holds at least
``min(cost, capacity)``: one request; its prompt plus completion tokens; its prompt tokens
(``itpm``); its completion tokens (``otpm``).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable

from pipeline.testing._sim._config import SimConfig
from pipeline.testing._sim._enforcement import Bucket, Meter

__all__ = ["Bucket", "Quotas", "format_duration"]

KINDS = ("requests", "tokens", "input-tokens", "output-tokens")
_ANTHROPIC_ONLY = frozenset({"input-tokens", "output-tokens"})


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


def _limits(config: SimConfig) -> tuple[int | None, ...]:
    return (config.rpm, config.tpm, config.itpm, config.otpm)


class Quotas:
    """The quotas of one simulator, built from its configuration.

    Args:
        config: Where ``rpm``, ``tpm``, ``itpm``, ``otpm``, ``burst_s`` and ``window_s``
            come from.
        clock: Monotonic clock in seconds; the buckets start full now.
    """

    def __init__(self, config: SimConfig, clock: Callable[[], float]) -> None:
        self.clock = clock
        now = clock()
        self.meters: dict[str, Meter | None] = {
            kind: None if limit is None else Meter(limit, config.burst_s, config.window_s, now)
            for kind, limit in zip(KINDS, _limits(config), strict=True)
        }
        self.any = any(meter is not None for meter in self.meters.values())

    def reconfigured(self, old: SimConfig, new: SimConfig) -> Quotas:
        """Return the quotas for ``new``: a quota that did not change is kept as is."""
        fresh = Quotas(new, self.clock)
        if (old.burst_s, old.window_s) == (new.burst_s, new.window_s):
            for kind, before, after in zip(KINDS, _limits(old), _limits(new), strict=True):
                if before == after:
                    fresh.meters[kind] = self.meters[kind]
        return fresh

    def admit(self, cost: int, prompt: int | None = None) -> tuple[float, str]:
        """Take one request and ``cost`` tokens (``prompt`` of them input).

        Returns:
            ``(0, "")`` when admitted, else how long to wait and which quota refused.
        """
        if not self.any:
            return 0.0, ""
        now = self.clock()
        costs = (
            1,
            cost,
            cost if prompt is None else prompt,
            0 if prompt is None else cost - prompt,
        )
        wait, which = 0.0, ""
        taken = []
        for kind, units in zip(KINDS, costs, strict=True):
            meter = self.meters[kind]
            if meter is None:
                continue
            need = meter.wait(units, now)
            if need > wait:
                wait, which = need, kind
            taken.append((meter, units))
        if wait > 0:
            return wait, which
        for meter, units in taken:
            meter.take(units)
        return 0.0, ""

    def headers(self, *, anthropic: bool = False) -> dict[str, str]:
        """Return the rate-limit headers (OpenAI's or Anthropic's); none without quotas."""
        headers: dict[str, str] = {}
        if not self.any:
            return headers
        now = self.clock()
        for kind, meter in self.meters.items():
            if meter is None or (kind in _ANTHROPIC_ONLY and not anthropic):
                continue
            bucket = meter.bucket
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
