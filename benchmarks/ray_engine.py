"""The same file job on the local engine and on Ray Data, from one run.

    python -m benchmarks.ray_engine                    # 20,000 rows, 50 ms server latency
    python -m benchmarks.ray_engine --rows 5000 --latency-ms 20 --actors 2

The simulated server runs in its own process. One JSONL input of ``--rows`` rows goes through
``run_job`` twice with the same settings (model, prompt, concurrency): once with
``engine="local"`` and once with ``engine="ray"`` on a local Ray started here with
``--ray-cpus`` CPUs (the Ray start-up is timed apart: a cluster is usually running already).
Both outputs must hold every row with the right answer. The script prints rows/s for each
engine (whole job: reading, calls, writing, publishing; for Ray, the actors' start-up too)
and the Ray overhead, ``ray time / local time``, and writes the figures to
``benchmarks/results/ray_engine.json``.

On one machine Ray cannot be faster than the local engine: the calls wait on the network
either way and the concurrency is the same; Ray adds actor start-up, serialization between
processes and its scheduler. Its point is a cluster: many machines, each with its own CPUs,
sharing one limit through Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run import RESULTS, Server, machine  # noqa: E402


def write_input(path: Path, rows: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"id": i, "name": f"user {i}"}) + "\n")


def check_output(path: Path, rows: int) -> None:
    seen = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["response"] != f"echo: Say hello to {row['name']}":
                raise SystemExit(f"{path}: wrong answer {row['response']!r} for row {row['id']}")
            seen.add(row["id"])
    if seen != set(range(rows)):
        raise SystemExit(f"{path}: {len(seen)} distinct rows of {rows}")


async def run_engine(
    engine: str, url: str, inp: Path, out: Path, concurrency: int, actors: int
) -> dict[str, Any]:
    from pipeline.jobs import JobSettings, run_job
    from pipeline.jobs._ray import run_job_on_ray

    settings = JobSettings(
        input=str(inp),
        output=str(out),
        model="m",
        prompt="Say hello to {name}",
        base_url=url,
        concurrency=concurrency,
        engine=engine,  # type: ignore[arg-type]
        quiet=True,
    )
    started = time.perf_counter()
    if engine == "ray":
        summary = await run_job_on_ray(settings, actors=actors)
    else:
        summary = await run_job(settings)
    elapsed = time.perf_counter() - started
    if not summary.complete:
        raise SystemExit(f"{engine}: the job did not complete ({summary.stopped})")
    return {
        "engine": engine,
        "rows": summary.ok,
        "failed": summary.failed,
        "requests": summary.requests,
        "elapsed_s": round(elapsed, 3),
        "rows_per_s": round(summary.ok / elapsed, 1),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    server = Server(None)
    try:
        server.configure({"latency_ms": args.latency_ms})
        with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
            work = Path(tmp)
            inp = work / "in.jsonl"
            write_input(inp, args.rows)
            local = await run_engine(
                "local", server.url, inp, work / "local.jsonl", args.concurrency, args.actors
            )
            check_output(work / "local.jsonl", args.rows)
            local["server_requests"] = server.counters()["requests"]

            started = time.perf_counter()
            ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
            ray_start = time.perf_counter() - started
            try:
                server.configure({"latency_ms": args.latency_ms})
                on_ray = await run_engine(
                    "ray", server.url, inp, work / "ray.jsonl", args.concurrency, args.actors
                )
                check_output(work / "ray.jsonl", args.rows)
                on_ray["server_requests"] = server.counters()["requests"]
                on_ray["ray_init_s"] = round(ray_start, 3)
            finally:
                ray.shutdown()
    finally:
        server.close()
    return {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "rows": args.rows,
        "latency_ms": args.latency_ms,
        "concurrency": args.concurrency,
        "actors": args.actors,
        "local": local,
        "ray": on_ray,
        "ray_overhead": round(on_ray["elapsed_s"] / local["elapsed_s"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--actors", type=int, default=2, help="Ray actors")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray")
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENAI_API_KEY", "sk-benchmark-not-a-secret")
    result = asyncio.run(main_async(args))
    local, on_ray = result["local"], result["ray"]
    print(
        f"{args.rows} rows, server latency {args.latency_ms:g} ms, {args.concurrency} requests"
        f" in flight ({args.actors} Ray actors)"
    )
    print(f"{'engine':<8}{'seconds':>10}{'rows/s':>10}")
    for run in (local, on_ray):
        print(f"{run['engine']:<8}{run['elapsed_s']:>10.2f}{run['rows_per_s']:>10.0f}")
    print(f"Ray overhead: {result['ray_overhead']:.2f}x the local time")
    print(f"(ray.init took {on_ray['ray_init_s']:.1f} s more, not counted)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "ray_engine.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
