"""Prometheus metrics for jobs, built on OpenTelemetry instruments.

:class:`JobMetrics` owns an OpenTelemetry ``MeterProvider`` whose reader is the OpenTelemetry
Prometheus exporter (``PrometheusMetricReader``) on a registry of its own, so two servers in
one process (tests) never mix their series. Jobs feed it their :class:`Sample` snapshots: each
counter grows by what the job did since its previous sample, labelled with the job's id and
model. The same provider can be handed to the runtime (``Pipeline(metrics=provider)``), whose
per-stage instruments (items, queue depths, backpressure, limiter waits, tokens) then appear
on the same page.

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

from typing import Any

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


__all__ = ["CONTENT_TYPE", "JobMetrics"]
