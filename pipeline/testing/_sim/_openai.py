"""The OpenAI endpoint family: chat completions (JSON or SSE) and models.

Served under ``/v1`` and again under ``/api/v2`` (LightOn Paradigm), and Azure OpenAI style
under ``/openai/deployments/{deployment}`` (``api-key`` header; ``api-version`` required).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Generic, TypeVar

from aiohttp import web

from pipeline.testing._sim._answers import Answer, BadRequest, answer_to
from pipeline.testing._sim._config import FAULTS
from pipeline.testing._sim._core import SimCore
from pipeline.testing._sim._faults import (
    STREAM_ONLY,
    StreamBody,
    fault_prelude,
    json_answer,
    openai_fault,
    retry_after,
    send_stream,
)
from pipeline.testing._sim._responses import (
    DONE,
    JSON,
    RATE_LIMITED,
    STREAM_ERROR,
    UNAUTHORIZED,
    dumps,
    openai_error,
)

__all__ = [
    "AZURE",
    "Admitted",
    "chat_completion",
    "OPENAI_PREFIXES",
    "DeploymentHandler",
    "gate",
    "register",
    "route_with_azure",
    "throttled",
    "unauthorized",
]

OPENAI_PREFIXES = ("/v1", "/api/v2")
"""Where the OpenAI routes are served: OpenAI's own path and LightOn Paradigm's."""

AZURE = "/openai/deployments/{deployment}"
"""Where the Azure OpenAI style routes are served."""

DeploymentHandler = Callable[[SimCore, web.Request, int, str | None], Awaitable[web.StreamResponse]]
"""A handler served on the OpenAI paths (deployment ``None``) and Azure's (its name)."""

T = TypeVar("T")

_CHAT_FAULTS = frozenset(FAULTS) - {"overloaded"}
_CHAT_JSON_FAULTS = _CHAT_FAULTS - STREAM_ONLY


def register(core: SimCore, router: web.UrlDispatcher) -> None:
    """Add the chat-completions and models routes (OpenAI, Paradigm and Azure paths)."""

    async def models(request: web.Request, n: int) -> web.StreamResponse:
        if not core.key_ok(request):
            return unauthorized(core)
        names = [core.config.model, "sim-embed-1"]
        body = {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "sim"} for m in names],
        }
        return web.json_response(body)

    route_with_azure(core, router, "chat/completions", _chat)
    for prefix in OPENAI_PREFIXES:
        core.route(router, "GET", f"{prefix}/models", models)


def route_with_azure(
    core: SimCore, router: web.UrlDispatcher, endpoint: str, handle: DeploymentHandler
) -> None:
    """Add ``POST endpoint`` under the OpenAI prefixes and Azure's deployment path.

    ``handle`` gets the Azure deployment name, or ``None`` on the OpenAI paths; an Azure
    request without the ``api-version`` query parameter gets Azure's 404.
    """

    async def plain(request: web.Request, n: int) -> web.StreamResponse:
        return await handle(core, request, n, None)

    async def azure(request: web.Request, n: int) -> web.StreamResponse:
        if "api-version" not in request.query:
            return openai_error(404, "Resource not found (api-version query parameter missing)")
        return await handle(core, request, n, request.match_info["deployment"])

    for prefix in OPENAI_PREFIXES:
        core.route(router, "POST", f"{prefix}/{endpoint}", plain)
    core.route(router, "POST", f"{AZURE}/{endpoint}", azure)


def unauthorized(core: SimCore) -> web.Response:
    """Return OpenAI's 401 for a wrong or missing key."""
    return web.Response(
        status=401, body=UNAUTHORIZED, content_type=JSON, headers=core.limit_headers()
    )


def throttled(wait: float, which: str, headers: dict[str, str]) -> web.Response:
    """Return OpenAI's 429 for a request refused by the ``which`` quota for ``wait`` seconds."""
    headers["retry-after"] = retry_after(wait)
    headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
    body = RATE_LIMITED if which == "requests" else RATE_LIMITED.replace(b"requests", b"tokens")
    return web.Response(status=429, body=body, content_type=JSON, headers=headers)


@dataclasses.dataclass
class Admitted(Generic[T]):
    """An OpenAI-route request that passed the gate: what to answer, and how to spoil it.

    Attributes:
        req: The JSON body.
        parsed: What the route's ``parse`` made of it.
        headers: The rate-limit headers the answer carries.
        fault: The fault to apply to the answer itself, if any.
    """

    req: Any
    parsed: T
    headers: dict[str, str]
    fault: str | None


