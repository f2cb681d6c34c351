"""JSON Lines: :class:`JsonlSource` (one JSON object per line) and :class:`JsonlSink`."""

from __future__ import annotations

import json
from typing import Any

import anyio
import anyio.to_thread

from pipeline._json import loads
from pipeline._stage import Inbox, Outbox
from stages.files._rows import BLOCK, BOM, Row
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

    It takes the arguments of :class:`~stages.files.FileSource`.
    """

    format = "jsonl"

    async def run(self, inbox: Inbox[None], outbox: Outbox[Row]) -> None:
        """Emit every row of the file."""
        self._start()
        f = await anyio.to_thread.run_sync(self._open)
        try:
            line = 0
            rest = b""
            while True:
                block = await anyio.to_thread.run_sync(f.read1, BLOCK)
                if not block:
                    break
                lines = (rest + block).split(b"\n") if rest else block.split(b"\n")
                rest = lines.pop()
                if line == 0 and lines and lines[0].startswith(BOM):
                    lines[0] = lines[0][3:]
                line = await self._lines(outbox, lines, line)
            if rest:
                if line == 0 and rest.startswith(BOM):
                    rest = rest[3:]
                await self._lines(outbox, [rest], line)
        finally:
            self._close(f)

    async def _lines(self, outbox: Outbox[Row], lines: list[bytes], line: int) -> int:
        skip = self.skip_keys if self.id_field is None else None
        for raw in lines:
            line += 1
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
