"""Reading request bodies: a job's rows (JSON list or an uploaded file) and an enrich batch.

An upload may be in any input format the CLI reads, chosen by its file name's extension:
JSONL (``.jsonl``, ``.ndjson``, ``.json``), CSV, TSV or Parquet. It is checked when it arrives
(encoding, CSV header, Parquet footer, row count), so a file the job could not read is a 422
now rather than a job that fails every row. Uploads are bounded in rows (422); their size in
bytes is bounded by the guard (413). JSON the parser cannot take (malformed, nested too deeply)
is a 422 with the reason in a JSON body, and a dead letter by line in an uploaded file.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
from fastapi import Request

from pipeline._errors import ConfigError
from pipeline._json import dumps, loads
from pipeline.server._config import RequestError, ServerConfig
from stages.files._csv import csv_records
from stages.files._formats import EXTENSION_FORMATS
from stages.files._rows import BOM, import_parquet

__all__ = ["UPLOAD_FORMATS", "Submission", "read_enrich", "read_submission"]

_BODY_SHAPE = 'the body must be a JSON object: {"rows": [...], "settings": {}}'

UPLOAD_FORMATS = EXTENSION_FORMATS
"""The upload file extensions the server takes, and the input format each one is: the files'
own, uncompressed (an upload is checked in memory as it arrived)."""


@dataclasses.dataclass(frozen=True)
class Submission:
    """A job's input as it arrived, checked.

    Attributes:
        data: The file's bytes (JSONL for a JSON body).
        fmt: Its input format: ``jsonl``, ``csv``, ``tsv`` or ``parquet``.
        count: How many rows it holds.
        settings: The raw settings sent with it.
        first: The first row (JSON and JSONL), or the column names (CSV, TSV, Parquet), to
            check the prompt template against; ``None`` when there is nothing to check.
    """

    data: bytes
    fmt: str
    count: int
    settings: Any
    first: Mapping[str, Any] | Sequence[str] | None = None


def _row_json(row: Any, where: str) -> bytes:
    """Return one row as JSON; a row the codec cannot write is a 422 naming it."""
    try:
        return dumps(row)
    except (TypeError, ValueError) as error:
        raise RequestError(422, f"{where} cannot be stored: {error}") from None


def _parse_rows(raw: Any, where: str, limit: int) -> tuple[bytes, int]:
    """Return rows as JSONL bytes and their count, from a JSON list."""
    if not isinstance(raw, list):
        raise RequestError(422, f"{where} must be a JSON list of rows")
    if not raw:
        raise RequestError(422, f"{where} is empty: a job needs at least one row")
    _check_count(len(raw), limit)
    lines = [_row_json(row, f"{where}[{i}]") for i, row in enumerate(raw)]
    return b"\n".join(lines) + b"\n", len(lines)


def _check_count(count: int, limit: int) -> None:
    if count == 0:
        raise RequestError(422, "the uploaded file has no rows")
    if count > limit:
        raise RequestError(422, f"{count} rows is more than this server's limit of {limit}")


def _utf8(data: bytes, what: str) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(
            422,
            f"the uploaded {what} file is not UTF-8 text (byte {error.start}); convert it "
            "first, e.g. iconv -f latin1 -t utf-8 (the CLI reads it with --encoding)",
        ) from None


def _check_jsonl(data: bytes, limit: int) -> tuple[bytes, int, Mapping[str, Any] | None]:
    """Check an uploaded JSONL file; return it (ending in a newline), its count, first row."""
    lines = [line for line in data.splitlines() if line.strip()]
    _check_count(len(lines), limit)
    _utf8(data, "JSONL")
    try:
        first = loads(lines[0])
    except ValueError:  # the first row is a dead letter of its own; nothing to check against
        first = None
    rows = data if data.endswith(b"\n") else data + b"\n"
    return rows, len(lines), first if isinstance(first, Mapping) else None


def _check_csv(data: bytes, fmt: str, limit: int) -> tuple[int, list[str]]:
    """Check an uploaded CSV or TSV file's header and encoding; return its count and columns."""
    _utf8(data.removeprefix(BOM), fmt.upper())
    delimiter = "\t" if fmt == "tsv" else ","
    header: list[str] | None = None
    count = 0
    for _, fields, _, problem in csv_records(io.BufferedReader(io.BytesIO(data)), delimiter):
        if header is None:
            if fields == []:
                continue
            if fields is None or problem is not None:
                raise RequestError(422, f"the uploaded {fmt.upper()} header: {problem}")
            if len(set(fields)) != len(fields):
                twice = sorted({name for name in fields if fields.count(name) > 1})
                raise RequestError(422, f"the uploaded {fmt.upper()} header repeats {twice}")
            header = fields
        elif fields != []:
            count += 1
    _check_count(count, limit)
    return count, header or []


