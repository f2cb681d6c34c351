"""Operator limits above job limits: what one job or one token may take of the server.

The server's configuration sets the ceilings (:class:`~pipeline.server.ServerConfig`): requests
and tokens per minute on one API key and model, requests in flight per job, jobs and streams
per bearer token. A request may ask for less for itself (a job's ``rpm``, ``concurrency``),
never more (422 naming the ceiling), and what it asks never changes what the other jobs get:

- the limiter every job on one key and model shares is made from the operator's ``max_rpm``
  and ``max_tpm`` only, and then follows the provider's rate-limit headers;
- a job's own ``rpm``/``tpm`` make a second, private limiter in front of it
  (:class:`JobLimiter`): the job waits for both, the others only for the shared one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from pipeline.server._config import RequestError, ServerConfig
from stages.llm._limits import Limiter, RateLimiter, Verdict

__all__ = ["JobLimiter", "TokenQuota", "check_ceilings", "job_limiter", "owner"]

_RATES = (("rpm", "max_rpm"), ("tpm", "max_tpm"), ("itpm", "max_tpm"), ("otpm", "max_tpm"))
_IN_FLIGHT = ("concurrency", "max_concurrency")


def check_ceilings(config: ServerConfig, given: Mapping[str, Any]) -> None:
    """Refuse a request asking for more than the operator allows.

    Raises:
        RequestError: 422 naming the setting and the server's ceiling.
    """
    _check_rates(config, given, "")  # _settings checks each endpoint table the same way
    for name in _IN_FLIGHT:
        value = given.get(name)
        if isinstance(value, int) and value > config.max_concurrency:
            raise RequestError(
                422,
                f"{name} {value} is above this server's ceiling of {config.max_concurrency} "
                "requests in flight per job (max_concurrency); ask for less or leave it out",
            )


def _check_rates(config: ServerConfig, given: Mapping[str, Any], where: str) -> None:
    for name, ceiling_name in _RATES:
        value, ceiling = given.get(name), getattr(config, ceiling_name)
        if isinstance(value, (int, float)) and ceiling is not None and value > ceiling:
            raise RequestError(
                422,
                f"{where}{name} {value:g} is above this server's ceiling of {ceiling:g} per "
                f"minute ({ceiling_name}); ask for less or leave it out",
            )


class JobLimiter:
    """A job's own limits in front of the limiter it shares with every job on its key.

    ``acquire`` waits for the job's own buckets, then for the shared ones. What the provider
    says (headers, 429s and their Retry-After) is about the key, so it goes to the shared
    limiter; the job's own buckets only count what the job sent.

    Args:
        own: The job's private limiter (its ``rpm``/``tpm``, not learning from headers).
        shared: The limiter of the key and model, configured by the operator.
    """

    def __init__(self, own: RateLimiter, shared: Limiter) -> None:
        self.own = own
        self.shared = shared

    async def acquire(
        self, tokens: int = 0, *, input_tokens: int | None = None, output_tokens: int = 0
    ) -> float:
        """Wait for the job's own limits, then the shared ones; return the whole wait."""
        waited = await self.own.acquire(
            tokens, input_tokens=input_tokens, output_tokens=output_tokens
        )
        return waited + await self.shared.acquire(
            tokens, input_tokens=input_tokens, output_tokens=output_tokens
        )

    def reconcile(self, estimated: int, actual: int) -> None:
        """Correct both token buckets once the real usage of a request is known."""
        self.own.reconcile(estimated, actual)
        self.shared.reconcile(estimated, actual)

    def settle(self, input_tokens: int, output_tokens: int) -> None:
        """Correct both limiters to the real usage of the task's last request."""
        self.own.settle(input_tokens, output_tokens)
        self.shared.settle(input_tokens, output_tokens)

    def pause(self, seconds: float) -> None:
        """A pause the provider asked for holds every job on the key."""
        self.shared.pause(seconds)

    def observe(self, headers: Mapping[str, str]) -> None:
        """The provider's headers describe the key: the shared limiter learns from them."""
        self.shared.observe(headers)

    def ended(self, *, sent: bool = True) -> None:
        """The request ended: the shared limiter tracks it for the key."""
        self.shared.ended(sent=sent)

    def throttled(self, headers: Mapping[str, str], retry_after: float | None) -> Verdict:
        """A 429 is judged by the shared limiter (it is about the key)."""
        return self.shared.throttled(headers, retry_after)


def job_limiter(shared: Limiter, given: Mapping[str, Any]) -> Limiter:
    """Return the limiter one job uses: ``shared``, behind the job's own limits if it set any."""
    rpm, tpm, itpm, otpm = (given.get(name) for name in ("rpm", "tpm", "itpm", "otpm"))
    if rpm is None and tpm is None and itpm is None and otpm is None:
        return shared
    return JobLimiter(RateLimiter(rpm=rpm, tpm=tpm, itpm=itpm, otpm=otpm, learn=False), shared)


def owner(authorization: str | None) -> str:
    """Return a fingerprint of the bearer token a request presented (never the token).

    Jobs and streams are counted per token; without a token (a loopback server) every request
    has the same owner.
    """
    value = (authorization or "").partition(" ")[2].strip()
    return hashlib.sha256(value.encode()).hexdigest()[:16] if value else "anonymous"


class TokenQuota:
    """How many of something each token holds at once, up to a limit (streams per token).

    Args:
        limit: The most one token may hold.
        what: What is counted, for the 429's message (``"streams"``).
    """

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.held: dict[str, int] = {}

    def take(self, key: str) -> None:
        """Take one for ``key``.

        Raises:
            RequestError: 429 when ``key`` already holds the limit.
        """
        count = self.held.get(key, 0)
        if count >= self.limit:
            raise RequestError(
                429,
                f"this token already has {count} {self.what} open (limit {self.limit}); "
                "close one and retry",
            )
        self.held[key] = count + 1

    def give_back(self, key: str) -> None:
        """Return one taken for ``key``."""
        count = self.held.get(key, 0) - 1
        if count > 0:
            self.held[key] = count
        else:
            self.held.pop(key, None)
