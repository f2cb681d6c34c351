"""The runtime's contract: declaring, running, streaming, accounting, errors and cancellation."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from aiostream import pipe, stream

import pipeline as pl
from pipeline import Envelope, Failed, Inbox, Outbox, Pipeline, Stage

pytestmark = pytest.mark.anyio
asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])  # aiostream needs asyncio


async def double(x: int) -> int:
    return x * 2


def fails_on_sevens(x: int) -> int:
    if x % 7 == 0:
        raise ValueError(f"seven-ish value {x}")
    return x


async def test_map_filter_flat_map_with_sync_and_async_functions() -> None:
    p = Pipeline(
        pl.map(double),
        pl.filter(lambda x: x % 4 == 0),
        pl.flat_map(lambda x: [x, -x]),
    )
    async with p.open(range(10)) as results:
        got = sorted([r async for r in results])
    assert got == sorted([v for x in range(10) if (x * 2) % 4 == 0 for v in (x * 2, -x * 2)])


async def test_pipe_operator_builds_the_same_pipeline() -> None:
    p = range(5) | pl.map(double) | pl.map(lambda x: x + 1)
    assert isinstance(p, Pipeline)
    assert [s.name for s in p.stages] == ["source", "map(double)", "map(<lambda>)"]
    report = await p.run()
    assert report.ok == 5 and report.rows_in == 5


async def test_async_generator_input() -> None:
    async def gen() -> AsyncIterator[int]:
        for i in range(4):
            yield i

    report = await Pipeline(pl.map(double)).run(gen())
    assert report.ok == 4


@asyncio_only
async def test_aiostream_input() -> None:
    async with Pipeline(pl.map(double)).open(stream.range(6)) as results:
        assert sorted([r async for r in results]) == [0, 2, 4, 6, 8, 10]


@asyncio_only
async def test_results_feed_aiostream_operators() -> None:
    async with Pipeline(pl.map(double), ordered=True).open(range(100)) as results:
        firsts = stream.iterate(results) | pipe.take(3)
        assert await stream.list(firsts) == [0, 2, 4]


async def test_run_report_counts_every_stage() -> None:
    report = await Pipeline(pl.map(double, name="double"), pl.map(fails_on_sevens)).run(range(50))
    assert report.stage("double").received == 50
    assert report.stage("double").emitted == 50
    failing = report.stage("map(fails_on_sevens)")
    sevens = len([x for x in range(50) if (2 * x) % 7 == 0])
    assert failing.failed == sevens
    assert report.ok + report.failed == report.rows_in == 50
    assert report.complete and report.balanced
    assert "double" in str(report)


async def test_failed_records_name_the_stage_error_and_item() -> None:
    report = await Pipeline(pl.map(fails_on_sevens)).run([1, 7, 2])
    assert report.failed == 1
    (failed,) = report.failures
    assert failed.item == 7
    assert failed.stage == "map(fails_on_sevens)"
    assert failed.error_type == "ValueError"
    assert failed.message == "seven-ish value 7"
    assert failed.attempts == 1
    assert failed.seq == 1 and failed.key == 1


async def test_dead_letter_sink_receives_failures_as_they_happen() -> None:
    seen: list[Failed] = []

    async def dead_letter(failed: Failed) -> None:
        seen.append(failed)

    report = await Pipeline(pl.map(fails_on_sevens), dead_letter=dead_letter).run(range(15))
    assert [f.item for f in seen] == [0, 7, 14]
    assert report.failures == []  # a sink was given: nothing kept in memory
    assert report.failed == 3


async def test_workers_run_concurrently_on_one_inbox() -> None:
    in_flight = 0
    peak = 0
    all_in = anyio.Event()

    async def slow(x: int) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if peak == 4:
            all_in.set()
        with anyio.fail_after(5):
            await all_in.wait()
        in_flight -= 1
        return x

    report = await Pipeline(pl.map(slow, workers=4)).run(range(20))
    assert peak == 4
    assert report.ok == 20


async def test_first_result_arrives_while_the_rest_is_still_running() -> None:
    first_seen = anyio.Event()

    async def gated_source() -> AsyncIterator[int]:
        yield 1
        with anyio.fail_after(5):
            await first_seen.wait()  # the rest only comes once the caller saw the first
        for i in range(2, 6):
            yield i

    got = []
    with anyio.fail_after(10):
        async with Pipeline(pl.map(double)).open(gated_source()) as results:
            async for value in results:
                got.append(value)
                first_seen.set()
    assert got == [2, 4, 6, 8, 10]


async def test_leaving_early_cancels_workers_cleanly() -> None:
    cancelled = anyio.Event()

    async def endless() -> AsyncIterator[int]:
        i = 0
        try:
            while True:
                yield i
                i += 1
        finally:
            cancelled.set()

    class Watcher(Stage[int, int]):
        async def run(self, inbox: Inbox[int], outbox: Outbox[int]) -> None:
            try:
                async for env in inbox:
                    await outbox.send(env)
            finally:
                cancelled.set()

    with anyio.fail_after(5):
        async with Pipeline(Watcher()).open(endless()) as results:
            async for value in results:
                if value == 10:
                    break
    assert cancelled.is_set()
    assert results.report is not None and not results.report.complete
    gc.collect()  # an unclosed stream would warn, and warnings are errors here


async def test_fatal_error_stops_the_pipeline_and_raises_the_original() -> None:
    with anyio.fail_after(5), pytest.raises(ValueError, match="seven-ish value 7") as info:
        await Pipeline(pl.map(fails_on_sevens, name="strict", on_error="fatal")).run(
            range(1, 10**9)
        )
    error = info.value
    assert error.pipeline_stage == "strict"  # type: ignore[attr-defined]
    assert error.pipeline_item == 6  # type: ignore[attr-defined]
    assert "in stage 'strict', item #6" in getattr(error, "__notes__", [])


async def test_item_errors_are_data_and_fatal_errors_stop_regardless_of_policy() -> None:
    def picky(x: int) -> int:
        if x == 1:
            raise pl.ItemError("bad row")
        if x == 3:
            raise pl.FatalError("give up")
        return x

    with pytest.raises(pl.FatalError, match="give up"):
        await Pipeline(pl.map(picky, on_error=lambda e: True)).run(range(5))
    report = await Pipeline(pl.map(picky, on_error="fatal")).run([0, 1, 2])
    assert report.failed == 1 and report.ok == 2


async def test_on_error_predicate_decides_per_exception() -> None:
    def boom(x: int) -> int:
        raise (KeyError if x else ZeroDivisionError)(x)

    stage = pl.map(boom, on_error=lambda e: isinstance(e, KeyError))
    with pytest.raises(ZeroDivisionError):
        await Pipeline(stage).run([1, 2, 0])


async def test_cancelling_run_closes_everything() -> None:
    started = anyio.Event()

    async def stuck(x: int) -> int:
        started.set()
        await anyio.sleep_forever()
        return x

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def runner() -> None:
                await Pipeline(pl.map(stuck, workers=3), pl.map(double)).run(range(100))

            tg.start_soon(runner)
            await started.wait()
            tg.cancel_scope.cancel()
    gc.collect()


async def test_ordered_restores_input_order_with_concurrent_workers() -> None:
    async def jitter(x: int) -> int:
        for _ in range((x * 7919) % 5):
            await anyio.lowlevel.checkpoint()
        return x

    p = Pipeline(pl.map(jitter, workers=8), pl.map(fails_on_sevens), ordered=True, window=16)
    async with p.open(range(200)) as results:
        got = [r async for r in results]
    assert got == [x for x in range(200) if x % 7 != 0]
    assert results.report is not None and results.report.balanced


async def test_ordered_window_bounds_how_far_the_source_runs_ahead() -> None:
    emitted = 0
    max_ahead = 0

    def source() -> Any:
        nonlocal emitted
        for i in range(300):
            emitted = i + 1
            yield i

    async def slow_first(x: int) -> int:
        if x == 0:
            for _ in range(200):
                await anyio.lowlevel.checkpoint()
        return x

    out = 0
    async with Pipeline(pl.map(slow_first, workers=4), ordered=True, window=10).open(
        source()
    ) as results:
        async for value in results:
            out += 1
            max_ahead = max(max_ahead, emitted - out)
            assert value == out - 1
    # the window holds the source back from the oldest unfinished item; results the reorder
    # already released may wait in the final channel (its buffer is min(window, 1024))
    assert max_ahead <= 10 + 10 + 1


async def test_ordered_with_flat_map_keeps_children_together() -> None:
    async def expand(x: int) -> list[int]:
        for _ in range(x % 3):
            await anyio.lowlevel.checkpoint()
        return [x * 10 + k for k in range(x % 3)]

    p = Pipeline(pl.flat_map(expand, workers=4), ordered=True, window=8)
    async with p.open(range(30)) as results:
        got = [r async for r in results]
    assert got == [x * 10 + k for x in range(30) for k in range(x % 3)]


async def test_backpressure_bounds_how_far_the_source_runs_ahead_of_the_sink() -> None:
    produced = 0
    consumed = 0
    worst = 0

    def source() -> Any:
        nonlocal produced
        for i in range(2000):
            produced += 1
            yield i

    class SlowSink(Stage[int, int]):
        @property
        def is_sink(self) -> bool:
            return True

        async def run(self, inbox: Inbox[int], outbox: Outbox[int]) -> None:
            nonlocal consumed, worst
            async for env in inbox:
                consumed += 1
                worst = max(worst, produced - consumed)
                await anyio.lowlevel.checkpoint()
                await outbox.send(env)

    stages = [pl.map(double, buffer=8), pl.map(double, buffer=4, workers=2), SlowSink(buffer=2)]
    report = await Pipeline(*stages).run(source())
    bound = sum(s.buffer + s.workers for s in stages) + 1  # +1: the item the source holds
    assert report.ok == 2000
    assert worst <= bound
    assert report.stage("map(double)").blocked_s > 0


async def test_custom_stage_that_loses_items_is_caught_by_the_ledger() -> None:
    class Leaky(Stage[int, int]):
        async def run(self, inbox: Inbox[int], outbox: Outbox[int]) -> None:
            async for env in inbox:
                if env.value != 3:
                    await outbox.send(env)

    with pytest.raises(pl.LedgerError, match="lost track"):
        await Pipeline(Leaky()).run(range(5))


async def test_stop_lets_in_flight_items_finish() -> None:
    async def endless() -> AsyncIterator[int]:
        i = 0
        while True:
            yield i
            i += 1

    with anyio.fail_after(5):
        async with Pipeline(pl.map(double, buffer=4)).open(endless()) as results:
            got = 0
            async for _ in results:
                got += 1
                assert results.stop_reason == (None if got <= 20 else "enough")
                if got == 20:
                    results.stop("enough")
                    results.stop("a second reason does not replace the first")
    report = results.report
    assert report is not None
    assert report.stopped == "enough" and report.complete and report.balanced
    assert report.ok == report.rows_in >= 20


async def test_source_stage_rejects_bad_rows_into_the_dead_letter() -> None:
    class Numbers(pl.Source[int]):
        async def run(self, inbox: Inbox[None], outbox: Outbox[int]) -> None:
            for line, text in enumerate(["1", "x", "3"], start=1):
                try:
                    value = int(text)
                except ValueError as error:
                    await outbox.reject(text, error, key=line, origin=f"nums.txt:{line}")
                else:
                    await outbox.emit(value, key=line, origin=f"nums.txt:{line}")

    report = await Pipeline(Numbers(), pl.map(double)).run()
    assert report.rows_in == 3 and report.ok == 2 and report.failed == 1
    (failed,) = report.failures
    assert failed.origin == "nums.txt:2" and failed.key == 2 and failed.item == "x"


async def test_dead_letter_as_a_stage() -> None:
    written: list[Any] = []

    class Collect(Stage[Failed, Failed]):
        async def run(self, inbox: Inbox[Failed], outbox: Outbox[Failed]) -> None:
            async for env in inbox:
                written.append(env.value.to_dict())
                await outbox.send(env)

    report = await Pipeline(pl.map(fails_on_sevens), dead_letter=Collect()).run(range(8))
    assert [w["item"] for w in written] == [0, 7]
    assert written[0]["error"] == {
        "type": "ValueError",
        "message": "seven-ish value 0",
        "status": None,
        "attempts": 1,
    }
    assert report.failed == 2


async def test_secrets_are_redacted_from_dead_letter_messages() -> None:
    class Leaks(pl.ItemStage[int, int]):
        def secrets(self) -> list[str]:
            return ["sk-test-SECRET123"]

        async def process(self, item: int) -> int:
            raise RuntimeError("auth failed for key sk-test-SECRET123")

    report = await Pipeline(Leaks()).run([1])
    assert "SECRET123" not in report.failures[0].message
    assert report.failures[0].message == "auth failed for key ***"


async def test_log_records_carry_the_stage_name(caplog: pytest.LogCaptureFixture) -> None:
    def noisy(x: int) -> int:
        logging.getLogger("user.code").warning("looking at %s", x)
        return x

    handler_filter = pl.StageFilter()
    caplog.handler.addFilter(handler_filter)
    try:
        with caplog.at_level(logging.WARNING):
            await Pipeline(pl.map(noisy, name="noisy")).run([1])
    finally:
        caplog.handler.removeFilter(handler_filter)
    assert [r.stage for r in caplog.records] == ["noisy"]  # type: ignore[attr-defined]


async def test_declaring_errors_are_clear() -> None:
    with pytest.raises(pl.ConfigError, match="workers"):
        pl.map(double, workers=0)
    with pytest.raises(pl.ConfigError, match="no input"):
        await Pipeline(pl.map(double)).run()
    with pytest.raises(pl.ConfigError, match="must come first"):
        Pipeline(pl.map(double), pl.IterSource([1]))


async def test_envelope_replace_keeps_identity() -> None:
    env = Envelope(1, 5, key="k", origin="f:1")
    other = env.replace("x")
    assert (other.value, other.seq, other.key, other.origin) == ("x", 5, "k", "f:1")


async def test_stop_cancels_a_source_that_waits_for_input() -> None:
    never = anyio.Event()

    async def trickle() -> AsyncIterator[int]:
        for i in range(3):
            yield i
        await never.wait()  # input that never comes
        yield 99

    with anyio.fail_after(5):
        async with Pipeline(pl.map(double)).open(trickle()) as results:
            got = []
            async for value in results:
                got.append(value)
                if len(got) == 3:
                    results.stop("no more input")
    assert sorted(got) == [0, 2, 4]
    assert results.report is not None and results.report.balanced


async def test_stop_while_the_source_is_blocked_on_backpressure_loses_nothing() -> None:
    release = anyio.Event()
    holding = anyio.Event()

    async def gate(x: int) -> int:
        if x == 0:
            holding.set()
            await release.wait()
        return x

    with anyio.fail_after(5):
        async with Pipeline(pl.map(gate, buffer=0)).open(range(1000)) as results:
            await holding.wait()
            results.stop("stop now")  # the source is parked in a send to the gated stage
            release.set()
            got = [v async for v in results]
    report = results.report
    assert report is not None and report.balanced and report.complete
    assert report.ok == report.rows_in == len(got) >= 1


async def test_fatal_error_in_an_ordered_run_raises_the_original() -> None:
    with anyio.fail_after(5), pytest.raises(ValueError, match="seven-ish value 14"):
        await Pipeline(
            pl.map(double, workers=3), pl.map(fails_on_sevens, on_error="fatal"), ordered=True
        ).run(range(1, 10**6))


async def test_a_cancelled_receive_loses_no_item() -> None:
    got: list[int] = []

    class Patient(Stage[int, int]):
        async def run(self, inbox: Inbox[int], outbox: Outbox[int]) -> None:
            while True:
                with anyio.move_on_after(0):  # cancelled as soon as it would wait or checkpoint
                    try:
                        env = await inbox.receive()
                    except anyio.EndOfStream:
                        return
                    got.append(env.value)
                    await outbox.send(env)

    report = await Pipeline(Patient(buffer=1024)).run(range(2000))
    assert report.ok == 2000 and report.balanced
    assert sorted(got) == list(range(2000))


async def test_a_map_over_a_batch_keeps_it_a_batch() -> None:
    class Pairs(Stage[int, list[int]]):
        async def run(self, inbox: Inbox[int], outbox: Outbox[list[int]]) -> None:
            held: list[Envelope[int]] = []
            async for env in inbox:
                held.append(env)
                if len(held) == 2:
                    await outbox.send(Envelope([m.value for m in held], held[0].seq, members=held))
                    held = []

    report = await Pipeline(Pairs(), pl.map(sum), pl.map(str, name="fmt")).run(range(6))
    assert report.balanced and report.ok == 6  # three batches standing for six items


async def test_leaving_early_while_a_stage_was_just_woken_with_an_item_is_clean() -> None:
    go = anyio.Event()

    class Late(Stage[int, int]):
        async def run(self, inbox: Inbox[int], outbox: Outbox[int]) -> None:
            async for env in inbox:
                if env.value == 1:
                    await go.wait()  # woken normally just before the caller leaves
                await outbox.send(env)  # the caller is gone: must not fail the run

    with anyio.fail_after(5):
        async with Pipeline(Late()).open(range(100)) as results:
            async for value in results:
                assert value == 0
                go.set()
                break
    assert results.report is not None and not results.report.complete


class _WaitsForATurn(pl.ItemStage[int, int]):
    """Holds every item but the first at a wait only a stop ends (a limiter that never lets go)."""

    def __init__(self) -> None:
        super().__init__(name="turns", workers=4)
        self.started: list[int] = []
        self.first_done = anyio.Event()

    async def handle(self, env: Envelope[int], outbox: Outbox[int]) -> None:
        if env.value != 0:
            with outbox.unless_stopped():
                await anyio.sleep_forever()
        self.started.append(env.value)  # only item 0: the stop ends the others' wait by raising
        await outbox.send(env)
        self.first_done.set()


async def test_a_stop_drops_the_items_whose_work_had_not_started() -> None:
    stage = _WaitsForATurn()
    with anyio.fail_after(10):
        async with Pipeline(range(6), stage).open() as results:
            got = []
            async for value in results:
                got.append(value)
                await stage.first_done.wait()
                results.stop("enough")
        report = results.report
    assert got == [0] and stage.started == [0]
    assert report is not None and report.stopped == "enough" and report.failed == 0
    dropped = sorted(env.value for env in results.not_started)
    assert dropped and dropped == list(range(1, 1 + len(dropped)))  # none lost, none failed
    assert next(s for s in report.stages if s.name == "turns").dropped == len(dropped)


async def test_two_stages_stopping_the_run_at_once_raise_the_first_reason_not_a_group() -> None:
    # A full disk is seen by the output writer and, while it unwinds, by a second writer: the
    # run stops with one FatalError a caller can catch and print, the other kept as a note.
    class Writer(Stage[int, int]):
        async def run(self, inbox: Inbox[int], outbox: Outbox[int]) -> None:
            async for env in inbox:
                raise pl.FatalError(f"cannot write to 'out.jsonl': File too large (row {env.seq})")

    class Flusher(Stage[int, int]):
        async def run(self, inbox: Inbox[int], outbox: Outbox[int]) -> None:
            try:
                await anyio.sleep_forever()
            finally:
                raise pl.FatalError("cannot write to 'failed.jsonl': File too large")

    with anyio.fail_after(5), pytest.raises(pl.FatalError, match=r"out\.jsonl") as caught:
        await Pipeline(Writer(), Flusher()).run([1, 2, 3])
    assert any("failed.jsonl" in note for note in getattr(caught.value, "__notes__", []))


async def test_drain_reads_every_result_and_counts_them() -> None:
    def double(x: int) -> int:
        return 2 * x

    async with Pipeline(range(50), pl.map(double, workers=4)).open() as results:
        assert await results.drain() == 50
        assert results.ok == 50
    assert results.report is not None and results.report.ok == 50 and results.report.balanced
