"""What the file sources and sinks share: row keys and ids, bad rows, origins, cells."""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

from pipeline._errors import ConfigError, ItemError
from pipeline._json import dumps

__all__ = [
    "BLOCK",
    "BOM",
    "CHUNK_ROWS",
    "BadRowError",
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


class BadRowError(ItemError):
    """An input row that cannot become an item (bad JSON or CSV, a missing or repeated id)."""


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
