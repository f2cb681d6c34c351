"""The frame functions: :func:`enrich` (blocking), :func:`aenrich` and :func:`astream` (async).

The blocking function runs the job on its own event loop in a worker thread (an anyio blocking
portal) and waits for it. That is why it works the same in a script and in a Jupyter cell,
where an event loop is already running in the calling thread, with no ``nest_asyncio``; and why
Ctrl-C (or "interrupt kernel") stops it cleanly: the interrupt reaches the waiting thread, the
job is cancelled on its loop, its checkpoint is closed, and ``KeyboardInterrupt`` is raised.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.from_thread
from anyio.streams.memory import MemoryObjectReceiveStream

from pipeline._errors import ConfigError
from pipeline.frames._engine import Chunk, FrameJob
from pipeline.frames._options import Plan, make_plan
from pipeline.frames._progress import progress_hook
from pipeline.frames._tables import ArrowTable, LazyPolarsTable, Table, table_of

if TYPE_CHECKING:
    from typing import Unpack

    from pipeline.frames._options import EnrichOptions

T = TypeVar("T")


def _backend() -> dict[str, Any]:
    uvloop = importlib.util.find_spec("uvloop") is not None
    return {"backend": "asyncio", "backend_options": {"use_uvloop": uvloop}}


def run_blocking(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn()`` on a fresh event loop in a worker thread and return its result.

    Works whether or not an event loop runs in the calling thread (Jupyter). Ctrl-C while
    waiting cancels ``fn`` on its loop, waits for it to unwind, and raises
    ``KeyboardInterrupt``.
    """
    with anyio.from_thread.start_blocking_portal(**_backend()) as portal:
        return portal.start_task_soon(fn).result()


def _job(table: Table, plan: Plan, *, stream: bool) -> FrameJob:
    label = "rows"
    return FrameJob(
        plan, table.reader(plan, stream=stream), on_progress=progress_hook(plan.progress, label)
    )


async def _collect(table: Table, plan: Plan) -> Any:
    chunks: list[Chunk] = []
    async with _job(table, plan, stream=False).open() as finished:
        async for chunk in finished:
            chunks.append(chunk)
    return table.collect(plan, chunks)


def _iterate(table: Table, plan: Plan) -> Iterator[Any]:
    """Yield the enriched batches of a streaming input, running the job in a worker thread."""
    with anyio.from_thread.start_blocking_portal(**_backend()) as portal:
        manager = portal.wrap_async_context_manager(_job(table, plan, stream=True).open())
        finished = manager.__enter__()
        try:
            while True:
                try:
                    chunk = portal.call(finished.receive)
                except anyio.EndOfStream:
                    break
                yield table.attach(plan, chunk)
        except BaseException:
            # leave the job without handing it the exception: it cancels itself and unwinds,
            # and the exception (Ctrl-C, the consumer stopping) goes on unwrapped
            manager.__exit__(None, None, None)
            raise
        manager.__exit__(None, None, None)


def enrich(data: Any, /, **options: Unpack[EnrichOptions]) -> Any:
    """Add LLM answers to a table, one request per row; blocking (works in Jupyter too).

    Args:
        data: A pandas or Polars DataFrame, a Polars LazyFrame, a ``pyarrow.Table``, a
            ``RecordBatchReader`` or an iterable of ``RecordBatch``.
        **options: See :class:`~pipeline.frames.EnrichOptions`: ``model`` and ``prompt`` (a
            template over the columns) at least.

    Returns:
        For a pandas or Polars DataFrame, the same frame (rows, order and index kept) with the
        answer columns and the error column added. For Arrow input, a ``RecordBatchReader``
        of the enriched batches, computed as they are read. For a LazyFrame, an iterator of
        enriched Polars DataFrames, scanned and computed in bounded batches.

    Raises:
        ConfigError: An invalid option, a template naming a missing column, a checkpoint
            made with other settings.
        FatalError: The server cannot be reached, rejects the key, has no quota...
        RowFailedError: A row failed and ``on_error="raise"``.
        KeyboardInterrupt: Interrupted; with a checkpoint, the answered rows are kept.
    """
    table = table_of(data)
    plan = make_plan(options, table.columns)
    if isinstance(table, ArrowTable):
        import pyarrow as pa

        return pa.RecordBatchReader.from_batches(table.output_schema(plan), _iterate(table, plan))
    if isinstance(table, LazyPolarsTable):
        return _iterate(table, plan)
    return run_blocking(lambda: _collect(table, plan))


async def aenrich(data: Any, /, **options: Unpack[EnrichOptions]) -> Any:
    """Add LLM answers to an in-memory table, one request per row (async).

    Args:
        data: A pandas or Polars DataFrame, or a ``pyarrow.Table``. Streams (a LazyFrame, a
            ``RecordBatchReader``, batch iterators) go through :func:`astream`.
        **options: See :class:`~pipeline.frames.EnrichOptions`.

    Returns:
        The same kind of table with the answer columns and the error column added.

    Raises:
        ConfigError: As :func:`enrich`, and for streaming inputs.
        FatalError: As :func:`enrich`.
        RowFailedError: A row failed and ``on_error="raise"``.
    """
    table = table_of(data)
    if isinstance(table, LazyPolarsTable) or (
        isinstance(table, ArrowTable) and table.total is None
    ):
        raise ConfigError(
            "aenrich() returns a whole table: stream a LazyFrame, RecordBatchReader or batch"
            " iterator with `async with astream(data, ...) as batches` instead"
        )
    plan = make_plan(options, table.columns)
    if isinstance(table, ArrowTable):
        import pyarrow as pa

        batches = []
        async with _job(table, plan, stream=True).open() as finished:
            async for chunk in finished:
                batches.append(table.attach(plan, chunk))
        return pa.Table.from_batches(batches, schema=table.output_schema(plan))
    return await _collect(table, plan)


class _Batches:
    """The enriched batches of :func:`astream`, as an async iterator."""

    def __init__(self, table: Table, plan: Plan, chunks: MemoryObjectReceiveStream[Chunk]) -> None:
        self._table = table
        self._plan = plan
        self._chunks = chunks

    def __aiter__(self) -> _Batches:
        return self

    async def __anext__(self) -> Any:
        try:
            chunk = await self._chunks.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None
        return self._table.attach(self._plan, chunk)


@asynccontextmanager
async def astream(data: Any, /, **options: Unpack[EnrichOptions]) -> AsyncIterator[_Batches]:
    """Enrich any table in bounded batches, yielding each enriched batch in input order.

    Use it as ``async with astream(lazy_frame, model=..., prompt=...) as batches:``, then
    ``async for batch in batches``. Memory stays flat: at most ``window`` rows are in flight.
    Leaving the block early cancels the job.

    Args:
        data: Anything :func:`enrich` takes.
        **options: See :class:`~pipeline.frames.EnrichOptions`.

    Yields:
        An async iterator of enriched batches: ``RecordBatch`` for Arrow input, Polars
        DataFrames for Polars input, pandas DataFrame slices for pandas input.
    """
    table = table_of(data)
    plan = make_plan(options, table.columns)
    async with _job(table, plan, stream=True).open() as finished:
        yield _Batches(table, plan, finished)
