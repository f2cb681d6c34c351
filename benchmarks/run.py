"""``python -m benchmarks``: every scenario against the simulated server, every contender.

The simulated server runs in its own process pinned to one core; every contender runs in its
own process pinned to the other (a long-lived worker per contender, and a fresh process per
run for the memory scenario), so no contender's CPU or memory touches another's. The server's
configuration is replaced and its counters reset before each run.

Usage::

    python -m benchmarks                 # the full suite (under 15 minutes on 2 cores)
    python -m benchmarks --quick         # a smaller run (under 2 minutes)
    python -m benchmarks --write-docs    # ... and regenerate docs/benchmarks.md and the chart
    python -m benchmarks --docs-from benchmarks/results/full.json   # docs only, no run

Results go to ``benchmarks/results/<full|quick>.json`` (``--out`` to change the folder).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks._contenders import BASELINES, LABELS, OURS, Job, runqueue_wait_s
from benchmarks.scenarios import (
    BY_KEY,
    RSS_CAP_MB,
    SCENARIOS,
    Scenario,
    best_baseline,
    figures,
    ratio,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
LIMIT_S = {"quick": 120, "full": 900}


# ---------------------------------------------------------------------------- processes


def cores() -> tuple[set[int] | None, set[int] | None]:
    """The cores for the server and for the clients (None: leave unpinned)."""
    if not hasattr(os, "sched_getaffinity"):
        return None, None
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return {available[0]}, {available[-1]}


def _pin(pid: int, cpus: set[int] | None) -> None:
    if cpus is not None:
        os.sched_setaffinity(pid, cpus)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OPENAI_API_KEY", "sk-benchmark-not-a-secret")
    return env


class Server:
    """The simulated LLM server in a child process, pinned to its own core."""

    def __init__(self, cpus: set[int] | None) -> None:
        code = "import sys; from pipeline.testing._sim import main; sys.exit(main(sys.argv[1:]))"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=_env(),
        )
        _pin(self.proc.pid, cpus)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if " on " not in line:
            self.close()
            raise RuntimeError(f"the simulator did not start: {line!r}")
        self.url = line.split(" on ", 1)[1].split()[0]  # http://127.0.0.1:PORT/v1
        self.root = self.url.rsplit("/v1", 1)[0]

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.root + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def configure(self, config: dict[str, Any]) -> None:
        """Replace the whole configuration, then zero the counters and refill the quotas."""
        self._call("POST", "/sim/config", config)
        self._call("POST", "/sim/reset", {})

    def counters(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/sim/counters")
        return result

    def cpu_s(self) -> float:
        """User + system CPU seconds the server has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_s(self) -> float:
        """Seconds the server has spent waiting for a CPU while runnable."""
        return runqueue_wait_s(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Worker:
    """A long-lived process that runs one contender's jobs, one JSON line each way."""

    def __init__(self, contender: str, cpus: set[int] | None) -> None:
        self.contender = contender
        self.cpus = cpus
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._contenders", "--serve", self.contender],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=_env(),
        )
        _pin(self.proc.pid, self.cpus)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def pin(self, cpus: set[int] | None) -> None:
        self.cpus = cpus
        _pin(self.proc.pid, cpus)

    def wait_ready(self, timeout: float = 120) -> None:
        self._next(timeout)

    def _next(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.contender}: no answer within {timeout:g}s") from None
        if line is None:
            raise RuntimeError(f"{self.contender}: the worker died (exit {self.proc.wait()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def run(self, job: Job, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job.__dict__) + "\n")
        self.proc.stdin.flush()
        try:
            return self._next(timeout)
        except (TimeoutError, RuntimeError):
            self.close()
            self._start()  # a fresh worker for the next job
            self.wait_ready()
            raise

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def run_once(job: Job, cpus: set[int] | None, timeout: float) -> dict[str, Any]:
    """Run one job in a fresh process (the memory scenario)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks._contenders", "--once", json.dumps(job.__dict__)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_env(),
    )
    _pin(proc.pid, cpus)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise TimeoutError(f"{job.contender}: no result within {timeout:g}s") from None
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{job.contender}: the run died (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# ---------------------------------------------------------------------------- the suite


def machine() -> dict[str, Any]:
    """What the run ran on."""
    import importlib.metadata as md

    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil  # type: ignore[import-untyped,unused-ignore]

        memory_gb: float | None = psutil.virtual_memory().total / 2**30
    except ImportError:  # pragma: no cover - psutil is a dev dependency
        memory_gb = None
    versions: dict[str, str | None] = {}
    for name in ("aiohttp", "openai", "httpx", "langchain-openai", "langchain-core", "uvloop"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "commit": commit or None,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def plan(
    quick: bool, scale: float, only: set[str] | None, contenders: set[str] | None
) -> list[tuple[Scenario, int | None, str]]:
    """The (scenario, size, contender) runs, in order."""
    runs: list[tuple[Scenario, int | None, str]] = []
    for scenario in SCENARIOS:
        if only and scenario.key not in only and str(scenario.number) not in only:
            continue
        sizes: tuple[int | None, ...] = scenario.sizes[0 if quick else 1] or (None,)
        for size in sizes:
            for contender in scenario.contenders:
                if contenders and contender not in contenders:
                    continue
                runs.append((scenario, size, contender))
    return runs


def make_job(
    scenario: Scenario, size: int | None, contender: str, url: str, quick: bool, scale: float
) -> Job:
    job = Job(
        contender=contender,
        scenario=scenario.key,
        base_url=url,
        rows=scenario.row_count(contender, quick, scale, size),
        template=scenario.template,
        max_tokens=scenario.max_tokens,
        stream=scenario.stream,
        concurrency=scenario.concurrency,
    )
    if scenario.limits and contender in ("pipeline", "cli", "langchain"):
        job.rpm = scenario.sim.get("rpm")
        job.tpm = scenario.sim.get("tpm")
    if size is not None:
        job.rss_cap_mb = RSS_CAP_MB
        assert scenario.time_cap_s is not None
        job.time_cap_s = scenario.time_cap_s[0 if quick else 1]
    return job


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    mode = "quick" if quick else "full"
    only = set(args.only.split(",")) if args.only else None
    chosen = set(args.contenders.split(",")) if args.contenders else None
    runs = plan(quick, args.scale, only, chosen)
    server_cpus, client_cpus = cores()
    _pin(os.getpid(), server_cpus)  # this process only waits; keep it off the client core
    started = time.perf_counter()
    info = machine()
    info["pinning"] = (
        f"server on core {sorted(server_cpus)}, clients on core {sorted(client_cpus)}"
        if server_cpus and client_cpus
        else "not pinned (fewer than 2 cores available)"
    )
    print(f"# llm-pipeline benchmarks ({mode}, scale {args.scale:g}): {len(runs)} runs")
    print(f"# {info['cpu']}, {info['cores']} cores; {info['pinning']}", flush=True)
    server = Server(server_cpus)
    workers: dict[str, Worker] = {}
    records: list[dict[str, Any]] = []
    try:
        persistent = sorted({c for s, size, c in runs if size is None})
        for contender in persistent:  # unpinned while importing: both cores help
            workers[contender] = Worker(contender, None)
        for worker in workers.values():
            worker.wait_ready()
            worker.pin(client_cpus)
        for scenario, size, contender in runs:
            job = make_job(scenario, size, contender, server.url, quick, args.scale)
            server.configure(scenario.server(quick))
            cpu0, wait0 = server.cpu_s(), server.wait_s()
            try:
                if size is None:
                    result = workers[contender].run(job, timeout=300)
                else:
                    result = run_once(job, client_cpus, timeout=(job.time_cap_s or 0) + 300)
            except (TimeoutError, RuntimeError) as error:
                result = _failed_run(job, str(error))
            counters = server.counters()
            server_cpu = server.cpu_s() - cpu0
            result["server_cpu_wait_s"] = server.wait_s() - wait0
            record = {
                "scenario": scenario.key,
                "size": job.rows if size is not None else None,
                "contender": contender,
                "job": job.__dict__,
                "result": result,
                "counters": counters,
                "server_cpu_s": server_cpu,
                "figures": figures(scenario, result, counters, server_cpu, job.__dict__),
            }
            records.append(record)
            _progress(scenario, record)
    finally:
        for worker in workers.values():
            worker.close()
        server.close()
    _compare(records)
    info["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    duration = time.perf_counter() - started
    return {
        "mode": mode,
        "scale": args.scale,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": duration,
        "limit_s": LIMIT_S[mode],
        "machine": info,
        "scenarios": {
            s.key: {
                "number": s.number,
                "title": s.title,
                "method": s.method,
                "sim": s.server(quick),
                "concurrency": s.concurrency,
            }
            for s in SCENARIOS
            if any(r["scenario"] == s.key for r in records)
        },
        "runs": records,
    }


def _failed_run(job: Job, error: str) -> dict[str, Any]:
    return {
        "contender": job.contender,
        "scenario": job.scenario,
        "rows": job.rows,
        "rows_pulled": 0,
        "elapsed_s": float("nan"),
        "cpu_s": float("nan"),
        "peak_rss_mb": float("nan"),
        "error": error,
        "stopped": None,
        "correct": 0,
        "wrong": 0,
        "duplicates": 0,
        "failed": 0,
        "answered": 0,
        "first_token_s": None,
        "first_row_s": None,
        "example_wrong": None,
        "example_failure": None,
    }


def _progress(scenario: Scenario, record: dict[str, Any]) -> None:
    f = record["figures"]
    result = record["result"]
    size = f" @{record['size']:,}" if record["size"] else ""
    what = ", ".join(f"{c.header} {_fmt(c, f.get(c.key))}" for c in scenario.columns if c.key in f)
    note = f"  ERROR {result['error']}" if result.get("error") else ""
    if _contended(record):
        note += (
            f"  (waited for a CPU: client {result.get('cpu_wait_s', 0):.1f} s, "
            f"server {result.get('server_cpu_wait_s', 0):.1f} s)"
        )
    print(
        f"  [{scenario.number}] {record['contender']:<15}{size} {f['elapsed_s']:6.1f}s  {what}"
        f"{note}",
        flush=True,
    )


def _compare(records: list[dict[str, Any]]) -> None:
    """Add each run's ratio to the best baseline (and S7's speed-up) to its figures."""
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["scenario"], record["size"]), []).append(record)
    for (key, _), group in groups.items():
        scenario = BY_KEY[key]
        name, best = best_baseline(scenario, group, scenario.primary)
        for record in group:
            value = record["figures"].get(scenario.primary)
            record["figures"]["vs_best"] = ratio(scenario, value, best, scenario.primary)
            record["figures"]["best_baseline"] = name
        if key == "speedtest":
            sequential = next((r for r in group if r["contender"] == "sequential"), None)
            for record in group:
                seconds = record["figures"]["elapsed_s"]
                record["figures"]["speedup"] = (
                    sequential["figures"]["elapsed_s"] / seconds
                    if sequential and seconds and not record["result"].get("error")
                    else None
                )


# ---------------------------------------------------------------------------- tables


def _fmt(column: Any, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return str(column.fmt.format(value))
    except (ValueError, TypeError):
        return str(value)


def tables(data: dict[str, Any]) -> list[tuple[Scenario, list[str], list[list[str]]]]:
    """Each scenario's table: (scenario, headers, rows of cells)."""
    out = []
    for key in data["scenarios"]:
        scenario = BY_KEY[key]
        runs = [r for r in data["runs"] if r["scenario"] == key]
        sizes = sorted({r["size"] for r in runs if r["size"] is not None})
        contenders = list(dict.fromkeys(r["contender"] for r in runs))
        best = next((r["figures"].get("best_baseline") for r in runs), "")
        vs = f"vs best baseline ({LABELS.get(best, best) or '-'}; >1 = better)"
        headers = ["contender"]
        if sizes:
            for size in sizes:
                headers += [f"{c.header} @ {size:,} rows" for c in scenario.columns]
            headers.append(f"vs best baseline @ {sizes[0]:,} (>1 = better)")
        else:
            headers += [c.header for c in scenario.columns] + [vs]
        rows = []
        for contender in contenders:
            mine = [r for r in runs if r["contender"] == contender]
            cells = [LABELS.get(contender, contender)]
            for run in sorted(mine, key=lambda r: r["size"] or 0):
                figs = run["figures"]
                for column in scenario.columns:
                    text = _fmt(column, figs.get(column.key))
                    if run["result"].get("error") and column is scenario.columns[0]:
                        text = "error"
                    cells.append(text)
            first = sorted(mine, key=lambda r: r["size"] or 0)[0]
            vs_best = first["figures"].get("vs_best")
            cells.append("-" if vs_best is None else f"{vs_best:.2f}")
            rows.append(cells)
        out.append((scenario, headers, rows))
    return out


