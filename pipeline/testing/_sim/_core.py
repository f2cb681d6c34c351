"""The simulator's shared state and plumbing, given to every endpoint family.

An endpoint family (OpenAI chat, Anthropic messages, embeddings, ...) is a module with a
``register(core, router)`` function that adds its routes with :meth:`SimCore.route`; its
handlers take ``(request, n)``, where ``n`` numbers the request in arrival order, and use the
core for authentication (:meth:`SimCore.key_ok`), quotas (:meth:`SimCore.admit`,
:meth:`SimCore.limit_headers`) and the fault draw (:meth:`SimCore.draw_fault`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import random
from collections.abc import Awaitable, Callable, Collection
from contextlib import suppress
from typing import Any

from aiohttp import web

from pipeline.testing._sim._answers import BadRequest
from pipeline.testing._sim._config import FAULTS, SimConfig
from pipeline.testing._sim._enforcement import cost_usd
from pipeline.testing._sim._quotas import Quotas
from pipeline.testing._sim._responses import Aborted

__all__ = ["Counters", "Handler", "SimCore"]

Handler = Callable[[web.Request, int], Awaitable[web.StreamResponse]]
"""An endpoint's handler: the request and its number ``n`` (from 0, in arrival order)."""


class Counters:
    """What the simulator saw since it started or was reset (see ``Simulator.counters``)."""

    __slots__ = (
        "by_route",
        "completion_tokens",
        "concurrent",
        "concurrent_max",
        "faults",
        "first",
        "last",
        "per_second",
        "prompt_tokens",
        "requests",
        "spent_usd",
        "throttled",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.by_route: dict[str, dict[str, int]] = {}
        self.faults: dict[str, int] = {}
        self.throttled = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.spent_usd = 0.0
        self.concurrent = 0
        self.concurrent_max = 0
        self.first: float | None = None
        self.last: float | None = None
        self.per_second: dict[int, int] = {}

    def arrive(self, now: float) -> int:
        """Count a request arriving ``now`` seconds after the start; return its number."""
        n = self.requests
        self.requests = n + 1
        if self.first is None:
            self.first = now
        self.last = now
        second = int(now)
        self.per_second[second] = self.per_second.get(second, 0) + 1
        self.concurrent += 1
        if self.concurrent > self.concurrent_max:
            self.concurrent_max = self.concurrent
        return n

    def leave(self, route: str, status: str) -> None:
        """Count a request of ``route`` ending with ``status``."""
        self.concurrent -= 1
        statuses = self.by_route.get(route)
        if statuses is None:
            statuses = self.by_route[route] = {}
        statuses[status] = statuses.get(status, 0) + 1

    def peak_rpm(self) -> int:
        """Return the most requests in any 60 consecutive whole seconds."""
        per_second = self.per_second
        peak = 0
        seconds = sorted(per_second)
        window, lo = 0, 0
        for sec in seconds:
            window += per_second[sec]
            while seconds[lo] <= sec - 60:
                window -= per_second[seconds[lo]]
                lo += 1
            peak = max(peak, window)
        return peak

    def snapshot(self) -> dict[str, Any]:
        """Return the counters as JSON-ready data."""
        span = (self.last - self.first) if self.first is not None and self.last is not None else 0
        return {
            "requests": self.requests,
            "by_route": {route: dict(statuses) for route, statuses in self.by_route.items()},
            "faults": dict(self.faults),
            "throttled": self.throttled,
            "http_429": sum(s.get("429", 0) for s in self.by_route.values()),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "spent_usd": self.spent_usd,
            "per_second": [[second, n] for second, n in sorted(self.per_second.items())],
            "concurrent": self.concurrent,
            "concurrent_max": self.concurrent_max,
            "timestamps": {
                "first_s": self.first,
                "last_s": self.last,
                "mean_rps": self.requests / span if span > 0 else None,
                "peak_rps": max(self.per_second.values(), default=0),
                "peak_rpm": self.peak_rpm(),
            },
        }


class SimCore:
    """Configuration, quotas, counters and the per-request fault draw of one simulator.

    Args:
        config: The behaviour.
        clock: Monotonic clock in seconds.
    """

    def __init__(self, config: SimConfig, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.config = config
        self.quotas = Quotas(config, clock)
        self.stats = Counters()
        self.t0 = clock()
        self.closing: asyncio.Event | None = None
        self._faults: list[tuple[str, float]] = []
        self._randomized = False
        self.configure(config)

    def configure(self, config: SimConfig) -> None:
        """Replace the configuration; quota buckets restart full if the quotas changed."""
        self.quotas = self.quotas.reconfigured(self.config, config)
        self.config = config
        self._faults = [(name, getattr(config, name)) for name in FAULTS if getattr(config, name)]
        self._randomized = config.randomized

    def reset(self) -> None:
        """Zero the counters and the request numbering; refill the quota buckets."""
        self.stats = Counters()
        self.t0 = self.clock()
        self.quotas = Quotas(self.config, self.clock)

    # ---- routes ----------------------------------------------------------------------------

    def route(self, router: web.UrlDispatcher, method: str, path: str, fn: Handler) -> None:
        """Add ``fn`` at ``method path``, numbered and counted under ``path``."""
        router.add_route(method, path, self._instrument(path, fn))

    def _instrument(self, route: str, fn: Handler) -> Callable[[web.Request], Awaitable[Any]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            stats = self.stats
            n = stats.arrive(self.clock() - self.t0)
            status = "disconnected"
            try:
                response = await fn(request, n)
                status = "reset" if isinstance(response, Aborted) else str(response.status)
                return response
            except ConnectionError:  # the client left mid-response: not a server error
                return Aborted(status=599)
            finally:
                stats.leave(route, status)

        return handler

    async def on_startup(self, app: web.Application) -> None:
        """Make (on aiohttp startup) the event that cuts stalls short at shutdown."""
        self.closing = asyncio.Event()

    async def on_shutdown(self, app: web.Application) -> None:
        """Wake every stalled response (on aiohttp shutdown)."""
        if self.closing is not None:
            self.closing.set()

    # ---- per request -----------------------------------------------------------------------

    def draw_fault(self, n: int, applies: Collection[str]) -> tuple[str | None, float]:
        """Draw request ``n``'s fault and its delay (s) before the first byte.

        A fault not in ``applies`` (one that makes no sense for the route) is not injected.
        """
        config = self.config
        delay = config.latency_ms
        if not self._randomized:
            return None, delay / 1000.0
        rng = random.Random(config.seed * 1_000_003 + n)
        draw = rng.random()
        fault = None
        edge = 0.0
        for name, rate in self._faults:
            edge += rate
            if draw < edge:
                fault = name
                break
        if config.jitter_ms:
            delay = max(0.0, delay + rng.uniform(-config.jitter_ms, config.jitter_ms))
        return (fault if fault in applies else None), delay / 1000.0

    def count_fault(self, fault: str) -> None:
        """Count one injected fault of kind ``fault``."""
        faults = self.stats.faults
        faults[fault] = faults.get(fault, 0) + 1

    def key_ok(self, request: web.Request, *, anthropic: bool = False) -> bool:
        """Whether the request presents the required key (``x-api-key``/``api-key``/bearer)."""
        want = self.config.require_key
        if want is None:
            return True
        headers = request.headers
        got = headers.get("x-api-key") if anthropic else headers.get("api-key")
        if got is None:
            auth = headers.get("Authorization", "")
            if auth[:7].lower() == "bearer ":
                got = auth[7:].strip()
        return got is not None and hmac.compare_digest(got.encode(), want.encode())

    def admit(self, cost: int, prompt: int | None = None) -> tuple[float, str]:
        """Take one request and ``cost`` tokens (``prompt`` of them input) from the quotas.

        Returns:
            ``(0, "")`` when admitted, else how long to wait and which quota refused.
        """
        wait, which = self.quotas.admit(cost, prompt)
        if wait:
            self.stats.throttled += 1
        return wait, which

    def limit_headers(self, *, anthropic: bool = False) -> dict[str, str]:
        """Return the rate-limit headers every LLM response carries (none without quotas)."""
        return self.quotas.headers(anthropic=anthropic)

    def count_answer(self, prompt_tokens: int, completion_tokens: int = 0) -> None:
        """Count the tokens of an answered request."""
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        config = self.config
        if config.price_prompt or config.price_completion:
            prices = (config.price_prompt, config.price_completion)
            self.stats.spent_usd += cost_usd(prompt_tokens, completion_tokens, prices)

    async def read_json(self, request: web.Request) -> Any:
        """Return the request's JSON body, or raise :class:`BadRequest` like OpenAI words it."""
        try:
            return json.loads(await request.read())
        except ValueError:
            raise BadRequest(
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly.)"
            ) from None

    async def hold(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the server is shutting down."""
        closing = self.closing
        if closing is None:
            await asyncio.sleep(seconds)
            return
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(closing.wait(), seconds)
