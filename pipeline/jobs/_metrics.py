"""Prometheus metrics for jobs, built on OpenTelemetry instruments.

:class:`JobMetrics` owns an OpenTelemetry ``MeterProvider`` whose reader is the OpenTelemetry
Prometheus exporter (``PrometheusMetricReader``) on a registry of its own, so two servers in
one process (tests) never mix their series. Jobs feed it their :class:`Sample` snapshots: each
counter grows by what the job did since its previous sample, labelled with the job's id and
model. The runtime's own instruments (``pipeline._tracing.Metrics``: items per stage and
outcome, queue depths, backpressure and limiter waits, tokens) go to the same provider through
:meth:`JobMetrics.provider_for`, which labels them with the job and model too
(``pipeline_items_total``, ``pipeline_queue_depth``, ``pipeline_backpressure_wait_seconds_total``,
``pipeline_limiter_wait_seconds_total``, ``pipeline_tokens_total``).

Exported names (``/metrics`` of the server, ``--metrics-port`` of ``run``):

=======================================  ====================================================
``pipeline_job_rows_total``              rows finished, ``outcome`` ``ok`` or ``failed``
``pipeline_job_requests_total``          HTTP requests sent (retries included)
``pipeline_job_responses_total``         answers by HTTP ``status``
``pipeline_job_rate_limited_total``      answers that asked to slow down (429, 503, 529)
``pipeline_job_retries_total``           retries made
``pipeline_job_tokens_total``            tokens, ``kind`` ``prompt`` or ``completion``
``pipeline_job_cost_usd_total``          cost in US dollars per the price table
``pipeline_job_limiter_wait_seconds_total``  seconds rows waited for the rate limiter
``pipeline_job_in_flight``               requests on the wire now
``pipeline_job_rows_remaining``          rows not finished yet (when the total is known)
=======================================  ====================================================

Needs the ``server`` extra (``opentelemetry-sdk``, ``opentelemetry-exporter-prometheus``,
``prometheus-client``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from opentelemetry import metrics as otel_metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pipeline._tracing import INSTRUMENTATION
from pipeline.jobs._timeline import Sample

CONTENT_TYPE = CONTENT_TYPE_LATEST

# (sample field, instrument, extra attributes)
_COUNTED: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("ok", "rows", {"outcome": "ok"}),
    ("failed", "rows", {"outcome": "failed"}),
    ("requests", "requests", {}),
    ("rate_limited", "rate_limited", {}),
    ("retries", "retries", {}),
    ("prompt_tokens", "tokens", {"kind": "prompt"}),
    ("completion_tokens", "tokens", {"kind": "completion"}),
    ("cost_usd", "cost", {}),
    ("limiter_wait_s", "limiter_wait", {}),
)


class JobMetrics:
    """OpenTelemetry instruments for jobs, exported in the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reader = PrometheusMetricReader(registry=self.registry, scope_info_enabled=False)
        resource = Resource.create({"service.name": INSTRUMENTATION})
        self.provider = MeterProvider(metric_readers=[self.reader], resource=resource)
        meter = self.provider.get_meter(INSTRUMENTATION)
        self._counters: dict[str, Any] = {
            "rows": meter.create_counter("pipeline.job.rows", description="Rows finished"),
            "requests": meter.create_counter(
                "pipeline.job.requests", description="HTTP requests sent, retries included"
            ),
            "responses": meter.create_counter(
                "pipeline.job.responses", description="Answers by HTTP status"
            ),
            "rate_limited": meter.create_counter(
                "pipeline.job.rate_limited",
                description="Answers that asked to slow down (429, 503, 529)",
            ),
            "retries": meter.create_counter("pipeline.job.retries", description="Retries made"),
            "tokens": meter.create_counter(
                "pipeline.job.tokens", description="Tokens reported by the server, by kind"
            ),
            "cost": meter.create_counter(
                "pipeline.job.cost_usd", description="Cost in US dollars per the price table"
            ),
            "limiter_wait": meter.create_counter(
                "pipeline.job.limiter_wait",
                unit="s",
                description="Seconds rows waited for the rate limiter",
            ),
        }
        self._in_flight = meter.create_gauge(
            "pipeline.job.in_flight", description="Requests on the wire now"
        )
        self._remaining = meter.create_gauge(
            "pipeline.job.rows_remaining", description="Rows not finished yet"
        )
        self._last: dict[str, Sample] = {}

    def provider_for(self, job: str, model: str | None) -> otel_metrics.MeterProvider:
        """Return a meter provider for the runtime of ``job``: its measurements get its labels.

        Pass it as ``Pipeline(metrics=...)`` (``run_job(..., metrics=...)``).
        """
        return LabelledProvider(self.provider, {"job": job, "model": model or ""})

    def start_run(self, job: str) -> None:
        """Forget ``job``'s last sample: its next run counts from zero again."""
        self._last.pop(job, None)

    def observe(self, job: str, model: str | None, sample: Sample) -> None:
        """Add what ``job`` did since its previous sample to the counters; set the gauges."""
        attrs = {"job": job, "model": model or ""}
        last = self._last.get(job)
        if last is not None and sample.t < last.t:  # a new run, not told by start_run
            last = None
        base = last if last is not None else Sample(t=0.0)
        for field, name, extra in _COUNTED:
            grown = getattr(sample, field) - getattr(base, field)
            if grown > 0:
                self._counters[name].add(grown, {**attrs, **extra})
        for status, count in sample.statuses.items():
            grown = count - base.statuses.get(status, 0)
            if grown > 0:
                self._counters["responses"].add(grown, {**attrs, "status": str(status)})
        self._in_flight.set(sample.in_flight, attrs)
        if sample.rows_total is not None:
            self._remaining.set(max(sample.rows_total - sample.rows_done, 0), attrs)
        self._last[job] = sample

    def render(self) -> bytes:
        """Return every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> Any:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; return the HTTP server.

        Call ``shutdown()`` and ``server_close()`` on the result to stop it.
        """
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server

    def shutdown(self) -> None:
        """Stop the meter provider (and unregister the exporter from the registry)."""
        self.provider.shutdown()


