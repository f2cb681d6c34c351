"""The contenders of the benchmark suite, and the worker process that runs them.

Every contender does the same job: for each row, send one chat request built from the same
template to the same server, and hand the answer back to its caller. Each is written plainly,
the way a careful user would write it for this job, with its best reasonable settings:

* ``sequential``: one keep-alive ``http.client`` connection, one row after the other (the
  synchronous baseline of the source documents; stdlib only).
* ``gather``: ``asyncio.gather`` over a coroutine per row on one aiohttp session with its
  default connection pool (the source documents' asynchronous approach).
* ``aiohttp``: the same plus a semaphore and a pool sized to the concurrency: the ceiling for a
  hand-written Python client.
* ``openai``: the official SDK, ``AsyncOpenAI`` with a semaphore and a connection pool sized to
  the concurrency; its built-in retries.
* ``langchain``: ``ChatOpenAI.abatch(max_concurrency=...)``; its built-in retries, and its
  ``InMemoryRateLimiter`` when the quota is known.
* ``pipeline``: this library's Python API, ``Pipeline(rows, LLMCaller(...))``.
* ``pipeline-learn``: the same with no rate limit configured (it must learn it).
* ``cli``: this library's command line, ``python -m pipeline run rows.jsonl -o out.jsonl``.

The three hand-written clients share one retry loop: up to ``1 + retries`` attempts on 408,
409, 429, 5xx, connection errors and broken or truncated answers, waiting ``Retry-After`` when
the server says so and a full-jitter exponential backoff otherwise.

The worker (``python -m benchmarks._contenders``) reads one JSON job per line on stdin, runs it
and writes one JSON result per line on its stdout; with ``--once JOB`` it runs a single job,
watching its own memory and time (the memory scenario).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import http.client
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

MODEL = "sim-1"
API_KEY = "sk-benchmark-not-a-secret"
NAMES = (
    "Ada", "Alan", "Barbara", "Claude", "Dennis", "Edsger", "Frances", "Grace", "Hedy", "Ivan",
    "John", "Katherine", "Linus", "Margaret", "Niklaus", "Ole", "Radia", "Sophie", "Tim", "Xavier",
)  # fmt: skip
CITIES = ("Paris", "Lyon", "Nantes", "Lille", "Rennes", "Nice", "Brest", "Dijon", "Metz", "Pau")
RETRYABLE = frozenset({408, 409, 429})
BASELINES = ("sequential", "gather", "aiohttp", "openai", "langchain")
OURS = ("pipeline", "pipeline-learn", "cli")
LABELS = {
    "sequential": "sequential (http.client)",
    "gather": "asyncio.gather, all rows",
    "aiohttp": "aiohttp + semaphore",
    "openai": "openai SDK + semaphore",
    "langchain": "LangChain abatch",
    "pipeline": "llm-pipeline (Python)",
    "pipeline-learn": "llm-pipeline, no limit set",
    "cli": "llm-pipeline CLI",
}


def make_row(i: int) -> dict[str, Any]:
    """Row ``i`` of every benchmark input (deterministic, so answers can be checked)."""
    return {"id": i, "name": NAMES[i % len(NAMES)], "city": CITIES[(i // len(NAMES)) % 10]}


def expected_answer(template: str, row: dict[str, Any]) -> str:
    """What the simulator answers to the prompt of ``row``: an echo of it."""
    return "echo: " + template.format_map(row)


@dataclasses.dataclass
class Job:
    """One contender on one scenario (JSON-serialisable: it crosses a process boundary)."""

    contender: str
    scenario: str
    base_url: str
    rows: int
    template: str
    max_tokens: int = 64
    stream: bool = False
    concurrency: int = 64
    retries: int = 4
    rpm: int | None = None
    tpm: int | None = None
    rss_cap_mb: float | None = None
    time_cap_s: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        return cls(**data)


class Rows:
    """The rows of a job, made on demand; counts how many the contender has pulled."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pulled = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(self.n):
            self.pulled = i + 1
            yield make_row(i)


