"""The simulated server on its own event loop in a thread, for tests of code that runs its own
loop (the CLI's ``main``) in the test's thread."""

from __future__ import annotations

import asyncio
import threading

from pipeline.testing._sim import SimConfig, Simulator, serve


class ThreadSim:
    """Serve the simulator in a background thread for the length of a ``with`` block."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.ready = threading.Event()
        self.sim: Simulator | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def serve_until_stopped() -> None:
            self.loop = asyncio.get_running_loop()
            self.stop = asyncio.Event()
            async with serve(self.config) as sim:
                self.sim = sim
                self.ready.set()
                await self.stop.wait()

        asyncio.run(serve_until_stopped())

    def __enter__(self) -> Simulator:
        self.thread.start()
        assert self.ready.wait(10), "the simulator did not start"
        assert self.sim is not None
        return self.sim

    def __exit__(self, *exc: object) -> None:
        assert self.loop is not None and self.stop is not None
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)
