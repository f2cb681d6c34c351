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
6. ``budget``: 20 runs with different budgets; the simulator's bill never above the budget
   (every request reserved its worst case before it went), and the rows left unsent (read
   but not sent: ``CallerTotals.unsent``; not read) add up with the answered to every row.

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


def make_caller(url: str, *, limiter: Any = None, output: Any = None, **limits: Any) -> Any:
    """The caller every scenario runs: 64 at once, 8 retries, the limits given."""
    from stages.llm._caller import HTTP, Limits, LLMCaller, Retry

    return LLMCaller(
        model="sim-1",
        prompt=PROMPT,
        base_url=url,
        params={"max_tokens": 32},
        limits=Limits(concurrency=CONCURRENCY, limiter=limiter, **limits),
        retry=Retry(max_retries=8),
        output=output or "merge",
        http=HTTP(api_key_env=KEY_ENV),
    )


def run_caller(
    url: str, n: int, *, start: int = 0, key: str | None = None, **options: Any
) -> dict[str, Any]:
    """Run ``Pipeline(LLMCaller(...))`` over ``n`` rows in this process; return its figures."""
    import anyio

    import pipeline as pl

    os.environ[KEY_ENV] = key or f"sk-limits-{uuid.uuid4().hex}"  # a fresh key: fresh bucket
    caller = make_caller(url, **options)
    answered = 0
    stats: dict[str, Any] = {"error": None}

    async def main() -> None:
        nonlocal answered
        limiter = None
        try:
            async with pl.Pipeline(caller).open(rows(n, start)) as results:
                async for _ in results:
                    answered += 1
                    limiter = limiter or caller.run_state.admission.limiter
        except Exception as error:  # a budget stop ends the run with its error
            stats["error"] = f"{type(error).__name__}: {error}"
        stats["limiter"] = limiter.statistics()._asdict() if limiter is not None else None
        stats["totals"] = dataclasses.asdict(caller.totals)

    started = time.perf_counter()
    anyio.run(main)
    elapsed = time.perf_counter() - started
    return {"elapsed_s": elapsed, "answered": answered, **stats}


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
            target = 0.95 if mode == "configured" else 0.90
            out.append(
                _row(
                    "fresh",
                    mode,
                    n,
                    target,
                    result,
                    counters,
                    ideal,
                    server=server_name,
                    shown=f"{server_name}, {mode}",
                )
            )
    return out


def _print(run: dict[str, Any], label: str) -> None:
    print(
        f"  {run['scenario']:<13} {label:<28} {run['elapsed_s']:6.1f} s  ideal "
        f"{run['ideal_s']:5.1f} s  ratio {run['ratio']:.3f} (>= {run['target']:.2f})  "
        f"429s {run['http_429']}/{run['requests']}  answered {run['answered']}/{run['rows']}  "
        f"{verdict(run['pass'])}",
        flush=True,
    )


def _sim_run(
    sim: Server, config: dict[str, Any], n: int, ideal: Callable[[dict[str, Any]], float], **kw: Any
) -> tuple[dict[str, Any], dict[str, Any], float]:
    sim.configure({"latency_ms": LATENCY_MS, **config})
    result = run_caller(sim.url, n, **kw)
    counters = sim.counters()
    return result, counters, ideal(counters) + LATENCY_MS / 1000


def _row(scenario: str, label: str, n: int, target: float, result: dict[str, Any],
         counters: dict[str, Any], ideal: float, *, max_429: float | None = 0.01,
         server: str = "simulator", shown: str | None = None,
         **extra: Any) -> dict[str, Any]:  # fmt: skip
    ratio = ideal / result["elapsed_s"]
    share_429 = counters["http_429"] / max(counters["requests"], 1)
    ok = ratio >= target and result["answered"] == n
    if max_429 is not None:
        ok = ok and share_429 <= max_429
    run = {
        "scenario": scenario,
        "mode": label,
        "server": server,
        "rows": n,
        "ideal_s": ideal,
        "ratio": ratio,
        "target": target,
        "requests": counters["requests"],
        "http_429": counters["http_429"],
        "share_429": share_429,
        "pass": ok,
        "per_second": counters.get("per_second"),
        **extra,
        **result,
    }
    _print(run, shown or label)
    return run


def short_window(sim: Server, peer: Peer | None, n: int) -> list[dict[str, Any]]:
    """600 RPM enforced as 10 a second while the headers report the minute."""
    rows_ = n // 3
    config = {"rpm": RPM, "burst_s": 60, "window_s": 1.0}
    result, counters, ideal = _sim_run(
        sim, config, rows_, lambda c: ideal_s(rows_, RPM, RPM / 60), rpm=RPM
    )
    run = _row("short-window", "10/s windows, rpm=600", rows_, 0.90, result, counters, ideal,
               max_429=None)  # fmt: skip
    return [run]