class Probe:
    """Checks every answer as it is handed back, and notes when the first token and row came.

    Holds one byte per row (not the answers), so a million rows cost a megabyte here.
    """

    def __init__(self, job: Job) -> None:
        self.template = job.template
        self.seen = bytearray(job.rows)
        self.correct = 0
        self.wrong = 0
        self.duplicates = 0
        self.failed = 0
        self.example_wrong: str | None = None
        self.example_failure: str | None = None
        self.t0 = time.perf_counter()
        self.first_token_s: float | None = None
        self.first_row_s: float | None = None

    def token(self) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.t0

    def row(self, i: int, text: Any) -> None:
        if self.first_row_s is None:
            self.first_row_s = time.perf_counter() - self.t0
        if self.seen[i]:
            self.duplicates += 1
            return
        self.seen[i] = 1
        if text == expected_answer(self.template, make_row(i)):
            self.correct += 1
        else:
            self.wrong += 1
            if self.example_wrong is None:
                self.example_wrong = f"row {i}: {str(text)[:120]!r}"

    def fail(self, i: int | None, why: object) -> None:
        self.failed += 1
        if self.example_failure is None:
            self.example_failure = f"row {i}: {str(why)[:200]}"

    def snapshot(self) -> dict[str, Any]:
        return {
            "correct": self.correct,
            "wrong": self.wrong,
            "duplicates": self.duplicates,
            "failed": self.failed,
            "answered": self.correct + self.wrong,
            "first_token_s": self.first_token_s,
            "first_row_s": self.first_row_s,
            "example_wrong": self.example_wrong,
            "example_failure": self.example_failure,
        }


