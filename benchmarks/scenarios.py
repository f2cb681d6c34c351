"""The scenarios of the benchmark suite: server behaviour, rows, concurrency, and the figures.

Every scenario runs each contender against the same simulated server (reset before each run,
so the fault draws and quota buckets start the same), on the same rows, at the same
concurrency. A scenario may cap how many rows a slow contender runs (a prefix of the same
rows) to keep the suite within its time limit; the tables say so next to the figure.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from benchmarks._contenders import BASELINES, make_row
from pipeline.testing._sim import tokens

ALL = ("sequential", "gather", "aiohttp", "openai", "langchain", "pipeline", "cli")
GREETING = "Write a short greeting for {name} from {city}, customer number {id}."
WELCOME = (
    "Write a warm two-sentence welcome note for {name} from {city} (customer {id}), mention "
    "the weather in {city} and wish {name} a pleasant week ahead."
)
HELLO = "Say hello to {name}"
RSS_CAP_MB = 2048.0


@dataclasses.dataclass(frozen=True)
class Column:
    """One figure of a scenario's table."""

    key: str
    header: str
    fmt: str = "{:,.0f}"
    higher_is_better: bool | None = None  # None: not a comparable figure


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One scenario of the suite (``rows``, ``caps`` and ``sizes`` are (quick, full) pairs)."""

    key: str
    number: int
    title: str
    method: str
    sim: dict[str, Any]
    rows: tuple[int, int]
    template: str = GREETING
    max_tokens: int = 64
    stream: bool = False
    concurrency: int = 64
    limits: bool = False
    contenders: tuple[str, ...] = ALL
    caps: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    columns: tuple[Column, ...] = ()
    primary: str = ""
    sizes: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    time_cap_s: tuple[float, float] | None = None
    sim_quick: dict[str, Any] | None = None

    def server(self, quick: bool) -> dict[str, Any]:
        """The simulator's configuration for this scenario."""
        return self.sim_quick if quick and self.sim_quick is not None else self.sim

    def row_count(self, contender: str, quick: bool, scale: float, size: int | None = None) -> int:
        """How many rows ``contender`` runs (``size`` for the memory scenario)."""
        pick = 0 if quick else 1
        n = size if size is not None else self.rows[pick]
        if contender in self.caps:
            n = min(n, self.caps[contender][pick])
        return max(2, round(n * scale))

    def rates(self) -> tuple[float | None, float | None]:
        """The server's quota per second: (requests, tokens)."""
        rpm, tpm = self.sim.get("rpm"), self.sim.get("tpm")
        return (rpm / 60 if rpm else None, tpm / 60 if tpm else None)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        key="cpu",
        number=1,
        title="CPU-bound: zero latency",
        method=(
            "The server answers at once, so the client's own CPU cost per request decides the "
            "rate. Requests/s is requests the server saw divided by the wall time; CPU s per "
            "1,000 requests is the contender process's user+system time (the CLI: its child "
            "process, interpreter start included). Concurrency 64."
        ),
        sim={},
        rows=(1_000, 20_000),
        caps={"openai": (300, 4_000), "langchain": (200, 2_000)},
        columns=(
            Column("requests_per_s", "requests/s", higher_is_better=True),
            Column("cpu_per_1k", "client CPU s / 1k req", "{:.2f}", higher_is_better=False),
            Column("server_cpu_per_1k", "server CPU s / 1k req", "{:.2f}"),
            Column("rows_run", "rows run"),
            Column("correct", "correct"),
        ),
        primary="requests_per_s",
    ),
    Scenario(
        key="latency",
        number=2,
        title="Latency-bound: 500 ms +/- 250 ms",
        method=(
            "Each answer takes 500 ms +/- 250 ms (uniform) before its first byte. 5,000 rows at "
            "concurrency 256: the best possible is about 256 / 0.5 s = 512 rows/s. asyncio.gather "
            "over all rows is bounded by aiohttp's default pool of 100 connections."
        ),
        sim={"latency_ms": 500, "jitter_ms": 250},
        rows=(300, 5_000),
        concurrency=256,
        caps={"sequential": (3, 20), "openai": (150, 2_500), "langchain": (150, 2_500)},
        columns=(
            Column("rows_per_s", "rows/s", higher_is_better=True),
            Column("elapsed_s", "elapsed s", "{:.1f}"),
            Column("rows_run", "rows run"),
            Column("correct", "correct"),
        ),
        primary="rows_per_s",
    ),
    Scenario(
        key="ratelimit",
        number=3,
        title="Rate-limited: 6,000 requests/min and 150,000 tokens/min",
        method=(
            "The server enforces 6,000 requests and 150,000 tokens per minute (token buckets "
            "holding one second of quota) and answers 429 with Retry-After beyond them; 200 ms "
            "+/- 100 ms latency, concurrency 64. The rows cost about 33 tokens each, so tokens "
            "bind at about 75 rows/s. Share of quota = the least time the quota allows for the "
            "rows answered correctly (after the initial burst, plus one latency) / the time "
            "taken. Contenders that accept a limit get the quota: llm-pipeline rpm= and tpm=; "
            "LangChain an InMemoryRateLimiter at the binding rate in requests/s (half a second "
            "of burst, like llm-pipeline's limiter). The others have no limiter; they retry "
            "429s. 'llm-pipeline, no limit set' must learn the limits from the rate-limit "
            "headers and 429s."
        ),
        sim={"latency_ms": 200, "jitter_ms": 100, "rpm": 6_000, "tpm": 150_000},
        rows=(100, 900),
        limits=True,
        contenders=(*ALL[:6], "pipeline-learn", "cli"),
        caps={"sequential": (8, 40)},
        columns=(
            Column("quota_share", "share of quota", "{:.2f}", higher_is_better=True),
            Column("http_429", "429s provoked", higher_is_better=False),
            Column("rows_per_s", "rows/s", "{:,.1f}"),
            Column("correct", "correct"),
            Column("lost", "lost"),
        ),
        primary="quota_share",
    ),
    Scenario(
        key="faults",
        number=4,
        title="Faults: 5% 5xx, 5% 429 with Retry-After, 2% truncated streams",
        method=(
            "Streaming requests; the server answers 5% of requests with a 500/502/503, 5% with a "
            "429 and Retry-After: 1, and ends 2% of streams early (cleanly, before the finish "
            "reason and [DONE]). 20 ms +/- 10 ms latency, concurrency 64, up to 4 retries for "
            "everyone. Correct = the exact expected answer; wrong = an answer that differs (a "
            "truncated stream accepted as complete); failed = rows the contender reported as "
            "failed; missing = rows neither answered nor reported; wasted = requests beyond one "
            "per correct row. A 429 whose rate-limit headers show capacity left (or that has none) "
            "delays only the row that got it, in llm-pipeline as in the hand-written clients; "
            "llm-pipeline pauses every request only for a quota signal (headers showing the "
            "bucket empty, or a long Retry-After)."
        ),
        sim={
            "latency_ms": 20,
            "jitter_ms": 10,
            "error_5xx": 0.05,
            "error_429": 0.05,
            "truncate": 0.02,
            "retry_after_s": 1.0,
            "seed": 7,
        },
        rows=(150, 1_000),
        stream=True,
        caps={"sequential": (15, 100), "openai": (80, 600), "langchain": (80, 600)},
        columns=(
            Column("correct_pct", "correct %", "{:.1f}", higher_is_better=True),
            Column("wrong", "wrong"),
            Column("failed", "failed"),
            Column("missing", "missing"),
            Column("wasted", "wasted requests"),
            Column("elapsed_s", "elapsed s", "{:.1f}"),
        ),
        primary="correct_pct",
    ),
    Scenario(
        key="streaming",
        number=5,
        title="Streaming: time to first token and to first finished row",
        method=(
            "Streaming requests; 300 ms +/- 100 ms to the first byte, then about 40 tokens "
            "generated at 100 tokens/s. Concurrency 64. First token = the first content delta "
            "any row received; first row = when the first complete answer was handed to the "
            "caller's code (asyncio.gather and abatch hand over nothing until every row is done; "
            "the CLI publishes its output file at the end)."
        ),
        sim={"latency_ms": 300, "jitter_ms": 100, "tokens_per_s": 100},
        rows=(100, 600),
        template=WELCOME,
        max_tokens=128,
        stream=True,
        caps={"sequential": (3, 6), "openai": (100, 300), "langchain": (100, 300)},
        columns=(
            Column("first_token_s", "first token s", "{:.2f}"),
            Column("first_row_s", "first row s", "{:.2f}", higher_is_better=False),
            Column("elapsed_s", "all rows s", "{:.1f}"),
            Column("rows_run", "rows run"),
            Column("correct", "correct"),
        ),
        primary="first_row_s",
    ),
    Scenario(
        key="memory",
        number=6,
        title="Memory: peak RSS on 100,000 and 1,000,000 rows",
        method=(
            "Zero latency, concurrency 64. Each run is a fresh process; peak RSS is its VmHWM "
            "(the CLI: the CLI's own process). A run stops when its RSS passes 2 GB (the size "
            "at which it failed is the number of rows it had taken in) or at the time cap; "
            "a stopped run's peak is a lower bound. Contenders built on asyncio.gather or "
            "abatch create a task per row up front: they cannot stream."
        ),
        sim={},
        rows=(0, 0),
        sizes=((2_000,), (100_000, 1_000_000)),
        time_cap_s=(3.0, 15.0),
        columns=(
            Column("peak_rss_mb", "peak RSS MB", "{:,.0f}", higher_is_better=False),
            Column("rows_done", "rows answered"),
            Column("status", "run", "{}"),
        ),
        primary="peak_rss_mb",
    ),
    Scenario(
        key="speedtest",
        number=7,
        title="The source documents' speed test: 20 greetings",
        method=(
            "20 greetings ('Say hello to {name}'), 500 ms +/- 200 ms each (quick runs: 150 "
            "+/- 60 ms), sequential vs concurrent (concurrency 20: all at once)."
        ),
        sim={"latency_ms": 500, "jitter_ms": 200, "seed": 3},
        sim_quick={"latency_ms": 150, "jitter_ms": 60, "seed": 3},
        rows=(20, 20),
        template=HELLO,
        concurrency=20,
        columns=(
            Column("elapsed_s", "seconds", "{:.2f}", higher_is_better=False),
            Column("speedup", "speed-up vs sequential", "{:.1f}x"),
            Column("correct", "correct"),
        ),
        primary="elapsed_s",
    ),
)

