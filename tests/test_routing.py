"""Specification of routing: several endpoints for one caller, failover and fallback models.

Every rule runs against real servers on 127.0.0.1 (simulators, and a small aiohttp server
where a behaviour is not the simulator's): a key rejected at start, a quota exhausted
mid-job, an endpoint failing with 5xx and coming back, one that refuses connections, every
endpoint out, a model that fails after its retries or whose context window is too small.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from time import perf_counter
from typing import Any, cast

import anyio
import pytest
from aiohttp import web

from pipeline import Pipeline
from pipeline._errors import ConfigError
from pipeline._report import RunReport
from pipeline.testing._sim import SimConfig, serve
from stages.llm import (
    Completion,
    Deployment,
    LLMCaller,
    NoEndpointLeftError,
    ResponseCache,
    Retry,
    Routing,
)
from stages.llm._errors import LLMCallError
from stages.llm._exchange import Exchange
from stages.llm._lane import Lane
from stages.llm._providers import Answer
from stages.llm._routing import deployment_from_mapping, parse_route


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


pytestmark = pytest.mark.anyio

GOOD = "sk-route-GOOD-7f3a9"
BAD = "sk-route-BAD-0b1e4"
FAST = Retry(backoff_base=0.002, backoff_cap=0.01, max_retries=4)
ROWS = [{"name": f"user{i}"} for i in range(40)]


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTE_GOOD", GOOD)
    monkeypatch.setenv("ROUTE_BAD", BAD)


def _deployment(name: str, url: str, *, key: str = "ROUTE_GOOD", **more: Any) -> Deployment:
    return Deployment(name=name, base_url=url, api_key_env=key, model="sim-1", **more)


def _caller(endpoints: Sequence[Deployment], **kwargs: Any) -> LLMCaller:
    routing = kwargs.pop("routing_options", {})
    settings: dict[str, Any] = {
        "prompt": "Say hello to {name}",
        "retry": FAST,
        "provider": Routing(endpoints=endpoints, cooldown_s=0.02, **routing),
    }
    settings.update(kwargs)
    return LLMCaller(**settings)


async def _run(caller: LLMCaller, rows: Any = ROWS) -> tuple[list[Any], RunReport]:
    out: list[Any] = []
    with anyio.fail_after(30):
        async with Pipeline(rows, caller).open() as results:
            async for value in results:
                out.append(value)
    assert results.report is not None
    assert results.report.balanced
    return out, results.report


def _figures(caller: LLMCaller) -> dict[str, dict[str, Any]]:
    assert caller.router is not None
    return {row["name"]: row for row in caller.router.figures()}


def _answered_once(out: list[dict[str, Any]], rows: Sequence[dict[str, Any]] = ROWS) -> None:
    assert sorted(r["name"] for r in out) == sorted(r["name"] for r in rows)
    assert all(r["response"] == f"echo: Say hello to {r['name']}" for r in out)


# -- spreading and recording ----------------------------------------------------------------------


async def test_rows_spread_over_the_endpoints_and_each_names_who_answered() -> None:
    async with serve() as a, serve() as b:
        caller = _caller([_deployment("a", a.url), _deployment("b", b.url)])
        out, report = await _run(caller)
        served = (a.counters()["requests"], b.counters()["requests"])
    _answered_once(out)
    assert {r["response_endpoint"] for r in out} == {"a", "b"}
    assert all(r["response_model"] == "sim-1" for r in out)
    figures = _figures(caller)
    assert (figures["a"]["answered"], figures["b"]["answered"]) == served
    assert min(served) >= 5  # neither endpoint idles
    assert report.failures == []


async def test_a_completion_records_the_endpoint_and_the_model_that_answered() -> None:
    async with serve() as a:
        caller = _caller([_deployment("only", a.url)], output="completion")
        out, _ = await _run(caller, ROWS[:3])
    assert all(isinstance(c, Completion) for c in out)
    assert {(c.endpoint, c.model) for c in out} == {("only", "sim-1")}


# -- failover --------------------------------------------------------------------------------------


async def test_a_key_rejected_at_start_takes_its_endpoint_out_once_and_rows_go_elsewhere(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serve(SimConfig(require_key=GOOD)) as a, serve(SimConfig(require_key=GOOD)) as b:
        caller = _caller([_deployment("rejected", a.url, key="ROUTE_BAD"), _deployment("b", b.url)])
        with caplog.at_level(logging.WARNING, logger="pipeline.routing"):
            out, report = await _run(caller)
    _answered_once(out)
    assert {r["response_endpoint"] for r in out} == {"b"}
    figures = _figures(caller)
    assert figures["rejected"]["state"] == "out"
    assert "401" in figures["rejected"]["reason"]
    said = [m for m in caplog.messages if "out for the rest of the job" in m]
    assert len(said) == 1 and "rejected" in said[0] and "$ROUTE_BAD" in said[0]
    assert BAD not in caplog.text and GOOD not in caplog.text  # keys never appear
    assert report.failures == []


async def test_a_quota_exhausted_mid_job_takes_the_endpoint_out_and_the_job_goes_on() -> None:
    async with serve() as a, serve() as b:
        caller = _caller([_deployment("a", a.url), _deployment("b", b.url)])
        rows: list[dict[str, Any]] = []
        switched_at: int | None = None

        async def source() -> AsyncIterator[dict[str, Any]]:
            nonlocal switched_at
            for index in range(5000):
                if switched_at is None and caller.router and _figures(caller)["a"]["answered"]:
                    a.configure(SimConfig(quota_429=1.0))  # the account behind 'a' runs dry
                    switched_at = index
                if switched_at is not None and index >= switched_at + 100:
                    return
                rows.append({"name": f"user{index}"})
                yield rows[-1]

        out, report = await _run(caller, source())
        refused = a.counters()["by_route"]
    _answered_once(out, rows)
    figures = _figures(caller)
    assert figures["a"]["state"] == "out"
    assert "insufficient_quota" in figures["a"]["reason"]
    assert figures["a"]["answered"] >= 1  # it did answer before
    assert sum(n for route in refused.values() for s, n in route.items() if s == "429") >= 1
    assert report.failures == []


async def test_repeated_5xx_cool_an_endpoint_down_and_a_probe_brings_it_back() -> None:
    async with serve(SimConfig(error_5xx=1.0)) as a, serve() as b:
        caller = _caller([_deployment("a", a.url), _deployment("b", b.url)])
        healed = False

        async def source() -> AsyncIterator[dict[str, Any]]:
            nonlocal healed
            for index in range(5000):
                figures = _figures(caller) if caller.router is not None else {}
                if figures and figures["a"]["cooldowns"] and not healed:
                    a.configure(SimConfig())  # the endpoint recovers
                    healed = True
                if healed and figures["a"]["answered"]:
                    return  # probed and back in: enough
                yield {"name": f"user{index}"}

        out, report = await _run(caller, source())
    figures = _figures(caller)
    assert figures["a"]["cooldowns"] >= 1
    assert figures["a"]["errors"] >= 3  # three failures in a row took it out
    assert figures["a"]["answered"] >= 1 and figures["a"]["state"] == "up"
    assert report.failures == []  # the failed attempts were answered elsewhere
    assert len({r["name"] for r in out}) == len(out)


def test_failures_of_requests_sent_before_a_change_of_health_move_nothing() -> None:
    # Requests in flight when an endpoint is cooled down, or when a probe brings it back, end
    # later; their failures are counted but must not cool it down again.
    lane = Lane(
        _deployment("a", "http://127.0.0.1:1/v1"),
        cast(Exchange, None),
        Routing(endpoints=[_deployment("a", "http://127.0.0.1:1/v1")], cooldown_s=60.0, failures=3),
    )
    boom = LLMCallError("HTTP 503", status=503)
    sent_up = lane.epoch
    for _ in range(3):
        lane.failed(boom, sent_up)
    assert lane.figures.cooldowns == 1 and lane.state(perf_counter()) == "cooling"
    for _ in range(5):  # sent before the cool-down, failing during it
        lane.failed(boom, sent_up)
    assert lane.figures.cooldowns == 1 and lane.figures.errors == 8
    lane.cool_until = perf_counter() - 1.0  # the cool-down is over: one probe is let through
    assert lane.state(perf_counter()) == "probing"
    lane.answered(0.01, Answer(text="hi"), 0.0)  # the probe answered
    assert lane.state(perf_counter()) == "up"
    for _ in range(5):  # still more from before the cool-down, failing after the recovery
        lane.failed(boom, sent_up)
    assert lane.state(perf_counter()) == "up" and lane.figures.cooldowns == 1
    sent_now = lane.epoch
    for _ in range(3):  # requests sent now fail: that is news
        lane.failed(boom, sent_now)
    assert lane.state(perf_counter()) == "cooling" and lane.figures.cooldowns == 2


async def test_an_endpoint_refusing_connections_cools_down_and_rows_go_to_the_other() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    async with serve() as b:
        dead = _deployment("dead", f"http://127.0.0.1:{port}/v1")
        caller = _caller([dead, _deployment("b", b.url)])
        out, report = await _run(caller)
    _answered_once(out)
    assert {r["response_endpoint"] for r in out} == {"b"}
    figures = _figures(caller)
    assert figures["dead"]["cooldowns"] >= 1 and figures["dead"]["answered"] == 0
    assert report.failures == []


async def test_the_job_stops_when_no_endpoint_is_left_naming_each() -> None:
    async with serve(SimConfig(require_key=GOOD)) as a, serve(SimConfig(quota_429=1.0)) as b:
        caller = _caller([_deployment("a", a.url, key="ROUTE_BAD"), _deployment("b", b.url)])
        with pytest.raises(NoEndpointLeftError) as caught:
            await _run(caller)
    message = str(caught.value)
    assert "a: " in message and "b: " in message and "insufficient_quota" in message
    assert BAD not in message


# -- fallback models -------------------------------------------------------------------------------


async def test_a_row_failing_on_its_model_after_retries_is_answered_by_the_fallback() -> None:
    async with serve(SimConfig(error_5xx=1.0)) as a, serve() as b:
        big = Deployment(name="big", base_url=a.url, api_key_env="ROUTE_GOOD", model="big-1")
        small = Deployment(name="small", base_url=b.url, api_key_env="ROUTE_GOOD", model="small-1")
        caller = _caller(
            [big, small],
            model="big-1",
            retry=Retry(backoff_base=0.002, backoff_cap=0.01, max_retries=1),
            routing_options={"fallbacks": ["small-1"]},
        )
        out, report = await _run(caller, ROWS[:10])
    _answered_once(out, ROWS[:10])
    assert {(r["response_model"], r["response_endpoint"]) for r in out} == {("small-1", "small")}
    assert caller.router is not None and caller.router.fallbacks == 10
    assert report.failures == []


async def test_without_a_fallback_the_row_is_dead_lettered_after_its_retries() -> None:
    async with serve(SimConfig(error_5xx=1.0)) as a:
        caller = _caller(
            [_deployment("a", a.url)],
            retry=Retry(backoff_base=0.002, backoff_cap=0.01, max_retries=1),
        )
        out, report = await _run(caller, ROWS[:3])
    assert out == []
    assert len(report.failures) == 3


async def _context_server() -> tuple[web.AppRunner, str]:
    """A server whose model has a small context window: long prompts get OpenAI's 400."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        if len(prompt) > 30:
            error = {
                "message": "This model's maximum context length is 8 tokens.",
                "type": "invalid_request_error",
                "code": "context_length_exceeded",
            }
            return web.json_response({"error": error}, status=400)
        answer = {
            "model": body["model"],
            "choices": [{"message": {"content": "short: " + prompt}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3},
        }
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/v1"


async def test_a_prompt_over_the_context_window_goes_to_the_fallback_at_once() -> None:
    runner, url = await _context_server()
    try:
        async with serve() as b:
            tiny = Deployment(name="tiny", base_url=url, api_key_env="ROUTE_GOOD", model="tiny")
            wide = Deployment(name="wide", base_url=b.url, api_key_env="ROUTE_GOOD", model="wide")
            caller = _caller([tiny, wide], model="tiny", routing_options={"fallbacks": ["wide"]})
            rows = [{"name": "Ada"}, {"name": "a much longer name than the window holds"}]
            out, report = await _run(caller, rows)
    finally:
        await runner.cleanup()
    by_name = {r["name"]: r for r in out}
    assert by_name["Ada"]["response"] == "short: Say hello to Ada"
    assert by_name["Ada"]["response_model"] == "tiny"
    long = by_name["a much longer name than the window holds"]
    assert (long["response_model"], long["response_endpoint"]) == ("wide", "wide")
    assert _figures(caller)["tiny"]["errors"] == 1  # one attempt: not retried, fell back
    assert report.failures == []


# -- cache -----------------------------------------------------------------------------------------


async def test_a_cached_answer_is_found_whichever_endpoint_or_model_answered(
    tmp_path: Path,
) -> None:
    from stages.llm import HTTP

    async with serve() as a, serve(SimConfig(error_5xx=1.0)) as broken, serve() as c:
        first = Deployment(name="a", base_url=a.url, api_key_env="ROUTE_GOOD", model="m")
        fallback = Deployment(name="fb", base_url=a.url, api_key_env="ROUTE_GOOD", model="fb")
        async with ResponseCache(tmp_path / "cache") as cache:
            caller = _caller(
                [first, fallback],
                model="m",
                http=HTTP(cache=cache),
                routing_options={"fallbacks": ["fb"]},
            )
            await _run(caller, ROWS[:6])
            # the same rows, other endpoints: model 'm' now broken, fallback on another server
            again = _caller(
                [
                    Deployment(name="x", base_url=broken.url, api_key_env="ROUTE_GOOD", model="m"),
                    Deployment(name="y", base_url=c.url, api_key_env="ROUTE_GOOD", model="fb"),
                ],
                model="m",
                http=HTTP(cache=cache),
                routing_options={"fallbacks": ["fb"]},
            )
            out, _ = await _run(again, ROWS[:6])
        sent = broken.counters()["requests"] + c.counters()["requests"]
    assert sent == 0
    assert {r["response_endpoint"] for r in out} == {"cache"}
    assert again.totals.cache_hits == 6


# -- configuration ---------------------------------------------------------------------------------


def test_a_key_value_instead_of_a_variable_name_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        Deployment(model="m", api_key_env="sk-live-123-secret")
    assert "sk-live" not in str(caught.value)


def test_routing_refuses_twin_names_and_a_fallback_nobody_serves() -> None:
    one = Deployment(name="x", model="m")
    with pytest.raises(ConfigError, match="two endpoints are named 'x'"):
        Routing(endpoints=[one, Deployment(name="x", model="n")])
    with pytest.raises(ConfigError, match="fallback model 'z' is served by no endpoint"):
        Routing(endpoints=[one], fallbacks=["z"])
    with pytest.raises(ConfigError, match="no endpoint serves model 'q'"):
        LLMCaller(model="q", provider=Routing(endpoints=[one]))


def test_an_endpoint_table_and_a_route_flag_make_the_same_deployment() -> None:
    table = {"name": "east", "url": "http://h:1/v1", "key-env": "K", "model": "m", "rpm": 300}
    flag = parse_route("name=east,url=http://h:1/v1,key_env=K,model=m,rpm=300")
    assert deployment_from_mapping(table, where="t") == deployment_from_mapping(flag, where="f")
    with pytest.raises(ConfigError, match=r"endpoints\[1\]: unknown key 'rmp' \(did you mean"):
        deployment_from_mapping({"model": "m", "rmp": 3}, where="endpoints[1]")
    assert json.loads(json.dumps(parse_route("model=m,price=0.1/0.4")))["price"] == [0.1, 0.4]


async def test_one_model_on_openai_azure_and_anthropic_endpoints_each_in_its_own_dialect() -> None:
    # three providers' deployments of one model: each endpoint gets its own URL, auth header
    # and body; the rows are answered by all three
    async with serve() as openai, serve() as azure, serve() as anthropic:
        key = "ROUTE_GOOD"
        endpoints = [
            Deployment(name="o", base_url=openai.url, api_key_env=key, model="m"),
            Deployment(
                name="z",
                provider="azure",
                base_url=azure.base_url,
                api_key_env=key,
                model="m-eu",
                serves="m",
            ),
            Deployment(
                name="c", provider="anthropic", base_url=anthropic.url, api_key_env=key, model="m"
            ),
        ]
        caller = _caller(endpoints, model="m", params={"max_tokens": 16})
        out, report = await _run(caller, ROWS[:30])
        routes = [sim.counters()["by_route"] for sim in (openai, azure, anthropic)]
    _answered_once(out, ROWS[:30])
    assert {r["response_endpoint"] for r in out} == {"o", "z", "c"}
    assert list(routes[0]) == ["/v1/chat/completions"]
    assert list(routes[1]) == ["/openai/deployments/{deployment}/chat/completions"]
    assert list(routes[2]) == ["/v1/messages"]
    assert report.failures == []


@pytest.mark.parametrize(("cheap_slots", "spills"), [(8, False), (1, True)])
async def test_cheapest_policy_uses_the_cheap_endpoint_and_spills_only_when_it_is_busy(
    cheap_slots: int, spills: bool
) -> None:
    from stages.llm import Limits

    async with serve(SimConfig(latency_ms=5)) as a, serve(SimConfig(latency_ms=5)) as b:
        cheap = _deployment("cheap", a.url, price=(0.1, 0.1), max_concurrency=cheap_slots)
        dear = _deployment("dear", b.url, price=(5.0, 15.0))
        caller = _caller(
            [dear, cheap], limits=Limits(concurrency=4), routing_options={"policy": "cheapest"}
        )
        out, _ = await _run(caller)
    _answered_once(out)
    used = {r["response_endpoint"] for r in out}
    assert used == ({"cheap", "dear"} if spills else {"cheap"})
    figures = _figures(caller)
    assert figures["cheap"]["cost_usd"] > 0


async def test_streamed_answers_and_embeddings_are_routed_too() -> None:
    from stages import Batcher
    from stages.llm import Output

    async with serve() as a, serve() as b:
        endpoints = [_deployment("a", a.url), _deployment("b", b.url)]
        streamed = _caller(endpoints, output=Output(form="completion", stream=True))
        out, _ = await _run(streamed, ROWS[:12])
        assert sorted(c.text for c in out) == sorted(
            f"echo: Say hello to {r['name']}" for r in ROWS[:12]
        )
        assert {c.endpoint for c in out} == {"a", "b"}
        embed = _caller(endpoints, prompt="{name}", endpoint="embeddings", output="completion")
        texts = [{"name": f"t{i}"} for i in range(40)]
        with anyio.fail_after(30):
            async with Pipeline(texts, Batcher(max_items=4, max_wait=0.01), embed).open() as res:
                vectors = [c async for c in res]
    assert len(vectors) == 40 and all(len(c.embedding) == 8 for c in vectors)
    assert {c.endpoint for c in vectors} == {"a", "b"}


async def test_an_endpoint_without_the_model_or_path_is_out_and_rows_go_elsewhere() -> None:
    async with serve() as a, serve() as b:
        wrong = _deployment("wrong", a.base_url + "/no-such-root")
        caller = _caller([wrong, _deployment("b", b.url)])
        out, report = await _run(caller)
    _answered_once(out)
    figures = _figures(caller)
    assert figures["wrong"]["state"] == "out" and "404" in figures["wrong"]["reason"]
    assert report.failures == []
