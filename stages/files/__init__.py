"""File sources and sinks (JSONL, CSV, TSV, Parquet), dead letters, and the durable journal file.

Modules: ``_rows`` (keys, ids, bad rows), ``_sources`` and ``_sinks`` (the bases), one module
per format (``_jsonl``, ``_csv``, ``_parquet``), ``_dead_letters``, ``_compression`` (``.gz``
and ``.zst``), ``_formats`` (choosing by extension, counting rows, reading the first row's
fields) and ``_records`` (the journal file primitives).
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from pipeline._lazy import load as _load

if _TYPE_CHECKING:
    from ._csv import CsvSink as CsvSink
    from ._csv import CsvSource as CsvSource
    from ._dead_letters import DeadLetterSink as DeadLetterSink
    from ._dead_letters import dead_letter_record as dead_letter_record
    from ._formats import KNOWN_EXTENSIONS as KNOWN_EXTENSIONS
    from ._formats import count_rows as count_rows
    from ._formats import file_format as file_format
    from ._formats import open_sink as open_sink
    from ._formats import open_source as open_source
    from ._formats import sample_fields as sample_fields
    from ._jsonl import JsonlSink as JsonlSink
    from ._jsonl import JsonlSource as JsonlSource
    from ._parquet import ParquetSink as ParquetSink
    from ._parquet import ParquetSource as ParquetSource
    from ._records import JournalFile as JournalFile
    from ._records import encode_record as encode_record
    from ._records import parse_record as parse_record
    from ._rows import BadRowError as BadRowError
    from ._sinks import FileSink as FileSink
    from ._sources import FileSource as FileSource

_LAZY = {
    "CsvSink": "stages.files._csv",
    "CsvSource": "stages.files._csv",
    "dead_letter_record": "stages.files._dead_letters",
    "DeadLetterSink": "stages.files._dead_letters",
    "count_rows": "stages.files._formats",
    "file_format": "stages.files._formats",
    "KNOWN_EXTENSIONS": "stages.files._formats",
    "open_sink": "stages.files._formats",
    "open_source": "stages.files._formats",
    "sample_fields": "stages.files._formats",
    "JsonlSink": "stages.files._jsonl",
    "JsonlSource": "stages.files._jsonl",
    "ParquetSink": "stages.files._parquet",
    "ParquetSource": "stages.files._parquet",
    "encode_record": "stages.files._records",
    "JournalFile": "stages.files._records",
    "parse_record": "stages.files._records",
    "BadRowError": "stages.files._rows",
    "FileSink": "stages.files._sinks",
    "FileSource": "stages.files._sources",
}
"""Where each public name is defined; the module is imported when the name is first used."""


def __getattr__(name: str) -> _Any:
    """Import the module that defines ``name`` on first use, then keep the name here."""
    return _load(name, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "KNOWN_EXTENSIONS",
    "BadRowError",
    "CsvSink",
    "CsvSource",
    "DeadLetterSink",
    "FileSink",
    "FileSource",
    "JournalFile",
    "JsonlSink",
    "JsonlSource",
    "ParquetSink",
    "ParquetSource",
    "count_rows",
    "dead_letter_record",
    "encode_record",
    "file_format",
    "open_sink",
    "open_source",
    "parse_record",
    "sample_fields",
]
