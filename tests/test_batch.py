"""The batcher: by count, by tokens, by time, at end of input; splitting results back."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import pipeline as pl
from pipeline import ConfigError, Envelope, Inbox, Outbox, Pipeline, Source, Stage
from stages._batch import Batcher, Unbatch, default_size, split_batch

pytestmark = pytest.mark.anyio


async def batches_of(items: Any, batcher: Batcher[Any]) -> tuple[list[Envelope[Any]], Any]:
    out: list[Envelope[Any]] = []
    with anyio.fail_after(10):
        async with Pipeline(items, batcher).open() as results:
            async for env in results.envelopes():
                out.append(env)
    assert results.report is not None and results.report.balanced
    return out, results.report


async def test_by_count_with_a_partial_batch_at_the_end() -> None:
    envs, report = await batches_of(range(10), Batcher(max_items=4))
    assert [e.value for e in envs] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [e.seq for e in envs] == [0, 4, 8]
    assert [[m.seq for m in e.members or ()] for e in envs][2] == [8, 9]
    assert report.ok == 10 and report.rows_in == 10  # the report counts items, not batches
    stats = report.stage("batch")
    assert stats.received == stats.emitted == 10


async def test_by_tokens_and_an_oversized_item_travels_alone() -> None:
    items = ["a" * 8, "b" * 8, "c" * 4, "d" * 100, "e" * 4, "f" * 4, "g" * 4]
    # tokens: 2, 2, 1, 25, 1, 1, 1 with a budget of 4
    envs, _ = await batches_of(items, Batcher(max_tokens=4))
    assert [[s[0] for s in e.value] for e in envs] == [
        ["a", "b"],
        ["c"],
        ["d"],
        ["e", "f", "g"],
    ]


async def test_count_and_tokens_together_with_a_custom_size() -> None:
    envs, _ = await batches_of(range(1, 11), Batcher(max_items=3, max_tokens=10, size=lambda x: x))
    assert [e.value for e in envs] == [[1, 2, 3], [4, 5], [6], [7], [8], [9], [10]]


class Trickle(Source[int]):
    """Sends three items, then waits for the test before sending two more."""

    def __init__(self, gate: anyio.Event) -> None:
        super().__init__(name="trickle")
        self.gate = gate

    async def run(self, inbox: Inbox[None], outbox: Outbox[int]) -> None:
        for i in range(3):
            await outbox.emit(i)
        await self.gate.wait()
        for i in range(3, 5):
            await outbox.emit(i)


async def test_max_wait_sends_a_partial_batch_while_input_is_quiet() -> None:
    gate = anyio.Event()
    got: list[list[int]] = []
    with anyio.fail_after(10):
        async with Pipeline(Trickle(gate), Batcher(max_items=10, max_wait=0.02)).open() as results:
            started = anyio.current_time()
            async for batch in results:
                got.append(batch)
                if len(got) == 1:
                    # the source is blocked on the gate: only max_wait can have sent this
                    assert batch == [0, 1, 2]
                    assert anyio.current_time() - started >= 0.02
                    gate.set()
    assert got == [[0, 1, 2], [3, 4]]
    assert results.report is not None and results.report.balanced


class FailBatches(Stage[list[int], list[int]]):
    """Fails every batch that contains a multiple of 5."""

    async def run(self, inbox: Inbox[list[int]], outbox: Outbox[list[int]]) -> None:
        async for env in inbox:
            if any(x % 5 == 0 for x in env.value):
                await outbox.fail(env, pl.ItemError("bad batch"))
            else:
                await outbox.send(env)


async def test_failed_batch_dead_letters_each_member_and_unbatch_restores_items() -> None:
    p = Pipeline(range(1, 13), Batcher(max_items=3), FailBatches(), Unbatch())
    with anyio.fail_after(10):
        async with p.open() as results:
            items = [env async for env in results.envelopes()]
    report = results.report
    assert report is not None and report.balanced
    assert [e.value for e in items] == [1, 2, 3, 7, 8, 9]
    assert [e.seq for e in items] == [0, 1, 2, 6, 7, 8]  # each item has its identity back
    assert sorted(f.item for f in report.failures) == [4, 5, 6, 10, 11, 12]
    assert report.ok == 6 and report.failed == 6


def test_split_batch() -> None:
    members = tuple(Envelope(f"text{i}", i, key=f"k{i}", origin=f"f:{i + 1}") for i in range(3))
    batch = Envelope(["text0", "text1", "text2"], 0, members=members)
    out = split_batch(batch, [[0.1], [0.2], [0.3]])
    assert [(e.value, e.seq, e.key, e.origin) for e in out] == [
        ([0.1], 0, "k0", "f:1"),
        ([0.2], 1, "k1", "f:2"),
        ([0.3], 2, "k2", "f:3"),
    ]
    assert all(e.members is None for e in out)
    with pytest.raises(ValueError, match="a batch of 3 items got 2 results"):
        split_batch(batch, [1, 2])
    single = Envelope("x", 5)
    assert [e.value for e in split_batch(single, ["X"])] == ["X"]


class WrongLength(Stage[list[int], list[int]]):
    async def run(self, inbox: Inbox[list[int]], outbox: Outbox[list[int]]) -> None:
        async for env in inbox:
            value = env.value if env.value[0] != 0 else env.value[:-1]
            await outbox.send(Envelope(value, env.seq, members=env.members))


async def test_unbatch_dead_letters_a_batch_with_the_wrong_number_of_results() -> None:
    report = await Pipeline(range(6), Batcher(max_items=3), WrongLength(), Unbatch()).run()
    assert report.ok == 3 and report.failed == 3 and report.balanced
    assert "a batch of 3 items got 2 results" in report.failures[0].message


class Doubler(Stage[list[int], int]):
    """Works on whole batches (like an embeddings caller) and splits the results back."""

    async def run(self, inbox: Inbox[list[int]], outbox: Outbox[int]) -> None:
        async for env in inbox:
            with outbox.span(env):
                results = [x * 2 for x in env.value]
            for item in split_batch(env, results):
                await outbox.send(item)


async def test_batch_span_links_every_member_and_parents_the_next_stage() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    p = Pipeline(Batcher(max_items=3), Doubler(name="double"), tracing=provider)
    async with p.open(range(3)) as results:
        assert [x async for x in results] == [0, 2, 4]
    spans = exporter.get_finished_spans()
    roots = {s.context.span_id for s in spans if s.name == "source"}
    (batch,) = [s for s in spans if s.name == "batch"]
    assert {link.context.span_id for link in batch.links} == roots
    assert batch.attributes is not None and batch.attributes["pipeline.batch.size"] == 3
    (double,) = [s for s in spans if s.name == "double"]
    assert double.parent is not None and double.parent.span_id == batch.context.span_id
    provider.shutdown()


def test_bad_settings_and_default_size() -> None:
    with pytest.raises(ConfigError, match="needs max_items, max_tokens"):
        Batcher()
    with pytest.raises(ConfigError, match="max_items must be >= 1"):
        Batcher(max_items=0)
    with pytest.raises(ConfigError, match="max_tokens must be >= 1"):
        Batcher(max_tokens=-1)
    with pytest.raises(ConfigError, match="max_wait"):
        Batcher(max_items=2, max_wait=0)
    assert default_size("abcd" * 10) == 10
    assert default_size({"k": "v"}) == 3  # '{"k": "v"}' is 10 characters
    assert default_size("") == 1
