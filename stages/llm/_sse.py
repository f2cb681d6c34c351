"""Server-sent events: an incremental decoder written to the WHATWG spec, and stream assemblers.

The decoder (:class:`SSEDecoder`) follows the "event stream interpretation" section of the HTML
standard:

* lines end at CR, LF or CRLF; a CRLF split across two chunks counts once;
* bytes are decoded as UTF-8 (invalid sequences become U+FFFD) only once a whole line has
  arrived, so a multi-byte character split across chunks decodes correctly;
* one byte-order mark at the very start of the stream is ignored;
* a line starting with ``:`` is a comment (``: OPENROUTER PROCESSING`` keep-alives);
* ``field: value`` with at most one space dropped after the colon; a line without a colon is a
  field with an empty value; unknown fields are ignored;
* ``data`` lines accumulate, joined by a line feed; a blank line dispatches the event; a block that
  had no ``data`` line at all is not dispatched (so ``event: ping`` alone yields nothing, while
  ``data:`` with an empty value yields an event whose data is ``""``);
* ``id`` persists from event to event (the "last event ID") and is ignored if it contains NUL;
  ``retry`` is kept only when it is all ASCII digits;
* at the end of the stream an event without its terminating blank line is discarded.

Lines are found with ``bytes.splitlines`` on whole chunks, never byte by byte.

On top of it, two assemblers turn the events of one LLM streaming response into a final answer:
:class:`ChatStreamAssembler` for OpenAI-compatible ``chat.completion.chunk`` streams and
:class:`AnthropicStreamAssembler` for the Anthropic Messages API's typed events. Both refuse a
stream that stopped early (:class:`TruncatedStreamError`): a partial answer is never accepted
as a whole one. Every :class:`StreamError` is a fault worth retrying.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, Protocol

from pipeline._envelope import Envelope
from pipeline._errors import ConfigError, ItemError
from pipeline._stage import Inbox, OnError, Outbox, Stage

__all__ = [
    "AnthropicStreamAssembler",
    "ChatStreamAssembler",
    "MalformedChunkError",
    "SSEDecoder",
    "SSEParse",
    "ServerSentEvent",
    "StreamError",
    "StreamErrorEvent",
    "StreamResult",
    "TruncatedStreamError",
    "Usage",
    "assemble",
    "iter_sse",
]

_BOM = b"\xef\xbb\xbf"
_PREVIEW = 120


# --------------------------------------------------------------------------------------------
# Errors


class StreamError(Exception):
    """A streaming response went wrong part-way; retrying the request may succeed.

    Attributes:
        status: HTTP status of the response, when known.
    """

    status: int | None = None


class TruncatedStreamError(StreamError):
    """The stream ended before the server said it was complete."""


class MalformedChunkError(StreamError):
    """A stream chunk was not the JSON object the protocol promises."""


class StreamErrorEvent(StreamError):
    """The server reported an error inside an otherwise successful (HTTP 200) stream.

    Args:
        message: The server's error message.
        error_type: The error's type (``"server_error"``, ``"overloaded_error"``...).
        code: The error's code when the server gave one (a string or a number).
        status: The HTTP status of the response carrying the event (200 mid-stream).
    """

    def __init__(
        self,
        message: str,
        *,
        error_type: str | None = None,
        code: str | int | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type
        self.code = code
        self.status = status

    def __str__(self) -> str:
        details = ", ".join(
            f"{name}={value}"
            for name, value in (("type", self.error_type), ("code", self.code))
            if value is not None
        )
        return f"{self.message} ({details})" if details else self.message


def _error_event(error: Any, fallback_type: str | None = None) -> StreamErrorEvent:
    """Build a :class:`StreamErrorEvent` from a provider's ``error`` object (dict or text)."""
    if isinstance(error, dict):
        message = error.get("message")
        error_type = error.get("type")
        code = error.get("code")
        return StreamErrorEvent(
            str(message) if message is not None else "error event in stream",
            error_type=str(error_type) if error_type is not None else fallback_type,
            code=code if isinstance(code, (str, int)) and not isinstance(code, bool) else None,
            status=200,
        )
    return StreamErrorEvent(str(error), error_type=fallback_type, status=200)


# --------------------------------------------------------------------------------------------
# Decoder