class LabelledProvider(otel_metrics.MeterProvider):
    """A meter provider adding fixed attributes to every measurement of its instruments.

    The runtime's instruments know their stage, not the job they run for; the server runs many
    jobs through one provider, so each job's pipeline gets one of these.

    Args:
        inner: The provider that records.
        attributes: Added to every measurement (a measurement's own attributes win).
    """

    def __init__(self, inner: otel_metrics.MeterProvider, attributes: Mapping[str, str]) -> None:
        self.inner = inner
        self.attributes = dict(attributes)

    def get_meter(
        self,
        name: str,
        version: str | None = None,
        schema_url: str | None = None,
        attributes: Any = None,
    ) -> otel_metrics.Meter:
        """Return the inner provider's meter, wrapped to label what it records."""
        meter = self.inner.get_meter(name, version, schema_url, attributes)
        return cast(otel_metrics.Meter, _LabelledMeter(meter, self.attributes))


class _LabelledMeter:
    """A meter whose ``create_*`` instruments add fixed attributes to each measurement."""

    def __init__(self, inner: otel_metrics.Meter, attributes: dict[str, str]) -> None:
        self._inner = inner
        self._attributes = attributes

    def __getattr__(self, name: str) -> Any:
        create = getattr(self._inner, name)
        if not name.startswith("create_"):
            return create

        def labelled(*args: Any, **kwargs: Any) -> _LabelledInstrument:
            return _LabelledInstrument(create(*args, **kwargs), self._attributes)

        return labelled


class _LabelledInstrument:
    """An instrument adding fixed attributes to each ``add``, ``set`` or ``record``."""

    def __init__(self, inner: Any, attributes: dict[str, str]) -> None:
        self._inner = inner
        self._attributes = attributes

    def _with(self, attributes: Mapping[str, Any] | None) -> dict[str, Any]:
        return {**self._attributes, **(attributes or {})}

    def add(self, amount: float, attributes: Mapping[str, Any] | None = None) -> None:
        """Add to a counter."""
        self._inner.add(amount, self._with(attributes))

    def set(self, amount: float, attributes: Mapping[str, Any] | None = None) -> None:
        """Set a gauge."""
        self._inner.set(amount, self._with(attributes))

    def record(self, amount: float, attributes: Mapping[str, Any] | None = None) -> None:
        """Record into a histogram."""
        self._inner.record(amount, self._with(attributes))


__all__ = ["CONTENT_TYPE", "JobMetrics", "LabelledProvider"]
