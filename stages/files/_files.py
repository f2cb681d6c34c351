"""File sources and sinks: JSON Lines, CSV and Parquet in, the same formats out, never a row lost.

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

Sinks write each item and then pass it downstream unchanged. They take whatever is waiting
in the inbox as one chunk, write it with one call and flush it to the OS (a ``kill -9`` loses
nothing already written), and fsync every ``fsync_every`` rows or ``fsync_interval`` seconds
and at the end. To a file, a sink appends to a journal (see :mod:`pipeline.jobs._journal`) and
publishes the final file atomically when its input ends, so no reader sees half a file under
the final name; given a :class:`~pipeline.jobs._journal.JournalFile` of a resumable job, it appends
to that and the job publishes. To stdout (``-``) JSONL and CSV rows stream as they come;
Parquet, a whole-file format, needs a path. A run that fails leaves no file behind (without a
job there is nothing to resume; use a :class:`~pipeline.jobs._journal.Journal` for that).

Dead-letter records (:class:`DeadLetterSink`) are JSON objects::

    {"key": 17, "line": 17, "origin": "in.jsonl:17", "stage": "llm", "row": {...},
     "error": {"type": "ItemError", "message": "...", "status": 400, "attempts": 1}}
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Container, Hashable, Iterator, Mapping, Sequence
from typing import IO, Any, BinaryIO, ClassVar, cast

import anyio
import anyio.to_thread
from anyio import EndOfStream, WouldBlock
from anyio.lowlevel import checkpoint_if_cancelled

from pipeline._envelope import Envelope, Failed
from pipeline._errors import ConfigError, FatalError, ItemError
from pipeline._json import dumps, loads
from pipeline._stage import Inbox, Outbox, Source, Stage
from stages.files._records import JournalFile, Payloads, encode_record, write_jsonl

PathLike = str | os.PathLike[str]
Row = dict[str, Any]

_BLOCK = 1 << 20
_CHUNK_ROWS = 2048
_INLINE_WRITE = 64 << 10
_BOM = b"\xef\xbb\xbf"


class BadRowError(ItemError):
    """An input row that cannot become an item (bad JSON or CSV, a missing or repeated id)."""


def _label(path: str) -> str:
    return "<stdin>" if path == "-" else path


def _import_parquet() -> Any:
    try:
        return importlib.import_module("pyarrow.parquet")
    except ImportError as error:
        raise ConfigError(
            "Parquet files need pyarrow: pip install 'llm-pipeline[parquet]'"
        ) from error


def _id_key(value: Any, field: str) -> str:
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


# -- sources --------------------------------------------------------------------------------


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
        self.label = _label(self.path)
        self.id_field = id_field
        self.skip_keys = skip_keys
        self.emitted = 0
        self.rejected = 0
        self.skipped = 0
        self._seen: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, id_field={self.id_field!r})"

    def _open(self) -> io.BufferedReader:
        if self.path == "-":
            return cast(io.BufferedReader, sys.stdin.buffer)
        try:
            return open(self.path, "rb")
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
        id_field = self.id_field
        if id_field is None:
            skip = self.skip_keys
            if skip is not None and line in skip:
                self.skipped += 1
                return
            self.emitted += 1
            await outbox.emit(row, key=line, origin=f"{self.label}:{line}")
            return
        if id_field not in row:
            await self._reject(outbox, raw, line, f"missing id field {id_field!r}")
            return
        try:
            key = _id_key(row[id_field], id_field)
        except BadRowError as error:
            await self._reject(outbox, raw, line, str(error))
            return
        seen = self._seen
        first = seen.get(key)
        if first is not None:
            await self._reject(
                outbox,
                raw,
                line,
                f"duplicate id {key!r} in field {id_field!r} (first on line {first})",
            )
            return
        seen[key] = line
        skip = self.skip_keys
        if skip is not None and key in skip:
            self.skipped += 1
            return
        self.emitted += 1
        await outbox.emit(row, key=key, origin=f"{self.label}:{line}")


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

    Args:
        path: The file to read, or ``-`` for standard input.
        id_field: The field whose value is each row's key (default: the line number).
        skip_keys: Keys of rows already done (a resumed job); they are not emitted.
        name: The stage's name.
        buffer: Capacity of the stage's inbox (unused by sources).
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
                block = await anyio.to_thread.run_sync(f.read1, _BLOCK)
                if not block:
                    break
                lines = (rest + block).split(b"\n") if rest else block.split(b"\n")
                rest = lines.pop()
                if line == 0 and lines and lines[0].startswith(_BOM):
                    lines[0] = lines[0][3:]
                line = await self._lines(outbox, lines, line)
            if rest:
                if line == 0 and rest.startswith(_BOM):
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


def _csv_records(
    f: io.BufferedReader, delimiter: str
) -> Iterator[tuple[int, list[str] | None, str, str | None]]:
    """Yield ``(start line, fields, raw text, problem)`` for each CSV record (header first)."""
    consumed: list[str] = []
    bad_lines: list[int] = []
    number = 0

    def lines() -> Iterator[str]:
        nonlocal number
        rest = b""
        while True:
            block = f.read1(_BLOCK)
            if not block:
                break
            parts = (rest + block).split(b"\n") if rest else block.split(b"\n")
            rest = parts.pop()
            for part in parts:
                yield decode(part + b"\n")
        if rest:
            yield decode(rest)

    def decode(raw: bytes) -> str:
        nonlocal number
        number += 1
        if number == 1 and raw.startswith(_BOM):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad_lines.append(number)
            text = raw.decode("utf-8", "replace")
        consumed.append(text)
        return text

    reader = csv.reader(lines(), delimiter=delimiter, strict=False)
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
        if bad_lines and problem is None:
            problem = f"invalid UTF-8 encoding on line {bad_lines[0]}"
        bad_lines.clear()
        yield start, fields, raw, problem
        start = number + 1


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
        skip_keys: Keys of rows already done (a resumed job); they are not emitted.
        delimiter: The field separator (``","``; ``"\t"`` for TSV).
        name: The stage's name.
        buffer: Capacity of the stage's inbox (unused by sources).
    """

    format = "csv"

    def __init__(
        self,
        path: PathLike,
        *,
        id_field: str | None = None,
        skip_keys: Container[Hashable] | None = None,
        delimiter: str = ",",
        name: str | None = None,
        buffer: int = 16,
    ) -> None:
        super().__init__(path, id_field=id_field, skip_keys=skip_keys, name=name, buffer=buffer)
        self.delimiter = delimiter

    async def run(self, inbox: Inbox[None], outbox: Outbox[Row]) -> None:
        """Emit every row of the file."""
        self._start()
        f = await anyio.to_thread.run_sync(self._open)
        try:
            records = _csv_records(f, self.delimiter)
            header: list[str] | None = None
            while True:
                batch = await anyio.to_thread.run_sync(_take, records, _CHUNK_ROWS)
                if not batch:
                    break
                for line, fields, raw, problem in batch:
                    if header is None:
                        if fields == []:
                            continue
                        header = self._header(fields, problem)
                        continue
                    if fields == [] and problem is None:
                        continue
                    if problem is not None or fields is None:
                        await self._reject(outbox, raw, line, problem or "invalid CSV")
                    elif len(fields) != len(header):
                        await self._reject(
                            outbox,
                            raw,
                            line,
                            f"row has {len(fields)} fields, the header has {len(header)}",
                        )
                    else:
                        await self._row(outbox, dict(zip(header, fields, strict=True)), line, raw)
        finally:
            self._close(f)

    def _header(self, fields: list[str] | None, problem: str | None) -> list[str]:
        if fields is None or problem is not None:
            raise FatalError(f"{self.label}:1: unreadable CSV header: {problem}")
        names = set()
        for name in fields:
            if name in names:
                raise FatalError(f"{self.label}:1: CSV header names column {name!r} twice")
            names.add(name)
        if self.id_field is not None and self.id_field not in names:
            raise FatalError(
                f"{self.label}:1: id field {self.id_field!r} is not a column"
                f" (columns: {', '.join(fields)})"
            )
        return fields


