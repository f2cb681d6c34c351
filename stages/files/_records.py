"""Durable records: the append-only journal file that sinks write and how it is published.

A record is ``line TAB key TAB payload NEWLINE``; :class:`JournalFile` appends chunks of them
and publishes the payloads in the sink's format with an atomic, fsynced rename. The job engine
(:mod:`pipeline.jobs`) builds resume, manifests and ordered publishing on top of these.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Container, Hashable, Iterable, Iterator
from typing import IO, Any, BinaryIO

from pipeline._errors import FatalError
from pipeline._json import dumps, loads

log = logging.getLogger("pipeline.journal")

PUBLISH_SUFFIX = ".publishing"


class JournalCorruptError(FatalError):
    """A journal holds a damaged record that is not a torn tail; resuming would guess."""


PathLike = str | os.PathLike[str]
Payloads = Callable[[], Iterator[bytes]]
"""A factory of fresh iterators over a journal's payloads (JSON text, each ending in ``\n``)."""
PayloadWriter = Callable[[Payloads, BinaryIO], None]
"""Writes the payloads in a final format to a binary file (may iterate the payloads twice)."""


# -- lines ---------------------------------------------------------------------------------


class LineSet(Container[int]):
    """A set of line numbers (non-negative ints) as a bitmap: 125 KB per million lines.

    A job's identity for a row is its line in the (fingerprinted) input, so the rows a resumed
    job has done fit in a bitmap whatever their ids look like.
    """

    def __init__(self, lines: Iterable[int] = ()) -> None:
        self._bits = bytearray()
        self._count = 0
        for line in lines:
            self.add(line)

    def add(self, line: int) -> bool:
        """Add ``line``; return whether it was new."""
        if line < 0:
            raise ValueError(f"a line number cannot be negative ({line})")
        index, bit = line >> 3, 1 << (line & 7)
        bits = self._bits
        if index >= len(bits):  # grow by a quarter at least: amortised, and no doubling
            bits.extend(bytes(max(index + 1 - len(bits), len(bits) >> 2, 64)))
        if bits[index] & bit:
            return False
        bits[index] |= bit
        self._count += 1
        return True

    def copy(self) -> LineSet:
        """Return a set of the same lines (its own bitmap: adding to one leaves the other)."""
        return copy.deepcopy(self)

    def __contains__(self, line: object) -> bool:
        if type(line) is not int or line < 0:
            return False
        index = line >> 3
        return index < len(self._bits) and bool(self._bits[index] & (1 << (line & 7)))

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"LineSet(<{self._count} lines>)"


def key_json(key: Hashable) -> bytes:
    """Encode a row key for a journal record (str, int, float or tuples of them)."""
    return dumps(key)


def key_from_json(value: Any) -> Hashable:
    if isinstance(value, list):
        return tuple(key_from_json(v) for v in value)
    result: Hashable = value
    return result


_TAIL = 10
"""A record ends with ``TAB``, eight hex digits of CRC-32 and ``NEWLINE``."""


def encode_record(line: int, key: Hashable, payload: bytes) -> bytes:
    """Return one journal record: ``line TAB key TAB payload TAB crc32 NEWLINE``.

    The CRC-32 (eight hex digits) covers everything before its tab, so a damaged record (a
    cut-off payload, flipped bytes) is told from a whole one without parsing the payload.
    """
    encoded = b"%d" % key if type(key) is int else key_json(key)  # a line number, mostly
    body = b"%d\t%b\t%b" % (line, encoded, payload)
    return b"%b\t%08x\n" % (body, zlib.crc32(body))


def record_ok(record: bytes) -> bool:
    """Whether ``record`` is a whole record whose checksum matches."""
    if len(record) <= _TAIL or record[-1:] != b"\n" or record[-_TAIL : -_TAIL + 1] != b"\t":
        return False
    try:
        crc = int(record[-_TAIL + 1 : -1], 16)
    except ValueError:
        return False
    return zlib.crc32(record[:-_TAIL]) == crc