def _check_parquet(data: bytes, limit: int) -> tuple[int, list[str]]:
    """Check an uploaded Parquet file's footer; return its count and columns."""
    try:
        parquet = import_parquet()
    except ConfigError as error:  # the [parquet] extra is not installed on this server
        raise RequestError(422, f"this server cannot read Parquet: {error}") from None
    try:
        meta = parquet.ParquetFile(io.BytesIO(data))
        count, names = int(meta.metadata.num_rows), list(meta.schema_arrow.names)
    except Exception as error:  # pyarrow raises its own errors for a damaged file
        raise RequestError(422, f"the uploaded file is not readable Parquet: {error}") from None
    _check_count(count, limit)
    return count, names


def check_upload(data: bytes, filename: str, settings: Any, limit: int) -> Submission:
    """Check an uploaded file by the format its name says (blocking: run it in a thread).

    Raises:
        RequestError: 422 for an unknown extension or a file its format cannot read.
    """
    ext = os.path.splitext(filename)[1].lower()
    fmt = UPLOAD_FORMATS.get(ext)
    if fmt is None:
        known = ", ".join(UPLOAD_FORMATS)
        raise RequestError(
            422, f"cannot tell the format of the uploaded file {filename!r}: name it {known}"
        )
    if fmt == "jsonl":
        rows, count, first = _check_jsonl(data, limit)
        return Submission(rows, fmt, count, settings, first)
    if fmt == "parquet":
        count, columns = _check_parquet(data, limit)
    else:
        count, columns = _check_csv(data, fmt, limit)
    return Submission(data, fmt, count, settings, columns)


async def _read_upload(request: Request, config: ServerConfig) -> Submission:
    """Return the submission of a multipart upload (``file``, ``settings``)."""
    form = await request.form(max_files=1, max_fields=8)
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError(422, "the multipart form needs a 'file' part with the rows")
        data = await upload.read()
        filename = upload.filename or "rows.jsonl"
        settings_text = form.get("settings") or "{}"
        if not isinstance(settings_text, str):
            raise RequestError(422, "the 'settings' part must be JSON text")
        try:
            settings = loads(settings_text)
        except ValueError as error:
            raise RequestError(422, f"the 'settings' part is not valid JSON: {error}") from None
    finally:
        await form.close()
    return await anyio.to_thread.run_sync(check_upload, data, filename, settings, config.max_rows)


def _json_object(body: bytes) -> dict[str, Any]:
    """Return a request's JSON body, which must be an object."""
    try:
        data = loads(body)
    except ValueError as error:  # malformed, or nested too deeply (NestingError)
        raise RequestError(422, f"the body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise RequestError(422, _BODY_SHAPE)
    return data


async def read_submission(request: Request, config: ServerConfig) -> Submission:
    """Return a job's input from a JSON body or a multipart upload.

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
    first = data["rows"][0]
    settings = data.get("settings", {})
    return Submission(rows, "jsonl", count, settings, first if isinstance(first, Mapping) else None)


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
    for i, row in enumerate(rows):
        _row_json(row, f"rows[{i}]")  # each answer line repeats its row: it must be writable
    return rows, data.get("settings", {})
