"""A JSONL file through ``python -m pipeline run`` beside a bare aiohttp script.

    python benchmarks/cli_job.py --rows 20000    # the figure of issue 15 (half a minute)
    python benchmarks/cli_job.py --rows 100000   # longer: start-up weighs less
    python benchmarks/cli_job.py                 # 1,000,000 rows (a few minutes)

Both contenders run as child processes against the same zero-latency simulated server (its own
process), with the same concurrency, reading the same file and writing one output row per
input row. For each the script reports rows/s over the whole process (start-up and publishing
included), CPU seconds (user and system: the server answers in about half the client's time,
so the client's CPU per row is what bounds both), peak RSS (``wait4``: the child's own
maximum) and, for the CLI, when the first output row reached its journal (measured from the
process start and from the moment the job started, i.e. when its checkpoint appeared: the
difference is Python start-up and imports).

Both start from cached bytecode, as an installed package does (pip compiles it): the children
get ``PYTHONPYCACHEPREFIX`` in the run's temporary directory, filled by a 200-row warm-up run of
each, and lose ``PYTHONDONTWRITEBYTECODE``. With that variable set (as in the development
environment) the CLI would compile its own modules from source at every start, a few tenths of
a second the bare script does not pay (its libraries come compiled); ``--no-bytecode-cache``
measures it that way.

It also reports what ``python -X importtime -m pipeline run --help`` imports (the start-up
every job pays); ``tests/test_fast_start.py`` checks that a plain JSONL job imports no heavy
optional package and none of the modules it does not use.

The machine's speed drifts between runs (a shared host: the same bare run takes from 5 to 7 s),
so one pair of runs says little. ``--repeat N`` runs N pairs, alternating which contender goes
first, and reports the median of the pairs' ratios; the server runs on the first CPU and each
contender on the second (``--no-pin`` lets the system place them), so neither contender is
measured on the other's core.

Targets (issues 4 and 15): peak RSS under 150 MB; the first row within one server latency
(zero here) plus 0.5 s of start-up; at least 0.95 of the bare script's rows/s at 20,000 rows
(``--rows 20000``), start-up included.

The bare script is what a careful user would write without a library: one aiohttp session
(uvloop, like the CLI), a pool and ``N`` worker tasks fed by a bounded queue, stdlib ``json``,
buffered writes, no retries, no journal, no fsync.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


# -- the bare contender ----------------------------------------------------------------------


async def bare(inp: str, out: str, url: str, concurrency: int) -> int:
    import aiohttp

    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=2 * concurrency)
    done = 0
    endpoint = url + "/chat/completions"
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        with open(out, "wb") as sink:  # noqa: ASYNC230 - plain buffered writes, as users do

            async def worker() -> None:
                nonlocal done
                while True:
                    line = await queue.get()
                    if line is None:
                        return
                    row = json.loads(line)
                    body = {
                        "model": "m",
                        "messages": [{"role": "user", "content": f"Hi {row['name']}"}],
                    }
                    async with session.post(endpoint, json=body) as resp:
                        resp.raise_for_status()
                        data = await resp.json()
                    row["response"] = data["choices"][0]["message"]["content"]
                    sink.write(json.dumps(row).encode() + b"\n")
                    done += 1

            tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
            with open(inp, "rb") as source:  # noqa: ASYNC230
                for line in source:
                    if line.strip():
                        await queue.put(line)
            for _ in tasks:
                await queue.put(None)
            await asyncio.gather(*tasks)
    return done


def run_bare(argv: list[str]) -> None:
    inp, out, url, concurrency = argv
    import uvloop

    rows = uvloop.run(bare(inp, out, url, int(concurrency)))
    print(rows)


# -- measuring -------------------------------------------------------------------------------


def make_input(path: Path, rows: int) -> None:
    with open(path, "w") as f:
        chunk = []
        for i in range(rows):
            chunk.append(f'{{"id": {i}, "name": "user {i}", "city": "Paris"}}\n')
            if len(chunk) == 10_000:
                f.writelines(chunk)
                chunk.clear()
        f.writelines(chunk)


PIN = {"on": False}


def _pin_to(cpu: int) -> None:
    """Run the calling (child) process on ``cpu`` only, when pinning is on."""
    if PIN["on"]:
        os.sched_setaffinity(0, {cpu})


def start_server() -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "sim", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        preexec_fn=lambda: _pin_to(0),
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    url = line.split()[4]  # "simulated LLM server on http://127.0.0.1:PORT/v1 ..."
    return server, url


def counters(url: str, *, reset: bool = False) -> dict[str, Any]:
    base = url.rsplit("/v1", 1)[0]
    if reset:
        urllib.request.urlopen(urllib.request.Request(base + "/sim/reset", method="POST"))
    with urllib.request.urlopen(base + "/sim/counters") as resp:
        data: dict[str, Any] = json.load(resp)
    return data


def child_env(pycache: Path | None) -> dict[str, str]:
    """The contenders' environment: with ``pycache``, bytecode is cached there, as installed.

    An installed package (``pip install``) has its modules compiled to bytecode once; a
    checkout run with ``PYTHONDONTWRITEBYTECODE=1`` compiles every module of ours from source
    at every start (tenths of a second) while the bare script's libraries come compiled. With
    ``pycache`` (a temporary directory, so the checkout stays clean) both contenders start
    from bytecode; ``None`` keeps the caller's environment.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def measure(
    argv: list[str], watch: Path | None, started_marker: Path | None, env: dict[str, str]
) -> dict[str, Any]:
    """Run a child; return wall and CPU time, peak RSS (MB), first-row times, exit status."""
    started = time.perf_counter()
    child = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.DEVNULL, env=env, preexec_fn=lambda: _pin_to(1)
    )
    first_row: float | None = None
    job_start: float | None = None
    while watch is not None and first_row is None:
        if job_start is None and started_marker is not None and started_marker.exists():
            job_start = time.perf_counter() - started
        try:
            if watch.stat().st_size > 0:
                first_row = time.perf_counter() - started
        except FileNotFoundError:
            pass
        if child.poll() is not None:
            break
        time.sleep(0.001)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "first_row_s": first_row,
        "job_start_s": job_start,
        "status": child.returncode,
    }


