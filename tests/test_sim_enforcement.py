"""Specification of the simulator's enforcement modes (issue 13), on a real socket.

The simulator's clock is a fake one that only moves when a test says, so the buckets are
exactly what the assertions expect.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pipeline.testing._sim import SimConfig, Simulator

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp is asyncio-only


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def server(clock: Clock, **config: Any) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    sim = Simulator(SimConfig(**config), clock=clock)
    runner = web.AppRunner(sim.make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            yield f"http://127.0.0.1:{port}", session
    finally:
        await runner.cleanup()


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there world"}]}


async def post(session: aiohttp.ClientSession, url: str, path: str = "/v1/chat/completions"):
    body = CHAT if "chat" in path else {**CHAT, "max_tokens": 50}
    async with session.post(url + path, json=body, headers={"x-api-key": "k"}) as response:
        await response.read()
        return response.status, dict(response.headers)


async def test_full_minute_bucket_lets_a_fresh_key_use_its_minute_at_once() -> None:
    async with server(Clock(), rpm=600, burst_s=60) as (url, session):
        statuses = [(await post(session, url))[0] for _ in range(601)]
    assert statuses == [200] * 600 + [429]


async def test_short_window_refuses_while_headers_report_the_minute() -> None:
    clock = Clock()
    async with server(clock, rpm=600, burst_s=60, window_s=1) as (url, session):
        answers = [await post(session, url) for _ in range(11)]
        statuses = [status for status, _ in answers]
        assert statuses == [200] * 10 + [429]  # 10 a second
        _, headers = answers[-1]
        assert int(headers["x-ratelimit-remaining-requests"]) == 590  # the minute has room
        assert float(headers["retry-after-ms"]) == pytest.approx(100, abs=1)
        clock.now = 0.1  # one more has flowed into the short window
        assert (await post(session, url))[0] == 200


async def test_separate_input_and_output_token_limits() -> None:
    clock = Clock()
    # each answer: 4 prompt tokens ("hello there world" + nothing else), a few output tokens
    async with server(clock, itpm=600, otpm=60, burst_s=1) as (url, session):
        status, headers = await post(session, url, "/v1/messages")
        assert status == 200
        assert headers["anthropic-ratelimit-input-tokens-limit"] == "600"
        assert headers["anthropic-ratelimit-output-tokens-limit"] == "60"
        assert int(headers["anthropic-ratelimit-output-tokens-remaining"]) == 0  # 1 s of 60/min
        status, headers = await post(session, url, "/v1/messages")
        assert status == 429  # output tokens, not requests or input, ran out
        assert int(headers["anthropic-ratelimit-input-tokens-remaining"]) > 0


async def test_isolated_429_shows_the_capacity_left() -> None:
    async with server(Clock(), rpm=600, burst_s=60, error_429=1.0) as (url, session):
        status, headers = await post(session, url)
    assert status == 429
    assert int(headers["x-ratelimit-remaining-requests"]) == 599
    assert headers["retry-after-ms"] == "1000"


async def test_spend_is_counted_at_the_configured_prices() -> None:
    sim = Simulator(SimConfig(price_prompt=2.0, price_completion=8.0), clock=Clock())
    runner = web.AppRunner(sim.make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                assert (await post(session, url))[0] == 200
    finally:
        await runner.cleanup()
    counters = sim.counters()
    expected = (counters["prompt_tokens"] * 2.0 + counters["completion_tokens"] * 8.0) / 1e6
    assert counters["spent_usd"] == pytest.approx(expected) and expected > 0
    assert counters["per_second"] == [[0, 3]]
