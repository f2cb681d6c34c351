"""A hostile provider on 127.0.0.1 (issue 15, findings 3, 6 and 8): the job never freezes on
a day-long Retry-After, never takes a non-text answer as a success, never reads a huge body.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web

from pipeline import Pipeline
from pipeline._report import RunReport
from pipeline.cli._progress import format_bar, format_line
from pipeline.jobs import JobProgress, JobSettings, run_job
from stages.llm._caller import HTTP, Limits, LLMCaller, Retry

pytestmark = pytest.mark.anyio

Handler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-hostile-test")


def completion(content: Any, **message: Any) -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, **message},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


@asynccontextmanager
async def hostile(handler: Handler) -> AsyncIterator[tuple[str, list[str]]]:
    """Serve ``handler(request, body)`` for chat completions; yield (url, names asked)."""
    asked: list[str] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        asked.append(body["messages"][-1]["content"])
        return await handler(request, body)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1", asked
    finally:
        await runner.cleanup()


def caller(url: str, **kwargs: Any) -> LLMCaller:
    options: dict[str, Any] = {
        "model": "m",
        "prompt": "{name}",
        "base_url": url,
        "retry": Retry(backoff_base=0.001, backoff_cap=0.01, max_retries=3),
        "limits": Limits(concurrency=2),
    }
    options.update(kwargs)
    return LLMCaller(**options)


async def run(stage: LLMCaller, names: list[str]) -> tuple[list[Any], RunReport]:
    out: list[Any] = []
    with anyio.fail_after(20):
        async with Pipeline([{"name": n} for n in names], stage, ordered=False).open() as results:
            async for value in results:
                out.append(value)
    assert results.report is not None and results.report.balanced
    return out, results.report


# -- finding 3: a day-long Retry-After -----------------------------------------------------------


async def day_long_429_for_bad(request: web.Request, body: dict[str, Any]) -> web.Response:
    if body["messages"][-1]["content"] == "bad":
        return web.json_response(
            {"error": {"message": "Rate limit reached for requests per day", "type": "requests"}},
            status=429,
            headers={"Retry-After": "86400"},
        )
    return web.json_response(completion("ok"))


async def test_a_retry_after_past_the_cap_dead_letters_its_row_and_pauses_nobody() -> None:
    async with hostile(day_long_429_for_bad) as (url, asked):
        stage = caller(url, retry=Retry(max_retry_after=60, backoff_base=0.001))
        results, report = await run(stage, ["a", "bad", "b", "c", "d"])
    assert sorted(r["name"] for r in results) == ["a", "b", "c", "d"]
    (failed,) = report.failures
    assert failed.status == 429 and failed.attempts == 1 and asked.count("bad") == 1
    assert failed.message.startswith(
        "the server asked to retry after 86400s, longer than max_retry_after (60s) allows"
    )
    assert stage.totals.waiting() is None  # nothing waits for it


async def test_a_job_waiting_on_a_long_retry_after_says_why_and_until_when(
    tmp_path: Path,
) -> None:
    async def wait_a_minute(request: web.Request, body: dict[str, Any]) -> web.Response:
        error = {"error": {"message": "Rate limit reached", "type": "requests"}}
        return web.json_response(error, status=429, headers={"Retry-After": "60"})

    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"name": "a"}) + "\n")
    seen: list[JobProgress] = []
    stop = anyio.Event()

    def on_progress(progress: JobProgress) -> None:
        seen.append(progress)
        if progress.waiting:
            stop.set()

    async with hostile(wait_a_minute) as (url, _):
        settings = JobSettings(
            input=str(source), output=str(tmp_path / "out.jsonl"), model="m", prompt="{name}",
            base_url=url, grace=0, quiet=True,
        )  # fmt: skip
        with anyio.fail_after(20):
            await run_job(
                settings, on_progress=on_progress, stop_event=stop, progress_interval=0.05
            )
    waiting = next(p.waiting for p in seen if p.waiting)
    assert waiting is not None
    assert waiting.startswith("the server asked to retry after 60s (HTTP 429): waiting until ")
    assert waiting.endswith("s)") and " UTC (" in waiting
    line = format_line(next(p for p in seen if p.waiting))
    assert "the server asked to retry after 60s (HTTP 429): waiting until" in line
    assert "waiting until" in format_bar(next(p for p in seen if p.waiting))


async def test_max_retry_after_is_a_setting_and_a_flag() -> None:
    from pipeline.cli._main import build_parser

    assert JobSettings(max_retry_after=5).max_retry_after == 5
    args = build_parser().parse_args(["run", "in.jsonl", "-o", "o", "--max-retry-after", "5"])
    assert args.max_retry_after == 5


# -- finding 6: content that is not text ---------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message", "why"),
    [
        (42, {}, "the answer's content is not text: int 42"),
        (None, {}, "the answer's content is null, with no tool call and no refusal"),
        ({"text": "x"}, {}, "the answer's content is not text: dict"),
    ],
)
async def test_an_answer_without_text_is_a_dead_letter_with_its_reason(
    content: Any, message: dict[str, Any], why: str
) -> None:
    async def answer(request: web.Request, body: dict[str, Any]) -> web.Response:
        return web.json_response(completion(content, **message))

    async with hostile(answer) as (url, asked):
        results, report = await run(caller(url), ["a", "b"])
    assert results == [] and len(report.failures) == 2
    for failed in report.failures:
        assert why in failed.message and failed.status == 200
        assert failed.attempts == 1  # a well-formed answer with nothing in it: not re-bought
    assert len(asked) == 2


async def test_a_null_content_with_a_refusal_or_a_tool_call_is_still_an_answer() -> None:
    async def answer(request: web.Request, body: dict[str, Any]) -> web.Response:
        if body["messages"][-1]["content"] == "tool":
            call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            return web.json_response(completion(None, tool_calls=[call]))
        return web.json_response(completion(None, refusal="I cannot help with that"))

    async with hostile(answer) as (url, _):
        results, report = await run(caller(url), ["tool", "refuse"])
    assert report.failures == [] and len(results) == 2


# -- finding 8: a huge body ----------------------------------------------------------------------


async def test_a_body_past_max_response_bytes_is_a_dead_letter_unread() -> None:
    sent: list[int] = []

    async def huge(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        name = body["messages"][-1]["content"]
        if name != "huge":
            return web.json_response(completion("ok"))
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(request)  # chunked: no Content-Length to refuse it by
        chunk = b" " * 65536
        try:
            for _ in range(50_000_000 // len(chunk)):  # 50 MB, unless the client hangs up
                await response.write(chunk)
                sent.append(len(chunk))
        except (ConnectionResetError, OSError):
            pass
        return response

    async with hostile(huge) as (url, _):
        stage = caller(url, http=HTTP(max_response_bytes=1_000_000))
        results, report = await run(stage, ["a", "huge", "b"])
    assert sorted(r["name"] for r in results) == ["a", "b"]
    (failed,) = report.failures
    assert failed.attempts == 1 and failed.status == 200
    assert "response body too large: more than 1,000,000 bytes so far" in failed.message
    assert sum(sent) < 50_000_000  # the client hung up: the body was not read whole


async def test_a_content_length_past_max_response_bytes_is_refused_before_reading() -> None:
    async def announced(request: web.Request, body: dict[str, Any]) -> web.Response:
        if body["messages"][-1]["content"] == "huge":
            text = "x" * 2_000_000
            return web.json_response(completion(text))
        return web.json_response(completion("ok"))

    async with hostile(announced) as (url, _):
        stage = caller(url, http=HTTP(max_response_bytes=1_000_000))
        results, report = await run(stage, ["huge", "a"])
    assert [r["name"] for r in results] == ["a"]
    (failed,) = report.failures
    assert "(Content-Length), over max_response_bytes (1,000,000)" in failed.message


async def test_max_response_mb_is_a_setting_and_a_flag() -> None:
    from pipeline.cli._main import build_parser
    from pipeline.jobs._caller import build_caller

    settings = JobSettings(model="m", max_response_mb=2.5)
    assert build_caller(settings).http.max_response_bytes == 2_500_000
    args = build_parser().parse_args(["run", "in.jsonl", "-o", "o", "--max-response-mb", "2"])
    assert args.max_response_mb == 2