@dataclasses.dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched server-sent event.

    Attributes:
        data: The event's data; several ``data`` lines are joined with line feeds.
        event: The event type (``"message"`` unless the stream named one).
        id: The last event ID seen so far in the stream (it persists across events), if any.
        retry: The reconnection time in milliseconds set in this event's block, if any.
    """

    data: str = ""
    event: str = "message"
    id: str | None = None
    retry: int | None = None

    def json(self) -> Any:
        """Return the data parsed as JSON (raises :class:`ValueError` if it is not)."""
        return json.loads(self.data)


class SSEDecoder:
    """Incremental decoder of a ``text/event-stream`` body.

    Feed it the body's bytes in chunks of any size; it returns the events completed so far.

    Attributes:
        last_event_id: The last event ID set by the stream (``None`` before any ``id`` line).
        retry: The last reconnection time (ms) the stream asked for, if any.
        discarded: Set by :meth:`close` when the stream ended inside an event or a line.
    """

    __slots__ = (
        "_closed",
        "_data",
        "_event",
        "_pending",
        "_retry",
        "_skip_lf",
        "_started",
        "discarded",
        "last_event_id",
        "retry",
    )

    def __init__(self) -> None:
        self._pending: list[bytes] = []  # pieces of a line not terminated yet
        self._skip_lf = False  # the last chunk ended in CR: a leading LF completes a CRLF
        self._started = False  # the first line (where a BOM may sit) was seen
        self._closed = False
        self._data: list[bytes] | None = None  # None = no data line in the current block
        self._event = b""
        self._retry: int | None = None
        self.last_event_id: str | None = None
        self.retry: int | None = None
        self.discarded = False

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[ServerSentEvent]:
        """Consume the next chunk of the body; return the events it completed (maybe none).

        Raises:
            RuntimeError: The decoder was closed.
        """
        if self._closed:
            raise RuntimeError("SSEDecoder.feed() called after close()")
        if not chunk:
            return []
        if type(chunk) is not bytes:
            chunk = bytes(chunk)
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == 10:  # the LF of a CRLF whose CR ended the previous chunk
                chunk = chunk[1:]
                if not chunk:
                    return []
        if b"\n" not in chunk and b"\r" not in chunk:
            self._pending.append(chunk)
            return []
        if self._pending:
            self._pending.append(chunk)
            data = b"".join(self._pending)
            self._pending.clear()
        else:
            data = chunk
        lines = data.splitlines()
        last = data[-1]
        if last == 13:  # ends with CR: complete, but the next chunk may start with its LF
            self._skip_lf = True
        elif last != 10:  # the last line is incomplete: keep it for the next chunk
            self._pending.append(lines.pop())
        if not self._started and lines:
            self._started = True
            if lines[0].startswith(_BOM):
                lines[0] = lines[0][3:]
        return self._lines(lines)

    def _lines(self, lines: list[bytes]) -> list[ServerSentEvent]:
        events: list[ServerSentEvent] = []
        for line in lines:
            if not line:
                data = self._data
                if data is not None:
                    events.append(
                        ServerSentEvent(
                            b"\n".join(data).decode("utf-8", "replace"),
                            self._event.decode("utf-8", "replace") if self._event else "message",
                            self.last_event_id,
                            self._retry,
                        )
                    )
                self._data = None
                self._event = b""
                self._retry = None
                continue
            if line[0] == 58:  # ":" comment
                continue
            field, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                if self._data is None:
                    self._data = [value]
                else:
                    self._data.append(value)
            elif field == b"event":
                self._event = value
            elif field == b"id":
                if b"\x00" not in value:
                    self.last_event_id = value.decode("utf-8", "replace")
            elif field == b"retry" and value.isdigit():
                self._retry = self.retry = int(value)
        return events

    def close(self) -> list[ServerSentEvent]:
        """End the stream; an event still missing its blank line is discarded, per the spec.

        Returns:
            Always an empty list (the spec dispatches nothing at end of stream); kept as a list
            so callers can treat ``close`` like a last ``feed``.
        """
        if not self._closed:
            self._closed = True
            self.discarded = bool(self._pending) or self._data is not None
            self._pending.clear()
            self._data = None
        return []


async def iter_sse(chunks: AsyncIterable[bytes]) -> AsyncIterator[ServerSentEvent]:
    """Yield the events of a byte stream (e.g. ``response.content.iter_any()`` of aiohttp)."""
    decoder = SSEDecoder()
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            yield event
    decoder.close()


# --------------------------------------------------------------------------------------------
# Assemblers


@dataclasses.dataclass(slots=True)  # not frozen: one per answer, built 5x faster
class Usage:
    """Token counts reported by the server.

    Attributes:
        prompt_tokens: Tokens of the request (Anthropic: ``input_tokens``).
        completion_tokens: Tokens generated (Anthropic: ``output_tokens``).
    """

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt and completion tokens together."""
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass(frozen=True, slots=True)
class StreamResult:
    """The answer assembled from a complete stream.

    Attributes:
        text: The generated text, all deltas joined.
        finish_reason: Why generation stopped (``"stop"``, ``"length"``, ``"end_turn"``...),
            ``None`` when the server ended the stream without saying.
        usage: Token counts, or ``None`` when the server did not report them (never zeros).
        model: The model named by the server, if any.
        id: The response id given by the server, if any.
    """

    text: str
    finish_reason: str | None
    usage: Usage | None
    model: str | None = None
    id: str | None = None