def _body(job: Job, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": job.max_tokens,
    }
    if job.stream:
        body["stream"] = True
    return body


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _backoff(attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return retry_after
    return random.uniform(0, min(8.0, 0.5 * 2**attempt))


def _retryable(status: int) -> bool:
    return status in RETRYABLE or status >= 500


class GaveUpError(Exception):
    """A hand-written client could not get an answer for a row."""


def _content_of(chunk: dict[str, Any], probe: Probe, parts: list[str]) -> None:
    if "error" in chunk:
        raise ValueError(f"error event in stream: {chunk['error']}")
    for choice in chunk.get("choices") or ():
        text = (choice.get("delta") or {}).get("content")
        if text:
            probe.token()
            parts.append(text)


# ---------------------------------------------------------------------------- sequential


def run_sequential(job: Job, rows: Rows, probe: Probe) -> None:
    """One row after the other over one keep-alive connection (stdlib ``http.client``)."""
    url = urllib.parse.urlsplit(job.base_url)
    path = url.path + "/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    host = url.hostname or "127.0.0.1"
    conn = http.client.HTTPConnection(host, url.port, timeout=300)

    def ask(prompt: str) -> str:
        nonlocal conn
        payload = json.dumps(_body(job, prompt))
        last = "no attempt"
        for attempt in range(1 + job.retries):
            retry_after = None
            try:
                conn.request("POST", path, body=payload, headers=headers)
                resp = conn.getresponse()
                if resp.status == 200 and job.stream:
                    parts: list[str] = []
                    while line := resp.readline():
                        line = line.strip()
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            resp.read()
                            return "".join(parts)
                        _content_of(json.loads(data), probe, parts)
                    raise ValueError("stream ended before [DONE]")
                raw = resp.read()
                if resp.status == 200:
                    return str(json.loads(raw)["choices"][0]["message"]["content"])
                last = f"HTTP {resp.status}"
                if not _retryable(resp.status):
                    raise GaveUpError(last)
                retry_after = _retry_after(resp.headers)
            except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                conn.close()  # the connection may be in any state: start afresh
                conn = http.client.HTTPConnection(host, url.port, timeout=300)
            if attempt < job.retries:
                time.sleep(_backoff(attempt, retry_after))
        raise GaveUpError(f"gave up after {1 + job.retries} attempts: {last}")

    try:
        for row in rows:
            try:
                text = ask(job.template.format_map(row))
            except GaveUpError as exc:
                probe.fail(row["id"], exc)
                continue
            probe.row(row["id"], text)
    finally:
        conn.close()


# ---------------------------------------------------------------------------- aiohttp


async def _ask_aiohttp(session: Any, url: str, job: Job, prompt: str, probe: Probe) -> str:
    import aiohttp

    body = _body(job, prompt)
    last = "no attempt"
    for attempt in range(1 + job.retries):
        retry_after = None
        try:
            async with session.post(url, json=body) as resp:
                if resp.status == 200:
                    if not job.stream:
                        data = await resp.json(content_type=None)
                        return str(data["choices"][0]["message"]["content"])
                    parts: list[str] = []
                    async for raw in resp.content:
                        line = raw.strip()
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            return "".join(parts)
                        _content_of(json.loads(data), probe, parts)
                    raise ValueError("stream ended before [DONE]")
                last = f"HTTP {resp.status}"
                if not _retryable(resp.status):
                    raise GaveUpError(last)
                retry_after = _retry_after(resp.headers)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, IndexError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if attempt < job.retries:
            await asyncio.sleep(_backoff(attempt, retry_after))
    raise GaveUpError(f"gave up after {1 + job.retries} attempts: {last}")


async def _gather_rows(
    job: Job, rows: Rows, probe: Probe, one: Callable[[dict[str, Any]], Awaitable[Any]]
) -> None:
    """``asyncio.gather`` over one coroutine per row; the answers come back all at the end."""

    async def guarded(row: dict[str, Any]) -> tuple[int, Any, BaseException | None]:
        try:
            return row["id"], await one(row), None
        except Exception as exc:  # the row failed; the others go on
            return row["id"], None, exc

    results = await asyncio.gather(*[guarded(row) for row in rows])
    for i, text, error in results:
        if error is None:
            probe.row(i, text)
        else:
            probe.fail(i, f"{type(error).__name__}: {error}")


async def run_gather(job: Job, rows: Rows, probe: Probe) -> None:
    """``asyncio.gather`` over all rows on one aiohttp session, default pool (100)."""
    import aiohttp

    url = job.base_url + "/chat/completions"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(headers=headers) as session:

        async def one(row: dict[str, Any]) -> str:
            return await _ask_aiohttp(session, url, job, job.template.format_map(row), probe)

        await _gather_rows(job, rows, probe, one)


async def run_aiohttp(job: Job, rows: Rows, probe: Probe) -> None:
    """``asyncio.gather`` with a semaphore over bare aiohttp, pool sized to the concurrency."""
    import aiohttp

    url = job.base_url + "/chat/completions"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    semaphore = asyncio.Semaphore(job.concurrency)
    connector = aiohttp.TCPConnector(limit=job.concurrency)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:

        async def one(row: dict[str, Any]) -> str:
            async with semaphore:
                return await _ask_aiohttp(session, url, job, job.template.format_map(row), probe)

        await _gather_rows(job, rows, probe, one)


# ---------------------------------------------------------------------------- openai SDK


async def run_openai(job: Job, rows: Rows, probe: Probe) -> None:
    """``AsyncOpenAI`` with a semaphore; the SDK's own retries (``max_retries``)."""
    import importlib

    import openai

    # a pool as large as the concurrency (the SDK keeps 100 idle connections by default); the
    # SDK's HTTP library is httpx (httpx2 in openai 3): take Limits from the one it uses
    http = importlib.import_module(openai.DefaultAsyncHttpxClient.__mro__[1].__module__)
    n = job.concurrency
    limits = http.Limits(max_connections=n, max_keepalive_connections=n)
    client = openai.AsyncOpenAI(
        base_url=job.base_url,
        api_key=API_KEY,
        max_retries=job.retries,
        http_client=openai.DefaultAsyncHttpxClient(limits=limits),
    )
    semaphore = asyncio.Semaphore(job.concurrency)

    async def one(row: dict[str, Any]) -> str | None:
        prompt = job.template.format_map(row)
        async with semaphore:
            if not job.stream:
                reply = await client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=job.max_tokens,
                )
                return reply.choices[0].message.content
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=job.max_tokens,
                stream=True,
            )
            parts = []
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        probe.token()
                        parts.append(choice.delta.content)
            return "".join(parts)

    try:
        await _gather_rows(job, rows, probe, one)
    finally:
        await client.close()


