"""The simulator's configuration: :class:`SimConfig` and the fault kinds it can inject."""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from typing import Any

from pipeline._config import check_fields
from pipeline._errors import ConfigError

__all__ = ["FAULTS", "SimConfig", "field_hints"]

FAULTS = (
    "reset",
    "error_5xx",
    "error_429",
    "quota_429",
    "overloaded",
    "non_json",
    "truncate",
    "malformed",
    "stall",
    "stream_error",
)
"""Fault kinds, in the order they share the unit interval of the per-request draw."""


@dataclasses.dataclass(kw_only=True)
class SimConfig:
    """How the simulated server behaves (see :mod:`pipeline.testing` for the exact rules).

    Attributes:
        latency_ms: Mean delay before the first byte of a response.
        jitter_ms: Half-width of the uniform jitter added to ``latency_ms``.
        tokens_per_s: Generation speed: stream chunks are paced (and JSON answers delayed) to
            this many completion tokens per second; 0 sends everything at once.
        rpm: Requests-per-minute quota, or ``None`` for no limit.
        tpm: Tokens-per-minute quota, or ``None`` for no limit.
        burst_s: Seconds of quota each token bucket holds (60: a fresh key's whole minute,
            as OpenAI and Anthropic start one). The headers report this bucket.
        window_s: Also enforce every quota over windows of this many seconds (600 RPM with
            ``window_s=1``: at most 10 a second), unreported by the headers, as providers
            that quantize their limits do; ``None``: no short window.
        itpm: Input (prompt) tokens-per-minute quota (Anthropic's), or ``None``.
        otpm: Output (completion) tokens-per-minute quota (Anthropic's), or ``None``.
        price_prompt: USD per million prompt tokens, for the counters' ``spent_usd``.
        price_completion: USD per million completion tokens, for ``spent_usd``.
        error_5xx: Rate of 500/502/503 answers.
        error_429: Rate of 429 ``rate_limit_exceeded`` answers (with ``retry-after``).
        quota_429: Rate of 429 ``insufficient_quota`` answers.
        overloaded: Rate of Anthropic 529 ``overloaded_error`` answers.
        reset: Rate of connections aborted without a response.
        truncate: Rate of streams ended early / bodies cut short.
        malformed: Rate of responses with a non-JSON chunk or body.
        stall: Rate of responses that stop half-way for ``stall_s``.
        stall_s: How long a stalled response holds the connection before closing it.
        stream_error: Rate of streams carrying a mid-stream error event.
        non_json: Rate of 200 answers with an HTML body.
        seed: Seed of the per-request fault draws.
        require_key: API key every request must present (``None`` accepts anything).
        retry_after_s: ``retry-after`` of the ``error_429`` fault.
        embedding_dim: Length of embedding vectors (a request's ``dimensions`` overrides it).
        max_batch: Most inputs one embeddings request may carry.
        model: Model name reported when a request names none.
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    tokens_per_s: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    burst_s: float = 1.0
    window_s: float | None = None
    itpm: int | None = None
    otpm: int | None = None
    price_prompt: float = 0.0
    price_completion: float = 0.0
    error_5xx: float = 0.0
    error_429: float = 0.0
    quota_429: float = 0.0
    overloaded: float = 0.0
    reset: float = 0.0
    truncate: float = 0.0
    malformed: float = 0.0
    stall: float = 0.0
    stall_s: float = 5.0
    stream_error: float = 0.0
    non_json: float = 0.0
    seed: int = 0
    require_key: str | None = None
    retry_after_s: float = 1.0
    embedding_dim: int = 8
    max_batch: int = 2048
    model: str = "sim-1"

    def __post_init__(self) -> None:
        _check_types(self)
        for name in FAULTS:
            if getattr(self, name) > 1:
                raise ConfigError(
                    f"SimConfig.{name} is a rate in [0, 1], got {getattr(self, name)}"
                )
        total = sum(getattr(self, name) for name in FAULTS)
        if total > 1 + 1e-9:
            raise ConfigError(f"SimConfig fault rates add up to {total:g}, more than 1")
        for name in ("rpm", "tpm", "itpm", "otpm"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(
                    f"SimConfig.{name} must be > 0 or None, got {getattr(self, name)}"
                )
        if self.burst_s <= 0:
            raise ConfigError(f"SimConfig.burst_s must be > 0, got {self.burst_s}")
        if self.window_s is not None and self.window_s <= 0:
            raise ConfigError(f"SimConfig.window_s must be > 0 or None, got {self.window_s}")
        if self.embedding_dim < 1 or self.max_batch < 1:
            raise ConfigError("SimConfig.embedding_dim and max_batch must be >= 1")

    def __repr__(self) -> str:
        changed = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value != field.default:
                shown = "'***'" if field.name == "require_key" else repr(value)
                changed.append(f"{field.name}={shown}")
        return f"SimConfig({', '.join(changed)})"

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """Return the fields as JSON-ready data (``require_key`` masked unless ``redact=False``)."""
        data = dataclasses.asdict(self)
        if redact and data["require_key"] is not None:
            data["require_key"] = "***"
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimConfig:
        """Build a config from a mapping of field names (unknown names are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown SimConfig field(s) {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(names))}"
            )
        return cls(**data)

    @property
    def randomized(self) -> bool:
        """Whether requests need a random draw (some fault rate or jitter is set)."""
        return self.jitter_ms > 0 or any(getattr(self, name) for name in FAULTS)


@functools.cache
def field_hints() -> dict[str, Any]:
    """Return the resolved type hints of :class:`SimConfig`'s fields (cached)."""
    return typing.get_type_hints(SimConfig)


def _check_types(config: SimConfig) -> None:
    """Check each field against its type (whole numbers given for floats become floats).

    Every number of the simulator's configuration is a count, a rate or a duration: >= 0.
    """
    check_fields(config)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and value < 0:
            raise ConfigError(f"SimConfig.{field.name} must be >= 0, got {value!r}")
