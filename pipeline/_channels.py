"""The channel ends a stage works with: its inbox, its outbox, and what one run shares.

A stage owns both ends of its channels for the length of a run. The inbox and outbox take the
non-blocking path of anyio's memory streams whenever they can and fall back to waiting only when
the buffer is empty or full, which makes a hop cost a fraction of a microsecond instead of two
event-loop turns; every few hundred items they still checkpoint, so a busy stage never starves
the loop or delays cancellation. Both are context managers: a worker runs under
``with inbox, outbox:`` so that its ends close when it is done and the next stage ends by itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import anyio
from anyio import EndOfStream, WouldBlock
from anyio.lowlevel import cancel_shielded_checkpoint
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._envelope import Envelope, Failed
from ._errors import ConfigError, NotStartedError
from ._tracing import Tracing, span_context_of

T = TypeVar("T")

_CHECKPOINT_EVERY = 256
_perf = time.perf_counter


class StageLike(Protocol):
    """What the channels and the runner need of a stage (:class:`pipeline.Stage` has it all)."""

    name: str
    workers: int
    buffer: int
    log: logging.LoggerAdapter[logging.Logger]

    @property
    def is_source(self) -> bool:
        """Whether the stage produces items without an inbox."""

    @property
    def is_sink(self) -> bool:
        """Whether the stage is a sink."""

    def lifespan(self) -> AbstractAsyncContextManager[None]:
        """Open what all workers share for one run."""

    async def run(self, inbox: Inbox[Any], outbox: Outbox[Any]) -> None:
        """Consume ``inbox`` until it ends, sending results to ``outbox``."""

    def should_dead_letter(self, error: Exception) -> bool:
        """Return whether an exception raised for one item goes to the dead letter."""


@dataclasses.dataclass(slots=True)
class StageStats:
    """Counters for one stage in one run (all workers together).

    Attributes:
        name: The stage's name.
        workers: How many copies of the stage ran.
        received: Items taken from the inbox (a batch counts its members).
        emitted: Items sent to the outbox.
        failed: Items sent to the dead letter.
        dropped: Items deliberately discarded (a filter saying no).
        created: Extra items made from one input (``flat_map``); negative never.
        busy_s: Seconds spent handling items, summed over workers (blocked time excluded).
        blocked_s: Seconds spent waiting for room in a full outbox (backpressure).
        retries: Retries made by the stage (callers count these).
        requests: Requests sent to a server (callers count these).
        prompt_tokens: Prompt tokens reported by the server (callers).
        completion_tokens: Completion tokens reported by the server (callers).
        cost_usd: Cost of those tokens per the caller's price table.
        limiter_wait_s: Seconds items waited for rate limits and concurrency slots (callers).
    """

    name: str
    workers: int = 1
    received: int = 0
    emitted: int = 0
    failed: int = 0
    dropped: int = 0
    created: int = 0
    busy_s: float = 0.0
    blocked_s: float = 0.0
    retries: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    limiter_wait_s: float = 0.0

    def balanced(self) -> bool:
        """Return whether every item received is accounted for."""
        return self.received + self.created == self.emitted + self.failed + self.dropped


class Ledger:
    """Run-wide accounting of every item that enters and leaves, and the reorder wake-ups.

    Args:
        ordered: Whether the run restores input order (then it tracks each item's live copies).
        reorder_at: Index of the first stage at or after the reorder point.
    """

    __slots__ = ("entered", "live", "notify", "ok", "reorder_at")

    def __init__(self, ordered: bool, reorder_at: int) -> None:
        self.entered = 0
        self.ok = 0
        # seq -> envelopes still upstream of the reorder point (ordered runs only)
        self.live: dict[int, int] | None = {} if ordered else None
        self.reorder_at = reorder_at
        self.notify: Callable[[], None] | None = None

    def enter(self, seq: int) -> None:
        """Register a new input item."""
        self.entered += 1
        if self.live is not None:
            self.live[seq] = 1

    def grow(self, seq: int, n: int, index: int) -> None:
        """Record that item ``seq`` turned into ``n`` more items at stage ``index``."""
        if self.live is not None and index < self.reorder_at:
            self.live[seq] += n

    def leave(self, seq: int, index: int, *, wake: bool = True) -> None:
        """Record that one copy of item ``seq`` left the run at stage ``index``."""
        live = self.live
        if live is not None and index < self.reorder_at:
            left = live[seq] - 1
            if left:
                live[seq] = left
            else:
                del live[seq]
                if wake and self.notify is not None:
                    self.notify()


class RunState:
    """What all stages of one run share: ledger, tracing, dead letter, logging."""

    def __init__(
        self,
        name: str,
        dead_letter: MemoryObjectSendStream[Envelope[Failed]],
        ledger: Ledger,
        tracing: Tracing,
        redact: Callable[[str], str],
    ) -> None:
        self.name = name
        self.dead_letter = dead_letter
        self.ledger = ledger
        self.tracing = tracing
        self.redact = redact
        self.next_seq = 0
        self.stop_reason: str | None = None
        self.on_stop: Callable[[], None] | None = None
        self.admit: Callable[[], Awaitable[None]] | None = None
        self.source_busy = False
        self.crashed = False
        self.stop_waits: set[anyio.CancelScope] = set()
        self.not_started: list[Envelope[Any]] = []

    def request_stop(self, reason: str) -> None:
        """Stop reading input and end the waits of unstarted items. The first reason wins."""
        if self.stop_reason is None:
            self.stop_reason = reason
            if self.on_stop is not None:
                self.on_stop()
            for scope in self.stop_waits:
                scope.cancel()


class SourceStopped(BaseException):
    """Raised in a source by ``emit`` once the run was asked to stop reading input.

    It derives from :class:`BaseException` so that a source's ``except Exception`` cannot keep
    it reading; the runtime catches it around the source and ends the source normally.
    """


E = TypeVar("E", bound="_End")


class _End:
    """What both ends share: ``with inbox, outbox:`` closes them when the block is left."""

    __slots__ = ()

    def close(self) -> None:
        """Close this end."""
        raise NotImplementedError

    def __enter__(self: E) -> E:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Inbox(_End, Generic[T]):
    """The receiving end of a stage: an async iterator of envelopes."""

    __slots__ = ("_stats", "_stream", "_tick")

    def __init__(self, stream: MemoryObjectReceiveStream[Envelope[T]], stats: StageStats) -> None:
        self._stream = stream
        self._stats = stats
        self._tick = 0

    def __aiter__(self) -> Inbox[T]:
        return self

    async def __anext__(self) -> Envelope[T]:
        try:
            return await self.receive()
        except EndOfStream:
            raise StopAsyncIteration from None

    async def receive(self) -> Envelope[T]:
        """Return the next envelope; raise :class:`anyio.EndOfStream` when upstream is done.

        Safe to cancel (``move_on_after``): a cancelled receive loses no item.
        """
        try:
            env = self._stream.receive_nowait()
        except WouldBlock:
            env = await self._stream.receive()
        else:
            self._tick += 1
            if self._tick >= _CHECKPOINT_EVERY:
                self._tick = 0
                # shielded: a cancelled receive must not lose the item it already took
                await cancel_shielded_checkpoint()
        self._stats.received += 1 if env.members is None else len(env.members)
        return env

    def receive_nowait(self) -> Envelope[T]:
        """Return an envelope already waiting, or raise :class:`anyio.WouldBlock`."""
        env = self._stream.receive_nowait()
        self._stats.received += env.count
        return env

    def depth(self) -> int:
        """Return how many envelopes wait in the inbox."""
        return self._stream.statistics().current_buffer_used

    def close(self) -> None:
        """Close this end; upstream sees :class:`anyio.BrokenResourceError` once all are closed."""
        self._stream.close()


class Outbox(_End, Generic[T]):
    """The sending end of a stage, and its handle on the run (dead letter, spans, logging).

    Attributes:
        stats: The stage's counters (shared by its workers).
        stage: The stage this end belongs to.
        log: The stage's logger.
    """

    __slots__ = ("_index", "_run", "_stream", "blocked_s", "log", "stage", "stats")

    def __init__(
        self,
        stream: MemoryObjectSendStream[Envelope[T]] | None,
        stats: StageStats,
        run: RunState,
        index: int,
        stage: StageLike,
    ) -> None:
        self._stream = stream
        self.stats = stats
        self._run = run
        self._index = index
        self.stage = stage
        self.log = stage.log
        self.blocked_s = 0.0  # this worker's share of stats.blocked_s

    @property
    def tracing_enabled(self) -> bool:
        """Whether this run records a span per item (a stage can skip span bookkeeping if not)."""
        return self._run.tracing.enabled

    def close(self) -> None:
        """Close this end; the next stage ends by itself once every clone is closed."""
        if self._stream is not None:
            self._stream.close()

    async def send(self, env: Envelope[T]) -> None:
        """Send an envelope downstream, waiting while the next stage's inbox is full."""
        stream = self._stream
        if stream is None:
            raise ConfigError(f"stage {self.stage.name!r} is last and has no outbox")
        try:
            stream.send_nowait(env)
        except WouldBlock:
            started = _perf()
            await stream.send(env)
            waited = _perf() - started
            self.blocked_s += waited
            self.stats.blocked_s += waited
        self.stats.emitted += 1 if env.members is None else len(env.members)

    async def emit(
        self, value: T, *, key: Hashable | None = None, origin: str | None = None
    ) -> Envelope[T]:
        """Create the envelope of a new input item (sources only) and send it."""
        run = self._run
        if run.stop_reason is None and run.admit is None:  # what _enter() does, one call less
            env = self.new(value, key=key, origin=origin)
        else:
            env = await self._enter(value, key, origin)
        # Once entered, an item is delivered: a stop never cancels a source mid-send (a cancelled
        # send cannot tell whether the receiver already took the item).
        run.source_busy = True
        try:
            await self.send(env)
        finally:
            run.source_busy = False
        return env

    async def _enter(self, value: T, key: Hashable | None, origin: str | None) -> Envelope[T]:
        """Admit a new input item unless the run is stopping; return its envelope, unsent."""
        run = self._run
        if run.stop_reason is not None:
            raise SourceStopped(run.stop_reason)
        if run.admit is not None:
            await run.admit()
        return self.new(value, key=key, origin=origin)

    def new(
        self, value: T, *, key: Hashable | None = None, origin: str | None = None
    ) -> Envelope[T]:
        """Register a new input item (sources only) and return its envelope, unsent."""
        self.stats.received += 1
        run = self._run
        seq = run.next_seq
        run.next_seq = seq + 1
        run.ledger.enter(seq)
        context = (
            run.tracing.item_root(self.stage.name, seq, origin) if run.tracing.enabled else None
        )
        return Envelope(value, seq, seq if key is None else key, origin, context)

    async def reject(
        self,
        value: Any,
        error: BaseException | str,
        *,
        key: Hashable | None = None,
        origin: str | None = None,
    ) -> None:
        """Register a new input item that is already bad (a source's unparsable line)."""
        env = await self._enter(value, key, origin)
        run = self._run
        run.source_busy = True
        try:
            await self.fail(env, error)
        finally:
            run.source_busy = False

    async def fail(
        self,
        env: Envelope[Any],
        error: BaseException | str,
        *,
        attempts: int | None = None,
        status: int | None = None,
    ) -> None:
        """Send every item of ``env`` to the dead letter as a :class:`Failed` record."""
        redact = self._run.redact
        if isinstance(error, BaseException):
            error_type = type(error).__name__
            message = redact(str(error)) or error_type
            attempts = attempts if attempts is not None else getattr(error, "attempts", None)
            status = status if status is not None else getattr(error, "status", None)
        else:
            error_type, message = "Error", redact(error)
        members = env.members if env.members is not None else (env,)
        for member in members:
            failed = Failed(
                item=member.value,
                stage=self.stage.name,
                error_type=error_type,
                message=message,
                attempts=attempts or max(member.attempts, 1),
                seq=member.seq,
                key=member.key,
                origin=member.origin,
                status=status if isinstance(status, int) else None,
            )
            self.stats.failed += 1
            self._run.ledger.leave(member.seq, self._index)
            await self._run.dead_letter.send(member.replace(failed))

    def drop(self, env: Envelope[Any]) -> None:
        """Discard ``env`` on purpose (a filter); it counts as dropped, not lost."""
        members = env.members if env.members is not None else (env,)
        for member in members:
            self.stats.dropped += 1
            self._run.ledger.leave(member.seq, self._index)

    def grow(self, env: Envelope[Any], extra: int) -> None:
        """Declare that ``env`` turned into ``1 + extra`` items (``flat_map``)."""
        self.stats.created += extra
        self._run.ledger.grow(env.seq, extra, self._index)

    def span(
        self, env: Envelope[Any], *, links: Sequence[Envelope[Any]] = ()
    ) -> AbstractContextManager[Any]:
        """Return a context manager that spans this stage's work on ``env``.

        For a batch, pass its members as ``links`` so the batch span links each item's trace.
        """
        tracing = self._run.tracing
        if not tracing.enabled:
            return tracing.span(self.stage.name, None, env.seq)
        link_ctx = [span_context_of(m.context) for m in links if m.context is not None]
        return tracing.span(self.stage.name, env.context, env.seq, link_ctx)

    def request_stop(self, reason: str) -> None:
        """Ask the run to stop reading input (a budget reached); in-flight items finish."""
        self._run.request_stop(reason)

    @property
    def stopping(self) -> bool:
        """Whether the run was asked to stop reading input."""
        return self._run.stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        """Why the run was asked to stop, if it was (the first reason given)."""
        return self._run.stop_reason

    def drop_not_started(self, env: Envelope[Any]) -> None:
        """Drop an item the run stopped before its work began (no request was sent for it).

        It is listed in :attr:`~pipeline.Results.not_started`: a resumed job reads it again, a
        DataFrame gives it its error.
        """
        self.drop(env)
        members = env.members if env.members is not None else (env,)
        self._run.not_started.extend(members)

    @contextlib.contextmanager
    def unless_stopped(self) -> Iterator[None]:
        """Run a wait that a stop ends: a stop (now or during it) raises NotStartedError.

        For what an item waits for before its work begins (a rate limiter, a retry's
        back-off): once the run is asked to stop, no new work starts and the item is dropped
        (:meth:`handle_error` drops a :class:`~pipeline.NotStartedError`).

        Raises:
            NotStartedError: The run was asked to stop before or during the wait.
        """
        run = self._run
        if run.stop_reason is not None:
            raise NotStartedError(f"not started: the run is stopping ({run.stop_reason})")
        with anyio.CancelScope() as scope:
            run.stop_waits.add(scope)
            try:
                yield
            finally:
                run.stop_waits.discard(scope)
        if scope.cancelled_caught:
            raise NotStartedError(f"not started: the run is stopping ({run.stop_reason})")

    async def handle_error(self, env: Envelope[Any], error: Exception) -> None:
        """Drop, dead-letter or re-raise ``error`` as fatal, per the stage's ``on_error``.

        A :class:`~pipeline.NotStartedError` drops the item: the run stopped before its work
        began, so it has neither an answer nor a failure.
        """
        if isinstance(error, NotStartedError):
            self.drop_not_started(env)
            return
        if self.stage.should_dead_letter(error):
            await self.fail(env, error)
            return
        attach(error, self.stage.name, env)
        raise error


def attach(error: BaseException, stage: str, env: Envelope[Any]) -> None:
    """Attach the stage name and item number to an exception that stops the run.

    Args:
        error: The exception on its way out of the stage.
        stage: The stage's name.
        env: The item the stage was handling.
    """
    if getattr(error, "pipeline_stage", None) is not None:
        return
    error.pipeline_stage = stage  # type: ignore[attr-defined]
    error.pipeline_item = env.seq  # type: ignore[attr-defined]
    where = f" ({env.origin})" if env.origin else ""
    note = f"in stage {stage!r}, item #{env.seq}{where}"
    if hasattr(error, "add_note"):
        error.add_note(note)
