"""The base of the file sinks: chunked, flushed, fsynced writes; items pass through unchanged.

Sinks write each item and then pass it downstream unchanged. They take whatever is waiting
in the inbox as one chunk, write it with one call and flush it to the OS (a ``kill -9`` loses
nothing already written), and fsync every ``fsync_every`` rows or ``fsync_interval`` seconds
and at the end. To a file, a sink appends to a journal (see :mod:`pipeline.jobs`) and
publishes the final file atomically when its input ends, so no reader sees half a file under
the final name; given a :class:`~stages.files._records.JournalFile` of a resumable job, it
appends to that and the job publishes. To stdout (``-``) JSONL and CSV rows stream as they
come; Parquet, a whole-file format, needs a path. A run that fails leaves no file behind
(without a job there is nothing to resume; a job's journal is for that).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Sequence
from typing import Any, BinaryIO, ClassVar

import anyio
import anyio.to_thread
from anyio import EndOfStream, WouldBlock
from anyio.lowlevel import checkpoint_if_cancelled

from pipeline._envelope import Envelope
from pipeline._errors import ConfigError, FatalError, ItemError
from pipeline._json import dumps
from pipeline._stage import Inbox, Outbox, Stage
from stages.files._compression import check_available, compressed_writer, compression_of
from stages.files._records import (
    JournalFile,
    Payloads,
    PayloadWriter,
    encode_record,
    write_jsonl,
)
from stages.files._rows import CHUNK_ROWS, PathLike, line_of

__all__ = ["Encoded", "FileSink"]

_INLINE_WRITE = 64 << 10

Encoded = tuple[list[Envelope[Any]], list[bytes], list[tuple[Envelope[Any], str]]]
"""A chunk encoded: the items that encode, their payloads, and the others with the reason."""


def _temp_journal_path(final: str) -> str:
    directory, base = os.path.split(os.path.abspath(final))
    return os.path.join(directory, f".{base}.{uuid.uuid4().hex[:12]}.partial")


class FileSink(Stage[Any, Any]):
    """Base of the file sinks: chunked, flushed, fsynced writes; items pass through unchanged.

    Args:
        path: The output file, ``-`` for stdout, or a resumable job's
            :class:`~stages.files._records.JournalFile` (``journal.output``): the sink appends to
            it and the job publishes.
        fsync_every: Fsync after this many rows...
        fsync_interval: ...or this many seconds, whichever comes first (and at the end).
        name: The stage's name.
        buffer: Capacity of the sink's inbox.

    Attributes:
        written: Rows written in the last run.
    """

    format: ClassVar[str] = "file"
    streams: ClassVar[bool] = True

    def __init__(
        self,
        path: PathLike | JournalFile,
        *,
        fsync_every: int = 10_000,
        fsync_interval: float = 1.0,
        name: str | None = None,
        buffer: int = 64,
    ) -> None:
        super().__init__(name=name or f"{self.format}-sink", workers=1, buffer=buffer)
        if fsync_every < 1 or fsync_interval <= 0:
            raise ConfigError("fsync_every must be >= 1 and fsync_interval > 0")
        self.journal: JournalFile | None
        final = path.final if isinstance(path, JournalFile) else os.fspath(path)
        self.compression = None if final == "-" else compression_of(final)[1]
        if self.compression is not None:
            if not self.streams:
                raise ConfigError(
                    f"{self.format} compresses inside the file: write {compression_of(final)[0]!r}"
                )
            check_available(self.compression)
        if isinstance(path, JournalFile):
            self.journal = path
            self.path = path.final
            path.writer = self.final_writer()
        else:
            self.journal = None
            self.path = final
            if self.path == "-" and not self.streams:
                raise ConfigError(f"{self.format} output needs a file path, not '-' (stdout)")
        self.fsync_every = fsync_every
        self.fsync_interval = fsync_interval
        self.written = 0
        self._unsynced = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    @property
    def is_sink(self) -> bool:
        """File sinks are sinks: an ordered run restores order before them."""
        return True

    # -- what subclasses provide ------------------------------------------------------------

    def _reset(self) -> None:
        """Forget per-run state before a run."""

    def payload(self, env: Envelope[Any]) -> bytes:
        """Return the JSON journal payload of one item (raise to dead-letter the item)."""
        return dumps(env.value)

    def write_final(self, payloads: Payloads, dest: BinaryIO) -> None:
        """Write journal payloads to ``dest`` in the sink's format (at publish)."""
        write_jsonl(payloads, dest)

    def final_writer(self) -> PayloadWriter:
        """Return :meth:`write_final`, compressing when the path ends in ``.gz`` or ``.zst``."""
        return compressed_writer(self.write_final, self.compression)

    def stream_chunk(self, envs: Sequence[Envelope[Any]], payloads: Sequence[bytes]) -> bytes:
        """Return the bytes that stream a chunk to stdout."""
        return b"".join(p + b"\n" for p in payloads)

    # -- running ----------------------------------------------------------------------------

    def _encode(self, chunk: list[Envelope[Any]]) -> Encoded:
        good: list[Envelope[Any]] = []
        payloads: list[bytes] = []
        bad: list[tuple[Envelope[Any], str]] = []
        for env in chunk:
            try:
                payload = self.payload(env)
            except ItemError as error:
                bad.append((env, str(error)))
            except (TypeError, ValueError) as error:
                bad.append((env, f"cannot write the item to {self.path}: {error}"))
            else:
                good.append(env)
                payloads.append(payload)
        return good, payloads, bad

    async def run(self, inbox: Inbox[Any], outbox: Outbox[Any]) -> None:
        """Write every item of the inbox, then publish (a file written without a job)."""
        self.written = 0
        self._reset()
        if self.journal is None and self.path == "-":
            await self._pump(inbox, outbox, None)
            return
        journal = self.journal or JournalFile(
            _temp_journal_path(self.path), self.path, self.final_writer()
        )
        done = False
        try:
            await anyio.to_thread.run_sync(journal.open)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._syncer, journal)
                await self._pump(inbox, outbox, journal)
                tg.cancel_scope.cancel()
            await anyio.to_thread.run_sync(journal.close)
            if self.journal is None:
                try:
                    await anyio.to_thread.run_sync(journal.publish)
                except OSError as error:
                    raise FatalError(f"cannot publish {self.path!r}: {error}") from error
            done = True
        finally:
            if not done:
                if self.journal is None:
                    journal.discard()
                else:
                    journal.close()

    async def _syncer(self, journal: JournalFile) -> None:
        """Fsync what was written, ``fsync_interval`` seconds at most after it was written."""
        while True:
            await anyio.sleep(self.fsync_interval)
            if self._unsynced:
                self._unsynced = 0
                await anyio.to_thread.run_sync(journal.sync)

    async def _pump(
        self, inbox: Inbox[Any], outbox: Outbox[Any], journal: JournalFile | None
    ) -> None:
        self._unsynced = 0
        while True:
            chunk, ended = await _next_chunk(inbox)
            if not chunk:
                return
            good, payloads, bad = self._encode(chunk)
            if good:
                if journal is None:
                    data = self.stream_chunk(good, payloads)
                    await anyio.to_thread.run_sync(_write_stdout, data)
                    await checkpoint_if_cancelled()
                else:
                    await self._append(journal, good, payloads)
                self.written += len(good)
            for env, message in bad:
                await outbox.fail(env, ItemError(message))
            for env in good:
                await outbox.send(env)
            if ended:
                return

    async def _append(
        self, journal: JournalFile, good: list[Envelope[Any]], payloads: list[bytes]
    ) -> None:
        """Append a chunk's records to the journal; fsync every ``fsync_every`` rows."""
        parts = []
        for env, payload in zip(good, payloads, strict=True):
            tail = env.origin.rpartition(":")[2] if env.origin else ""  # _line(), inline
            line = int(tail) if tail.isdigit() else env.seq + 1
            parts.append(encode_record(line, env.key, payload))
        records = b"".join(parts)
        if len(records) < _INLINE_WRITE:  # to the page cache: cheaper than a thread
            journal.append(records, len(good))
        else:
            await anyio.to_thread.run_sync(journal.append, records, len(good))
            # a thread call cannot be cancelled: if the run was cancelled
            # meanwhile, stop before sending into channels being torn down
            await checkpoint_if_cancelled()
        self._unsynced += len(good)
        if self._unsynced >= self.fsync_every:
            self._unsynced = 0
            await anyio.to_thread.run_sync(journal.sync)
            await checkpoint_if_cancelled()


async def _next_chunk(inbox: Inbox[Any]) -> tuple[list[Envelope[Any]], bool]:
    """Wait for an item, then take what else is waiting (up to a chunk); say if input ended."""
    try:
        env = inbox.receive_nowait()
    except WouldBlock:
        try:
            env = await inbox.receive()
        except EndOfStream:
            return [], True
    except EndOfStream:
        return [], True
    chunk = [env]
    while len(chunk) < CHUNK_ROWS:
        try:
            chunk.append(inbox.receive_nowait())
        except WouldBlock:
            break
        except EndOfStream:
            return chunk, True
    return chunk, False


def _line(env: Envelope[Any]) -> int:
    line = line_of(env.origin)
    return env.seq + 1 if line is None else line


def _write_stdout(data: bytes) -> None:
    try:
        out = sys.stdout.buffer
        out.write(data)
        out.flush()
    except OSError as error:
        raise FatalError(f"cannot write to stdout: {error}") from error
