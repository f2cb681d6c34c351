"""OpenTelemetry spans and metrics for a run, free when no SDK is configured.

Tracing is decided once per run: with the API's default (no SDK installed or configured) every
span helper returns a shared no-op context manager and the hot path pays one attribute check.
Metrics are flushed in bulk from the stage statistics, never per item.

The OpenTelemetry API is imported only when it can matter: a tracer or meter provider can only
have been installed by code that imported the API first (or named one in the environment
variables the API reads), so while ``opentelemetry.trace`` is not imported there is nothing to
trace and a run does not import it (a few milliseconds of every job's start-up).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry import metrics, trace

_NULL = contextlib.nullcontext()
INSTRUMENTATION = "llm-pipeline"


def _api_in_use(module: str, variable: str) -> bool:
    """Whether a provider of this OpenTelemetry signal may be installed (see the module doc)."""
    return module in sys.modules or bool(os.environ.get(variable))


def sdk_configured() -> bool:
    """Return whether a real tracer provider (not the API's no-op/proxy) is installed."""
    if not _api_in_use("opentelemetry.trace", "OTEL_PYTHON_TRACER_PROVIDER"):
        return False
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    return not isinstance(provider, (trace.NoOpTracerProvider, trace.ProxyTracerProvider))


def recording_span() -> Any:
    """Return the current span if it is recording (a run being traced), else ``None``."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:  # never imported: no span can exist
        return None
    span = trace.get_current_span()
    return span if span.is_recording() else None


def context_with(span: Any) -> Any:
    """Return an OpenTelemetry context holding ``span`` (to travel with an item)."""
    from opentelemetry import trace

    return trace.set_span_in_context(span)


class Tracing:
    """Span helpers bound to one run; a disabled instance costs nothing per item."""

    __slots__ = ("_tracer", "enabled", "run_span")

    def __init__(self, enabled: bool | trace.TracerProvider | None = None) -> None:
        provider: trace.TracerProvider | None = None
        if enabled is not None and not isinstance(enabled, bool):
            provider, enabled = enabled, True
        self.enabled = sdk_configured() if enabled is None else enabled
        self._tracer: trace.Tracer | None = None
        if self.enabled:
            from opentelemetry import trace

            self._tracer = trace.get_tracer(INSTRUMENTATION, tracer_provider=provider)
        self.run_span: trace.Span | None = None

    def start_run(self, name: str) -> None:
        """Open the span that covers the whole run."""
        if self._tracer is not None:
            self.run_span = self._tracer.start_span(f"pipeline {name}")

    def end_run(self, error: BaseException | None = None) -> None:
        """Close the run span, recording ``error`` if the run failed."""
        if self.run_span is not None:
            if error is not None:
                from opentelemetry import trace

                self.run_span.record_exception(error)
                self.run_span.set_status(trace.StatusCode.ERROR, type(error).__name__)
            self.run_span.end()

    def item_root(self, stage: str, seq: int, origin: str | None) -> Any:
        """Start and end the span where an item enters; return its context to travel with it."""
        if self._tracer is None:
            return None
        from opentelemetry import context as otel_context
        from opentelemetry import trace

        links = [trace.Link(self.run_span.get_span_context())] if self.run_span is not None else []
        span = self._tracer.start_span(
            stage,
            context=otel_context.Context(),
            links=links,
            attributes=_attrs(stage, seq, origin),
        )
        span.end()
        return trace.set_span_in_context(span)

    @contextlib.contextmanager
    def _span(
        self, stage: str, context: Any, seq: int, links: Sequence[Any]
    ) -> Iterator[trace.Span]:
        assert self._tracer is not None
        from opentelemetry import trace

        with self._tracer.start_as_current_span(
            stage,
            context=context,
            links=[trace.Link(c) for c in links],
            attributes={"pipeline.stage": stage, "pipeline.seq": seq},
            record_exception=True,
            set_status_on_exception=True,
        ) as span:
            yield span

    def span(
        self, stage: str, context: Any, seq: int, links: Sequence[Any] = ()
    ) -> contextlib.AbstractContextManager[Any]:
        """Return a context manager spanning one item's work in ``stage`` (no-op when off)."""
        if self._tracer is None:
            return _NULL
        return self._span(stage, context, seq, links)


def span_context_of(context: Any) -> Any:
    """Return the span context stored in an item's OpenTelemetry context, for links."""
    from opentelemetry import trace

    return trace.get_current_span(context).get_span_context()


def _attrs(stage: str, seq: int, origin: str | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {"pipeline.stage": stage, "pipeline.seq": seq}
    if origin is not None:
        attrs["pipeline.origin"] = origin
    return attrs


class Metrics:
    """OpenTelemetry instruments fed from stage statistics in bulk, never per item.

    A run flushes the counters' growth since the last flush every ``interval`` seconds and at
    its end, and samples each stage's queue depth at the same moments.
    """

    _COUNTED = (
        ("received", "in"),
        ("emitted", "out"),
        ("failed", "failed"),
        ("dropped", "dropped"),
        ("retries", "retries"),
        ("requests", "requests"),
    )

    def __init__(self, provider: metrics.MeterProvider | None = None) -> None:
        from opentelemetry import metrics

        meter = metrics.get_meter(INSTRUMENTATION, meter_provider=provider)
        self.items = meter.create_counter(
            "pipeline.items", unit="{item}", description="Items per stage and outcome"
        )
        self.queue = meter.create_gauge(
            "pipeline.queue.depth", unit="{item}", description="Items waiting in a stage's inbox"
        )
        self.blocked = meter.create_counter(
            "pipeline.backpressure.wait",
            unit="s",
            description="Time stages waited for room in a full outbox",
        )
        self.limiter_wait = meter.create_counter(
            "pipeline.limiter.wait", unit="s", description="Time items waited for rate limits"
        )
        self.tokens = meter.create_counter(
            "pipeline.tokens", unit="{token}", description="LLM tokens by kind"
        )
        self._last: dict[int, dict[str, float]] = {}

    def flush(self, stats: Sequence[Any], depths: Sequence[int | None]) -> None:
        """Record what each stage did since the previous flush, and its queue depth now."""
        for index, (stage, depth) in enumerate(zip(stats, depths, strict=False)):
            last = self._last.setdefault(index, {})
            attrs = {"pipeline.stage": stage.name}
            for field, outcome in self._COUNTED:
                grown = self._grown(last, field, getattr(stage, field))
                if grown:
                    self.items.add(grown, {**attrs, "outcome": outcome})
            if grown := self._grown(last, "blocked_s", stage.blocked_s):
                self.blocked.add(grown, attrs)
            if grown := self._grown(last, "limiter_wait_s", stage.limiter_wait_s):
                self.limiter_wait.add(grown, attrs)
            for kind in ("prompt_tokens", "completion_tokens"):
                if grown := self._grown(last, kind, getattr(stage, kind)):
                    self.tokens.add(grown, {**attrs, "kind": kind.split("_")[0]})
            if depth is not None:
                self.queue.set(depth, attrs)

    @staticmethod
    def _grown(last: dict[str, float], field: str, value: float) -> float:
        grown = value - last.get(field, 0)
        last[field] = value
        return grown


def metrics_configured() -> bool:
    """Return whether a real meter provider (not the API's no-op/proxy) is installed."""
    if not _api_in_use("opentelemetry.metrics", "OTEL_PYTHON_METER_PROVIDER"):
        return False
    from opentelemetry import metrics

    provider = metrics.get_meter_provider()
    return type(provider).__name__ not in {"NoOpMeterProvider", "_ProxyMeterProvider"}
