"""Adaptive concurrency: how many requests may be in flight, adapted with AIMD."""

from __future__ import annotations

import collections

import anyio

from pipeline._errors import ConfigError


class AdaptiveConcurrency:
    """A concurrency limit that adapts to overload with AIMD.

    ``success()`` after ``limit`` successes raises the limit by one; ``overload()`` (a 429, 503
    or 529) halves it, at most once per window: overloads reported before every request that
    was in flight at the last decrease has finished are part of the same burst and ignored.
    Lowering the limit never interrupts holders; fewer are admitted until they drop below it.
    Waiters are admitted in arrival order.

    Args:
        limit: Starting number of concurrent slots.
        minimum: The limit never goes below this.
        maximum: The limit never goes above this.
        adaptive: With ``False`` the limit stays fixed (a plain semaphore).

    Attributes:
        limit: The current number of slots (read it; ``success`` and ``overload`` move it).
    """

    def __init__(
        self, *, limit: int = 16, minimum: int = 1, maximum: int = 256, adaptive: bool = True
    ) -> None:
        if not 1 <= minimum <= limit <= maximum:
            raise ConfigError(
                f"need 1 <= minimum <= limit <= maximum, got {minimum=}, {limit=}, {maximum=}"
            )
        self.limit = limit
        self.minimum = minimum
        self.maximum = maximum
        self.adaptive = adaptive
        self._in_use = 0
        self._waiters: collections.deque[anyio.Event] = collections.deque()
        self._successes = 0
        self._holdoff = 0  # releases still to come from requests in flight at the last decrease

    def __repr__(self) -> str:
        return (
            f"AdaptiveConcurrency(limit={self.limit}, minimum={self.minimum}, "
            f"maximum={self.maximum}, adaptive={self.adaptive})"
        )

    @property
    def in_use(self) -> int:
        """Slots held right now."""
        return self._in_use

    def slot(self) -> ConcurrencySlot:
        """Hold one concurrency slot for the body of the ``async with``.

        The ``async with`` gives whether the slot had to be waited for (``False``: one was
        free at once).
        """
        return ConcurrencySlot(self)

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody waits for it; return whether it was taken."""
        if self._in_use < self.limit and not self._waiters:
            self._in_use += 1
            return True
        return False

    async def acquire(self) -> bool:
        """Take a slot, waiting in arrival order if none is free; return whether it waited.

        Every slot taken is given back with :meth:`release` (``slot()`` does both).
        """
        if self.try_acquire():
            return False
        granted = anyio.Event()
        self._waiters.append(granted)
        try:
            await granted.wait()
        except BaseException:
            if granted.is_set():
                self.release()
            else:
                self._waiters.remove(granted)
            raise
        return True

    def release(self) -> None:
        """Give a slot back (and admit the waiters the limit allows)."""
        self._in_use -= 1
        if self._holdoff:
            self._holdoff -= 1
        if self._waiters:
            self._admit()

    def _admit(self) -> None:
        while self._waiters and self._in_use < self.limit:
            self._in_use += 1
            self._waiters.popleft().set()

    def success(self) -> None:
        """Record a request that went through; every ``limit`` of them add one slot."""
        if not self.adaptive:
            return
        self._successes += 1
        if self._successes >= self.limit:
            self._successes = 0
            if self.limit < self.maximum:
                self.limit += 1
                self._admit()

    def overload(self) -> None:
        """Record an overload (429/503/529): halve the limit, once per burst of overloads."""
        if not self.adaptive or self._holdoff:
            return
        self.limit = max(self.minimum, self.limit // 2)
        self._successes = 0
        self._holdoff = self._in_use


class ConcurrencySlot:
    """``async with concurrency.slot() as queued``: one slot held for the body.

    A class rather than an ``asynccontextmanager``: it is entered once per request, and a
    generator-based context manager costs several times as much.
    """

    __slots__ = ("concurrency",)

    def __init__(self, concurrency: AdaptiveConcurrency) -> None:
        self.concurrency = concurrency

    async def __aenter__(self) -> bool:
        return await self.concurrency.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.concurrency.release()
