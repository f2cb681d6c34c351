"""Scale-out proof: four OS processes share one rate limit through a real ``redis-server``.

Each process runs a pipeline whose :class:`~stages.llm._caller.LLMCaller` takes its turns from a
:class:`~stages.llm._redis_limiter.RedisRateLimiter` at ``R`` requests per minute; all four call
ONE simulated server (in this test's process) that enforces the same ``R`` with a small bucket
and answers 429 to anything beyond it. Together they must stay at or below ``R`` (no 429, and
no more requests in the measured window than the limit allows) and reach at least 0.9 ``R``.

The end-to-end Redis loss tests run one pipeline in this process and kill ``redis-server``
under it: the run stops with a clear error, or goes on at the configured share of the limit.

Run as a script, this module is one worker process::

    python tests/test_scale_redis.py SIM_URL REDIS_URL RPM ROWS WORKER

It prints ``ready`` once connected, waits for a line on stdin, runs the pipeline over ROWS
rows and prints its report as one JSON line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # a worker process: import the project from this checkout
    sys.path.insert(0, str(ROOT))

from pipeline import Pipeline  # noqa: E402
from pipeline._functions import map as pipeline_map  # noqa: E402
from pipeline.testing._sim import SimConfig, Simulator, serve  # noqa: E402
from stages.llm._caller import HTTP, Limits, LLMCaller, Retry  # noqa: E402
from stages.llm._redis_limiter import RedisRateLimiter, RedisUnavailableError  # noqa: E402

KEY_ENV = "SCALE_TEST_API_KEY"
SECRET = "sk-scale-test-0123456789"
MODEL = "sim-scale"


def _caller(sim_url: str, limiter: RedisRateLimiter) -> LLMCaller:
    return LLMCaller(
        model=MODEL,
        prompt="row {i} of worker {w}",
        base_url=sim_url,
        http=HTTP(api_key_env=KEY_ENV),
        limits=Limits(limiter=limiter, max_concurrency=16),
        retry=Retry(max_retries=2, backoff_base=0.05),
    )


def _limiter(redis_url: str, rpm: float, **options: Any) -> RedisRateLimiter:
    return RedisRateLimiter.from_url(
        redis_url,
        rpm=rpm,
        provider="openai",
        api_key=SECRET,
        model=MODEL,
        burst_s=0.1,  # a bucket of 2 at 20/s: well inside the server's bucket of 10
        **options,
    )


async def _worker(sim_url: str, redis_url: str, rpm: float, rows: int, worker: int) -> None:
    limiter = _limiter(redis_url, rpm)
    caller = _caller(sim_url, limiter)
    async with limiter:
        await limiter._client.ping()  # connect before the start signal
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        report = await Pipeline(caller, name=f"worker-{worker}").run(
            [{"i": i, "w": worker} for i in range(rows)]
        )
    llm = next(s for s in report.stages if s.name == "llm")
    print(
        json.dumps(
            {
                "ok": report.ok,
                "failed": report.failed,
                "retries": llm.retries,
                "rate_limited": caller.totals.rate_limited,
                "limiter_acquired": limiter.statistics().acquired,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    os.environ.setdefault(KEY_ENV, SECRET)
    anyio.run(
        _worker,
        sys.argv[1],
        sys.argv[2],
        float(sys.argv[3]),
        int(sys.argv[4]),
        int(sys.argv[5]),
    )
    sys.exit(0)


# ------------------------------------------------------------------------------------ tests

from anyio.abc import Process  # noqa: E402
from anyio.streams.buffered import BufferedByteReceiveStream  # noqa: E402
from redis_server import RedisServer, redis_server_binary  # noqa: E402

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        redis_server_binary() is None,
        reason="redis-server is not installed (apt-get install redis-server)",
    ),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp and redis-py's asyncio client


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with serve(SimConfig(rpm=1200, burst_s=0.5, latency_ms=20, require_key=SECRET)) as s:
        yield s


async def _line(reader: BufferedByteReceiveStream) -> bytes:
    return await reader.receive_until(b"\n", 65536)


async def test_four_processes_through_the_caller_share_one_limit(
    sim: Simulator, api_key: str
) -> None:
    rpm, processes_n, rows = 1200, 4, 50
    rate = rpm / 60.0  # 20/s, so 200 rows take about 10 s
    caller_bucket = 2  # the limiters' burst: 0.1 s at 20/s
    total = processes_n * rows
    env = {**os.environ, "PYTHONPATH": str(ROOT), KEY_ENV: api_key}
    processes: list[Process] = []
    reports: list[dict[str, Any]] = []
    with RedisServer() as redis:
        try:
            with anyio.fail_after(45):
                for worker in range(processes_n):
                    command = [
                        sys.executable,
                        __file__,
                        sim.url,
                        redis.url,
                        str(rpm),
                        str(rows),
                        str(worker),
                    ]
                    processes.append(await anyio.open_process(command, env=env))
                readers = [BufferedByteReceiveStream(p.stdout) for p in processes]  # type: ignore[arg-type]
                for reader in readers:
                    assert await _line(reader) == b"ready"
                sim.reset()  # measure from the start signal on
                for process in processes:
                    assert process.stdin is not None
                    await process.stdin.send(b"go\n")

                async def collect(reader: BufferedByteReceiveStream) -> None:
                    reports.append(json.loads(await _line(reader)))

                async with anyio.create_task_group() as tg:
                    for reader in readers:
                        tg.start_soon(collect, reader)
                for process in processes:
                    assert await process.wait() == 0
        finally:
            for process in processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                await process.aclose()

    # every row answered once, nobody was refused or retried
    assert [(r["ok"], r["failed"], r["retries"], r["rate_limited"]) for r in reports] == [
        (rows, 0, 0, 0)
    ] * processes_n
    counters = sim.counters()
    assert counters["requests"] == total
    assert counters["http_429"] == 0
    assert counters["throttled"] == 0
    assert counters["by_route"] == {"/v1/chat/completions": {"200": total}}

    # at or below R over the measured window, as the server saw it...
    stamps = counters["timestamps"]
    window = stamps["last_s"] - stamps["first_s"]
    assert window > 8.0, window  # the limit bound the run: 200 rows at 20/s
    allowed = caller_bucket + rate * window
    assert total <= allowed + 2, (total, allowed)
    # ...in every whole second too (a second that holds the start may hold the burst)
    assert stamps["peak_rps"] <= rate + caller_bucket + 2, stamps["peak_rps"]
    # ...and at least 0.9 R
    achieved = (total - 1) / window
    print(f"4 processes: {total} requests in {window:.2f} s = {achieved * 60:.0f}/min of {rpm}")
    assert achieved >= 0.9 * rate, (achieved, rate)


async def test_the_caller_tells_the_shared_limiter_when_each_request_ends(
    sim: Simulator, api_key: str
) -> None:
    """Other processes lower a header's ``remaining`` by the requests ticketed before it and
    not ended: each must be reported ended, or it would count as late for two minutes."""
    from redis.asyncio import Redis

    rows = 40
    with RedisServer() as redis:
        limiter = _limiter(redis.url, 6000)
        async with limiter:
            report = await Pipeline(_caller(sim.url, limiter)).run(
                [{"i": i, "w": 0} for i in range(rows)]
            )
        assert report.ok == rows
        client = Redis.from_url(redis.url)
        try:
            assert await client.zcard(f"{limiter.key}:open") == 0
            ended = await client.zrange(f"{limiter.key}:ended", 0, -1)
        finally:
            await client.aclose()
    requests = sim.counters()["requests"]  # retries included: each takes a turn of its own
    assert requests >= rows
    assert sorted(int(member.split()[0]) for member in ended) == list(range(1, requests + 1))


async def test_redis_lost_mid_job_stops_the_run_with_a_clear_error(
    sim: Simulator, api_key: str
) -> None:
    with RedisServer(password="hunter2-redis") as redis:
        limiter = _limiter(redis.url, 1200)
        caller = _caller(sim.url, limiter)
        seen = 0

        async def rows() -> AsyncIterator[dict[str, int]]:
            nonlocal seen
            for i in range(10_000):
                if i == 30:
                    redis.kill()  # as a crash of the Redis host would
                seen += 1
                yield {"i": i, "w": 0}

        async with limiter:
            with anyio.fail_after(20), pytest.raises(RedisUnavailableError) as info:
                await Pipeline(caller).run(rows())
    message = str(info.value)
    assert "unreachable" in message and "without a limit" in message
    assert f"127.0.0.1:{redis.port}" in message
    assert "hunter2-redis" not in message and SECRET not in message
    # the run stopped: no unlimited burst of the 10 000 rows after Redis went away
    assert sim.counters()["requests"] < 60
    assert sim.counters()["http_429"] == 0


async def test_redis_lost_mid_job_goes_on_at_the_configured_share(
    sim: Simulator, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    rows_n, share, rpm = 70, 0.5, 1200
    rate, local_rate = rpm / 60, rpm * share / 60  # 20/s shared, 10/s alone
    with RedisServer() as redis:
        limiter = _limiter(redis.url, rpm, fallback="local", fallback_share=share)
        caller = _caller(sim.url, limiter)
        answered = 0

        def kill_after_ten(row: dict[str, Any]) -> dict[str, Any]:
            nonlocal answered
            answered += 1
            if answered == 10:
                redis.kill()  # as a crash of the Redis host would
            return row

        async with limiter:
            with anyio.fail_after(20), caplog.at_level(logging.WARNING, "pipeline.redis_limiter"):
                report = await Pipeline(caller, pipeline_map(kill_after_ten)).run(
                    {"i": i, "w": 0} for i in range(rows_n)
                )
    assert (report.ok, report.failed) == (rows_n, 0)
    assert limiter.fallen_back
    assert limiter.statistics().rpm == rpm * share
    warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1 and "50%" in warnings[0], warnings
    counters = sim.counters()
    assert counters["requests"] == rows_n and counters["http_429"] == 0
    # Never an unlimited burst: the turns already reserved in Redis went at 20/s, the local
    # limiter only after them at 10/s, so no second saw more than the shared limit...
    stamps = counters["timestamps"]
    assert stamps["peak_rps"] <= rate + 2 + 2, counters
    # ...and the rows granted locally were spaced at the share.
    assert limiter._local is not None
    local = limiter._local.statistics().acquired
    assert local >= 20
    assert stamps["last_s"] - stamps["first_s"] >= (local - 1 - 1) / local_rate
