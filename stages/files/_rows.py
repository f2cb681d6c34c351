"""What the file sources and sinks share: row keys and ids, bad rows, origins, cells."""

from __future__ import annotations

import importlib
import json
import os
from typing import IO, Any

from pipeline._errors import ConfigError, ItemError
from pipeline._json import dumps

__all__ = [
    "BLOCK",
    "BOM",
    "CHUNK_ROWS",
    "MAX_LINE_BYTES",
    "BadRowError",
    "LineSplitter",
    "LongLine",
    "PathLike",
    "Row",
    "cell",
    "id_key",
    "import_parquet",
    "label",
    "line_of",
]

PathLike = str | os.PathLike[str]
Row = dict[str, Any]

BLOCK = 1 << 20
"""Bytes read from a file at a time."""
CHUNK_ROWS = 2048
"""Rows handled together (one thread call, one write) at most."""
BOM = b"\xef\xbb\xbf"
"""The UTF-8 byte order mark a file may start with (skipped)."""
MAX_LINE_BYTES = 16 << 20
"""The longest input line a source reads by default (16 MiB; ``--max-line-bytes``)."""
_PREVIEW = 1000


class BadRowError(ItemError):
    """An input row that cannot become an item (bad JSON or CSV, a missing or repeated id)."""


class LongLine:
    """A line over the maximum size, read past without keeping it: its size and first bytes."""

    __slots__ = ("preview", "size")

    def __init__(self, size: int, preview: bytes) -> None:
        self.size = size
        self.preview = preview

    def __repr__(self) -> str:
        return f"LongLine(size={self.size})"

    def text(self) -> str:
        """The line's first bytes as text, marked as cut (for a dead-letter record)."""
        return self.preview.decode("utf-8", "replace") + f"... ({self.size:,} bytes)"


class LineSplitter:
    """Split a binary file into lines in linear time, however long a line is.

    :meth:`lines` reads blocks (a worker thread can call it) and returns the lines they
    complete, without their newline; a line's pieces are joined once, when its newline comes.
    A line longer than ``max_bytes`` is not kept: it comes back as a :class:`LongLine` (its
    size and first bytes), so memory stays bounded by ``max_bytes`` whatever the file holds.
    A UTF-8 byte order mark at the start is dropped.

    Args:
        f: The file, opened in binary mode.
        max_bytes: The longest line kept (``None``: no limit).
    """

    def __init__(self, f: IO[bytes], max_bytes: int | None = MAX_LINE_BYTES) -> None:
        self.f = f
        self.max_bytes = max_bytes
        self._read = getattr(f, "read1", f.read)
        self._parts: list[bytes] = []
        self._size = 0
        self._long: LongLine | None = None
        self._started = False
        self._ended = False
        self.unterminated = False
        """Whether the file's last line had no newline (known once :meth:`lines` ends)."""

    def _add(self, piece: bytes) -> None:
        self._size += len(piece)
        long = self._long
        if long is not None:
            long.size = self._size
            if len(long.preview) < _PREVIEW:
                long.preview += piece[: _PREVIEW - len(long.preview)]
        elif self.max_bytes is not None and self._size > self.max_bytes:
            head = b"".join([*self._parts, piece[:_PREVIEW]])[:_PREVIEW]
            self._long = LongLine(self._size, head)
            self._parts = []
        else:
            self._parts.append(piece)

    def _take(self) -> bytes | LongLine:
        found: bytes | LongLine
        if self._long is not None:
            found = self._long
        else:
            found = b"".join(self._parts) if len(self._parts) != 1 else self._parts[0]
        self._parts, self._size, self._long = [], 0, None
        return found

    def _checked(self, line: bytes) -> bytes | LongLine:
        if self.max_bytes is not None and len(line) > self.max_bytes:
            return LongLine(len(line), line[:_PREVIEW])
        return line

    def lines(self) -> list[bytes | LongLine] | None:
        """Read until at least one line ends; return the lines (``None`` once the file ends)."""
        found = self._next()
        if found and not self._started:
            self._started = True
            first = found[0]
            if isinstance(first, bytes) and first.startswith(BOM):
                found[0] = first[3:]
        return found

    def _next(self) -> list[bytes | LongLine] | None:
        while True:
            block = self._read(BLOCK)
            if not block:
                if self._ended:
                    return None
                self._ended = True
                if not self._parts and self._long is None:
                    return None
                self.unterminated = True
                return [self._take()]
            end = block.find(b"\n")
            if end < 0:
                self._add(block)
                continue
            self._add(block[:end])
            found: list[bytes | LongLine] = [self._take()]
            pieces = block[end + 1 :].split(b"\n")
            rest = pieces.pop()
            found.extend(self._checked(piece) for piece in pieces)
            if rest:
                self._add(rest)
            return found


def label(path: str) -> str:
    """Return how messages name a path (``<stdin>`` for ``-``)."""
    return "<stdin>" if path == "-" else path


def import_parquet() -> Any:
    """Return ``pyarrow.parquet``, or raise a :class:`ConfigError` naming the extra."""
    try:
        return importlib.import_module("pyarrow.parquet")
    except ImportError as error:
        raise ConfigError(
            "Parquet files need pyarrow: pip install 'llm-pipeline[parquet]'"
        ) from error


def id_key(value: Any, field: str) -> str:
    """Return a row's id as its key, or raise :class:`BadRowError` saying what is wrong."""
    if isinstance(value, str):
        if not value:
            raise BadRowError(f"id field {field!r} is empty")
        return value
    if isinstance(value, bool) or value is None:
        raise BadRowError(f"id field {field!r} is {json.dumps(value)}, not a string or number")
    if isinstance(value, (int, float)):
        return str(value)
    raise BadRowError(f"id field {field!r} must be a string or number, got {type(value).__name__}")


def line_of(origin: str | None) -> int | None:
    """Return the line number in an origin such as ``"data.jsonl:17"``, or ``None``."""
    if origin:
        _, _, tail = origin.rpartition(":")
        if tail.isdigit():
            return int(tail)
    return None


def cell(value: Any) -> str:
    """Return a value as a CSV cell: strings as they are, ``None`` empty, others as JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return dumps(value).decode("utf-8")
