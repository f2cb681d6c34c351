"""Routing in jobs: the job file's ``[[endpoints]]``, CLI ``--route`` flags, the service, resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from redis_server import RedisServer, redis_server_binary
from sim_thread import ThreadSim

from pipeline import Pipeline
from pipeline._errors import ConfigError
from pipeline.cli._main import main
from pipeline.jobs import JobProgress, JobSettings, run_job
from pipeline.server import ServerConfig, create_app
from pipeline.testing._sim import SimConfig, serve

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY_EAST", "sk-east-1111")
    monkeypatch.setenv("KEY_WEST", "sk-west-2222")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-default-3333")


def _rows(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": i, "name": f"n{i}"}) + "\n" for i in range(n)))
    return path


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_a_job_file_with_endpoints_fails_over_falls_back_and_reports_each(
    tmp_path: Path,
) -> None:
    rejecting = SimConfig(require_key="not-this-key")
    async with serve(rejecting) as east, serve(SimConfig(error_5xx=1.0)) as west, serve() as small:
        job = tmp_path / "job.toml"
        job.write_text(
            f"""
input = "in.jsonl"
output = "out.jsonl"
prompt = "hi {{name}}"
model = "big"
fallbacks = ["small"]
max_retries = 1

[[endpoints]]
name = "east"
base_url = "{east.url}"
api_key_env = "KEY_EAST"
model = "big"
rpm = 6000

[[endpoints]]
name = "west"
base_url = "{west.url}"
api_key_env = "KEY_WEST"
model = "big"

