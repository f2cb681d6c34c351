"""``python -m pipeline demo``: the speed test, then a file job, against a simulated server.

No API key and no network: the demo starts the simulated OpenAI-compatible server in-process
with a realistic latency (0.5 s per answer with jitter), then

1. greets 20 names one request at a time with a plain HTTP client, as a simple script would;
2. greets the same 20 names through a pipeline (all requests in flight together);
3. prints both times and the speed-up beside the source documents' published result
   (10.33 s vs 1.86 s, 5.55x);
4. runs a file job over the bundled sample of 1,000 customer rows with the progress bar and
   shows a few output rows.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, TextIO

import aiohttp
import anyio

from pipeline import Pipeline
from pipeline.cli._common import backend_options
from pipeline.cli._progress import ProgressDisplay, summary_table
from pipeline.jobs import JobSettings, run_job
from pipeline.testing import SimConfig, serve
from stages.llm import HTTP, Limits, LLMCaller

NAMES = [
    "Alice",
    "Bob",
    "Charlie",
    "Dave",
    "Emma",
    "Fatima",
    "Gabriel",
    "Hana",
    "Ivan",
    "Julia",
    "Kenji",
    "Lena",
    "Mateo",
    "Nadia",
    "Omar",
    "Priya",
    "Quentin",
    "Rosa",
    "Sven",
    "Tariq",
]
PUBLISHED = (10.33, 1.86)
"""The source documents' sequential and pipeline times for the same test."""

MODEL = "sim-1"
KEY_ENV = "LLM_PIPELINE_DEMO_KEY"
PROMPT = "Say hello to {name}"
SAMPLE_PROMPT = (
    "Write a one-line thank-you note to {name} from {city} for buying our {product}"
    " (rated {rating}/5)."
)


def sample_path() -> str:
    """Return the path of the bundled sample input (1,000 customer rows, JSON Lines)."""
    return str(importlib.resources.files("pipeline") / "data" / "customers.jsonl")


async def sequential(url: str, names: list[str]) -> tuple[float, list[str]]:
    """Greet ``names`` one request at a time with a plain aiohttp client; return time, answers."""
    answers = []
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        for name in names:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Say hello to {name}"}],
            }
            async with session.post(f"{url}/chat/completions", json=body) as resp:
                resp.raise_for_status()
                data = await resp.json()
            answers.append(data["choices"][0]["message"]["content"])
    return time.perf_counter() - started, answers


async def pipelined(url: str, names: list[str]) -> tuple[float, list[Any]]:
    """Greet ``names`` through a pipeline with every request in flight; return time, answers."""
    caller = LLMCaller(
        model=MODEL,
        prompt=PROMPT,
        base_url=url,
        limits=Limits(concurrency=len(names)),
        http=HTTP(api_key_env=KEY_ENV),
    )
    started = time.perf_counter()
    answers: list[Any] = []
    async with Pipeline([{"name": n} for n in names], caller, ordered=True).open() as results:
        async for row in results:
            answers.append(row["response"])
    return time.perf_counter() - started, answers


async def demo(
    *,
    latency_ms: float = 500.0,
    jitter_ms: float = 150.0,
    concurrency: int = 100,
    output: str | None = None,
    out: TextIO | None = None,
    progress: ProgressDisplay | None = None,
) -> dict[str, Any]:
    """Run the demo; return the measured figures.

    Args:
        latency_ms: The simulated server's mean latency.
        jitter_ms: Half-width of its latency jitter.
        concurrency: Requests in flight for the file job.
        output: Where to write the enriched sample (default: a temporary directory, removed).
        out: Where to print (standard output by default).
        progress: The progress display for the file job (default: on standard error).
    """
    stream = out if out is not None else sys.stdout
    os.environ.setdefault(KEY_ENV, "demo-key-not-secret")

    def say(text: str = "") -> None:
        stream.write(text + "\n")
        stream.flush()

    config = SimConfig(latency_ms=latency_ms, jitter_ms=jitter_ms, seed=7)
    async with serve(config) as sim:
        say(f"Simulated LLM server on {sim.url} (latency {latency_ms:g} +/- {jitter_ms:g} ms)")
        say()
        figures = await _speed_test(sim.url, say)
        say()
        figures.update(await _file_job(sim.url, say, concurrency, output, progress))
        figures["server_requests"] = sim.counters()["requests"]
    return figures


