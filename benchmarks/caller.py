"""The LLM caller's performance targets (issue 3), every ratio taken from one run.

Run: ``python -m benchmarks.caller [--rows N] [--rounds K] [--profile]``.

The simulated server runs in its own process pinned to one core; each client runs in its own
process pinned to the other (``benchmarks/_contenders.py``: the same clients as the suite).

1. Throughput against a zero-latency server, concurrency 64, the best of ``--rounds``
   alternating runs of each: ``Pipeline(rows, LLMCaller(...))`` must reach >= 0.90 of the
   requests/s of bare aiohttp + ``asyncio.gather`` + a semaphore, and >= 10x the official
   ``openai`` SDK (``AsyncOpenAI`` + a semaphore, ``max_retries=0``). At concurrency 64 the
   round trip between the two processes bounds both clients; the same comparison is made again
   at concurrency 256 (``--saturated``), where the client's core is the bottleneck and the
   caller's CPU cost per request decides.
2. Rate limits: against a server enforcing R requests/minute, a job configured with ``rpm=R``
   must finish with no 429 and >= 0.95 of the throughput the quota allows; with no limit
   configured it must learn the limit from the headers and 429s and still reach >= 0.85.
   Throughput the quota allows: after the server's initial burst (one second of quota), R/60
   requests per second; the share is that least possible time over the time taken.

``--profile`` also runs the caller under cProfile in this process and prints where its time
goes. Results are written to ``benchmarks/results/caller.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._contenders import LABELS, Job
from benchmarks.run import RESULTS, Server, Worker, cores, machine
from benchmarks.scenarios import GREETING

CONCURRENCY = 64
SATURATED = 256
RPM = 6_000


def _job(contender: str, url: str, rows: int, **extra: Any) -> Job:
    concurrency = extra.pop("concurrency", CONCURRENCY)
    return Job(
        contender=contender,
        scenario="caller",
        base_url=url,
        rows=rows,
        template=GREETING,
        concurrency=concurrency,
        retries=extra.pop("retries", 4),
        **extra,
    )


def _check(result: dict[str, Any], what: str) -> None:
    if result.get("error") or result["correct"] != result["rows"]:
        raise SystemExit(
            f"{what}: {result['correct']}/{result['rows']} rows correct, error {result['error']}"
        )


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def throughput(
    server: Server,
    workers: dict[str, Worker],
    rows: int,
    rounds: int,
    concurrency: int,
    sdk_rows: int | None,
) -> dict[str, Any]:
    """Best-of-``rounds`` requests/s of bare aiohttp and of the caller (alternating), and of
    the SDK when ``sdk_rows`` is given. Runs during which the client or the server waited for a
    CPU more than 10% of the time (other processes) count only if every run did."""
    runs: dict[str, list[dict[str, Any]]] = {}
    order = ["aiohttp", "pipeline"] * rounds
    if sdk_rows:
        order += ["openai"] * max(1, rounds - 1)
    for contender in order:
        n = sdk_rows if contender == "openai" and sdk_rows else rows
        server.configure({})
        cpu0, wait0 = server.cpu_s(), server.wait_s()
        extra: dict[str, Any] = {"concurrency": concurrency}
        if contender == "openai":
            extra["retries"] = 0
        result = workers[contender].run(_job(contender, server.url, n, **extra), timeout=600)
        _check(result, contender)
        requests = server.counters()["requests"]
        rate = requests / result["elapsed_s"]
        waited = result["cpu_wait_s"] + server.wait_s() - wait0
        run = {
            "requests_per_s": rate,
            "cpu_per_1k": result["cpu_s"] / requests * 1000,
            "server_cpu_per_1k": (server.cpu_s() - cpu0) / requests * 1000,
            "rows": n,
            "cpu_wait_s": waited,
            "contended": waited > 0.1 * result["elapsed_s"],
        }
        print(
            f"  {LABELS[contender]:<26} {rate:8,.0f} req/s   client CPU "
            f"{run['cpu_per_1k']:.2f} s/1k req   server CPU {run['server_cpu_per_1k']:.2f} s/1k"
            f"   waited for a CPU {waited:.2f} s" + ("  (contended)" if run["contended"] else ""),
            flush=True,
        )
        runs.setdefault(contender, []).append(run)
    best: dict[str, dict[str, Any]] = {}
    for contender, tries in runs.items():
        # other processes share the machine: prefer runs they did not hold off a CPU
        clean = [r for r in tries if not r["contended"]] or tries
        best[contender] = max(clean, key=lambda r: r["requests_per_s"])
    return best


def rate_limited(server: Server, workers: dict[str, Worker], rows: int) -> dict[str, Any]:
    """The caller configured at the quota, then with no limit set, against RPM quota."""
    sim = {"rpm": RPM}
    rate = RPM / 60
    ideal = max(0.0, rows - rate * 1.0) / rate
    out = {}
    for contender, extra in (("pipeline", {"rpm": RPM}), ("pipeline-learn", {})):
        server.configure(sim)
        result = workers[contender].run(_job(contender, server.url, rows, **extra), timeout=600)
        _check(result, contender)
        counters = server.counters()
        out[contender] = {
            "elapsed_s": result["elapsed_s"],
            "rows_per_s": rows / result["elapsed_s"],
            "share": ideal / result["elapsed_s"],
            "http_429": counters["http_429"],
            "requests": counters["requests"],
            "peak_rps": counters["timestamps"]["peak_rps"],
        }
    return out


def profile(url: str, rows: int) -> None:
    """Run the caller under cProfile in this process and print where the time goes."""
    import cProfile
    import pstats

    from benchmarks._contenders import run_job

    job = _job("pipeline", url, rows)
    profiler = cProfile.Profile()
    profiler.enable()
    result = run_job(job)
    profiler.disable()
    _check(result, "profile")
    print(f"\n# cProfile of the caller, {rows:,} rows (slowed down by profiling)")
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.caller", description=__doc__)
    parser.add_argument("--rows", type=int, default=6_000, help="rows per throughput run")
    parser.add_argument("--sdk-rows", type=int, default=2_000, help="rows per SDK run")
    parser.add_argument("--rounds", type=int, default=5, help="alternating runs of each")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument(
        "--saturated",
        type=int,
        default=SATURATED,
        help="a second concurrency at which the client's core is saturated (0: skip)",
    )
    parser.add_argument("--rate-rows", type=int, default=1_500, help="rows per quota run")
    parser.add_argument("--profile", action="store_true", help="also profile the caller")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    server_cpus, client_cpus = cores()
    started = time.perf_counter()
    server = Server(server_cpus)
    workers: dict[str, Worker] = {}
    passes: list[dict[str, Any]] = []
    try:
        for contender in ("aiohttp", "pipeline", "openai", "pipeline-learn"):
            workers[contender] = Worker(contender, None)
        for worker in workers.values():
            worker.wait_ready()
            worker.pin(client_cpus)
        print(
            f"# zero-latency server, concurrency {args.concurrency}, best of {args.rounds} "
            f"alternating runs ({args.rows:,} rows; SDK {args.sdk_rows:,} rows)",
            flush=True,
        )
        best = throughput(server, workers, args.rows, args.rounds, args.concurrency, args.sdk_rows)
        passes.append({"concurrency": args.concurrency, "best": best})
        if args.saturated:
            print(
                f"# the same at concurrency {args.saturated}, where the client's core is the "
                f"bottleneck ({args.rows // 2:,} rows)",
                flush=True,
            )
            best = throughput(server, workers, args.rows // 2, args.rounds, args.saturated, None)
            passes.append({"concurrency": args.saturated, "best": best})
        print(f"# rate limit: server quota {RPM:,} requests/min, {args.rate_rows:,} rows")
        limits = rate_limited(server, workers, args.rate_rows)
        if args.profile:
            server.configure({})
            profile(server.url, args.rows // 2)
    finally:
        for worker in workers.values():
            worker.close()
        server.close()

    checks: list[tuple[str, float, str, bool]] = []
    print()
    for run in passes:
        best, concurrency = run["best"], run["concurrency"]
        bare, ours = best["aiohttp"], best["pipeline"]
        speed = ours["requests_per_s"] / bare["requests_per_s"]
        cost = ours["cpu_per_1k"] / bare["cpu_per_1k"]
        print(
            f"concurrency {concurrency}: bare aiohttp {bare['requests_per_s']:,.0f} req/s, "
            f"LLMCaller {ours['requests_per_s']:,.0f} req/s = {speed:.2f}x; CPU per request "
            f"{cost:.2f}x bare's"
        )
        checks.append(
            (f"caller / bare aiohttp requests/s, concurrency {concurrency}", speed, ">= 0.90",
             speed >= 0.90)
        )  # fmt: skip
        if "openai" in best:
            sdk = best["openai"]["requests_per_s"]
            times = ours["requests_per_s"] / sdk
            print(f"  openai SDK (max_retries=0) {sdk:,.0f} req/s: the caller does {times:.1f}x")
            checks.append(
                (f"caller / openai SDK requests/s, concurrency {concurrency}",
                 ours["requests_per_s"] / sdk, ">= 10", ours["requests_per_s"] / sdk >= 10)
            )  # fmt: skip
    configured, learned = limits["pipeline"], limits["pipeline-learn"]
    checks += [
        ("configured rpm: share of quota", configured["share"], ">= 0.95",
         configured["share"] >= 0.95),
        ("configured rpm: 429s", configured["http_429"], "== 0", configured["http_429"] == 0),
        ("no limit set: share of quota", learned["share"], ">= 0.85", learned["share"] >= 0.85),
    ]  # fmt: skip
    for name, figures in (("configured rpm", configured), ("no limit set", learned)):
        print(
            f"{name:<16} {figures['rows_per_s']:6.1f} rows/s ({RPM / 60:.0f}/s allowed), share "
            f"{figures['share']:.3f}, {figures['http_429']} x 429, peak {figures['peak_rps']}/s"
        )
    print()
    for name, value, target, ok in checks:
        shown = str(value) if isinstance(value, int) else f"{value:.2f}"
        print(f"{verdict(ok)}  {name}: {shown} (target {target})")
    data = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": time.perf_counter() - started,
        "machine": machine(),
        "args": vars(args) | {"out": str(args.out)},
        "throughput": passes,
        "rate_limit": limits | {"rpm": RPM},
        "checks": [{"name": n, "value": v, "target": t, "pass": ok} for n, v, t, ok in checks],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "caller.json").write_text(json.dumps(data, indent=1) + "\n")
    return 0 if all(ok for *_, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
