"""Runtime benchmarks: hop cost against bare anyio, tracing cost, and memory under backpressure.

Run: ``python benchmarks/runtime.py [--items N] [--memory-items N]``. Pinned to one core. Every
figure is printed beside its baseline measured in the same run, as a ratio.

1. Throughput: a 5-stage pipeline of trivial ``map`` stages against five bare anyio memory
   stream hops written the usual way (``async for`` + ``await send``). Target: >= 50,000 items/s.
2. Tracing cost with no SDK configured: the same pipeline with tracing left at its default
   (off without an SDK) against tracing forced on over the API's no-op tracer (what naive
   per-item instrumentation costs) and against an SDK with a dropping exporter, for reference.
3. Backpressure: 1,000,000 items through source -> map -> map -> slow sink; peak RSS growth
   between item 100,000 and the end must stay under 20 MB, and the source is never more than
   (sum of buffers + workers) items ahead of the sink.
4. The demo's speed test (``python -m pipeline demo``): 20 greetings one request at a time, then
   through the pipeline, against the simulated server at the demo's 500 +/- 150 ms latency; the
   speed-up is printed beside the source documents' 10.33 s -> 1.86 s (5.55x). Target: above it.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from typing import Any

import anyio
from anyio.lowlevel import checkpoint

import pipeline as pl
from pipeline import Inbox, Outbox, Pipeline, Stage
from pipeline.cli._demo import KEY_ENV, NAMES, PUBLISHED, pipelined, sequential
from pipeline.testing import SimConfig, serve

HOPS = 5


def pin_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})


def peak_rss_mb() -> float:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss, not inherited across fork+exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def bare_anyio(n: int) -> float:
    """Five hops of plain anyio memory streams, as one would write them by hand."""
    chans = [anyio.create_memory_object_stream[int](16) for _ in range(HOPS + 1)]
    count = 0

    async def source(send: Any) -> None:
        async with send:
            for i in range(n):
                await send.send(i)

    async def hop(recv: Any, send: Any) -> None:
        async with recv, send:
            async for x in recv:
                await send.send(x + 1)

    async def sink(recv: Any) -> None:
        nonlocal count
        async with recv:
            async for _ in recv:
                count += 1

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(source, chans[0][0])
        for i in range(HOPS):
            tg.start_soon(hop, chans[i][1], chans[i + 1][0])
        tg.start_soon(sink, chans[HOPS][1])
    assert count == n
    return n / (time.perf_counter() - started)


async def pipeline_rate(n: int, tracing: Any = None) -> float:
    stages = [pl.map(lambda x: x + 1, name=f"inc{i}") for i in range(HOPS)]
    started = time.perf_counter()
    report = await Pipeline(*stages, tracing=tracing).run(range(n))
    assert report.ok == n and report.balanced
    return n / (time.perf_counter() - started)


class SlowSink(Stage[int, int]):
    """A sink that yields to the loop per item and records how far the source ran ahead."""

    def __init__(self, probe: dict[str, Any]) -> None:
        super().__init__(name="slow-sink", buffer=16)
        self.probe = probe

    @property
    def is_sink(self) -> bool:
        return True

    async def run(self, inbox: Inbox[int], outbox: Outbox[int]) -> None:
        probe = self.probe
        async for env in inbox:
            probe["consumed"] += 1
            ahead = probe["produced"] - probe["consumed"]
            if ahead > probe["worst"]:
                probe["worst"] = ahead
            if probe["consumed"] == probe["mark"]:
                probe["rss_at_mark"] = peak_rss_mb()
            await checkpoint()
            await outbox.send(env)


async def backpressure(n: int, mark: int) -> dict[str, Any]:
    probe: dict[str, Any] = {"produced": 0, "consumed": 0, "worst": 0, "mark": mark}

    def source() -> Any:
        for i in range(n):
            probe["produced"] += 1
            yield {"id": i, "text": "x" * 64}

    stages: list[Stage[Any, Any]] = [
        pl.map(lambda r: {**r, "len": len(r["text"])}, buffer=64),
        pl.map(lambda r: r, buffer=32, workers=2),
        SlowSink(probe),
    ]
    started = time.perf_counter()
    report = await Pipeline(*stages).run(source())
    probe["elapsed"] = time.perf_counter() - started
    probe["rss_end"] = peak_rss_mb()
    probe["bound"] = sum(s.buffer + s.workers for s in stages) + 1
    assert report.ok == n and report.balanced
    return probe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Runtime benchmarks")
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--memory-items", type=int, default=1_000_000)
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--demo-latency-ms", type=float, default=500.0)
    parser.add_argument("--demo-jitter-ms", type=float, default=150.0)
    parser.add_argument("--part", choices=["all", "throughput", "demo", "memory"], default="all")
    args = parser.parse_args(argv)
    pin_one_core()
    options = {"use_uvloop": not args.no_uvloop}
    loop = "uvloop" if options["use_uvloop"] else "asyncio"
    n = args.items
    if args.part in ("all", "throughput"):
        throughput(n, options, loop)
    if args.part in ("all", "demo"):
        demo_speed(args.demo_latency_ms, args.demo_jitter_ms, options)
    if args.part == "memory":
        memory(args.memory_items, options)
    elif args.part == "all":  # a fresh process, so the peak RSS is the pipeline's own
        import subprocess

        cmd = [
            sys.executable,
            __file__,
            "--part",
            "memory",
            "--memory-items",
            str(args.memory_items),
        ]
        if args.no_uvloop:
            cmd.append("--no-uvloop")
        return subprocess.call(cmd)
    return 0


def throughput(n: int, options: dict[str, Any], loop: str) -> None:
    def best(fn: Any, *a: Any) -> float:
        return max(anyio.run(fn, *a, backend_options=options) for _ in range(3))

    print(f"# runtime benchmarks ({loop}, one core, best of 3, {n:,} items)")
    bare = best(bare_anyio, n)
    ours = best(pipeline_rate, n)
    noop = best(pipeline_rate, n, True)
    print(f"bare anyio, {HOPS} hops              {bare:>12,.0f} items/s   1.00x")
    print(f"pipeline, {HOPS} map stages           {ours:>12,.0f} items/s   {ours / bare:.2f}x bare")
    print(f"  target >= 50,000 items/s: {'PASS' if ours >= 50_000 else 'FAIL'}")
    print(
        f"pipeline, spans via no-op API tracer {noop:>10,.0f} items/s   "
        f"{noop / ours:.2f}x default (cost of per-item spans without an SDK if not skipped)"
    )
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:  # pragma: no cover - the [otel] extra is not installed
        pass
    else:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        sdk_n = max(n // 10, 1000)
        sdk = anyio.run(pipeline_rate, sdk_n, provider, backend_options=options)
        exporter.clear()
        print(
            f"pipeline, SDK tracing (in-memory)    {sdk:>10,.0f} items/s"
            f"   {sdk / ours:.2f}x default"
        )


async def demo_speed_test(latency_ms: float, jitter_ms: float) -> dict[str, Any]:
    """Time the demo's two halves, each against a fresh simulated server."""
    os.environ.setdefault(KEY_ENV, "demo-key-not-secret")
    config = SimConfig(latency_ms=latency_ms, jitter_ms=jitter_ms, seed=7)
    async with serve(config) as sim:
        sequential_s, _ = await sequential(sim.url, NAMES)
    async with serve(config) as sim:
        pipeline_s, _ = await pipelined(sim.url, NAMES)
        in_flight = sim.counters()["concurrent_max"]
    return {"sequential_s": sequential_s, "pipeline_s": pipeline_s, "in_flight": in_flight}


