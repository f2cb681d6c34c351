"""Several endpoints for one job (issue 20): throughput against the combined quota, failover.

Run: ``python -m benchmarks.routing [--rows N] [--rpm R] [--only combined|killed]``.

Two simulators (``pipeline.testing.serve``), each with its own quota of ``R`` requests per
minute and a fresh key's bucket (a whole minute's worth full at the start, as OpenAI and
Anthropic start one), serve one routed caller (``Routing`` over two ``Deployment`` s, no
configured limits: each endpoint's limiter learns its quota from its own headers).

* ``combined``: ``N`` rows; the ideal schedule of the combined quota lets the first ``2R``
  rows go at once and the rest at ``2R`` per minute: ``max(0, N - 2R) / (2R / 60)`` seconds
  plus one round trip. Ratio = ideal / measured (target >= 0.90); 429s over requests (<= 1%).
* ``killed``: the same, and the second endpoint is shut down (its server closed: connections
  refused) halfway through the ideal schedule; the ideal is then both quotas until the kill
  and the survivor's alone after it. Every row must be answered exactly once, and
  every row after the kill by the survivor: the dying endpoint's answers to the client are at
  most the answers its server had given when it closed (requests in flight at the kill are
  cut and answered again by the survivor, never twice).

Results go to ``benchmarks/results/routing.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import time
from typing import Any

import anyio

import pipeline as pl
from benchmarks.run import RESULTS, machine
from pipeline.testing import SimConfig, serve
from stages.llm import HTTP, Deployment, Limits, LLMCaller, Retry, Routing

ROWS = 900
RPM = 300
LATENCY_MS = 20
CONCURRENCY = 64
PROMPT = "Write a short greeting for {name}, customer number {id}."


def ideal_s(n: int, per_minute: float, capacity: float, rtt_s: float = 0.0) -> float:
    """The least time buckets of ``capacity`` refilled at ``per_minute`` allow ``n`` in."""
    return max(0.0, n - capacity) / (per_minute / 60.0) + rtt_s


def make_caller(urls: list[str]) -> LLMCaller:
    """The routed caller: one endpoint per simulator, each with its own (fresh) key."""
    endpoints = []
    for index, url in enumerate(urls):
        env = f"ROUTING_BENCH_KEY_{index}"
        os.environ[env] = f"sk-routing-{index}-{time.time_ns()}"
        endpoints.append(
            Deployment(name=f"ep{index}", base_url=url, api_key_env=env, model="sim-1")
        )
    return LLMCaller(
        prompt=PROMPT,
        params={"max_tokens": 32},
        provider=Routing(endpoints=endpoints),
        limits=Limits(max_concurrency=CONCURRENCY),
        retry=Retry(max_retries=8),
        output="completion",
        http=HTTP(timeout=30),
    )


async def run(n: int, rpm: int, *, kill_at: float | None) -> dict[str, Any]:
    """Run ``n`` rows over two simulators; shut the second down ``kill_at`` seconds in."""
    config = SimConfig(rpm=rpm, burst_s=60.0, latency_ms=LATENCY_MS)
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(serve(config))
        second_stack = contextlib.AsyncExitStack()
        second = await second_stack.enter_async_context(serve(config))
        caller = make_caller([first.url, second.url])
        seen: dict[int, str | None] = {}
        duplicates = 0
        after_kill: list[str | None] = []
        killed_at: float | None = None
        counters_second: dict[str, Any] = {}
        started = time.perf_counter()
        rows = ({"id": i, "name": f"N{i % 7}"} for i in range(n))
        async with pl.Pipeline(caller).open(rows) as results:
            async for completion in results:
                key = int(completion.text.rsplit(" ", 1)[-1].rstrip("."))
                duplicates += key in seen
                seen[key] = completion.endpoint
                if killed_at is not None:
                    after_kill.append(completion.endpoint)
                now = time.perf_counter() - started
                if kill_at is not None and killed_at is None and now >= kill_at:
                    await second_stack.aclose()  # the endpoint goes away: connections refused
                    counters_second = second.counters()
                    killed_at = time.perf_counter() - started
        elapsed = time.perf_counter() - started
        if killed_at is None:
            counters_second = second.counters()
            await second_stack.aclose()
        counters = [first.counters(), counters_second]
    figures = caller.totals
    requests = sum(c["requests"] for c in counters)
    throttled = sum(c["http_429"] for c in counters)
    capacity = 2 * rpm  # two fresh buckets of a minute's worth each
    ideal = ideal_s(n, 2 * rpm, capacity, LATENCY_MS / 1000)
    if killed_at is not None:  # both quotas until the kill, the survivor's alone after it
        by_kill = capacity + 2 * rpm / 60 * killed_at
        if n > by_kill:
            ideal = killed_at + (n - by_kill) / (rpm / 60) + LATENCY_MS / 1000
    return {
        "rows": n,
        "answered": len(seen),
        "duplicates": duplicates,
        "missing": n - len(seen),
        "elapsed_s": round(elapsed, 2),
        "ideal_s": round(ideal, 2),
        "ratio": round(ideal / elapsed, 3),
        "requests": requests,
        "http_429": throttled,
        "share_429": round(throttled / max(1, requests), 4),
        "by_endpoint": {
            name: sum(1 for e in seen.values() if e == name) for name in ("ep0", "ep1")
        },
        "killed_at_s": None if killed_at is None else round(killed_at, 2),
        "after_kill": len(after_kill),
        "after_kill_by_survivor": sum(1 for e in after_kill if e == "ep0"),
        "second_answers_seen_by_client": sum(1 for e in seen.values() if e == "ep1"),
        "second_answers_sent_by_server": sum(
            route.get("200", 0) for route in counters_second.get("by_route", {}).values()
        ),
        "cache_hits": figures.cache_hits,
        "endpoints": None if caller.router is None else caller.router.figures(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--rpm", type=int, default=RPM)
    parser.add_argument("--only", choices=["combined", "killed"], action="append")
    args = parser.parse_args()
    chosen = args.only or ["combined", "killed"]
    results: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    for name in chosen:
        ideal = ideal_s(args.rows, 2 * args.rpm, 2 * args.rpm)
        kill_at = ideal / 2 if name == "killed" else None
        figures = anyio.run(lambda: run(args.rows, args.rpm, kill_at=kill_at))  # noqa: B023
        results[name] = figures
        shown = {k: v for k, v in figures.items() if k != "endpoints"}
        print(name, json.dumps(shown))
        for row in figures["endpoints"] or []:
            print("   ", json.dumps(row))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "routing.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
