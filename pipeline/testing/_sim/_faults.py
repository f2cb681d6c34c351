"""How the simulator injects its faults into a response (drawn by ``SimCore.draw_fault``).

``reset`` aborts the connection with a TCP RST; ``error_5xx``, ``error_429``, ``quota_429``,
``overloaded`` and ``non_json`` replace the answer with an error or an HTML page; ``truncate``,
``malformed``, ``stall`` and ``stream_error`` spoil the answer itself, half-way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import socket
import struct
from collections.abc import Callable
from contextlib import suppress

from aiohttp import web

from pipeline.testing._sim._core import SimCore
from pipeline.testing._sim._responses import (
    HTML,
    JSON,
    QUOTA,
    RATE_LIMITED,
    SERVER_ERRORS,
    SSE_HEADERS,
    Aborted,
)

__all__ = [
    "STREAM_ONLY",
    "StreamBody",
    "abort",
    "cut_body",
    "fault_prelude",
    "json_answer",
    "openai_fault",
    "retry_after",
    "send_stream",
]

STREAM_ONLY = frozenset({"stream_error"})
"""Faults that only apply to a streamed answer."""


def retry_after(seconds: float) -> str:
    """Return a ``retry-after`` header value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


def abort(request: web.Request, *, rst: bool) -> Aborted:
    """Close the connection now: with a TCP RST (``rst``) or a plain FIN after sent data."""
    transport = request.transport
    if transport is not None:
        if rst:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()
    return Aborted(status=599)


async def fault_prelude(
    core: SimCore,
    request: web.Request,
    fault: str | None,
    delay: float,
    respond: Callable[[str], web.StreamResponse | None],
) -> web.StreamResponse | None:
    """Count the fault, wait the latency, and return a fault's whole response, if it has one.

    ``respond(fault)`` gives the response of a fault that replaces the answer (``None`` for a
    fault that spoils the answer itself). ``None`` means: go on and answer.
    """
    if fault is not None:
        core.count_fault(fault)
        if fault == "reset":
            if delay:
                await asyncio.sleep(delay)
            return abort(request, rst=True)
    if delay:
        await asyncio.sleep(delay)
    if fault is not None:
        return respond(fault)
    return None


def openai_fault(core: SimCore, fault: str, n: int, headers: dict[str, str]) -> web.Response | None:
    """Return the OpenAI-shaped response of a fault that replaces the answer, else None."""
    if fault == "error_5xx":
        # its own stream: reusing the fault draw's seed ties the status to the draw that
        # picked the fault, and one of the three statuses then hardly ever came up
        status = random.Random(f"{core.config.seed}:{n}:status").choice((500, 502, 503))
        return web.Response(
            status=status, body=SERVER_ERRORS[status], content_type=JSON, headers=headers
        )
    if fault == "error_429":
        retry = core.config.retry_after_s
        headers["retry-after"] = retry_after(retry)
        headers["retry-after-ms"] = str(math.ceil(retry * 1000))
        return web.Response(status=429, body=RATE_LIMITED, content_type=JSON, headers=headers)
    if fault == "quota_429":
        return web.Response(status=429, body=QUOTA, content_type=JSON, headers=headers)
    if fault == "non_json":
        return web.Response(status=200, body=HTML, content_type="text/html", headers=headers)
    return None


async def cut_body(
    core: SimCore,
    request: web.Request,
    body: bytes,
    fault: str,
    headers: dict[str, str],
) -> web.StreamResponse:
    """Send half of a JSON ``body`` under its full length, then stall or close (truncate)."""
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = JSON
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    if fault == "stall":
        await core.hold(core.config.stall_s)
    abort(request, rst=False)
    return response


async def json_answer(
    core: SimCore,
    request: web.Request,
    body: bytes,
    fault: str | None,
    headers: dict[str, str],
    completion_tokens: int = 0,
) -> web.StreamResponse:
    """Send a whole JSON answer, cut or broken by its fault, after the token pacing."""
    if fault in ("truncate", "stall"):
        assert fault is not None
        return await cut_body(core, request, body, fault, headers)
    if fault == "malformed":
        body = body[: len(body) // 2]
    pace = core.config.tokens_per_s
    if pace and completion_tokens:
        await asyncio.sleep(completion_tokens / pace)
    return web.Response(body=body, content_type=JSON, headers=headers)


@dataclasses.dataclass
class StreamBody:
    """The events of one SSE answer.

    Attributes:
        first: What opens the stream (role chunk, ``message_start``, ...).
        chunks: One event per content piece, paced by the generation speed.
        pieces: The content pieces the chunks carry (their length sets the pacing).
        end: What closes a complete stream (finish reason, usage, ``[DONE]``, ...).
        error: The mid-stream error event of the ``stream_error`` fault.
    """

    first: bytes
    chunks: list[bytes]
    pieces: list[str]
    end: list[bytes]
    error: bytes

    def spoiled(self, fault: str | None) -> tuple[list[bytes], list[str]]:
        """Return the chunks and pieces ``fault`` leaves: one broken, or cut half-way."""
        chunks, pieces = self.chunks, self.pieces
        half = len(chunks) // 2
        if fault == "malformed":
            broken = (chunks[half] if chunks else self.first)[:-2]
            chunks = [*chunks[:half], broken[: len(broken) // 2] + b"\n\n", *chunks[half:]]
            pieces = [*pieces[:half], "", *pieces[half:]]
        elif fault is not None:  # truncate, stall, stream_error: cut half-way
            chunks, pieces = chunks[:half], pieces[:half]
        return chunks, pieces


async def send_stream(
    core: SimCore,
    request: web.Request,
    stream: StreamBody,
    fault: str | None,
    headers: dict[str, str],
) -> web.StreamResponse:
    """Send an SSE response: ``first``, the content chunks paced, then ``end`` (or the fault)."""
    pace = core.config.tokens_per_s
    if fault is None and not pace:
        body = b"".join((stream.first, *stream.chunks, *stream.end))
        return web.Response(body=body, headers={**headers, **SSE_HEADERS})
    response = web.StreamResponse(status=200, headers={**headers, **SSE_HEADERS})
    await response.prepare(request)
    chunks, pieces = stream.spoiled(fault)
    loop = asyncio.get_running_loop()
    started = loop.time()
    buffer = [stream.first]
    chars = 0
    for chunk, piece in zip(chunks, pieces, strict=True):
        if pace:
            chars += len(piece)
            due = started + chars / 4 / pace - loop.time()
            if due > 0.002:
                await response.write(b"".join(buffer))
                buffer.clear()
                await asyncio.sleep(due)
        buffer.append(chunk)
    if fault == "stall":
        await response.write(b"".join(buffer))
        await core.hold(core.config.stall_s)
        abort(request, rst=False)
        return response
    if fault == "stream_error":
        buffer.append(stream.error)
    elif fault != "truncate":
        buffer.extend(stream.end)
    await response.write(b"".join(buffer))
    await response.write_eof()
    return response
