"""Specification of the LLM caller: configuration, templates, structured output, retry policy,
and the happy paths end to end through a real socket against the simulated provider."""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from tenacity import RetryCallState

from pipeline import Pipeline
from pipeline._envelope import Envelope
from pipeline._errors import ConfigError, MissingFieldError
from pipeline._json import loads
from pipeline._report import RunReport
from pipeline.testing._sim import SimConfig, embedding_for, serve
from stages._batch import Batcher
from stages.llm._admission import states_limits
from stages.llm._cache import ResponseCache
from stages.llm._caller import (
    HTTP,
    Completion,
    Limits,
    LLMCaller,
    LLMCallError,
    Output,
    Price,
    Retry,
)
from stages.llm._limits import RateLimiter
from stages.llm._output import Validator, answer_of
from stages.llm._prompt import one_message_payload
from stages.llm._providers import AzureProvider, make_provider
from stages.llm._retry import RowPolicy
from stages.llm._sse import Usage
from stages.llm._template import PromptTemplate
from stages.llm._transport import encode_body, parse_answer

KEY = "sk-test-DISTINCTIVE-7f3a9c"

# -- configuration -----------------------------------------------------------------------------


def test_model_is_required_unless_a_call_is_given() -> None:
    with pytest.raises(ConfigError, match="needs model="):
        LLMCaller(prompt="x")

    async def call(record: Any) -> str:
        return "ok"

    LLMCaller(call=call)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"endpoint": "images"}, "endpoint must be"),
        ({"output": "both"}, "output must be"),
        ({"limits": lambda: Limits(concurrency=0)}, "concurrency must be"),
        ({"limits": lambda: Limits(max_concurrency=0)}, "max_concurrency must be"),
        ({"rpm": 5, "limits": lambda: Limits(rpm=6)}, "rpm= is given twice"),
        ({"http": lambda: HTTP(timeout=0)}, "timeout must be > 0"),
        ({"http": lambda: HTTP(idle_timeout=-1)}, "idle_timeout must be > 0"),
        ({"retry": lambda: Retry(deadline_s=-1)}, "deadline_s must be"),
        ({"retry": lambda: Retry(max_retries=-1)}, "max_retries must be"),
        ({"retry": lambda: Retry(backoff_cap=0)}, "backoff_cap must be"),
        ({"output": lambda: Output(reask=-1)}, "reask must be"),
        ({"output": lambda: Output(budget_usd=1.0)}, "budget_usd needs prices"),
        ({"provider": "anthropic", "endpoint": "embeddings"}, "no embeddings endpoint"),
        (
            {"endpoint": "embeddings", "output": lambda: Output(stream=True)},
            "stream=True applies to chat",
        ),
        ({"provider": "azure"}, "needs base_url"),
        (
            {"provider": lambda: make_provider("openai", "http://x"), "base_url": "http://y"},
            "base_url= is for a provider given by name",
        ),
        ({"prompt": "unclosed {name"}, "malformed"),
        ({"output": lambda: Output(schema=42)}, "schema must be"),  # type: ignore[arg-type]
        ({"output": lambda: Output(schema={"type": "no-such-type"})}, "not a valid JSON schema"),
    ],
)
def test_bad_configuration_is_refused_with_a_clear_message(
    kwargs: dict[str, Any], match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # option objects are built inside the check: they validate themselves when built
    monkeypatch.delenv("AZURE_OPENAI_ENDPOINT", raising=False)
    with pytest.raises(ConfigError, match=match):
        built = {k: v() if callable(v) else v for k, v in kwargs.items()}
        LLMCaller(model="m", **built)


def test_the_constructor_keeps_the_readme_keywords_and_groups_the_rest() -> None:
    caller = LLMCaller(model="gpt-4o-mini", prompt="Say hello to {name}", rpm=500)
    assert caller.limits.rpm == 500 and caller.limits.tpm is None
    assert caller.retry == Retry() and caller.output == Output() and caller.http == HTTP()
    tuned = LLMCaller(model="m", rpm=60, limits=Limits(tpm=1000, concurrency=2))
    assert (tuned.limits.rpm, tuned.limits.tpm, tuned.limits.concurrency) == (60, 1000, 2)
    assert LLMCaller(model="m", output="completion").output.form == "completion"


def test_the_constructor_takes_under_fifteen_keywords() -> None:
    # the rarer options live in Limits, Retry, Output and HTTP; a new option goes there too
    parameters = list(inspect.signature(LLMCaller.__init__).parameters.values())[1:]
    assert len(parameters) < 15
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)