async def _speed_test(url: str, say: Callable[..., None]) -> dict[str, Any]:
    """Greet the names one at a time, then through the pipeline; print and return the times."""
    say(f"1. Greeting {len(NAMES)} names one request at a time...")
    seq_s, seq_answers = await sequential(url, NAMES)
    say(f"   {seq_answers[0]!r} ... {seq_answers[-1]!r}")
    say(f"   sequential: {seq_s:.2f} s")
    say(f"2. Greeting the same {len(NAMES)} names through the pipeline...")
    par_s, par_answers = await pipelined(url, NAMES)
    if par_answers != seq_answers:  # the simulator's answers are deterministic
        raise AssertionError("the pipeline's answers differ from the sequential ones")
    say(f"   pipeline:   {par_s:.2f} s")
    speedup = seq_s / par_s if par_s > 0 else float("inf")
    published = PUBLISHED[0] / PUBLISHED[1]
    say()
    say(f"   speed-up: {speedup:.2f}x  ({seq_s:.2f} s -> {par_s:.2f} s)")
    say(f"   source documents: {PUBLISHED[0]:.2f} s -> {PUBLISHED[1]:.2f} s, {published:.2f}x")
    return {"sequential_s": seq_s, "pipeline_s": par_s, "speedup": speedup}


async def _file_job(
    url: str,
    say: Callable[..., None],
    concurrency: int,
    output: str | None,
    progress: ProgressDisplay | None,
) -> dict[str, Any]:
    """Enrich the bundled sample with a file job; print its summary and first rows."""
    sample = sample_path()
    workdir = None
    if output is None:
        workdir = tempfile.mkdtemp(prefix="llm-pipeline-demo-")
        target = os.path.join(workdir, "customers.enriched.jsonl")
    else:
        target = output
    say(f"3. Enriching {os.path.basename(sample)} (1,000 rows) with {concurrency} in flight...")
    try:
        settings = JobSettings(
            input=sample,
            output=target,
            model=MODEL,
            prompt=SAMPLE_PROMPT,
            base_url=url,
            api_key_env=KEY_ENV,
            id_field="id",
            concurrency=concurrency,
            output_field="note",
            ordered=True,
            overwrite=True,
        )
        display = progress if progress is not None else ProgressDisplay()
        interval = 0.1 if display.tty else 1.0
        summary = await run_job(settings, on_progress=display.update, progress_interval=interval)
        display.close()
        say(summary_table(summary))
        say()
        say("First rows of the output:")
        text = await anyio.Path(target).read_text(encoding="utf-8")
        for line in text.splitlines()[:3]:
            say("   " + json.dumps(json.loads(line), ensure_ascii=False))
        if workdir is not None:
            say("(the output was written to a temporary directory; --output PATH keeps it)")
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return {"file_rows": summary.total_ok, "file_s": summary.elapsed_s}


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m pipeline demo``; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="llm-pipeline demo",
        description="Speed test and a file job against a simulated LLM server (no API key).",
    )
    parser.add_argument("--latency-ms", type=float, default=500.0, help="mean latency (500)")
    parser.add_argument("--jitter-ms", type=float, default=150.0, help="latency jitter (150)")
    parser.add_argument(
        "--concurrency", type=int, default=100, help="requests in flight for the file job (100)"
    )
    parser.add_argument(
        "--output", default=None, help="keep the enriched sample here (default: not kept)"
    )
    args = parser.parse_args(argv)
    if args.latency_ms < 0 or args.jitter_ms < 0 or args.concurrency < 1:
        parser.error("latency and jitter must be >= 0 and concurrency >= 1")
    try:
        anyio.run(
            lambda: demo(
                latency_ms=args.latency_ms,
                jitter_ms=args.jitter_ms,
                concurrency=args.concurrency,
                output=args.output,
            ),
            backend="asyncio",
            backend_options=backend_options(),
        )
    except KeyboardInterrupt:
        return 130
    return 0


__all__ = ["NAMES", "PUBLISHED", "demo", "main", "sample_path"]
