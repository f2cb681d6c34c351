"""JSON Lines: :class:`JsonlSource` (one JSON object per line) and :class:`JsonlSink`."""

from __future__ import annotations

import json
from collections.abc import Container
from typing import Any

import anyio
import anyio.to_thread

from pipeline._errors import ConfigError
from pipeline._json import loads
from pipeline._stage import Outbox
from stages.files._rows import MAX_LINE_BYTES, LineSplitter, LongLine, PathLike, Row
from stages.files._sinks import FileSink
from stages.files._sources import FileSource

__all__ = ["JsonlSink", "JsonlSource"]


def _json_problem(raw: bytes) -> tuple[str, str]:
    """Return the text to dead-letter for an unparsable JSONL line, and what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return raw.decode("utf-8", "replace"), f"invalid UTF-8 encoding at byte {error.start}"
    try:
        loads(text)
    except json.JSONDecodeError as error:
        return text, f"invalid JSON: {error.msg} at column {error.colno}"
    except ValueError as error:  # e.g. nested too deeply
        return text, str(error)
    return text, "invalid JSON"  # pragma: no cover - orjson and json disagree


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


class JsonlSource(FileSource):
    """Read a JSON Lines file: one JSON object per line; blank lines are skipped.

    It takes the arguments of :class:`~stages.files.FileSource`, and:

    Args:
        max_line_bytes: The longest line read (default 16 MiB): a longer one is read past in
            bounded memory and dead-lettered by its line number with its size.
    """

    format = "jsonl"

    def __init__(
        self,
        path: PathLike,
        *,
        id_field: str | None = None,
        skip_lines: Container[int] | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
        name: str | None = None,
        buffer: int = 16,
    ) -> None:
        super().__init__(path, id_field=id_field, skip_lines=skip_lines, name=name, buffer=buffer)
        if max_line_bytes < 1:
            raise ConfigError(f"max_line_bytes must be at least 1, got {max_line_bytes}")
        self.max_line_bytes = max_line_bytes

    async def _read(self, outbox: Outbox[Row]) -> None:
        """Emit every row of the file."""
        f = await anyio.to_thread.run_sync(self._open)
        try:
            splitter = LineSplitter(f, self.max_line_bytes)
            line = 0
            while True:
                lines = await anyio.to_thread.run_sync(splitter.lines, abandon_on_cancel=True)
                if lines is None:
                    break
                line = await self._lines(outbox, lines, line)
        finally:
            self._close(f)

    async def _lines(self, outbox: Outbox[Row], lines: list[bytes | LongLine], line: int) -> int:
        skip = self._skip_unparsed() or None  # nothing done yet: no lookup per line
        plain = self._scan is None and self.id_field is None
        label = self.label
        for raw in lines:
            line += 1
            if type(raw) is LongLine:
                message = (
                    f"line is {raw.size:,} bytes, over the maximum of {self.max_line_bytes:,}"
                    " (max_line_bytes, --max-line-bytes)"
                )
                await self._reject(outbox, raw.text(), line, message)
                continue
            assert isinstance(raw, bytes)
            if not raw or raw.isspace():
                continue
            if skip is not None and line in skip:
                self.skipped += 1
                continue
            try:
                row = loads(raw)
            except ValueError:
                text, problem = _json_problem(raw)
                await self._reject(outbox, text.rstrip("\r"), line, problem)
                continue
            if type(row) is not dict:
                text = raw.decode("utf-8", "replace").rstrip("\r")
                await self._reject(outbox, text, line, f"line is {_kind(row)}, not a JSON object")
                continue
            if plain:  # what _row() does with no ids to read: one call less per row
                self.emitted += 1
                await outbox.emit(row, key=line, origin=f"{label}:{line}")
            else:
                await self._row(outbox, row, line, row)
        return line


class JsonlSink(FileSink):
    """Write each item as one line of JSON (JSON Lines), then pass it on.

    Args:
        path: The output file, ``-`` for stdout, or a resumable job's ``journal.output``.
        fsync_every: Fsync after this many rows...
        fsync_interval: ...or this many seconds, whichever comes first (and at the end).
        name: The stage's name.
        buffer: Capacity of the sink's inbox.
    """

    format = "jsonl"
