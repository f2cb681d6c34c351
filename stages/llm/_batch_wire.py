"""The wire format of the provider Batch APIs: request files, batch objects, result lines.

Everything here is pure (no I/O): :class:`BatchWire` turns request bodies into the lines of a
batch's request file and reads the provider's batch objects and result lines back into
:class:`BatchStatus` and :class:`BatchResult`, the same way for OpenAI-compatible servers and
for Anthropic. :mod:`stages.llm._batch_api` does the HTTP.

OpenAI result lines are ``{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error"}``: ``error`` is set (and ``response`` null) for requests that never ran
(``batch_expired``, ``batch_cancelled``) or timed out (``request_timeout``); a request that ran
and failed has a ``response`` whose ``status_code`` is not 200 and whose body is the usual
error body. Anthropic result lines are ``{"custom_id", "result": {"type": "succeeded",
"message"} | {"type": "errored", "error": {"type": "error", "error": {"type", "message"}}} |
{"type": "canceled"} | {"type": "expired"}}``.

Errors, as a tree::

    FatalError
    └── BatchAPIError               a batch request failed (names the step and the answer)
        ├── BatchUnsupportedError   the server has no batch endpoint (drop --batch-api)
        └── BatchRefusedError       the provider refused the upload or the batch (400, 413...)
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Mapping
from typing import Any, Literal

from pipeline._errors import ConfigError, FatalError
from pipeline._json import dumps, loads
from stages.llm._providers import (
    Answer,
    AnthropicProvider,
    AzureProvider,
    Endpoint,
    HTTPFailure,
    Provider,
    ResponseFormatError,
)

BatchKind = Literal["openai", "anthropic"]
Outcome = Literal["succeeded", "errored", "expired", "canceled"]


class BatchAPIError(FatalError):
    """A batch-endpoint request failed; the message names the step and the provider's answer."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class BatchUnsupportedError(BatchAPIError):
    """The provider or server has no batch endpoint: send the rows online instead."""


class BatchRefusedError(BatchAPIError):
    """The provider refused the upload or the batch (too large, malformed, wrong model...)."""


@dataclasses.dataclass(frozen=True, slots=True)
class BatchLimits:
    """What one batch may hold.

    Attributes:
        max_requests: Requests per batch.
        max_bytes: Bytes of the uploaded file (OpenAI) or request body (Anthropic).
    """

    max_requests: int
    max_bytes: int


OPENAI_LIMITS = BatchLimits(50_000, 200 * 1024 * 1024)
"""OpenAI: at most 50,000 requests and 200 MB per input file."""
ANTHROPIC_LIMITS = BatchLimits(100_000, 256 * 1024 * 1024)
"""Anthropic: at most 100,000 requests or 256 MB per batch."""


_ANTHROPIC_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}
"""The HTTP status of each Anthropic error type (an errored batch result carries only the type)."""

_OPENAI_ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
"""OpenAI batch statuses after which nothing more happens."""


@dataclasses.dataclass(frozen=True, slots=True)
class BatchStatus:
    """A batch as the provider reports it, in terms common to both APIs.

    Attributes:
        id: The provider's batch id.
        status: The provider's own status word (``in_progress``, ``completed``, ``ended``...).
        ended: Whether processing ended (results, if any, can be read).
        counts: Request counts by outcome, as the provider names them.
        output_file_id: OpenAI: the answers' file.
        error_file_id: OpenAI: the per-request errors' file.
        results_url: Anthropic: where the results are read.
        failure: Why the batch as a whole failed (OpenAI ``errors``), if it did.
        created_at: Unix time of creation, when the provider says.
        metadata: The metadata the batch was created with (OpenAI).
    """

    id: str
    status: str
    ended: bool
    counts: dict[str, int]
    output_file_id: str | None = None
    error_file_id: str | None = None
    results_url: str | None = None
    failure: str | None = None
    created_at: float | None = None
    metadata: dict[str, str] | None = None

    @property
    def answered(self) -> int:
        """Requests answered successfully so far."""
        return self.counts.get("completed", 0) + self.counts.get("succeeded", 0)

    @property
    def total(self) -> int:
        """Requests in the batch (0 when the provider does not say yet)."""
        if "total" in self.counts:
            return self.counts["total"]
        return sum(self.counts.values())


