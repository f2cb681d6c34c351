"""CSV and TSV: :class:`CsvSource` (a header row, then records) and :class:`CsvSink`."""

from __future__ import annotations

import codecs
import csv
import io
import itertools
from collections.abc import Container, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import anyio
import anyio.to_thread

from pipeline._envelope import Envelope
from pipeline._errors import ConfigError, ItemError
from pipeline._json import dumps, loads
from pipeline._stage import Outbox
from stages.files._records import JournalFile, Payloads
from stages.files._rows import BOM, CHUNK_ROWS, LineSplitter, PathLike, Row, cell
from stages.files._sinks import FileSink
from stages.files._sources import FileSource

__all__ = ["DELIMITERS", "CsvSink", "CsvSource", "csv_records", "detect_delimiter"]


DELIMITERS = (",", ";", "\t", "|")
"""The field separators a CSV header is looked at for (see :func:`detect_delimiter`)."""


def detect_delimiter(header: str) -> str:
    """Return the separator of a CSV header line: ``,`` unless it has none and another one.

    Among ``;``, tab and ``|`` the most frequent in the header wins. A one-column file has no
    separator to find and reads as ``,``, as before.
    """
    if "," in header:
        return ","
    counts = {sep: header.count(sep) for sep in DELIMITERS[1:]}
    best = max(counts, key=lambda sep: counts[sep])
    return best if counts[best] else ","


def csv_records(
    f: io.BufferedReader, delimiter: str | None, encoding: str = "utf-8"
) -> Iterator[tuple[int, list[str] | None, str, str | None]]:
    """Yield ``(start line, fields, raw text, problem)`` for each CSV record (header first).

    With ``delimiter=None`` the separator is detected from the first line
    (:func:`detect_delimiter`). A record whose quoted field is still open at the end of the
    file (an unterminated quote) has a problem naming the line where it starts: its "value"
    would be the rest of the file.
    """
    consumed: list[str] = []
    bad_lines: list[int] = []
    number = 0
    exhausted = False

    def lines() -> Iterator[str]:
        nonlocal exhausted
        splitter = LineSplitter(f, None)
        while (found := splitter.lines()) is not None:
            for part in found:
                assert isinstance(part, bytes)  # no LongLine without a maximum
                yield decode(part if splitter.unterminated else part + b"\n")
        exhausted = True  # reached only when the reader wants a line past the last one

    def decode(raw: bytes) -> str:
        nonlocal number
        number += 1
        if number == 1 and raw.startswith(BOM):
            raw = raw[3:]
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            bad_lines.append(number)
            text = raw.decode(encoding, "replace")
        consumed.append(text)
        return text

    source: Iterator[str] = lines()
    if delimiter is None:
        first = next(source, None)
        delimiter = detect_delimiter(first or "")
        source = itertools.chain([] if first is None else [first], source)
    reader = csv.reader(source, delimiter=delimiter, strict=False)
    start = 1
    while True:
        try:
            fields: list[str] | None = next(reader)
            problem = None
        except StopIteration:
            return
        except csv.Error as error:
            fields, problem = None, f"invalid CSV: {error}"
        raw = "".join(consumed).rstrip("\r\n")
        consumed.clear()
        if exhausted and fields is not None and problem is None:
            problem = (
                f"unterminated quoted field: the quote opened on line {start} is never closed,"
                " so the rest of the file would be one value; close the quote"
            )
        if bad_lines and problem is None:
            problem = (
                f"invalid {encoding_name(encoding)} on line {bad_lines[0]} (if the file is not"
                " in that encoding, give its encoding: --encoding latin-1, cp1252...)"
            )
        bad_lines.clear()
        yield start, fields, raw, problem
        start = number + 1


def encoding_name(encoding: str) -> str:
    """Return how messages name an encoding (``UTF-8`` for any spelling of utf-8)."""
    name = codecs.lookup(encoding).name
    return "UTF-8" if name == "utf-8" else name


def _take(records: Iterator[Any], n: int) -> list[Any]:
    out = []
    for record in records:
        out.append(record)
        if len(out) >= n:
            break
    return out


