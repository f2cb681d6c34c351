"""The simulated LLM server, exercised through real sockets with an aiohttp client."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
import math
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pipeline._errors import ConfigError
from pipeline.testing._sim import (
    SimConfig,
    Simulator,
    embedding_for,
    format_duration,
    main,
    serve,
    tokens,
)
from stages.llm._sse import (
    AnthropicStreamAssembler,
    ChatStreamAssembler,
    MalformedChunkError,
    ServerSentEvent,
    SSEDecoder,
    StreamErrorEvent,
    TruncatedStreamError,
    Usage,
    assemble,
)

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp is asyncio-only


def chat(text: str = "hello there world", **extra: Any) -> dict[str, Any]:
    return {"model": "m-1", "messages": [{"role": "user", "content": text}], **extra}


@asynccontextmanager
async def server(**config: Any) -> AsyncIterator[tuple[Simulator, aiohttp.ClientSession]]:
    async with serve(SimConfig(**config)) as sim, aiohttp.ClientSession() as session:
        yield sim, session


async def events_of(response: aiohttp.ClientResponse) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    async for chunk in response.content.iter_any():
        events.extend(decoder.feed(chunk))
    decoder.close()
    assert not decoder.discarded
    return events


# --------------------------------------------------------------------------------------------
# Answers


async def test_chat_json_answer_is_a_deterministic_function_of_the_request() -> None:
    async with server() as (sim, session):
        body = chat(
            "ignored",
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is "},
                        {"type": "text", "text": "up"},
                    ],
                },
            ],
        )
        async with session.post(sim.url + "/chat/completions", json=body) as r:
            assert r.status == 200
            data = await r.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == "m-1"
    choice = data["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "echo: what is up",
        "refusal": None,
    }
    assert choice["finish_reason"] == "stop"
    prompt_chars = len("be brief") + len("first") + len("ok") + len("what is up")
    assert data["usage"] == {
        "prompt_tokens": prompt_chars // 4,
        "completion_tokens": tokens("echo: what is up"),
        "total_tokens": prompt_chars // 4 + tokens("echo: what is up"),
    }


async def test_max_tokens_cuts_the_answer_with_length_finish_reason() -> None:
    text = "alpha beta gamma delta epsilon zeta eta theta"
    async with (
        server() as (sim, session),
        session.post(sim.url + "/chat/completions", json=chat(text, max_tokens=4)) as r,
    ):
        data = await r.json()
    content = data["choices"][0]["message"]["content"]
    assert data["choices"][0]["finish_reason"] == "length"
    assert ("echo: " + text).startswith(content) and len(content) < len("echo: " + text)
    assert data["usage"]["completion_tokens"] == tokens(content) <= 4


async def test_json_mode_answers_a_json_object() -> None:
    async with server() as (sim, session):
        body = chat('say "hi"', response_format={"type": "json_object"})
        async with session.post(sim.url + "/chat/completions", json=body) as r:
            data = await r.json()
    assert json.loads(data["choices"][0]["message"]["content"]) == {"echo": 'say "hi"'}


async def test_chat_stream_is_real_chunks_parsed_by_sse_decoder() -> None:
    async with server() as (sim, session):
        body = chat("one two three four", stream=True, stream_options={"include_usage": True})
        async with session.post(sim.url + "/chat/completions", json=body) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            events = await events_of(r)
        async with session.post(
            sim.url + "/chat/completions", json=chat("one two three four")
        ) as r:
            whole = await r.json()
    assert events[-1].data == "[DONE]"
    chunks = [json.loads(e.data) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "stop"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assembler = ChatStreamAssembler()
    for event in events:
        assembler.feed(event)
    result = assembler.result()
    assert result.text == whole["choices"][0]["message"]["content"] == "echo: one two three four"
    assert result.usage == Usage(
        whole["usage"]["prompt_tokens"], whole["usage"]["completion_tokens"]
    )
    assert len(chunks) == 1 + 5 + 1 + 1  # role, one per word, finish, usage


async def test_chat_stream_without_include_usage_has_no_usage() -> None:
    async with (
        server() as (sim, session),
        session.post(sim.url + "/chat/completions", json=chat("a b", stream=True)) as r,
    ):
        result = await assemble(r.content.iter_any(), ChatStreamAssembler())
    assert result.text == "echo: a b" and result.usage is None and result.finish_reason == "stop"


async def test_tokens_per_s_paces_the_stream_and_latency_delays_the_first_byte() -> None:
    text = " ".join(["word"] * 39)  # "echo: " + 39 words = 200 chars = 50 tokens
    async with server(tokens_per_s=500, latency_ms=60) as (sim, session):
        started = time.perf_counter()
        body = chat(text, stream=True)
        async with session.post(sim.url + "/chat/completions", json=body) as r:
            first = time.perf_counter() - started
            reads = 0
            decoder, assembler = SSEDecoder(), ChatStreamAssembler()
            async for chunk in r.content.iter_any():
                reads += 1
                for event in decoder.feed(chunk):
                    assembler.feed(event)
        elapsed = time.perf_counter() - started
    assert assembler.result().text == "echo: " + text
    assert first >= 0.055  # latency before the headers
    assert elapsed >= 0.06 + 0.09  # 50 tokens at 500/s = 0.1 s of generation
    assert reads > 1  # delivered in pieces, not in one body


# --------------------------------------------------------------------------------------------
# Faults, each observed by a client


async def test_reset_closes_the_connection_without_a_response() -> None:
    async with server(reset=1.0) as (sim, session):
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.post(sim.url + "/chat/completions", json=chat()) as r:
                await r.read()
        counters = sim.counters()
    assert counters["by_route"]["/v1/chat/completions"] == {"reset": 1}
    assert counters["faults"] == {"reset": 1}


async def test_truncate_stream_ends_without_done_and_json_body_is_cut() -> None:
    async with server(truncate=1.0) as (sim, session):
        body = chat("a b c d e f g h", stream=True)
        async with session.post(sim.url + "/chat/completions", json=body) as r:
            assert r.status == 200
            events = await events_of(r)  # the stream itself ends cleanly
        assert events and all(e.data != "[DONE]" for e in events)
        assembler = ChatStreamAssembler()
        for event in events:
            assembler.feed(event)
        with pytest.raises(TruncatedStreamError):
            assembler.result()
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.post(sim.url + "/chat/completions", json=chat()) as r:
                await r.read()


async def test_stall_sends_nothing_for_stall_s_then_closes() -> None:
    async with server(stall=1.0, stall_s=0.4) as (sim, session):
        body = chat("a b c d e f g h", stream=True)
        async with session.post(sim.url + "/chat/completions", json=body) as r:
            first = await asyncio.wait_for(r.content.readany(), 5)
            assert first.startswith(b"data: ")
            stalled_at = time.perf_counter()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(r.content.readany(), 0.2)
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(r.content.read(), 5)
            assert time.perf_counter() - stalled_at >= 0.35


async def test_stalled_response_does_not_delay_server_shutdown() -> None:
    async with asyncio.timeout(30):  # a hang guard below the 60 s stall shutdown must not wait
        async with (
            server(stall=1.0, stall_s=60) as (sim, session),
            session.post(sim.url + "/chat/completions", json=chat(stream=True)) as r,
        ):
            await asyncio.wait_for(r.content.readany(), 5)
            r.close()


async def test_malformed_chunk_in_stream_and_in_json_body() -> None:
    async with server(malformed=1.0) as (sim, session):
        body = chat("a b c d", stream=True)
        async with session.post(sim.url + "/chat/completions", json=body) as r:
            with pytest.raises(MalformedChunkError):
                await assemble(r.content.iter_any(), ChatStreamAssembler())
        async with session.post(sim.url + "/chat/completions", json=chat()) as r:
            assert r.status == 200
            with pytest.raises(json.JSONDecodeError):
                json.loads(await r.read())


async def test_non_json_is_an_html_200() -> None:
    async with (
        server(non_json=1.0) as (sim, session),
        session.post(sim.url + "/chat/completions", json=chat()) as r,
    ):
        assert r.status == 200
        assert r.content_type == "text/html"
        assert b"<html>" in await r.read()
        with pytest.raises(aiohttp.ContentTypeError):
            await r.json()


async def test_5xx_carries_an_openai_error() -> None:
    async with server(error_5xx=1.0, rpm=60_000) as (sim, session):
        statuses = set()
        for _ in range(12):
            async with session.post(sim.url + "/chat/completions", json=chat()) as r:
                statuses.add(r.status)
                assert (await r.json())["error"]["type"] == "server_error"
                assert r.headers["x-ratelimit-limit-requests"] == "60000"
    assert statuses <= {500, 502, 503} and len(statuses) > 1


async def test_rate_limit_429_fault_has_retry_after_and_code() -> None:
    async with server(error_429=1.0, retry_after_s=0.5) as (sim, session):
        async with session.post(sim.url + "/chat/completions", json=chat()) as r:
            assert r.status == 429
            assert r.headers["retry-after"] == "1"
            assert r.headers["retry-after-ms"] == "500"
            assert (await r.json())["error"]["code"] == "rate_limit_exceeded"
        assert sim.counters()["http_429"] == 1


async def test_quota_429_has_insufficient_quota_code() -> None:
    async with (
        server(quota_429=1.0) as (sim, session),
        session.post(sim.url + "/chat/completions", json=chat()) as r,
    ):
        assert r.status == 429
        error = (await r.json())["error"]
        assert error["code"] == error["type"] == "insufficient_quota"
        assert "retry-after" not in r.headers  # waiting does not bring quota back


async def test_stream_error_event_mid_stream() -> None:
    async with server(stream_error=1.0) as (sim, session):
        body = chat("a b c d e f", stream=True)
        async with session.post(sim.url + "/chat/completions", json=body) as r:
            assert r.status == 200
            with pytest.raises(StreamErrorEvent) as caught:
                await assemble(r.content.iter_any(), ChatStreamAssembler())
        assert caught.value.error_type == "server_error"
        # a non-stream request cannot carry it: no fault is injected
        async with session.post(sim.url + "/chat/completions", json=chat()) as r:
            assert r.status == 200 and (await r.json())["choices"]


async def test_api_key_is_required_when_configured_and_never_echoed() -> None:
    key = "sk-secret-123456"
    async with server(require_key=key, tpm=10**6) as (sim, session):
        url = sim.url + "/chat/completions"
        async with session.post(url, json=chat()) as r:
            assert r.status == 401
            assert r.headers["x-ratelimit-remaining-tokens"] == str(10**6 // 60)
        async with session.post(
            url, json=chat(), headers={"Authorization": "Bearer sk-wrong"}
        ) as r:
            assert r.status == 401
            text = await r.text()
            assert json.loads(text)["error"]["code"] == "invalid_api_key"
            assert "sk-wrong" not in text and key not in text
        async with session.post(url, json=chat(), headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200
        async with session.post(url, json=chat(), headers={"api-key": key}) as r:
            assert r.status == 200
        messages = sim.base_url + "/v1/messages"
        body = chat(max_tokens=10)
        async with session.post(messages, json=body, headers={"x-api-key": "nope"}) as r:
            assert r.status == 401
            assert (await r.json())["error"]["type"] == "authentication_error"
        async with session.post(messages, json=body, headers={"x-api-key": key}) as r:
            assert r.status == 200
        async with session.get(sim.base_url + "/sim/config") as r:
            assert (await r.json())["require_key"] == "***"
    assert key not in repr(SimConfig(require_key=key))


# --------------------------------------------------------------------------------------------
# Anthropic, Azure, Paradigm, embeddings, models


async def test_anthropic_messages_json_and_stream() -> None:
    async with server(rpm=6000, tpm=600_000) as (sim, session):
        url = sim.base_url + "/v1/messages"
        body = {
            "model": "claude-x",
            "max_tokens": 100,
            "system": "sys",
            "messages": [{"role": "user", "content": "hi you"}],
        }
        async with session.post(url, json=body) as r:
            data = await r.json()
            reset = r.headers["anthropic-ratelimit-requests-reset"]
            assert r.headers["anthropic-ratelimit-requests-limit"] == "6000"
            assert int(r.headers["anthropic-ratelimit-tokens-remaining"]) < 10_000
        at = datetime.datetime.fromisoformat(reset.replace("Z", "+00:00"))
        assert abs((at - datetime.datetime.now(datetime.timezone.utc)).total_seconds()) < 5
        assert data["type"] == "message" and data["content"] == [
            {"type": "text", "text": "echo: hi you"}
        ]
        assert data["stop_reason"] == "end_turn"
        assert data["usage"] == {
            "input_tokens": tokens("syshi you"),
            "output_tokens": tokens("echo: hi you"),
        }
        async with session.post(url, json={**body, "stream": True}) as r:
            events = await events_of(r)
        kinds = [e.event for e in events]
        assert kinds[:3] == ["message_start", "content_block_start", "ping"]
        assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
        assembler = AnthropicStreamAssembler()
        for event in events:
            assembler.feed(event)
        result = assembler.result()
        assert (result.text, result.finish_reason, result.model) == (
            "echo: hi you",
            "end_turn",
            "claude-x",
        )
        assert result.usage == Usage(data["usage"]["input_tokens"], data["usage"]["output_tokens"])
        async with session.post(url, json={"messages": body["messages"]}) as r:
            assert r.status == 400
            assert "max_tokens" in (await r.json())["error"]["message"]


async def test_anthropic_overloaded_529_and_stream_error_event() -> None:
    body = {"model": "c", "max_tokens": 50, "messages": [{"role": "user", "content": "a b c d"}]}
    async with server(overloaded=1.0) as (sim, session):
        async with session.post(sim.base_url + "/v1/messages", json=body) as r:
            assert r.status == 529
            assert (await r.json())["error"]["type"] == "overloaded_error"
        # the Anthropic-only fault is not injected on OpenAI routes
        async with session.post(sim.url + "/chat/completions", json=chat()) as r:
            assert r.status == 200
        assert sim.counters()["faults"] == {"overloaded": 1}
    async with server(stream_error=1.0) as (sim, session):
        async with session.post(sim.base_url + "/v1/messages", json={**body, "stream": True}) as r:
            with pytest.raises(StreamErrorEvent) as caught:
                await assemble(r.content.iter_any(), AnthropicStreamAssembler())
        assert caught.value.error_type == "overloaded_error"
    async with (
        server(truncate=1.0) as (sim, session),
        session.post(sim.base_url + "/v1/messages", json={**body, "stream": True}) as r,
    ):
        with pytest.raises(TruncatedStreamError):
            await assemble(r.content.iter_any(), AnthropicStreamAssembler())


async def test_azure_and_paradigm_routes() -> None:
    async with server(require_key="k") as (sim, session):
        azure = sim.base_url + "/openai/deployments/my-gpt/chat/completions"
        async with session.post(
            azure + "?api-version=2024-06-01", json=chat("az"), headers={"api-key": "k"}
        ) as r:
            data = await r.json()
            assert (data["model"], data["choices"][0]["message"]["content"]) == (
                "my-gpt",
                "echo: az",
            )
        async with session.post(azure, json=chat(), headers={"api-key": "k"}) as r:
            assert r.status == 404
        emb = sim.base_url + "/openai/deployments/emb/embeddings?api-version=2024-06-01"
        async with session.post(emb, json={"input": "x"}, headers={"api-key": "k"}) as r:
            assert (await r.json())["model"] == "emb"
        auth = {"Authorization": "Bearer k"}
        paradigm = sim.base_url + "/api/v2"
        async with session.post(paradigm + "/chat/completions", json=chat("pd"), headers=auth) as r:
            assert (await r.json())["choices"][0]["message"]["content"] == "echo: pd"
        async with session.post(paradigm + "/embeddings", json={"input": ["a"]}, headers=auth) as r:
            assert len((await r.json())["data"]) == 1
        async with session.get(paradigm + "/models", headers=auth) as r:
            assert "sim-1" in [m["id"] for m in (await r.json())["data"]]


async def test_embeddings_shape_determinism_and_encodings() -> None:
    async with server(embedding_dim=16, max_batch=3) as (sim, session):
        url = sim.url + "/embeddings"
        async with session.post(url, json={"model": "e", "input": ["alpha", "beta", "alpha"]}) as r:
            data = await r.json()
        vectors = [d["embedding"] for d in data["data"]]
        assert [d["index"] for d in data["data"]] == [0, 1, 2]
        assert all(len(v) == 16 for v in vectors)
        assert vectors[0] == vectors[2] != vectors[1]
        assert vectors[0] == pytest.approx(embedding_for("alpha", 16))
        assert math.isclose(sum(x * x for x in vectors[1]), 1.0)
        assert data["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
        async with session.post(
            url, json={"input": "alpha", "encoding_format": "base64", "dimensions": 4}
        ) as r:
            raw = base64.b64decode((await r.json())["data"][0]["embedding"])
        assert list(struct.unpack("<4f", raw)) == pytest.approx(embedding_for("alpha", 4), rel=1e-6)
        async with session.post(url, json={"input": [[1, 2, 3], [4, 5]]}) as r:
            assert len((await r.json())["data"]) == 2
        for bad in (
            {"input": ["a"] * 4},
            {"input": []},
            {"input": [1, "a"]},
            {"input": "a", "dimensions": 0},
        ):
            async with session.post(url, json=bad) as r:
                assert r.status == 400, bad
                assert (await r.json())["error"]["type"] == "invalid_request_error"


async def test_bad_requests_get_400_with_openai_error() -> None:
    async with server() as (sim, session):
        url = sim.url + "/chat/completions"
        async with session.post(
            url, data=b"{not json", headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 400
            assert "could not parse the JSON body" in (await r.json())["error"]["message"]
        for bad in ({"messages": []}, {"messages": "hi"}, chat(max_tokens=0), [1]):
            async with session.post(url, json=bad) as r:
                assert r.status == 400, bad


async def test_models_endpoint() -> None:
    async with server(model="my-model") as (sim, session), session.get(sim.url + "/models") as r:
        data = await r.json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["my-model", "sim-embed-1"]


# --------------------------------------------------------------------------------------------
# Quotas


async def test_burst_past_rpm_gets_429_with_retry_after_and_ratelimit_headers() -> None:
    # rpm=6 refills one request every 10 s: the first passes, the next ones are refused
    async with server(rpm=6) as (sim, session):
        statuses, headers = [], []
        for _ in range(4):
            async with session.post(sim.url + "/chat/completions", json=chat()) as r:
                statuses.append(r.status)
                headers.append(r.headers)
                body = await r.json()
        counters = sim.counters()
    assert statuses == [200, 429, 429, 429]
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert headers[0]["x-ratelimit-limit-requests"] == "6"
    assert headers[0]["x-ratelimit-remaining-requests"] == "0"
    assert headers[0]["x-ratelimit-reset-requests"].endswith("s")
    assert int(headers[1]["retry-after"]) in (9, 10)
    assert 8_000 <= int(headers[1]["retry-after-ms"]) <= 10_000
    assert "x-ratelimit-limit-tokens" not in headers[0]
    assert (counters["throttled"], counters["http_429"]) == (3, 3)


async def test_tpm_refuses_when_tokens_run_out() -> None:
    async with server(tpm=600) as (sim, session):  # 10 tokens/s, bucket of 10
        long = " ".join(["word"] * 20)
        async with session.post(sim.url + "/chat/completions", json=chat(long)) as r:
            assert r.status == 200
            assert r.headers["x-ratelimit-remaining-tokens"] == "0"
        async with session.post(sim.url + "/chat/completions", json=chat(long)) as r:
            assert r.status == 429
            assert "tokens" in (await r.json())["error"]["message"]
            assert int(r.headers["retry-after"]) >= 2


@asynccontextmanager
async def served(sim: Simulator) -> AsyncIterator[str]:
    runner = web.AppRunner(sim.make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


async def test_token_bucket_refills_continuously() -> None:
    now = [100.0]
    sim = Simulator(SimConfig(rpm=60, burst_s=2), clock=lambda: now[0])  # 1/s, holds 2
    async with served(sim) as url, aiohttp.ClientSession() as session:

        async def post() -> tuple[int, Any]:
            async with session.post(url + "/chat/completions", json=chat()) as r:
                await r.read()
                return r.status, r.headers

        assert (await post())[0] == 200
        status, headers = await post()
        assert (status, headers["x-ratelimit-remaining-requests"]) == (200, "0")
        assert headers["x-ratelimit-reset-requests"] == "2s"
        status, headers = await post()
        assert (status, headers["retry-after-ms"], headers["retry-after"]) == (429, "1000", "1")
        now[0] += 0.5
        status, headers = await post()
        assert (status, headers["retry-after-ms"]) == (429, "500")
        now[0] += 0.5
        assert (await post())[0] == 200
        now[0] += 60  # refills up to the burst only
        assert [(await post())[0] for _ in range(3)] == [200, 200, 429]


# --------------------------------------------------------------------------------------------
# Determinism, counters, live config


async def fault_trace(session: aiohttp.ClientSession, url: str, n: int) -> list[tuple[int, str]]:
    trace = []
    for i in range(n):
        async with session.post(url + "/chat/completions", json=chat(f"req {i}")) as r:
            await r.read()
            trace.append((r.status, r.content_type))
    return trace


async def test_same_seed_and_order_give_the_same_faults() -> None:
    faults = {"error_5xx": 0.2, "error_429": 0.2, "non_json": 0.2, "quota_429": 0.1}
    async with server(seed=7, **faults) as (sim, session):
        first = await fault_trace(session, sim.url, 30)
        async with session.post(sim.base_url + "/sim/reset") as r:
            assert (await r.json())["requests"] == 0
        second = await fault_trace(session, sim.url, 30)
        counted = sim.counters()["faults"]
    assert first == second
    assert len(set(first)) >= 4  # a real mix of outcomes
    assert sum(counted.values()) == sum(
        1 for status, kind in first if status != 200 or kind == "text/html"
    )
    async with server(seed=8, **faults) as (sim, session):
        assert await fault_trace(session, sim.url, 30) != first


async def test_counters_over_http_and_python_and_reset() -> None:
    async with server(latency_ms=300) as (sim, session):
        url = sim.url + "/chat/completions"

        async def one() -> None:
            async with session.post(url, json=chat("abcdefgh")) as r:
                await r.read()

        await asyncio.gather(*(one() for _ in range(5)))
        async with session.post(sim.url + "/embeddings", json={"input": "abcd"}) as r:
            await r.read()
        async with session.get(sim.base_url + "/sim/counters") as r:
            over_http = await r.json()
        local = sim.counters()
        assert over_http == local
        assert local["requests"] == 6
        assert local["by_route"] == {
            "/v1/chat/completions": {"200": 5},
            "/v1/embeddings": {"200": 1},
        }
        assert local["concurrent_max"] == 5 and local["concurrent"] == 0
        assert local["prompt_tokens"] == 5 * 2 + 1
        assert local["completion_tokens"] == 5 * tokens("echo: abcdefgh")
        assert local["timestamps"]["peak_rps"] >= 1 and local["timestamps"]["peak_rpm"] == 6
        assert local["timestamps"]["first_s"] <= local["timestamps"]["last_s"]
        async with session.post(sim.base_url + "/sim/reset") as r:
            zeroed = await r.json()
        assert zeroed["requests"] == 0 and zeroed["by_route"] == {} and zeroed["prompt_tokens"] == 0


async def test_config_replaced_live_over_http() -> None:
    async with server() as (sim, session):
        async with session.post(sim.base_url + "/sim/config", json={"error_5xx": 1.0}) as r:
            assert (await r.json())["error_5xx"] == 1.0
        async with session.post(sim.url + "/chat/completions", json=chat()) as r:
            assert r.status >= 500
        async with session.post(sim.base_url + "/sim/config", json={"bogus": 1}) as r:
            assert r.status == 400
            assert "unknown SimConfig field(s) bogus" in (await r.json())["error"]["message"]
        async with session.post(sim.base_url + "/sim/config", json={"reset": 2}) as r:
            assert r.status == 400
        assert sim.config == SimConfig(error_5xx=1.0)
        async with session.post(sim.base_url + "/sim/config", json={}) as r:
            assert r.status == 200
        async with session.post(sim.url + "/chat/completions", json=chat()) as r:
            assert r.status == 200


# --------------------------------------------------------------------------------------------
# Config, helpers, the openai SDK, the command line


def test_sim_config_validation_and_readable_repr() -> None:
    assert repr(SimConfig()) == "SimConfig()"
    assert repr(SimConfig(rpm=60, error_5xx=0.1)) == "SimConfig(rpm=60, error_5xx=0.1)"
    assert SimConfig(latency_ms=5).latency_ms == 5.0
    for bad in (
        {"error_5xx": 1.5},
        {"error_5xx": 0.6, "reset": 0.6},
        {"latency_ms": -1},
        {"rpm": 0},
        {"rpm": 1.5},
        {"burst_s": 0},
        {"model": 3},
        {"stall": True},
    ):
        with pytest.raises(ConfigError):
            SimConfig(**bad)
    with pytest.raises(ConfigError, match="unknown SimConfig field"):
        SimConfig.from_dict({"rpm": 1, "nope": 2})
    assert SimConfig.from_dict(SimConfig(rpm=5).to_dict()) == SimConfig(rpm=5)


def test_format_duration_matches_openai_style() -> None:
    assert format_duration(0) == "0s"
    assert format_duration(0.12) == "120ms"
    assert format_duration(0.0004) == "1ms"
    assert format_duration(1) == "1s"
    assert format_duration(1.5) == "1.5s"
    assert format_duration(360) == "6m0s"
    assert format_duration(90.25) == "1m30.25s"
    assert format_duration(3723) == "1h2m3s"


def test_url_before_serving_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not serving"):
        _ = Simulator().url


async def test_openai_sdk_talks_to_the_simulator() -> None:
    openai = pytest.importorskip("openai")
    async with serve(SimConfig(require_key="sk-test")) as sim:
        client = openai.AsyncOpenAI(base_url=sim.url, api_key="sk-test", max_retries=0)
        async with client:
            completion = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "sdk"}]
            )
            assert completion.choices[0].message.content == "echo: sdk"
            assert completion.usage is not None and completion.usage.completion_tokens == 2
            stream = await client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "a b"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            parts, usage = [], None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                usage = chunk.usage or usage
            assert "".join(parts) == "echo: a b" and usage is not None
            embedded = await client.embeddings.create(model="e", input=["x", "y"])
            assert [len(d.embedding) for d in embedded.data] == [8, 8]
            assert embedded.data[0].embedding == pytest.approx(embedding_for("x", 8), rel=1e-6)


def test_main_rejects_bad_flags() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--error-5xx", "2"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit):
        main(["--rpm", "lots"])


async def test_main_serves_until_interrupted() -> None:
    code = "import sys; from pipeline.testing._sim import main; sys.exit(main(sys.argv[1:]))"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        *("--port", "0", "--error-429", "1", "--rpm", "100"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        words = line.split()
        url = words[words.index("on") + 1]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        assert "error_429=1.0" in line and "rpm=100" in line
        async with (
            aiohttp.ClientSession() as session,
            session.post(url + "/chat/completions", json=chat()) as r,
        ):
            assert r.status == 429
            assert r.headers["x-ratelimit-limit-requests"] == "100"
        proc.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, stderr.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_client_leaving_mid_stream_is_counted_not_logged_as_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    async with server(tokens_per_s=100) as (sim, session):
        body = chat(" ".join(["word"] * 200), stream=True)
        async with session.post(sim.url + "/chat/completions", json=body) as r:
            assert (await asyncio.wait_for(r.content.readany(), 5)).startswith(b"data: ")
            r.close()
    # leaving serve() waited for the handler, which found the connection gone on its next write
    assert sim.counters()["by_route"]["/v1/chat/completions"] == {"disconnected": 1}
    assert not [rec for rec in caplog.records if rec.name.startswith("aiohttp")]


async def test_an_endpoint_family_is_one_register_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new family plugs in by its register(core, router): numbered and counted like the rest."""
    import pipeline.testing._sim._server as sim_server
    from pipeline.testing._sim._core import SimCore

    def register_numbers(core: SimCore, router: web.UrlDispatcher) -> None:
        async def number(request: web.Request, n: int) -> web.StreamResponse:
            return web.json_response({"n": n, "model": core.config.model})

        core.route(router, "GET", "/v1/number", number)

    monkeypatch.setattr(
        sim_server, "ENDPOINT_FAMILIES", (*sim_server.ENDPOINT_FAMILIES, register_numbers)
    )
    async with server(model="m-9") as (sim, session):
        async with session.post(sim.url + "/chat/completions", json=chat()) as r:
            assert r.status == 200
        async with session.get(sim.url + "/number") as r:
            assert await r.json() == {"n": 1, "model": "m-9"}
    counters = sim.counters()
    assert counters["requests"] == 2
    assert counters["by_route"]["/v1/number"] == {"200": 1}
