"""File sources and sinks (JSONL, CSV, TSV, Parquet), dead letters, and the durable journal file.

Modules: ``_rows`` (keys, ids, bad rows), ``_sources`` and ``_sinks`` (the bases), one module
per format (``_jsonl``, ``_csv``, ``_parquet``), ``_dead_letters``, ``_compression`` (``.gz``
and ``.zst``), ``_formats`` (choosing by extension, counting rows, reading the first row's
fields) and ``_records`` (the journal file primitives).
"""

from stages.files._csv import CsvSink as CsvSink
from stages.files._csv import CsvSource as CsvSource
from stages.files._dead_letters import DeadLetterSink as DeadLetterSink
from stages.files._dead_letters import dead_letter_record as dead_letter_record
from stages.files._formats import KNOWN_EXTENSIONS as KNOWN_EXTENSIONS
from stages.files._formats import count_rows as count_rows
from stages.files._formats import file_format as file_format
from stages.files._formats import open_sink as open_sink
from stages.files._formats import open_source as open_source
from stages.files._formats import sample_fields as sample_fields
from stages.files._jsonl import JsonlSink as JsonlSink
from stages.files._jsonl import JsonlSource as JsonlSource
from stages.files._parquet import ParquetSink as ParquetSink
from stages.files._parquet import ParquetSource as ParquetSource
from stages.files._records import JournalFile as JournalFile
from stages.files._records import encode_record as encode_record
from stages.files._records import parse_record as parse_record
from stages.files._rows import BadRowError as BadRowError
from stages.files._sinks import FileSink as FileSink
from stages.files._sources import FileSource as FileSource

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