def test_a_limiter_given_in_limits_is_the_callers_part_not_an_option() -> None:
    shared = RateLimiter(rpm=60)
    caller = LLMCaller(model="m", limits=Limits(limiter=shared))
    assert caller.limiter is shared and caller.limits.limiter is None  # one reference to it


def test_repr_is_readable_and_shows_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    caller = LLMCaller(
        model="gpt-4o-mini",
        prompt="Say hello to {name}",
        base_url="http://127.0.0.1:1/v1",
        rpm=100,
        http=HTTP(headers={"Authorization": f"Bearer {KEY}", "X-Team": "a"}),
    )
    text = repr(caller)
    assert text.startswith("LLMCaller(name='llm', model='gpt-4o-mini', provider='openai'")
    assert "rpm=100" in text and "prompt='Say hello to {name}'" in text
    assert "headers=[Authorization, X-Team]" in text
    assert KEY not in text


def test_secrets_lists_the_key_and_sensitive_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", KEY)
    caller = LLMCaller(
        model="m",
        base_url="http://127.0.0.1:1/v1",
        http=HTTP(
            api_key_env="MY_KEY",
            headers={"x-api-key": "other-secret", "Authorization": "Bearer third-secret"},
        ),
    )
    secrets = caller.secrets()
    assert KEY in secrets and "other-secret" in secrets and "third-secret" in secrets
    assert caller._scrub(f"oops {KEY} and third-secret") == "oops *** and ***"


def test_default_workers_are_twice_the_concurrency_ceiling() -> None:
    assert LLMCaller(model="m", limits=Limits(concurrency=5)).workers == 10
    assert LLMCaller(model="m", limits=Limits(max_concurrency=20)).workers == 40
    assert LLMCaller(model="m").buffer == 64  # a burst of answers finds rows waiting
    assert LLMCaller(model="m", limits=Limits(concurrency=5)).buffer == 16
    assert LLMCaller(model="m", limits=Limits(buffer=3)).buffer == 3
    assert LLMCaller(model="m", limits=Limits(workers=3)).workers == 3


# -- templates ---------------------------------------------------------------------------------


def test_template_fills_fields_and_plain_values() -> None:
    assert PromptTemplate("Say hello to {name}").render({"name": "Ada"}) == "Say hello to Ada"
    assert PromptTemplate("{name} is {age}").render({"name": "Bo", "age": 3}) == "Bo is 3"
    assert PromptTemplate("echo {value}").render("x") == "echo x"


def test_missing_field_names_the_field_and_what_the_record_has() -> None:
    with pytest.raises(MissingFieldError) as info:
        PromptTemplate("Hello {name}, from {city}").render({"name": "Ada", "age": 3})
    assert info.value.field == "city"
    assert str(info.value) == "missing field 'city' (record has: age, name)"


# -- structured output -------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"enum": ["pos", "neg"]}, "score": {"type": "number"}},
    "required": ["sentiment"],
}


def test_validator_parses_json_even_inside_a_code_fence() -> None:
    check = Validator(SCHEMA)
    assert check('{"sentiment": "pos"}') == {"sentiment": "pos"}
    assert check('```json\n{"sentiment": "neg", "score": 1}\n```') == {
        "sentiment": "neg",
        "score": 1,
    }


def test_validator_says_where_the_answer_is_wrong() -> None:
    check = Validator(SCHEMA)
    with pytest.raises(ValueError, match="not valid JSON"):
        check("sure! here it is")
    with pytest.raises(ValueError, match=r"at sentiment: 'meh' is not one of"):
        check('{"sentiment": "meh"}')
    with pytest.raises(ValueError, match="at \\(root\\): 'sentiment' is a required property"):
        check("{}")
    with pytest.raises(ValueError, match="no text"):
        check(None)


def test_validator_accepts_a_pydantic_model() -> None:
    from pydantic import BaseModel

    class Verdict(BaseModel):
        sentiment: str
        score: float = 0.0

    check = Validator(Verdict)
    parsed = check('{"sentiment": "pos", "score": 0.5}')
    assert isinstance(parsed, Verdict) and parsed.score == 0.5
    with pytest.raises(ValueError, match="sentiment"):
        check('{"score": 1}')


# -- retry policy ------------------------------------------------------------------------------


def _state(attempt: int, error: BaseException | None = None, sleep: float = 0.0) -> RetryCallState:
    state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.attempt_number = attempt
    if error is not None:
        state.set_exception((type(error), error, None))
    state.upcoming_sleep = sleep
    return state


