"""OpenTelemetry: one trace per item across stages, batch links, and no cost when off."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import pipeline as pl
from pipeline import Envelope, Inbox, Outbox, Pipeline, Stage

pytestmark = pytest.mark.anyio


def make_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


class PairUp(Stage[int, list[int]]):
    """Groups items two by two, linking the batch span to its members' spans."""

    async def run(self, inbox: Inbox[int], outbox: Outbox[list[int]]) -> None:
        held: list[Envelope[int]] = []
        async for env in inbox:
            held.append(env)
            if len(held) == 2:
                batch = Envelope([m.value for m in held], held[0].seq, members=tuple(held))
                with outbox.span(batch, links=held):
                    await outbox.send(batch)
                held = []


async def test_each_item_gets_one_trace_across_stages() -> None:
    provider, exporter = make_provider()
    p = Pipeline(pl.map(lambda x: x + 1, name="inc"), pl.map(str, name="fmt"), tracing=provider)
    report = await p.run(range(3))
    assert report.ok == 3
    spans = exporter.get_finished_spans()
    by_trace: dict[int, list[Any]] = {}
    for span in spans:
        if span.name in {"source", "inc", "fmt"}:
            by_trace.setdefault(span.context.trace_id, []).append(span)
    assert len(by_trace) == 3
    for trace_spans in by_trace.values():
        names = sorted(s.name for s in trace_spans)
        assert names == ["fmt", "inc", "source"]
        (root,) = [s for s in trace_spans if s.name == "source"]
        for child in trace_spans:
            if child is not root:
                assert child.parent is not None and child.parent.span_id == root.context.span_id
    run_spans = [s for s in spans if s.name == "pipeline pipeline"]
    assert len(run_spans) == 1


async def test_a_batch_span_links_the_spans_of_its_items() -> None:
    provider, exporter = make_provider()
    await Pipeline(PairUp(name="pair"), tracing=provider).run(range(4))
    spans = exporter.get_finished_spans()
    roots = {s.context.span_id for s in spans if s.name == "source"}
    batch_spans = [s for s in spans if s.name == "pair"]
    assert len(batch_spans) == 2
    for span in batch_spans:
        assert len(span.links) == 2
        assert {link.context.span_id for link in span.links} <= roots


async def test_a_failed_item_span_records_the_error() -> None:
    provider, exporter = make_provider()

    def boom(x: int) -> int:
        raise ValueError("nope")

    report = await Pipeline(pl.map(boom, name="boom"), tracing=provider).run([1])
    assert report.failed == 1
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "boom"]
    assert not span.status.is_ok
    assert span.events and span.events[0].name == "exception"


async def test_tracing_is_off_without_an_sdk() -> None:
    results: list[int] = []
    p = Pipeline(pl.map(lambda x: x + 1))
    async with p.open([1, 2]) as out:
        async for env in out.envelopes():
            assert env.context is None
            results.append(env.value)
    assert sorted(results) == [2, 3]


async def test_metrics_count_items_per_stage_and_outcome() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    def odd_fails(x: int) -> int:
        if x % 2:
            raise ValueError(x)
        return x

    await Pipeline(pl.map(odd_fails, name="check"), metrics=provider).run(range(10))
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[tuple[str, str], float] = {}
    names = set()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                names.add(metric.name)
                if metric.name == "pipeline.items":
                    for point in metric.data.data_points:
                        attrs = dict(point.attributes or {})
                        points[(str(attrs["pipeline.stage"]), str(attrs["outcome"]))] = point.value
    assert points[("check", "in")] == 10
    assert points[("check", "out")] == 5
    assert points[("check", "failed")] == 5
    assert "pipeline.queue.depth" in names
    provider.shutdown()