class CsvSource(FileSource):
    r"""Read a CSV file whose first row names the fields; every row becomes a dict of strings.

    Line numbers count the header as line 1 and are the physical line where a record starts.
    A row with a different number of fields than the header is a bad row; blank lines are
    skipped.

    Args:
        path: The file to read, or ``-`` for standard input.
        id_field: The column whose value is each row's key (default: the line number).
        skip_lines: Lines of rows already done (a resumed job); they are not emitted.
        delimiter: The field separator (``"\t"`` for TSV); ``None`` (the default) detects it
            from the header: ``,`` unless the header has none and has ``;``, a tab or ``|``.
        encoding: The file's text encoding (an ASCII-compatible one: ``utf-8``, ``latin-1``,
            ``cp1252``...); a line that does not decode is a bad row.
        name: The stage's name.
        buffer: Capacity of the stage's inbox (unused by sources).
    """

    format = "csv"

    def __init__(
        self,
        path: PathLike,
        *,
        id_field: str | None = None,
        skip_lines: Container[int] | None = None,
        delimiter: str | None = None,
        encoding: str = "utf-8",
        name: str | None = None,
        buffer: int = 16,
    ) -> None:
        super().__init__(path, id_field=id_field, skip_lines=skip_lines, name=name, buffer=buffer)
        self.delimiter = delimiter
        self.encoding = encoding

    async def _read(self, outbox: Outbox[Row]) -> None:
        """Emit every row of the file."""
        f = await anyio.to_thread.run_sync(self._open)
        try:
            records = csv_records(f, self.delimiter, self.encoding)
            header: list[str] | None = None
            while True:
                batch = await anyio.to_thread.run_sync(
                    _take, records, CHUNK_ROWS, abandon_on_cancel=True
                )  # a stop does not wait for a pipe: closing the file ends that read
                if not batch:
                    break
                header = await self._records(outbox, header, batch)
        finally:
            self._close(f)

    async def _records(
        self, outbox: Outbox[Row], header: list[str] | None, batch: list[Any]
    ) -> list[str] | None:
        """Emit or reject a batch of records (the first non-blank one is the header)."""
        for line, fields, raw, problem in batch:
            if header is None:
                if fields != []:
                    header = self._header(fields, problem)
            elif fields != [] or problem is not None:
                await self._record(outbox, header, line, fields, raw, problem)
        return header

    async def _record(
        self,
        outbox: Outbox[Row],
        header: list[str],
        line: int,
        fields: list[str] | None,
        raw: str,
        problem: str | None,
    ) -> None:
        """Emit one record as a row, or reject it."""
        if problem is not None or fields is None:
            await self._reject(outbox, raw, line, problem or "invalid CSV")
        elif len(fields) != len(header):
            problem = f"row has {len(fields)} fields, the header has {len(header)}"
            await self._reject(outbox, raw, line, problem)
        else:
            await self._row(outbox, dict(zip(header, fields, strict=True)), line, raw)

    def _header(self, fields: list[str] | None, problem: str | None) -> list[str]:
        """Return the header's names; an unusable header is the input's fault (ConfigError)."""
        if fields is None or problem is not None:
            raise ConfigError(f"{self.label}:1: unreadable CSV header: {problem}")
        names = set()
        for name in fields:
            if name in names:
                raise ConfigError(f"{self.label}:1: CSV header names column {name!r} twice")
            names.add(name)
        if self.id_field is not None and self.id_field not in names:
            raise ConfigError(
                f"{self.label}:1: id field {self.id_field!r} is not a column"
                f" (columns: {', '.join(fields)})"
            )
        return fields


class CsvSink(FileSink):
    r"""Write each row (a mapping) as a CSV record, then pass it on.

    To a file, the header is the union of all rows' fields in order of first appearance,
    computed at publish. To stdout the header is ``fields`` or the first row's fields, and a
    later row with a field outside it is dead-lettered. Strings are written as they are,
    ``None`` as an empty cell, booleans as ``true``/``false``, lists and objects as JSON.

    Args:
        path: The output file, ``-`` for stdout, or a resumable job's ``journal.output``.
        fields: The columns, in order (default: from the rows).
        delimiter: The field separator (``","``; ``"\t"`` for TSV).
        fsync_every: Fsync after this many rows...
        fsync_interval: ...or this many seconds, whichever comes first (and at the end).
        name: The stage's name.
        buffer: Capacity of the sink's inbox.
    """

    format = "csv"

    def __init__(
        self,
        path: PathLike | JournalFile,
        *,
        fields: Sequence[str] | None = None,
        delimiter: str = ",",
        fsync_every: int = 10_000,
        fsync_interval: float = 1.0,
        name: str | None = None,
        buffer: int = 64,
    ) -> None:
        super().__init__(
            path, fsync_every=fsync_every, fsync_interval=fsync_interval, name=name, buffer=buffer
        )
        self.fields = list(fields) if fields is not None else None
        self.delimiter = delimiter
        self._stream_fields: list[str] | None = None

    def _reset(self) -> None:
        self._stream_fields = None

    def payload(self, env: Envelope[Any]) -> bytes:
        """Check that the item is a row (a mapping) and return it as JSON."""
        value = env.value
        if not isinstance(value, Mapping):
            raise ItemError(f"a CSV row must be a mapping of fields, got {type(value).__name__}")
        if self.journal is None and self.path == "-":
            fields = self._stream_fields
            if fields is None:
                fields = self._stream_fields = self.fields or [str(k) for k in value]
            extra = [str(k) for k in value if str(k) not in fields]
            if extra:
                raise ItemError(
                    f"field(s) {', '.join(map(repr, extra))} not among the CSV columns"
                    f" ({', '.join(fields)})"
                )
        return dumps(value)

    def _writer(self, out: io.StringIO | io.TextIOWrapper) -> Any:
        return csv.writer(out, delimiter=self.delimiter, lineterminator="\n")

    def stream_chunk(self, envs: Sequence[Envelope[Any]], payloads: Sequence[bytes]) -> bytes:
        """Return CSV records (and the header, before the first row) for stdout."""
        out = io.StringIO()
        writer = self._writer(out)
        fields = self._stream_fields or []
        if self.written == 0:
            writer.writerow(fields)
        for env in envs:
            row = env.value
            writer.writerow([cell(row.get(f)) for f in fields])
        return out.getvalue().encode("utf-8")

    def write_final(self, payloads: Payloads, dest: BinaryIO) -> None:
        """Write the rows as CSV: one pass for the header, one for the records."""
        fields: dict[str, None] = dict.fromkeys(self.fields or ())
        if self.fields is None:
            for payload in payloads():
                fields.update(dict.fromkeys(loads(payload)))
        names = list(fields)
        if not names:
            return  # no rows and no declared fields: an empty file
        text = io.TextIOWrapper(dest, encoding="utf-8", newline="", write_through=False)
        try:
            writer = self._writer(text)
            writer.writerow(names)
            for payload in payloads():
                row = loads(payload)
                writer.writerow([cell(row.get(f)) for f in names])
            text.flush()
        finally:
            text.detach()