# ---------------------------------------------------------------------------- LangChain


async def run_langchain(job: Job, rows: Rows, probe: Probe) -> None:
    """``ChatOpenAI(...).abatch(prompts, max_concurrency=...)``, failures returned per row."""
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_openai import ChatOpenAI

    class FirstToken(BaseCallbackHandler):
        run_inline = True

        def on_llm_new_token(self, token: Any, **kwargs: Any) -> None:
            if token:
                probe.token()

    limiter = None
    rate = _known_rate(job)
    if rate is not None:
        from langchain_core.rate_limiters import InMemoryRateLimiter

        limiter = InMemoryRateLimiter(  # half a second of burst, like llm-pipeline's limiter
            requests_per_second=rate, check_every_n_seconds=0.01, max_bucket_size=max(1, rate / 2)
        )
    model = ChatOpenAI(
        model=MODEL,
        base_url=job.base_url,
        api_key=API_KEY,  # type: ignore[arg-type]
        max_retries=job.retries,
        max_tokens=job.max_tokens,  # type: ignore[call-arg]
        streaming=job.stream,
        rate_limiter=limiter,
    )
    ids = []
    prompts: list[Any] = []
    for row in rows:
        ids.append(row["id"])
        prompts.append(job.template.format_map(row))
    config: Any = {"max_concurrency": job.concurrency}
    if job.stream:
        config["callbacks"] = [FirstToken()]
    answers = await model.abatch(prompts, config=config, return_exceptions=True)
    for i, answer in zip(ids, answers, strict=True):
        if isinstance(answer, BaseException):
            probe.fail(i, f"{type(answer).__name__}: {answer}")
        else:
            probe.row(i, answer.content)


def _known_rate(job: Job) -> float | None:
    """Requests per second the quota allows, for clients that can only pace requests."""
    rates = []
    if job.rpm:
        rates.append(job.rpm / 60)
    if job.tpm:
        tokens = _tokens_per_row(job)
        rates.append(job.tpm / 60 / tokens)
    return min(rates) if rates else None


def _tokens_per_row(job: Job) -> float:
    """Mean prompt + answer tokens of the job's rows, by the simulator's counting rule."""
    from pipeline.testing._sim import tokens

    sample = [make_row(i) for i in range(min(job.rows, 1000))]
    total = 0
    for row in sample:
        prompt = job.template.format_map(row)
        total += tokens(prompt) + tokens("echo: " + prompt)
    return total / max(1, len(sample))


# ---------------------------------------------------------------------------- this library


def _caller(job: Job, probe: Probe, *, learn: bool) -> Any:
    from stages.llm import Limits, LLMCaller, Output, Retry

    return LLMCaller(
        model=MODEL,
        prompt=job.template,
        base_url=job.base_url,
        params={"max_tokens": job.max_tokens},
        output=Output(
            stream=job.stream,
            on_delta=(lambda env, text: probe.token()) if job.stream else None,
        ),
        limits=Limits(
            concurrency=job.concurrency,
            rpm=None if learn else job.rpm,
            tpm=None if learn else job.tpm,
        ),
        retry=Retry(max_retries=job.retries),
    )


async def _run_pipeline(job: Job, rows: Rows, probe: Probe, *, learn: bool) -> None:
    from pipeline import Pipeline

    pipe = Pipeline(_caller(job, probe, learn=learn))
    async with pipe.open(iter(rows)) as results:
        async for value in results:
            probe.row(value["id"], value["response"])
    report = results.report
    assert report is not None
    for failed in report.failures:
        probe.fail(failed.seq, f"{failed.error_type}: {failed.message}")


async def run_pipeline(job: Job, rows: Rows, probe: Probe) -> None:
    """``Pipeline(LLMCaller(...))`` over the rows, answers read as they complete."""
    await _run_pipeline(job, rows, probe, learn=False)