def rpm_tpm(sim: Server, peer: Peer | None, n: int) -> list[dict[str, Any]]:
    """600 RPM and a token limit that binds; the ideal is the binding limit's."""
    rows_, tpm = 2 * n // 3, 15_000
    config = {"rpm": RPM, "tpm": tpm, "burst_s": 60}

    def ideal(counters: dict[str, Any]) -> float:
        tokens = counters["prompt_tokens"] + counters["completion_tokens"]
        return max(ideal_s(rows_, RPM, RPM), ideal_s(tokens, tpm, tpm))

    result, counters, best = _sim_run(sim, config, rows_, ideal, rpm=RPM, tpm=tpm)
    return [_row("rpm-tpm", f"rpm=600, tpm={tpm:,}", rows_, 0.95, result, counters, best)]


def redis(sim: Server, peer: Peer | None, n: int) -> list[dict[str, Any]]:
    """Three processes sharing one Redis limiter on one 600 RPM quota."""
    server = Redis()
    try:
        sim.configure({"rpm": RPM, "burst_s": 60, "latency_ms": LATENCY_MS})
        share = n // 3
        key = f"sk-limits-{uuid.uuid4().hex}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), KEY_ENV: key}
        code = "import sys; from benchmarks.limits import client; client(sys.argv[1:])"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, sim.url, server.url, str(share), str(i * share)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                cwd=ROOT,
            )
            for i in range(3)
        ]
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        started = time.perf_counter()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outs = [json.loads(proc.communicate(timeout=600)[0].splitlines()[-1]) for proc in procs]
        elapsed = time.perf_counter() - started
    finally:
        server.close()
    counters = sim.counters()
    result = {"elapsed_s": elapsed, "answered": sum(o["answered"] for o in outs), "clients": outs}
    ideal = ideal_s(3 * share, RPM, RPM, LATENCY_MS / 1000)
    return [_row("redis", "3 processes, rpm=600", 3 * share, 0.90, result, counters, ideal)]


def client(argv: list[str]) -> None:
    """One of the Redis scenario's processes: wait for ``go``, run, print the figures."""
    import anyio

    import pipeline  # noqa: F401  (imported before the start signal, not timed)
    from stages.llm._redis_limiter import RedisRateLimiter

    url, redis_url, n, start = argv[0], argv[1], int(argv[2]), int(argv[3])
    limiter = RedisRateLimiter.from_url(
        redis_url, rpm=RPM, provider="openai", api_key=os.environ[KEY_ENV], model="sim-1"
    )

    async def connect() -> None:
        await limiter.flush()  # nothing pending: only checks the client can be made

    anyio.run(connect)
    print("ready", flush=True)
    sys.stdin.readline()
    result = run_caller(url, n, start=start, key=os.environ[KEY_ENV], limiter=limiter)
    print(json.dumps({k: result[k] for k in ("elapsed_s", "answered", "totals")}), flush=True)


FAULTS = {
    "latency_ms": 50,
    "error_429": 0.05,
    "error_5xx": 0.05,
    "retry_after_s": 1,
    "rpm": 600_000,  # so the headers show the capacity left: the 429s are isolated
    "burst_s": 60,
    "seed": 7,
}


def faults(sim: Server, peer: Peer | None, n: int) -> list[dict[str, Any]]:
    """Isolated 429s and 5xx: the caller against a hand-written semaphore-and-retry loop."""
    from benchmarks._contenders import Job, run_job

    rows_ = 2 * n
    times: dict[str, list[float]] = {"loop": [], "caller": []}
    http_429 = 0
    for _ in range(2):
        sim.configure(FAULTS)
        job = Job(contender="aiohttp", scenario="faults", base_url=sim.url, rows=rows_,
                  template=PROMPT, concurrency=CONCURRENCY, retries=8)  # fmt: skip
        loop = run_job(job)
        if loop["correct"] == rows_:
            times["loop"].append(loop["elapsed_s"])
        sim.configure(FAULTS)
        result = run_caller(sim.url, rows_)
        http_429 = sim.counters()["http_429"]
        if result["answered"] == rows_:
            times["caller"].append(result["elapsed_s"])
    best_loop = min(times["loop"], default=float("inf"))
    best = min(times["caller"], default=float("inf"))
    ratio = best / best_loop
    run = {
        "scenario": "faults",
        "mode": "5% isolated 429 + 5% 5xx",
        "server": "simulator",
        "rows": rows_,
        "elapsed_s": best,
        "loop_s": best_loop,
        "ideal_s": best_loop,
        "ratio": ratio,
        "target": 1.25,
        "requests": 0,
        "http_429": http_429,
        "answered": rows_ if times["caller"] else 0,
        "pass": ratio <= 1.25,
    }
    print(
        f"  faults        caller {best:.2f} s  hand-written loop {best_loop:.2f} s  "
        f"ratio {ratio:.2f} (<= 1.25)  {verdict(run['pass'])}",
        flush=True,
    )
    return [run]