def print_tables(data: dict[str, Any]) -> None:
    for scenario, headers, rows in tables(data):
        print(f"\n## {scenario.number}. {scenario.title}")
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    errors = [r for r in data["runs"] if r["result"].get("error")]
    for run in errors:
        print(f"! {run['scenario']}/{run['contender']}: {run['result']['error']}")
    within = "within" if data["duration_s"] < data["limit_s"] else "OVER"
    print(
        f"\n# {data['mode']} run took {data['duration_s']:.0f} s "
        f"(limit {data['limit_s']} s): {within}"
    )


# ---------------------------------------------------------------------------- chart and docs


def chart(data: dict[str, Any], path: Path) -> None:
    """One bar chart per scenario of its main figure, ours highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(data["scenarios"])
    cols = 2
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys, strict=False):
        scenario = BY_KEY[key]
        runs = [r for r in data["runs"] if r["scenario"] == key]
        sizes = sorted({r["size"] for r in runs if r["size"] is not None}) or [None]
        contenders = list(dict.fromkeys(r["contender"] for r in runs))
        column = next(c for c in scenario.columns if c.key == scenario.primary)
        height = 0.8 / len(sizes)
        for j, size in enumerate(sizes):
            values = []
            for contender in contenders:
                run = next(
                    (r for r in runs if r["contender"] == contender and r["size"] == size), None
                )
                value = None
                if run is not None and not run["result"].get("error"):
                    value = run["figures"].get(scenario.primary)
                values.append(value if isinstance(value, (int, float)) else 0.0)
            positions = [i + j * height for i in range(len(contenders))]
            colors = [
                ("#1f77b4" if c in OURS else "#9a9a9a") if j == 0 else
                ("#7fb2dc" if c in OURS else "#cfcfcf")
                for c in contenders
            ]  # fmt: skip
            label = f"{size:,} rows" if size else None
            ax.barh(positions, values, height=height, color=colors, label=label)
            for pos, value in zip(positions, values, strict=True):
                if value:
                    ax.text(value, pos, " " + _fmt(column, value), va="center", fontsize=7)
        ax.set_yticks([i + height * (len(sizes) - 1) / 2 for i in range(len(contenders))])
        ax.set_yticklabels([LABELS.get(c, c) for c in contenders], fontsize=8)
        ax.invert_yaxis()
        better = "higher" if column.higher_is_better else "lower"
        ax.set_title(
            f"{scenario.number}. {scenario.title}\n{column.header} ({better} is better)",
            fontsize=9,
        )
        ax.tick_params(axis="x", labelsize=7)
        ax.margins(x=0.25)
        if sizes[0] is not None:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"llm-pipeline benchmarks ({data['mode']} run, {data['date'][:10]}); "
        "grey: baselines, blue: llm-pipeline",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_docs(data: dict[str, Any], json_path: Path, png_path: Path, docs: Path) -> None:
    """Regenerate the benchmarks page from a results file (tables, chart, machine, method).

    The figures are derived again from each run's raw counts, so the page always follows the
    current definitions.
    """
    for record in data["runs"]:
        scenario = BY_KEY[record["scenario"]]
        record["figures"] = figures(
            scenario, record["result"], record["counters"], record["server_cpu_s"], record["job"]
        )
    _compare(data["runs"])
    chart(data, png_path)
    m = data["machine"]
    rel = os.path.relpath
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    load = m.get("load_average_at_start")
    load_end = m.get("load_average_at_end")
    parts = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m benchmarks --write-docs` from "
        f"`{rel(json_path, ROOT)}`. Do not edit by hand: re-run it. -->",
        "",
        f"Latest {data['mode']} run: {data['date']}, {data['duration_s']:.0f} s "
        f"(limit {data['limit_s']} s), commit `{m.get('commit') or '?'}`"
        + (f", row counts scaled by {data['scale']:g}" if data["scale"] != 1 else "")
        + "."
        + (
            " This is a quick run: row counts in the titles and methods are the full run's; "
            "the 'rows run' columns give the counts used here."
            if data["mode"] == "quick"
            else ""
        ),
        "",
        f"![benchmark chart]({rel(png_path, docs.parent)})",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores"
        + (f", {m['memory_gb']:.0f} GB RAM" if m.get("memory_gb") else ""),
        f"- {m['pinning']}",
        f"- {m['os']}, Python {m['python']}; {versions}",
        (
            f"- Load average (1, 5, 15 min) at start {', '.join(f'{x:.2f}' for x in load)}"
            f", at end {', '.join(f'{x:.2f}' for x in load_end)}: the machine is shared, so "
            "compare ratios within a run rather than absolute figures across runs."
            if load and load_end
            else "- Load average: unknown."
        ),
        "",
        "## How to reproduce",
        "",
        "```bash",
        'pip install -e ".[dev]"',
        "python -m benchmarks              # full suite, writes benchmarks/results/full.json",
        "python -m benchmarks --quick      # smaller, under 2 minutes",
        "python -m benchmarks --write-docs # full suite, then regenerate this page and chart",
        "python -m benchmarks.caller       # the LLM caller's own targets, PASS/FAIL",
        "```",
        "",
        "## Method",
        "",
        "- The server is the project's simulated OpenAI-compatible server "
        "(`pipeline/testing/_sim/`), in its own process pinned to its own core; each "
        "contender runs in its own process "
        "pinned to the other core: a long-lived worker per contender (its libraries imported "
        "before any clock starts) and a fresh process per run in the memory scenario.",
        "- Before each run the server's configuration is replaced and its counters, request "
        "numbering (which seeds the fault draws) and quota buckets are reset, so every "
        "contender meets the same server with the same rows and the same concurrency.",
        "- Answers are deterministic (an echo of the prompt), so every row's answer is checked "
        "against the expected text; 'correct' counts exact matches. In-process contenders "
        "check each answer as it arrives (a few microseconds a row, counted in their CPU "
        "time); the CLI's output file is checked after it exits.",
        "- Contenders (`benchmarks/_contenders.py`): "
        + "; ".join(f"**{LABELS[c]}**" for c in (*BASELINES, *OURS))
        + ". Every asyncio contender runs on uvloop. The hand-written clients (sequential, "
        "gather, aiohttp) retry 408/409/429/5xx, connection errors and broken or truncated "
        "answers up to 4 times, honouring Retry-After; the SDK and LangChain use their "
        "built-in retries (max_retries=4); llm-pipeline uses max_retries=4.",
        "- The machine is shared: each run records how long its client and the server were "
        "runnable but waiting for a CPU (Linux schedstat); runs held off for more than 10% of "
        "their time (and half a second) are flagged under their table.",
        "- Ratios compare each contender's main figure with the best baseline of the same "
        "scenario in the same run (>1 = better than it, whichever direction is better); a "
        "baseline that lost or garbled rows is the best only when every baseline did.",
        "- Where a slow contender runs fewer rows to keep the suite under its time limit, it "
        "runs a prefix of the same rows; the 'rows run' column says so.",
        "",
    ]
    caller = json_path.parent / "caller.json"
    if caller.exists():
        parts += _caller_section(json.loads(caller.read_text()), caller)
    limits = json_path.parent / "limits.json"
    if limits.exists():
        from benchmarks.limits import limits_section

        parts += limits_section(json.loads(limits.read_text()), limits)
    for scenario, headers, rows in tables(data):
        parts += [f"## {scenario.number}. {scenario.title}", "", scenario.method, ""]
        parts += [_md_table(headers, rows), ""]
        notes = _notes(data, scenario.key)
        if notes:
            parts += [*notes, ""]
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text("\n".join(parts))


def _caller_section(data: dict[str, Any], path: Path) -> list[str]:
    """The LLM caller's own targets, from ``python -m benchmarks.caller``'s results file."""
    args = data["args"]
    rows = [
        [
            c["name"],
            str(c["value"]) if isinstance(c["value"], int) else f"{c['value']:.2f}",
            c["target"],
            "PASS" if c["pass"] else "FAIL",
        ]
        for c in data["checks"]
    ]
    figures = []
    for run in data["throughput"]:
        for name, label in (
            ("aiohttp", "bare aiohttp + gather + semaphore"),
            ("pipeline", "llm-pipeline LLMCaller in a Pipeline"),
            ("openai", "openai SDK + semaphore, max_retries=0"),
        ):
            if name in run["best"]:
                best = run["best"][name]
                figures.append(
                    [
                        label,
                        str(run["concurrency"]),
                        f"{best['requests_per_s']:,.0f}",
                        f"{best['cpu_per_1k']:.2f}",
                        f"{best['rows']:,}",
                    ]
                )
    return [
        "## The LLM caller's targets",
        "",
        f"From `python -m benchmarks.caller` ({data['date']}, `{os.path.relpath(path, ROOT)}`): "
        f"zero-latency server, the best of {args['rounds']} alternating runs of each client "
        f"at concurrency {args['concurrency']} and again at {args['saturated']} (where the "
        "client's core, not the round trip, is the bottleneck); then a server enforcing "
        f"{data['rate_limit']['rpm']:,} requests/minute, {args['rate_rows']:,} rows, with the "
        "caller configured at that quota and with no limit set.",
        "",
        _md_table(
            ["client", "concurrency", "requests/s", "client CPU s / 1k req", "rows"], figures
        ),
        "",
        _md_table(["check", "value", "target", "result"], rows),
        "",
    ]


def _contended(record: dict[str, Any]) -> bool:
    """Whether other processes held the client or the server off its core for > 10% of a run
    (and more than half a second)."""
    result = record["result"]
    waited = result.get("cpu_wait_s", 0.0) + result.get("server_cpu_wait_s", 0.0)
    elapsed = result["elapsed_s"]
    return bool(elapsed == elapsed and waited > max(0.5, 0.1 * elapsed))


def _notes(data: dict[str, Any], key: str) -> list[str]:
    """Facts worth showing under a table: errors, examples of wrong or failed rows, and runs
    that other processes on the machine slowed down."""
    lines = []
    for run in data["runs"]:
        if run["scenario"] != key:
            continue
        result = run["result"]
        label = LABELS.get(run["contender"], run["contender"])
        if run["size"]:
            label += f" @ {run['size']:,} rows"
        if _contended(run):
            lines.append(
                f"- {label}: other processes kept it waiting for a CPU "
                f"{result.get('cpu_wait_s', 0):.1f} s (client) + "
                f"{result.get('server_cpu_wait_s', 0):.1f} s (server) of its "
                f"{result['elapsed_s']:.1f} s run; its figures are pessimistic."
            )
        if result.get("error"):
            lines.append(f"- {label}: error `{result['error'][:200]}`")
        if result.get("example_wrong"):
            lines.append(f"- {label}, a wrong answer: `{result['example_wrong']}`")
        if result.get("example_failure") and key in ("faults", "ratelimit"):
            lines.append(f"- {label}, a failed row: `{result['example_failure'][:200]}`")
    return lines


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller runs (under 2 minutes)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every row count (smoke tests)"
    )
    parser.add_argument("--only", help="scenarios to run, by key or number: cpu,3,memory")
    parser.add_argument("--contenders", help="contenders to run: aiohttp,pipeline,...")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON and PNG")
    parser.add_argument(
        "--write-docs", action="store_true", help="regenerate docs/benchmarks.md and its chart"
    )
    parser.add_argument("--docs", type=Path, default=DOCS, help="the page --write-docs writes")
    parser.add_argument("--docs-from", type=Path, help="regenerate the docs from this JSON only")
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be > 0")
    if args.docs_from is not None:
        data = json.loads(args.docs_from.read_text())
        png = args.docs_from.with_suffix(".png")
        write_docs(data, args.docs_from, png, args.docs)
        print(f"wrote {args.docs} and {png}")
        return 0
    data = run_suite(args)
    print_tables(data)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{data['mode']}.json"
    json_path.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    png_path = json_path.with_suffix(".png")
    if args.write_docs:
        write_docs(data, json_path, png_path, args.docs)  # the chart too
        print(f"wrote {json_path}, {png_path} and {args.docs}")
    else:
        chart(data, png_path)
        print(f"wrote {json_path} and {png_path}")
    failed = [r for r in data["runs"] if r["result"].get("error")]
    return 1 if failed else 0


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
