"""The simulator as a server: :class:`Simulator` (its state and app) and :func:`serve`.

To add an endpoint family, write a module with ``register(core, router)`` (see
:mod:`pipeline.testing._sim._core`) and add its function to :data:`ENDPOINT_FAMILIES`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from pipeline.testing._sim._answers import answer_to
from pipeline.testing._sim._anthropic import register as register_anthropic
from pipeline.testing._sim._batches import BatchSim
from pipeline.testing._sim._config import SimConfig
from pipeline.testing._sim._core import SimCore
from pipeline.testing._sim._embeddings import register as register_embeddings
from pipeline.testing._sim._openai import register as register_openai
from pipeline.testing._sim._responses import read_config

__all__ = ["ENDPOINT_FAMILIES", "Simulator", "serve"]

ENDPOINT_FAMILIES: tuple[Callable[[SimCore, web.UrlDispatcher], None], ...] = (
    register_openai,
    register_embeddings,
    register_anthropic,
)
"""The ``register(core, router)`` function of every endpoint family the simulator serves."""


class Simulator:
    """The simulated server's state: configuration, quotas and counters.

    Build its aiohttp application with :meth:`make_app`, or use :func:`serve` which also binds
    a socket and fills in :attr:`url`.

    Args:
        config: The behaviour (defaults: no latency, no faults, no quotas).
        clock: Monotonic clock in seconds (inject one to test quotas without waiting).

    Attributes:
        base_url: ``http://host:port`` once served.
    """

    def __init__(
        self, config: SimConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.base_url: str | None = None
        self._core = SimCore(config or SimConfig(), clock)
        self.batches = BatchSim(answer_to, model=self._core.config.model, clock=clock)
        """The batch endpoints' state: ``sim.batches.configure(BatchSimConfig(...))``."""

    @property
    def config(self) -> SimConfig:
        """The current configuration."""
        return self._core.config

    def configure(self, config: SimConfig) -> None:
        """Replace the configuration; quota buckets restart full if the quotas changed."""
        self._core.configure(config)

    @property
    def url(self) -> str:
        """The OpenAI base URL (``http://host:port/v1``), once served."""
        if self.base_url is None:
            raise RuntimeError("the simulator is not serving yet; use `async with serve()`")
        return self.base_url + "/v1"

    def reset(self) -> None:
        """Zero the counters and the request numbering; refill the quota buckets."""
        self._core.reset()

    def counters(self) -> dict[str, Any]:
        """Return the counters as JSON-ready data.

        Keys: ``requests`` (total), ``by_route`` (route -> status -> count; ``"reset"`` for
        aborted connections, ``"disconnected"`` when the client left), ``faults`` (kind ->
        count), ``throttled`` (429s from the quota buckets), ``http_429`` (all 429s),
        ``prompt_tokens`` and ``completion_tokens`` (of answered requests), ``concurrent`` and
        ``concurrent_max`` (requests in flight), and ``timestamps``: ``first_s``/``last_s``
        (seconds since start or reset), ``mean_rps``, ``peak_rps`` (most requests in one
        whole second) and ``peak_rpm`` (most in any 60 consecutive seconds).
        """
        return self._core.stats.snapshot()

    def make_app(self) -> web.Application:
        """Return a new aiohttp application serving this simulator."""
        core = self._core
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.on_startup.append(core.on_startup)
        app.on_shutdown.append(core.on_shutdown)
        for register in ENDPOINT_FAMILIES:
            register(core, app.router)
        self.batches.register(lambda method, path, fn: core.route(app.router, method, path, fn))
        r = app.router
        r.add_get("/sim/counters", self._get_counters)
        r.add_post("/sim/reset", self._post_reset)
        r.add_get("/sim/config", self._get_config)
        r.add_post("/sim/config", self._post_config)
        return app

    # ---- control routes --------------------------------------------------------------------

    async def _get_counters(self, request: web.Request) -> web.Response:
        return web.json_response(self.counters())

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response(self.counters())

    async def _get_config(self, request: web.Request) -> web.Response:
        return web.json_response(self.config.to_dict())

    async def _post_config(self, request: web.Request) -> web.Response:
        config = await read_config(request, SimConfig.from_dict, "simulator config")
        if isinstance(config, web.Response):
            return config
        self.configure(config)
        return web.json_response(config.to_dict())


@asynccontextmanager
async def serve(
    config: SimConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[Simulator]:
    """Serve a :class:`Simulator` on ``host:port`` (``port=0``: a free port) for the block.

    Yields:
        The simulator, with ``url`` (``http://127.0.0.1:PORT/v1``) and ``counters()``.
    """
    sim = Simulator(config)
    runner = web.AppRunner(
        sim.make_app(), handle_signals=False, access_log=None, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
        await site.start()
        bound = runner.addresses[0]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        if ":" in shown:
            shown = f"[{shown}]"
        sim.base_url = f"http://{shown}:{bound[1]}"
        yield sim
    finally:
        await runner.cleanup()