async def run_pipeline_learn(job: Job, rows: Rows, probe: Probe) -> None:
    """The same with no ``rpm``/``tpm``: the limits are learned from headers and 429s."""
    await _run_pipeline(job, rows, probe, learn=True)


def run_cli(job: Job, rows: Rows, probe: Probe) -> None:
    """``python -m pipeline run rows.jsonl -o answers.jsonl ...`` in a child process.

    The input file is written before the clock starts; the output is checked after the
    process ends (the CLI publishes its output file atomically at the end).
    """
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        src, out = Path(tmp) / "rows.jsonl", Path(tmp) / "answers.jsonl"
        with src.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        argv = [
            sys.executable,
            "-m",
            "pipeline",
            "run",
            str(src),
            "-o",
            str(out),
            "--model",
            MODEL,
            "--prompt",
            job.template,
            "--base-url",
            job.base_url,
            "--concurrency",
            str(job.concurrency),
            "--max-retries",
            str(job.retries),
            "--param",
            f"max_tokens={job.max_tokens}",
            "--quiet",
        ]
        argv.append("--stream" if job.stream else "--no-stream")
        if job.rpm:
            argv += ["--rpm", str(job.rpm)]
        if job.tpm:
            argv += ["--tpm", str(job.tpm)]
        probe.t0 = time.perf_counter()
        with tempfile.TemporaryFile() as errors:
            child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errors)
            CHILD["proc"] = child
            _watch_child(child)
            errors.seek(0)
            stderr = errors.read()
        if child.returncode != 0 and not out.exists():
            raise RuntimeError(
                f"CLI exited with {child.returncode}: {stderr.decode(errors='replace')[-600:]}"
            )
        if out.exists():
            with out.open() as f:
                for line in f:
                    value = json.loads(line)
                    probe.row(value["id"], value.get("response"))
        answered = sum(probe.seen)
        for _ in range(rows.pulled - answered):
            probe.fail(None, "dead-lettered by the CLI")


CHILD: dict[str, Any] = {"proc": None, "peak": 0.0, "rss": 0.0, "wait": 0.0}
"""The CLI's child process while it runs: its peak and current RSS (MB), its CPU wait (s)."""


def _watch_child(child: subprocess.Popen[bytes]) -> None:
    """Sample a child's VmHWM and VmRSS until it exits (VmHWM only grows: the last is its peak)."""
    status = Path(f"/proc/{child.pid}/status")
    while child.poll() is None:
        CHILD["wait"] = max(CHILD["wait"], runqueue_wait_s(child.pid))
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    CHILD["peak"] = max(CHILD["peak"], int(line.split()[1]) / 1024)
                elif line.startswith("VmRSS:"):
                    CHILD["rss"] = int(line.split()[1]) / 1024
        except (OSError, ValueError):
            pass
        time.sleep(0.02)  # a sampling interval, not synchronisation


CONTENDERS: dict[str, Callable[[Job, Rows, Probe], Any]] = {
    "sequential": run_sequential,
    "gather": run_gather,
    "aiohttp": run_aiohttp,
    "openai": run_openai,
    "langchain": run_langchain,
    "pipeline": run_pipeline,
    "pipeline-learn": run_pipeline_learn,
    "cli": run_cli,
}


# ---------------------------------------------------------------------------- the worker

PRELOAD: dict[str, tuple[str, ...]] = {
    "sequential": (),
    "gather": ("aiohttp", "uvloop"),
    "aiohttp": ("aiohttp", "uvloop"),
    "openai": ("openai", "uvloop"),
    "langchain": (
        "langchain_openai",
        "langchain_core.callbacks",
        "langchain_core.rate_limiters",
        "uvloop",
    ),
    "pipeline": ("pipeline._runner", "stages.llm._caller", "uvloop"),
    "pipeline-learn": ("pipeline._runner", "stages.llm._caller", "uvloop"),
    "cli": (),
}
"""What each contender imports, loaded before any clock starts."""


def preload(contender: str) -> None:
    """Import what ``contender`` needs, so no run measures import time."""
    import importlib

    for module in PRELOAD[contender]:
        importlib.import_module(module)