class ParquetSource(FileSource):
    """Read a Parquet file one record batch at a time (needs the ``[parquet]`` extra).

    A row's line number is its index plus one. Standard input is spooled to a temporary file
    first (Parquet needs to seek).

    Args:
        path: The file to read, or ``-`` for standard input.
        id_field: The column whose value is each row's key (default: the row number).
        skip_keys: Keys of rows already done (a resumed job); they are not emitted.
        batch_rows: Rows per record batch read.
        name: The stage's name.
        buffer: Capacity of the stage's inbox (unused by sources).
    """

    format = "parquet"

    def __init__(
        self,
        path: PathLike,
        *,
        id_field: str | None = None,
        skip_keys: Container[Hashable] | None = None,
        batch_rows: int = 4096,
        name: str | None = None,
        buffer: int = 16,
    ) -> None:
        super().__init__(path, id_field=id_field, skip_keys=skip_keys, name=name, buffer=buffer)
        self.batch_rows = batch_rows
        self._pq = _import_parquet()

    def _open_parquet(self, stack: contextlib.ExitStack) -> Any:
        source: Any = self.path
        if self.path == "-":
            spool = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115
            shutil.copyfileobj(sys.stdin.buffer, spool, _BLOCK)
            spool.seek(0)
            source = spool
        try:
            parquet = stack.enter_context(self._pq.ParquetFile(source))
        except OSError as error:
            raise FatalError(f"cannot read {self.path!r}: {error}") from error
        except Exception as error:  # pyarrow raises ArrowInvalid for a non-Parquet file
            raise FatalError(f"{self.label} is not a readable Parquet file: {error}") from error
        if self.id_field is not None and self.id_field not in parquet.schema_arrow.names:
            raise FatalError(
                f"{self.label}: id field {self.id_field!r} is not a column"
                f" (columns: {', '.join(parquet.schema_arrow.names)})"
            )
        return parquet.iter_batches(batch_size=self.batch_rows)

    async def run(self, inbox: Inbox[None], outbox: Outbox[Row]) -> None:
        """Emit every row of the file."""
        self._start()
        with contextlib.ExitStack() as stack:
            batches = await anyio.to_thread.run_sync(self._open_parquet, stack)

            def next_rows() -> list[Row] | None:
                batch = next(batches, None)
                return None if batch is None else batch.to_pylist()

            line = 0
            while True:
                rows = await anyio.to_thread.run_sync(next_rows)
                if rows is None:
                    break
                for row in rows:
                    line += 1
                    await self._row(outbox, row, line, row)


