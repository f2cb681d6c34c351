"""Specification of a limiter that follows the server's own accounting (issue 13).

Fake clocks throughout: the times asserted are the limiter's schedule, never the wall clock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from anyio.lowlevel import checkpoint

from pipeline._errors import ConfigError
from stages.llm import _limits
from stages.llm._budget import Budget
from stages.llm._limits import RateLimiter

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class FakeClock:
    """Time moves only when the limiter sleeps; ``hold`` makes sleeps block until woken."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.hold = False

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.hold:
            await anyio.sleep_forever()  # until the limiter's wake-up cancels it
        self.now += seconds
        await checkpoint()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock()
    monkeypatch.setattr(_limits, "sleep", fake.sleep)
    yield fake


def openai(remaining: int, reset: str, limit: int = 600, kind: str = "requests") -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(remaining),
        f"x-ratelimit-reset-{kind}": reset,
    }


async def start_times(limiter: RateLimiter, clock: FakeClock, n: int, **costs: int) -> list[float]:
    times = []
    for _ in range(n):
        await limiter.acquire(**costs)
        times.append(clock.now)
    return times


# --------------------------------------------------------------------------- the server's word


async def test_fresh_bucket_is_used_at_once(clock: FakeClock) -> None:
    limiter = RateLimiter(rpm=600, clock=clock)  # before any header: one second's worth
    await limiter.acquire()
    limiter.observe(openai(599, "100ms"))  # a fresh key: 599 of 600 left
    times = await start_times(limiter, clock, 601)
    assert times[:599] == [0.0] * 599  # the whole bucket now
    assert times[599:] == pytest.approx([0.1, 0.2])  # then the refill rate
    assert limiter.statistics().burst == pytest.approx(600)


async def answered_after(limiter: RateLimiter, headers: dict[str, str], later: int) -> None:
    """Send one request, then ``later`` more from this task; then the first one's answer."""
    first_sent = anyio.Event()
    answered = anyio.Event()

    async def first() -> None:
        await limiter.acquire()
        first_sent.set()
        await answered.wait()
        limiter.observe(headers)  # in the first request's task: its ticket

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await first_sent.wait()
        for _ in range(later):
            await limiter.acquire()
        answered.set()


async def test_learned_limit_and_capacity_without_configuration(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock)  # no limit known: the first 64 go at once
    await answered_after(limiter, openai(599, "100ms"), later=63)
    stats = limiter.statistics()
    assert (stats.rpm, stats.learned, stats.acquired) == (600, True, 64)
    times = await start_times(limiter, clock, 537)
    assert times[:536] == [0.0] * 536  # 599 less the 63 sent after the answered one
    assert times[536] == pytest.approx(0.1)


async def test_requests_sent_after_the_answered_one_are_subtracted(clock: FakeClock) -> None:
    limiter = RateLimiter(rpm=600, burst_s=60, clock=clock)
    await answered_after(limiter, openai(10, "59s"), later=4)  # its answer came back last
    times = await start_times(limiter, clock, 7)
    assert times == pytest.approx([0, 0, 0, 0, 0, 0, 0.1])  # 10 - 4 = 6 left


async def test_headers_saying_less_remains_slow_down(clock: FakeClock) -> None:
    limiter = RateLimiter(rpm=600, burst_s=60, clock=clock)  # guessing a full minute
    await limiter.acquire()
    limiter.observe(openai(0, "59s900ms"))  # another client used the quota
    assert await start_times(limiter, clock, 2) == pytest.approx([0.1, 0.2])


async def test_configured_limit_caps_rate_and_burst(clock: FakeClock) -> None:
    limiter = RateLimiter(rpm=600, clock=clock)
    await limiter.acquire()
    limiter.observe(openai(5999, "10ms", limit=6000))  # the key allows ten times more
    stats = limiter.statistics()
    assert (stats.rpm, stats.burst) == (600, 600)  # a ceiling: at most a minute of 600
    times = await start_times(limiter, clock, 601)
    assert times[598] == 0 and times[599] == pytest.approx(0.1)


async def test_configured_burst_caps_the_servers_capacity(clock: FakeClock) -> None:
    limiter = RateLimiter(rpm=600, burst_s=1.0, clock=clock)
    await limiter.acquire()
    limiter.observe(openai(599, "100ms"))
    times = await start_times(limiter, clock, 11)
    assert times == pytest.approx([0] * 9 + [0.1, 0.2])  # ten at once, all told


async def test_waiting_callers_go_as_soon_as_headers_bring_their_turn_forward(
    clock: FakeClock,
) -> None:
    limiter = RateLimiter(rpm=600, clock=clock)  # a guess of 10 until headers arrive
    assert await start_times(limiter, clock, 10) == [0.0] * 10
    clock.hold = True
    done: list[float] = []

    async def waiter() -> None:
        await limiter.acquire()
        done.append(clock.now)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(waiter)
            await wait_all_tasks_blocked()
            assert done == []  # the first in line sleeps, the others queue
            limiter.observe(openai(589, "1s100ms"))  # the server's bucket holds 600
    assert done == [0.0] * 5


# --------------------------------------------------------------------------- 429s


async def test_quota_429_pauses_everyone_until_retry_after(clock: FakeClock) -> None:
    limiter = RateLimiter(rpm=600, clock=clock)
    await limiter.acquire()
    headers = {**openai(0, "60s"), "retry-after": "2"}
    limiter.observe(headers)
    assert limiter.throttled(headers, 2.0) == "quota"
    await limiter.acquire()
    assert clock.now == pytest.approx(2.0)
    assert limiter.statistics().quota_429s == 1


