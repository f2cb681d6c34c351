"""Stages made from plain functions: ``map``, ``filter`` and ``flat_map``.

Each accepts a sync or async function. They are ordinary :class:`ItemStage` subclasses with a
tight loop of their own, so a chain of them costs little more than the bare channel hops.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import Any, Generic, TypeVar

from ._channels import Inbox, Outbox
from ._envelope import Envelope
from ._stage import ItemStage, OnError

In = TypeVar("In")
Out = TypeVar("Out")

_perf = time.perf_counter


def _name_of(fn: Callable[..., Any], kind: str) -> str:
    return f"{kind}({getattr(fn, '__name__', type(fn).__name__)})"


class _FunctionStage(ItemStage[In, Out], Generic[In, Out]):
    kind = "function"

    def __init__(
        self,
        fn: Callable[[In], Any],
        *,
        name: str | None = None,
        workers: int = 1,
        buffer: int = 16,
        on_error: OnError = "dead_letter",
    ) -> None:
        super().__init__(
            name=name or _name_of(fn, self.kind), workers=workers, buffer=buffer, on_error=on_error
        )
        self.fn = fn
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
        )

    async def _call(self, value: In) -> Any:
        result = self.fn(value)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def process(self, item: In) -> Out:
        """Apply the function to one item."""
        result: Out = await self._call(item)
        return result


class Map(_FunctionStage[In, Out]):
    """Apply a function to every item: ``map(fn)``."""

    kind = "map"

    async def run(self, inbox: Inbox[In], outbox: Outbox[Out]) -> None:
        """Apply the function to each item, with a span per item when tracing is on."""
        if outbox.tracing_enabled:
            await super().run(inbox, outbox)
            return
        stats, fn, is_async = outbox.stats, self.fn, self.is_async
        send: Callable[[Envelope[Any]], Awaitable[None]] = outbox.send
        async for env in inbox:
            started = _perf()
            try:
                value = fn(env.value)
                if is_async or inspect.isawaitable(value):
                    value = await value
            except Exception as error:
                await outbox.handle_error(env, error)
                continue
            stats.busy_s += _perf() - started
            env.value = value  # a 1:1 stage owns the envelope it received
            await send(env)


class Filter(_FunctionStage[In, In]):
    """Keep the items for which the function returns true: ``filter(fn)``."""

    kind = "filter"

    async def handle(self, env: Envelope[In], outbox: Outbox[In]) -> None:
        """Send ``env`` on if the predicate holds, else count it as dropped."""
        if await self._call(env.value):
            await outbox.send(env)
        else:
            outbox.drop(env)


class FlatMap(_FunctionStage[In, Out]):
    """Turn each item into zero or more items: ``flat_map(fn)``.

    The function returns an iterable or an async iterable; each element travels on with the
    identity of the item it came from.
    """

    kind = "flat_map"

    async def handle(self, env: Envelope[In], outbox: Outbox[Out]) -> None:
        """Send every element the function returns for ``env``."""
        produced = await self._call(env.value)
        sent = 0
        if isinstance(produced, AsyncIterable):
            async for child in produced:
                if sent:
                    outbox.grow(env, 1)
                await outbox.send(env.child(child))
                sent += 1
        else:
            children = list(produced)
            if children:
                outbox.grow(env, len(children) - 1)
            for child in children:
                await outbox.send(env.child(child))
            sent = len(children)
        if not sent:
            outbox.drop(env)


def map(
    fn: Callable[[In], Out] | Callable[[In], Awaitable[Out]],
    *,
    name: str | None = None,
    workers: int = 1,
    buffer: int = 16,
    on_error: OnError = "dead_letter",
) -> Map[In, Out]:
    """Return a stage applying ``fn`` (sync or async) to every item."""
    return Map(fn, name=name, workers=workers, buffer=buffer, on_error=on_error)


def filter(
    fn: Callable[[In], bool] | Callable[[In], Awaitable[bool]],
    *,
    name: str | None = None,
    workers: int = 1,
    buffer: int = 16,
    on_error: OnError = "dead_letter",
) -> Filter[In]:
    """Return a stage keeping the items for which ``fn`` (sync or async) is true."""
    return Filter(fn, name=name, workers=workers, buffer=buffer, on_error=on_error)


def flat_map(
    fn: Callable[[In], Iterable[Out]]
    | Callable[[In], AsyncIterable[Out]]
    | Callable[[In], Awaitable[Iterable[Out]]],
    *,
    name: str | None = None,
    workers: int = 1,
    buffer: int = 16,
    on_error: OnError = "dead_letter",
) -> FlatMap[In, Out]:
    """Return a stage turning each item into the elements ``fn`` returns."""
    return FlatMap(fn, name=name, workers=workers, buffer=buffer, on_error=on_error)