@dataclasses.dataclass(frozen=True, slots=True)
class BatchResult:
    """One request's outcome, read from a batch's results.

    Attributes:
        custom_id: The id the request was submitted with.
        outcome: ``succeeded``, ``errored``, ``expired`` (not run before the window ended) or
            ``canceled`` (not run because the batch was cancelled).
        answer: The answer when it succeeded.
        failure: What went wrong when it errored (status, code, retryable).
    """

    custom_id: str
    outcome: Outcome
    answer: Answer | None = None
    failure: HTTPFailure | None = None


class BatchWire:
    """How one provider's batch API writes requests and reads batches and results.

    Args:
        provider: The provider (body building, answer parsing, error classification).
        endpoint: ``"chat"`` or ``"embeddings"`` (embeddings: OpenAI-compatible only).

    Raises:
        BatchUnsupportedError: The provider has no batch endpoint in this library (Azure), or
            not for this endpoint (Anthropic embeddings).
    """

    def __init__(self, provider: Provider, endpoint: Endpoint = "chat") -> None:
        if isinstance(provider, AzureProvider):
            raise BatchUnsupportedError(
                "provider 'azure' has no batch endpoint in this library: drop --batch-api"
                " (batch_api=False) to send the rows online"
            )
        self.kind: BatchKind = "anthropic" if isinstance(provider, AnthropicProvider) else "openai"
        if self.kind == "anthropic" and endpoint != "chat":
            raise BatchUnsupportedError("Anthropic batches answer messages only, not embeddings")
        self.provider = provider
        self.endpoint: Endpoint = endpoint
        self.limits = ANTHROPIC_LIMITS if self.kind == "anthropic" else OPENAI_LIMITS

    @property
    def endpoint_path(self) -> str:
        """The ``url`` of every request line (and OpenAI's batch ``endpoint``)."""
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/embeddings"

    def request_line(self, custom_id: str, body: Mapping[str, Any]) -> bytes:
        """Return one request as the batch file holds it (JSON, no newline).

        Raises:
            ConfigError: The body asks for streaming, which batches do not do.
        """
        if body.get("stream"):
            raise ConfigError("a batch request cannot stream: build the body with stream=False")
        if self.kind == "anthropic":
            item: dict[str, Any] = {"custom_id": custom_id, "params": body}
        else:
            item = {"custom_id": custom_id, "method": "POST", "url": self.endpoint_path}
            item["body"] = body
        return dumps(item)

    def framing(self) -> tuple[bytes, bytes, bytes]:
        """Return ``(prefix, separator, suffix)`` around the request lines of a batch."""
        if self.kind == "anthropic":
            return b'{"requests":[', b",\n", b"]}"
        return b"", b"\n", b"\n"

    def status(self, data: Any) -> BatchStatus:
        """Read a batch object.

        Raises:
            BatchAPIError: ``data`` is not a batch object.
        """
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise BatchAPIError(
                f"the batch endpoint answered something that is not a batch: {short(data)}"
            )
        counts_raw = data.get("request_counts")
        counts = {
            str(k): int(v)
            for k, v in (counts_raw.items() if isinstance(counts_raw, dict) else ())
            if isinstance(v, int)
        }
        created = data.get("created_at")
        if self.kind == "anthropic":
            status = str(data.get("processing_status"))
            when = _parse_time(created)
            return BatchStatus(
                id=data["id"],
                status=status,
                ended=status == "ended",
                counts=counts,
                results_url=data.get("results_url") or None,
                created_at=when,
            )
        status = str(data.get("status"))
        metadata = data.get("metadata")
        return BatchStatus(
            id=data["id"],
            status=status,
            ended=status in _OPENAI_ENDED,
            counts=counts,
            output_file_id=data.get("output_file_id") or None,
            error_file_id=data.get("error_file_id") or None,
            failure=_openai_failure(data.get("errors")) if status == "failed" else None,
            created_at=float(created) if isinstance(created, (int, float)) else None,
            metadata={str(k): str(v) for k, v in metadata.items()}
            if isinstance(metadata, dict)
            else None,
        )

    def result(self, item: Any, batch_id: str) -> BatchResult:
        """Read one results line (a parsed JSON value).

        Raises:
            BatchAPIError: The line has no ``custom_id``.
        """
        if self.kind == "anthropic":
            return self._anthropic_result(item, batch_id)
        return self._openai_result(item, batch_id)

    def _openai_result(self, item: Any, batch_id: str) -> BatchResult:
        custom_id = _custom_id(item, batch_id)
        error = item.get("error")
        response = item.get("response")
        if isinstance(error, dict) and not isinstance(response, dict):
            code = str(error.get("code") or "")
            message = str(error.get("message") or code or "no message")
            if code == "batch_expired":
                return BatchResult(custom_id, "expired")
            if code == "batch_cancelled":
                return BatchResult(custom_id, "canceled")
            failure = HTTPFailure(0, code or None, message, retryable=True)
            return BatchResult(custom_id, "errored", failure=failure)
        if not isinstance(response, dict):
            failure = HTTPFailure(0, None, "result line has neither response nor error", True)
            return BatchResult(custom_id, "errored", failure=failure)
        status = response.get("status_code")
        body = response.get("body")
        if status != 200:
            raw = json.dumps(body).encode() if body is not None else b""
            number = status if isinstance(status, int) else 0
            failure = self.provider.classify(number, {}, raw)
            return BatchResult(custom_id, "errored", failure=failure)
        return self._parsed(custom_id, body)

    def _anthropic_result(self, item: Any, batch_id: str) -> BatchResult:
        custom_id = _custom_id(item, batch_id)
        result = item.get("result")
        kind = result.get("type") if isinstance(result, dict) else None
        if kind == "succeeded":
            assert isinstance(result, dict)
            return self._parsed(custom_id, result.get("message"))
        if kind in ("canceled", "expired"):
            return BatchResult(custom_id, kind)
        error = result.get("error") if isinstance(result, dict) else None
        inner = error.get("error") if isinstance(error, dict) else None
        detail = inner if isinstance(inner, dict) else error if isinstance(error, dict) else {}
        code = str(detail.get("type") or "") or None
        message = str(detail.get("message") or code or "no message")
        status = _ANTHROPIC_STATUS.get(code or "", 500)
        retryable = status >= 500 or status == 429
        failure = HTTPFailure(status, code, message, retryable=retryable)
        return BatchResult(custom_id, "errored", failure=failure)

    def _parsed(self, custom_id: str, body: Any) -> BatchResult:
        try:
            if self.endpoint == "embeddings":
                answer = self.provider.parse_embeddings(body, 1)
            else:
                answer = self.provider.parse_chat(body)
        except ResponseFormatError as exc:
            failure = HTTPFailure(200, "malformed_answer", str(exc), retryable=True)
            return BatchResult(custom_id, "errored", failure=failure)
        return BatchResult(custom_id, "succeeded", answer=answer)

    # -- HTTP ----------------------------------------------------------------------------