def record_line(record: bytes) -> int | None:
    """Return the line number a record starts with (even a damaged one), or ``None``."""
    head, tab, _ = record[:24].partition(b"\t")
    return int(head) if tab and head.isdigit() else None


def parse_record(record: bytes) -> tuple[int, Hashable, bytes]:
    """Split a complete journal record into ``(line, key, payload)``; the payload ends in NL.

    Raises:
        ValueError: The record is malformed or its checksum does not match.
    """
    if not record_ok(record):
        raise ValueError("damaged journal record (bad checksum or cut off)")
    first = record.index(b"\t")
    second = record.index(b"\t", first + 1)
    return (
        int(record[:first]),
        key_from_json(loads(record[first + 1 : second])),
        record[second + 1 : -_TAIL] + b"\n",
    )


def line_of(record: bytes) -> int:
    """Return a record's line number (-1 when it does not start with one)."""
    head, tab, _ = record[:24].partition(b"\t")  # what record_line() does, one call less
    return int(head) if tab and head.isdigit() else -1


def key_of(record: bytes) -> bytes:
    """Return a whole record's key as JSON text."""
    first = record.index(b"\t")
    return record[first + 1 : record.index(b"\t", first + 1)]


def record_payload(record: bytes) -> bytes | None:
    """Return a whole record's payload (ending in a newline), ``None`` for a damaged one."""
    return payload_of(record) if record_ok(record) else None


def payload_of(record: bytes) -> bytes:
    """Return a whole record's payload, ending in a newline."""
    return record[record.index(b"\t", record.index(b"\t") + 1) + 1 : -_TAIL] + b"\n"


# -- durable file operations ---------------------------------------------------------------


