"""Parquet: :class:`ParquetSource` (record batches) and :class:`ParquetSink` (row groups).

Both need the ``[parquet]`` extra (pyarrow).
"""

from __future__ import annotations

import contextlib
import importlib
import tempfile
from collections.abc import Container, Iterator, Mapping
from typing import Any, BinaryIO, cast

import anyio
import anyio.to_thread

from pipeline._envelope import Envelope
from pipeline._errors import ConfigError, FatalError, ItemError
from pipeline._json import dumps, loads
from pipeline._stage import Outbox
from stages.files._columns import Columns
from stages.files._pipes import StreamReader, is_stream
from stages.files._records import JournalFile, Payloads
from stages.files._rows import BLOCK, PathLike, Row, cell, import_parquet
from stages.files._sinks import FileSink
from stages.files._sources import FileSource

__all__ = ["ParquetSink", "ParquetSource"]


class ParquetSource(FileSource):
    """Read a Parquet file one record batch at a time (needs the ``[parquet]`` extra).

    A row's line number is its index plus one. Standard input (or a pipe) is spooled to a
    temporary file first (Parquet needs to seek), read so that a stop ends the wait at once.

    Args:
        path: The file to read, or ``-`` for standard input.
        id_field: The column whose value is each row's key (default: the row number).
        skip_lines: Rows already done (a resumed job), by number; they are not emitted.
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
        skip_lines: Container[int] | None = None,
        batch_rows: int = 4096,
        name: str | None = None,
        buffer: int = 16,
    ) -> None:
        super().__init__(path, id_field=id_field, skip_lines=skip_lines, name=name, buffer=buffer)
        self.batch_rows = batch_rows
        self._pq = import_parquet()

    def _open_parquet(self, source: Any, stack: contextlib.ExitStack) -> Any:
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

    async def _spool(self, stack: contextlib.ExitStack) -> BinaryIO:
        """Copy a stream (stdin, a pipe) to a temporary file: Parquet needs to seek.

        The stream is read by a daemon thread (:class:`~stages.files._pipes.StreamReader`), so
        a run cancelled while the writer is silent (Ctrl-C, SIGTERM) stops waiting at once.
        """
        spool = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115
        reader = StreamReader.open(self.path)
        try:
            while True:
                block = await anyio.to_thread.run_sync(reader.read1, BLOCK, abandon_on_cancel=True)
                if not block:
                    break
                await anyio.to_thread.run_sync(spool.write, block)
        except OSError as error:
            raise FatalError(f"cannot read {self.path!r}: {error.strerror or error}") from error
        finally:
            reader.close()
        spool.seek(0)
        return cast(BinaryIO, spool)

    async def _read(self, outbox: Outbox[Row]) -> None:
        """Emit every row of the file."""
        with contextlib.ExitStack() as stack:
            source: Any = await self._spool(stack) if is_stream(self.path) else self.path
            batches = await anyio.to_thread.run_sync(self._open_parquet, source, stack)

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


_ROW_OVERHEAD = 512
"""Bytes a row counts beyond its JSON size when row groups are cut (keeps small rows' groups
small, as they were when rows were built as Python objects; the layout stays the same)."""


class ParquetSink(FileSink):
    """Write rows (mappings) to a Parquet file in row groups (needs the ``[parquet]`` extra).

    Rows are journaled as they come and the file is built at publish: column types are
    inferred over all rows (a column whose values do not share a type is written as JSON
    text), fields missing from a row are null. A row group holds ``row_group_bytes`` of rows
    or ``row_group_rows`` rows, whichever comes first, a row counting its JSON size plus 512
    bytes; pyarrow's JSON reader builds each group from the rows' JSON text: only one row
    group is in memory at a time, so the publish's memory is flat whatever the file's size
    and however narrow or wide its rows, and pandas is never imported.

    Args:
        path: The output file, or a resumable job's ``journal.output`` (not stdout).
        row_group_rows: Rows per row group at most.
        row_group_bytes: Bytes of rows per row group at most (8 MiB), each row counting its
            JSON size plus 512.
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
        row_group_bytes: int = 8 << 20,
        fsync_every: int = 10_000,
        fsync_interval: float = 1.0,
        name: str | None = None,
        buffer: int = 64,
    ) -> None:
        self._pq = import_parquet()
        super().__init__(
            path, fsync_every=fsync_every, fsync_interval=fsync_interval, name=name, buffer=buffer
        )
        if row_group_rows < 1 or row_group_bytes < 1:
            raise ConfigError("row_group_rows and row_group_bytes must be at least 1")
        self.row_group_rows = row_group_rows
        self.row_group_bytes = row_group_bytes

    def payload(self, env: Envelope[Any]) -> bytes:
        """Check that the item is a row (a mapping) and return it as JSON."""
        if not isinstance(env.value, Mapping):
            raise ItemError(
                f"a Parquet row must be a mapping of fields, got {type(env.value).__name__}"
            )
        return dumps(env.value)

    def _chunks(self, payloads: Payloads) -> Iterator[list[bytes]]:
        """Cut the payloads into row groups: ``row_group_rows`` or ``row_group_bytes``."""
        chunk: list[bytes] = []
        size = 0
        for payload in payloads():
            chunk.append(payload)
            size += len(payload) + _ROW_OVERHEAD
            if len(chunk) >= self.row_group_rows or size >= self.row_group_bytes:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    def write_final(self, payloads: Payloads, dest: BinaryIO) -> None:
        """Infer the schema over every row, then write row groups.

        The types are inferred in Python (:class:`~stages.files._columns.Columns`) and each
        row group is built by pyarrow's JSON reader from the rows' JSON text with that schema:
        no Python object goes through ``pyarrow.array``, which would import pandas.
        """
        pa = importlib.import_module("pyarrow")
        pa_json = importlib.import_module("pyarrow.json")
        columns = Columns()
        for payload in payloads():
            columns.add(loads(payload))
        schema, as_json = columns.schema(pa)
        parse = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error")
        # the C allocator returns a row group's memory when it is written; pyarrow's default
        # pool (mimalloc) keeps about 25 MB it has used
        pool = pa.system_memory_pool()
        with self._pq.ParquetWriter(dest, schema, memory_pool=pool) as writer:
            for chunk in self._chunks(payloads):
                if as_json:
                    chunk = [_text_columns(payload, as_json) for payload in chunk]
                data = b"\n".join(chunk)
                read = pa_json.ReadOptions(use_threads=False, block_size=max(len(data), 1 << 20))
                table = pa_json.read_json(
                    pa.BufferReader(data), read_options=read, parse_options=parse, memory_pool=pool
                )
                writer.write_table(table)
                del table
                pa.default_memory_pool().release_unused()


def _text_columns(payload: bytes, names: list[str]) -> bytes:
    """Return a row's JSON with the values of ``names`` that are not strings as JSON text."""
    row = loads(payload)
    for name in names:
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            row[name] = cell(value)
    return dumps(row)
