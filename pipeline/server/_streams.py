"""What the server streams: a job's rows and dead letters as NDJSON, its progress as SSE.

Results are streamed by tailing the journal through an open file descriptor, so a client that
connects early gets rows as they are committed, and the descriptor keeps reading the journal
even after the job publishes and removes it; a client that connects after the end reads the
published file.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio

from pipeline.server._job import FAILED, PARTIAL, Job
from pipeline.server._settings import OUTPUT
from stages.files._records import record_payload

__all__ = ["job_events", "tail_rows"]

_READ = 1 << 20


async def tail_rows(job: Job, kind: str, *, poll: float = 1.0) -> AsyncIterator[bytes]:
    """Yield a job's output rows (``kind="results"``) or dead letters (``"failed"``) as NDJSON.

    While the job runs, its journal is read through an open descriptor from the last complete
    record on, waking at every progress snapshot (or every ``poll`` seconds); the descriptor
    still reads the journal after the job publishes and unlinks it. After the job ended the
    published file is read. Each yielded chunk holds whole lines.
    """
    final = job.dir / (OUTPUT if kind == "results" else FAILED)
    partial = Path(str(final) + PARTIAL)
    while True:
        ended = job.terminal
        changed = job.changed
        fd = _open_or_none(partial)
        if fd is not None:
            async with aclosing(_follow_journal(job, fd, poll)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        fd = _open_or_none(final)
        if fd is not None:
            async with aclosing(_read_plain(fd)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        if ended:
            return
        with anyio.move_on_after(poll):
            await changed.wait()


async def _follow_journal(job: Job, fd: int, poll: float) -> AsyncGenerator[bytes, None]:
    """Yield the payloads of a journal's complete records as they come, closing ``fd``."""
    try:
        position = 0
        while True:
            ended = job.terminal
            changed = job.changed
            while True:
                data = await anyio.to_thread.run_sync(os.pread, fd, _READ, position)
                cut = data.rfind(b"\n")
                if cut < 0:
                    break
                position += cut + 1
                out = _payloads(data[: cut + 1])
                if out:
                    yield out
            if ended:
                return
            with anyio.move_on_after(poll):
                await changed.wait()
    finally:
        os.close(fd)


def _open_or_none(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None


async def _read_plain(fd: int) -> AsyncGenerator[bytes, None]:
    """Yield a published file's bytes (NDJSON already), closing ``fd`` at the end."""
    try:
        position = 0
        while True:
            data = await anyio.to_thread.run_sync(os.pread, fd, _READ, position)
            if not data:
                return
            position += len(data)
            yield data
    finally:
        os.close(fd)


def _payloads(records: bytes) -> bytes:
    """Turn complete journal records into NDJSON lines (a damaged record is left out)."""
    out = io.BytesIO()
    for record in records.splitlines(keepends=True):
        payload = record_payload(record)
        if payload is not None and payload.strip():
            out.write(payload)
    return out.getvalue()


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def job_events(job: Job, *, keep_alive: float = 15.0) -> AsyncIterator[bytes]:
    """Yield a job's progress as Server-Sent Events: ``progress`` on change, then ``end``.

    A comment line is sent after ``keep_alive`` seconds without news, so proxies keep the
    connection open.
    """
    last: Any = None
    while True:
        ended = job.terminal and job.done.is_set()
        changed = job.changed
        snapshot = {"status": job.status, "counters": job.counters()}
        if snapshot != last:
            yield _sse("progress", snapshot)
            last = snapshot
        if ended:
            yield _sse("end", job.public())
            return
        with anyio.move_on_after(keep_alive):
            await changed.wait()
        if not changed.is_set():
            yield b": keep-alive\n\n"
