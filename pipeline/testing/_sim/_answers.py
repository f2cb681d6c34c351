"""What the simulator answers: a deterministic function of the request.

* content is ``"echo: " + <text of the last user message>``; with ``response_format`` of type
  ``json_object`` it is the JSON object ``{"echo": <text>}`` instead; asked for structured
  output (``json_schema`` with a schema, or an Anthropic forced tool) it is a deterministic
  object valid against the schema (:func:`~pipeline.testing._sim._schema.example_for`), and
  Anthropic answers it as a ``tool_use`` block;
* tokens are counted as ``max(1, len(text) // 4)``;
* ``max_tokens`` (or ``max_completion_tokens``) cuts the answer at a word boundary;
* an embedding is the unit vector of ``dim`` little-endian int16 values taken from the
  SHAKE-256 digest of the UTF-8 text.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any

from pipeline.testing._sim._schema import example_for, structured_schema

__all__ = ["Answer", "BadRequest", "answer_to", "embedding_for", "tokens"]


class BadRequest(Exception):
    """The request cannot be answered; the message says why (the client gets a 400)."""


def tokens(text: str) -> int:
    """Return the simulator's token count of ``text``: ``max(1, len(text) // 4)``."""
    return max(1, len(text) // 4)


def embedding_for(text: str, dim: int) -> list[float]:
    """Return the simulator's deterministic unit embedding of ``text`` with ``dim`` values."""
    ints = struct.unpack(f"<{dim}h", hashlib.shake_256(text.encode()).digest(2 * dim))
    norm = math.sqrt(sum(v * v for v in ints)) or 1.0
    return [v / norm for v in ints]


def _text_of(content: Any) -> str:
    """Return the text of a message's content (a string or a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _pieces(content: str, max_tokens: int | None) -> tuple[list[str], bool]:
    """Split the answer into one piece per word; cut it to ``max_tokens``; say if cut."""
    words = content.split(" ")
    pieces = [words[0], *(" " + w for w in words[1:])]
    if max_tokens is None:
        return pieces, False
    total = 0
    for i, piece in enumerate(pieces):
        if i and max(1, (total + len(piece)) // 4) > max_tokens:
            return pieces[:i], True
        total += len(piece)
    return pieces, False


class Answer:
    """What the simulator answers to one chat/messages request."""

    __slots__ = ("completion_tokens", "cut", "model", "pieces", "prompt_tokens", "text", "tool")

    def __init__(
        self,
        model: str,
        pieces: list[str],
        cut: bool,
        prompt_tokens: int,
        tool: tuple[str, Any] | None = None,
    ) -> None:
        self.tool = tool
        """Anthropic structured output: the forced tool's name and the input it is called with."""
        self.model = model
        self.pieces = pieces
        self.cut = cut
        self.text = "".join(pieces)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = tokens(self.text)

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens: what the request costs against a token quota."""
        return self.prompt_tokens + self.completion_tokens


def _prompt(messages: Any) -> tuple[int, str]:
    """Return the total characters of every message's text and the last user message's text."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array")
    chars = 0
    last_user = ""
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest("each message must be an object")
        text = _text_of(message.get("content"))
        chars += len(text)
        if message.get("role") == "user":
            last_user = text
    return chars, last_user


def answer_to(req: Any, default_model: str, *, anthropic: bool) -> Answer:
    """Compute the deterministic answer to a chat request.

    Raises:
        BadRequest: The body is not a valid chat (or Anthropic messages) request.
    """
    if not isinstance(req, dict):
        raise BadRequest("the request body must be a JSON object")
    chars, last_user = _prompt(req.get("messages"))
    if anthropic:
        chars += len(_text_of(req.get("system")))
    limit = req.get("max_completion_tokens", req.get("max_tokens"))
    if anthropic and limit is None:
        raise BadRequest("max_tokens: Field required")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise BadRequest(f"max_tokens must be a positive integer, got {limit!r}")
    response_format = req.get("response_format")
    structured = structured_schema(req, anthropic=anthropic)
    tool: tuple[str, Any] | None = None
    if structured is not None:
        value = example_for(structured[1], last_user)
        content = json.dumps(value, ensure_ascii=False)
        tool = (structured[0], value) if anthropic else None
    elif isinstance(response_format, dict) and response_format.get("type") in (
        "json_object",
        "json_schema",
    ):
        content = json.dumps({"echo": last_user}, ensure_ascii=False)
    else:
        content = "echo: " + last_user
    pieces, cut = _pieces(content, limit)
    model = req.get("model")
    return Answer(
        model if isinstance(model, str) else default_model,
        pieces,
        cut,
        max(1, chars // 4),
        None if cut else tool,
    )
