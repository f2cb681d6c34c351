"""Compressed files by extension: ``.gz`` (gzip) and ``.zst`` (Zstandard) around JSONL and CSV.

``data.jsonl.gz`` is read as JSON Lines through gzip, ``out.csv.zst`` is written as CSV through
Zstandard. A source decompresses while it reads (flat memory, like a plain file); a sink
journals uncompressed records as usual and compresses when it publishes the final file, so
resume and ordering work the same. Zstandard needs the ``zstandard`` package (the
``[compression]`` extra); gzip is in the standard library. Parquet compresses inside the file,
so ``.parquet.gz`` is refused.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import io
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, cast

from pipeline._errors import ConfigError

__all__ = [
    "COMPRESSIONS",
    "check_available",
    "compressed_writer",
    "compression_of",
    "open_input",
]

COMPRESSIONS: dict[str, str] = {".gz": "gzip", ".zst": "zstd"}
"""Compressed file extensions and the compression each names."""

PayloadWriter = Callable[[Callable[[], Iterator[bytes]], BinaryIO], None]


def compression_of(path: str) -> tuple[str, str | None]:
    """Return ``(path without the compression extension, compression or None)``."""
    root, ext = os.path.splitext(path)
    kind = COMPRESSIONS.get(ext.lower())
    return (root, kind) if kind is not None else (path, None)


def _zstandard() -> Any:
    try:
        return importlib.import_module("zstandard")
    except ImportError:
        raise ConfigError(
            ".zst files need the zstandard package: pip install 'llm-pipeline[compression]'"
        ) from None


def open_input(path: str) -> io.BufferedReader:
    """Open a file for binary reading, decompressing it when its extension says so.

    The reader has ``read1``, what the sources read with.

    Raises:
        OSError: The file cannot be opened.
        ConfigError: A ``.zst`` file without the zstandard package.
    """
    kind = compression_of(path)[1]
    if kind is None:
        return open(path, "rb")
    if kind == "gzip":
        return cast(io.BufferedReader, gzip.GzipFile(path, "rb"))  # owns (closes) the file
    zstd = _zstandard()
    raw = open(path, "rb")  # noqa: SIM115 - closed with the reader (closefd)
    try:
        reader = zstd.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
    except BaseException:
        raw.close()
        raise
    return io.BufferedReader(reader)


def check_available(kind: str) -> None:
    """Raise :class:`ConfigError` when the library a compression needs is missing."""
    if kind == "zstd":
        _zstandard()


@contextlib.contextmanager
def _compressing(dest: BinaryIO, kind: str) -> Iterator[BinaryIO]:
    if kind == "gzip":
        with gzip.GzipFile(fileobj=dest, mode="wb", compresslevel=6, mtime=0) as out:
            yield cast(BinaryIO, out)
        return
    zstd = _zstandard()
    with zstd.ZstdCompressor(level=3).stream_writer(dest, closefd=False) as out:
        yield cast(BinaryIO, _Lines(out))


class _Lines:
    """A Zstandard writer with ``writelines`` (which it lacks) and what a text wrapper uses."""

    def __init__(self, out: Any) -> None:
        self._out = out
        self.closed = False

    def write(self, data: bytes) -> int:
        return int(self._out.write(data))

    def writelines(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            self._out.write(line)

    def flush(self) -> None:
        self._out.flush()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False


def compressed_writer(writer: PayloadWriter, kind: str | None) -> PayloadWriter:
    """Return ``writer`` compressing what it writes with ``kind`` (itself for ``None``)."""
    if kind is None:
        return writer

    def write(payloads: Callable[[], Iterator[bytes]], dest: BinaryIO) -> None:
        with _compressing(dest, kind) as out:
            writer(payloads, out)

    return write
