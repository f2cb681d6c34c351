"""Finding ids that repeat, in bounded memory: hashes partitioned into temporary files.

A source with an id field must dead-letter a row whose id an earlier row already has, and a
job's publish must check that no two rows it publishes share an id. Remembering every id
string costs 60-120 bytes per row (over a gigabyte at ten million rows), so
:class:`DuplicateIds` keeps a 16-byte BLAKE2b digest and an 8-byte line per id instead, in
memory up to ``memory_rows`` entries and beyond that appended to 256 bucket files chosen by
the digest's first byte (a grace hash join with one side). :meth:`DuplicateIds.repeats` then
reads one bucket at a time, sorts it (digest, then line) and reports each line whose digest an
earlier line has. Memory is bounded by one bucket: ``rows / 256`` entries of about 60 bytes
(2.4 MB at ten million rows), and disk use is 24 bytes per row while it runs.

Two different ids share a 128-bit digest with a probability below 10^-20 even for 10^9 rows;
that is the only way this can call two different ids the same.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import BinaryIO

__all__ = ["DuplicateIds"]

_DIGEST = 16
_ENTRY = _DIGEST + 8
_BUCKETS = 256


class DuplicateIds:
    """Collect ``(id, line)`` pairs, then report the lines whose id an earlier line has.

    Args:
        directory: Where the bucket files go once the memory share is full (default: the
            system's temporary directory).
        memory_rows: Pairs kept in memory before they are spilled to the bucket files.

    Use as a context manager (or call :meth:`close`) so the bucket files are removed.
    """

    def __init__(self, *, directory: str | None = None, memory_rows: int = 1 << 17) -> None:
        self.directory = directory
        self.memory_rows = memory_rows
        self.count = 0
        self._pending: list[bytes] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._files: list[BinaryIO] = []

    def __enter__(self) -> DuplicateIds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DuplicateIds(count={self.count}, spilled={self._tmp is not None})"

    def add(self, key: bytes, line: int) -> None:
        """Remember that ``line`` has the id ``key`` (its bytes, e.g. UTF-8 text)."""
        digest = hashlib.blake2b(key, digest_size=_DIGEST).digest()
        self._pending.append(digest + line.to_bytes(8, "big"))
        self.count += 1
        if len(self._pending) >= self.memory_rows:
            self._spill()

    def _spill(self) -> None:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=".ids-", dir=self.directory)
            self._files = [
                open(os.path.join(self._tmp.name, f"{i:02x}"), "w+b")  # noqa: SIM115
                for i in range(_BUCKETS)
            ]
        buckets: list[list[bytes]] = [[] for _ in range(_BUCKETS)]
        for entry in self._pending:
            buckets[entry[0]].append(entry)
        for f, entries in zip(self._files, buckets, strict=True):
            if entries:
                f.write(b"".join(entries))
        self._pending = []

    def repeats(self) -> dict[int, int]:
        """Return ``{line: first line with the same id}`` for every repeated id's later lines."""
        found: dict[int, int] = {}
        if self._tmp is None:
            _repeats(self._pending, found)
            return found
        self._spill()
        for f in self._files:
            f.flush()
            f.seek(0)
            data = f.read()
            _repeats([data[i : i + _ENTRY] for i in range(0, len(data), _ENTRY)], found)
        return found

    def close(self) -> None:
        """Remove the bucket files."""
        for f in self._files:
            f.close()
        self._files = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self._pending = []


def _repeats(entries: list[bytes], found: dict[int, int]) -> None:
    entries.sort()
    previous = b""
    first = 0
    for entry in entries:
        digest = entry[:_DIGEST]
        line = int.from_bytes(entry[_DIGEST:], "big")
        if digest == previous:
            found[line] = first
        else:
            previous, first = digest, line
