"""The providers' rate-limit headers and ``Retry-After``, parsed into plain numbers.

OpenAI (and the servers that copy it) send ``x-ratelimit-{limit,remaining,reset}-{requests,
tokens}``, resets as Go durations (``6m0s``); Anthropic sends
``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}``,
resets as RFC 3339 timestamps. Both are the server's own accounting: ``remaining`` is what may
be sent now, ``reset`` the time until the bucket is full again.
"""

from __future__ import annotations

import dataclasses
import email.utils
import math
import re
import time
from collections.abc import Mapping
from datetime import datetime, timezone

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
    seconds until the bucket is full again. ``*_tokens`` is the combined token limit
    (OpenAI's, or Anthropic's ``tokens``); ``*_input_tokens`` and ``*_output_tokens`` are
    Anthropic's separate input and output limits.
    """

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float | None = None
    limit_input_tokens: int | None = None
    remaining_input_tokens: int | None = None
    reset_input_tokens: float | None = None
    limit_output_tokens: int | None = None
    remaining_output_tokens: int | None = None
    reset_output_tokens: float | None = None

    def kind(self, name: str) -> tuple[int | None, int | None, float | None]:
        """Return ``(limit, remaining, reset)`` of one kind of limit.

        Args:
            name: ``requests``, ``tokens``, ``input_tokens`` or ``output_tokens``.
        """
        return (
            getattr(self, f"limit_{name}"),
            getattr(self, f"remaining_{name}"),
            getattr(self, f"reset_{name}"),
        )


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


_KINDS = ("requests", "tokens", "input_tokens", "output_tokens")


def parse_rate_limit_headers(
    headers: Mapping[str, str], *, now: float | None = None
) -> RateLimitInfo | None:
    """Parse OpenAI's ``x-ratelimit-*`` or Anthropic's ``anthropic-ratelimit-*`` headers.

    OpenAI resets are durations (``6m0s``); Anthropic's are RFC 3339 timestamps, turned into
    seconds from ``now``. Anthropic's combined ``tokens`` headers fill the ``*_tokens`` fields,
    its ``input-tokens`` and ``output-tokens`` headers their own fields. Unparsable values are
    left unknown rather than raising.

    Args:
        headers: Response headers (a dict or aiohttp's ``CIMultiDictProxy``).
        now: The current Unix time, for timestamps; defaults to :func:`time.time`.

    Returns:
        The parsed values, or ``None`` when the response carries no rate-limit header.
    """
    lowered = _lower(headers)
    current = time.time() if now is None else now
    if any(name.startswith("x-ratelimit-") for name in lowered):
        prefix, openai = "x-ratelimit-", True
    elif any(name.startswith("anthropic-ratelimit-") for name in lowered):
        prefix, openai = "anthropic-ratelimit-", False
    else:
        return None
    values: dict[str, float | int | None] = {}
    for kind in _KINDS:
        dashed = kind.replace("_", "-")
        for field in ("limit", "remaining", "reset"):
            name = f"{prefix}{field}-{dashed}" if openai else f"{prefix}{dashed}-{field}"
            raw = lowered.get(name)
            values[f"{field}_{kind}"] = (
                _parse_reset(raw, current) if field == "reset" else _count(raw)
            )
    return RateLimitInfo(**values)  # type: ignore[arg-type]
