"""The engine under every frame function: rows in bounded chunks, answers back in row order.

A :class:`Reader` hands over the input a chunk at a time (a slice of a DataFrame, a record
batch). :class:`FrameJob` numbers the rows, sends them through the job's
:class:`~stages.LLMCaller`, and gives each chunk back, in input order, once every one of its
rows has an answer or an error: the channel ``open()`` yields. At most ``window`` rows are read
ahead of the oldest unanswered one, so memory stays flat whatever the input's size; a row that
fails, or that a stop (a budget) leaves unsent, ends with a null answer and its error, never
missing. With a checkpoint, answered rows are journaled as they come and a later run takes them
from the journal instead of sending them again.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline._compat import BaseExceptionGroup
from pipeline._envelope import Envelope, Failed
from pipeline._errors import PipelineError
from pipeline._json import dumps
from pipeline._runner import unwrap_group
from pipeline._stage import Inbox, Outbox, Pipeline, Source
from pipeline.frames._checkpoint import MISSING, Checkpoint
from pipeline.frames._options import Plan
from pipeline.jobs import JobProgress, build_caller, preflight, release_caller, setup_failure
from stages.files import dead_letter_record

if TYPE_CHECKING:
    from stages.llm import LLMCaller

log = logging.getLogger("pipeline.frames")

ProgressHook = Callable[[JobProgress], Any]

_FLUSH_ROWS = 256
_FLUSH_EVERY_S = 0.2
_SYNC_EVERY_S = 2.0
_RENDER_ERRORS = (KeyError, IndexError, AttributeError, ValueError, TypeError)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class RowFailedError(PipelineError):
    """A row failed and the job was asked to raise (``on_error="raise"``).

    Attributes:
        position: The row's position in the input (0-based).
        error_type: The class name of the row's error.
        status: The HTTP status of the last attempt, when a server answered.
    """

    def __init__(
        self, message: str, *, position: int, error_type: str, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.position = position
        self.error_type = error_type
        self.status = status


class Reader(Protocol):
    """The input of a frame job, a chunk at a time.

    Attributes:
        total: The number of rows, when known without reading them.
        blocking: Whether :meth:`read` may block (file scans): it then runs in a thread.
    """

    total: int | None
    blocking: bool

    def read(self) -> tuple[Any, list[dict[str, Any]]] | None:
        """Return the next chunk (the batch to add columns to, its rows' request fields)."""

    def close(self) -> None:
        """Release the input (stop a scan)."""


@dataclasses.dataclass(eq=False)
class Chunk:
    """Consecutive input rows and, once done, their answers and errors.

    Attributes:
        start: Position of the first row in the input.
        rows: Each row's request fields.
        payload: What the reader gave with the rows (the batch to add columns to).
        answers: Each row's answer (text, parsed JSON, vector), ``None`` when it failed.
        errors: Why each row failed, ``None`` when it was answered.
        digests: Each row's request digest (with a checkpoint).
        next: Rows handed to the caller or settled so far.
        remaining: Rows without an answer or an error yet.
    """

    start: int
    rows: list[dict[str, Any]]
    payload: Any
    answers: list[Any]
    errors: list[str | None]
    digests: list[str] | None = None
    next: int = 0
    remaining: int = 0

    @property
    def size(self) -> int:
        """The number of rows."""
        return len(self.rows)


def failure_text(failed: Failed) -> str:
    """Return the error column's text for a failed row: ``Type (HTTP status): message``."""
    status = f" (HTTP {failed.status})" if failed.status is not None else ""
    return f"{failed.error_type}{status}: {failed.message}"


def _answer_of(value: Any) -> Any:
    """Return the JSON-ready answer of a caller's Completion (text, parsed JSON, vector)."""
    if value.embedding is not None:
        return value.embedding
    parsed = value.parsed
    if parsed is None:
        return value.text
    dump = getattr(parsed, "model_dump", None)
    return dump(mode="json") if dump is not None else parsed


class _Source(Source[Any]):
    """Reads chunks, numbers their rows, and emits the ones that need a request."""

    def __init__(self, job: FrameJob) -> None:
        super().__init__(name="frame", buffer=16)
        self.job = job

    def total(self) -> int | None:
        return self.job.reader.total

    async def run(self, inbox: Inbox[None], outbox: Outbox[Any]) -> None:
        job = self.job
        plan = job.plan
        checkpoint = job.checkpoint
        while True:
            await job.wait_for_room()
            chunk = await job.read_chunk()
            if chunk is None:
                return
            for i, row in enumerate(chunk.rows):
                position = chunk.start + i
                if checkpoint is not None:
                    assert chunk.digests is not None
                    digest = plan.digest(row)
                    chunk.digests.append(digest)
                    earlier = checkpoint.take(position, digest)
                    if earlier is not MISSING:
                        chunk.next = i + 1
                        job.settle(chunk, i, earlier, None)
                        job.skipped += 1
                        continue
                try:
                    record = plan.render(row)
                except _RENDER_ERRORS as error:
                    chunk.next = i + 1
                    text = f"{type(error).__name__}: cannot render the messages: {error}"
                    await job.fail_unsent(chunk, i, text)
                    continue
                await outbox.emit(record, key=position, origin=f"row {position}")
                job.in_flight.add(position)
                chunk.next = i + 1
            await job.flush()


class FrameJob:
    """One run of a frame job over a reader; see the module documentation.

    Args:
        plan: The job's plan.
        reader: The input.
        on_progress: Called with a :class:`~pipeline.jobs.JobProgress` about twice a second
            and once at the end.
        progress_interval: Seconds between progress snapshots.
    """

    def __init__(
        self,
        plan: Plan,
        reader: Reader,
        *,
        on_progress: ProgressHook | None = None,
        progress_interval: float = 0.5,
    ) -> None:
        self.plan = plan
        self.reader = reader
        self.on_progress = on_progress
        self.progress_interval = progress_interval
        self.checkpoint = (
            Checkpoint(plan.checkpoint, plan.fingerprint(), overwrite=plan.overwrite)
            if plan.checkpoint is not None
            else None
        )
        self.ok = 0
        self.failed = 0
        self.skipped = 0
        self.read_rows = 0
        self.started = time.perf_counter()
        self.stop_reason: str | None = None
        self._pending: collections.deque[Chunk] = collections.deque()
        self._starts: list[int] = []
        self._pending_rows = 0
        self.in_flight: set[int] = set()  # positions handed to the caller, not settled yet
        self._room = anyio.Event()
        self._send: MemoryObjectSendStream[Chunk] | None = None
        self._flush_lock = anyio.Lock()
        self._caller: LLMCaller | None = None
        self._results: Any = None
        self._dead_letter: Any = None
        self._exhausted = False
        self._finished = False

    # -- the run -------------------------------------------------------------------------------

    @asynccontextmanager
    async def open(self) -> AsyncIterator[MemoryObjectReceiveStream[Chunk]]:
        """Run the job; yield the channel of finished chunks, in input order.

        Leaving the block early cancels the job (a checkpoint keeps what was answered).

        Raises:
            ConfigError: Invalid settings, or a checkpoint made with other settings.
            FatalError: The server cannot be reached, rejects the key, has no quota...
            RowFailedError: A row failed with ``on_error="raise"``.
        """
        send, receive = anyio.create_memory_object_stream[Chunk](1)
        left_early = False
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._main, send)
                try:
                    with receive:
                        yield receive
                finally:
                    left_early = not self._finished
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            error = unwrap_group(group)
            if left_early and isinstance(error, anyio.BrokenResourceError):
                return  # a stage that sent as the cancelled run closed: nothing went wrong
            raise error from None

    async def _main(self, send: MemoryObjectSendStream[Chunk]) -> None:
        self._send = send
        plan = self.plan
        try:
            with send:
                caller = await anyio.to_thread.run_sync(
                    lambda: build_caller(plan.settings, schema=plan.schema)
                )
                caller.output = dataclasses.replace(caller.output, form="completion")
                self._caller = caller
                try:
                    await preflight(caller, timeout=min(10.0, plan.settings.timeout))
                    await self._prepare_files()
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._housekeeping)
                        await self._run_pipeline(caller)
                        await self._settle_the_rest()
                        tg.cancel_scope.cancel()
                    if self.on_progress is not None:
                        self.on_progress(self.progress(final=True))
                    self._finished = True
                finally:
                    await release_caller(caller)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._close_files)

    async def _run_pipeline(self, caller: LLMCaller) -> None:
        pipe = Pipeline(_Source(self), caller, dead_letter=self._on_failed, name="frame")
        async with pipe.open() as results:
            self._results = results
            async for env in results.envelopes():
                self._answered(env)
                if self._pending[0].remaining == 0:
                    await self.flush()
        report = results.report
        if report is not None and report.stopped is not None:
            self.stop_reason = report.stopped

    def _answered(self, env: Envelope[Any]) -> None:
        position = env.key
        assert isinstance(position, int)
        chunk = self._chunk_of(position)
        index = position - chunk.start
        answer = _answer_of(env.value)
        self.ok += 1
        self.settle(chunk, index, answer, None)
        checkpoint = self.checkpoint
        if checkpoint is not None:
            assert chunk.digests is not None
            checkpoint.answered(position, chunk.digests[index], answer)
            if checkpoint.buffered >= _FLUSH_ROWS:
                checkpoint.flush()

    async def _on_failed(self, failed: Failed) -> None:
        """The dead letter of the run: settle the row with its error (or raise)."""
        if self.ok == 0 and self._caller is not None and failed.stage == self._caller.name:
            fatal = setup_failure(failed)
            if fatal is not None:
                raise fatal
        position = failed.key
        assert isinstance(position, int)
        text = failure_text(failed)
        if self.plan.on_error == "raise":
            raise RowFailedError(
                f"row {position} failed in stage {failed.stage!r}: {text}",
                position=position,
                error_type=failed.error_type,
                status=failed.status,
            )
        record = dead_letter_record(failed)
        if self.checkpoint is not None:
            self.checkpoint.failed(position, record)
        self._write_dead_letter(record)
        chunk = self._chunk_of(position)
        self.failed += 1
        self.settle(chunk, position - chunk.start, None, text)
        if self._pending[0].remaining == 0:
            await self.flush()

    async def fail_unsent(self, chunk: Chunk, index: int, text: str) -> None:
        """Settle a row that is not sent (its request cannot be made, or the job stopped)."""
        position = chunk.start + index
        if self.plan.on_error == "raise":
            raise RowFailedError(f"row {position}: {text}", position=position, error_type="NotSent")
        self.failed += 1
        error = {"type": "NotSent", "message": text, "status": None, "attempts": 0}
        origin = f"row {position}"
        row = chunk.rows[index]
        self._write_dead_letter(
            {"key": position, "origin": origin, "stage": "frame", "row": row, "error": error}
        )
        self.settle(chunk, index, None, text)
        if self._pending[0].remaining == 0:
            await self.flush()

    async def _settle_the_rest(self) -> None:
        """After a stop (a budget), give every row not sent its error, reading to the end."""
        if self.stop_reason is None:
            return
        text = f"not sent: the job stopped ({self.stop_reason})"
        for position in sorted(self.in_flight):  # read, but the caller left them unsent
            chunk = self._chunk_of(position)
            await self.fail_unsent(chunk, position - chunk.start, text)
        for chunk in list(self._pending):
            for index in range(chunk.next, chunk.size):
                chunk.next = index + 1
                await self.fail_unsent(chunk, index, text)
        while True:
            await self.wait_for_room()
            unsent = await self.read_chunk()
            if unsent is None:
                return
            for index in range(unsent.size):
                unsent.next = index + 1
                await self.fail_unsent(unsent, index, text)

    # -- chunks --------------------------------------------------------------------------------

    async def wait_for_room(self) -> None:
        """Wait until fewer than ``window`` rows are read ahead of the oldest unanswered row."""
        while self._pending_rows >= self.plan.window:
            self._room = anyio.Event()
            await self._room.wait()

    async def read_chunk(self) -> Chunk | None:
        """Read and register the next chunk (``None`` at the end of the input).

        The read is shielded from cancellation: a chunk read is always registered, so a stop
        never loses rows that were read.
        """
        if self._exhausted:
            return None
        with anyio.CancelScope(shield=True):
            if self.reader.blocking:
                item = await anyio.to_thread.run_sync(self.reader.read)
            else:
                item = self.reader.read()
        if item is None:
            self._exhausted = True
            return None
        payload, rows = item
        try:
            # a cancellation that arrived during the shielded read lands here, before the rows
            # are sent on to stages that may already have closed (the chunk is registered below)
            await anyio.lowlevel.checkpoint_if_cancelled()
        finally:
            self._register(payload, rows)
        return self._pending[-1]

    def _register(self, payload: Any, rows: list[dict[str, Any]]) -> None:
        size = len(rows)
        chunk = Chunk(
            start=self.read_rows,
            rows=rows,
            payload=payload,
            answers=[None] * size,
            errors=[None] * size,
            digests=[] if self.checkpoint is not None else None,
            remaining=size,
        )
        self.read_rows += size
        self._pending.append(chunk)
        self._starts.append(chunk.start)
        self._pending_rows += size

    def _chunk_of(self, position: int) -> Chunk:
        return self._pending[bisect.bisect_right(self._starts, position) - 1]

    def settle(self, chunk: Chunk, index: int, answer: Any, error: str | None) -> None:
        """Record one row's answer or error."""
        chunk.answers[index] = answer
        chunk.errors[index] = error
        chunk.remaining -= 1
        self.in_flight.discard(chunk.start + index)

    async def flush(self) -> None:
        """Hand every finished chunk at the head of the queue to the consumer, in order."""
        async with self._flush_lock:
            pending = self._pending
            while pending and pending[0].remaining == 0 and pending[0].next == pending[0].size:
                chunk = pending.popleft()
                self._starts.pop(0)
                self._pending_rows -= chunk.size
                self._room.set()
                chunk.rows = []
                assert self._send is not None
                await self._send.send(chunk)

    # -- files and progress --------------------------------------------------------------------

    async def _prepare_files(self) -> None:
        checkpoint = self.checkpoint
        if checkpoint is not None:
            await anyio.to_thread.run_sync(checkpoint.open)
            if checkpoint.previous:
                log.info(
                    "checkpoint %s: %d rows answered earlier", checkpoint, len(checkpoint.previous)
                )
        path = self.plan.dead_letter
        if path is not None:  # a dead-letter file holds this run's failures only
            await anyio.to_thread.run_sync(_remove, path)

    def _write_dead_letter(self, record: Mapping[str, Any]) -> None:
        path = self.plan.dead_letter
        if path is None:
            return
        if self._dead_letter is None:
            self._dead_letter = open(path, "wb")  # noqa: SIM115 - closed by _close_files
        self._dead_letter.write(dumps(record) + b"\n")

    def _close_files(self) -> None:
        try:
            if self.checkpoint is not None:
                self.checkpoint.close()
        finally:
            if self._dead_letter is not None:
                self._dead_letter.close()
            self.reader.close()

    async def _housekeeping(self) -> None:
        """Flush the checkpoint now and then, fsync it less often, and report progress."""
        last_sync = last_progress = time.perf_counter()
        while True:
            await anyio.sleep(_FLUSH_EVERY_S)
            now = time.perf_counter()
            checkpoint = self.checkpoint
            if checkpoint is not None:
                checkpoint.flush()
                if now - last_sync >= _SYNC_EVERY_S:
                    last_sync = now
                    await anyio.to_thread.run_sync(checkpoint.sync)
            if self.on_progress is not None and now - last_progress >= self.progress_interval:
                last_progress = now
                self.on_progress(self.progress())

    def progress(self, *, final: bool = False) -> JobProgress:
        """Return a snapshot of the run, in the file jobs' terms."""
        requests = retries = prompt = completion = 0
        cost = 0.0
        caller = self._caller
        if self._results is not None and caller is not None:
            for stats in self._results.stats:
                if stats.name == caller.name:
                    requests += stats.requests
                    retries += stats.retries
                    prompt += stats.prompt_tokens
                    completion += stats.completion_tokens
                    cost += stats.cost_usd
        elapsed = time.perf_counter() - self.started
        done = self.ok + self.failed
        rate = done / elapsed if elapsed > 0 else 0.0
        total = self.reader.total
        eta = None
        if total is not None and rate > 0:
            eta = max(total - done - self.skipped, 0) / rate
        return JobProgress(
            rows_total=total,
            rows_done=done + self.skipped,
            ok=self.ok,
            failed=self.failed,
            skipped=self.skipped,
            requests=requests,
            retries=retries,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_usd=cost,
            elapsed_s=elapsed,
            rows_per_s=rate,
            tokens_per_s=(prompt + completion) / elapsed if elapsed > 0 else 0.0,
            eta_s=eta,
            stopping=self.stop_reason,
            final=final,
        )


__all__ = ["Chunk", "FrameJob", "Reader", "RowFailedError", "failure_text"]
