"""Specification of an attempt's total-time limit (one loop timer for all attempts).

The unit tests drive :class:`~stages.llm._deadline.Deadlines` directly; the end-to-end ones
send rows through the caller to a real HTTP server on 127.0.0.1 that never answers some of them
or drips an event stream past the limit, with the shared timer and with aiohttp's own (what
Python 3.10 uses).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from aiohttp import web
from test_caller_hostile import hostile

import stages.llm._transport as transport_module
from pipeline import Pipeline
from stages.llm._caller import HTTP, LLMCaller, Output, Retry
from stages.llm._deadline import Deadlines


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


pytestmark = pytest.mark.anyio


def _cancelling() -> int:
    task = asyncio.current_task()
    assert task is not None
    return task.cancelling()


# -- the timer ----------------------------------------------------------------------------------


async def test_an_attempt_past_its_deadline_raises_timeout_error_and_leaves_nothing_pending() -> (
    None
):
    deadlines = Deadlines(0.05)
    with pytest.raises(TimeoutError, match=r"more than 0\.05s"), deadlines.attempt():
        await anyio.sleep(30)
    assert deadlines.in_flight == 0 and _cancelling() == 0
    await anyio.lowlevel.checkpoint()  # no cancellation is left to hit the task at its next await


async def test_attempts_that_end_in_time_are_never_cancelled_after_their_deadline() -> None:
    deadlines = Deadlines(0.5)  # far more than three turns of the loop take, even loaded
    for _ in range(3):
        with deadlines.attempt():
            await anyio.lowlevel.checkpoint()
    assert deadlines.in_flight == 0
    await anyio.sleep(0.6)  # past every deadline: the armed timer finds nothing to cancel
    assert _cancelling() == 0
    deadlines.close()


async def test_only_the_attempts_past_their_deadline_time_out_among_many() -> None:
    deadlines = Deadlines(0.5)  # the released attempts end long before it, even loaded
    release = [anyio.Event() for _ in range(6)]
    outcome: dict[int, str] = {}

    async def attempt(index: int) -> None:
        try:
            with deadlines.attempt():
                await release[index].wait()
            outcome[index] = "ended"
        except TimeoutError:
            outcome[index] = "timed out"

    async with anyio.create_task_group() as tg:
        for index in range(6):
            tg.start_soon(attempt, index)
        await anyio.lowlevel.checkpoint()  # every attempt has entered
        assert deadlines.in_flight == 6
        for index in (0, 2, 3):
            release[index].set()
    ended, timed_out = "ended", "timed out"
    assert outcome == {0: ended, 1: timed_out, 2: ended, 3: ended, 4: timed_out, 5: timed_out}
    assert deadlines.in_flight == 0


async def test_a_later_attempt_gets_its_own_full_time() -> None:
    deadlines = Deadlines(1.0)
    with deadlines.attempt() as first:
        await anyio.sleep(0.5)  # the first attempt keeps the timer armed for its deadline
    with deadlines.attempt():  # starts 0.5 s later: the timer re-arms for its own deadline
        loop = asyncio.get_running_loop()
        await anyio.sleep(first.deadline - loop.time() + 0.05)  # past the first one's deadline
    assert _cancelling() == 0
    deadlines.close()


async def test_a_cancellation_from_outside_stays_a_cancellation_when_the_deadline_also_passed() -> (
    None
):
    deadlines = Deadlines(0.01)
    reached = False
    with anyio.CancelScope() as scope:
        with deadlines.attempt() as attempt:
            time.sleep(0.02)  # noqa: ASYNC251 - the deadline passes without a turn of the loop
            scope.cancel()  # and the run stops: both cancellations are due at the next await
            await asyncio.sleep(1)
        reached = True  # pragma: no cover - the scope's cancellation must end the block
    assert attempt.expired  # the timer did cancel the attempt too
    assert scope.cancelled_caught and not reached
    assert _cancelling() == 0 and deadlines.in_flight == 0


async def test_a_cancellation_swallowed_inside_the_attempt_is_taken_back() -> None:
    deadlines = Deadlines(0.01)
    # a careless hook swallows the cancellation: the attempt ends normally
    with deadlines.attempt(), contextlib.suppress(asyncio.CancelledError):
        await anyio.sleep(30)
    assert _cancelling() == 0
    await anyio.lowlevel.checkpoint()


# -- end to end: the caller's requests -------------------------------------------------------


@asynccontextmanager
async def _server(stream_every: float | None = None) -> AsyncIterator[str]:
    """Answer a row named ``fast`` at once; keep every other row waiting (or dripping events)."""
    release = anyio.Event()

    async def handler(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if "fast" in body["messages"][-1]["content"]:
            return web.json_response(
                {"choices": [{"message": {"role": "assistant", "content": "ok"}}]}
            )
        if stream_every is None:
            await release.wait()  # never answers while the test runs
            return web.Response(status=503)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while not release.is_set():  # one event per tick, never the end of the stream
            chunk = {"choices": [{"index": 0, "delta": {"content": "."}}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            with anyio.move_on_after(stream_every):
                await release.wait()
        return response

    async with hostile(handler) as (url, _):
        try:
            yield url
        finally:
            release.set()  # the held requests end before the server shuts down


async def _run(caller: LLMCaller, rows: list[dict[str, Any]]) -> tuple[list[Any], Any]:
    out: list[Any] = []
    with anyio.fail_after(20):  # a hang guard: without the limit the slow rows never end
        async with Pipeline(rows, caller).open() as results:
            out = [value async for value in results]
    assert results.report is not None and results.report.balanced
    return out, results.report


ROWS = [{"name": "fast 1"}, {"name": "slow"}, {"name": "fast 2"}]


@pytest.mark.parametrize("shared", [True, False], ids=["one timer", "aiohttp's timer"])
async def test_a_request_past_the_timeout_is_retried_then_dead_lettered(
    monkeypatch: pytest.MonkeyPatch, shared: bool
) -> None:
    monkeypatch.setattr(transport_module, "SHARED_DEADLINES", shared)
    async with _server() as url:
        caller = LLMCaller(
            model="m",
            prompt="{name}",
            base_url=url,
            http=HTTP(timeout=1.0),  # the fast rows need far less, even loaded
            retry=Retry(backoff_base=0.01, backoff_cap=0.02, max_retries=1),
        )
        results, report = await _run(caller, ROWS)
    assert [row["name"] for row in results] == ["fast 1", "fast 2"]
    (failure,) = report.failures
    assert failure.attempts == 2
    assert failure.message == "gave up after 2 attempt(s): request timed out after 1s"


async def test_a_stream_that_keeps_dripping_is_cut_at_the_total_timeout() -> None:
    async with _server(stream_every=0.02) as url:
        caller = LLMCaller(
            model="m",
            prompt="{name}",
            base_url=url,
            output=Output(stream=True),
            http=HTTP(timeout=1.0, idle_timeout=5),  # never idle: only the total time ends it
            retry=Retry(max_retries=0),
        )
        results, report = await _run(caller, ROWS)
    assert [row["name"] for row in results] == ["fast 1", "fast 2"]
    (failure,) = report.failures
    assert failure.message.endswith("request timed out after 1s")
    assert failure.attempts == 1