def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def runqueue_wait_s(pid: int | str = "self") -> float:
    """Seconds a process's main thread has spent runnable but waiting for a CPU (Linux)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


class _Watchdog(threading.Thread):
    """Ends a job that passes its memory or time cap, reporting what it had done by then."""

    def __init__(
        self, job: Job, probe: Probe, emit: Callable[[dict[str, Any]], None], state: Any
    ) -> None:
        super().__init__(daemon=True)
        self.job, self.probe, self.emit, self.state = job, probe, emit, state
        self.done = threading.Event()

    def run(self) -> None:
        job = self.job
        while not self.done.wait(0.01):
            rss = max(_status_mb("VmRSS:"), CHILD["rss"])
            elapsed = time.perf_counter() - self.probe.t0  # the CLI's clock starts late
            reason = None
            if job.rss_cap_mb is not None and rss > job.rss_cap_mb:
                reason = f"memory cap of {job.rss_cap_mb:,.0f} MB passed"
            elif job.time_cap_s is not None and elapsed > job.time_cap_s:
                reason = f"time cap of {job.time_cap_s:g} s reached"
            if reason is not None:
                child = CHILD["proc"]
                if child is not None and child.poll() is None:
                    child.kill()
                    child.wait()
                result = self.state(elapsed)
                result["stopped"] = reason
                self.emit(result)
                os._exit(0)


def run_job(job: Job, emit: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one job in this process and return its figures."""
    gc.collect()
    fn = CONTENDERS[job.contender]
    rows = Rows(job.rows)
    probe = Probe(job)
    cpu0 = _cpu(resource.RUSAGE_SELF)
    child0 = _cpu(resource.RUSAGE_CHILDREN)
    CHILD.update(proc=None, peak=0.0, rss=0.0, wait=0.0)
    wait0 = runqueue_wait_s()

    def state(elapsed: float) -> dict[str, Any]:
        # the CLI contender is its child process: its CPU and memory, not this worker's
        cli = job.contender == "cli"
        return {
            "contender": job.contender,
            "scenario": job.scenario,
            "rows": job.rows,
            "rows_pulled": rows.pulled if not cli else None,  # the CLI reads its own file
            "elapsed_s": elapsed,
            "cpu_s": (
                _cpu(resource.RUSAGE_CHILDREN) - child0  # the CLI's process, once it is reaped
                if cli
                else _cpu(resource.RUSAGE_SELF) - cpu0
            ),
            "peak_rss_mb": CHILD["peak"] if cli else _status_mb("VmHWM:"),
            "cpu_wait_s": CHILD["wait"] if cli else runqueue_wait_s() - wait0,
            "error": None,
            "stopped": None,
            **probe.snapshot(),
        }

    watchdog = None
    if emit is not None and (job.rss_cap_mb is not None or job.time_cap_s is not None):
        watchdog = _Watchdog(job, probe, emit, state)
        watchdog.start()
    probe.t0 = time.perf_counter()
    error = None
    try:
        outcome = fn(job, rows, probe)
        if asyncio.iscoroutine(outcome):
            import uvloop

            uvloop.run(outcome)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:600]
    elapsed = time.perf_counter() - probe.t0  # the CLI restarts the clock after its input file
    if watchdog is not None:
        watchdog.done.set()
    result = state(elapsed)
    result["error"] = error
    return result


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: jobs on stdin (or ``--once JOB``), results on stdout.

    ``--serve CONTENDER`` imports that contender's libraries first, then says it is ready.
    """
    args = sys.argv[1:] if argv is None else argv
    out: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, not into the results
    sys.stdout = sys.stderr
    os.environ.setdefault("OPENAI_API_KEY", API_KEY)

    def emit(result: dict[str, Any]) -> None:
        out.write(json.dumps(result) + "\n")
        out.flush()

    if args and args[0] == "--once":
        job = Job.from_dict(json.loads(args[1]))
        preload(job.contender)
        emit(run_job(job, emit))
        return 0
    if args and args[0] == "--serve":
        preload(args[1])
    emit({"ready": True})
    for line in sys.stdin:
        if line.strip():
            emit(run_job(Job.from_dict(json.loads(line))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