def budget(sim: Server, peer: Peer | None, n: int) -> list[dict[str, Any]]:
    """20 runs with budgets from $0.005 to $0.1: spending against each budget."""
    from stages.llm._caller import Output

    prices = (10.0, 40.0)  # USD per 1M prompt and completion tokens: a row about $0.001
    config = {"price_prompt": prices[0], "price_completion": prices[1], "latency_ms": 20}
    runs = []
    for i in range(20):
        limit = round(0.005 * (i + 1), 4)
        sim.configure(config)
        output = Output(prices={"sim-1": prices}, budget_usd=limit)
        result = run_caller(sim.url, n, output=output)
        counters = sim.counters()
        spent = counters["spent_usd"]  # the server's bill
        unsent = n - result["answered"]
        read_unsent = result["totals"]["unsent"]  # read, then left unsent at the stop
        ok = spent <= limit + 1e-9 and result["answered"] == counters["requests"]
        runs.append({"scenario": "budget", "budget_usd": limit, "spent_usd": spent,
                     "answered": result["answered"], "unsent": unsent, "rows": n,
                     "read_unsent": read_unsent, "requests": counters["requests"],
                     "error": result["error"], "pass": ok})  # fmt: skip
    worst = max(r["spent_usd"] / r["budget_usd"] for r in runs)
    least = min(r["spent_usd"] / r["budget_usd"] for r in runs)
    print(
        f"  budget        20 runs, $0.005..$0.1: the server's bill / budget {least:.3f}.."
        f"{worst:.3f} (never above 1): {verdict(all(r['pass'] for r in runs))}; rows left "
        f"unsent {min(r['unsent'] for r in runs)}..{max(r['unsent'] for r in runs)} of {n} "
        f"(of which read, then not sent: {max(r['read_unsent'] for r in runs)} at most)",
        flush=True,
    )
    return runs


SCENARIOS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "fresh": fresh,
    "short-window": short_window,
    "rpm-tpm": rpm_tpm,
    "redis": redis,
    "faults": faults,
    "budget": budget,
}


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


def limits_section(data: dict[str, Any], path: Path) -> list[str]:
    """The limits' targets as a section of docs/benchmarks.md, from ``limits.json``."""
    table = []
    for run in data["runs"]:
        if run["scenario"] == "budget":
            continue
        if run["scenario"] == "faults":
            value = (
                f"{run['ratio']:.2f}x the loop ({run['elapsed_s']:.1f} s vs {run['loop_s']:.1f} s)"
            )
            target = "<= 1.25x"
        else:
            value = f"{run['ratio']:.3f} ({run['elapsed_s']:.1f} s, ideal {run['ideal_s']:.1f} s)"
            target = f">= {run['target']:.2f}"
        share = f"{run['http_429']}/{run['requests']}" if run.get("requests") else "-"
        label = f"{run['scenario']}: {run.get('server', 'simulator')}, {run['mode']}"
        table.append([label, value, target, share, "PASS" if run["pass"] else "FAIL"])
    budget = [r for r in data["runs"] if r["scenario"] == "budget"]
    if budget:
        over = max(r["spent_usd"] / r["budget_usd"] for r in budget)
        least = min(r["spent_usd"] / r["budget_usd"] for r in budget)
        table.append(
            [
                f"budget: {len(budget)} runs, ${budget[0]['budget_usd']:g} to "
                f"${budget[-1]['budget_usd']:g}",
                f"the server's bill {least:.3f} to {over:.3f} of the budget; rows left "
                f"unsent {min(r['unsent'] for r in budget)} to "
                f"{max(r['unsent'] for r in budget)} of {budget[0]['rows']}",
                "<= 1 (never above the budget)",
                "-",
                "PASS" if all(r["pass"] for r in budget) else "FAIL",
            ]
        )
    return [
        "## Limits that follow the provider's accounting",
        "",
        f"From `python -m benchmarks.limits` ({data['when']}, `{os.path.relpath(path, ROOT)}`; "
        "see [limits.md](limits.md)): ratio = the quota's ideal schedule (a bucket full at the "
        "start, refilled at its rate, plus one round trip) over the time taken; 600 requests "
        f"per minute, concurrency {CONCURRENCY}, against the simulator and against llmock "
        "(PyPI), a rate-limited mock server no one here wrote.",
        "",
        _md_table(["run", "measured", "target", "429s / requests", "result"], table),
        "",
    ]


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
