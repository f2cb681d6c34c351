"""Choosing a source or sink by a file's extension, counting a file's rows, reading its fields.

Known extensions: ``.jsonl``, ``.ndjson``, ``.json`` (JSON Lines), ``.csv``, ``.tsv``,
``.parquet``, ``.pq``; JSON Lines, CSV and TSV may end in ``.gz`` or ``.zst`` as well
(``data.jsonl.gz``: see :mod:`stages.files._compression`). Any other extension is refused with
this list, unless the format is given (``fmt=``); ``-`` (stdin, stdout) is JSON Lines.

The CSV and Parquet modules are imported when a CSV or Parquet file is opened, counted or
sampled: a JSON Lines job loads neither.
"""

from __future__ import annotations

import os
from collections.abc import Container
from typing import Any, BinaryIO

from pipeline._errors import ConfigError
from pipeline._json import loads
from stages.files._compression import COMPRESSIONS, compression_of, open_input
from stages.files._jsonl import JsonlSink, JsonlSource
from stages.files._records import JournalFile
from stages.files._rows import BLOCK, BOM, MAX_LINE_BYTES, PathLike, import_parquet
from stages.files._sinks import FileSink
from stages.files._sources import FileSource

__all__ = [
    "EXTENSION_FORMATS",
    "KNOWN_EXTENSIONS",
    "count_rows",
    "file_format",
    "open_sink",
    "open_source",
    "sample_fields",
]

EXTENSION_FORMATS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
"""Each known extension (before a compression's) and the format it names."""


KNOWN_EXTENSIONS = tuple(EXTENSION_FORMATS) + tuple(
    f"{ext}{zipped}"
    for ext in EXTENSION_FORMATS
    if EXTENSION_FORMATS[ext] != "parquet"
    for zipped in COMPRESSIONS
)
"""Every extension a format is recognised by (compressed ones included)."""


def file_format(path: PathLike, fmt: str | None = None) -> str:
    """Return ``"jsonl"``, ``"csv"``, ``"tsv"`` or ``"parquet"`` for a path (or ``fmt``).

    Standard input and output (``-``) are JSON Lines unless ``fmt`` says otherwise.

    Raises:
        ConfigError: An unknown format, or an extension that names none (with the known ones).
    """
    if fmt is not None:
        fmt = fmt.lower()
        if fmt not in ("jsonl", "csv", "tsv", "parquet"):
            raise ConfigError(f"unknown file format {fmt!r} (jsonl, csv, tsv, parquet)")
        return fmt
    text = os.fspath(path)
    if text == "-":
        return "jsonl"
    root, compression = compression_of(text)
    ext = os.path.splitext(root)[1].lower()
    kind = EXTENSION_FORMATS.get(ext)
    if kind is None or (compression is not None and kind == "parquet"):
        shown = ext + os.path.splitext(text)[1] if compression is not None else ext
        raise ConfigError(
            f"{text!r}: unknown file extension {shown or '(none)'!r}; known: "
            f"{', '.join(EXTENSION_FORMATS)}, and .gz or .zst after a JSON Lines, CSV or TSV one"
            " (data.jsonl.gz); or name the format (--input-format/--output-format)"
        )
    return kind


def open_source(
    path: PathLike,
    *,
    fmt: str | None = None,
    id_field: str | None = None,
    skip_lines: Container[int] | None = None,
    delimiter: str | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    encoding: str = "utf-8",
) -> FileSource:
    """Return the source for a file, chosen by its extension (or ``fmt``).

    ``delimiter`` is the CSV field separator; by default a CSV file's is detected from its
    header (``,`` unless the header has none and has ``;``, a tab or ``|``).
    ``max_line_bytes`` bounds a JSON Lines row (a longer line is a dead letter). ``encoding``
    is the text encoding of a CSV or TSV file (JSONL is UTF-8 by definition, Parquet carries
    its own).
    """
    kind = file_format(path, fmt)
    if kind == "parquet":
        from stages.files._parquet import ParquetSource

        return ParquetSource(path, id_field=id_field, skip_lines=skip_lines)
    if kind == "jsonl":
        return JsonlSource(
            path, id_field=id_field, skip_lines=skip_lines, max_line_bytes=max_line_bytes
        )
    from stages.files._csv import CsvSource

    if kind == "csv" or delimiter is not None:
        return CsvSource(
            path, id_field=id_field, skip_lines=skip_lines, delimiter=delimiter, encoding=encoding
        )
    return CsvSource(
        path, id_field=id_field, skip_lines=skip_lines, delimiter="\t", encoding=encoding
    )


def count_rows(
    path: PathLike, *, fmt: str | None = None, delimiter: str | None = None
) -> int | None:
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
    with open_input(path) as f:
        if kind in ("csv", "tsv"):
            from stages.files._csv import csv_records

            sep = "\t" if kind == "tsv" and delimiter is None else delimiter
            records = csv_records(f, sep)
            count = sum(1 for _, fields, _, _ in records if fields != [])
            return max(count - 1, 0)
        return _count_lines(f)


def _count_lines(f: BinaryIO) -> int:
    """Count the non-blank lines of a file in one linear pass (a line may span blocks)."""
    count = 0
    pending = False  # the line that continues into the next block has content
    while block := f.read(BLOCK):
        lines = block.split(b"\n")
        last = lines.pop()
        if lines:
            first = lines[0]
            count += pending or (bool(first) and not first.isspace())
            count += sum(1 for line in lines[1:] if line and not line.isspace())
            pending = False
        pending = pending or (bool(last) and not last.isspace())
    return count + pending


def sample_fields(
    path: PathLike, *, fmt: str | None = None, delimiter: str | None = None
) -> dict[str, Any] | list[str] | None:
    """Return what a template can be checked against before a job starts.

    The first row of a JSON Lines file (a dict), the header of a CSV or TSV file or the schema's
    column names of a Parquet file (a list); ``None`` for standard input, an empty file or a
    first line that is not a JSON object (the source reports that row itself).

    Raises:
        OSError: The file cannot be read.
        ConfigError: Parquet without pyarrow, ``.zst`` without zstandard.
    """
    path = os.fspath(path)
    if path == "-":
        return None
    kind = file_format(path, fmt)
    if kind == "parquet":
        parquet = import_parquet()
        return [str(name) for name in parquet.ParquetFile(path).schema_arrow.names]
    with open_input(path) as f:
        if kind in ("csv", "tsv"):
            from stages.files._csv import csv_records

            sep = "\t" if kind == "tsv" and delimiter is None else delimiter
            for _, fields, _, problem in csv_records(f, sep):
                if fields != []:
                    return None if fields is None or problem else fields
            return None
        for raw in f:
            if raw.strip():
                try:
                    row = loads(raw.removeprefix(BOM))
                except ValueError:
                    return None
                return row if isinstance(row, dict) else None
    return None


def open_sink(path: PathLike | JournalFile, *, fmt: str | None = None, **options: Any) -> FileSink:
    """Return the sink for an output file, chosen by its extension (or ``fmt``)."""
    target = path.final if isinstance(path, JournalFile) else path
    kind = file_format(target, fmt)
    if kind == "jsonl":
        return JsonlSink(path, **options)
    if kind == "parquet":
        from stages.files._parquet import ParquetSink

        return ParquetSink(path, **options)
    from stages.files._csv import CsvSink

    if kind == "tsv":
        return CsvSink(path, delimiter="\t", **options)
    return CsvSink(path, **options)