def fsync_dir(path: PathLike) -> None:
    """Flush a directory entry change (rename, create, delete) to disk; no-op where unsupported."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse
        pass
    finally:
        os.close(fd)


def dir_of(path: PathLike) -> str:
    return os.path.dirname(os.path.abspath(os.fspath(path)))


def atomic_write(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp, fsync, rename, dir fsync)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = path  # "No space left on device" alone does not say where
        raise
    fsync_dir(dir_of(path))


def remove_file(path: PathLike) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


# -- journal files -------------------------------------------------------------------------


def write_jsonl(payloads: Payloads, dest: BinaryIO) -> None:
    """Write payloads as JSON Lines (a byte copy: each payload is one JSON text and newline)."""
    batch: list[bytes] = []
    for payload in payloads():
        batch.append(payload)
        if len(batch) >= 4096:
            dest.writelines(batch)
            batch.clear()
    dest.writelines(batch)


class JournalFile:
    """An append-only journal of finished rows, and how to publish it.

    Sinks open it, :meth:`append` chunks of records made by :func:`encode_record`,
    :meth:`sync` now and then and :meth:`close` it at the end. :attr:`writer` turns the
    payloads into the final format at publish; a sink sets it to its own format.

    Args:
        path: The journal's path (``FINAL.partial`` for a job).
        final: The published file's path.
        writer: The final format (JSON Lines by default).
    """

    def __init__(
        self, path: PathLike, final: PathLike, writer: PayloadWriter = write_jsonl
    ) -> None:
        self.path = os.fspath(path)
        self.final = os.fspath(final)
        self.writer = writer
        self.rows = 0
        self._file: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"JournalFile({self.path!r} -> {self.final!r})"

    def open(self) -> None:
        """Open the journal for appending (creating it if needed)."""
        if self._file is None:
            try:
                self._file = open(self.path, "ab")  # noqa: SIM115 - held across calls
            except OSError as error:
                raise FatalError(f"cannot open {self.path!r} for writing: {error}") from error

    def append(self, data: bytes, rows: int) -> None:
        """Append whole records and flush them to the OS (they survive the process dying)."""
        f = self._file
        if f is None:
            raise RuntimeError(f"journal {self.path!r} is not open")
        try:
            f.write(data)
            f.flush()
        except OSError as error:
            raise FatalError(f"cannot write to {self.path!r}: {error.strerror or error}") from error
        self.rows += rows

    def sync(self) -> None:
        """Flush the journal to disk (survives a power loss)."""
        f = self._file
        if f is not None:
            try:
                os.fsync(f.fileno())
            except OSError as error:
                raise FatalError(f"cannot fsync {self.path!r}: {error}") from error

    def close(self) -> None:
        """Fsync and close the journal; safe to call twice."""
        f, self._file = self._file, None
        if f is None:
            return
        try:
            try:
                f.flush()
                os.fsync(f.fileno())
            finally:
                f.close()
        except OSError as error:  # a full disk, a file size limit: name the file
            raise FatalError(f"cannot write to {self.path!r}: {error.strerror or error}") from error

    @property
    def is_open(self) -> bool:
        """Whether the journal is open for appending."""
        return self._file is not None

    def publish(self, *, ordered: bool = False, chunk_bytes: int = 64 << 20) -> None:
        """Write the final file from the journal atomically, then delete the journal.

        Used by sinks that run without a :class:`Journal` (no resume): the job's
        :meth:`Journal.commit` does the same in crash-safe steps.
        """
        self.close()
        tmp = self.final + PUBLISH_SUFFIX
        build_final(self.path, tmp, self.writer, ordered=ordered, chunk_bytes=chunk_bytes)
        os.replace(tmp, self.final)
        fsync_dir(dir_of(self.final))
        remove_file(self.path)

    def discard(self) -> None:
        """Close and delete the journal (a run without resume that failed)."""
        f, self._file = self._file, None
        if f is not None:
            f.close()
        remove_file(self.path)


def scan_journal(path: PathLike, on_record: Callable[[int, bytes], None] | None = None) -> int:
    """Check a journal's records, truncate a torn tail, and report each whole record.

    Each whole record (its checksum matches) is reported to ``on_record`` as its line and its
    key as JSON text, in file order; a line may come twice (a record appended twice), and the
    caller keeps the first. A damaged record that still names its line (a cut-off payload, a
    bad checksum) is skipped with a warning: its row is not done and is sent again. Damage at
    the end is a torn tail (a crash mid-write) and is truncated.

    Returns:
        How many whole records the journal holds.

    Raises:
        JournalCorruptError: Something that is not a record (garbage) is followed by whole
            records.
    """
    path = os.fspath(path)
    good_end = offset = count = 0
    damaged: list[tuple[int, int | None]] = []  # (record number, line) since the last whole one
    with open(path, "rb") as f:
        for number, record in enumerate(f, 1):
            if not record_ok(record):
                damaged.append((number, record_line(record)))
                offset += len(record)
                continue
            for bad_number, bad_line in damaged:
                if bad_line is None:
                    raise JournalCorruptError(
                        f"{path}: record {bad_number} is damaged but later records are intact;"
                        " refusing to resume from a corrupt journal (start over with --overwrite)"
                    )
                log.warning(
                    "%s: record %d (input line %d) is damaged: that row is sent again",
                    path,
                    bad_number,
                    bad_line,
                )
            damaged.clear()
            count += 1
            if on_record is not None:
                on_record(line_of(record), key_of(record))
            offset += len(record)
            good_end = offset
    if offset > good_end:
        log.warning("%s: removing a torn tail of %d bytes left by a crash", path, offset - good_end)
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return count


# -- publishing, with input order restored -------------------------------------------------


def _read_range(path: str, start: int, end: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        position = start
        while position < end:
            record = f.readline()
            if not record:
                return
            position += len(record)
            yield record


def _ascending_runs(path: str) -> list[tuple[int, int]]:
    """Return the byte ranges of the journal's maximal runs of ascending line numbers."""
    runs: list[tuple[int, int]] = []
    start = offset = 0
    previous = -1
    with open(path, "rb") as f:
        for record in f:
            line = line_of(record)
            if line < previous:
                runs.append((start, offset))
                start = offset
            previous = line
            offset += len(record)
    if offset > start:
        runs.append((start, offset))
    return runs