BY_KEY = {s.key: s for s in SCENARIOS}


def figures(
    scenario: Scenario,
    result: dict[str, Any],
    counters: dict[str, Any],
    server_cpu_s: float,
    job: dict[str, Any],
) -> dict[str, Any]:
    """Derive a job's table figures from what the worker and the server counted."""
    elapsed = max(result["elapsed_s"], 1e-9)
    stopped = result.get("stopped")
    requests = counters.get("requests", 0)
    n = result["rows"]
    answered = result["answered"]
    out: dict[str, Any] = {
        "rows_run": n,
        "correct": result["correct"],
        "elapsed_s": elapsed,
        "requests": requests,
        "http_429": counters.get("http_429", 0),
        "rows_per_s": result["correct"] / elapsed,
        "requests_per_s": requests / elapsed,
        "cpu_per_1k": result["cpu_s"] / max(requests, 1) * 1000,
        "server_cpu_per_1k": server_cpu_s / max(requests, 1) * 1000,
        "lost": n - result["correct"],
        "wrong": result["wrong"],
        "failed": result["failed"],
        "missing": n - answered - result["failed"] if not stopped else None,
        "wasted": requests - result["correct"],
        "correct_pct": 100.0 * result["correct"] / max(n, 1),
        "first_token_s": result["first_token_s"],
        "first_row_s": result["first_row_s"],
        "peak_rss_mb": result["peak_rss_mb"],
        "rows_done": answered if result.get("rows_pulled") is not None or not stopped else None,
        "status": _status(result),
    }
    if scenario.key == "ratelimit":  # the least time the quota allows for the rows answered
        answered_job = {**job, "rows": result["correct"]}
        out["quota_share"] = ideal_seconds(scenario, answered_job) / elapsed
    return out


