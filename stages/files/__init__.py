"""File sources and sinks (JSONL, CSV, TSV, Parquet), dead letters, and the durable journal file."""

from ._files import BadRowError as BadRowError
from ._files import CsvSink as CsvSink
from ._files import CsvSource as CsvSource
from ._files import DeadLetterSink as DeadLetterSink
from ._files import FileSink as FileSink
from ._files import FileSource as FileSource
from ._files import JsonlSink as JsonlSink
from ._files import JsonlSource as JsonlSource
from ._files import ParquetSink as ParquetSink
from ._files import ParquetSource as ParquetSource
from ._files import count_rows as count_rows
from ._files import dead_letter_record as dead_letter_record
from ._files import open_sink as open_sink
from ._files import open_source as open_source
from ._records import JournalFile as JournalFile
from ._records import encode_record as encode_record
from ._records import parse_record as parse_record

__all__ = [
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
    "open_sink",
    "open_source",
    "parse_record",
]