_SOURCES: dict[str, type[FileSource]] = {
    ".jsonl": JsonlSource,
    ".ndjson": JsonlSource,
    ".json": JsonlSource,
    ".csv": CsvSource,
    ".tsv": CsvSource,
    ".parquet": ParquetSource,
    ".pq": ParquetSource,
}


def file_format(path: PathLike, fmt: str | None = None) -> str:
    """Return ``"jsonl"``, ``"csv"``, ``"tsv"`` or ``"parquet"`` for a path (or ``fmt``).

    Standard input and output (``-``) and unknown extensions are JSON Lines unless ``fmt``
    says otherwise.
    """
    if fmt is not None:
        fmt = fmt.lower()
        if fmt not in ("jsonl", "csv", "tsv", "parquet"):
            raise ConfigError(f"unknown file format {fmt!r} (jsonl, csv, tsv, parquet)")
        return fmt
    ext = os.path.splitext(os.fspath(path))[1].lower()
    cls = _SOURCES.get(ext, JsonlSource)
    return "tsv" if ext == ".tsv" else cls.format


def open_source(
    path: PathLike,
    *,
    fmt: str | None = None,
    id_field: str | None = None,
    skip_keys: Container[Hashable] | None = None,
) -> FileSource:
    """Return the source for a file, chosen by its extension (or ``fmt``)."""
    kind = file_format(path, fmt)
    if kind == "csv":
        return CsvSource(path, id_field=id_field, skip_keys=skip_keys)
    if kind == "tsv":
        return CsvSource(path, id_field=id_field, skip_keys=skip_keys, delimiter="\t")
    if kind == "parquet":
        return ParquetSource(path, id_field=id_field, skip_keys=skip_keys)
    return JsonlSource(path, id_field=id_field, skip_keys=skip_keys)


def count_rows(path: PathLike, *, fmt: str | None = None) -> int | None:
    """Count a file's rows cheaply, for a progress bar (``None`` for stdin).

    Blocking: run it in a thread (``anyio.to_thread.run_sync(count_rows, path)``). JSONL
    counts non-blank lines, CSV its records after the header, Parquet reads the footer.
    """
    path = os.fspath(path)
    if path == "-":
        return None
    kind = file_format(path, fmt)
    if kind == "parquet":
        parquet = _import_parquet()
        return int(parquet.ParquetFile(path).metadata.num_rows)
    with open(path, "rb") as f:
        if kind in ("csv", "tsv"):
            records = _csv_records(f, "\t" if kind == "tsv" else ",")
            count = sum(1 for _, fields, _, _ in records if fields != [])
            return max(count - 1, 0)
        count = 0
        rest = b""
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            count += sum(1 for line in lines if line and not line.isspace())
        if rest and not rest.isspace():
            count += 1
        return count