def test_backoff_is_full_jitter_under_a_ceiling_that_doubles_per_retry_up_to_the_cap() -> None:
    retry = Retry(backoff_base=0.5, backoff_cap=4.0)
    error = LLMCallError("x", retryable=True)
    ceilings = {1: 0.5, 2: 1.0, 3: 2.0, 4: 4.0, 5: 4.0, 8: 4.0}
    for attempt, ceiling in ceilings.items():
        policy = RowPolicy(retry, None)
        delays = [policy.wait(_state(attempt, error)) for _ in range(400)]
        assert all(0 <= d <= ceiling for d in delays)
        # full jitter: the draws cover the whole range under the ceiling
        assert max(delays) > 0.9 * ceiling and min(delays) < 0.1 * ceiling
        # so a row's delays grow on average with each retry, until the cap
        assert 0.4 * ceiling < sum(delays) / len(delays) < 0.6 * ceiling


def test_retry_after_is_the_least_wait_and_the_jitter_lengthens_it_past_the_ceiling() -> None:
    policy = RowPolicy(Retry(backoff_base=0.5, backoff_cap=8.0), None)
    error = LLMCallError("429", retryable=True, retry_after=1.0)
    assert all(policy.wait(_state(1, error)) == 1.0 for _ in range(50))  # ceiling 0.5
    later = [policy.wait(_state(4, error)) for _ in range(400)]  # ceiling 4
    assert min(later) == 1.0 and max(later) > 3.5


def test_backoff_never_waits_less_than_retry_after() -> None:
    policy = RowPolicy(Retry(backoff_base=0.1), None)
    error = LLMCallError("429", retryable=True, retry_after=3.0)
    assert all(policy.wait(_state(1, error)) == 3.0 for _ in range(20))


def test_stop_after_one_plus_max_retries_attempts() -> None:
    policy = RowPolicy(Retry(max_retries=2), None)
    assert not policy.stop(_state(1))
    assert not policy.stop(_state(2))
    assert policy.stop(_state(3))


def test_stop_when_the_next_wait_would_pass_the_deadline() -> None:
    import time

    policy = RowPolicy(Retry(max_retries=10), time.perf_counter() + 5.0)
    assert not policy.stop(_state(1, sleep=1.0))
    assert not policy.past_deadline
    assert policy.stop(_state(1, sleep=3600.0))
    assert policy.past_deadline


# -- what a custom call may return -------------------------------------------------------------


def test_answer_of_reads_strings_completions_and_sdk_like_objects() -> None:
    assert answer_of("hi").text == "hi"
    done = Completion(text="t", usage=Usage(1, 2), model="m", finish_reason="stop")
    assert answer_of(done).usage == Usage(1, 2)

    class Message:
        content = "from sdk"

    class Choice:
        message = Message()

    class SDKUsage:
        prompt_tokens = 7
        completion_tokens = 3

    class ChatCompletion:
        choices = (Choice(),)
        usage = SDKUsage()
        model = "gpt"

    answer = answer_of(ChatCompletion())
    assert answer.text == "from sdk" and answer.usage == Usage(7, 3) and answer.model == "gpt"
    assert answer_of({"usage": {"input_tokens": 4, "output_tokens": 1}}).usage == Usage(4, 1)


def test_price_cost_is_per_million_tokens() -> None:
    assert Price(2.5, 10.0).cost(Usage(1_000_000, 100_000)) == pytest.approx(3.5)


# -- end to end against the simulated provider (real sockets on 127.0.0.1) -----------------------