class StreamAssembler(Protocol):
    """What :func:`assemble` needs from an assembler."""

    def feed(self, event: ServerSentEvent) -> str:
        """Consume one event; return the text it added."""
        ...

    def result(self) -> StreamResult:
        """Return the assembled answer."""
        ...


def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _parse(event: ServerSentEvent, number: int) -> dict[str, Any]:
    """Parse an event's data as a JSON object or raise :class:`MalformedChunkError`."""
    try:
        obj = json.loads(event.data)
    except ValueError as error:
        raise MalformedChunkError(
            f"stream chunk #{number} is not valid JSON ({error}): {event.data[:_PREVIEW]!r}"
        ) from None
    if not isinstance(obj, dict):
        raise MalformedChunkError(
            f"stream chunk #{number} is JSON but not an object: {event.data[:_PREVIEW]!r}"
        )
    return obj


class ChatStreamAssembler:
    """Assembles an OpenAI-compatible chat completion stream (``chat.completion.chunk``).

    Feed it every event; :meth:`feed` returns the text each one added so callers can stream
    output as it arrives. The stream ends with ``data: [DONE]``; events after it are ignored.
    Only the first choice (``index`` 0) and its text ``content`` are assembled; tool calls and
    other fields are ignored. A whitespace-only ``data`` is taken as a keep-alive.

    Attributes:
        done: ``[DONE]`` was received.
        chunks: Events consumed so far.
    """

    def __init__(self) -> None:
        self._parts: list[str] = []
        self.done = False
        self.chunks = 0
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.model: str | None = None
        self.id: str | None = None

    def feed(self, event: ServerSentEvent) -> str:
        """Consume one event and return the content text it added (``""`` if none).

        Raises:
            MalformedChunkError: The data is not a JSON object.
            StreamErrorEvent: The server sent an error object in the stream.
        """
        if self.done:
            return ""
        self.chunks += 1
        data = event.data
        if data.startswith("[DONE]") or data.strip() == "[DONE]":
            self.done = True
            return ""
        if not data or data.isspace():
            return ""
        obj = _parse(event, self.chunks)
        if "error" in obj:
            raise _error_event(obj["error"])
        if event.event == "error":
            raise _error_event(obj)
        if self.id is None and isinstance(obj.get("id"), str):
            self.id = obj["id"]
        if self.model is None and isinstance(obj.get("model"), str):
            self.model = obj["model"]
        usage = obj.get("usage")
        if isinstance(usage, dict):
            prompt = _as_int(usage.get("prompt_tokens"))
            completion = _as_int(usage.get("completion_tokens"))
            if prompt is not None and completion is not None:
                self.usage = Usage(prompt, completion)
        choices = obj.get("choices")
        if not choices:
            return ""
        if not isinstance(choices, list):
            raise MalformedChunkError(
                f"stream chunk #{self.chunks}: 'choices' is {type(choices).__name__}, not a list"
            )
        text = ""
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if isinstance(content, str) and content:
                    text += content
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                self.finish_reason = reason
        if text:
            self._parts.append(text)
        return text

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._parts)

    def result(self) -> StreamResult:
        """Return the assembled answer.

        Raises:
            TruncatedStreamError: The stream had neither ``[DONE]`` nor a ``finish_reason``.
        """
        if not self.done and self.finish_reason is None:
            raise TruncatedStreamError(
                f"chat stream ended without [DONE] or finish_reason after {self.chunks} "
                f"events ({sum(map(len, self._parts))} characters of partial text)"
            )
        return StreamResult(self.text, self.finish_reason, self.usage, self.model, self.id)


