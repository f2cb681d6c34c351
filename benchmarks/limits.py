"""Limits that follow the provider's accounting (issue 13): every ratio measured in one run.

Run: ``python -m benchmarks.limits [--only NAME ...] [--rows N] [--plot PATH]``.

Each scenario runs the caller against a rate-limited server and compares the time taken with
the quota's *ideal schedule*: a bucket of ``C`` requests full at the start and refilled at
``R`` per minute lets ``N`` rows go in ``max(0, N - C) / (R / 60)`` seconds, plus one round
trip for the last answer. The ratio is that ideal over the time taken (1.0 = the quota used
to the full). Servers:

* the built-in simulator (``python -m pipeline sim`` in a child process), configured per run;
* a peer: ``llmock`` (PyPI, installed by the dev extra), a rate-limited mock server no one here
  wrote: 600 RPM, bucket full at the start, ``x-ratelimit-*`` headers
  (``remaining-requests: 599`` after the first request), 429 with the real wait beyond it.

Scenarios and their targets (issue 13's "Done when"):

1. ``fresh``: 600 RPM, 900 rows, concurrency 64, on the simulator and on the peer:
   configured ``rpm=600`` >= 0.95, nothing configured (learned from headers) >= 0.90, 429s at
   most 1% of requests.
2. ``short-window``: the simulator enforces 600 RPM as 10 per second while its headers report
   the minute; >= 0.90 of the 10/s schedule.
3. ``rpm-tpm``: 600 RPM and a token limit that binds; >= 0.95 of the binding limit.
4. ``redis``: three processes sharing one Redis limiter on one 600 RPM quota; >= 0.90
   together, 429s at most 1%.
5. ``faults``: isolated 429s (headers show capacity) and 5xx; at most 1.25x the time of a
   hand-written semaphore-and-retry aiohttp loop (best of alternating runs).
6. ``budget``: 20 runs with different budgets; spend never above the budget by more than the
   requests in flight, and the rows left unsent are reported.

Results go to ``benchmarks/results/limits.json``; ``--plot`` draws requests per second over
time against the quota for the ``fresh`` run on the simulator (docs/limits.md's picture).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.run import RESULTS, ROOT, Server, cores, machine

RPM = 600
ROWS = 900
CONCURRENCY = 64
LATENCY_MS = 20
PROMPT = "Write a short greeting for {name} from {city}, customer number {id}."
NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "John")
KEY_ENV = "LIMITS_BENCH_KEY"


def rows(n: int, start: int = 0) -> Iterator[dict[str, Any]]:
    for i in range(start, start + n):
        yield {"id": i, "name": NAMES[i % len(NAMES)], "city": f"City{i % 10}"}


def ideal_s(n: int, per_minute: float, capacity: float, rtt_s: float = 0.0) -> float:
    """The least time a bucket of ``capacity`` refilled at ``per_minute`` allows ``n`` in."""
    return max(0.0, n - capacity) / (per_minute / 60.0) + rtt_s


# ---------------------------------------------------------------------------- servers


class Peer:
    """``llmock serve`` in a child process: the peer's rate-limited mock server."""

    def __init__(self, rpm: int) -> None:
        binary = shutil.which("llmock")
        if binary is None:
            raise RuntimeError("llmock is not installed: pip install -e '.[dev]'")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        command = [binary, "serve", "--port", str(self.port), "--rpm", str(rpm)]
        command += ["--log-level", "warning", "--response-style", "static"]
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"
        deadline = time.monotonic() + 30
        while True:
            try:
                self._call("POST", "/_llmock/reset")
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("llmock did not start") from None
                time.sleep(0.2)

    def _call(self, method: str, path: str) -> Any:
        request = urllib.request.Request(self.root + path, data=None, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def reset(self) -> None:
        """Forget the journal and refill every bucket (a fresh key)."""
        self._call("POST", "/_llmock/reset")

    def counters(self) -> dict[str, Any]:
        records = self._call("GET", "/_llmock/requests")["requests"]
        return {
            "requests": len(records),
            "http_429": sum(1 for r in records if r["status"] == 429),
            "starts": sorted(r["started_at"] for r in records),
        }

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Redis:
    """A throwaway ``redis-server`` on 127.0.0.1 (tests/redis_server.py)."""

    def __init__(self) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        from redis_server import RedisServer

        self._server = RedisServer()
        self._server.start()
        self.url = self._server.url

    def close(self) -> None:
        self._server.stop()


# ---------------------------------------------------------------------------- the client


def caller_options(**options: Any) -> dict[str, Any]:
    base = {
        "model": "sim-1",
        "prompt": PROMPT,
        "api_key_env": KEY_ENV,
        "params": {"max_tokens": 32},
        "concurrency": CONCURRENCY,
        "max_retries": 8,
    }
    base.update(options)
    return base


def run_caller(url: str, n: int, *, start: int = 0, **options: Any) -> dict[str, Any]:
    """Run ``Pipeline(LLMCaller(...))`` over ``n`` rows in this process; return its figures."""
    import anyio

    import pipeline as pl
    from stages import LLMCaller

    os.environ[KEY_ENV] = f"sk-limits-{uuid.uuid4().hex}"  # a fresh key: a fresh bucket
    caller = LLMCaller(base_url=url, **caller_options(**options))
    answered = failed = 0
    stats: dict[str, Any] = {}

    async def main() -> None:
        nonlocal answered, failed
        limiter = None
        async with pl.Pipeline(caller).open(rows(n, start)) as results:
            async for _ in results:
                answered += 1
                limiter = limiter or caller.run_state.limiter
        report = results.report
        assert report is not None
        failed = len(report.failures)
        stats["limiter"] = limiter.statistics()._asdict() if limiter is not None else None
        stats["totals"] = dataclasses.asdict(caller.totals)
        stats["report_stop"] = getattr(report, "stopped", None)

    started = time.perf_counter()
    anyio.run(main)
    elapsed = time.perf_counter() - started
    return {"elapsed_s": elapsed, "answered": answered, "failed": failed, **stats}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# ---------------------------------------------------------------------------- scenarios


def fresh(sim: Server, peer: Peer | None, n: int) -> list[dict[str, Any]]:
    """A fresh 600 RPM bucket, ``n`` rows: configured and learned, simulator and peer."""
    out = []
    servers: list[tuple[str, Any]] = [("simulator", sim)]
    if peer is not None:
        servers.append(("llmock", peer))
    for server_name, server in servers:
        for mode, options in (("configured", {"rpm": RPM}), ("learned", {})):
            if server is sim:
                sim.configure({"rpm": RPM, "burst_s": 60, "latency_ms": LATENCY_MS})
            else:
                server.reset()
            result = run_caller(server.url, n, **options)
            counters = server.counters()
            ideal = ideal_s(n, RPM, RPM, LATENCY_MS / 1000 if server is sim else 0.0)
            ratio = ideal / result["elapsed_s"]
            share_429 = counters["http_429"] / max(counters["requests"], 1)
            target = 0.95 if mode == "configured" else 0.90
            ok = ratio >= target and share_429 <= 0.01 and result["answered"] == n
            out.append(
                {
                    "scenario": "fresh",
                    "server": server_name,
                    "mode": mode,
                    "rows": n,
                    "ideal_s": ideal,
                    "ratio": ratio,
                    "target": target,
                    "requests": counters["requests"],
                    "http_429": counters["http_429"],
                    "share_429": share_429,
                    "pass": ok,
                    "per_second": counters.get("per_second"),
                    **result,
                }
            )
            _print(out[-1], f"{server_name}, {mode}")
    return out


def _print(run: dict[str, Any], label: str) -> None:
    print(
        f"  {run['scenario']:<13} {label:<28} {run['elapsed_s']:6.1f} s  ideal "
        f"{run['ideal_s']:5.1f} s  ratio {run['ratio']:.3f} (>= {run['target']:.2f})  "
        f"429s {run['http_429']}/{run['requests']}  answered {run['answered']}/{run['rows']}  "
        f"{verdict(run['pass'])}",
        flush=True,
    )


SCENARIOS: dict[str, Callable[..., list[dict[str, Any]]]] = {"fresh": fresh}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.limits", description=__doc__)
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="scenarios to run")
    parser.add_argument("--rows", type=int, default=ROWS, help="rows of the fresh-bucket runs")
    parser.add_argument("--no-peer", action="store_true", help="skip the llmock server")
    parser.add_argument("--plot", type=Path, help="draw the simulator's fresh run to this PNG")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    server_cpus, _ = cores()
    sim = Server(server_cpus)
    peer = None if args.no_peer else Peer(RPM)
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for name in args.only or list(SCENARIOS):
            print(f"# {name}", flush=True)
            runs += SCENARIOS[name](sim, peer, args.rows)
    finally:
        sim.close()
        if peer is not None:
            peer.close()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "elapsed_s": time.perf_counter() - started,
        "runs": runs,
    }
    (args.out / "limits.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.plot is not None:
        plot(runs, args.plot)
    failed = [r for r in runs if not r["pass"]]
    print(f"# {len(runs) - len(failed)} PASS, {len(failed)} FAIL", flush=True)
    return 1 if failed else 0


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Requests per second over time against the quota, for the simulator's fresh runs."""
    with contextlib.suppress(ImportError):
        import matplotlib

        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in runs if r["scenario"] == "fresh" and r.get("per_second")]
    if not chosen:
        print("nothing to plot: no fresh run on the simulator", flush=True)
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    for run in chosen:
        seconds = run["per_second"]
        xs = [s for s, _ in seconds]
        ys = [c for _, c in seconds]
        ax.step(xs, ys, where="post", label=f"{run['mode']} (ratio {run['ratio']:.2f})")
    ax.axhline(RPM / 60, color="grey", linestyle="--", label="refill rate (600 RPM)")
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel("requests per second (log)")
    ax.set_yscale("log")
    ax.set_title(f"{chosen[0]['rows']} rows, fresh 600 RPM bucket, concurrency {CONCURRENCY}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"picture written to {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