def json_line(line: bytes, batch_id: str) -> Any:
    """Parse one results line.

    Raises:
        BatchAPIError: The line is not JSON.
    """
    try:
        return loads(line)
    except ValueError:
        text = short(line.decode("utf-8", "replace"))
        raise BatchAPIError(f"batch {batch_id}: a results line is not JSON: {text}") from None


def _custom_id(item: Any, batch_id: str) -> str:
    custom_id = item.get("custom_id") if isinstance(item, dict) else None
    if not isinstance(custom_id, str):
        raise BatchAPIError(f"batch {batch_id}: a results line has no custom_id: {short(item)}")
    return custom_id


def count_anthropic_requests(path: str) -> int:
    """Count the requests of an Anthropic request file (written with :meth:`BatchWire.framing`)."""
    size = os.path.getsize(path)
    if size <= len(b'{"requests":[]}'):
        return 0
    count = 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b",\n")
    return count


def _openai_failure(errors: Any) -> str:
    data = errors.get("data") if isinstance(errors, dict) else None
    if not isinstance(data, list) or not data:
        return "the provider gave no reason"
    parts = []
    for item in data[:5]:
        if isinstance(item, dict):
            line = f" (line {item['line']})" if item.get("line") is not None else ""
            parts.append(f"{item.get('code') or 'error'}{line}: {item.get('message') or ''}")
    return "; ".join(parts)


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."
