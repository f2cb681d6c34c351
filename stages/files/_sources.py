"""The base of the file sources: keys, ids, skipping already-done rows and bad rows.

Sources read in blocks in a worker thread and emit one item per row with its key (the id
field's value, or the row's 1-based line number) and its origin (``"file:line"``). A bad row
(invalid JSON, a JSON value that is not an object, invalid UTF-8, a CSV row with the wrong
number of fields, a missing or unusable id, a duplicate id) is dead-lettered with a message
saying what is wrong, and the job goes on. Keys in ``skip_keys`` (the rows a resumed job has
already finished) are skipped without being counted as input.

Keys: without an id field every row's key is its line number (an ``int``). With an id field a
row's key is the id as a ``str`` (so ``7`` and ``"7"`` are the same id, as they would be in
CSV), and a row that has no usable id, or repeats an earlier id, is dead-lettered under its
line number: ``int`` and ``str`` keys never collide, so every input row has exactly one key.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Container, Hashable
from typing import IO, Any, ClassVar, cast

from pipeline._errors import FatalError
from pipeline._stage import Outbox, Source
from stages.files._compression import open_input
from stages.files._rows import BadRowError, PathLike, Row, id_key, label

__all__ = ["FileSource"]


class FileSource(Source[Row]):
    """Base of the file sources: keys, ids, skipping and bad rows (see the module docs).

    Args:
        path: The file to read, or ``-`` for standard input.
        id_field: The field whose value is each row's key (default: the line number).
        skip_keys: Keys of rows already done (a resumed job); they are not emitted.
        name: The stage's name.
        buffer: Capacity of the stage's inbox (unused by sources).

    Duplicate ids are found by remembering every id of the run (about 120 bytes each); without
    an id field a source holds nothing per row and streams any file in flat memory.

    Attributes:
        emitted: Rows emitted in the last run.
        rejected: Bad rows dead-lettered in the last run.
        skipped: Rows skipped because their key was in ``skip_keys``.
    """

    format: ClassVar[str] = "file"

    def __init__(
        self,
        path: PathLike,
        *,
        id_field: str | None = None,
        skip_keys: Container[Hashable] | None = None,
        name: str | None = None,
        buffer: int = 16,
    ) -> None:
        super().__init__(name=name or self.format, buffer=buffer)
        self.path = os.fspath(path)
        self.label = label(self.path)
        self.id_field = id_field
        self.skip_keys = skip_keys
        self.emitted = 0
        self.rejected = 0
        self.skipped = 0
        self._seen: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, id_field={self.id_field!r})"

    def _open(self) -> io.BufferedReader:
        """Open the file (decompressing ``.gz`` and ``.zst``), or return standard input."""
        if self.path == "-":
            return cast(io.BufferedReader, sys.stdin.buffer)
        try:
            return open_input(self.path)
        except OSError as error:
            raise FatalError(f"cannot read {self.path!r}: {error.strerror or error}") from error

    def _close(self, f: IO[bytes]) -> None:
        if f is not sys.stdin.buffer:
            f.close()

    def _start(self) -> None:
        self.emitted = self.rejected = self.skipped = 0
        self._seen = {}

    async def _reject(self, outbox: Outbox[Row], raw: Any, line: int, message: str) -> None:
        """Dead-letter a bad row under its line number (unless a resumed job did it already)."""
        skip = self.skip_keys
        if skip is not None and line in skip:
            self.skipped += 1
            return
        self.rejected += 1
        await outbox.reject(raw, BadRowError(message), key=line, origin=f"{self.label}:{line}")

    async def _row(self, outbox: Outbox[Row], row: Any, line: int, raw: Any) -> None:
        """Emit one parsed row, or reject it."""
        key: Hashable = line
        if self.id_field is not None:
            found, problem = self._id_of(row, line)
            if found is None:
                await self._reject(outbox, raw, line, problem)
                return
            key = found
        skip = self.skip_keys
        if skip is not None and key in skip:
            self.skipped += 1
            return
        self.emitted += 1
        await outbox.emit(row, key=key, origin=f"{self.label}:{line}")

    def _id_of(self, row: Any, line: int) -> tuple[str | None, str]:
        """Return the row's id key (and remember it), or ``None`` and what is wrong."""
        id_field = self.id_field
        assert id_field is not None
        if id_field not in row:
            return None, f"missing id field {id_field!r}"
        try:
            key = id_key(row[id_field], id_field)
        except BadRowError as error:
            return None, str(error)
        first = self._seen.get(key)
        if first is not None:
            return None, f"duplicate id {key!r} in field {id_field!r} (first on line {first})"
        self._seen[key] = line
        return key, ""