# -- sinks ----------------------------------------------------------------------------------


def _temp_journal_path(final: str) -> str:
    directory, base = os.path.split(os.path.abspath(final))
    return os.path.join(directory, f".{base}.{uuid.uuid4().hex[:12]}.partial")


class FileSink(Stage[Any, Any]):
    """Base of the file sinks: chunked, flushed, fsynced writes; items pass through unchanged.

    Args:
        path: The output file, ``-`` for stdout, or a resumable job's
            :class:`~pipeline.jobs._journal.JournalFile` (``journal.output``): the sink appends to
            it and the job publishes.
        fsync_every: Fsync after this many rows...
        fsync_interval: ...or this many seconds, whichever comes first (and at the end).
        name: The stage's name.
        buffer: Capacity of the sink's inbox.

    Attributes:
        written: Rows written in the last run.
    """

    format: ClassVar[str] = "file"
    streams: ClassVar[bool] = True

    def __init__(
        self,
        path: PathLike | JournalFile,
        *,
        fsync_every: int = 10_000,
        fsync_interval: float = 1.0,
        name: str | None = None,
        buffer: int = 64,
    ) -> None:
        super().__init__(name=name or f"{self.format}-sink", workers=1, buffer=buffer)
        if fsync_every < 1 or fsync_interval <= 0:
            raise ConfigError("fsync_every must be >= 1 and fsync_interval > 0")
        self.journal: JournalFile | None
        if isinstance(path, JournalFile):
            self.journal = path
            self.path = path.final
            path.writer = self.write_final
        else:
            self.journal = None
            self.path = os.fspath(path)
            if self.path == "-" and not self.streams:
                raise ConfigError(f"{self.format} output needs a file path, not '-' (stdout)")
        self.fsync_every = fsync_every
        self.fsync_interval = fsync_interval
        self.written = 0
        self._unsynced = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    @property
    def is_sink(self) -> bool:
        """File sinks are sinks: an ordered run restores order before them."""
        return True

    # -- what subclasses provide ------------------------------------------------------------

    def _reset(self) -> None:
        """Forget per-run state before a run."""

    def payload(self, env: Envelope[Any]) -> bytes:
        """Return the JSON journal payload of one item (raise to dead-letter the item)."""
        return dumps(env.value)

    def write_final(self, payloads: Payloads, dest: BinaryIO) -> None:
        """Write journal payloads to ``dest`` in the sink's format (at publish)."""
        write_jsonl(payloads, dest)

    def stream_chunk(self, envs: Sequence[Envelope[Any]], payloads: Sequence[bytes]) -> bytes:
        """Return the bytes that stream a chunk to stdout."""
        return b"".join(p + b"\n" for p in payloads)

    # -- running ----------------------------------------------------------------------------

    def _encode(
        self, chunk: list[Envelope[Any]]
    ) -> tuple[list[Envelope[Any]], list[bytes], list[tuple[Envelope[Any], str]]]:
        good: list[Envelope[Any]] = []
        payloads: list[bytes] = []
        bad: list[tuple[Envelope[Any], str]] = []
        for env in chunk:
            try:
                payload = self.payload(env)
            except ItemError as error:
                bad.append((env, str(error)))
            except (TypeError, ValueError) as error:
                bad.append((env, f"cannot write the item to {self.path}: {error}"))
            else:
                good.append(env)
                payloads.append(payload)
        return good, payloads, bad

    async def run(self, inbox: Inbox[Any], outbox: Outbox[Any]) -> None:
        """Write every item of the inbox, then publish (a file written without a job)."""
        self.written = 0
        self._reset()
        if self.journal is None and self.path == "-":
            await self._pump(inbox, outbox, None)
            return
        journal = self.journal or JournalFile(
            _temp_journal_path(self.path), self.path, self.write_final
        )
        done = False
        try:
            await anyio.to_thread.run_sync(journal.open)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._syncer, journal)
                await self._pump(inbox, outbox, journal)
                tg.cancel_scope.cancel()
            await anyio.to_thread.run_sync(journal.close)
            if self.journal is None:
                try:
                    await anyio.to_thread.run_sync(journal.publish)
                except OSError as error:
                    raise FatalError(f"cannot publish {self.path!r}: {error}") from error
            done = True
        finally:
            if not done:
                if self.journal is None:
                    journal.discard()
                else:
                    journal.close()

    async def _syncer(self, journal: JournalFile) -> None:
        """Fsync what was written, ``fsync_interval`` seconds at most after it was written."""
        while True:
            await anyio.sleep(self.fsync_interval)
            if self._unsynced:
                self._unsynced = 0
                await anyio.to_thread.run_sync(journal.sync)

    async def _pump(
        self, inbox: Inbox[Any], outbox: Outbox[Any], journal: JournalFile | None
    ) -> None:
        self._unsynced = 0
        while True:
            try:
                env = inbox.receive_nowait()
            except WouldBlock:
                try:
                    env = await inbox.receive()
                except EndOfStream:
                    return
            except EndOfStream:
                return
            chunk = [env]
            ended = False
            while len(chunk) < _CHUNK_ROWS:
                try:
                    chunk.append(inbox.receive_nowait())
                except WouldBlock:
                    break
                except EndOfStream:
                    ended = True
                    break
            good, payloads, bad = self._encode(chunk)
            if good:
                if journal is None:
                    data = self.stream_chunk(good, payloads)
                    await anyio.to_thread.run_sync(_write_stdout, data)
                    await checkpoint_if_cancelled()
                else:
                    records = b"".join(
                        encode_record(_line(env), env.key, payload)
                        for env, payload in zip(good, payloads, strict=True)
                    )
                    if len(records) < _INLINE_WRITE:  # to the page cache: cheaper than a thread
                        journal.append(records, len(good))
                    else:
                        await anyio.to_thread.run_sync(journal.append, records, len(good))
                        # a thread call cannot be cancelled: if the run was cancelled
                        # meanwhile, stop before sending into channels being torn down
                        await checkpoint_if_cancelled()
                    self._unsynced += len(good)
                    if self._unsynced >= self.fsync_every:
                        self._unsynced = 0
                        await anyio.to_thread.run_sync(journal.sync)
                        await checkpoint_if_cancelled()
                self.written += len(good)
            for env, message in bad:
                await outbox.fail(env, ItemError(message))
            for env in good:
                await outbox.send(env)
            if ended:
                return


