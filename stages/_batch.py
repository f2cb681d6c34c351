"""Group items into batches by count, token budget and time; split results back per item.

:class:`Batcher` turns a stream of items into a stream of batch envelopes, each carrying the
list of its members' values and the members themselves (``Envelope.members``), so that every
downstream stage and the runtime still account for each item: a failed batch dead-letters
each member, and :func:`split_batch` / :class:`Unbatch` turn per-member results back into the
members' own envelopes, in order.

A batch is sent when it is full (``max_items`` items, or the next item would exceed
``max_tokens``), when ``max_wait`` seconds have passed since its first item arrived, or when
the input ends. An item larger than the whole token budget travels alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import anyio
from anyio import EndOfStream, WouldBlock

from pipeline._envelope import Envelope
from pipeline._errors import ConfigError
from pipeline._stage import Inbox, Outbox, Stage
from pipeline._tracing import context_with

T = TypeVar("T")
U = TypeVar("U")


def default_size(value: Any) -> int:
    """Estimate an item's tokens: a quarter of the characters of its text or JSON (at least 1)."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = str(value)
    return max(1, math.ceil(len(text) / 4))


class Batcher(Stage[T, list[T]], Generic[T]):
    """Group items into batches by count and/or token budget, with a time limit.

    The batch envelope's value is the list of member values; its ``seq``, ``key`` and
    ``origin`` are the first member's; its span links every member's span and becomes the
    batch's context for the stages after it.

    Args:
        max_items: Most items in a batch.
        max_tokens: Most tokens (per ``size``) in a batch; a larger item travels alone.
        max_wait: Seconds a batch may wait for more items after its first one arrived.
        size: An item's size in tokens (default: :func:`default_size`).
        name: The stage's name.
        buffer: Capacity of the stage's inbox.

    Raises:
        ConfigError: Neither limit is given, or a limit is not positive.
    """

    def __init__(
        self,
        *,
        max_items: int | None = None,
        max_tokens: int | None = None,
        max_wait: float = 0.05,
        size: Callable[[T], int] | None = None,
        name: str | None = None,
        buffer: int = 64,
    ) -> None:
        super().__init__(name=name or "batch", workers=1, buffer=buffer)
        if max_items is None and max_tokens is None:
            raise ConfigError("Batcher needs max_items, max_tokens or both")
        if max_items is not None and max_items < 1:
            raise ConfigError(f"max_items must be >= 1, got {max_items}")
        if max_tokens is not None and max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
        if not max_wait > 0:
            raise ConfigError(f"max_wait must be > 0 seconds, got {max_wait}")
        self.max_items = max_items
        self.max_tokens = max_tokens
        self.max_wait = max_wait
        self.size: Callable[[T], int] = size or default_size
        self.batches = 0

    async def run(self, inbox: Inbox[T], outbox: Outbox[list[T]]) -> None:
        """Collect items into batches and send each batch when it is due."""
        max_items, max_tokens = self.max_items, self.max_tokens
        members: list[Envelope[T]] = []
        tokens = 0
        deadline = math.inf
        while True:
            try:
                env = await _next_item(inbox, deadline)
            except EndOfStream:
                break
            if env is None:  # max_wait passed
                await self._send(outbox, members)
                members, tokens, deadline = [], 0, math.inf
                continue
            cost = self.size(env.value) if max_tokens is not None else 0
            if members and max_tokens is not None and tokens + cost > max_tokens:
                await self._send(outbox, members)
                members, tokens, deadline = [], 0, math.inf
            if not members:
                deadline = anyio.current_time() + self.max_wait
            members.append(env)
            tokens += cost
            if (max_items is not None and len(members) >= max_items) or (
                max_tokens is not None and tokens >= max_tokens
            ):
                await self._send(outbox, members)
                members, tokens, deadline = [], 0, math.inf
        if members:
            await self._send(outbox, members)

    async def _send(self, outbox: Outbox[list[T]], members: list[Envelope[T]]) -> None:
        first = members[0]
        batch: Envelope[list[T]] = Envelope(
            [m.value for m in members],
            first.seq,
            first.key,
            first.origin,
            first.context,
            members=tuple(members),
        )
        with outbox.span(batch, links=members) as span:
            if span is not None:
                span.set_attribute("pipeline.batch.size", len(members))
                batch.context = context_with(span)
        self.batches += 1
        await outbox.send(batch)


async def _next_item(inbox: Inbox[T], deadline: float) -> Envelope[T] | None:
    """Return the next item, or ``None`` if the deadline (``inf``: none) passes first.

    Raises:
        EndOfStream: The input ended.
    """
    try:
        # Take a waiting item without awaiting: the wait below then starts empty-handed,
        # so the deadline can only cancel a receive that holds no item.
        return inbox.receive_nowait()
    except WouldBlock:
        pass
    if deadline == math.inf:
        return await inbox.receive()
    with anyio.move_on_after(deadline - anyio.current_time()):
        return await inbox.receive()
    return None


def split_batch(env: Envelope[Any], values: Sequence[U]) -> list[Envelope[U]]:
    """Return each member of a batch envelope carrying its result, in order.

    Args:
        env: A batch envelope (``env.members`` set); a plain envelope counts as a batch of one.
        values: One result per member, in the members' order.

    Raises:
        ValueError: ``values`` does not have one result per member.
    """
    members = env.members if env.members is not None else (env,)
    if len(values) != len(members):
        raise ValueError(f"a batch of {len(members)} items got {len(values)} results")
    return [member.replace(value) for member, value in zip(members, values, strict=True)]


class Unbatch(Stage[Sequence[U], U], Generic[U]):
    """Split batch envelopes whose value is a list of per-member results back into items.

    It needs the batch envelope's ``members``: put it after stages that forward the batch
    envelope itself (``Envelope.replace`` makes a plain item, so a stage built on it should call
    :func:`split_batch` itself). A batch whose result list has the wrong length is
    dead-lettered (each member once); an envelope that is not a batch passes unchanged.

    Args:
        name: The stage's name.
        buffer: Capacity of the stage's inbox.
    """

    def __init__(self, *, name: str | None = None, buffer: int = 64) -> None:
        super().__init__(name=name or "unbatch", workers=1, buffer=buffer)

    async def run(self, inbox: Inbox[Sequence[U]], outbox: Outbox[U]) -> None:
        """Send every member of every batch with its own result."""
        async for env in inbox:
            if env.members is None:
                await outbox.send(env)  # type: ignore[arg-type]
                continue
            try:
                items = split_batch(env, env.value)
            except (TypeError, ValueError) as error:
                await outbox.fail(env, error)
                continue
            for item in items:
                await outbox.send(item)
