"""Bounded connections: uvicorn's HTTP protocol with a header timeout and a connection cap.

Uvicorn times out a keep-alive connection that is idle after a response, but not a connection
that never sends a request, nor one that sends its headers a byte at a time: a few thousand of
either, from anyone who can reach the port, hold every file descriptor and lock everyone out.
:func:`guarded_protocol` subclasses uvicorn's own protocol (httptools when installed, h11
otherwise: uvicorn's ``auto`` choice) rather than replacing the server, and adds:

- a header timeout: a connection must deliver a request's complete headers within
  ``header_timeout`` seconds of opening, or of the end of its previous response; otherwise
  it is closed;
- a connection cap: at ``cap`` open connections, a new one closes the connection that has
  waited longest without a request (idle or half-open), so a flood cannot keep out a client
  that sends a request; when every connection is busy with a request, the new one gets a
  503 and is closed.

Both act in ``connection_made`` and ``data_received``, the protocol's own callbacks, with no
task or polling per connection. :func:`connection_cap` fits the cap under the process's
descriptor limit, which ``serve`` raises to the hard limit at start (:func:`raise_nofile`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
from typing import Any

__all__ = ["BACKLOG", "connection_cap", "guarded_protocol", "raise_nofile"]

log = logging.getLogger("pipeline.server")

BACKLOG = 128
"""Connections the kernel queues before they are accepted (uvicorn's ``backlog``)."""

_BUSY = b'{"detail":"too many connections; retry later"}\n'
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close"
    b"\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY)
)


class _Registry:
    """The connections of one server: how many are open, and which wait for a request."""

    def __init__(self, cap: int, header_timeout: float) -> None:
        self.cap = cap
        self.header_timeout = header_timeout
        self.open = 0
        self.waiting: collections.OrderedDict[Any, None] = collections.OrderedDict()
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0


class _Guarded(asyncio.Protocol):
    """The header timeout and the connection cap, mixed in front of uvicorn's protocol."""

    registry: _Registry
    cycle: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    _timer: asyncio.TimerHandle | None = None
    _armed_for: Any = None
    _counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection; at the cap, make room (or refuse); start the header clock."""
        super().connection_made(transport)
        registry = self.registry
        registry.open += 1
        self._counted = True
        if registry.open > registry.cap and not self._evict_one():
            registry.refused += 1
            self._uncount()
            self.transport.write(_REFUSED)
            self.transport.close()
            return
        self._wait_for_request()

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest without a request; whether one was."""
        waiting = self.registry.waiting
        if not waiting:
            return False
        victim, _ = waiting.popitem(last=False)
        victim._stop_waiting()
        victim._uncount()
        self.registry.evicted += 1
        victim.transport.close()
        return True

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self.registry.open -= 1

    def _wait_for_request(self) -> None:
        """Start the header clock: a request's headers must arrive in ``header_timeout``."""
        self._armed_for = self.cycle
        self.registry.waiting[self] = None
        self._timer = self.loop.call_later(self.registry.header_timeout, self._too_slow)

    def _stop_waiting(self) -> None:
        self.registry.waiting.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        if self.cycle is self._armed_for and self._idle() and not self.transport.is_closing():
            self.registry.waiting.pop(self, None)
            self.registry.timed_out += 1
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        """Parse as uvicorn does; once a request's headers are complete, stop the clock."""
        super().data_received(data)
        if self._timer is not None and self.cycle is not self._armed_for:
            self._stop_waiting()

    def on_response_complete(self) -> None:
        """After a response, the connection waits for its next request's headers again."""
        super().on_response_complete()  # type: ignore[misc]
        if self._timer is None and self._idle() and not self.transport.is_closing():
            self._wait_for_request()

    def _idle(self) -> bool:
        """Whether no request is in progress (a pipelined one may have started already)."""
        return self.cycle is None or bool(self.cycle.response_complete)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection."""
        self._stop_waiting()
        self._uncount()
        super().connection_lost(exc)


def _uvicorn_protocol() -> type[asyncio.Protocol]:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is optional for uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol
    return HttpToolsProtocol


def guarded_protocol(cap: int, header_timeout: float) -> type[asyncio.Protocol]:
    """Return uvicorn's HTTP protocol class with a header timeout and a cap of ``cap``.

    Each call makes a class with its own count of connections: one per server.
    """
    base = _uvicorn_protocol()
    registry = _Registry(cap, header_timeout)
    return type("GuardedHTTPProtocol", (_Guarded, base), {"registry": registry})


def raise_nofile() -> int:
    """Raise the soft descriptor limit to the hard one; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as error:  # a container may refuse; keep what there is
            log.warning("could not raise the descriptor limit to %d: %s", wanted, error)
    return int(soft)


def connection_cap(wanted: int, nofile: int, reserved: int) -> int:
    """Return the connection cap: ``wanted``, lowered to fit under the descriptor limit.

    Args:
        wanted: The operator's ``max_connections``.
        nofile: The descriptor limit in force.
        reserved: Descriptors kept for everything else: the jobs' files and their
            connections to the provider, the listening sockets, the kernel's backlog.
    """
    return max(1, min(wanted, nofile - reserved - BACKLOG))
