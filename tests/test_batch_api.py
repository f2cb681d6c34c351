"""The batch client (stages.llm._batch_api) against the simulator's batch endpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from pipeline.testing import BatchSimConfig, SimConfig, Simulator, serve
from stages.llm._batch_api import BatchClient
from stages.llm._batch_wire import (
    BatchLimits,
    BatchRefusedError,
    BatchResult,
    BatchStatus,
    BatchUnsupportedError,
)
from stages.llm._providers import AnthropicProvider, AzureProvider, Provider

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with serve(SimConfig()) as server:
        server.batches.configure(BatchSimConfig(delay_s=0.05))
        yield server


def provider_for(sim: Simulator, kind: str) -> Provider:
    if kind == "anthropic":
        return AnthropicProvider(sim.url)
    return Provider(sim.url)


def body(provider: Provider, text: str, **params: Any) -> dict[str, Any]:
    return provider.chat_body("sim-1", [{"role": "user", "content": text}], None, params, False)


async def submit(client: BatchClient, path: Path, metadata: dict[str, str] | None = None) -> str:
    if client.kind == "openai":
        file_id = await client.upload(str(path))
        return (await client.create(file_id, metadata=metadata)).id
    return (await client.create(str(path))).id


async def wait_ended(client: BatchClient, batch_id: str) -> BatchStatus:
    with anyio.fail_after(20):
        while True:
            status = await client.retrieve(batch_id)
            if status.ended:
                return status
            await anyio.sleep(0.02)


async def run_batch(
    client: BatchClient, tmp_path: Path, texts: dict[str, str]
) -> tuple[BatchStatus, list[BatchResult]]:
    path = tmp_path / "requests.jsonl"
    with client.spool(str(path)) as spool:
        for custom_id, text in texts.items():
            assert spool.add(custom_id, body(client.provider, text))
    status = await wait_ended(client, await submit(client, path))
    return status, [result async for result in client.results(status)]


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_every_row_gets_its_own_answer_without_online_calls(
    sim: Simulator, tmp_path: Path, kind: str
) -> None:
    texts = {f"row-{i}": f"hello {i}" for i in range(40)}
    async with BatchClient(provider_for(sim, kind)) as client:
        status, results = await run_batch(client, tmp_path, texts)
    assert status.status == ("ended" if kind == "anthropic" else "completed")
    assert sorted(r.custom_id for r in results) == sorted(texts)
    for result in results:
        assert result.outcome == "succeeded"
        assert result.answer is not None
        assert result.answer.text == "echo: " + texts[result.custom_id]
        assert result.answer.usage is not None
    by_route = sim.counters()["by_route"]
    assert "/v1/chat/completions" not in by_route and "/v1/messages" not in by_route
    assert sim.batches.counters()["batches"] == 1


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_results_come_back_out_of_order_and_are_matched_by_custom_id(
    sim: Simulator, tmp_path: Path, kind: str
) -> None:
    texts = {f"r{i}": f"t{i}" for i in range(30)}
    async with BatchClient(provider_for(sim, kind)) as client:
        _, results = await run_batch(client, tmp_path, texts)
    order = [r.custom_id for r in results]
    assert order != list(texts)
    assert {r.custom_id: r.answer.text for r in results if r.answer} == {
        k: "echo: " + v for k, v in texts.items()
    }


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_spool_refuses_the_request_past_the_limits(
    sim: Simulator, tmp_path: Path, kind: str
) -> None:
    async with BatchClient(provider_for(sim, kind), limits=BatchLimits(10, 10_000)) as client:
        spool = client.spool(str(tmp_path / "a.jsonl"))
        accepted = [spool.add(f"r{i}", body(client.provider, "x")) for i in range(12)]
        spool.close()
        assert accepted == [True] * 10 + [False, False]
        small = BatchClient(provider_for(sim, kind), limits=BatchLimits(100, 600))
        spool = small.spool(str(tmp_path / "b.jsonl"))
        count = 0
        while spool.add(f"r{count}", body(small.provider, "y" * 50)):
            count += 1
        spool.close()
        assert 1 <= count < 10
        assert (tmp_path / "b.jsonl").stat().st_size <= 600
        with (
            small.spool(str(tmp_path / "c.jsonl")) as spool,
            pytest.raises(BatchRefusedError, match="more than a whole batch"),
        ):
            spool.add("big", body(small.provider, "z" * 1000))


async def test_the_simulator_fails_a_batch_and_says_why(sim: Simulator, tmp_path: Path) -> None:
    sim.batches.configure(BatchSimConfig(delay_s=0.05, fail_batches=1))
    async with BatchClient(Provider(sim.url)) as client:
        status, results = await run_batch(client, tmp_path, {"a": "1", "b": "2"})
    assert status.status == "failed" and status.ended
    assert status.failure and "batch_failed" in status.failure
    assert results == []


async def test_an_anthropic_batch_that_fails_answers_every_request_errored(
    sim: Simulator, tmp_path: Path
) -> None:
    sim.batches.configure(BatchSimConfig(delay_s=0.05, fail_batches=1))
    async with BatchClient(AnthropicProvider(sim.url)) as client:
        _, results = await run_batch(client, tmp_path, {"a": "1", "b": "2"})
    assert {r.outcome for r in results} == {"errored"}
    assert all(r.failure is not None and r.failure.retryable for r in results)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_an_expired_batch_returns_the_requests_it_finished(
    sim: Simulator, tmp_path: Path, kind: str
) -> None:
    sim.batches.configure(BatchSimConfig(delay_s=0.05, expire_batches=1, expire_done=0.25))
    texts = {f"r{i}": str(i) for i in range(20)}
    async with BatchClient(provider_for(sim, kind)) as client:
        status, results = await run_batch(client, tmp_path, texts)
    assert status.ended
    outcomes = sorted(r.outcome for r in results)
    assert outcomes.count("succeeded") == 5 and outcomes.count("expired") == 15
    assert sorted(r.custom_id for r in results) == sorted(texts)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("status_code", [500, 400])
async def test_per_row_errors_say_whether_a_retry_can_help(
    sim: Simulator, tmp_path: Path, kind: str, status_code: int
) -> None:
    sim.batches.configure(
        BatchSimConfig(delay_s=0.05, row_errors=0.5, row_error_status=status_code, seed=3)
    )
    texts = {f"r{i}": str(i) for i in range(40)}
    async with BatchClient(provider_for(sim, kind)) as client:
        _, results = await run_batch(client, tmp_path, texts)
    errored = [r for r in results if r.outcome == "errored"]
    assert 5 < len(errored) < 35
    assert len(results) == 40
    for result in errored:
        assert result.failure is not None
        assert result.failure.retryable is (status_code == 500)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_cancel_ends_the_batch_with_the_unrun_rows_cancelled(
    sim: Simulator, tmp_path: Path, kind: str
) -> None:
    sim.batches.configure(BatchSimConfig(delay_s=60))
    path = tmp_path / "r.jsonl"
    async with BatchClient(provider_for(sim, kind)) as client:
        with client.spool(str(path)) as spool:
            for i in range(10):
                spool.add(f"r{i}", body(client.provider, str(i)))
        batch_id = await submit(client, path)
        cancelling = await client.cancel(batch_id)
        assert cancelling.status in ("cancelling", "canceling")
        status = await wait_ended(client, batch_id)
        results = [r async for r in client.results(status)]
    assert status.status in ("cancelled", "ended")
    assert {r.outcome for r in results} == {"canceled"}
    assert len(results) == 10


async def test_find_reattaches_to_a_batch_by_its_metadata(sim: Simulator, tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    async with BatchClient(Provider(sim.url)) as client:
        with client.spool(str(path)) as spool:
            spool.add("a", body(client.provider, "1"))
        batch_id = await submit(client, path, {"job": "j1", "chunk": "0"})
        await submit(client, path, {"job": "j1", "chunk": "1"})
        found = await client.find(metadata={"job": "j1", "chunk": "0"})
        missing = await client.find(metadata={"job": "j2", "chunk": "0"})
    assert found is not None and found.id == batch_id
    assert missing is None


async def test_find_reattaches_to_an_anthropic_batch_by_count_and_time(
    sim: Simulator, tmp_path: Path
) -> None:
    path = tmp_path / "r.json"
    async with BatchClient(AnthropicProvider(sim.url)) as client:
        with client.spool(str(path)) as spool:
            for i in range(3):
                spool.add(f"r{i}", body(client.provider, str(i)))
        batch_id = await submit(client, path)
        found = await client.find(count=3, created_after=0)
        other = await client.find(count=4, created_after=0)
    assert found is not None and found.id == batch_id
    assert other is None


async def test_a_server_without_batch_endpoints_says_to_drop_batch_api(
    sim: Simulator, tmp_path: Path
) -> None:
    path = tmp_path / "r.jsonl"
    paradigm = Provider(sim.url.replace("/v1", "/api/v2"))
    async with BatchClient(paradigm) as client:
        with client.spool(str(path)) as spool:
            spool.add("a", body(client.provider, "1"))
        with pytest.raises(BatchUnsupportedError, match="drop --batch-api"):
            await client.upload(str(path))
    with pytest.raises(BatchUnsupportedError, match="azure"):
        BatchClient(AzureProvider("https://x.openai.azure.com"))


async def test_a_file_over_the_size_limit_is_refused_at_creation(
    sim: Simulator, tmp_path: Path
) -> None:
    sim.batches.configure(BatchSimConfig(delay_s=0.05, max_bytes=200))
    path = tmp_path / "r.jsonl"
    async with BatchClient(Provider(sim.url)) as client:
        with client.spool(str(path)) as spool:
            for i in range(5):
                spool.add(f"r{i}", body(client.provider, "x" * 40))
        with pytest.raises(BatchRefusedError, match="the limit is 200"):
            await submit(client, path)


async def test_a_batch_with_a_bad_line_fails_naming_the_line(
    sim: Simulator, tmp_path: Path
) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(
        '{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{}}\n'
        '{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{}}\n'
    )
    async with BatchClient(Provider(sim.url)) as client:
        batch_id = await submit(client, path)
        status = await wait_ended(client, batch_id)
    assert status.status == "failed"
    assert status.failure is not None and "duplicate_custom_id (line 2)" in status.failure


async def test_a_stream_body_is_refused_before_anything_is_sent(sim: Simulator) -> None:
    client = BatchClient(Provider(sim.url))
    streaming = client.provider.chat_body("m", [{"role": "user", "content": "x"}], None, {}, True)
    with pytest.raises(ValueError, match="cannot stream"):
        client.wire.request_line("a", streaming)