async def gate(
    core: SimCore,
    request: web.Request,
    n: int,
    parse: Callable[[Any], tuple[T, int]],
    applies: Callable[[Any], Collection[str]],
) -> Admitted[T] | web.StreamResponse:
    """Authenticate, parse, admit against the quotas, draw the fault and wait the latency.

    Args:
        core: The simulator's state.
        request: The request.
        n: Its number.
        parse: From the JSON body, what to answer and its cost in tokens (raises
            :class:`BadRequest` for a 400).
        applies: From the JSON body, the faults that make sense for this answer.

    Returns:
        The admitted request, or the whole response when it is refused, fails or faults.
    """
    if not core.key_ok(request):
        return unauthorized(core)
    try:
        req = await core.read_json(request)
        parsed, cost = parse(req)
    except BadRequest as error:
        return openai_error(400, str(error), core.limit_headers())
    wait, which = core.admit(cost, getattr(parsed, "prompt_tokens", None))
    headers = core.limit_headers()
    if wait:
        return throttled(wait, which, headers)
    fault, delay = core.draw_fault(n, applies(req))
    early = await fault_prelude(
        core, request, fault, delay, lambda kind: openai_fault(core, kind, n, headers)
    )
    if early is not None:
        return early
    return Admitted(req, parsed, headers, fault)


async def _chat(
    core: SimCore, request: web.Request, n: int, deployment: str | None
) -> web.StreamResponse:
    def parse(req: Any) -> tuple[Answer, int]:
        answer = answer_to(req, deployment or core.config.model, anthropic=False)
        if deployment is not None:
            answer.model = deployment
        return answer, answer.total_tokens

    def applies(req: Any) -> Collection[str]:
        return _CHAT_FAULTS if req.get("stream") is True else _CHAT_JSON_FAULTS

    admitted = await gate(core, request, n, parse, applies)
    if not isinstance(admitted, Admitted):
        return admitted
    req, answer, headers, fault = admitted.req, admitted.parsed, admitted.headers, admitted.fault
    core.count_answer(answer.prompt_tokens, answer.completion_tokens)
    if req.get("stream") is True:
        options = req.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        return await send_stream(core, request, _chat_stream(n, answer, usage), fault, headers)
    body = _chat_body(n, answer)
    return await json_answer(core, request, body, fault, headers, answer.completion_tokens)


def chat_completion(answer: Answer, completion_id: str) -> dict[str, Any]:
    """Return the ``chat.completion`` object answering with ``answer``."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.model,
        "system_fingerprint": "fp_sim",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text, "refusal": None},
                "logprobs": None,
                "finish_reason": "length" if answer.cut else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.total_tokens,
        },
    }


def _chat_body(n: int, answer: Answer) -> bytes:
    return dumps(chat_completion(answer, f"chatcmpl-sim{n}"))


def _chat_stream(n: int, answer: Answer, include_usage: bool) -> StreamBody:
    head = (
        f'data: {{"id":"chatcmpl-sim{n}","object":"chat.completion.chunk",'
        f'"created":{int(time.time())},"model":{json.dumps(answer.model)},'
        f'"system_fingerprint":"fp_sim","choices":[{{"index":0,"delta":'
    ).encode()
    close = b',"usage":null}\n\n' if include_usage else b"}\n\n"
    tail = b'"logprobs":null,"finish_reason":null}]' + close
    first = head + b'{"role":"assistant","content":"","refusal":null},' + tail
    chunks = [
        head + b'{"content":' + json.dumps(piece, ensure_ascii=False).encode() + b"}," + tail
        for piece in answer.pieces
    ]
    reason = b'"length"' if answer.cut else b'"stop"'
    end = [head + b'{},"logprobs":null,"finish_reason":' + reason + b"}]" + close]
    if include_usage:
        usage = (
            f'{{"prompt_tokens":{answer.prompt_tokens},'
            f'"completion_tokens":{answer.completion_tokens},'
            f'"total_tokens":{answer.total_tokens}}}'
        )
        end.append(head.split(b',"choices":')[0] + f',"choices":[],"usage":{usage}}}\n\n'.encode())
    end.append(DONE)
    return StreamBody(first, chunks, answer.pieces, end, STREAM_ERROR)
