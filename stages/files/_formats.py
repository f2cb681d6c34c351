"""Choosing a source or sink by a file's extension, and counting a file's rows."""

from __future__ import annotations

import os
from collections.abc import Container, Hashable
from typing import Any

from pipeline._errors import ConfigError
from stages.files._csv import CsvSink, CsvSource, csv_records
from stages.files._jsonl import JsonlSink, JsonlSource
from stages.files._parquet import ParquetSink, ParquetSource
from stages.files._records import JournalFile
from stages.files._rows import BLOCK, PathLike, import_parquet
from stages.files._sinks import FileSink
from stages.files._sources import FileSource

__all__ = ["count_rows", "file_format", "open_sink", "open_source"]

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
        parquet = import_parquet()
        return int(parquet.ParquetFile(path).metadata.num_rows)
    with open(path, "rb") as f:
        if kind in ("csv", "tsv"):
            records = csv_records(f, "\t" if kind == "tsv" else ",")
            count = sum(1 for _, fields, _, _ in records if fields != [])
            return max(count - 1, 0)
        count = 0
        rest = b""
        while True:
            block = f.read(BLOCK)
            if not block:
                break
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            count += sum(1 for line in lines if line and not line.isspace())
        if rest and not rest.isspace():
            count += 1
        return count


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
