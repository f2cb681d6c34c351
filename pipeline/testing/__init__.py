"""Test your own pipelines without a provider: the simulated OpenAI-compatible server.

The same server the library's tests, demo and benchmarks use, with seeded fault injection,
quotas that answer 429 like a provider, and counters of what it saw::

    async with serve(SimConfig(latency_ms=50, error_5xx=0.05, seed=1)) as sim:
        caller = LLMCaller(model="sim-1", prompt="{text}", base_url=sim.url)
        ...
        assert sim.counters()["faults"]["error_5xx"] > 0

It is also a command: ``python -m pipeline sim --port 8000 --latency-ms 500``.
"""

from pipeline.testing._sim import SimConfig as SimConfig
from pipeline.testing._sim import Simulator as Simulator
from pipeline.testing._sim import embedding_for as embedding_for
from pipeline.testing._sim import serve as serve
from pipeline.testing._sim._batches import BatchSim as BatchSim
from pipeline.testing._sim._batches import BatchSimConfig as BatchSimConfig

__all__ = ["BatchSim", "BatchSimConfig", "SimConfig", "Simulator", "embedding_for", "serve"]