def demo_speed(latency_ms: float, jitter_ms: float, options: dict[str, Any]) -> None:
    figures = anyio.run(demo_speed_test, latency_ms, jitter_ms, backend_options=options)
    seq_s, par_s = figures["sequential_s"], figures["pipeline_s"]
    speedup = seq_s / par_s
    published = PUBLISHED[0] / PUBLISHED[1]
    print(f"# the demo's speed test: {len(NAMES)} greetings, {latency_ms:g} +/- {jitter_ms:g} ms")
    print(f"one request at a time                {seq_s:>10.2f} s      1.00x")
    print(
        f"pipeline ({figures['in_flight']} in flight at most)     {par_s:>10.2f} s"
        f"   {speedup:>6.2f}x sequential"
    )
    print(
        f"source documents: {PUBLISHED[0]:.2f} s -> {PUBLISHED[1]:.2f} s, {published:.2f}x;"
        f" ours {speedup / published:.2f}x theirs: {'PASS' if speedup > published else 'FAIL'}"
    )


def memory(m: int, options: dict[str, Any]) -> None:
    mark = min(100_000, m // 10)
    probe = anyio.run(backpressure, m, mark, backend_options=options)
    growth = probe["rss_end"] - probe["rss_at_mark"]
    print(f"# backpressure: {m:,} items, source -> map -> map(x2 workers) -> slow sink")
    print(
        f"peak RSS at item {mark:,}: {probe['rss_at_mark']:.1f} MB;"
        f" at {m:,}: {probe['rss_end']:.1f} MB"
    )
    print(f"growth {growth:.1f} MB (target < 20 MB): {'PASS' if growth < 20 else 'FAIL'}")
    print(
        f"source ahead of sink at most {probe['worst']} items (bound {probe['bound']}): "
        f"{'PASS' if probe['worst'] <= probe['bound'] else 'FAIL'}"
    )
    print(f"throughput {m / probe['elapsed']:,.0f} items/s")


if __name__ == "__main__":
    sys.exit(main())
