"""The Anthropic endpoint family: ``POST /v1/messages`` (JSON or typed SSE events, ``x-api-key``).

Errors take Anthropic's shapes: 529 ``overloaded_error``, 400 "credit balance is too low" for
``quota_429``, ``event: error`` for a mid-stream error.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from pipeline.testing._sim._answers import Answer, BadRequest, answer_to
from pipeline.testing._sim._config import FAULTS
from pipeline.testing._sim._core import SimCore
from pipeline.testing._sim._faults import (
    STREAM_ONLY,
    StreamBody,
    fault_prelude,
    json_answer,
    retry_after,
    send_stream,
)
from pipeline.testing._sim._responses import (
    ANTHROPIC_ERRORS,
    ANTHROPIC_STREAM_ERROR,
    HTML,
    anthropic_error,
    dumps,
)

__all__ = ["message", "register"]

_FAULTS = frozenset(FAULTS)
_JSON_FAULTS = _FAULTS - STREAM_ONLY


def register(core: SimCore, router: web.UrlDispatcher) -> None:
    """Add the Messages API route."""

    async def messages(request: web.Request, n: int) -> web.StreamResponse:
        return await _messages(core, request, n)

    core.route(router, "POST", "/v1/messages", messages)


def _fault_response(
    core: SimCore, fault: str, headers: dict[str, str]
) -> web.StreamResponse | None:
    """Return the Anthropic-shaped response of a fault that replaces the answer, else None."""
    if fault in ANTHROPIC_ERRORS:
        if fault == "error_429":
            headers["retry-after"] = retry_after(core.config.retry_after_s)
        return anthropic_error(*ANTHROPIC_ERRORS[fault], headers=headers)
    if fault == "non_json":
        return web.Response(status=200, body=HTML, content_type="text/html", headers=headers)
    return None


async def _messages(core: SimCore, request: web.Request, n: int) -> web.StreamResponse:
    if not core.key_ok(request, anthropic=True):
        return anthropic_error(
            *ANTHROPIC_ERRORS["unauthorized"], headers=core.limit_headers(anthropic=True)
        )
    try:
        req = await core.read_json(request)
        answer = answer_to(req, core.config.model, anthropic=True)
    except BadRequest as error:
        return anthropic_error(
            400, "invalid_request_error", str(error), core.limit_headers(anthropic=True)
        )
    wait, _ = core.admit(answer.total_tokens, answer.prompt_tokens)
    headers = core.limit_headers(anthropic=True)
    if wait:
        headers["retry-after"] = retry_after(wait)
        return anthropic_error(*ANTHROPIC_ERRORS["throttled"], headers=headers)
    stream = req.get("stream") is True
    fault, delay = core.draw_fault(n, _FAULTS if stream else _JSON_FAULTS)
    early = await fault_prelude(
        core, request, fault, delay, lambda kind: _fault_response(core, kind, headers)
    )
    if early is not None:
        return early
    core.count_answer(answer.prompt_tokens, answer.completion_tokens)
    stop = "max_tokens" if answer.cut else "tool_use" if answer.tool else "end_turn"
    if stream:
        return await send_stream(core, request, _stream(n, answer, stop), fault, headers)
    body = dumps(message(answer, f"msg_sim{n}"))
    return await json_answer(core, request, body, fault, headers, answer.completion_tokens)


def message(answer: Answer, message_id: str) -> dict[str, Any]:
    """Return the Messages API ``message`` object answering with ``answer``."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": answer.model,
        "content": [_block(answer, message_id, final=True)],
        "stop_reason": "max_tokens" if answer.cut else "tool_use" if answer.tool else "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": answer.prompt_tokens,
            "output_tokens": answer.completion_tokens,
        },
    }


def _block(answer: Answer, message_id: str, *, final: bool) -> dict[str, Any]:
    """The answer's content block: its text, or the forced tool's call (structured output)."""
    if answer.tool is None:
        return {"type": "text", "text": answer.text if final else ""}
    name, value = answer.tool
    tool_id = "toolu_" + message_id.removeprefix("msg_")
    return {"type": "tool_use", "id": tool_id, "name": name, "input": value if final else {}}


def _event(kind: str, payload: str) -> bytes:
    return f'event: {kind}\ndata: {{"type":"{kind}"{payload}}}\n\n'.encode()


def _stream(n: int, answer: Answer, stop: str) -> StreamBody:
    start = dumps(
        {
            "id": f"msg_sim{n}",
            "type": "message",
            "role": "assistant",
            "model": answer.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": 1},
        }
    ).decode()
    block = dumps(_block(answer, f"msg_sim{n}", final=False)).decode()
    first = (
        _event("message_start", f',"message":{start}')
        + _event("content_block_start", f',"index":0,"content_block":{block}')
        + _event("ping", "")
    )
    delta = b'"input_json_delta","partial_json":' if answer.tool else b'"text_delta","text":'
    head = (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":' + delta
    )
    chunks = [
        head + json.dumps(piece, ensure_ascii=False).encode() + b"}}\n\n" for piece in answer.pieces
    ]
    end = [
        _event("content_block_stop", ',"index":0')
        + _event(
            "message_delta",
            f',"delta":{{"stop_reason":"{stop}","stop_sequence":null}},'
            f'"usage":{{"output_tokens":{answer.completion_tokens}}}',
        )
        + _event("message_stop", "")
    ]
    return StreamBody(first, chunks, answer.pieces, end, ANTHROPIC_STREAM_ERROR)