def import_time(env: dict[str, str]) -> tuple[float, int, list[str]]:
    """Return ``run --help``'s import time (s), module count, and the slowest top-level imports."""
    child = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pipeline", "run", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    rows = []
    for line in child.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|")
        rows.append((int(cumulative), name.rstrip()))
    top = [name for _, name in rows if not name.startswith("  ")]  # level-one imports
    total = sum(us for us, name in rows if name in top)
    slow = sorted(((us, n.strip()) for us, n in rows if n in top), reverse=True)[:5]
    return total / 1e6, len(rows), [f"{name} {us / 1e3:.0f} ms" for us, name in slow]


def run_contenders(
    inp: Path,
    work: Path,
    url: str,
    concurrency: int,
    env: dict[str, str],
    *,
    cli_first: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run the bare script and the CLI on ``inp`` (outputs in ``work``); return measures."""
    work.mkdir()
    out = work / "out.jsonl"
    bare = [sys.executable, __file__, "--bare", str(inp), str(work / "bare.jsonl"), url,
            str(concurrency)]  # fmt: skip
    cli = [
        sys.executable, "-m", "pipeline", "run", str(inp), "-o", str(out),
        "--model", "m", "--prompt", "Hi {name}", "--base-url", url,
        "--concurrency", str(concurrency), "--quiet",
        "--summary-json", str(work / "summary.json"),
    ]  # fmt: skip
    runs = {
        "bare aiohttp": (bare, None, None),
        "llm-pipeline CLI": (cli, Path(str(out) + ".partial"), Path(str(out) + ".checkpoint.json")),
    }
    results: dict[str, dict[str, Any]] = {}
    for name in sorted(runs, reverse=cli_first):  # "bare..." < "llm...": bare first by default
        argv, watch, marker = runs[name]
        counters(url, reset=True)
        results[name] = measure(argv, watch, marker, env)
        results[name]["requests"] = counters(url)["requests"]
    return {name: results[name] for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workdir", default=None, help="where to put the files (a temp dir)")
    parser.add_argument("--repeat", type=int, default=1, help="pairs of runs (median ratio)")
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let the system place the server and the contenders (default: one CPU each)",
    )
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="run the contenders in this environment as it is (PYTHONDONTWRITEBYTECODE=1 makes"
        " the CLI compile its modules at every start)",
    )
    args = parser.parse_args()
    PIN["on"] = not args.no_pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        env = child_env(None if args.no_bytecode_cache else work / "pycache")
        inp = work / "in.jsonl"
        make_input(inp, args.rows)
        size_mb = inp.stat().st_size / 1e6
        warm = work / "warm.jsonl"
        make_input(warm, 200)
        server, url = start_server()
        try:
            run_contenders(warm, work / "warm", url, args.concurrency, env)  # caches bytecode
            rounds = []
            for index in range(max(1, args.repeat)):
                run = work / f"run{index}"
                results = run_contenders(
                    inp, run, url, args.concurrency, env, cli_first=index % 2 == 1
                )
                rounds.append(results)
            summary = json.loads((run / "summary.json").read_text())
            with open(run / "out.jsonl", "rb") as f:
                written = sum(1 for _ in f)
        finally:
            server.terminate()
            server.wait(10)
        seconds, modules, slow = import_time(env)
    report(args, size_mb, results, summary, written)
    if len(rounds) > 1:
        walls = [r["bare aiohttp"]["wall_s"] / r["llm-pipeline CLI"]["wall_s"] for r in rounds]
        cpus = [r["bare aiohttp"]["cpu_s"] / r["llm-pipeline CLI"]["cpu_s"] for r in rounds]
        print(f"{len(rounds)} pairs (order alternating, {'pinned' if PIN['on'] else 'unpinned'}):"
              f" ratio CLI / bare median {statistics.median(walls):.2f}"
              f" ({', '.join(f'{w:.2f}' for w in walls)}); CPU seconds bare / CLI median"
              f" {statistics.median(cpus):.2f}")  # fmt: skip
    print(f"python -X importtime -m pipeline run --help: {seconds:.3f} s, {modules} modules;"
          f" slowest: {', '.join(slow)}")  # fmt: skip


def report(
    args: argparse.Namespace,
    size_mb: float,
    results: dict[str, dict[str, Any]],
    summary: dict[str, Any],
    written: int,
) -> None:
    """Print the table and the figures the targets are about."""
    cache = "from source" if args.no_bytecode_cache else "from cached bytecode"
    print(f"{args.rows:,} rows ({size_mb:.0f} MB JSONL), concurrency {args.concurrency},"
          f" zero-latency simulated server; Python modules {cache}")  # fmt: skip
    print(f"{'':<18}{'rows/s':>10}{'wall s':>9}{'CPU s':>8}{'peak RSS MB':>13}"
          f"{'first row s':>13}{'exit':>6}")  # fmt: skip
    for name, r in results.items():
        first = "-" if r["first_row_s"] is None else f"{r['first_row_s']:.2f}"
        print(f"{name:<18}{args.rows / r['wall_s']:>10,.0f}{r['wall_s']:>9.1f}{r['cpu_s']:>8.1f}"
              f"{r['peak_rss_mb']:>13.0f}{first:>13}{r['status']:>6}")  # fmt: skip
    ours, base = results["llm-pipeline CLI"], results["bare aiohttp"]
    ratio = base["wall_s"] / ours["wall_s"]
    job_rate = summary["rows_per_s"]
    print(f"CLI output rows: {written:,}; job rows/s (summary, start-up excluded): {job_rate:,.0f}")
    print(f"CLI job started (checkpoint written) at {ours['job_start_s'] or 0:.2f} s;"
          f" first row {ours['first_row_s'] - (ours['job_start_s'] or 0):.3f} s later")  # fmt: skip
    print(f"rows/s ratio CLI / bare: {ratio:.2f} (target >= 0.95 at 20,000 rows); CPU seconds"
          f" bare / CLI: {base['cpu_s'] / ours['cpu_s']:.2f} (what the ratio tends to when the"
          " two cores are not shared)")  # fmt: skip
    print(f"peak RSS {ours['peak_rss_mb']:.0f} MB (target < 150 MB)")
    print(
        f"first row at {ours['first_row_s']:.2f} s from process start (target <= 0.5 s + latency)"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--bare":
        run_bare(sys.argv[2:])
    else:
        main()
