"""Specification of the provider shapes: URLs, headers, bodies, answers and error meanings."""

from __future__ import annotations

import json

import pytest

from stages.llm._providers import (
    ANTHROPIC_VERSION,
    AZURE_API_VERSION,
    Answer,
    AnthropicProvider,
    AzureProvider,
    Provider,
    ResponseFormatError,
    make_provider,
)
from stages.llm._sse import Usage

OPENAI = Provider("https://api.openai.com/v1/")
AZURE = AzureProvider("https://res.openai.azure.com", deployment="gpt4o-prod")
ANTHROPIC = AnthropicProvider("https://api.anthropic.com/v1")


def _body(data: object) -> bytes:
    return json.dumps(data).encode()


# -- URLs and headers --------------------------------------------------------------------------


def test_openai_urls_strip_trailing_slash() -> None:
    assert OPENAI.url("chat", "gpt-4o") == "https://api.openai.com/v1/chat/completions"
    assert OPENAI.url("embeddings", "e") == "https://api.openai.com/v1/embeddings"


def test_paradigm_base_url_keeps_its_prefix() -> None:
    paradigm = make_provider("openai", "https://paradigm.lighton.ai/api/v2")
    assert paradigm.url("chat", "alfred") == "https://paradigm.lighton.ai/api/v2/chat/completions"


def test_openai_auth_is_a_bearer_header_and_absent_without_key() -> None:
    assert OPENAI.auth_headers("sk-1") == {"Authorization": "Bearer sk-1"}
    assert OPENAI.auth_headers(None) == {}


def test_azure_url_has_deployment_and_api_version_and_api_key_header() -> None:
    assert AZURE.url("chat", "gpt-4o") == (
        "https://res.openai.azure.com/openai/deployments/gpt4o-prod/chat/completions"
        f"?api-version={AZURE_API_VERSION}"
    )
    assert AZURE.auth_headers("k") == {"api-key": "k"}


def test_azure_deployment_defaults_to_model_and_is_quoted() -> None:
    azure = AzureProvider("https://r.openai.azure.com/", api_version="2025-01-01-preview")
    assert azure.url("embeddings", "my model") == (
        "https://r.openai.azure.com/openai/deployments/my%20model/embeddings"
        "?api-version=2025-01-01-preview"
    )


def test_anthropic_url_and_headers() -> None:
    assert ANTHROPIC.url("chat", "claude") == "https://api.anthropic.com/v1/messages"
    assert ANTHROPIC.auth_headers("k") == {"x-api-key": "k"}
    assert ANTHROPIC.base_headers()["anthropic-version"] == ANTHROPIC_VERSION


def test_make_provider_reads_base_url_from_environment() -> None:
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
    assert make_provider("openai", None, environ=env).base_url == "http://127.0.0.1:9/v1"
    assert make_provider("openai", None, environ={}).base_url == "https://api.openai.com/v1"
    assert make_provider("anthropic", None, environ={}).base_url == "https://api.anthropic.com/v1"


def test_make_provider_refuses_unknown_and_azure_without_endpoint() -> None:
    with pytest.raises(ValueError, match="unknown provider 'cohere'"):
        make_provider("cohere", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="AZURE_OPENAI_ENDPOINT"):
        make_provider("azure", None, environ={})


# -- bodies ------------------------------------------------------------------------------------


def test_openai_chat_body_puts_system_first_and_streams_usage() -> None:
    body = OPENAI.chat_body(
        "m", [{"role": "user", "content": "hi"}], "be brief", {"temperature": 0}, stream=True
    )
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert body["messages"][1] == {"role": "user", "content": "hi"}
    assert body["temperature"] == 0
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_openai_chat_body_without_stream_has_no_stream_fields() -> None:
    body = OPENAI.chat_body("m", [{"role": "user", "content": "hi"}], None, {}, stream=False)
    assert "stream" not in body and "stream_options" not in body
    assert body["messages"] == [{"role": "user", "content": "hi"}]


def test_anthropic_body_has_top_level_system_and_default_max_tokens() -> None:
    body = ANTHROPIC.chat_body("c", [{"role": "user", "content": "hi"}], "sys", {}, stream=True)
    assert body["system"] == "sys"
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert body["max_tokens"] == 1024
    assert body["stream"] is True and "stream_options" not in body
    explicit = ANTHROPIC.chat_body("c", [], None, {"max_tokens": 5}, stream=False)
    assert explicit["max_tokens"] == 5 and "system" not in explicit


def test_embeddings_body_sends_all_inputs_at_once() -> None:
    assert OPENAI.embeddings_body("e", ["a", "b"], {"dimensions": 8}) == {
        "model": "e",
        "input": ["a", "b"],
        "dimensions": 8,
    }


# -- answers -----------------------------------------------------------------------------------


