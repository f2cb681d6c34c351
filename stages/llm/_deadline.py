"""The total-time limit of HTTP attempts: one timer for all of a run's attempts.

aiohttp bounds a request's total time with a timer of its own per request (``ClientTimeout
(total=...)``): a timer handle armed and cancelled on the event loop for every request, which
costs a request about 4 % of aiohttp's own CPU time (18 k of 400 k interpreter instructions,
measured with callgrind against the simulator). Every attempt of a run has the same limit, so
their deadlines come in the order the attempts start: :class:`Deadlines` keeps the attempts in
flight in that order and arms one loop timer, for the oldest. When it fires it cancels the
attempts past their deadline and re-arms itself for the next oldest; an attempt that ends
before its deadline only leaves the table.

An expired attempt is cancelled as :func:`asyncio.timeout` cancels (``Task.cancel``), and
leaves its block with :class:`TimeoutError`, which the transport reports as a retryable
timeout; a cancellation that came from elsewhere too (the run stopping) stays a cancellation
(``Task.uncancel`` tells them apart). That needs Python 3.11: on 3.10 the transport leaves the
limit to aiohttp (:data:`SHARED_DEADLINES`).
"""

from __future__ import annotations

import asyncio
import sys
from types import TracebackType

SHARED_DEADLINES = sys.version_info >= (3, 11)
"""Whether :class:`Deadlines` can be used (``Task.cancelling``/``uncancel`` are 3.11's)."""

_EARLY_S = 0.001
"""How early a loop timer may fire (uvloop's libuv timers count whole milliseconds)."""


class Deadlines:
    """The attempts in flight against one time limit, with one event-loop timer.

    Args:
        timeout: Seconds an attempt may take in total, from entering :meth:`attempt`.

    Use it from one event loop (the run's), around each whole attempt::

        with deadlines.attempt():
            async with session.post(...) as resp:
                ...
    """

    __slots__ = ("_loop", "_open", "_timer", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._open: dict[Attempt, None] = {}  # oldest first: deadlines in insertion order
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def attempt(self) -> Attempt:
        """Return the context of one attempt: its deadline runs from entering it."""
        return Attempt(self)

    @property
    def in_flight(self) -> int:
        """Attempts inside their block now."""
        return len(self._open)

    def close(self) -> None:
        """Disarm the timer (the run is over; attempts still open are no longer limited)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._open.clear()

    def start(self, attempt: Attempt) -> float:
        """Put an attempt that starts now in the table; return its deadline (loop time)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        self._open[attempt] = None
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        return deadline

    def end(self, attempt: Attempt) -> None:
        """Take an attempt that ended before its deadline out of the table."""
        self._open.pop(attempt, None)

    def _expire(self) -> None:
        """Cancel the attempts past their deadline; re-arm for the oldest left."""
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time() + _EARLY_S  # due now, not one more turn of the timer a moment later
        open_ = self._open
        while open_:
            oldest = next(iter(open_))
            if oldest.deadline > now:
                self._timer = loop.call_at(oldest.deadline, self._expire)
                return
            del open_[oldest]
            oldest.expired = True
            oldest.task.cancel()


class Attempt:
    """One attempt's place in :class:`Deadlines` (a context manager, entered once)."""

    __slots__ = ("cancelling", "deadline", "deadlines", "expired", "task")

    def __init__(self, deadlines: Deadlines) -> None:
        self.deadlines = deadlines
        self.expired = False
        self.deadline = 0.0
        self.cancelling = 0

    def __enter__(self) -> Attempt:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("an attempt's deadline needs an asyncio task")
        self.task: asyncio.Task[object] = task
        self.cancelling = task.cancelling()
        self.deadline = self.deadlines.start(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self.expired:
            self.deadlines.end(self)
            return
        # Our cancel was delivered (or swallowed on the way): take it back, and say it was the
        # time limit unless somebody else cancelled the task too.
        if self.task.uncancel() <= self.cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError(f"the attempt took more than {self.deadlines.timeout:g}s") from exc


__all__ = ["SHARED_DEADLINES", "Attempt", "Deadlines"]