async def test_token_quota_429_when_tokens_run_short(clock: FakeClock) -> None:
    limiter = RateLimiter(tpm=60_000, clock=clock)
    await limiter.acquire(500)
    headers = {**openai(590, "1s"), **openai(100, "59s", limit=60_000, kind="tokens")}
    assert limiter.throttled(headers, None) == "quota"  # 100 tokens left, 500 needed


async def test_long_retry_after_is_a_quota_signal_even_without_headers(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock)
    await limiter.acquire()
    assert limiter.throttled({}, 30.0) == "quota"
    assert limiter.statistics().paused_until == pytest.approx(30.0)


async def test_isolated_429_with_plenty_remaining_holds_back_nobody(clock: FakeClock) -> None:
    limiter = RateLimiter(rpm=600, clock=clock)
    await limiter.acquire()
    headers = {**openai(580, "2s"), "retry-after": "1"}
    limiter.observe(headers)
    assert limiter.throttled(headers, 1.0) == "isolated"
    assert limiter.throttled({}, 1.0) == "isolated"  # no headers, short Retry-After
    stats = limiter.statistics()
    assert (stats.paused_until, stats.isolated_429s, stats.smooth) == (None, 2, False)
    assert await limiter.acquire() == 0


async def test_short_window_is_detected_and_rate_goes_smooth(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = RateLimiter(rpm=600, clock=clock)
    await limiter.acquire()
    limiter.observe(openai(599, "100ms"))
    await start_times(limiter, clock, 14)  # a burst: the headers say there is room
    headers = {**openai(580, "2s"), "retry-after-ms": "100"}
    with caplog.at_level(logging.WARNING, logger="pipeline.limits"):
        verdicts = [limiter.throttled(headers, 0.1) for _ in range(4)]
    assert verdicts == ["isolated", "isolated", "short_window", "isolated"]
    assert limiter.statistics().smooth
    assert len([r for r in caplog.records if "short windows" in r.message]) == 1
    limiter.observe(openai(570, "3s"))  # headers no longer bring bursts back
    times = await start_times(limiter, clock, 3)
    assert times == pytest.approx([0.1, 0.2, 0.3])


async def test_isolated_429s_at_the_rate_never_switch_to_smooth(clock: FakeClock) -> None:
    limiter = RateLimiter(rpm=600, burst_s=0, clock=clock)
    headers = openai(500, "10s")
    for _ in range(20):  # one request each 0.1 s: never above the rate
        await limiter.acquire()
        assert limiter.throttled(headers, None) == "isolated"
    assert not limiter.statistics().smooth


# --------------------------------------------------------------------------- input and output


async def test_output_tokens_reserved_then_unused_part_returned(clock: FakeClock) -> None:
    limiter = RateLimiter(otpm=6000, burst_s=1.0, clock=clock)  # 100 output tokens/s
    await limiter.acquire(output_tokens=100)  # max_tokens reserved up front
    limiter.settle(input_tokens=20, output_tokens=10)  # the answer used 10
    times = await start_times(limiter, clock, 1, output_tokens=100)
    assert times == pytest.approx([0.1])  # waits for 10 tokens' refill, not 100


async def test_input_and_output_limits_bind_separately(clock: FakeClock) -> None:
    limiter = RateLimiter(itpm=6000, otpm=600, burst_s=0, clock=clock)
    times = await start_times(limiter, clock, 3, input_tokens=50, output_tokens=1)
    assert times == pytest.approx([0, 0.5, 1.0])  # input binds: 50 of 100/s
    times = await start_times(limiter, clock, 2, input_tokens=1, output_tokens=20)
    assert times[1] - times[0] == pytest.approx(2.0)  # output binds: 20 of 10/s


async def test_anthropic_input_and_output_limits_are_learned(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock)
    await limiter.acquire(input_tokens=10, output_tokens=100)
    limiter.observe(
        {
            "anthropic-ratelimit-input-tokens-limit": "40000",
            "anthropic-ratelimit-input-tokens-remaining": "39990",
            "anthropic-ratelimit-output-tokens-limit": "8000",
            "anthropic-ratelimit-output-tokens-remaining": "7900",
        }
    )
    stats = limiter.statistics()
    assert (stats.itpm, stats.otpm, stats.tpm) == (40000, 8000, None)


async def test_settle_without_a_ticket_changes_nothing(clock: FakeClock) -> None:
    limiter = RateLimiter(otpm=600, clock=clock)
    limiter.settle(10, 10)
    assert await limiter.acquire(output_tokens=1) == 0


def test_rejects_bad_input_and_output_limits() -> None:
    with pytest.raises(ConfigError, match="itpm"):
        RateLimiter(itpm=0)
    with pytest.raises(ConfigError, match="otpm"):
        RateLimiter(otpm=-5)


# --------------------------------------------------------------------------- budget


def test_budget_reserves_settles_and_refuses() -> None:
    budget = Budget(1.0)
    assert budget.reserve(0.4)
    assert budget.reserve(0.4)
    assert not budget.reserve(0.4)  # 1.2 would cross the limit
    budget.settle(0.4, 0.1)  # the answer cost less than its worst case
    assert budget.reserve(0.4)
    budget.release(0.4)  # that one was never sent
    stats = budget.statistics()
    assert stats.spent_usd == pytest.approx(0.1)
    assert stats.reserved_usd == pytest.approx(0.4)
    assert stats.refused == 1
    assert budget.available_usd == pytest.approx(0.5)


def test_budget_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="budget"):
        Budget(float("nan"))
    with pytest.raises(ValueError, match="reservation"):
        Budget(1).reserve(-1)
