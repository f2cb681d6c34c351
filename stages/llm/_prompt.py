"""From a record to what is asked: the prompt template, messages, and fast request bodies.

A ``prompt=`` is a template over the record's fields
(:class:`~stages.llm._template.PromptTemplate`: named fields and bounded format specs only;
its errors name the missing field, and a null field is an error unless rendered empty).
Without one, a record is the prompt itself (a string), or a mapping with ``"messages"`` or
``"prompt"`` (chat), ``"text"``, ``"input"`` or ``"prompt"`` (embeddings).

Most chat rows are one user message. Their body differs from row to row only in that message's
text, so :func:`chat_parts` encodes the body once around a marker and :func:`one_message_payload`
makes each row's body as ``head + json_string(text) + tail``: byte for byte what encoding the
whole body gives, without building and encoding a dict per row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring
from typing import Any

from pipeline._errors import ItemError, MissingFieldError
from stages.llm._output import Output, json_schema_of
from stages.llm._providers import Provider
from stages.llm._template import PromptTemplate
from stages.llm._transport import ENCODER

_MARKER = "\x00llm-pipeline-prompt\x00"


def available(record: Any) -> Sequence[str]:
    """Return the field names a record offers, for a missing-field message."""
    if isinstance(record, Mapping):
        return [str(k) for k in record]
    return ["value"]


def chat_messages(template: PromptTemplate | None, record: Any) -> list[dict[str, Any]]:
    """Return the chat messages of ``record``.

    Raises:
        MissingFieldError: A template field, or the record's prompt, is missing.
    """
    if template is not None:
        return [{"role": "user", "content": template.render(record)}]
    if isinstance(record, str):
        return [{"role": "user", "content": record}]
    if isinstance(record, Mapping):
        listed = record.get("messages")
        if isinstance(listed, list):
            return [dict(m) for m in listed]
        if isinstance(record.get("prompt"), str):
            return [{"role": "user", "content": record["prompt"]}]
    raise MissingFieldError("prompt", available(record))


def embedding_text(template: PromptTemplate | None, record: Any) -> str:
    """Return the text of ``record`` to embed.

    Raises:
        MissingFieldError: A template field, or the record's text, is missing.
    """
    if template is not None:
        return template.render(record)
    if isinstance(record, str):
        return record
    if isinstance(record, Mapping):
        for field in ("text", "input", "prompt"):
            if isinstance(record.get(field), str):
                return str(record[field])
    raise MissingFieldError("text", available(record))


def prompt_text(template: PromptTemplate | None, record: Any) -> str | None:
    """Return the one user message of ``record``, or ``None`` if it has other messages.

    Raises:
        MissingFieldError: A template field is missing from the record.
    """
    if template is not None:
        return template.render(record)
    if isinstance(record, str):
        return record
    if (
        isinstance(record, Mapping)
        and not isinstance(record.get("messages"), list)
        and isinstance(record.get("prompt"), str)
    ):
        return str(record["prompt"])
    return None  # chat_messages() reads it, or says what is missing


def structured_params(
    provider: Provider,
    output: Output,
    template: PromptTemplate | None,
    system: str | None,
    params: dict[str, Any],
) -> dict[str, Any]:
    """Return chat ``params`` that ask the provider itself for JSON when the output is checked.

    OpenAI-compatible servers get ``response_format`` (``json_schema`` with a schema;
    ``json_object`` for ``json_output`` when the prompt or system prompt says "JSON", as OpenAI
    requires), Anthropic a forced tool whose input schema is the schema (its input is the
    answer's text, streamed too). The answer is still validated, and re-asked, as before.
    """
    if output.validator is None:
        return params
    words = ((template.text if template else "") + (system or "")).lower()
    json_mode = output.json_output and "json" in words
    return provider.structured_params(params, json_schema_of(output.schema), json_mode=json_mode)


def chat_parts(
    provider: Provider,
    model: str,
    system: str | None,
    params: Mapping[str, Any],
    stream: bool,
) -> tuple[str, str] | None:
    """Split the chat body of a one-message request around the message's JSON string.

    ``None`` when the body cannot be split that way (params that are not JSON: the slow path
    says what is wrong with them).
    """
    body = provider.chat_body(model, [{"role": "user", "content": _MARKER}], system, params, stream)
    try:
        encoded = ENCODER.encode(body)
    except (TypeError, ValueError):
        return None
    quoted = encode_basestring(_MARKER)
    if encoded.count(quoted) != 1:
        return None
    head, tail = encoded.split(quoted)
    return head, tail


def one_message_payload(parts: tuple[str, str], text: str) -> bytes:
    """Return the body of a one-message chat request from its parts (see :func:`chat_parts`).

    Raises:
        ItemError: The text is not valid Unicode (a lone surrogate).
    """
    try:
        return (parts[0] + encode_basestring(text) + parts[1]).encode()
    except UnicodeEncodeError as exc:
        raise ItemError(f"the request holds text that is not valid Unicode: {exc}") from None


__all__ = [
    "available",
    "chat_parts",
    "embedding_text",
    "chat_messages",
    "one_message_payload",
    "prompt_text",
    "structured_params",
]
