"""Parquet: :class:`ParquetSource` (record batches) and :class:`ParquetSink` (row groups).

Both need the ``[parquet]`` extra (pyarrow).
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
import sys
import tempfile
from collections.abc import Container, Iterator, Mapping
from typing import Any, BinaryIO

import anyio
import anyio.to_thread

from pipeline._envelope import Envelope
from pipeline._errors import ConfigError, FatalError, ItemError
from pipeline._json import dumps, loads
from pipeline._stage import Outbox
from stages.files._records import JournalFile, Payloads
from stages.files._rows import BLOCK, PathLike, Row, cell, import_parquet
from stages.files._sinks import FileSink
from stages.files._sources import FileSource

__all__ = ["ParquetSink", "ParquetSource"]


class ParquetSource(FileSource):
    """Read a Parquet file one record batch at a time (needs the ``[parquet]`` extra).

    A row's line number is its index plus one. Standard input is spooled to a temporary file
    first (Parquet needs to seek).

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

    def _open_parquet(self, stack: contextlib.ExitStack) -> Any:
        source: Any = self.path
        if self.path == "-":
            spool = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115
            shutil.copyfileobj(sys.stdin.buffer, spool, BLOCK)
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

    async def _read(self, outbox: Outbox[Row]) -> None:
        """Emit every row of the file."""
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


_ROW_OVERHEAD = 512
"""Bytes a row costs in memory beyond its JSON size (its dict, keys and values as objects)."""


class ParquetSink(FileSink):
    """Write rows (mappings) to a Parquet file in row groups (needs the ``[parquet]`` extra).

    Rows are journaled as they come and the file is built at publish: column types are
    inferred over all rows (a column whose values do not share a type is written as JSON
    text), fields missing from a row are null. A row group holds ``row_group_bytes`` of rows
    or ``row_group_rows`` rows, whichever comes first, a row counting its JSON size plus 512
    bytes (what a small row costs as Python objects): only one row group's rows are in memory
    at a time, so the publish's memory is flat whatever the file's size and however narrow or
    wide its rows.

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

    def _chunks(self, payloads: Payloads) -> Iterator[list[dict[str, Any]]]:
        chunk: list[dict[str, Any]] = []
        size = 0
        for payload in payloads():
            chunk.append(loads(payload))
            size += len(payload) + _ROW_OVERHEAD
            if len(chunk) >= self.row_group_rows or size >= self.row_group_bytes:
                yield chunk
                chunk, size = [], 0
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
                if name not in as_json and not _infer(pa, types, name, chunk):
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
                            None if v is None else v if isinstance(v, str) else cell(v)
                            for v in values
                        ]
                    columns.append(pa.array(values, type=field.type))
                writer.write_table(pa.Table.from_arrays(columns, schema=schema))


def _infer(pa: Any, types: dict[str, Any], name: str, chunk: list[dict[str, Any]]) -> bool:
    """Widen ``types[name]`` by a chunk's values; ``False`` if they share no Arrow type."""
    try:
        kind = pa.array([row.get(name) for row in chunk]).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return False
    known = types.get(name)
    if known is None or pa.types.is_null(known):
        types[name] = kind
    elif not pa.types.is_null(kind) and kind != known:
        try:
            merged = pa.unify_schemas(
                [pa.schema([(name, known)]), pa.schema([(name, kind)])],
                promote_options="permissive",
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return False
        types[name] = merged.field(name).type
    return True
