"""The base of the file sources: keys, ids, skipping already-done rows and bad rows.

Sources read in blocks in a worker thread and emit one item per row with its key (the id
field's value, or the row's 1-based line number) and its origin (``"file:line"``). A bad row
(invalid JSON, a JSON value that is not an object, invalid UTF-8, a CSV row with the wrong
number of fields, a missing or unusable id, a duplicate id) is dead-lettered with a message
saying what is wrong, and the job goes on. Rows whose line is in ``skip_lines`` (the rows a
resumed job has already finished) are skipped without being counted as input: a row's
identity in a job is its line in the (fingerprinted) input, whatever its id.

Keys: without an id field every row's key is its line number (an ``int``). With an id field a
row's key is the id as a ``str`` (so ``7`` and ``"7"`` are the same id, as they would be in
CSV), and a row that has no usable id, or repeats an earlier id, is dead-lettered under its
line number: ``int`` and ``str`` keys never collide, so every input row has exactly one key.

Duplicate ids, in bounded memory: with an id field, a source reading a file first reads it
once to collect each id's 128-bit digest and line in a
:class:`~stages.files._ids.DuplicateIds` (in memory for small files, partitioned into
temporary bucket files beyond), which names every line repeating an earlier line's id; the
second read emits the rows and dead-letters those lines. The first read costs one parse of
the input before the first row is sent (a few seconds per million rows) and holds no id
string. Standard input cannot be read twice: there the source remembers every id it has seen
(about 120 bytes each).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Container, Hashable
from typing import IO, Any, ClassVar, cast

import anyio.to_thread

from pipeline._errors import FatalError
from pipeline._stage import Inbox, Outbox, Source
from stages.files._compression import open_input
from stages.files._ids import DuplicateIds
from stages.files._pipes import StreamReader, is_stream
from stages.files._rows import BadRowError, PathLike, Row, id_key, label

__all__ = ["FileSource"]


class FileSource(Source[Row]):
    """Base of the file sources: keys, ids, skipping and bad rows (see the module docs).

    Args:
        path: The file to read, or ``-`` for standard input.
        id_field: The field whose value is each row's key (default: the line number).
        skip_lines: Lines of rows already done (a resumed job); they are not emitted.
        name: The stage's name.
        buffer: Capacity of the stage's inbox (unused by sources).

    A source holds nothing per row: a file streams in flat memory with or without an id
    field (duplicate ids are found as the module documentation describes).

    Attributes:
        emitted: Rows emitted in the last run.
        rejected: Bad rows dead-lettered in the last run.
        skipped: Rows skipped because their line was in ``skip_lines``.
    """

    format: ClassVar[str] = "file"

    def __init__(
        self,
        path: PathLike,
        *,
        id_field: str | None = None,
        skip_lines: Container[int] | None = None,
        name: str | None = None,
        buffer: int = 16,
    ) -> None:
        super().__init__(name=name or self.format, buffer=buffer)
        self.path = os.fspath(path)
        self.label = label(self.path)
        self.id_field = id_field
        self.skip_lines = skip_lines
        self.emitted = 0
        self.rejected = 0
        self.skipped = 0
        self._seen: dict[str, int] = {}
        self._scan: DuplicateIds | None = None
        self._repeats: dict[int, int] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, id_field={self.id_field!r})"

    def _open(self) -> io.BufferedReader:
        """Open the file (decompressing ``.gz`` and ``.zst``), or a stream (stdin, a pipe)."""
        if is_stream(self.path):  # stdin, a pipe, a device: read so that a stop ends the wait
            return cast(io.BufferedReader, StreamReader.open(self.path))
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

    async def run(self, inbox: Inbox[None], outbox: Outbox[Row]) -> None:
        """Emit every row of the file (after finding its repeated ids, with an id field)."""
        self._start()
        self._repeats = None
        if self.id_field is not None and not is_stream(self.path):  # a stream reads once
            finder = DuplicateIds()
            self._scan = finder
            try:
                await self._read(outbox)
                self._repeats = await anyio.to_thread.run_sync(finder.repeats)
            finally:
                self._scan = None
                await anyio.to_thread.run_sync(finder.close)
            self._start()
        await self._read(outbox)

    async def _read(self, outbox: Outbox[Row]) -> None:
        """Read the file, handing each row to :meth:`_row` and each bad one to :meth:`_reject`."""
        raise NotImplementedError

    def _skip_unparsed(self) -> Container[int] | None:
        """Lines a reader may skip without parsing them (none while ids are collected)."""
        if self._scan is not None or (self.id_field is not None and self._repeats is None):
            return None
        return self.skip_lines

    async def _reject(self, outbox: Outbox[Row], raw: Any, line: int, message: str) -> None:
        """Dead-letter a bad row under its line number (unless a resumed job did it already)."""
        if self._scan is not None:
            return
        skip = self.skip_lines
        if skip is not None and line in skip:
            self.skipped += 1
            return
        self.rejected += 1
        await outbox.reject(raw, BadRowError(message), key=line, origin=f"{self.label}:{line}")

    async def _row(self, outbox: Outbox[Row], row: Any, line: int, raw: Any) -> None:
        """Emit one parsed row, or reject it."""
        key: Hashable = line
        if self._scan is not None:
            found, _ = self._id_of(row, line)
            if found is not None:
                self._scan.add(found.encode("utf-8", "surrogatepass"), line)
            return
        if self.id_field is not None:
            found, problem = self._id_of(row, line)
            if found is None:
                await self._reject(outbox, raw, line, problem)
                return
            key = found
        skip = self.skip_lines
        if skip is not None and line in skip:
            self.skipped += 1
            return
        self.emitted += 1
        await outbox.emit(row, key=key, origin=f"{self.label}:{line}")

    def _id_of(self, row: Any, line: int) -> tuple[str | None, str]:
        """Return the row's id key, or ``None`` and what is wrong (a repeat, a bad id)."""
        id_field = self.id_field
        assert id_field is not None
        if id_field not in row:
            return None, f"missing id field {id_field!r}"
        try:
            key = id_key(row[id_field], id_field)
        except BadRowError as error:
            return None, str(error)
        if self._scan is not None:
            return key, ""
        if self._repeats is not None:
            first = self._repeats.get(line)
        else:  # standard input, read once: remember the ids
            first = self._seen.setdefault(key, line)
            first = None if first == line else first
        if first is not None:
            return None, f"duplicate id {key!r} in field {id_field!r} (first on line {first})"
        return key, ""