ROWS = [{"name": name} for name in ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _run(caller: LLMCaller, rows: Sequence[Any]) -> tuple[list[Any], RunReport]:
    """Run ``rows`` through ``caller``; return the results in input order and the report."""
    out: list[Any] = []
    with anyio.fail_after(20):
        async with Pipeline(rows, caller, ordered=True).open() as results:
            async for value in results:
                out.append(value)
    assert results.report is not None
    return out, results.report


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.mark.anyio
async def test_chat_merges_the_answer_into_each_record() -> None:
    async with serve(SimConfig(require_key=KEY)) as sim:
        caller = LLMCaller(model="sim-1", prompt="Say hello to {name}", base_url=sim.url)
        results, report = await _run(caller, ROWS)
        counters = sim.counters()
    assert results == [{**row, "response": f"echo: Say hello to {row['name']}"} for row in ROWS]
    assert report.failures == [] and report.ok == len(ROWS)
    stats = report.stages[1]
    assert stats.requests == len(ROWS) == counters["requests"]
    assert stats.retries == 0
    assert stats.prompt_tokens == counters["prompt_tokens"] > 0
    assert stats.completion_tokens == counters["completion_tokens"] > 0


@pytest.mark.anyio
async def test_completion_output_carries_usage_model_and_cost() -> None:
    async with serve() as sim:
        caller = LLMCaller(
            model="sim-1",
            prompt="{name}",
            system="be nice",
            base_url=sim.url,
            output=Output(form="completion", prices={"sim-1": Price(1000.0, 2000.0)}),
        )
        results, report = await _run(caller, ROWS[:2])
    first = results[0]
    assert isinstance(first, Completion)
    assert first.text == "echo: Ada" and first.finish_reason == "stop" and first.model == "sim-1"
    # prompt tokens count the system prompt and the user message: (8 + 3) // 4 = 2
    assert first.usage == Usage(2, 2)
    assert first.attempts == 1 and first.latency_s > 0 and not first.cached
    assert first.cost_usd == pytest.approx((2 * 1000 + 2 * 2000) / 1e6)
    assert report.stages[1].cost_usd == pytest.approx(sum(r.cost_usd for r in results))


@pytest.mark.anyio
async def test_streaming_chat_sends_deltas_and_assembles_the_answer() -> None:
    deltas: dict[int, list[str]] = {}

    async def on_delta(env: Envelope[Any], text: str) -> None:
        deltas.setdefault(env.seq, []).append(text)

    async with serve(SimConfig(tokens_per_s=2000)) as sim:
        caller = LLMCaller(
            model="sim-1",
            prompt="Tell {name} a long story about streams",
            base_url=sim.url,
            output=Output(form="completion", stream=True, on_delta=on_delta),
        )
        results, report = await _run(caller, ROWS[:3])
    for seq, (row, result) in enumerate(zip(ROWS[:3], results, strict=True)):
        expected = f"echo: Tell {row['name']} a long story about streams"
        assert result.text == expected
        assert "".join(deltas[seq]) == expected and len(deltas[seq]) > 3
        assert result.usage is not None and result.usage.completion_tokens > 0
    assert report.stages[1].completion_tokens == sum(r.usage.completion_tokens for r in results)


@pytest.mark.anyio
async def test_anthropic_messages_plain_and_streaming() -> None:
    async with serve(SimConfig(require_key=KEY)) as sim:
        for stream in (False, True):
            caller = LLMCaller(
                model="claude-sim",
                provider="anthropic",
                prompt="Hi {name}",
                system="short answers",
                base_url=sim.base_url + "/v1",
                output=Output(form="completion", stream=stream),
            )
            results, report = await _run(caller, ROWS[:2])
            assert [r.text for r in results] == ["echo: Hi Ada", "echo: Hi Grace"]
            assert all(r.finish_reason == "end_turn" and r.usage is not None for r in results)
            assert report.failures == []
        assert sim.counters()["by_route"]["/v1/messages"] == {"200": 4}


@pytest.mark.anyio
async def test_azure_uses_deployment_url_api_version_and_api_key_header() -> None:
    async with serve(SimConfig(require_key=KEY)) as sim:
        caller = LLMCaller(
            model="gpt-4o",
            provider=AzureProvider(sim.base_url, deployment="prod-4o"),
            prompt="{name}",
            output="completion",
        )
        results, _ = await _run(caller, ROWS[:2])
        routes = sim.counters()["by_route"]
    assert [r.text for r in results] == ["echo: Ada", "echo: Grace"]
    assert results[0].model == "prod-4o"  # the deployment answered
    assert routes == {"/openai/deployments/{deployment}/chat/completions": {"200": 2}}


@pytest.mark.anyio
async def test_paradigm_style_base_url_prefix() -> None:
    async with serve() as sim:
        caller = LLMCaller(model="alfred", prompt="{name}", base_url=sim.base_url + "/api/v2")
        results, _ = await _run(caller, ROWS[:2])
        assert sim.counters()["by_route"] == {"/api/v2/chat/completions": {"200": 2}}
    assert [r["response"] for r in results] == ["echo: Ada", "echo: Grace"]


@pytest.mark.anyio
async def test_embeddings_one_row_per_request() -> None:
    async with serve(SimConfig(embedding_dim=4)) as sim:
        caller = LLMCaller(
            model="sim-embed-1", endpoint="embeddings", prompt="{name}", base_url=sim.url
        )
        results, report = await _run(caller, ROWS[:3])
    for row, result in zip(ROWS[:3], results, strict=True):
        assert result["response"] == pytest.approx(embedding_for(row["name"], 4))
    assert report.stages[1].requests == 3
    assert report.stages[1].completion_tokens == 0 and report.stages[1].prompt_tokens == 3


@pytest.mark.anyio
async def test_embeddings_batches_go_in_one_request_and_split_back_in_order() -> None:
    rows = [{"text": f"row number {i}"} for i in range(10)]
    async with serve(SimConfig(embedding_dim=4)) as sim:
        caller = LLMCaller(
            model="sim-embed-1", endpoint="embeddings", base_url=sim.url, output="completion"
        )
        out: list[Any] = []
        with anyio.fail_after(20):
            async with Pipeline(
                rows, Batcher(max_items=4, max_wait=5), caller, ordered=True
            ).open() as results:
                async for value in results:
                    out.append(value)
        counters = sim.counters()
    assert counters["by_route"] == {"/v1/embeddings": {"200": 3}}  # 4 + 4 + 2
    assert [c.embedding for c in out] == [pytest.approx(embedding_for(r["text"], 4)) for r in rows]
    assert results.report is not None and results.report.ok == 10


@pytest.mark.anyio
async def test_batch_member_missing_a_field_fails_alone() -> None:
    rows: list[dict[str, Any]] = [{"text": "a"}, {"other": 1}, {"text": "c"}]
    async with serve() as sim:
        caller = LLMCaller(model="e", endpoint="embeddings", prompt="{text}", base_url=sim.url)
        with anyio.fail_after(20):
            report = await Pipeline(rows, Batcher(max_items=3, max_wait=5), caller).run()
    assert report.ok == 2 and report.failed == 1
    assert report.failures[0].item == {"other": 1}
    assert "missing field 'text'" in report.failures[0].message


@pytest.mark.anyio
async def test_missing_template_field_dead_letters_naming_the_field() -> None:
    rows: list[dict[str, Any]] = [{"name": "Ada"}, {"nom": "Grace"}]
    async with serve() as sim:
        caller = LLMCaller(model="m", prompt="Hello {name}", base_url=sim.url)
        results, report = await _run(caller, rows)
        assert sim.counters()["requests"] == 1  # the bad row never reached the server
    assert results == [{"name": "Ada", "response": "echo: Hello Ada"}]
    (failed,) = report.failures
    assert failed.item == {"nom": "Grace"} and failed.error_type == "MissingFieldError"
    assert failed.message == "missing field 'name' (record has: nom)"
    assert failed.seq == 1


@pytest.mark.anyio
async def test_records_without_template_may_be_strings_or_carry_messages() -> None:
    rows: list[Any] = [
        "plain prompt",
        {"messages": [{"role": "user", "content": "from messages"}]},
        {"prompt": "from prompt field"},
    ]
    async with serve() as sim:
        results, _ = await _run(LLMCaller(model="m", base_url=sim.url), rows)
    assert results == [
        {"value": "plain prompt", "response": "echo: plain prompt"},
        {**rows[1], "response": "echo: from messages"},
        {**rows[2], "response": "echo: from prompt field"},
    ]


@pytest.mark.anyio
async def test_structured_output_is_parsed_and_validated() -> None:
    schema = {"type": "object", "properties": {"echo": {"type": "string"}}, "required": ["echo"]}
    async with serve() as sim:
        caller = LLMCaller(
            model="m",
            prompt="{name}",
            base_url=sim.url,
            params={"response_format": {"type": "json_object"}},
            output=Output(schema=schema, field="data"),
        )
        results, report = await _run(caller, ROWS[:2])
    assert results == [
        {"name": "Ada", "data": {"echo": "Ada"}},
        {"name": "Grace", "data": {"echo": "Grace"}},
    ]
    assert report.failures == []


@pytest.mark.anyio
async def test_invalid_structured_output_is_sent_back_with_the_error() -> None:
    # The simulator echoes the last user message, so the first answer fails the pattern and
    # the re-ask (which quotes the validation error) passes it.
    schema = {"type": "object", "properties": {"echo": {"pattern": "^Your answer is not valid"}}}
    async with serve() as sim:
        caller = LLMCaller(
            model="m",
            prompt="{name}",
            base_url=sim.url,
            params={"response_format": {"type": "json_object"}},
            output=Output(form="completion", schema=schema, reask=2),
        )
        results, report = await _run(caller, ROWS[:1])
    (done,) = results
    assert done.parsed["echo"].startswith("Your answer is not valid: at echo: 'Ada' does not match")
    assert done.attempts == 2 and report.stages[1].requests == 2
    assert caller.totals.reasks == 1


@pytest.mark.anyio
async def test_call_escape_hatch_gets_limits_retries_and_accounting() -> None:
    calls: list[str] = []

    async def call(record: dict[str, Any]) -> Completion:
        calls.append(record["name"])
        if calls.count(record["name"]) == 1:
            raise ConnectionResetError("flaky network")
        return Completion(text=f"hi {record['name']}", usage=Usage(3, 1), model="custom")

    caller = LLMCaller(
        call=call,
        limits=Limits(concurrency=2),
        retry=Retry(backoff_base=0.001),
        output=Output(prices={"custom": (1e6, 0)}),
    )
    results, report = await _run(caller, ROWS[:3])
    assert [r["response"].text for r in results] == ["hi Ada", "hi Grace", "hi Alan"]
    stats = report.stages[1]
    assert stats.requests == 6 and stats.retries == 3
    assert stats.prompt_tokens == 9 and stats.completion_tokens == 3
    assert stats.cost_usd == pytest.approx(9.0)


class _ServerError(Exception):
    """What an SDK raises for a 500 that asks to be retried after 0.2 s."""

    status_code = 500

    def __init__(self) -> None:
        super().__init__("internal error")
        self.response = SimpleNamespace(headers={"retry-after": "0.2"})


@pytest.mark.anyio
async def test_a_spare_worker_takes_a_row_while_another_waits_to_be_retried() -> None:
    answered: list[str] = []

    async def call(record: str) -> str:
        if record == "a" and not answered:
            answered.append("a failed")
            raise _ServerError()
        answered.append(record)
        return record

    # one request slot, two workers: while "a" waits 0.2 s for its retry, "b" goes
    caller = LLMCaller(call=call, limits=Limits(concurrency=1, workers=2))
    results, report = await _run(caller, ["a", "b"])
    assert answered == ["a failed", "b", "a"]
    assert [r["response"] for r in results] == ["a", "b"] and report.stages[1].retries == 1


@pytest.mark.anyio
async def test_spare_workers_take_no_row_while_no_row_is_retried() -> None:
    in_flight = 0
    most = 0

    async def call(record: str) -> str:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await anyio.sleep(0.01)  # the request's latency
        in_flight -= 1
        return record

    # two slots, six workers: the four spare workers wait for a seat, not with a row for a
    # slot (which would cost every row a wake-up)
    caller = LLMCaller(call=call, limits=Limits(concurrency=2, workers=6))
    rows = [str(i) for i in range(12)]
    results, report = await _run(caller, rows)
    assert [r["response"] for r in results] == rows and most == 2
    assert report.stages[1].requests == 12
    assert caller.totals.slot_waits == 0  # no row ever queued for a slot while holding a seat


@pytest.mark.anyio
async def test_seats_follow_the_adaptive_limit() -> None:
    in_flight = 0
    most = 0

    async def call(record: str) -> str:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await anyio.sleep(0.005)  # the request's latency
        in_flight -= 1
        return record

    # the limit starts at 16 and grows by one every 16 or so answers, up to 20: each time
    # one more worker gets a seat, and no row ever waits with a seat for a request slot
    caller = LLMCaller(call=call, limits=Limits(max_concurrency=20))
    rows = [str(i) for i in range(120)]
    results, report = await _run(caller, rows)
    assert [r["response"] for r in results] == rows and report.stages[1].requests == 120
    assert 16 < most <= 20
    assert caller.totals.slot_waits == 0


@pytest.mark.anyio
async def test_call_escape_hatch_does_not_retry_a_plain_bug() -> None:
    async def call(record: Any) -> str:
        raise ValueError("bug in user code")

    results, report = await _run(LLMCaller(call=call), ["x"])
    assert results == [] and report.failures[0].error_type == "ValueError"
    assert report.failures[0].attempts == 1 and report.stages[1].retries == 0


@pytest.mark.anyio
async def test_cache_serves_a_repeated_run_without_requests(tmp_path: Any) -> None:
    async with serve() as sim:
        async with ResponseCache(tmp_path) as cache:
            first, _ = await _run(
                LLMCaller(model="m", prompt="{name}", base_url=sim.url, http=HTTP(cache=cache)),
                ROWS,
            )
            assert sim.counters()["requests"] == len(ROWS)
            again = LLMCaller(model="m", prompt="{name}", base_url=sim.url, http=HTTP(cache=cache))
            second, report = await _run(again, ROWS)
        assert sim.counters()["requests"] == len(ROWS)  # nothing new was sent
    assert second == first
    assert again.totals.cache_hits == len(ROWS) and report.stages[1].requests == 0


@pytest.mark.anyio
async def test_fixed_concurrency_bounds_requests_in_flight() -> None:
    async with serve(SimConfig(latency_ms=20)) as sim:
        caller = LLMCaller(
            model="m", prompt="{name}", base_url=sim.url, limits=Limits(concurrency=2)
        )
        _, report = await _run(caller, ROWS * 2)
        counters = sim.counters()
    assert counters["concurrent_max"] == 2 and report.ok == 12
    # rows wait for a worker's seat, never in line for a request slot once they have one
    assert caller.totals.slot_waits == 0 and caller.totals.slot_wait_s == 0


@pytest.mark.anyio
async def test_rpm_limit_spaces_requests() -> None:
    async with serve() as sim:
        caller = LLMCaller(model="m", prompt="{name}", base_url=sim.url, rpm=1200)  # 20/s
        started = anyio.current_time()
        _, report = await _run(caller, [{"name": str(i)} for i in range(60)])
        elapsed = anyio.current_time() - started
    # a burst of 1 s worth (20: no headers say otherwise) goes at once, the other 40 at 20/s:
    # enough rows that even a loaded machine sends faster than the limit, so the limiter waits
    assert elapsed >= 1.9
    assert report.ok == 60 and report.stages[1].limiter_wait_s > 0
    assert caller.totals.limiter_wait_s > 0


@pytest.mark.anyio
@pytest.mark.parametrize("server_rpm", [None, 60_000])
async def test_a_caller_without_rpm_asks_its_limiter_once_the_server_states_a_limit(
    server_rpm: int | None,
) -> None:
    async with serve(SimConfig(rpm=server_rpm)) as sim:
        caller = LLMCaller(
            model="m", prompt="{name}", base_url=sim.url, limits=Limits(concurrency=1)
        )
        with anyio.fail_after(10):
            async with Pipeline(ROWS[:3], caller).open() as results:
                async for _ in results:
                    state = caller.run_state.admission
                    limiter = state.limiter
                    assert isinstance(limiter, RateLimiter)
                    stats = limiter.statistics()
                    if server_rpm is None:
                        assert not state.limited and stats.rpm is None
                    else:  # learned from the first answer's headers, obeyed from then on
                        assert state.limited and stats.rpm == server_rpm and stats.learned
                        assert stats.acquired >= 1


@pytest.mark.parametrize("fast", ["orjson", "stdlib"])
def test_response_bodies_parse_like_json_loads(fast: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if fast == "stdlib":
        monkeypatch.setattr("pipeline._json._orjson", None)
    provider = make_provider("openai", "http://127.0.0.1:9/v1")

    def parse(raw: bytes) -> Any:
        return parse_answer(provider, "chat", raw, 1, str)

    body = {"choices": [{"message": {"content": "é 😀"}}], "usage": {"prompt_tokens": 3}}
    assert parse(json.dumps(body).encode()).text == "é 😀"
    assert parse(json.dumps(body, ensure_ascii=False).encode("utf-16")).text == "é 😀"
    nan = {"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": float("nan")}}
    assert parse(json.dumps(nan).encode()).usage is None  # NaN: the stdlib's extension
    # integers past 64 bits keep every digit (orjson would read them as floats)
    assert loads(b'{"n": 12345678901234567890123}')["n"] == 12345678901234567890123
    assert loads(b"[-1234567890123456789, 123456789012345678]") == [
        -1234567890123456789,
        123456789012345678,
    ]
    for raw in (b"<html>502 Bad Gateway</html>", b""):
        with pytest.raises(LLMCallError, match="non-JSON body") as info:
            parse(raw)
        assert info.value.retryable and info.value.status == 200


def test_rate_limit_headers_are_noticed_in_any_case() -> None:
    assert states_limits([(b"Date", b"x"), (b"X-RateLimit-Remaining-Requests", b"3")])
    assert states_limits([(b"anthropic-ratelimit-tokens-limit", b"10")])
    assert not states_limits([(b"Content-Type", b"application/json"), (b"age", b"1")])
    assert not states_limits([])


@pytest.mark.parametrize("provider", ["openai", "azure", "anthropic"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("system", [None, 'Be "brief"\n'])
def test_one_message_body_is_the_body_encoded_whole(
    provider: Any, stream: bool, system: str | None
) -> None:
    caller = LLMCaller(
        model="m",
        provider=provider,
        base_url="http://127.0.0.1:9/v1",
        system=system,
        params={"temperature": 0.5, "stop": ["\u2028", "é"], "metadata": {"k": [1, None]}},
        output=Output(stream=stream),
    )
    parts = caller._chat_parts()
    assert parts is not None and caller.provider is not None
    for text in ["", "plain", 'quotes " and \\ backslashes', "é 😀 \u2028 \x00 \n\t"]:
        fast = one_message_payload(parts, text)
        body = caller.provider.chat_body(
            "m", [{"role": "user", "content": text}], system, caller.params, stream
        )
        assert fast == encode_body(body)
        assert json.loads(fast) == body


def test_one_message_body_is_not_split_when_the_cache_needs_the_body(tmp_path: Any) -> None:
    cache = ResponseCache(tmp_path / "cache.db")
    assert (
        LLMCaller(model="m", base_url="http://127.0.0.1:9", http=HTTP(cache=cache))._chat_parts()
        is None
    )
    embed = LLMCaller(model="m", base_url="http://127.0.0.1:9", endpoint="embeddings")
    assert embed._chat_parts() is None


@pytest.mark.anyio
async def test_text_that_is_not_valid_unicode_fails_the_row_on_either_body_path() -> None:
    async with serve() as sim:
        caller = LLMCaller(model="m", prompt="{name}", base_url=sim.url)
        plain = LLMCaller(model="m", base_url=sim.url, name="plain")
        rows = [{"name": "ok"}, {"name": "bad \ud800"}]
        results, report = await _run(caller, rows)
        listed = [{"messages": [{"role": "user", "content": "bad \udfff"}]}]
        _, listed_report = await _run(plain, listed)
    assert results == [{"name": "ok", "response": "echo: ok"}]
    (failed,) = report.failures
    assert "not valid Unicode" in failed.message and failed.item == {"name": "bad \ud800"}
    assert "not valid Unicode" in listed_report.failures[0].message


@pytest.mark.anyio
async def test_spans_show_attempts_tokens_retries_and_waits_without_the_key() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    rows = [{"name": f"n{i}"} for i in range(12)]
    async with serve(SimConfig(error_5xx=0.3, seed=3, require_key=KEY)) as sim:
        caller = LLMCaller(
            model="m",
            prompt="{name}",
            base_url=sim.url,
            rpm=3000,
            # one request's worth of burst, then one every 20 ms: every row after the first
            # waits for the limiter however fast the machine is
            limits=Limits(concurrency=1, burst_s=0.02),
            retry=Retry(backoff_base=0.001),
        )
        with anyio.fail_after(20):
            report = await Pipeline(rows, caller, tracing=provider).run()
    assert report.ok == 12 and report.stages[1].retries > 0
    spans = [s for s in exporter.get_finished_spans() if s.name == "llm"]
    assert len(spans) == 12
    attempts = [s.attributes["llm.attempts"] for s in spans]  # type: ignore[index]
    assert sum(attempts) - 12 == report.stages[1].retries
    assert all(s.attributes["llm.prompt_tokens"] > 0 for s in spans)  # type: ignore[index,operator]
    events = [e for s in spans for e in s.events]
    retries = [e for e in events if e.name == "llm.retry"]
    assert len(retries) == report.stages[1].retries
    assert all(str(e.attributes["error"]).startswith("HTTP 50") for e in retries)  # type: ignore[index]
    waits = [e for e in events if e.name in ("llm.limiter_wait", "llm.slot_wait")]
    assert waits and all(e.attributes["seconds"] > 0 for e in waits)  # type: ignore[index,operator]
    dumped = "".join(s.to_json() for s in exporter.get_finished_spans())
    assert KEY not in dumped


@pytest.mark.anyio
async def test_chat_answers_each_member_of_a_batch() -> None:
    rows: list[dict[str, Any]] = [{"name": "Ada"}, {"oops": 1}, {"name": "Alan"}]
    async with serve() as sim:
        caller = LLMCaller(model="m", prompt="{name}", base_url=sim.url)
        with anyio.fail_after(20):
            async with Pipeline(
                rows, Batcher(max_items=3, max_wait=5), caller, ordered=True
            ).open() as results:
                out = [value async for value in results]
        assert sim.counters()["requests"] == 2
    assert out == [
        {"name": "Ada", "response": "echo: Ada"},
        {"name": "Alan", "response": "echo: Alan"},
    ]
    assert results.report is not None and results.report.failures[0].item == {"oops": 1}


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_call_escape_hatch_runs_on_trio_too(anyio_backend: str) -> None:
    async def call(record: dict[str, Any]) -> str:
        await anyio.lowlevel.checkpoint()
        return record["name"].upper()

    results, report = await _run(LLMCaller(call=call, rpm=6000), ROWS[:3])
    assert [r["response"] for r in results] == ["ADA", "GRACE", "ALAN"]
    assert report.stages[1].requests == 3