[[endpoints]]
name = "small"
base_url = "{small.url}"
api_key_env = "KEY_WEST"
model = "small"
price = [0.1, 0.4]
"""
        )
        _rows(tmp_path / "in.jsonl", 30)
        settings = JobSettings.from_toml(job)
        snapshots: list[JobProgress] = []
        summary = await run_job(settings, on_progress=snapshots.append, progress_interval=0.01)
    out = _read(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in out) == list(range(30))
    assert {(r["response_endpoint"], r["response_model"]) for r in out} == {("small", "small")}
    assert summary.endpoints is not None
    figures = {e["name"]: e for e in summary.endpoints}
    assert figures["east"]["state"] == "out" and "401" in figures["east"]["reason"]
    assert figures["west"]["errors"] >= 1 and figures["west"]["answered"] == 0
    assert figures["small"]["answered"] == 30 and figures["small"]["cost_usd"] > 0  # its price
    assert summary.cost_usd == pytest.approx(figures["small"]["cost_usd"])
    assert snapshots[-1].endpoints is not None  # the dashboard's data
    assert {e["name"] for e in snapshots[-1].endpoints} == {"east", "west", "small"}
    assert "KEY_EAST" in json.dumps(settings.to_dict()) and "sk-east" not in json.dumps(
        summary.to_dict()
    )


def test_endpoint_settings_are_checked_and_named(tmp_path: Path) -> None:
    table = {"name": "a", "model": "m", "base_url": "http://127.0.0.1:9/v1"}
    with pytest.raises(ConfigError, match="'rpm' applies to a single endpoint"):
        JobSettings(endpoints=[table], rpm=100)
    with pytest.raises(ConfigError, match="fallbacks name models of"):
        JobSettings(model="m", fallbacks=["n"])
    with pytest.raises(ConfigError, match=r"endpoints\[1\]: needs a model"):
        JobSettings(endpoints=[table, {"name": "b"}])
    with pytest.raises(ConfigError, match="fallback model 'z' is served by no endpoint"):
        JobSettings(endpoints=[table], fallbacks=["z"])
    settings = JobSettings(endpoints=[table])
    assert settings.model == "m"  # the first endpoint's model


async def test_resume_with_other_endpoints_answers_each_row_exactly_once(tmp_path: Path) -> None:
    _rows(tmp_path / "in.jsonl", 60)
    base = {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / "out.jsonl")}
    async with serve(SimConfig(latency_ms=5)) as first, serve() as second:
        stop = anyio.Event()

        def watch(progress: JobProgress) -> None:
            if progress.ok >= 10:
                stop.set()

        settings = JobSettings(
            **base,
            prompt="hi {name}",
            max_concurrency=2,
            endpoints=[{"name": "one", "base_url": first.url, "model": "m", "key_env": "KEY_EAST"}],
        )
        summary = await run_job(
            settings, on_progress=watch, stop_event=stop, progress_interval=0.01
        )
        assert not summary.complete
        again = settings.replace(
            resume=True,
            endpoints=[
                {"name": "two", "base_url": second.url, "model": "m", "key_env": "KEY_WEST"}
            ],
        )
        summary = await run_job(again)
    assert summary.complete
    out = _read(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in out) == list(range(60))
    by = {r["response_endpoint"] for r in out}
    assert by == {"one", "two"}


def test_route_flags_run_a_job_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _rows(tmp_path / "in.jsonl", 12)
    with ThreadSim() as east, ThreadSim(SimConfig(require_key="nobody-has-this")) as west:
        status = main(
            [
                "run",
                str(tmp_path / "in.jsonl"),
                "-o",
                str(tmp_path / "out.jsonl"),
                "--prompt",
                "hi {name}",
                "--route",
                f"name=east,url={east.url},key-env=KEY_EAST,model=m",
                "--route",
                f"name=west,url={west.url},key-env=KEY_WEST,model=m",
            ]
        )
    assert status == 0
    out = _read(tmp_path / "out.jsonl")
    assert {r["response_endpoint"] for r in out} == {"east"} and len(out) == 12
    shown = capsys.readouterr()
    assert "endpoint east" in shown.out + shown.err
    assert "endpoint west" in shown.out + shown.err and "out" in shown.out + shown.err
    assert "sk-west" not in shown.out + shown.err


async def test_the_service_takes_endpoints_and_refuses_a_key_it_does_not_allow(
    tmp_path: Path,
) -> None:
    async with serve() as sim:
        config = ServerConfig(
            data_dir=tmp_path,
            base_url=sim.url,
            progress_interval=0.05,
            allowed_key_envs=("KEY_EAST", "KEY_WEST"),
        )
        app = create_app(config)
        rows = [{"id": i, "name": f"n{i}"} for i in range(8)]
        endpoints = [
            {"name": "a", "model": "sim-1", "api_key_env": "KEY_EAST"},
            {"name": "b", "model": "sim-1", "api_key_env": "KEY_WEST"},
        ]
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                bad = {"prompt": "hi {name}", "endpoints": [{"model": "m", "key_env": "HOME"}]}
                r = await client.post("/v1/jobs", json={"rows": rows, "settings": bad})
                assert r.status_code == 422
                assert "endpoints[0]: api_key_env 'HOME' is not allowed" in r.json()["detail"]
                settings = {"prompt": "hi {name}", "endpoints": endpoints}
                r = await client.post("/v1/jobs", json={"rows": rows, "settings": settings})
                assert r.status_code == 202, r.text
                job_id = r.json()["id"]
                with anyio.fail_after(20):  # the event stream ends with the job
                    await client.get(f"/v1/jobs/{job_id}/events")
                job = (await client.get(f"/v1/jobs/{job_id}")).json()
                results = (await client.get(f"/v1/jobs/{job_id}/results")).text
    assert job["status"] == "succeeded"
    answered = [json.loads(line) for line in results.splitlines() if line.strip()]
    assert sorted(r["id"] for r in answered) == list(range(8))
    figures = {e["name"]: e for e in job["counters"]["endpoints"]}
    assert figures["a"]["answered"] + figures["b"]["answered"] == 8


@pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed")
async def test_each_endpoint_shares_its_own_quota_through_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # two callers built from one job's settings stand for two processes of the job: each
    # endpoint's limiter lives in Redis under that endpoint's key, so together they stay
    # within each endpoint's quota (alone, each would send the whole quota: 429s)
    from pipeline.jobs import build_caller, release_caller
    from stages.llm import RedisRateLimiter

    monkeypatch.chdir(tmp_path)
    quota = SimConfig(rpm=1200, burst_s=0.5, latency_ms=5)
    with RedisServer() as redis:
        async with serve(quota) as east, serve(quota) as west:
            settings = JobSettings(
                prompt="row {i} of {w}",
                limiter=redis.url,
                burst=0.1,
                endpoints=[
                    {"name": "e", "base_url": east.url, "model": "m", "key_env": "KEY_EAST",
                     "rpm": 1200},
                    {"name": "w", "base_url": west.url, "model": "m", "key_env": "KEY_WEST",
                     "rpm": 1200},
                ],
            )  # fmt: skip
            callers = [build_caller(settings), build_caller(settings)]
            limiters = [[d.limiter for d in c.routing.endpoints] for c in callers if c.routing]
            assert all(isinstance(x, RedisRateLimiter) for pair in limiters for x in pair)
            keys = [[x.key for x in pair] for pair in limiters]  # type: ignore[union-attr]
            assert keys[0] == keys[1] and keys[0][0] != keys[0][1]
            answered: list[Any] = []

            async def one(caller: Any, w: int) -> None:
                rows = [{"i": i, "w": w} for i in range(60)]
                async with Pipeline(caller).open(rows) as results:
                    answered.extend([row async for row in results])

            try:
                with anyio.fail_after(30):
                    async with anyio.create_task_group() as tg:
                        for w, caller in enumerate(callers):
                            tg.start_soon(one, caller, w)
            finally:
                for caller in callers:
                    await release_caller(caller)
            counters = [east.counters(), west.counters()]
    assert len(answered) == 120
    assert [c["http_429"] for c in counters] == [0, 0]
    assert min(c["requests"] for c in counters) >= 20  # both endpoints carried the job


def test_the_service_shares_each_endpoints_limiter_between_jobs(tmp_path: Path) -> None:
    from pipeline.jobs import build_caller
    from pipeline.server._manager import JobManager

    manager = JobManager(ServerConfig(data_dir=tmp_path, allowed_key_envs=("KEY_EAST",)))
    url = "http://127.0.0.1:9/v1"
    routed = JobSettings(
        endpoints=[
            {"name": "a", "base_url": url, "model": "m", "api_key_env": "KEY_EAST"},
            {"name": "b", "base_url": url, "model": "n", "api_key_env": "KEY_EAST", "rpm": 60},
        ]
    )
    first = manager.endpoint_limiters(routed)
    second = manager.endpoint_limiters(routed)
    assert first is not None and second is not None
    assert first[0] is second[0] and first[0] is not first[1]
    single = JobSettings(model="m", base_url=url, api_key_env="KEY_EAST")
    assert manager.limiter_for(single) is first[0]  # one endpoint's quota, whoever sends
    behind = getattr(first[1], "shared", None)  # 'b' sets its own rpm: a private limiter...
    assert behind is not None and behind is getattr(second[1], "shared", None)  # ...in front
    caller = build_caller(routed, endpoint_limiters=first)
    assert caller.routing is not None
    assert [d.limiter for d in caller.routing.endpoints] == first