def test_parse_openai_chat_answer() -> None:
    answer = OPENAI.parse_chat(
        {
            "model": "gpt-4o-2024-08-06",
            "choices": [{"message": {"content": "Hello"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        }
    )
    assert answer == Answer("Hello", "stop", Usage(5, 2), "gpt-4o-2024-08-06")


def test_parse_openai_chat_without_usage_records_unknown_not_zero() -> None:
    answer = OPENAI.parse_chat({"choices": [{"message": {"content": "x"}}]})
    assert answer.usage is None


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([1, 2], "not a JSON object"),
        ({"choices": []}, "no choices"),
        ({"choices": [{"nomessage": 1}]}, "no message"),
        ({"error": {"code": "server_error", "message": "boom"}}, "server_error: boom"),
    ],
)
def test_parse_openai_chat_rejects_malformed(data: object, match: str) -> None:
    with pytest.raises(ResponseFormatError, match=match):
        OPENAI.parse_chat(data)


def test_parse_anthropic_answer_joins_text_blocks_and_counts_cache_tokens() -> None:
    answer = ANTHROPIC.parse_chat(
        {
            "type": "message",
            "model": "claude-x",
            "content": [
                {"type": "text", "text": "Hel"},
                {"type": "tool_use", "id": "t"},
                {"type": "text", "text": "lo"},
            ],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 3, "output_tokens": 4},
        }
    )
    assert answer == Answer("Hello", "end_turn", Usage(13, 4), "claude-x")


def test_parse_embeddings_orders_by_index() -> None:
    answer = OPENAI.parse_embeddings(
        {
            "data": [{"index": 1, "embedding": [1.0]}, {"index": 0, "embedding": [0.0]}],
            "usage": {"prompt_tokens": 4, "total_tokens": 4},
        },
        2,
    )
    assert answer.embeddings == [[0.0], [1.0]]
    assert answer.usage == Usage(4, 0)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"data": [{"index": 0, "embedding": [0.0]}]}, "asked for 2 embeddings, got 1"),
        ({"data": [{"index": 0, "embedding": [0.0]}, {"index": 0, "embedding": [1.0]}]}, "index"),
        ({"nodata": 1}, "no 'data' list"),
    ],
)
def test_parse_embeddings_rejects_wrong_shapes(data: object, match: str) -> None:
    with pytest.raises(ResponseFormatError, match=match):
        OPENAI.parse_embeddings(data, 2)


def test_answer_round_trips_through_cache_bytes() -> None:
    answer = Answer("hi", "stop", Usage(1, 2), "m", None)
    assert Answer.from_bytes(answer.to_bytes()) == answer
    vectors = Answer(embeddings=[[0.5, 1.0]])
    assert Answer.from_bytes(vectors.to_bytes()) == vectors
    with pytest.raises(ValueError):
        Answer.from_bytes(b"[1]")


# -- errors ------------------------------------------------------------------------------------


def _openai_error(code: str | None, message: str = "msg", kind: str = "x") -> bytes:
    return _body({"error": {"message": message, "type": kind, "code": code}})


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 529])
def test_transient_statuses_are_retryable(status: int) -> None:
    failure = OPENAI.classify(status, {}, _openai_error("rate_limit_exceeded"))
    assert failure.retryable and not failure.quota
    assert failure.overload == (status in (429, 503, 529))


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_not_retryable(status: int) -> None:
    failure = OPENAI.classify(status, {}, _openai_error("invalid_request_error", "bad model"))
    assert not failure.retryable
    assert failure.describe() == f"HTTP {status} invalid_request_error: bad model"


@pytest.mark.parametrize(
    "code",
    [
        "insufficient_quota",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
    ],
)
def test_money_429s_are_quota_not_retryable(code: str) -> None:
    failure = OPENAI.classify(429, {}, _openai_error(code))
    assert failure.quota and not failure.retryable and not failure.overload


def test_quota_code_given_only_as_type_is_still_quota() -> None:
    failure = OPENAI.classify(429, {}, _openai_error(None, kind="insufficient_quota"))
    assert failure.quota


def test_anthropic_overloaded_and_spend_limit() -> None:
    overloaded = ANTHROPIC.classify(
        529, {}, _body({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    )
    assert overloaded.retryable and overloaded.overload
    assert overloaded.code == "overloaded_error" and overloaded.message == "busy"
    spend = ANTHROPIC.classify(
        429,
        {},
        _body(
            {
                "type": "error",
                "error": {"type": "rate_limit_error", "message": "enforced_spend_limit_reached"},
            }
        ),
    )
    assert spend.quota and not spend.retryable


def test_x_should_retry_header_overrides_status() -> None:
    assert OPENAI.classify(400, {"x-should-retry": "true"}, b"").retryable
    assert not OPENAI.classify(503, {"x-should-retry": "false"}, b"").retryable
    # money is never retried, whatever the header says
    assert not OPENAI.classify(
        429, {"x-should-retry": "true"}, _openai_error("insufficient_quota")
    ).retryable


def test_non_json_error_body_is_described_briefly() -> None:
    failure = OPENAI.classify(502, {}, b"<html>" + b"x" * 2000)
    assert failure.retryable
    assert failure.message.startswith("<html>") and len(failure.message) < 400
    assert OPENAI.classify(500, {}, b"").message == "empty body"


def test_fastapi_style_detail_is_read() -> None:
    assert OPENAI.classify(422, {}, _body({"detail": "field required"})).message == "field required"


def test_anthropic_credit_balance_too_low_400_is_quota() -> None:
    body = _body(
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "Your credit balance is too low to access the Anthropic API.",
            },
        }
    )
    failure = ANTHROPIC.classify(400, {}, body)
    assert failure.quota and not failure.retryable
    # the same words from an OpenAI-compatible server are just a bad request
    assert not OPENAI.classify(400, {}, body).quota
