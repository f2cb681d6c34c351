"""Specification of the LLM caller: configuration, templates, structured output, retry policy,
and the happy paths end to end through a real socket against the simulated provider."""

from __future__ import annotations

from typing import Any

import pytest
from tenacity import RetryCallState

from pipeline._errors import ConfigError, MissingFieldError
from stages._llm import (
    Completion,
    LLMCaller,
    LLMCallError,
    Price,
    _answer_of,
    _RowPolicy,
    _Template,
    _Validator,
)
from stages._sse import Usage

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
        ({"concurrency": 0}, "concurrency must be"),
        ({"timeout": 0}, "timeout must be > 0"),
        ({"deadline_s": -1}, "deadline_s must be"),
        ({"budget_usd": 1.0}, "budget_usd needs prices"),
        ({"provider": "anthropic", "endpoint": "embeddings"}, "no embeddings endpoint"),
        ({"endpoint": "embeddings", "stream": True}, "stream=True applies to chat"),
        ({"provider": "azure"}, "needs base_url"),
        ({"prompt": "unclosed {name"}, "malformed"),
        ({"schema": 42}, "schema must be"),
        ({"schema": {"type": "no-such-type"}}, "not a valid JSON schema"),
    ],
)
def test_bad_configuration_is_refused_with_a_clear_message(
    kwargs: dict[str, Any], match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AZURE_OPENAI_ENDPOINT", raising=False)
    with pytest.raises(ConfigError, match=match):
        LLMCaller(model="m", **kwargs)


def test_repr_is_readable_and_shows_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    caller = LLMCaller(
        model="gpt-4o-mini",
        prompt="Say hello to {name}",
        base_url="http://127.0.0.1:1/v1",
        rpm=100,
        headers={"Authorization": f"Bearer {KEY}", "X-Team": "a"},
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
        api_key_env="MY_KEY",
        headers={"x-api-key": "other-secret", "Authorization": "Bearer third-secret"},
        base_url="http://127.0.0.1:1/v1",
    )
    secrets = caller.secrets()
    assert KEY in secrets and "other-secret" in secrets and "third-secret" in secrets
    assert caller._scrub(f"oops {KEY} and third-secret") == "oops *** and ***"


def test_default_workers_are_twice_the_concurrency_ceiling() -> None:
    assert LLMCaller(model="m", concurrency=5).workers == 10
    assert LLMCaller(model="m", max_concurrency=20).workers == 40
    assert LLMCaller(model="m", workers=3).workers == 3


# -- templates ---------------------------------------------------------------------------------


def test_template_fills_fields_nested_fields_and_plain_values() -> None:
    assert _Template("Say hello to {name}").render({"name": "Ada"}) == "Say hello to Ada"
    assert _Template("{user[name]} is {age}").render({"user": {"name": "Bo"}, "age": 3}) == (
        "Bo is 3"
    )
    assert _Template("echo {value} / {}").render("x") == "echo x / x"


def test_missing_field_names_the_field_and_what_the_record_has() -> None:
    with pytest.raises(MissingFieldError) as info:
        _Template("Hello {name}, from {city}").render({"name": "Ada", "age": 3})
    assert info.value.field == "city"
    assert str(info.value) == "missing field 'city' (record has: age, name)"


def test_missing_nested_field_names_the_whole_path() -> None:
    with pytest.raises(MissingFieldError, match=r"missing field 'user\[email\]'"):
        _Template("{user[email]}").render({"user": {"name": "Bo"}})


# -- structured output -------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"enum": ["pos", "neg"]}, "score": {"type": "number"}},
    "required": ["sentiment"],
}


def test_validator_parses_json_even_inside_a_code_fence() -> None:
    check = _Validator(SCHEMA)
    assert check('{"sentiment": "pos"}') == {"sentiment": "pos"}
    assert check('```json\n{"sentiment": "neg", "score": 1}\n```') == {
        "sentiment": "neg",
        "score": 1,
    }


def test_validator_says_where_the_answer_is_wrong() -> None:
    check = _Validator(SCHEMA)
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

    check = _Validator(Verdict)
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


def test_backoff_is_full_jitter_exponential_with_a_cap() -> None:
    caller = LLMCaller(model="m", backoff_base=0.5, backoff_cap=4.0)
    policy = _RowPolicy(caller, None)
    error = LLMCallError("x", retryable=True)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (8, 4.0)]:
        waits = [policy.wait(_state(attempt, error)) for _ in range(200)]
        assert all(0 <= w <= ceiling for w in waits)
        assert max(waits) > ceiling * 0.7  # jitter spans the range
        assert min(waits) < ceiling * 0.3


def test_backoff_never_waits_less_than_retry_after() -> None:
    policy = _RowPolicy(LLMCaller(model="m", backoff_base=0.1), None)
    error = LLMCallError("429", retryable=True, retry_after=3.0)
    assert all(policy.wait(_state(1, error)) == 3.0 for _ in range(20))


def test_stop_after_one_plus_max_retries_attempts() -> None:
    policy = _RowPolicy(LLMCaller(model="m", max_retries=2), None)
    assert not policy.stop(_state(1))
    assert not policy.stop(_state(2))
    assert policy.stop(_state(3))


def test_stop_when_the_next_wait_would_pass_the_deadline() -> None:
    import time

    policy = _RowPolicy(LLMCaller(model="m", max_retries=10), time.perf_counter() + 5.0)
    assert not policy.stop(_state(1, sleep=1.0))
    assert not policy.past_deadline
    assert policy.stop(_state(1, sleep=3600.0))
    assert policy.past_deadline


# -- what a custom call may return -------------------------------------------------------------


def test_answer_of_reads_strings_completions_and_sdk_like_objects() -> None:
    assert _answer_of("hi").text == "hi"
    done = Completion(text="t", usage=Usage(1, 2), model="m", finish_reason="stop")
    assert _answer_of(done).usage == Usage(1, 2)

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

    answer = _answer_of(ChatCompletion())
    assert answer.text == "from sdk" and answer.usage == Usage(7, 3) and answer.model == "gpt"
    assert _answer_of({"usage": {"input_tokens": 4, "output_tokens": 1}}).usage == Usage(4, 1)


def test_price_cost_is_per_million_tokens() -> None:
    assert Price(2.5, 10.0).cost(Usage(1_000_000, 100_000)) == pytest.approx(3.5)