def _status(result: dict[str, Any]) -> str:
    if result.get("error"):
        return "error"
    stopped = result.get("stopped")
    if stopped:
        pulled = result["rows_pulled"]
        taken = f" after taking in {pulled:,} rows" if pulled is not None else ""
        if "memory" in stopped:
            return f"passed 2 GB{taken}"
        return f"stopped at {result['elapsed_s']:.0f} s{taken}"
    return "complete"


def ideal_seconds(scenario: Scenario, job: dict[str, Any]) -> float:
    """The least time the quota allows for the job's rows: after the buckets' initial burst,
    the binding bucket's rate, plus one request's latency."""
    n = job["rows"]
    need_tokens = 0
    for i in range(n):
        prompt = job["template"].format_map(make_row(i))
        need_tokens += tokens(prompt) + tokens("echo: " + prompt)
    burst = float(scenario.sim.get("burst_s", 1.0))
    best = 0.0
    for need, rate in zip((n, need_tokens), scenario.rates(), strict=True):
        if rate:
            best = max(best, max(0.0, need - rate * burst) / rate)
    return best + float(scenario.sim.get("latency_ms", 0)) / 1000


def best_baseline(scenario: Scenario, rows: list[dict[str, Any]], key: str) -> tuple[str, float]:
    """The baseline contender with the best value of ``key`` (and that value).

    A baseline that lost or garbled rows is not the best while another answered every row
    correctly: only when none did are all of them considered.
    """
    column = next(c for c in scenario.columns if c.key == key)
    usable = [
        r
        for r in rows
        if r["contender"] in BASELINES
        and r["figures"].get(key) is not None
        and not r["result"].get("error")
    ]
    flawless = [
        r
        for r in usable
        if not r["result"].get("stopped") and r["result"]["correct"] == r["result"]["rows"]
    ]
    found = [(r["contender"], r["figures"][key]) for r in flawless or usable]
    if not found:
        return "", float("nan")
    pick = max if column.higher_is_better else min
    return pick(found, key=lambda item: item[1])


def ratio(scenario: Scenario, value: float | None, best: float, key: str) -> float | None:
    """How much better than ``best`` a value is (> 1: better), whichever way is better."""
    column = next(c for c in scenario.columns if c.key == key)
    if value is None or best != best or not best or not value:
        return None
    return float(value / best if column.higher_is_better else best / value)