def _merge(sources: list[Iterator[bytes]]) -> Iterator[bytes]:
    if len(sources) == 1:
        return sources[0]
    return heapq.merge(*sources, key=line_of)


def _sorted_runs(path: str, workdir: str, chunk_bytes: int, fanin: int) -> list[str]:
    """Sort the journal into run files of at most ``chunk_bytes``, merged down to ``fanin``."""
    runs: list[str] = []

    def spill(records: list[bytes]) -> None:
        records.sort(key=line_of)
        name = os.path.join(workdir, f"run{len(runs)}")
        with open(name, "wb") as out:
            out.writelines(records)
        runs.append(name)

    chunk: list[bytes] = []
    size = 0
    with open(path, "rb") as f:
        for record in f:
            chunk.append(record)
            size += len(record)
            if size >= chunk_bytes:
                spill(chunk)
                chunk, size = [], 0
    if chunk:
        spill(chunk)
    level = 0
    while len(runs) > fanin:
        level += 1
        merged: list[str] = []
        for i in range(0, len(runs), fanin):
            group = runs[i : i + fanin]
            name = os.path.join(workdir, f"merge{level}.{i}")
            with open(name, "wb") as out:
                out.writelines(_merge([_read_range(p, 0, os.path.getsize(p)) for p in group]))
            for p in group:
                os.unlink(p)
            merged.append(name)
        runs = merged
    return runs


def _first_whole(records: Iterable[bytes], exclude: Container[int]) -> Iterator[bytes]:
    """Yield the payload of each line's first whole record (none for lines in ``exclude``)."""
    seen = LineSet()
    for record in records:
        if record_ok(record):
            line = line_of(record)
            if line >= 0 and line not in exclude and seen.add(line):
                yield payload_of(record)


def _remove_sort_dirs(directory: str, prefix: str) -> None:
    """Remove the sort directories an earlier publish of the same file left (killed)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)


def build_final(
    journal: PathLike,
    dest: PathLike,
    writer: PayloadWriter,
    *,
    ordered: bool = False,
    chunk_bytes: int = 64 << 20,
    fanin: int = 64,
    exclude: Container[int] = (),
) -> None:
    """Write the payloads of ``journal`` to ``dest`` (fsynced) in ``writer``'s format.

    Only whole records are published (a damaged one never reaches the final file), one per
    line: the first in journal order (a record appended twice is published once), none for a
    line in ``exclude``. With ``ordered``, payloads come in input (line) order, in bounded
    memory.
    """
    path = os.fspath(journal)
    dest = os.fspath(dest)
    prefix = f".{os.path.basename(dest)}.sort-"  # this file's: the job's lock covers it
    _remove_sort_dirs(dir_of(dest), prefix)  # a publish killed while sorting left one
    with contextlib.ExitStack() as stack:
        if ordered:
            runs = _ascending_runs(path)
            if len(runs) <= fanin:
                ranges = [(path, start, end) for start, end in runs]
            else:
                workdir = stack.enter_context(
                    tempfile.TemporaryDirectory(prefix=prefix, dir=dir_of(dest))
                )
                files = _sorted_runs(path, workdir, chunk_bytes, fanin)
                ranges = [(p, 0, os.path.getsize(p)) for p in files]

            def payloads() -> Iterator[bytes]:
                sources = [_read_range(p, start, end) for p, start, end in ranges]
                return _first_whole(_merge(sources), exclude)

        else:

            def payloads() -> Iterator[bytes]:
                with open(path, "rb") as f:
                    yield from _first_whole(f, exclude)

        try:
            with open(dest, "wb") as out:
                writer(payloads, out)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            remove_file(dest)
            raise


# -- the job -------------------------------------------------------------------------------