class AnthropicStreamAssembler:
    """Assembles an Anthropic Messages API stream of typed events.

    Handles ``message_start`` (id, model, input usage), ``content_block_start`` and
    ``content_block_delta`` (``text_delta``; ``input_json_delta``, a forced tool's JSON input,
    is the answer's text when there is no other: structured output), ``content_block_stop``,
    ``message_delta`` (``stop_reason``, cumulative output usage), ``message_stop``, ``ping``
    and ``error``. Unknown events and other deltas are ignored.

    Attributes:
        done: ``message_stop`` was received.
        chunks: Events consumed so far.
    """

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._tool: list[str] = []
        self.done = False
        self.chunks = 0
        self.stop_reason: str | None = None
        self.model: str | None = None
        self.id: str | None = None
        self._input: int | None = None
        self._output: int | None = None

    def _usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            tokens = _as_int(usage.get("input_tokens"))
            if tokens is not None:
                self._input = tokens
            tokens = _as_int(usage.get("output_tokens"))
            if tokens is not None:
                self._output = tokens

    def feed(self, event: ServerSentEvent) -> str:
        """Consume one event and return the text it added (``""`` if none).

        Raises:
            MalformedChunkError: The data is not a JSON object.
            StreamErrorEvent: The server sent an ``error`` event (``overloaded_error``...).
        """
        if self.done:
            return ""
        self.chunks += 1
        if not event.data or event.data.isspace():
            return ""
        obj = _parse(event, self.chunks)
        kind = event.event if event.event != "message" else obj.get("type")
        text = ""
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta":
                value = delta.get("text")
                if isinstance(value, str):
                    text = value
            elif isinstance(delta, dict) and delta.get("type") == "input_json_delta":
                value = delta.get("partial_json")  # a forced tool's input: structured output
                if isinstance(value, str):
                    self._tool.append(value)
        elif kind == "content_block_start":
            block = obj.get("content_block")
            if isinstance(block, dict) and block.get("type") == "text":
                value = block.get("text")
                if isinstance(value, str):
                    text = value
        elif kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                if isinstance(message.get("id"), str):
                    self.id = message["id"]
                if isinstance(message.get("model"), str):
                    self.model = message["model"]
                self._usage(message.get("usage"))
        elif kind == "message_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                self.stop_reason = delta["stop_reason"]
            self._usage(obj.get("usage"))
        elif kind == "message_stop":
            self.done = True
        elif kind == "error" or "error" in obj:
            raise _error_event(obj.get("error", obj))
        if text:
            self._parts.append(text)
        return text

    @property
    def text(self) -> str:
        """The text received so far (a forced tool's JSON input when there is no text)."""
        return "".join(self._parts or self._tool)

    @property
    def usage(self) -> Usage | None:
        """Token usage, when the stream reported both input and output counts."""
        if self._input is None or self._output is None:
            return None
        return Usage(self._input, self._output)

    def result(self) -> StreamResult:
        """Return the assembled answer.

        Raises:
            TruncatedStreamError: The stream had no ``message_stop``.
        """
        if not self.done:
            raise TruncatedStreamError(
                f"Anthropic stream ended without message_stop after {self.chunks} events "
                f"({sum(map(len, self._parts))} characters of partial text)"
            )
        return StreamResult(self.text, self.stop_reason, self.usage, self.model, self.id)


async def assemble(chunks: AsyncIterable[bytes], assembler: StreamAssembler) -> StreamResult:
    """Decode a byte stream and return the answer ``assembler`` builds from its events.

    Args:
        chunks: The response body in chunks (``response.content.iter_any()``).
        assembler: A fresh :class:`ChatStreamAssembler` or :class:`AnthropicStreamAssembler`.

    Raises:
        StreamError: The stream was truncated, malformed or carried an error event.
    """
    async for event in iter_sse(chunks):
        assembler.feed(event)
    return assembler.result()


# --------------------------------------------------------------------------------------------
# Stage


class SSEParse(Stage[bytes, ServerSentEvent]):
    """Turns the byte chunks of ONE event stream into its events.

    Each event travels in an envelope derived from the chunk that completed it; a chunk that
    completes no event is accounted as dropped, one that completes several grows into them.
    Because the decoder keeps state between chunks, the stage always runs a single worker.
    A chunk that is not bytes (``str`` is accepted and encoded as UTF-8) is dead-lettered.

    Args:
        name: Stage name.
        buffer: Capacity of the stage's inbox.
        on_error: Per-item error policy (see :class:`pipeline._stage.Stage`).
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        buffer: int = 16,
        on_error: OnError = "dead_letter",
    ) -> None:
        super().__init__(name=name, workers=1, buffer=buffer, on_error=on_error)

    @property
    def workers(self) -> int:
        """Always one: chunks of a stream must be decoded in order by one decoder."""
        return 1

    @workers.setter
    def workers(self, value: int) -> None:
        if value != 1:
            raise ConfigError(
                f"SSEParse decodes one ordered stream: workers must be 1, got {value}"
            )

    async def run(self, inbox: Inbox[bytes], outbox: Outbox[ServerSentEvent]) -> None:
        """Decode each chunk in turn and send the events it completes."""
        decoder = SSEDecoder()
        async for env in inbox:
            chunk: Any = env.value
            if isinstance(chunk, str):
                chunk = chunk.encode("utf-8")
            elif not isinstance(chunk, (bytes, bytearray, memoryview)):
                await outbox.handle_error(
                    env,
                    ItemError(f"SSEParse expects bytes chunks, got {type(chunk).__name__}"),
                )
                continue
            events = decoder.feed(chunk)
            if not events:
                outbox.drop(env)
                continue
            if len(events) > 1:
                outbox.grow(env, len(events) - 1)
            for event in events:
                out: Envelope[ServerSentEvent] = env.replace(event)
                await outbox.send(out)
        decoder.close()
        if decoder.discarded:
            outbox.log.warning("event stream ended inside an event; the partial event is dropped")
