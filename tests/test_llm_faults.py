"""Specification of the LLM caller under faults, end to end through real sockets.

Every fault the simulator injects is retried or refused as the provider facts say; every row is
accounted for (answered or dead-lettered, never lost); the API key never leaks.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from aiohttp import web

from pipeline import Pipeline
from pipeline._errors import QuotaExhaustedError
from pipeline._report import RunReport
from pipeline.testing._sim import SimConfig, serve
from stages.llm._caller import (
    HTTP,
    AuthenticationError,
    Completion,
    Limits,
    LLMCaller,
    Output,
    Retry,
)
from stages.llm._limits import RateLimiter

KEY = "sk-test-DISTINCTIVE-c0ffee-42"
ROWS = [{"name": f"user{i}"} for i in range(24)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)


FAST_RETRY = Retry(backoff_base=0.005, backoff_cap=0.02, max_retries=8)


def _caller(url: str, **kwargs: Any) -> LLMCaller:
    settings: dict[str, Any] = {
        "model": "sim-1",
        "prompt": "Say hello to {name}",
        "base_url": url,
        "retry": FAST_RETRY,
    }
    settings.update(kwargs)
    return LLMCaller(**settings)


async def _run(
    caller: LLMCaller, rows: Sequence[Any] = ROWS, limit: float = 15, ordered: bool = True
) -> tuple[list[Any], RunReport]:
    out: list[Any] = []
    with anyio.fail_after(limit):
        async with Pipeline(rows, caller, ordered=ordered).open() as results:
            async for value in results:
                out.append(value)
    assert results.report is not None
    assert results.report.balanced
    return out, results.report


def _expected(rows: Sequence[dict[str, Any]] = ROWS) -> list[str]:
    return [f"echo: Say hello to {row['name']}" for row in rows]


# -- transient faults are retried until every row is answered ------------------------------------


@pytest.mark.parametrize(
    ("fault", "stream"),
    [
        ("error_5xx", False),
        ("reset", False),
        ("non_json", False),
        ("truncate", False),
        ("malformed", False),
        ("truncate", True),
        ("malformed", True),
        ("stream_error", True),
    ],
)
async def test_transient_fault_is_retried_and_every_row_answered(fault: str, stream: bool) -> None:
    config = SimConfig(seed=3, **{fault: 0.3})
    async with serve(config) as sim:
        caller = _caller(sim.url, output=Output(form="completion", stream=stream))
        results, report = await _run(caller)
        counters = sim.counters()
    injected = counters["faults"].get(fault, 0)
    assert injected >= 3  # the fault really happened
    assert [r.text for r in results] == _expected()  # full answers only, never a partial one
    stats = report.stages[1]
    assert stats.retries == injected == counters["requests"] - len(ROWS)
    assert stats.requests == counters["requests"]
    assert sum(r.attempts for r in results) == counters["requests"]
    assert report.failures == []


async def test_truncated_stream_is_never_accepted_even_with_a_finish_reason_missing() -> None:
    # every stream is cut: no row may be accepted, each is dead-lettered after its attempts
    async with serve(SimConfig(truncate=1.0)) as sim:
        caller = _caller(
            sim.url,
            output=Output(stream=True),
            retry=dataclasses.replace(FAST_RETRY, max_retries=2),
        )
        results, report = await _run(caller, ROWS[:3])
    assert results == []
    assert [f.attempts for f in report.failures] == [3, 3, 3]
    assert all("TruncatedStreamError" in f.message for f in report.failures)
    assert report.failures[0].message.startswith("gave up after 3 attempt(s): stream failed")


async def test_stalled_stream_is_aborted_by_the_idle_timeout_and_retried() -> None:
    async with serve(SimConfig(stall=0.3, stall_s=30, seed=1, tokens_per_s=5000)) as sim:
        caller = _caller(
            sim.url, output=Output(form="completion", stream=True), http=HTTP(idle_timeout=0.2)
        )
        # a hang guard, not a speed check: without the idle timeout the first stall alone
        # would hold its row for the 30 s the server keeps the stream open
        with anyio.fail_after(25):
            results, report = await _run(caller, ROWS[:12])
        stalls = sim.counters()["faults"].get("stall", 0)
    assert stalls >= 2
    assert [r.text for r in results] == _expected(ROWS[:12])
    assert report.stages[1].retries == stalls


async def test_stalled_plain_body_is_aborted_by_the_idle_timeout() -> None:
    async with serve(SimConfig(stall=0.3, stall_s=30, seed=1)) as sim:
        caller = _caller(sim.url, http=HTTP(idle_timeout=0.2))
        results, report = await _run(caller, ROWS[:12])
        stalls = sim.counters()["faults"].get("stall", 0)
    assert stalls >= 2 and report.stages[1].retries == stalls
    assert [r["response"] for r in results] == _expected(ROWS[:12])


async def test_anthropic_529_overloaded_is_retried_and_shrinks_concurrency() -> None:
    async with serve(SimConfig(overloaded=0.3, seed=5)) as sim:
        caller = _caller(sim.base_url + "/v1", provider="anthropic", model="claude")
        results, report = await _run(caller)
        overloaded = sim.counters()["faults"].get("overloaded", 0)
    assert overloaded >= 3
    assert [r["response"] for r in results] == _expected()
    assert report.stages[1].retries == overloaded
    assert caller.totals.rate_limited == overloaded


async def test_anthropic_mid_stream_error_event_is_retried() -> None:
    async with serve(SimConfig(stream_error=0.3, seed=2)) as sim:
        caller = _caller(
            sim.base_url + "/v1", provider="anthropic", model="c", output=Output(stream=True)
        )
        results, report = await _run(caller)
        injected = sim.counters()["faults"]["stream_error"]
    assert [r["response"] for r in results] == _expected()
    assert report.stages[1].retries == injected > 0


# -- rate limiting -------------------------------------------------------------------------------


class _RecordingLimiter(RateLimiter):
    """A real limiter that notes when each request was let through and each pause."""

    def __init__(self) -> None:
        super().__init__()
        self.granted: list[float] = []
        self.pauses: list[tuple[float, float]] = []

    async def acquire(self, tokens: int = 0, **costs: Any) -> float:
        waited = await super().acquire(tokens, **costs)
        self.granted.append(time.monotonic())
        return waited

    def pause(self, seconds: float) -> None:
        self.pauses.append((time.monotonic(), seconds))
        super().pause(seconds)


class _LifecycleLimiter(RateLimiter):
    """A real limiter that notes, per request, when it was let through, answered and ended."""

    def __init__(self) -> None:
        super().__init__(rpm=60_000)
        self.events: list[tuple[str, int]] = []
        self._request: contextvars.ContextVar[int] = contextvars.ContextVar("request")

    async def acquire(self, tokens: int = 0, **costs: Any) -> float:
        waited = await super().acquire(tokens, **costs)
        self._request.set(len([kind for kind, _ in self.events if kind == "acquire"]))
        self.events.append(("acquire", self._request.get()))
        return waited

    def ended(self, *, sent: bool = True) -> None:
        self.events.append(("ended" if sent else "never sent", self._request.get()))

    def observe(self, headers: Mapping[str, str]) -> None:
        self.events.append(("observe", self._request.get()))
        super().observe(headers)


async def test_the_limiter_hears_when_each_request_ends() -> None:
    # a limiter shared between processes counts a request ticketed and not ended against the
    # capacity a later request's answer reports (RedisRateLimiter): the caller must say when
    # each one ends, also when its answer is an error
    limiter = _LifecycleLimiter()
    async with serve(SimConfig(rpm=60_000, error_5xx=0.2, seed=3)) as sim:  # headers, 5xx
        caller = _caller(sim.url, limits=Limits(limiter=limiter, concurrency=2))
        results, _ = await _run(caller)
        requests = sim.counters()["requests"]
    assert [r["response"] for r in results] == _expected()
    assert requests > len(ROWS)  # some were retried
    per_request = [[kind for kind, n in limiter.events if n == i] for i in range(requests)]
    assert per_request == [["acquire", "observe", "ended"]] * requests


async def test_an_isolated_429_backs_off_its_row_only() -> None:
    # no rate-limit headers and a short Retry-After: one overloaded replica, not the quota
    limiter = _RecordingLimiter()
    async with serve(SimConfig(error_429=0.15, retry_after_s=0.25, seed=4)) as sim:
        caller = _caller(sim.url, limits=Limits(limiter=limiter, concurrency=4))
        results, report = await _run(caller)
        limited = sim.counters()["http_429"]
    assert limited >= 2 and report.stages[1].retries == limited
    assert [r["response"] for r in results] == _expected()
    assert limiter.pauses == []  # nobody else waited
    assert caller.totals.isolated_429s == limited
    assert limiter.statistics().isolated_429s == limited


async def test_a_quota_429_pauses_every_worker_until_retry_after() -> None:
    # a bucket of one request refilled at 10/s: the 429s say nothing remains
    limiter = _RecordingLimiter()
    async with serve(SimConfig(rpm=600, burst_s=0.1)) as sim:
        caller = _caller(sim.url, limits=Limits(limiter=limiter, concurrency=4))
        results, report = await _run(caller)
        limited = sim.counters()["http_429"]
    assert [r["response"] for r in results] == _expected()
    assert limited >= 1 and report.stages[1].retries == limited
    assert len(limiter.pauses) == limited == limiter.statistics().quota_429s
    # after each pause began, no worker was let through before it ended
    for began, seconds in limiter.pauses:
        assert not [t for t in limiter.granted if began < t < began + seconds - 0.01]


SEED_503 = 3  # a seed whose 5xx faults include 503s (the status is drawn among 500/502/503)


async def test_a_503_without_retry_after_backs_off_its_row_only() -> None:
    limiter = _RecordingLimiter()
    async with serve(SimConfig(error_5xx=0.3, seed=SEED_503)) as sim:
        caller = _caller(sim.url, limits=Limits(limiter=limiter, concurrency=4))
        results, report = await _run(caller)
        counters = sim.counters()
    failed_5xx = counters["faults"]["error_5xx"]
    assert report.stages[1].retries == failed_5xx
    assert counters["by_route"]["/v1/chat/completions"].get("503", 0) >= 1
    assert [r["response"] for r in results] == _expected()
    assert limiter.pauses == []  # nobody else waited for one request's 503
    assert caller.totals.rate_limited >= 1  # the 503s still shrank the concurrency


async def test_completion_estimate_follows_the_answers_seen() -> None:
    async with serve(SimConfig()) as sim:
        caller = _caller(sim.url, params={"max_tokens": 500}, limits=Limits(tpm=10_000_000))
        async with Pipeline(ROWS, caller).open() as results:
            async for _ in results:
                pass
            admission = caller.run_state.admission
            assert admission.completions_seen == len(ROWS)
            learned = admission.estimate(40)
        async with Pipeline(ROWS[:1], caller).open() as results:
            async for _ in results:  # a new run starts from max_tokens again
                fresh = caller.run_state.admission.estimate(40)
    # answers here are a few tokens long: far below the max_tokens reserved at first
    assert fresh == 10 + 500
    assert learned < 10 + 50


async def test_server_quota_429s_are_obeyed_until_all_rows_pass() -> None:
    # the server allows 600 rpm in 0.1 s buckets (1 request); the caller sends faster
    async with serve(SimConfig(rpm=600, burst_s=0.1)) as sim:
        caller = _caller(sim.url, retry=dataclasses.replace(FAST_RETRY, backoff_base=0.01))
        results, report = await _run(caller, ROWS[:8])
        counters = sim.counters()
    assert [r["response"] for r in results] == _expected(ROWS[:8])
    assert report.stages[1].retries == counters["throttled"]


async def test_retry_after_beyond_the_deadline_fails_the_row_at_once() -> None:
    async with serve(SimConfig(error_429=1.0, retry_after_s=3600)) as sim:
        caller = _caller(
            sim.url,
            retry=dataclasses.replace(FAST_RETRY, deadline_s=2.0),
            limits=Limits(concurrency=1),
        )
        results, report = await _run(caller, ROWS[:1])
    assert results == []
    (failed,) = report.failures
    assert failed.status == 429 and failed.attempts == 1
    assert failed.message.startswith(
        "server asked to retry after 3600s, past the row's deadline of 2s after 1 attempt(s)"
    )


async def test_row_deadline_bounds_a_slow_attempt() -> None:
    async with serve(SimConfig(latency_ms=3000)) as sim:
        caller = _caller(sim.url, retry=dataclasses.replace(FAST_RETRY, deadline_s=0.3))
        results, report = await _run(caller, ROWS[:2])
    assert results == []
    assert [f.error_type for f in report.failures] == ["DeadlineExceededError"] * 2
    assert report.failures[0].message == "row deadline of 0.3s reached during attempt 1"


# -- refusals that retrying cannot fix -----------------------------------------------------------


async def test_quota_429_stops_the_job_with_a_clear_message() -> None:
    async with serve(SimConfig(quota_429=1.0)) as sim:
        caller = _caller(sim.url, limits=Limits(concurrency=2))
        with pytest.raises(QuotaExhaustedError) as info, anyio.fail_after(10):
            await Pipeline(ROWS, caller).run()
        requests = sim.counters()["requests"]
    assert info.value.code == "insufficient_quota" and info.value.status == 429
    assert "retrying cannot help" in str(info.value)
    assert requests <= 2  # stopped at once, not once per row


async def test_anthropic_credit_balance_too_low_stops_the_job() -> None:
    async with serve(SimConfig(quota_429=1.0)) as sim:
        caller = _caller(
            sim.base_url + "/v1", provider="anthropic", model="c", limits=Limits(concurrency=1)
        )
        with pytest.raises(QuotaExhaustedError, match="credit balance is too low"):
            with anyio.fail_after(10):
                await Pipeline(ROWS, caller).run()


async def test_rejected_key_on_the_first_requests_stops_the_job() -> None:
    async with serve(SimConfig(require_key="the-right-key")) as sim:
        caller = _caller(sim.url, limits=Limits(concurrency=1))
        with pytest.raises(AuthenticationError) as info, anyio.fail_after(10):
            await Pipeline(ROWS, caller).run()
        assert sim.counters()["requests"] == 1
    message = str(info.value)
    assert "rejected the API key from $OPENAI_API_KEY" in message
    assert "HTTP 401 invalid_api_key" in message
    assert KEY not in message


async def test_401_after_a_success_dead_letters_the_row_without_retry() -> None:
    async with serve(SimConfig()) as sim:
        answered = anyio.Event()

        async def flip(env: Any, text: str) -> None:
            if not answered.is_set():
                answered.set()
                sim.configure(SimConfig(require_key="rotated-key"))

        caller = _caller(
            sim.url,
            limits=Limits(concurrency=1, workers=1),
            output=Output(stream=True, on_delta=flip),
        )
        results, report = await _run(caller, ROWS[:3])
    assert len(results) == 1
    assert [f.status for f in report.failures] == [401, 401]
    assert [f.attempts for f in report.failures] == [1, 1]


async def test_400_is_dead_lettered_with_the_providers_message_and_not_retried() -> None:
    rows = [{"messages": []}, {"prompt": "fine"}]
    async with serve() as sim:
        results, report = await _run(LLMCaller(model="m", base_url=sim.url), rows)
        assert sim.counters()["requests"] == 2
    assert results == [{"prompt": "fine", "response": "echo: fine"}]
    (failed,) = report.failures
    assert failed.status == 400 and failed.attempts == 1
    assert failed.message == (
        "HTTP 400 invalid_request_error: 'messages' must be a non-empty array"
    )
    assert report.stages[1].retries == 0


async def test_404_is_not_retried() -> None:
    async with serve() as sim:
        caller = _caller(sim.base_url + "/no-such-prefix")
        results, report = await _run(caller, ROWS[:2])
        assert sim.counters()["requests"] == 0  # the simulator's router answered 404 itself
    assert results == [] and [f.status for f in report.failures] == [404, 404]
    assert [f.attempts for f in report.failures] == [1, 1]


@asynccontextmanager
async def _leaky_server(status: int, **headers: str) -> AsyncIterator[str]:
    """A server whose error message repeats the Authorization header, as some proxies do."""

    async def handler(request: web.Request) -> web.Response:
        leaked = request.headers.get("Authorization", "")
        body = {"error": {"message": f"bad request with {leaked}", "code": "bad"}}
        return web.json_response(body, status=status, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("status", [403, 422])
async def test_other_client_errors_are_not_retried(status: int) -> None:
    async with _leaky_server(status) as url:
        results, report = await _run(_caller(url), ROWS[:2])
    assert results == [] and [f.attempts for f in report.failures] == [1, 1]
    assert report.failures[0].status == status and report.stages[1].requests == 2


async def test_x_should_retry_false_stops_retrying_a_5xx() -> None:
    async with _leaky_server(503, **{"x-should-retry": "false"}) as url:
        _, report = await _run(_caller(url), ROWS[:1])
    assert report.failures[0].attempts == 1 and report.failures[0].status == 503


async def test_retries_exhausted_dead_letters_with_attempts_and_last_error() -> None:
    async with serve(SimConfig(error_5xx=1.0)) as sim:
        caller = _caller(sim.url, retry=dataclasses.replace(FAST_RETRY, max_retries=3))
        results, report = await _run(caller, ROWS[:2])
        requests = sim.counters()["requests"]
    assert results == [] and requests == 8
    assert [f.attempts for f in report.failures] == [4, 4]
    assert report.failures[0].message.startswith("gave up after 4 attempt(s): HTTP 50")
    assert report.stages[1].retries == 6


# -- the key never leaks -------------------------------------------------------------------------


async def test_api_key_never_appears_in_results_dead_letters_logs_or_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    async with _leaky_server(400) as url:
        _, report = await _run(_caller(url), ROWS[:2])
        seen += [json.dumps(f.to_dict()) for f in report.failures]
    assert "bad request with Bearer ***" in report.failures[0].message
    async with serve(SimConfig(error_5xx=0.3, reset=0.2, seed=9, require_key=KEY)) as sim:
        caller = _caller(sim.url, output=Output(form="completion", stream=True))
        results, report = await _run(caller)
        seen += [repr(r) for r in results] + [repr(caller), repr(report)]
    async with serve(SimConfig(require_key="other")) as sim:
        with pytest.raises(AuthenticationError) as info:
            await Pipeline(ROWS[:2], _caller(sim.url)).run()
        seen += [str(info.value), repr(info.value), *getattr(info.value, "__notes__", [])]
    seen += [record.getMessage() for record in caplog.records]
    seen += [str(record.args) for record in caplog.records]
    assert any("retrying" in s for s in seen)  # the debug log did record the retries
    assert not [s for s in seen if KEY in s]


# -- budget --------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
async def test_budget_stops_reading_before_it_is_crossed(
    budget: float, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [{"name": f"u{i}"} for i in range(200)]
    # $1000 per 1M tokens: a row's worst case is its request's bytes / 4 (an upper bound of
    # the prompt's tokens) plus max_tokens 4, about $0.03; its answer costs about $0.01
    sim_config = SimConfig(latency_ms=5, price_prompt=1000, price_completion=1000)
    async with serve(sim_config) as sim:
        caller = _caller(
            sim.url,
            params={"max_tokens": 4},
            output=Output(prices={"sim-1": (1000, 1000)}, budget_usd=budget),
            limits=Limits(concurrency=2),
        )
        results, report = await _run(caller, rows, ordered=False)
        spent = sim.counters()["spent_usd"]
    assert report.stopped is not None and report.stopped.startswith(f"budget of ${budget:g}")
    assert len(results) == report.ok < len(rows) and report.failed == 0
    # every request reserved its worst case before it went: the budget is never crossed;
    # the rows already read when it stopped are left unsent (neither answered nor failed)
    assert spent <= budget
    assert spent > budget - 3 * 0.035  # it stopped only when the next worst case did not fit
    assert caller.totals.unsent == report.stages[1].dropped > 0
    assert report.ok + caller.totals.unsent == report.rows_in
    assert any(f"budget of ${budget:g} reached" in r.getMessage() for r in caplog.records)


async def test_structured_output_still_invalid_after_reasks_is_dead_lettered() -> None:
    schema = {"type": "object", "required": ["sentiment"]}
    async with serve() as sim:
        caller = _caller(
            sim.url,
            params={"response_format": {"type": "json_object"}},
            output=Output(schema=schema, reask=2),
        )
        results, report = await _run(caller, ROWS[:1])
    assert results == []
    (failed,) = report.failures
    assert failed.error_type == "InvalidOutputError" and failed.attempts == 3
    assert failed.message == (
        "invalid JSON output after 2 re-ask(s): at (root): 'sentiment' is a required property"
    )


async def test_completion_attempts_count_retries() -> None:
    async with serve(SimConfig(error_5xx=0.5, seed=11)) as sim:
        caller = _caller(sim.url, output="completion")
        results, report = await _run(caller, ROWS[:10])
    assert all(isinstance(r, Completion) for r in results)
    assert sum(r.attempts - 1 for r in results) == report.stages[1].retries > 0
