"""The objects of the simulated batch endpoints: files, batches, result lines, errors.

What :mod:`pipeline.testing._batch` serves, in the providers' shapes: OpenAI file and batch
objects (Unix times, ``request_counts`` ``total``/``completed``/``failed``) and result lines
(``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``);
Anthropic message batches (RFC 3339 times, ``request_counts`` by outcome, ``results_url`` once
ended) and results (``{"custom_id", "result": {"type", ...}}``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from pipeline.testing._sim._responses import anthropic_error, dumps, openai_error


@dataclasses.dataclass
class SimFile:
    id: str
    purpose: str
    filename: str
    content: bytes
    created_at: int

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@dataclasses.dataclass
class SimBatch:
    id: str
    anthropic: bool
    requests: list[tuple[str, Any]]  # (custom_id, body or the error that makes it invalid)
    created: float  # simulator clock
    created_at: int  # unix time
    fate: str  # "ok", "fail", "expire"
    delay: float  # seconds from creation to the end, fixed when created
    endpoint: str = "/v1/chat/completions"
    input_file_id: str = ""
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None  # validation errors (OpenAI: failed)
    cancel_at: float | None = None
    ended: float | None = None
    status: str = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    results: bytes | None = None
    counts: dict[str, int] = dataclasses.field(default_factory=dict)


class InvalidRequest:
    """A request line that cannot be run (kept so the batch answers it with a 400)."""

    def __init__(self, message: str) -> None:
        self.message = message


def openai_lines(
    content: bytes, endpoint: str, max_requests: int
) -> tuple[list[tuple[str, Any]], list[dict[str, Any]]]:
    """Validate an OpenAI input file; return its requests and the validation errors."""
    requests: list[tuple[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(split_lines(content), start=1):
        try:
            item = json.loads(raw)
        except ValueError:
            errors.append({"code": "invalid_json_line", "line": number, "message": "not JSON"})
            continue
        custom_id = item.get("custom_id") if isinstance(item, dict) else None
        if not isinstance(custom_id, str) or not custom_id:
            errors.append({"code": "missing_custom_id", "line": number, "message": "no custom_id"})
            continue
        if custom_id in seen:
            message = f"custom_id {custom_id!r} is used more than once"
            errors.append({"code": "duplicate_custom_id", "line": number, "message": message})
            continue
        seen.add(custom_id)
        if item.get("method") != "POST" or item.get("url") != endpoint:
            message = f"each line must POST to the batch's endpoint {endpoint}"
            errors.append({"code": "invalid_url", "line": number, "message": message})
            continue
        body = item.get("body")
        requests.append((custom_id, body if isinstance(body, dict) else InvalidRequest("no body")))
    if len(requests) > max_requests:
        message = (
            f"the file holds {len(requests):,} requests; a batch holds at most {max_requests:,}"
        )
        errors.append({"code": "too_many_requests", "line": None, "message": message})
    if not requests and not errors:
        errors.append({"code": "empty_file", "line": None, "message": "the input file is empty"})
    return requests, errors


def split_lines(content: bytes) -> Iterator[bytes]:
    for line in content.split(b"\n"):
        if line.strip():
            yield line


def openai_public(batch: SimBatch) -> dict[str, Any]:
    ended = batch.ended is not None
    at = batch.created_at
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
        "input_file_id": batch.input_file_id,
        "completion_window": "24h",
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": at,
        "in_progress_at": at if batch.status != "validating" else None,
        "expires_at": at + 86400,
        "finalizing_at": at if ended and batch.status != "failed" else None,
        "completed_at": at if batch.status == "completed" else None,
        "failed_at": at if batch.status == "failed" else None,
        "expired_at": at if batch.status == "expired" else None,
        "cancelling_at": at if batch.cancel_at is not None else None,
        "cancelled_at": at if batch.status == "cancelled" else None,
        "request_counts": batch.counts or {"total": 0, "completed": 0, "failed": 0},
        "metadata": batch.metadata,
    }


def anthropic_public(batch: SimBatch, origin: str) -> dict[str, Any]:
    created = datetime.datetime.fromtimestamp(batch.created_at, datetime.timezone.utc)
    stamp = created.isoformat().replace("+00:00", "Z")
    ended = batch.ended is not None
    counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    counts.update(batch.counts or {"processing": len(batch.requests)})
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": batch.status,
        "request_counts": counts,
        "ended_at": stamp if ended else None,
        "created_at": stamp,
        "expires_at": (created + datetime.timedelta(hours=24)).isoformat().replace("+00:00", "Z"),
        "archived_at": None,
        "cancel_initiated_at": stamp if batch.cancel_at is not None else None,
        "results_url": f"{origin}/v1/messages/batches/{batch.id}/results" if ended else None,
    }


def openai_line(
    custom_id: str, response: tuple[int, Any] | None, error: dict[str, Any] | None
) -> bytes:
    return dumps(
        {
            "id": f"batch_req_{custom_id}",
            "custom_id": custom_id,
            "response": None
            if response is None
            else {
                "status_code": response[0],
                "request_id": f"req_{custom_id}",
                "body": response[1],
            },
            "error": error,
        }
    )


def row_error(status: int, anthropic: bool, message: str | None = None) -> tuple[int, Any]:
    if anthropic:
        return status, anthropic_errored(status, message)["error"]
    kind = "server_error" if status >= 500 else "invalid_request_error"
    text = message or (
        "The server had an error processing your request." if status >= 500 else "Invalid request."
    )
    return status, {"error": {"message": text, "type": kind, "param": None, "code": None}}


def anthropic_errored(status: int, message: str | None = None) -> dict[str, Any]:
    kind = "api_error" if status >= 500 else "invalid_request_error"
    text = message or ("Internal server error" if status >= 500 else "Invalid request")
    return {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": text}}}


def origin_of(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def not_found(request: web.Request) -> web.Response:
    if "/messages/" in request.path:
        return anthropic_error(404, "not_found_error", "batch not found")
    return openai_error(404, "No such Batch object", code="not_found")
