"""Reading request bodies: a job's rows (JSON list or JSONL upload) and an enrich batch.

Uploads are bounded in rows (422); their size in bytes is bounded by the guard (413).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from pipeline.server._config import RequestError, ServerConfig

__all__ = ["read_enrich", "read_submission"]

_BODY_SHAPE = 'the body must be a JSON object: {"rows": [...], "settings": {}}'


def _parse_rows(raw: Any, where: str, limit: int) -> tuple[bytes, int]:
    """Return rows as JSONL bytes and their count, from a JSON list."""
    if not isinstance(raw, list):
        raise RequestError(422, f"{where} must be a JSON list of rows")
    if not raw:
        raise RequestError(422, f"{where} is empty: a job needs at least one row")
    if len(raw) > limit:
        raise RequestError(422, f"{len(raw)} rows is more than this server's limit of {limit}")
    lines = [json.dumps(row, ensure_ascii=False, separators=(",", ":")) for row in raw]
    return ("\n".join(lines) + "\n").encode(), len(lines)


def _count_jsonl(data: bytes, limit: int) -> tuple[bytes, int]:
    """Check an uploaded JSONL file's size in rows; return it (ending in a newline) and count."""
    count = sum(1 for line in data.splitlines() if line.strip())
    if count == 0:
        raise RequestError(422, "the uploaded file has no rows")
    if count > limit:
        raise RequestError(422, f"{count} rows is more than this server's limit of {limit}")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(422, f"the uploaded file is not UTF-8 text ({error})") from None
    return (data if data.endswith(b"\n") else data + b"\n"), count


async def _read_upload(request: Request, config: ServerConfig) -> tuple[bytes, int, Any]:
    """Return (rows, count, raw settings) from a multipart upload (``file``, ``settings``)."""
    form = await request.form(max_files=1, max_fields=8)
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError(422, "the multipart form needs a 'file' part with the rows")
        data = await upload.read()
        settings_text = form.get("settings") or "{}"
        if not isinstance(settings_text, str):
            raise RequestError(422, "the 'settings' part must be JSON text")
        try:
            settings = json.loads(settings_text)
        except ValueError as error:
            raise RequestError(422, f"the 'settings' part is not valid JSON: {error}") from None
    finally:
        await form.close()
    rows, count = _count_jsonl(data, config.max_rows)
    return rows, count, settings


def _json_object(body: bytes) -> dict[str, Any]:
    """Return a request's JSON body, which must be an object."""
    try:
        data = json.loads(body)
    except ValueError as error:
        raise RequestError(422, f"the body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise RequestError(422, _BODY_SHAPE)
    return data


async def read_submission(request: Request, config: ServerConfig) -> tuple[bytes, int, Any]:
    """Return (rows as JSONL, row count, raw settings) from a JSON body or a multipart upload.

    Raises:
        RequestError: 415 for a bare JSONL body, 422 for anything else wrong with it.
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return await _read_upload(request, config)
    body = await request.body()
    if kind in ("application/x-ndjson", "application/jsonl", "application/x-jsonlines"):
        raise RequestError(
            415, "send JSONL as a multipart upload (file=@rows.jsonl) with a 'settings' part"
        )
    data = _json_object(body)
    unknown = sorted(set(data) - {"rows", "settings"})
    if unknown:
        raise RequestError(422, f"unknown field(s) {', '.join(map(repr, unknown))} in the body")
    rows, count = _parse_rows(data.get("rows"), "rows", config.max_rows)
    return rows, count, data.get("settings", {})


async def read_enrich(request: Request, config: ServerConfig) -> tuple[list[Any], Any]:
    """Return (rows, raw settings) of a ``POST /v1/enrich`` body.

    Raises:
        RequestError: 422 for a bad body or more rows than ``max_enrich_rows``.
    """
    data = _json_object(await request.body())
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows:
        raise RequestError(422, "rows must be a non-empty JSON list")
    if len(rows) > config.max_enrich_rows:
        raise RequestError(
            422,
            f"{len(rows)} rows is more than the enrich limit of {config.max_enrich_rows}; "
            "submit a job (POST /v1/jobs) for larger batches",
        )
    return rows, data.get("settings", {})
