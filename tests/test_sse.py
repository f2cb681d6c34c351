"""The SSE decoder (to the WHATWG spec), the chat/Anthropic stream assemblers and SSEParse."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import Pipeline
from pipeline._errors import ConfigError
from stages.llm._sse import (
    AnthropicStreamAssembler,
    ChatStreamAssembler,
    MalformedChunkError,
    ServerSentEvent,
    SSEDecoder,
    SSEParse,
    StreamError,
    StreamErrorEvent,
    StreamResult,
    TruncatedStreamError,
    Usage,
    assemble,
    iter_sse,
)

pytestmark = pytest.mark.anyio


def decode(*chunks: bytes) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.close())
    return events


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for p in points:
        pieces.append(data[start:p])
        start = p
    pieces.append(data[start:])
    return pieces


# --------------------------------------------------------------------------------------------
# Decoder rules


def test_data_event_id_retry_fields() -> None:
    events = decode(b"event: update\nid: 7\nretry: 1500\ndata: hello\n\n")
    assert events == [ServerSentEvent("hello", "update", "7", 1500)]


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_every_line_ending(eol: bytes) -> None:
    stream = eol.join([b"data: a", b"data: b", b"", b"event: e", b"data: c", b"", b""])
    assert decode(stream) == [ServerSentEvent("a\nb"), ServerSentEvent("c", "e")]


def test_mixed_line_endings_in_one_stream() -> None:
    assert decode(b"data: a\r\ndata: b\rdata: c\n\r\n") == [ServerSentEvent("a\nb\nc")]


def test_crlf_split_across_feeds_is_one_line_ending() -> None:
    # a trailing CR then a leading LF must not produce a spurious blank line (= dispatch)
    assert decode(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [ServerSentEvent("a\nb")]
    # a lone CR at the end of a chunk is itself a complete line ending
    assert decode(b"data: a\r", b"\r") == [ServerSentEvent("a")]
    # the LF after the CR may be the entire next chunk
    assert decode(b"data: x\r", b"\n", b"\r", b"\n") == [ServerSentEvent("x")]


def test_multibyte_utf8_split_across_feeds() -> None:
    raw = "data: héllo wörld — 你好 🎉\n\n".encode()
    for i in range(1, len(raw)):
        assert decode(raw[:i], raw[i:]) == [ServerSentEvent("héllo wörld — 你好 🎉")], i
    assert decode(*[raw[i : i + 1] for i in range(len(raw))])[0].data.endswith("🎉")


def test_invalid_utf8_becomes_replacement_character() -> None:
    assert decode(b"data: a\xffb\n\n") == [ServerSentEvent("a\ufffdb")]


def test_multiple_data_lines_join_with_lf() -> None:
    assert decode(b"data: one\ndata: two\ndata\ndata: three\n\n") == [
        ServerSentEvent("one\ntwo\n\nthree")
    ]


def test_comments_are_ignored() -> None:
    stream = b": OPENROUTER PROCESSING\n\n:\ndata: x\n: inside\ndata: y\n\n"
    assert decode(stream) == [ServerSentEvent("x\ny")]


def test_only_one_space_after_colon_is_dropped() -> None:
    assert decode(b"data:no-space\n\ndata:  two\n\n") == [
        ServerSentEvent("no-space"),
        ServerSentEvent(" two"),
    ]
    assert decode(b"data: a: b\n\n") == [ServerSentEvent("a: b")]


def test_field_without_colon_has_empty_value() -> None:
    # "data" alone appends an empty line: the block is dispatched with empty data
    assert decode(b"data\n\n") == [ServerSentEvent("")]
    assert decode(b"data\ndata\n\n") == [ServerSentEvent("\n")]
    # "event" alone resets the type to the default
    assert decode(b"event: x\nevent\ndata: d\n\n") == [ServerSentEvent("d")]


def test_bom_stripped_only_at_stream_start() -> None:
    assert decode(b"\xef\xbb\xbfdata: a\n\n") == [ServerSentEvent("a")]
    assert decode(b"\xef", b"\xbb", b"\xbfdata: a\n\n") == [ServerSentEvent("a")]
    # a second BOM is part of the field name, which is then unknown and ignored
    assert decode(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n") == []
    assert decode(b"data: a\n\n\xef\xbb\xbfdata: b\n\n") == [ServerSentEvent("a")]


def test_blank_line_without_data_dispatches_nothing() -> None:
    assert decode(b"\n\n\n") == []
    assert decode(b"event: ping\n\n") == []  # no data line: not dispatched (spec)
    assert decode(b"id: 3\n\ndata: x\n\n") == [ServerSentEvent("x", id="3")]
    assert decode(b"retry: 10\n\ndata: x\n\n") == [ServerSentEvent("x")]


def test_event_type_resets_after_dispatch() -> None:
    assert decode(b"event: a\ndata: 1\n\ndata: 2\n\n") == [
        ServerSentEvent("1", "a"),
        ServerSentEvent("2"),
    ]


def test_last_event_id_persists_and_nul_ids_are_ignored() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"id: 1\ndata: a\n\ndata: b\n\nid: x\x00y\ndata: c\n\nid\ndata: d\n\n")
    assert [e.id for e in events] == ["1", "1", "1", ""]
    assert decoder.last_event_id == ""


def test_retry_requires_ascii_digits() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"retry: 12a\ndata: a\n\nretry: 250\ndata: b\n\nretry: -1\ndata: c\n\n")
    assert [e.retry for e in events] == [None, 250, None]
    assert decoder.retry == 250


def test_unknown_fields_are_ignored() -> None:
    assert decode(b"foo: bar\nDATA: loud\ndata: x\n\n") == [ServerSentEvent("x")]


def test_unterminated_final_event_is_dropped() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: complete\n\ndata: partial\n") == [ServerSentEvent("complete")]
    assert decoder.close() == []
    assert decoder.discarded
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n\ndata: no line end")
    decoder.close()
    assert decoder.discarded
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n\n")
    assert decoder.close() == []
    assert not decoder.discarded


def test_feed_after_close_is_an_error() -> None:
    decoder = SSEDecoder()
    decoder.close()
    with pytest.raises(RuntimeError, match="after close"):
        decoder.feed(b"data: x\n\n")


def test_empty_chunks_and_memoryview_input() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(memoryview(b"data: m\n\n")) == [ServerSentEvent("m")]


def test_json_helper() -> None:
    assert ServerSentEvent('{"a": 1}').json() == {"a": 1}


# --------------------------------------------------------------------------------------------
# Property: re-chunking never changes the events

text_values = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"),
    max_size=12,
)
field_lines = st.one_of(
    st.tuples(st.just("data"), text_values),
    st.tuples(st.just("event"), text_values),
    st.tuples(st.just("id"), text_values),
    st.tuples(st.just("retry"), st.integers(0, 10_000).map(str)),
    st.tuples(st.just(":"), text_values),  # comment
    st.tuples(st.just("other"), text_values),
)
blocks = st.lists(st.lists(field_lines, max_size=5), max_size=6)
eols = st.sampled_from([b"\n", b"\r", b"\r\n"])


def render(data: Any, blocks_: list[list[tuple[str, str]]], bom: bool) -> bytes:
    """Serialize blocks with randomly chosen line endings and spacing styles."""
    out = bytearray(b"\xef\xbb\xbf" if bom else b"")
    for block in blocks_:
        for name, value in block:
            if name == ":":
                line = ":" + value
            elif value == "" and data.draw(st.booleans()):
                line = name  # no colon at all
            else:
                line = name + (": " if data.draw(st.booleans()) else ":") + value
                if value.startswith(" ") and line == name + ":" + value:
                    line = name + ": " + value  # keep the value's own leading space
            out += line.encode() + data.draw(eols)
        blank = data.draw(eols)
        if blank == b"\n" and out.endswith(b"\r"):
            blank = b"\r\n"  # CR then LF would be one CRLF line ending, not a blank line
        out += blank
    return bytes(out)


def expected_events(blocks_: list[list[tuple[str, str]]]) -> list[ServerSentEvent]:
    """A straightforward model of the spec, written independently of the decoder."""
    events, last_id = [], None
    for block in blocks_:
        data: list[str] | None = None
        event, retry = "", None
        for name, value in block:
            if name == "data":
                data = [*(data or []), value]
            elif name == "event":
                event = value
            elif name == "id":
                last_id = value
            elif name == "retry":
                retry = int(value)
        if data is not None:
            events.append(ServerSentEvent("\n".join(data), event or "message", last_id, retry))
    return events


@settings(max_examples=300, deadline=None)
@given(st.data(), blocks, st.booleans(), st.lists(st.integers(0, 10_000), max_size=30))
def test_any_rechunking_gives_the_same_events(
    data: Any, blocks_: list[list[tuple[str, str]]], bom: bool, cuts: list[int]
) -> None:
    raw = render(data, blocks_, bom)
    whole = decode(raw)
    assert whole == expected_events(blocks_)
    assert decode(*split_at(raw, cuts)) == whole
    assert decode(*[raw[i : i + 1] for i in range(len(raw))]) == whole


# --------------------------------------------------------------------------------------------
# OpenAI chat stream assembly


def chat_chunk(
    content: str | None = None,
    *,
    finish: str | None = None,
    role: bool = False,
    index: int = 0,
    usage: Any = None,
    choices: bool = True,
) -> bytes:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    obj: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-test",
        "system_fingerprint": "fp_x",
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if choices
        else [],
        "usage": usage,
    }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chat_stream(deltas: Sequence[str], *, usage: bool = True, done: bool = True) -> bytes:
    parts = [chat_chunk("", role=True)]
    parts += [chat_chunk(d) for d in deltas]
    parts.append(chat_chunk(finish="stop"))
    if usage:
        parts.append(
            chat_chunk(
                choices=False,
                usage={"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16},
            )
        )
    if done:
        parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def assemble_bytes(*chunks: bytes) -> tuple[StreamResult, list[str]]:
    decoder, assembler, deltas = SSEDecoder(), ChatStreamAssembler(), []
    for chunk in chunks:
        for event in decoder.feed(chunk):
            if text := assembler.feed(event):
                deltas.append(text)
    decoder.close()
    return assembler.result(), deltas


def test_chat_stream_assembles_text_finish_reason_and_usage() -> None:
    result, deltas = assemble_bytes(chat_stream(["Hel", "lo", " wor", "ld"]))
    assert deltas == ["Hel", "lo", " wor", "ld"]  # incremental output for callers
    assert result == StreamResult(
        "Hello world", "stop", Usage(11, 5), model="gpt-test", id="chatcmpl-1"
    )
    assert result.usage is not None and result.usage.total_tokens == 16


def test_chat_usage_is_none_when_not_reported_never_zero() -> None:
    result, _ = assemble_bytes(chat_stream(["x"], usage=False))
    assert result.usage is None
    # a usage object lacking counts is unknown, not zero
    partial = chat_chunk(choices=False, usage={"total_tokens": 3})
    result, _ = assemble_bytes(chat_chunk("x", finish="stop") + partial + b"data: [DONE]\n\n")
    assert result.usage is None


def test_chat_openrouter_comments_between_chunks() -> None:
    stream = b": OPENROUTER PROCESSING\n\n" + chat_stream(["a", "b"]).replace(
        b"\n\ndata: ", b"\n\n: OPENROUTER PROCESSING\n\ndata: "
    )
    result, _ = assemble_bytes(stream)
    assert result.text == "ab"


def test_chat_stream_without_done_or_finish_reason_is_truncated() -> None:
    stream = chat_chunk("", role=True) + chat_chunk("Hel") + chat_chunk("lo")
    with pytest.raises(TruncatedStreamError, match=r"without \[DONE\] or finish_reason"):
        assemble_bytes(stream)
    with pytest.raises(TruncatedStreamError):
        ChatStreamAssembler().result()  # nothing at all


def test_chat_finish_reason_alone_or_done_alone_is_complete() -> None:
    result, _ = assemble_bytes(chat_stream(["a"], usage=False, done=False))
    assert (result.text, result.finish_reason) == ("a", "stop")
    result, _ = assemble_bytes(chat_chunk("a") + b"data: [DONE]\n\n")
    assert (result.text, result.finish_reason) == ("a", None)


def test_chat_length_finish_reason_is_reported() -> None:
    result, _ = assemble_bytes(chat_chunk("a") + chat_chunk(finish="length"))
    assert result.finish_reason == "length"


def test_chat_malformed_chunk() -> None:
    with pytest.raises(MalformedChunkError, match=r"chunk #2 is not valid JSON"):
        assemble_bytes(chat_chunk("a") + b'data: {"id": "x", "choi\n\n')
    with pytest.raises(MalformedChunkError, match="not an object"):
        assemble_bytes(b"data: [1, 2]\n\n")
    with pytest.raises(MalformedChunkError, match="'choices' is dict"):
        assemble_bytes(b'data: {"choices": {"0": 1}}\n\n')


def test_chat_mid_stream_error_event() -> None:
    error = {"error": {"message": "Provider overloaded", "type": "server_error", "code": 502}}
    stream = chat_chunk("partial") + b"data: " + json.dumps(error).encode() + b"\n\n"
    with pytest.raises(StreamErrorEvent) as caught:
        assemble_bytes(stream)
    exc = caught.value
    assert (exc.message, exc.error_type, exc.code, exc.status) == (
        "Provider overloaded",
        "server_error",
        502,
        200,
    )
    assert isinstance(exc, StreamError)
    assert "Provider overloaded" in str(exc) and "server_error" in str(exc)


def test_chat_error_as_plain_string_and_error_event_type() -> None:
    with pytest.raises(StreamErrorEvent, match="boom"):
        assemble_bytes(b'data: {"error": "boom"}\n\n')
    with pytest.raises(StreamErrorEvent, match="went wrong"):
        assemble_bytes(b'event: error\ndata: {"message": "went wrong"}\n\n')


def test_chat_ignores_other_choices_unknown_fields_and_events_after_done() -> None:
    stream = (
        chat_chunk("mine")
        + chat_chunk("other", index=1)
        + b'data: {"choices": [{"index": 0, "delta": {"content": "!", "tool_calls": null,'
        b' "refusal": null}, "novel": 1}], "x_extra": {"a": 1}}\n\n'
        + chat_chunk(finish="stop")
        + b"data: [DONE]\n\n"
        + chat_chunk("late")
    )
    result, _ = assemble_bytes(stream)
    assert result.text == "mine!"


def test_chat_keepalive_blank_data_is_ignored() -> None:
    result, _ = assemble_bytes(b"data: \n\n" + chat_stream(["z"]))
    assert result.text == "z"


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.text(max_size=8), max_size=12),
    st.lists(st.integers(0, 100_000), max_size=40),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
)
def test_chat_assembly_is_independent_of_chunking(
    deltas: list[str], cuts: list[int], eol: bytes
) -> None:
    raw = chat_stream(deltas).replace(b"\n", eol)
    whole, _ = assemble_bytes(raw)
    assert whole.text == "".join(deltas)
    assert assemble_bytes(*split_at(raw, cuts))[0] == whole


# --------------------------------------------------------------------------------------------
# Anthropic Messages stream assembly


def anthropic_event(kind: str, payload: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n".encode()


def anthropic_stream(texts: Sequence[str], *, stop: bool = True) -> bytes:
    parts = [
        anthropic_event(
            "message_start",
            {
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-test",
                    "content": [],
                    "stop_reason": None,
                    "usage": {"input_tokens": 25, "output_tokens": 1},
                }
            },
        ),
        anthropic_event(
            "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}
        ),
        anthropic_event("ping", {}),
    ]
    parts += [
        anthropic_event(
            "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": t}}
        )
        for t in texts
    ]
    parts += [
        anthropic_event("content_block_stop", {"index": 0}),
        anthropic_event(
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 9},
            },
        ),
    ]
    if stop:
        parts.append(anthropic_event("message_stop", {}))
    return b"".join(parts)


def anthropic_assemble(*chunks: bytes) -> StreamResult:
    decoder, assembler = SSEDecoder(), AnthropicStreamAssembler()
    for chunk in chunks:
        for event in decoder.feed(chunk):
            assembler.feed(event)
    return assembler.result()


def test_anthropic_stream_assembles_text_stop_reason_and_usage() -> None:
    result = anthropic_assemble(anthropic_stream(["Hi", " there"]))
    assert result == StreamResult("Hi there", "end_turn", Usage(25, 9), "claude-test", "msg_1")


def test_anthropic_non_text_deltas_and_unknown_events_are_ignored() -> None:
    extra = anthropic_event(
        "content_block_delta",
        {"index": 1, "delta": {"type": "input_json_delta", "partial_json": "{"}},
    ) + anthropic_event("brand_new_event", {"x": 1})
    raw = anthropic_stream(["a"]).replace(
        b"event: content_block_stop", extra + b"event: content_block_stop"
    )
    assert anthropic_assemble(raw).text == "a"


def test_anthropic_without_message_stop_is_truncated() -> None:
    with pytest.raises(TruncatedStreamError, match="without message_stop"):
        anthropic_assemble(anthropic_stream(["a"], stop=False))


def test_anthropic_overloaded_error_event() -> None:
    error = anthropic_event(
        "error", {"error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    with pytest.raises(StreamErrorEvent) as caught:
        anthropic_assemble(anthropic_stream(["a"], stop=False) + error)
    assert caught.value.error_type == "overloaded_error"
    assert caught.value.message == "Overloaded"


def test_anthropic_usage_unknown_when_missing() -> None:
    raw = anthropic_event("content_block_delta", {"delta": {"type": "text_delta", "text": "x"}})
    result = anthropic_assemble(raw + anthropic_event("message_stop", {}))
    assert result == StreamResult("x", None, None)


def test_anthropic_malformed_chunk() -> None:
    with pytest.raises(MalformedChunkError):
        anthropic_assemble(b"event: content_block_delta\ndata: {not json\n\n")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=6), max_size=8), st.lists(st.integers(0, 100_000), max_size=30))
def test_anthropic_assembly_is_independent_of_chunking(texts: list[str], cuts: list[int]) -> None:
    raw = anthropic_stream(texts)
    whole = anthropic_assemble(raw)
    assert whole.text == "".join(texts)
    assert anthropic_assemble(*split_at(raw, cuts)) == whole


# --------------------------------------------------------------------------------------------
# Async helpers and the stage


async def agen(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_iter_sse_and_assemble() -> None:
    raw = chat_stream(["one ", "two"])
    events = [e async for e in iter_sse(agen(split_at(raw, [5, 50, 51, 300])))]
    assert events == decode(raw)
    result = await assemble(agen([raw[:40], raw[40:]]), ChatStreamAssembler())
    assert result.text == "one two"
    with pytest.raises(TruncatedStreamError):
        await assemble(agen([raw[: raw.index(b'"stop"')]]), ChatStreamAssembler())


async def test_sse_parse_stage_emits_events_and_balances() -> None:
    chunks = [b"data: a\n\nda", b"ta: b\n", b"\ndata: c\n\ndata: d\n\n", b": keepalive\n", b"\n"]
    p = Pipeline(chunks, SSEParse())
    async with p.open() as results:
        events = [e async for e in results]
    report = results.report
    assert report is not None
    assert [e.data for e in events] == ["a", "b", "c", "d"]
    # chunks 2, 4 and 5 complete nothing (dropped); chunk 3 completes three events (grew by 2)
    assert (report.rows_in, report.ok, report.dropped, report.created) == (5, 4, 3, 2)
    assert report.balanced


async def test_sse_parse_stage_ordered_run_keeps_event_order() -> None:
    raw = chat_stream([f"w{i} " for i in range(30)])
    p = Pipeline(split_at(raw, range(7, len(raw), 13)), SSEParse(), ordered=True)
    async with p.open() as results:
        events = [e async for e in results]
    assert events == decode(raw)


async def test_sse_parse_stage_dead_letters_non_bytes_and_accepts_str() -> None:
    p = Pipeline(["data: s\n\n", 42, b"data: b\n\n"], SSEParse())
    async with p.open() as results:
        events = [e async for e in results]
    assert [e.data for e in events] == ["s", "b"]
    report = results.report
    assert report is not None and report.failed == 1
    assert "expects bytes chunks, got int" in report.failures[0].message


def test_sse_parse_has_one_worker() -> None:
    stage = SSEParse(name="sse")
    assert stage.workers == 1
    with pytest.raises(ConfigError, match="workers must be 1"):
        stage.workers = 2