def _line(env: Envelope[Any]) -> int:
    line = line_of(env.origin)
    return env.seq + 1 if line is None else line


def _write_stdout(data: bytes) -> None:
    try:
        out = sys.stdout.buffer
        out.write(data)
        out.flush()
    except OSError as error:
        raise FatalError(f"cannot write to stdout: {error}") from error


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


def _cell(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return dumps(value).decode("utf-8")


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
            writer.writerow([_cell(row.get(f)) for f in fields])
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
                writer.writerow([_cell(row.get(f)) for f in names])
            text.flush()
        finally:
            text.detach()


class ParquetSink(FileSink):
    """Write rows (mappings) to a Parquet file in row groups (needs the ``[parquet]`` extra).

    Rows are journaled as they come and the file is built at publish: column types are
    inferred over all rows (a column whose values do not share a type is written as JSON
    text), fields missing from a row are null.

    Args:
        path: The output file, or a resumable job's ``journal.output`` (not stdout).
        row_group_rows: Rows per row group.
        fsync_every: Fsync after this many rows...
        fsync_interval: ...or this many seconds, whichever comes first (and at the end).
        name: The stage's name.
        buffer: Capacity of the sink's inbox.
    """

    format = "parquet"
    streams = False

    def __init__(
        self,
        path: PathLike | JournalFile,
        *,
        row_group_rows: int = 65_536,
        fsync_every: int = 10_000,
        fsync_interval: float = 1.0,
        name: str | None = None,
        buffer: int = 64,
    ) -> None:
        self._pq = _import_parquet()
        super().__init__(
            path, fsync_every=fsync_every, fsync_interval=fsync_interval, name=name, buffer=buffer
        )
        self.row_group_rows = row_group_rows

    def payload(self, env: Envelope[Any]) -> bytes:
        """Check that the item is a row (a mapping) and return it as JSON."""
        if not isinstance(env.value, Mapping):
            raise ItemError(
                f"a Parquet row must be a mapping of fields, got {type(env.value).__name__}"
            )
        return dumps(env.value)

    def _chunks(self, payloads: Payloads) -> Iterator[list[dict[str, Any]]]:
        chunk: list[dict[str, Any]] = []
        for payload in payloads():
            chunk.append(loads(payload))
            if len(chunk) >= self.row_group_rows:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def write_final(self, payloads: Payloads, dest: BinaryIO) -> None:
        """Infer the schema over every row, then write row groups."""
        pa = importlib.import_module("pyarrow")
        names: dict[str, None] = {}
        types: dict[str, Any] = {}
        as_json: set[str] = set()
        for chunk in self._chunks(payloads):
            for row in chunk:
                names.update(dict.fromkeys(row))
            for name in names:
                if name in as_json:
                    continue
                try:
                    kind = pa.array([row.get(name) for row in chunk]).type
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                    as_json.add(name)
                    continue
                known = types.get(name)
                if known is None or pa.types.is_null(known):
                    types[name] = kind
                elif not pa.types.is_null(kind) and kind != known:
                    try:
                        merged = pa.unify_schemas(
                            [pa.schema([(name, known)]), pa.schema([(name, kind)])],
                            promote_options="permissive",
                        )
                        types[name] = merged.field(name).type
                    except (pa.ArrowInvalid, pa.ArrowTypeError):
                        as_json.add(name)
        schema = pa.schema(
            [(n, pa.string() if n in as_json else types.get(n, pa.null())) for n in names]
        )
        with self._pq.ParquetWriter(dest, schema) as writer:
            for chunk in self._chunks(payloads):
                columns = []
                for field in schema:
                    values = [row.get(field.name) for row in chunk]
                    if field.name in as_json:
                        values = [
                            None if v is None else v if isinstance(v, str) else _cell(v)
                            for v in values
                        ]
                    columns.append(pa.array(values, type=field.type))
                writer.write_table(pa.Table.from_arrays(columns, schema=schema))


def dead_letter_record(failed: Failed) -> dict[str, Any]:
    """Return the dead-letter record of one failed row, as every engine writes it."""
    return {
        "key": failed.key,
        "line": line_of(failed.origin),
        "origin": failed.origin,
        "stage": failed.stage,
        "row": failed.item,
        "error": {
            "type": failed.error_type,
            "message": failed.message,
            "status": failed.status,
            "attempts": failed.attempts,
        },
    }


class DeadLetterSink(FileSink):
    """Write dead-letter records (:class:`~pipeline._envelope.Failed`) as JSON Lines.

    Use it as ``Pipeline(..., dead_letter=DeadLetterSink("failed.jsonl"))``. Each record
    holds the row's key, line and origin, the failing stage, the row as that stage received it
    and the error's type, message, HTTP status and attempts.

    Args:
        path: The dead-letter file, ``-`` for stdout, or a job's ``journal.dead_letter``.
        fsync_every: Fsync after this many records...
        fsync_interval: ...or this many seconds, whichever comes first (and at the end).
        name: The stage's name.
        buffer: Capacity of the sink's inbox.
    """

    format = "dead-letter"

    def payload(self, env: Envelope[Any]) -> bytes:
        """Return the dead-letter record of one failed item as JSON (never fails)."""
        failed = env.value
        if not isinstance(failed, Failed):
            failed = Failed(failed, "?", "Error", "not a Failed record", 1, env.seq, env.key)
        record = dead_letter_record(failed)
        try:
            return dumps(record)
        except (TypeError, ValueError):  # an unencodable item: keep its repr
            record["row"] = repr(failed.item)
            return dumps(record)

    def _encode(
        self, chunk: list[Envelope[Any]]
    ) -> tuple[list[Envelope[Any]], list[bytes], list[tuple[Envelope[Any], str]]]:
        return chunk, [self.payload(env) for env in chunk], []


def open_sink(path: PathLike | JournalFile, *, fmt: str | None = None, **options: Any) -> FileSink:
    """Return the sink for an output file, chosen by its extension (or ``fmt``)."""
    target = path.final if isinstance(path, JournalFile) else path
    kind = file_format(target, fmt)
    if kind == "csv":
        return CsvSink(path, **options)
    if kind == "tsv":
        return CsvSink(path, delimiter="\t", **options)
    if kind == "parquet":
        return ParquetSink(path, **options)
    return JsonlSink(path, **options)
