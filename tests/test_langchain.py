"""LangChain both ways: RunnableStage under our limits and retries; PipelineRunnable in chains."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from anyio.lowlevel import checkpoint
from langchain_core.language_models.fake_chat_models import (
    GenericFakeChatModel,
    ParrotFakeChatModel,
)
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_openai import ChatOpenAI

from pipeline import Pipeline
from pipeline._errors import ConfigError, MissingFieldError, QuotaExhaustedError
from pipeline._functions import filter as pfilter
from pipeline._functions import flat_map, map
from pipeline.testing._sim import SimConfig, serve
from stages._langchain import ItemFailedError, PipelineRunnable, RunnableStage
from stages.llm._caller import AuthenticationError, Limits, LLMCaller

pytestmark = pytest.mark.anyio

PROMPT = ChatPromptTemplate.from_messages([("user", "hi {name}")])
KEY = "sk-test-4f1c9a77d2e0"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # LangChain and the simulator are asyncio-only


class StatusError(Exception):
    """An SDK-like error carrying an HTTP status (and optionally a provider code)."""

    def __init__(self, status: int, message: str = "refused", code: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status
        self.code = code


def rows(n: int) -> list[dict[str, Any]]:
    return [{"name": f"n{i}"} for i in range(n)]


async def collect(pipeline: Pipeline) -> tuple[list[Any], Any]:
    out: list[Any] = []
    with anyio.fail_after(15):
        async with pipeline.open() as results:
            async for value in results:
                out.append(value)
    return out, results.report


# ------------------------------------------------------------------------------ RunnableStage


async def test_chain_runs_on_every_row_and_merges_its_output() -> None:
    chain = PROMPT | ParrotFakeChatModel() | StrOutputParser()
    out, report = await collect(Pipeline(rows(20), RunnableStage(chain, concurrency=4)))
    assert sorted(out, key=lambda r: int(r["name"][1:])) == [
        {"name": f"n{i}", "response": f"hi n{i}"} for i in range(20)
    ]
    assert report.ok == 20 and report.failed == 0 and report.balanced
    assert report.requests == 20 and report.retries == 0


async def test_input_field_and_value_output() -> None:
    stage = RunnableStage(RunnableLambda(str.upper), input="text", output="value")
    out, _ = await collect(Pipeline([{"text": "a"}, {"text": "b"}], stage))
    assert sorted(out) == ["A", "B"]


async def test_missing_input_field_is_dead_lettered_naming_it() -> None:
    stage = RunnableStage(RunnableLambda(str.upper), input="text", output="value")
    out, report = await collect(Pipeline([{"text": "a"}, {"body": "b"}], stage))
    assert out == ["A"]
    [failed] = report.failures
    assert failed.error_type == MissingFieldError.__name__
    assert "'text'" in failed.message and "body" in failed.message


async def test_status_errors_are_retried_under_the_retry_policy() -> None:
    calls: dict[str, int] = {}

    async def flaky(record: dict[str, Any]) -> str:
        seen = calls[record["name"]] = calls.get(record["name"], 0) + 1
        if seen <= 2:
            raise StatusError(503, "overloaded, try later")
        return record["name"] + "!"

    stage = RunnableStage(RunnableLambda(flaky), max_retries=3, backoff_base=0.001)
    out, report = await collect(Pipeline(rows(10), stage))
    assert len(out) == 10 and all(r["response"] == r["name"] + "!" for r in out)
    assert report.retries == 20 and report.requests == 30
    assert set(calls.values()) == {3}


async def test_client_errors_are_not_retried_and_keep_their_status() -> None:
    calls = 0

    async def bad(record: Any) -> str:
        nonlocal calls
        calls += 1
        raise StatusError(400, "prompt too long")

    stage = RunnableStage(RunnableLambda(bad), max_retries=5, backoff_base=0.001)
    _, report = await collect(Pipeline(rows(3), stage))
    assert calls == 3 and report.retries == 0
    assert [f.status for f in report.failures] == [400, 400, 400]
    assert all("prompt too long" in f.message for f in report.failures)


async def test_retries_exhausted_dead_letter_with_attempts() -> None:
    async def down(record: Any) -> str:
        raise StatusError(502, "bad gateway")

    stage = RunnableStage(RunnableLambda(down), max_retries=2, backoff_base=0.001)
    _, report = await collect(Pipeline(rows(2), stage))
    assert [f.attempts for f in report.failures] == [3, 3]
    assert all("gave up after 3 attempt(s)" in f.message for f in report.failures)


async def test_quota_code_stops_the_job() -> None:
    async def broke(record: Any) -> str:
        raise StatusError(429, "You exceeded your current quota", code="insufficient_quota")

    stage = RunnableStage(RunnableLambda(broke), max_retries=5, backoff_base=0.001)
    with pytest.raises(QuotaExhaustedError, match="retrying cannot help"):
        await collect(Pipeline(rows(5), stage))


async def test_attempt_timeout_abandons_a_hung_call_and_retries() -> None:
    attempts = 0

    async def hangs_once(record: Any) -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await anyio.sleep_forever()
        return "late but fine"

    stage = RunnableStage(
        RunnableLambda(hangs_once), output="value", timeout=0.05, backoff_base=0.001
    )
    out, report = await collect(Pipeline(["x"], stage))
    assert out == ["late but fine"] and report.retries == 1


async def test_fixed_concurrency_bounds_calls_in_flight() -> None:
    in_flight = peak = 0
    full = anyio.Event()

    async def call(record: Any) -> str:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if in_flight == 3:
            full.set()
        with anyio.fail_after(5):
            await full.wait()  # every call waits until three are in flight at once
        in_flight -= 1
        return "ok"

    stage = RunnableStage(RunnableLambda(call), concurrency=3, workers=10)
    out, _ = await collect(Pipeline(rows(30), stage))
    assert len(out) == 30 and peak == 3


async def test_usage_of_models_inside_a_chain_is_counted_and_priced() -> None:
    answer = AIMessage(
        content="fine",
        usage_metadata={"input_tokens": 7, "output_tokens": 3, "total_tokens": 10},
        response_metadata={"model_name": "fake-1"},
    )
    model = GenericFakeChatModel(messages=iter([answer] * 6))
    stage = RunnableStage(
        PROMPT | model | StrOutputParser(), prices={"fake-1": (1.0, 10.0)}, concurrency=2
    )
    out, report = await collect(Pipeline(rows(6), stage))
    assert {r["response"] for r in out} == {"fine"}
    assert report.prompt_tokens == 42 and report.completion_tokens == 18
    assert report.cost_usd == pytest.approx((42 * 1.0 + 18 * 10.0) / 1e6)


async def test_budget_stops_reading_input() -> None:
    answer = AIMessage(
        content="x",
        usage_metadata={"input_tokens": 1000, "output_tokens": 0, "total_tokens": 1000},
        response_metadata={"model_name": "fake-1"},
    )
    model = GenericFakeChatModel(messages=iter([answer] * 200))

    def endless() -> Iterator[dict[str, str]]:
        i = 0
        while True:
            yield {"name": str(i)}
            i += 1

    stage = RunnableStage(
        PROMPT | model, output="value", prices={"fake-1": (1000.0, 0.0)}, budget_usd=5.0
    )
    _, report = await collect(Pipeline(endless(), stage))
    assert report.stopped is not None and "budget" in report.stopped
    assert 5 <= report.ok < 200 and report.balanced


async def test_chat_openai_against_the_simulator_with_faults() -> None:
    async with (
        serve(SimConfig(error_5xx=0.2, error_429=0.05, retry_after_s=0.01, seed=7)) as sim,
        httpx.AsyncClient() as http,  # closed here: ChatOpenAI would leave its own open
    ):
        model = ChatOpenAI(
            model="sim-1", base_url=sim.url, api_key=KEY, max_retries=0, http_async_client=http
        )
        stage = RunnableStage(
            PROMPT | model | StrOutputParser(),
            concurrency=8,
            backoff_base=0.01,
            max_retries=8,
            prices={"sim-1": (1.0, 2.0)},
        )
        out, report = await collect(Pipeline(rows(60), stage))
        counters = sim.counters()
    assert sorted(r["response"] for r in out) == sorted(f"echo: hi n{i}" for i in range(60))
    assert report.failed == 0 and report.retries > 0
    assert report.requests == counters["requests"]  # the SDK itself retried nothing
    assert report.prompt_tokens == counters["prompt_tokens"]
    assert report.completion_tokens == counters["completion_tokens"]
    assert report.cost_usd > 0


async def test_chat_openai_streaming_sends_deltas_and_assembles_the_answer() -> None:
    deltas: dict[Any, list[str]] = {}

    def on_delta(env: Any, text: str) -> None:
        deltas.setdefault(env.key, []).append(text)

    async with serve(SimConfig()) as sim, httpx.AsyncClient() as http:
        model = ChatOpenAI(
            model="sim-1",
            base_url=sim.url,
            api_key=KEY,
            max_retries=0,
            stream_usage=True,
            http_async_client=http,
        )
        stage = RunnableStage(PROMPT | model, stream=True, on_delta=on_delta, output="value")
        out, report = await collect(Pipeline([{"name": "a b c"}, {"name": "d"}], stage))
    texts = sorted(m.content for m in out)
    assert texts == ["echo: hi a b c", "echo: hi d"]
    assert sorted("".join(parts) for parts in deltas.values()) == texts
    assert len(deltas[0]) > 1  # it really streamed
    assert report.completion_tokens > 0


async def test_rejected_key_stops_the_job_and_is_never_shown() -> None:
    async with serve(SimConfig(require_key="the-right-key")) as sim, httpx.AsyncClient() as http:
        model = ChatOpenAI(
            model="sim-1", base_url=sim.url, api_key=KEY, max_retries=0, http_async_client=http
        )
        stage = RunnableStage(PROMPT | model, concurrency=2)
        with pytest.raises(AuthenticationError) as caught:
            await collect(Pipeline(rows(10), stage))
    assert KEY not in str(caught.value)
    assert "rejected the API key" in str(caught.value)


async def test_api_key_inside_the_chain_is_redacted_from_dead_letters() -> None:
    def leaks(record: Any) -> str:
        raise ValueError(f"cannot use key {KEY} here")

    model = ChatOpenAI(model="m", base_url="http://127.0.0.1:9/v1", api_key=KEY, max_retries=0)
    stage = RunnableStage(RunnableLambda(leaks) | model)
    assert KEY in stage.secrets() and KEY not in repr(stage)
    _, report = await collect(Pipeline(rows(1), stage))
    [failed] = report.failures
    assert KEY not in failed.message and "***" in failed.message


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="needs a LangChain Runnable"):
        RunnableStage(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="output must be"):
        RunnableStage(RunnableLambda(str), output="completion")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- PipelineRunnable


def shout(text: str) -> str:
    return text.upper()


def checked(text: str) -> str:
    if text == "boom":
        raise ValueError("boom is not allowed")
    return text.upper()


async def test_ainvoke_runs_one_input() -> None:
    runnable = PipelineRunnable(Pipeline(map(shout)))
    with anyio.fail_after(5):
        assert await runnable.ainvoke("hello") == "HELLO"


async def test_abatch_keeps_input_order_even_when_completion_order_differs() -> None:
    async def slow_for_early(x: int) -> int:
        await anyio.sleep(0.002 * (20 - x))  # earlier inputs finish later
        return x * 10

    runnable = PipelineRunnable(Pipeline(map(slow_for_early, workers=20)))
    with anyio.fail_after(5):
        assert await runnable.abatch(list(range(20))) == [x * 10 for x in range(20)]


async def test_abatch_failures_raise_or_come_back_in_place() -> None:
    runnable = PipelineRunnable(Pipeline(map(checked)))
    with anyio.fail_after(5):
        got = await runnable.abatch(["a", "boom", "c"], return_exceptions=True)
        assert got[0] == "A" and got[2] == "C"
        assert isinstance(got[1], ItemFailedError)
        assert got[1].failed.error_type == "ValueError" and "boom" in str(got[1])
        with pytest.raises(ItemFailedError, match="boom is not allowed"):
            await runnable.abatch(["a", "boom"])
        with pytest.raises(ItemFailedError):
            await runnable.ainvoke("boom")


async def test_filtered_input_gives_none_and_many_gives_lists() -> None:
    keep_short = PipelineRunnable(Pipeline(pfilter(lambda s: len(s) < 3)))
    split = PipelineRunnable(Pipeline(flat_map(lambda s: list(s))), many=True)
    with anyio.fail_after(5):
        assert await keep_short.abatch(["ab", "abcd"]) == ["ab", None]
        assert await split.abatch(["ab", "c"]) == [["a", "b"], ["c"]]
        with pytest.raises(ConfigError, match="many=True"):
            await PipelineRunnable(Pipeline(flat_map(lambda s: list(s)))).ainvoke("ab")


async def test_astream_yields_outputs_as_they_complete() -> None:
    gate = anyio.Event()

    async def parts(s: str) -> list[str]:
        return [s + "1", s + "2"]

    async def hold(s: str) -> str:
        if s.endswith("2"):
            with anyio.fail_after(5):
                await gate.wait()  # the second output waits until the first was received
        return s

    runnable = PipelineRunnable(Pipeline(flat_map(parts), map(hold, workers=2)), many=True)
    seen: list[str] = []
    with anyio.fail_after(5):
        async for value in runnable.astream("x"):
            seen.append(value)
            gate.set()
    assert seen == ["x1", "x2"]


async def test_astream_can_be_left_early() -> None:
    runnable = PipelineRunnable(Pipeline(flat_map(lambda s: [s] * 100)), many=True)
    with anyio.fail_after(5):
        stream = runnable.astream("x")
        async for value in stream:
            assert value == "x"
            break
        await stream.aclose()  # type: ignore[attr-defined]


async def test_drops_into_a_langchain_chain() -> None:
    enrich = PipelineRunnable(
        Pipeline(RunnableStage(PROMPT | ParrotFakeChatModel() | StrOutputParser()))
    )
    chain = RunnableLambda(lambda s: {"name": s}) | enrich | RunnableLambda(lambda r: r["response"])
    with anyio.fail_after(10):
        assert await chain.ainvoke("ada") == "hi ada"
        assert await chain.abatch(["a", "b", "c"]) == ["hi a", "hi b", "hi c"]
        assert [c async for c in chain.astream("z")] == ["hi z"]


async def test_concurrent_calls_on_one_pipeline_take_turns() -> None:
    caller = LLMCaller(call=lambda r: _echo(r), output="merge", limits=Limits(concurrency=2))
    runnable = PipelineRunnable(Pipeline(caller))
    results: list[Any] = []

    async def one(i: int) -> None:
        results.append(await runnable.ainvoke({"i": i}))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(one, i)
    assert sorted(r["i"] for r in results) == list(range(5))


async def _echo(record: Any) -> str:
    await checkpoint()
    return f"seen {record['i']}"


async def test_a_factory_builds_a_pipeline_per_call() -> None:
    built = 0

    def factory() -> Pipeline:
        nonlocal built
        built += 1
        return Pipeline(map(shout))

    runnable = PipelineRunnable(factory)
    with anyio.fail_after(5):
        assert await runnable.ainvoke("a") == "A"
        assert await runnable.abatch(["b", "c"]) == ["B", "C"]
    assert built == 2


def test_sync_invoke_and_batch_outside_an_event_loop() -> None:
    runnable = PipelineRunnable(Pipeline(map(shout)))
    assert runnable.invoke("a") == "A"
    assert runnable.batch(["b", "c"]) == ["B", "C"]


async def test_sync_invoke_inside_a_loop_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="ainvoke"):
        PipelineRunnable(Pipeline(map(shout))).invoke("a")


def test_a_pipeline_with_its_own_source_is_refused() -> None:
    with pytest.raises(ConfigError, match="declares a source"):
        PipelineRunnable(Pipeline(["a"], map(shout)))


def test_the_langchain_example_runs_cleanly() -> None:
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "langchain_chain.py"
    done = subprocess.run(
        [sys.executable, "-W", "error", str(example)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no unclosed sockets or other warnings
    assert "stage: 50 ok, 0 failed" in done.stdout
    assert "chain: 50 answers, first: topic 0 -> echo: One word for topic 0" in done.stdout
