"""RunnableStage against LangChain's own ``abatch`` on the same chain and the same server.

Run: ``python benchmarks/langchain_compare.py [--rows 2000] [--concurrency 32]``.

The simulated OpenAI server runs in a subprocess (its own core, latency 20 +/- 10 ms). The chain
is the same on both sides: ``ChatPromptTemplate | ChatOpenAI | StrOutputParser``.

* LangChain: ``chain.abatch(rows, config={"max_concurrency": N}, return_exceptions=True)`` with
  ``ChatOpenAI``'s default ``max_retries=2`` (the SDK's backoff and Retry-After handling).
* Ours: ``Pipeline(rows, RunnableStage(chain, concurrency=N, rpm=..., max_retries=6))`` with
  ``ChatOpenAI(max_retries=0)`` so retries do not multiply.

Two scenarios, each against one fresh server, both contenders in the same run (counters reset
between them): ``clean`` (no faults, no quota: the cost of our machinery) and ``quota+faults``
(an rpm quota below what the client could send, enforced per second, and 3% 5xx faults: what a
real provider looks like).
For each it prints rows/s, rows answered, rows lost, requests the server saw, and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

from pipeline import Pipeline
from stages._langchain import RunnableStage

PROMPT = ChatPromptTemplate.from_messages([("user", "Summarise item {i}: {text}")])
KEY = "sk-bench-not-a-real-key"


@contextlib.contextmanager
def sim_server(*flags: str) -> Iterator[str]:
    """Start ``python -m pipeline sim`` on a free port; yield its base URL (``.../v1``)."""
    cmd = [
        sys.executable,
        "-c",
        "import sys; from pipeline.testing._sim import main; sys.exit(main())",
    ]
    proc = subprocess.Popen(
        [*cmd, "--port", "0", *flags], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "simulated LLM server on http://127.0.0.1:PORT/v1 ..."
        if "http://" not in line:
            raise RuntimeError(f"simulator did not start: {line!r}")
        yield line.split(" on ", 1)[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


async def sim_call(url: str, method: str, path: str) -> dict[str, Any]:
    root = url.rsplit("/v1", 1)[0]
    async with aiohttp.ClientSession() as session, session.request(method, root + path) as resp:
        data: dict[str, Any] = await resp.json()
        return data


def make_rows(n: int) -> list[dict[str, Any]]:
    return [{"i": i, "text": f"row number {i} with a few words of text"} for i in range(n)]


async def langchain_abatch(
    url: str, rows: list[dict[str, Any]], concurrency: int
) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        model = ChatOpenAI(model="sim-1", base_url=url, api_key=KEY, http_async_client=http)
        chain = PROMPT | model | StrOutputParser()
        started = time.perf_counter()
        config: Any = {"max_concurrency": concurrency}
        out = await chain.abatch(rows, config=config, return_exceptions=True)
        elapsed = time.perf_counter() - started
    ok = sum(1 for o in out if isinstance(o, str) and o.startswith("echo: "))
    return {"elapsed": elapsed, "ok": ok, "lost": len(rows) - ok}


async def runnable_stage(
    url: str, rows: list[dict[str, Any]], concurrency: int, rpm: float | None
) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        model = ChatOpenAI(
            model="sim-1", base_url=url, api_key=KEY, max_retries=0, http_async_client=http
        )
        stage = RunnableStage(
            PROMPT | model | StrOutputParser(), concurrency=concurrency, rpm=rpm, max_retries=6
        )
        started = time.perf_counter()
        ok = 0
        async with Pipeline(rows, stage).open() as results:
            async for row in results:
                ok += row["response"].startswith("echo: ")
        elapsed = time.perf_counter() - started
    assert results.report is not None
    return {"elapsed": elapsed, "ok": ok, "lost": len(rows) - ok}


async def scenario(name: str, url: str, rows: list[dict[str, Any]], args: Any, rpm: Any) -> None:
    await sim_call(url, "POST", "/sim/reset")
    theirs = await langchain_abatch(url, rows, args.concurrency)
    theirs["requests"] = (await sim_call(url, "GET", "/sim/counters"))["requests"]
    await sim_call(url, "POST", "/sim/reset")
    ours = await runnable_stage(url, rows, args.concurrency, rpm)
    ours["requests"] = (await sim_call(url, "GET", "/sim/counters"))["requests"]
    print(f"\n== {name}: {len(rows)} rows, max_concurrency {args.concurrency}")
    print(f"{'':<34}{'rows/s':>9}{'answered':>10}{'lost':>6}{'requests':>10}")
    for label, r in (("LangChain abatch (SDK retries=2)", theirs), ("RunnableStage", ours)):
        rate = r["ok"] / r["elapsed"]
        print(f"{label:<34}{rate:>9.0f}{r['ok']:>10}{r['lost']:>6}{r['requests']:>10}")
    ratio = (ours["ok"] / ours["elapsed"]) / max(theirs["ok"] / theirs["elapsed"], 1e-9)
    print(f"ratio (answered rows/s, ours / LangChain): {ratio:.2f}x")


async def main_async(args: Any) -> None:
    rows = make_rows(args.rows)
    latency = ["--latency-ms", "20", "--jitter-ms", "10"]
    with sim_server(*latency) as url:
        await scenario("clean", url, rows, args, None)
    quota = args.rpm
    faults = ["--rpm", str(quota), "--error-5xx", "0.03"]
    with sim_server(*latency, *faults, "--seed", "1") as url:
        # ours is told the quota (a little under it); LangChain has no rate limiter to tell
        await scenario(f"quota {quota} rpm + faults", url, rows, args, quota * 0.95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rpm", type=int, default=6_000, help="the server's quota (100/s)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
