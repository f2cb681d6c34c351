"""Specification of rate limiting, adaptive concurrency and rate-limit header parsing."""

from __future__ import annotations

import datetime as dt
import email.utils
import time
from collections.abc import Iterator

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from anyio.lowlevel import checkpoint
from multidict import CIMultiDict, CIMultiDictProxy

from pipeline._errors import ConfigError
from stages.llm import _limits
from stages.llm._limits import (
    AdaptiveConcurrency,
    Limiter,
    RateLimiter,
    RateLimitInfo,
    parse_duration,
    parse_rate_limit_headers,
    parse_retry_after,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class FakeClock:
    """A clock that only moves when the limiter sleeps (sequential callers)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await checkpoint()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock()
    monkeypatch.setattr(_limits, "sleep", fake.sleep)
    yield fake


async def start_times(
    limiter: RateLimiter, clock: FakeClock, n: int, tokens: int = 0
) -> list[float]:
    times = []
    for _ in range(n):
        await limiter.acquire(tokens)
        times.append(clock.now)
    return times


# --------------------------------------------------------------------------- GCRA


async def test_requests_burst_then_evenly_spaced(clock: FakeClock) -> None:
    limiter = RateLimiter(rpm=600, burst_s=0.5, clock=clock)  # 10/s, a bucket of 5
    times = await start_times(limiter, clock, 9)
    assert times == pytest.approx([0, 0, 0, 0, 0, 0.1, 0.2, 0.3, 0.4])


async def test_idle_spell_refills_the_bucket_but_no_more(clock: FakeClock) -> None:
    limiter = RateLimiter(rpm=600, burst_s=0.5, clock=clock)
    await start_times(limiter, clock, 5)
    clock.now = 100.0
    times = await start_times(limiter, clock, 7)
    assert times == pytest.approx([100] * 5 + [100.1, 100.2])


async def test_burst_zero_spaces_every_request(clock: FakeClock) -> None:
    limiter = RateLimiter(rpm=60, burst_s=0, clock=clock)
    assert await start_times(limiter, clock, 3) == pytest.approx([0, 1, 2])


async def test_acquire_returns_seconds_waited_and_counts(clock: FakeClock) -> None:
    limiter = RateLimiter(rpm=60, burst_s=0, clock=clock)
    assert await limiter.acquire() == 0
    assert await limiter.acquire() == pytest.approx(1.0)
    stats = limiter.statistics()
    assert stats.acquired == 2
    assert stats.waited_s == pytest.approx(1.0)
    assert stats.rpm == 60
    assert stats.tpm is None
    assert not stats.learned


async def test_no_limits_never_waits(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock)
    for _ in range(1000):
        assert await limiter.acquire(10_000) == 0
    assert clock.sleeps == []


async def test_real_time_rate_and_arrival_order() -> None:
    rpm, burst_s, n = 1200, 0.25, 30  # 20/s, a bucket of 5
    limiter = RateLimiter(rpm=rpm, burst_s=burst_s)
    arrived: list[int] = []
    finished: list[int] = []

    async def worker(i: int) -> None:
        arrived.append(i)  # acquire reserves before its first await: arrival order
        await limiter.acquire()
        finished.append(i)

    started = time.monotonic()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(worker, i)
    elapsed = time.monotonic() - started
    minimum = (n - 5) / (rpm / 60)
    assert elapsed >= minimum - 0.002  # the sleep clock's resolution (no upper bound: a
    # loaded machine only makes it later; the schedule itself is checked on a fake clock)
    assert finished == arrived


async def test_rejects_bad_configuration() -> None:
    with pytest.raises(ConfigError, match="rpm"):
        RateLimiter(rpm=0)
    with pytest.raises(ConfigError, match="tpm"):
        RateLimiter(tpm=float("inf"))
    with pytest.raises(ConfigError, match="burst_s"):
        RateLimiter(rpm=10, burst_s=-1)
    with pytest.raises(ValueError, match="tokens"):
        await RateLimiter().acquire(-1)


def test_rate_limiter_satisfies_the_protocol() -> None:
    limiter: Limiter = RateLimiter(rpm=10)
    assert "rpm=10" in repr(limiter)


# --------------------------------------------------------------------------- tokens


async def test_token_bucket_spaces_by_tokens(clock: FakeClock) -> None:
    limiter = RateLimiter(tpm=6000, burst_s=0.5, clock=clock)  # 100 tokens/s, bucket 50
    times = await start_times(limiter, clock, 4, tokens=50)
    assert times == pytest.approx([0, 0.5, 1.0, 1.5])


async def test_requests_and_tokens_both_bind(clock: FakeClock) -> None:
    limiter = RateLimiter(rpm=60, tpm=6000, burst_s=0, clock=clock)
    # 1 request/s binds for small requests, tokens bind for big ones.
    assert await start_times(limiter, clock, 2, tokens=10) == pytest.approx([0, 1])
    await limiter.acquire(300)  # at 2.0, reserves 3 s of tokens
    assert clock.now == pytest.approx(2.0)
    await limiter.acquire(1)
    assert clock.now == pytest.approx(5.0)


async def test_reconcile_refunds_overestimate(clock: FakeClock) -> None:
    limiter = RateLimiter(tpm=6000, burst_s=0.5, clock=clock)
    await limiter.acquire(50)
    limiter.reconcile(estimated=50, actual=10)  # 40 tokens back
    await limiter.acquire(50)
    assert clock.now == pytest.approx(0.1)


async def test_reconcile_charges_underestimate(clock: FakeClock) -> None:
    limiter = RateLimiter(tpm=6000, burst_s=0.5, clock=clock)
    await limiter.acquire(50)
    limiter.reconcile(estimated=50, actual=100)  # 50 more were used
    await limiter.acquire(50)
    assert clock.now == pytest.approx(1.0)


async def test_refund_never_fills_beyond_full(clock: FakeClock) -> None:
    limiter = RateLimiter(tpm=6000, burst_s=0.5, clock=clock)
    await limiter.acquire(50)
    clock.now = 10.0
    limiter.reconcile(estimated=50, actual=0)
    assert await start_times(limiter, clock, 2, tokens=50) == pytest.approx([10.0, 10.5])


async def test_oversized_request_goes_alone_once_bucket_is_full(clock: FakeClock) -> None:
    limiter = RateLimiter(tpm=6000, burst_s=0.5, clock=clock)  # bucket of 50 tokens
    await limiter.acquire(30)  # bucket full again at 0.3
    await limiter.acquire(500)  # ten buckets' worth: waits for a full bucket, not forever
    assert clock.now == pytest.approx(0.3)
    await limiter.acquire(10)  # then everyone waits until it is paid off (down to 40 debt)
    assert clock.now == pytest.approx(0.3 + 5.0 - 0.4)


async def test_oversized_request_does_not_deadlock_in_real_time() -> None:
    limiter = RateLimiter(rpm=60, tpm=60)
    with anyio.fail_after(1):
        assert await limiter.acquire(1_000_000) < 0.1


# --------------------------------------------------------------------------- pause


async def test_pause_holds_back_every_worker_until_deadline() -> None:
    limiter = RateLimiter()
    pause = 0.3
    started = time.monotonic()
    limiter.pause(pause)
    woke: list[float] = []

    async def worker() -> None:
        await limiter.acquire()
        woke.append(time.monotonic())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(worker)
    assert len(woke) == 8
    assert min(woke) >= started + pause - 0.002


async def test_pause_extends_but_never_shortens(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock)
    limiter.pause(5)
    limiter.pause(2)
    assert limiter.statistics().paused_until == pytest.approx(5)
    limiter.pause(7)
    assert limiter.statistics().paused_until == pytest.approx(7)
    for bad in (0, -1, float("nan"), float("inf")):
        limiter.pause(bad)
    assert limiter.statistics().paused_until == pytest.approx(7)
    await limiter.acquire()
    assert clock.now == pytest.approx(7)
    assert limiter.statistics().paused_until is None


async def test_pause_moves_back_callers_already_waiting() -> None:
    limiter = RateLimiter(rpm=600, burst_s=0)  # one each 0.1 s
    await limiter.acquire()
    woke: list[float] = []

    async def waiter() -> None:
        await limiter.acquire()  # reserved for 0.1 s from now
        woke.append(time.monotonic())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await wait_all_tasks_blocked()
            paused_at = time.monotonic()
            limiter.pause(0.3)
    assert woke[0] >= paused_at + 0.3 - 0.002


async def test_requests_after_a_pause_keep_their_spacing(clock: FakeClock) -> None:
    limiter = RateLimiter(rpm=60, burst_s=0, clock=clock)
    await limiter.acquire()  # at 0; the next turn is at 1
    limiter.pause(10)  # nothing before 10 s; the bucket refills meanwhile, as the server's does
    assert await start_times(limiter, clock, 3) == pytest.approx([10, 11, 12])


# --------------------------------------------------------------------------- cancellation


async def test_cancelled_waiter_returns_its_reservation(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    blocked = anyio.Event()  # never set: the fake sleep blocks until cancelled

    async def sleep_until_cancelled(seconds: float) -> None:
        clock.sleeps.append(seconds)
        await blocked.wait()

    monkeypatch.setattr(_limits, "sleep", sleep_until_cancelled)
    limiter = RateLimiter(rpm=600, burst_s=0, clock=clock)
    await limiter.acquire()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(limiter.acquire)
            await wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
    assert limiter.statistics().acquired == 1
    monkeypatch.setattr(_limits, "sleep", clock.sleep)
    await limiter.acquire()
    assert clock.now == pytest.approx(0.1)  # the cancelled turn was reused


async def test_cancelled_waiter_behind_others_takes_no_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    release = anyio.Event()

    async def sleep_until_released(seconds: float) -> None:
        clock.sleeps.append(seconds)
        await release.wait()
        clock.now += seconds

    monkeypatch.setattr(_limits, "sleep", sleep_until_released)
    limiter = RateLimiter(rpm=600, burst_s=0, clock=clock)
    await limiter.acquire()
    cancelled = anyio.CancelScope()
    done: list[float] = []

    async def waiter(scope: anyio.CancelScope | None = None) -> None:
        with scope or anyio.CancelScope():
            await limiter.acquire()
            done.append(clock.now)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)  # first in line: sleeps until 0.1
            await wait_all_tasks_blocked()
            tg.start_soon(waiter, cancelled)  # second in line
            await wait_all_tasks_blocked()
            tg.start_soon(waiter)  # third in line
            await wait_all_tasks_blocked()
            cancelled.cancel()
            await wait_all_tasks_blocked()
            release.set()
    assert done == pytest.approx([0.1, 0.2])  # the third took the cancelled one's place
    assert clock.sleeps == pytest.approx([0.1, 0.1])
    assert limiter.statistics().acquired == 3


# --------------------------------------------------------------------------- learning


OPENAI_HEADERS = {
    "x-ratelimit-limit-requests": "600",
    "x-ratelimit-limit-tokens": "60000",
    "x-ratelimit-remaining-requests": "599",
    "x-ratelimit-remaining-tokens": "59000",
    "x-ratelimit-reset-requests": "100ms",
    "x-ratelimit-reset-tokens": "1s",
}


async def test_learns_limits_when_none_configured(clock: FakeClock) -> None:
    limiter = RateLimiter(burst_s=0, clock=clock)
    limiter.observe(OPENAI_HEADERS)
    stats = limiter.statistics()
    assert (stats.rpm, stats.tpm, stats.learned) == (600, 60000, True)
    assert await start_times(limiter, clock, 3) == pytest.approx([0, 0.1, 0.2])


async def test_learning_off_keeps_no_limit(clock: FakeClock) -> None:
    limiter = RateLimiter(learn=False, clock=clock)
    limiter.observe(OPENAI_HEADERS)
    stats = limiter.statistics()
    assert (stats.rpm, stats.tpm, stats.learned) == (None, None, False)


async def test_configured_limit_is_lowered_never_raised_by_server(clock: FakeClock) -> None:
    lower = RateLimiter(rpm=100, tpm=1000, clock=clock)
    lower.observe(OPENAI_HEADERS)
    assert (lower.statistics().rpm, lower.statistics().tpm) == (100, 1000)
    higher = RateLimiter(rpm=6000, clock=clock)
    higher.observe(OPENAI_HEADERS)
    assert higher.statistics().rpm == 600
    assert higher.statistics().learned


async def test_low_remaining_paces_at_the_stated_limit_until_reset(clock: FakeClock) -> None:
    limiter = RateLimiter(rpm=6000, burst_s=0, learn=False, clock=clock)  # 100/s configured
    limiter.observe(
        {
            "X-RateLimit-Limit-Requests": "600",  # the server allows 10/s
            "X-RateLimit-Remaining-Requests": "5",  # below 10 %: 5 over 10 s would be 0.5/s
            "X-RateLimit-Reset-Requests": "10s",
        }
    )
    assert limiter.statistics().rpm == 6000  # not learned, only paced
    # never slower than the limit over its minute: 10/s, not 0.5/s
    assert await start_times(limiter, clock, 4) == pytest.approx([0, 0.1, 0.2, 0.3])
    clock.now = 10.0  # past the reset: the configured speed again
    times = await start_times(limiter, clock, 5)
    assert times == pytest.approx([10.0, 10.01, 10.02, 10.03, 10.04])


async def test_low_remaining_never_slows_below_the_refill_rate(clock: FakeClock) -> None:
    # A server with a small bucket (as the simulator): 2 left of a bucket refilled at 20/s
    # and full again in 0.9 s. Spreading 2 over 0.9 s would run at a ninth of the limit.
    limiter = RateLimiter(rpm=1200, burst_s=0, clock=clock)
    limiter.observe(
        {
            "x-ratelimit-limit-requests": "1200",
            "x-ratelimit-remaining-requests": "2",
            "x-ratelimit-reset-requests": "900ms",
        }
    )
    assert await start_times(limiter, clock, 4) == pytest.approx([0, 0.05, 0.1, 0.15])


async def test_low_remaining_without_any_known_limit_spreads_it_to_reset(
    clock: FakeClock,
) -> None:
    limiter = RateLimiter(learn=False, clock=clock)
    limiter.observe({"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "10s"})
    assert await start_times(limiter, clock, 4) == pytest.approx([0, 2, 4, 6])


async def test_plenty_remaining_changes_nothing(clock: FakeClock) -> None:
    limiter = RateLimiter(rpm=6000, burst_s=0, clock=clock)
    limiter.observe(OPENAI_HEADERS)  # 599 of 600 left
    assert await start_times(limiter, clock, 3) == pytest.approx([0, 0.1, 0.2])


async def test_nothing_remaining_waits_for_one_refill_not_the_reset(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock)
    limiter.observe(
        {
            "x-ratelimit-limit-tokens": "1000",  # 16.7 tokens/s
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-reset-tokens": "6s",
        }
    )
    await limiter.acquire(5)
    assert clock.now == pytest.approx(5 / (1000 / 60))  # 0.3 s, not 6 s


async def test_nothing_remaining_and_no_known_limit_waits_for_reset(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock)
    limiter.observe({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6s"})
    await limiter.acquire(100)
    assert clock.now == pytest.approx(6.0)


async def test_anthropic_headers_with_timestamp_reset(clock: FakeClock) -> None:
    reset = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=8)
    limiter = RateLimiter(clock=clock)
    limiter.observe(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": reset.isoformat().replace("+00:00", "Z"),
        }
    )
    assert limiter.statistics().rpm == 50
    await limiter.acquire()
    assert clock.now == pytest.approx(60 / 50)  # one request's refill, not the 8 s reset
    await limiter.acquire()
    assert clock.now == pytest.approx(2 * 60 / 50)


# --------------------------------------------------------------------------- header parsing


def test_retry_after_ms_wins() -> None:
    assert parse_retry_after({"retry-after-ms": "1500.5", "retry-after": "9"}) == pytest.approx(
        1.5005
    )


def test_retry_after_seconds_and_case_insensitive() -> None:
    assert parse_retry_after({"Retry-After": "2.5"}) == 2.5
    proxy = CIMultiDictProxy(CIMultiDict({"RETRY-AFTER": "3"}))
    assert parse_retry_after(proxy) == 3.0


def test_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(30)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after({"retry-after": past}, now=now) == 0.0


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"retry-after": "soon"},
        {"retry-after": "-5"},
        {"retry-after": "nan"},
        {"retry-after": "inf"},
        {"retry-after-ms": "-1"},
        {"retry-after": ""},
    ],
)
def test_retry_after_garbage_is_none(headers: dict[str, str]) -> None:
    assert parse_retry_after(headers) is None


def test_garbage_ms_falls_back_to_seconds() -> None:
    assert parse_retry_after({"retry-after-ms": "x", "retry-after": "4"}) == 4.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("1h2m3.5s", 3723.5),
        ("0.5s", 0.5),
        ("250us", 0.00025),
        ("7", 7.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "abc", "1x", "1s2", "-1s", "nan", "1 s"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_parse_openai_headers() -> None:
    info = parse_rate_limit_headers(OPENAI_HEADERS)
    assert info == RateLimitInfo(
        limit_requests=600,
        remaining_requests=599,
        reset_requests=0.1,
        limit_tokens=60000,
        remaining_tokens=59000,
        reset_tokens=1.0,
    )


def test_parse_anthropic_headers_combined_and_input_tokens_apart() -> None:
    now = 1_700_000_000.0
    stamp = dt.datetime.fromtimestamp(now + 20, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "49",
        "anthropic-ratelimit-requests-reset": stamp,
        "anthropic-ratelimit-tokens-limit": "40000",
        "anthropic-ratelimit-tokens-remaining": "39000",
        "anthropic-ratelimit-tokens-reset": stamp,
        "anthropic-ratelimit-input-tokens-limit": "30000",
    }
    info = parse_rate_limit_headers(CIMultiDictProxy(CIMultiDict(headers)), now=now)
    assert info == RateLimitInfo(
        50, 49, pytest.approx(20), 40000, 39000, pytest.approx(20), limit_input_tokens=30000
    )


def test_parse_anthropic_input_tokens_and_nanosecond_timestamp() -> None:
    now = 1_700_000_000.0
    stamp = dt.datetime.fromtimestamp(now + 5, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    headers = {
        "anthropic-ratelimit-input-tokens-limit": "30000",
        "anthropic-ratelimit-input-tokens-reset": stamp + ".250000000Z",
    }
    info = parse_rate_limit_headers(headers, now=now)
    assert info is not None
    assert info.limit_tokens is None  # no combined limit: input tokens have their own bucket
    assert info.limit_input_tokens == 30000
    assert info.reset_input_tokens == pytest.approx(5.25)


def test_parse_headers_absent_or_garbage() -> None:
    assert parse_rate_limit_headers({"content-type": "application/json"}) is None
    info = parse_rate_limit_headers(
        {"x-ratelimit-limit-requests": "many", "x-ratelimit-reset-requests": "later"}
    )
    assert info == RateLimitInfo()


# --------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("limit", [1, 2])
async def test_slot_admits_up_to_limit_in_arrival_order(limit: int) -> None:
    limiter = AdaptiveConcurrency(limit=limit)
    release = anyio.Event()
    admitted: list[int] = []

    async def worker(i: int) -> None:
        async with limiter.slot():
            admitted.append(i)
            await release.wait()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(worker, i)
                await wait_all_tasks_blocked()
            assert admitted == list(range(limit))
            assert limiter.in_use == limit
            release.set()
    if limit == 1:  # one at a time: the order seen is the order granted
        assert admitted == [0, 1, 2, 3, 4]
    else:  # trio wakes tasks granted together in any order
        assert sorted(admitted) == [0, 1, 2, 3, 4]
    assert limiter.in_use == 0


async def test_additive_increase_after_limit_successes() -> None:
    limiter = AdaptiveConcurrency(limit=4, maximum=5)
    for _ in range(3):
        limiter.success()
    assert limiter.limit == 4
    limiter.success()
    assert limiter.limit == 5
    for _ in range(50):
        limiter.success()
    assert limiter.limit == 5  # never above maximum


async def test_burst_of_overloads_halves_once() -> None:
    limiter = AdaptiveConcurrency(limit=16)
    proceed = anyio.Event()
    entered = 0

    async def request() -> None:
        nonlocal entered
        async with limiter.slot():
            entered += 1
            await proceed.wait()
            limiter.overload()  # all eight in flight get a 429

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(request)
            await wait_all_tasks_blocked()
            assert entered == 8
            proceed.set()
    assert limiter.limit == 8
    async with limiter.slot():  # a request sent after the decrease: a new window
        limiter.overload()
    assert limiter.limit == 4


async def test_never_below_minimum() -> None:
    limiter = AdaptiveConcurrency(limit=8, minimum=3)
    for _ in range(10):
        limiter.overload()
    assert limiter.limit == 3


async def test_shrinking_does_not_evict_holders() -> None:
    limiter = AdaptiveConcurrency(limit=4)
    release = anyio.Event()
    done = 0
    third_in = anyio.Event()

    async def holder() -> None:
        nonlocal done
        async with limiter.slot():
            await release.wait()
        done += 1

    async def late() -> None:
        async with limiter.slot():
            third_in.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(holder)
            await wait_all_tasks_blocked()
            limiter.overload()
            limiter.overload()
            assert limiter.limit == 2  # the first halved; the second, same burst, ignored
            assert limiter.in_use == 4
            tg.start_soon(late)
            await wait_all_tasks_blocked()
            assert not third_in.is_set()
            release.set()
    assert done == 4
    assert third_in.is_set()


async def test_fixed_limit_when_not_adaptive() -> None:
    limiter = AdaptiveConcurrency(limit=4, adaptive=False)
    for _ in range(20):
        limiter.success()
    limiter.overload()
    assert limiter.limit == 4


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    limiter = AdaptiveConcurrency(limit=1)

    async def wait_for_slot() -> None:
        async with limiter.slot():
            pytest.fail("admitted while the only slot was held")

    with anyio.fail_after(5):
        async with limiter.slot():
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(wait_for_slot)
                    await wait_all_tasks_blocked()
                    scope.cancel()
        assert limiter.in_use == 0
        async with limiter.slot():
            assert limiter.in_use == 1


def test_concurrency_rejects_bad_configuration() -> None:
    with pytest.raises(ConfigError, match="minimum"):
        AdaptiveConcurrency(limit=1, minimum=2)
    with pytest.raises(ConfigError):
        AdaptiveConcurrency(limit=0, minimum=0)
    assert "limit=16" in repr(AdaptiveConcurrency())


async def test_aimd_oscillates_near_server_capacity() -> None:
    capacity = 12
    limiter = AdaptiveConcurrency(limit=2, maximum=64)
    history: list[int] = []

    async def client() -> None:
        for _ in range(60):
            async with limiter.slot():
                if limiter.in_use > capacity:  # the simulated server is overloaded
                    limiter.overload()
                else:
                    limiter.success()
                await checkpoint()  # the request takes one turn of the loop
                history.append(limiter.limit)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(client)
    tail = history[len(history) // 2 :]
    assert capacity // 2 <= min(tail)
    assert max(tail) <= capacity + 1
    assert capacity * 0.6 <= sum(tail) / len(tail) <= capacity


def test_lower_only_ever_tightens_the_configured_limits() -> None:
    limiter = RateLimiter(rpm=600, tpm=None)
    limiter.lower(rpm=900, tpm=50_000)  # a higher rpm is ignored; an unset tpm is set
    stats = limiter.statistics()
    assert (stats.rpm, stats.tpm) == (600, 50_000)
    limiter.lower(rpm=300)
    assert limiter.statistics().rpm == 300
