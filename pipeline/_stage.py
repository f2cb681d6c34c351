"""Declare a pipeline: the stage contract, and stages chained into a :class:`Pipeline`.

A stage reads envelopes from its inbox and writes them to its outbox (see ``_channels``). Its
``run`` method iterates the inbox until upstream closes, then returns; the runtime then closes
its outbox so the next stage ends by itself. ``workers=N`` starts N copies of ``run`` sharing
one inbox. Stages compose with ``|`` into a :class:`Pipeline`, a declaration that the runner
(``_runner``) executes when it is opened.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from ._channels import Inbox as Inbox
from ._channels import Outbox as Outbox
from ._channels import StageStats as StageStats
from ._envelope import Envelope, Failed
from ._errors import ConfigError, FatalError, ItemError
from ._report import RunReport
from ._runner import Results, RunConfig, open_run

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

In = TypeVar("In")
Out = TypeVar("Out")

OnError = Literal["dead_letter", "fatal"] | Callable[[Exception], bool]
"""How a stage treats an exception raised for one item.

``"dead_letter"`` (the default) records the item as :class:`Failed` and goes on; ``"fatal"``
stops the pipeline; a callable returns ``True`` to dead-letter that exception, ``False`` to stop.
:class:`ItemError` is always dead-lettered and :class:`FatalError` always stops the run.
"""

_perf = time.perf_counter


class Stage(Generic[In, Out]):
    """Base class of every stage.

    Subclasses override :meth:`run` to consume the inbox and feed the outbox, or derive from
    :class:`ItemStage` and override :meth:`ItemStage.process` for one-item-at-a-time work.
    :meth:`lifespan` opens resources shared by all workers of the stage for one run.

    Args:
        name: Name used in errors, spans, metrics, logs and the run report.
        workers: Concurrent copies of the stage sharing one inbox.
        buffer: Capacity of the stage's inbox (items the previous stage may run ahead); the
            runtime raises it to the previous stage's ``workers`` when that is larger.
        on_error: Per-item errors as data (``"dead_letter"``) or ``"fatal"``; see :data:`OnError`.
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        workers: int = 1,
        buffer: int = 16,
        on_error: OnError = "dead_letter",
    ) -> None:
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        if buffer < 0 or buffer == math.inf:
            raise ConfigError(f"buffer must be a finite number >= 0, got {buffer}")
        self.name = name or type(self).__name__
        self.workers = workers
        self.buffer = int(buffer)
        self.on_error = on_error
        self.log = logging.LoggerAdapter(logging.getLogger("pipeline.stage"), {"stage": self.name})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, workers={self.workers})"

    def __or__(self, other: Stage[Out, Any]) -> Pipeline:
        return Pipeline(self, other)

    def __ror__(self, items: Any) -> Pipeline:
        return Pipeline(items, self)

    @property
    def is_source(self) -> bool:
        """Whether the stage produces items without an inbox."""
        return False

    @property
    def is_sink(self) -> bool:
        """Whether the stage is a sink; an ordered run restores order before the first sink."""
        return False

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Open what all workers share for one run (an HTTP session, a file); close it after."""
        yield

    async def run(self, inbox: Inbox[In], outbox: Outbox[Out]) -> None:
        """Consume ``inbox`` until it ends, sending results to ``outbox``."""
        raise NotImplementedError

    def should_dead_letter(self, error: Exception) -> bool:
        """Return whether an exception raised for one item goes to the dead letter."""
        if isinstance(error, ItemError):
            return True
        if isinstance(error, FatalError):
            return False
        policy = self.on_error
        if policy == "dead_letter":
            return True
        if policy == "fatal":
            return False
        return bool(policy(error))


class Source(Stage[None, Out]):
    """A stage that produces input items; override :meth:`run` and call ``outbox.emit``."""

    @property
    def is_source(self) -> bool:
        """Sources have no inbox."""
        return True

    def total(self) -> int | None:
        """Return how many items the source will produce, when knowable cheaply."""
        return None


class ItemStage(Stage[In, Out]):
    """A stage that handles one item at a time: override :meth:`process`.

    Each item gets a span; an exception is dead-lettered or fatal per ``on_error``.
    """

    async def process(self, item: In) -> Out:
        """Return the result for one item."""
        raise NotImplementedError

    async def handle(self, env: Envelope[In], outbox: Outbox[Out]) -> None:
        """Process one envelope and send its result; override for 1:n or filtering stages."""
        result = await self.process(env.value)
        await outbox.send(env.replace(result))

    async def run(self, inbox: Inbox[In], outbox: Outbox[Out]) -> None:
        """Handle each item of the inbox in turn."""
        stats = outbox.stats
        tracing = outbox.tracing_enabled
        handle = self.handle
        async for env in inbox:
            started = _perf()
            blocked = outbox.blocked_s
            try:
                if tracing:
                    with outbox.span(env):
                        await handle(env, outbox)
                else:
                    await handle(env, outbox)
            except Exception as error:  # cancellation is BaseException: never caught here
                await outbox.handle_error(env, error)
            # busy excludes the time spent waiting for room downstream (reported as blocked)
            stats.busy_s += _perf() - started - (outbox.blocked_s - blocked)


DeadLetter = Stage[Failed, Any] | Callable[[Failed], Awaitable[None] | None]
"""Where failed items go: a stage receiving :class:`Failed` values, or a (sync/async) function."""


class IterSource(Source[Any]):
    """A source over any iterable, async iterable, or aiostream stream."""

    def __init__(self, items: Any, *, name: str = "source", buffer: int = 16) -> None:
        super().__init__(name=name, buffer=buffer)
        self.items = items

    def total(self) -> int | None:
        """Return ``len(items)`` when the input has one."""
        try:
            return len(self.items)
        except TypeError:
            return None

    async def run(self, inbox: Inbox[None], outbox: Outbox[Any]) -> None:
        """Emit every item of the input."""
        items = self.items
        if hasattr(items, "stream") and callable(items.stream) and hasattr(items, "__aiter__"):
            async with items.stream() as streamer:  # an aiostream Stream, iterated in context
                async for item in streamer:
                    await outbox.emit(item)
        elif isinstance(items, AsyncIterable):
            async for item in items:
                await outbox.emit(item)
        else:
            for item in items:
                await outbox.emit(item)


class Pipeline:
    """A declared chain of stages: a source, then stages, usually ending in a sink.

    Args:
        *stages: The first may be a :class:`Source` stage or any iterable/async iterable (or
            omitted, giving the input to :meth:`run`/:meth:`open` instead).
        ordered: Restore input order (before the first sink, or at the end).
        window: With ``ordered``, how far the source may run ahead of the oldest unfinished
            item; the source waits when the window is full, so memory stays bounded.
        dead_letter: Where :class:`Failed` records go; by default they are collected in
            ``report.failures``.
        name: Name of the pipeline in spans and reports.
        tracing: Force OpenTelemetry spans on or off, or give the tracer provider to use
            (default: on when a global SDK tracer provider is configured).
        metrics: Record OpenTelemetry metrics, or the meter provider to use (default: on when a
            global SDK meter provider is configured).
        metrics_interval: Seconds between metric flushes while the run goes on.
    """

    def __init__(
        self,
        *stages: Any,
        ordered: bool = False,
        window: int = 1024,
        dead_letter: DeadLetter | None = None,
        name: str = "pipeline",
        tracing: bool | TracerProvider | None = None,
        metrics: bool | MeterProvider | None = None,
        metrics_interval: float = 1.0,
    ) -> None:
        if window < 1:
            raise ConfigError(f"window must be >= 1, got {window}")
        chain: list[Stage[Any, Any]] = []
        for i, stage in enumerate(stages):
            if isinstance(stage, Pipeline):
                chain.extend(stage.stages)
            elif isinstance(stage, Stage):
                chain.append(stage)
            elif i == 0 and (isinstance(stage, (Iterable, AsyncIterable))):
                chain.append(IterSource(stage))
            else:
                raise ConfigError(f"pipeline element {i} is not a stage: {stage!r}")
        for i, stage in enumerate(chain):
            if stage.is_source and i != 0:
                raise ConfigError(f"source {stage.name!r} must come first, not at position {i}")
        self.stages: tuple[Stage[Any, Any], ...] = tuple(chain)
        self.ordered = ordered
        self.window = window
        self.dead_letter = dead_letter
        self.name = name
        self.tracing = tracing
        self.metrics = metrics
        self.metrics_interval = metrics_interval

    def __repr__(self) -> str:
        names = " | ".join(s.name for s in self.stages)
        return f"Pipeline({names}, ordered={self.ordered})"

    def __or__(self, other: Stage[Any, Any] | Pipeline) -> Pipeline:
        return Pipeline(
            self,
            other,
            ordered=self.ordered,
            window=self.window,
            dead_letter=self.dead_letter,
            name=self.name,
            tracing=self.tracing,
            metrics=self.metrics,
            metrics_interval=self.metrics_interval,
        )

    async def run(self, items: Any = None) -> RunReport:
        """Run to completion, discarding the results, and return the report."""
        async with self.open(items) as results:
            async for _ in results:
                pass
        assert results.report is not None
        return results.report

    @asynccontextmanager
    async def open(self, items: Any = None) -> AsyncIterator[Results[Any]]:
        """Start the run and yield its :class:`Results` as they complete.

        Leaving the block early cancels every worker; a fatal stage error is raised here as
        the original exception, with the stage name and item number attached.
        """
        stages = list(self.stages)
        if items is not None:
            if stages and stages[0].is_source:
                raise ConfigError("this pipeline declares its own source; do not pass items")
            stages.insert(0, items if isinstance(items, Source) else IterSource(items))
        elif not stages or not stages[0].is_source:
            raise ConfigError("no input: declare a source first or pass items to run()/open()")
        sink = self.dead_letter
        config = RunConfig(
            name=self.name,
            ordered=self.ordered,
            window=self.window,
            tracing=self.tracing,
            metrics=self.metrics,
            metrics_interval=self.metrics_interval,
            dead_letter_stage=sink if isinstance(sink, Stage) else None,
            dead_letter_fn=None if isinstance(sink, Stage) else sink,
        )
        async with open_run(list(stages), config) as results:
            yield results
