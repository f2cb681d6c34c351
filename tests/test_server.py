"""The HTTP service through the ASGI test client: jobs, validation, limits, auth, cancel, resume."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from pipeline.server import ServerConfig, create_app
from pipeline.testing._sim import SimConfig, Simulator, serve

pytestmark = pytest.mark.anyio

SETTINGS = {"model": "sim-1", "prompt": "hi {name}"}
TOKEN = "t0ken-for-tests-0123456789"
KEY = "sk-provider-key-never-shown-42"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the simulator and uvicorn are asyncio


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "name": f"n{i}"} for i in range(n)]


@asynccontextmanager
async def running(
    data_dir: Path, sim: Simulator, **options: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and a client talking to it in-process."""
    config = ServerConfig(data_dir=data_dir, base_url=sim.url, progress_interval=0.05, **options)
    app = create_app(config)
    headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=headers, timeout=10
        ) as client:
            yield client


async def wait_end(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    """Read the job's event stream to its end (the ASGI client returns it whole)."""
    with anyio.fail_after(15):
        r = await client.get(f"/v1/jobs/{job_id}/events")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [block for block in r.text.split("\n\n") if block.startswith("event: ")]
    kind, data = events[-1].split("\n", 1)
    assert kind == "event: end"
    final: dict[str, Any] = json.loads(data.removeprefix("data: "))
    return final


def ndjson(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with serve(SimConfig()) as server:
        yield server


async def test_a_job_is_accepted_at_once_then_runs_to_the_end(tmp_path: Path, sim: Any) -> None:
    async with running(tmp_path, sim) as client:
        r = await client.post("/v1/jobs", json={"rows": rows(25), "settings": SETTINGS})
        assert r.status_code == 202
        job = r.json()
        assert job["status"] in ("queued", "running") and job["rows"] == 25
        final = await wait_end(client, job["id"])
        assert final["status"] == "succeeded"
        counters = (await client.get(f"/v1/jobs/{job['id']}")).json()["counters"]
        assert counters["ok"] == 25 and counters["failed"] == 0 and counters["requests"] == 25
        assert counters["prompt_tokens"] > 0 and counters["rows_per_s"] > 0
        results = ndjson((await client.get(f"/v1/jobs/{job['id']}/results")).text)
        assert sorted(r["id"] for r in results) == list(range(25))
        assert all(r["response"] == f"echo: hi {r['name']}" for r in results)
        assert ndjson((await client.get(f"/v1/jobs/{job['id']}/failed")).text) == []
        listed = (await client.get("/v1/jobs")).json()["jobs"]
        assert [j["id"] for j in listed] == [job["id"]]


async def test_a_jsonl_upload_is_a_job_too(tmp_path: Path, sim: Any) -> None:
    upload = b"".join(json.dumps(r).encode() + b"\n" for r in rows(5))
    async with running(tmp_path, sim) as client:
        r = await client.post(
            "/v1/jobs",
            files={"file": ("rows.jsonl", upload, "application/jsonl")},
            data={"settings": json.dumps(SETTINGS)},
        )
        assert r.status_code == 202, r.text
        assert (await wait_end(client, r.json()["id"]))["status"] == "succeeded"
        results = ndjson((await client.get(f"/v1/jobs/{r.json()['id']}/results")).text)
        assert sorted(x["name"] for x in results) == [f"n{i}" for i in range(5)]


async def test_failed_rows_are_served_as_dead_letter_records(tmp_path: Path, sim: Any) -> None:
    async with running(tmp_path, sim) as client:
        body = {"rows": [{"name": "a"}, {"nom": "b"}, "not an object"], "settings": SETTINGS}
        job = (await client.post("/v1/jobs", json=body)).json()
        final = await wait_end(client, job["id"])
        assert final["status"] == "succeeded" and final["summary"]["failed"] == 2
        failed = ndjson((await client.get(f"/v1/jobs/{job['id']}/failed")).text)
        assert len(failed) == 2
        assert any("missing field 'name'" in f["error"]["message"] for f in failed)
        assert len(ndjson((await client.get(f"/v1/jobs/{job['id']}/results")).text)) == 1


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({**SETTINGS, "output": "/etc/passwd"}, "names a file path"),
        ({**SETTINGS, "input": "../../secret.jsonl"}, "names a file path"),
        ({**SETTINGS, "cache": "/tmp/x"}, "names a file path"),
        ({**SETTINGS, "limiter": "redis://10.0.0.1:6379/0"}, "decided by the server"),
        ({**SETTINGS, "resume": True}, "decided by the server"),
        ({**SETTINGS, "api-key-env": "HOME"}, "api_key_env 'HOME' is not allowed"),
        ({**SETTINGS, "base_url": "http://evil.example/v1"}, "base_url is not allowed"),
        ({**SETTINGS, "headers": {"Authorization": "Bearer x"}}, "carries a credential"),
        ({"prompt": "hi {name}"}, "'model' is required"),
        ({**SETTINGS, "max_retries": -1}, "max_retries"),
        ({**SETTINGS, "temperature": 0}, "unknown setting 'temperature'"),
    ],
)
async def test_settings_that_reach_beyond_the_job_are_refused(
    tmp_path: Path, sim: Any, settings: dict[str, Any], says: str
) -> None:
    async with running(tmp_path, sim) as client:
        r = await client.post("/v1/jobs", json={"rows": rows(1), "settings": settings})
        assert r.status_code == 422
        assert says in r.json()["detail"]
    assert not list((tmp_path / "jobs").iterdir())  # nothing was stored


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"rows": [], "settings": {}}', "empty"),
        (b'{"rows": {"a": 1}, "settings": {}}', "JSON list"),
        (b'{"rows": [1], "settings": {}, "extra": 1}', "unknown field(s) 'extra'"),
    ],
)
async def test_malformed_bodies_are_422(tmp_path: Path, sim: Any, body: bytes, says: str) -> None:
    async with running(tmp_path, sim) as client:
        r = await client.post(
            "/v1/jobs", content=body, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 422 and says in r.json()["detail"]


async def test_upload_size_and_row_limits(tmp_path: Path, sim: Any) -> None:
    async with running(tmp_path, sim, max_upload_bytes=2000, max_rows=10) as client:
        big = {"rows": [{"name": "x" * 100} for _ in range(30)], "settings": SETTINGS}
        r = await client.post("/v1/jobs", json=big)
        assert r.status_code == 413 and "limit" in r.json()["detail"]

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            yield b'{"rows": ['
            for _ in range(50):
                yield b'{"name": "' + b"y" * 100 + b'"},'
            yield b'{"name": "z"}], "settings": {"model": "sim-1"}}'

        r = await client.post(
            "/v1/jobs", content=chunked(), headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 413
        r = await client.post("/v1/jobs", json={"rows": rows(11), "settings": SETTINGS})
        assert r.status_code == 422 and "limit of 10" in r.json()["detail"]
        upload = b"".join(json.dumps(r).encode() + b"\n" for r in rows(11))
        r = await client.post(
            "/v1/jobs",
            files={"file": ("rows.jsonl", upload)},
            data={"settings": json.dumps(SETTINGS)},
        )
        assert r.status_code == 422 and "limit of 10" in r.json()["detail"]
        ok = await client.post("/v1/jobs", json={"rows": rows(10), "settings": SETTINGS})
        assert ok.status_code == 202
        await wait_end(client, ok.json()["id"])


async def test_every_route_needs_the_token_when_one_is_set(tmp_path: Path, sim: Any) -> None:
    async with running(tmp_path, sim, token=TOKEN) as client:
        job = (await client.post("/v1/jobs", json={"rows": rows(2), "settings": SETTINGS})).json()
        await wait_end(client, job["id"])
        base = str(client.base_url)
        async with httpx.AsyncClient(transport=client._transport, base_url=base) as anonymous:
            for method, path in [
                ("GET", "/healthz"),
                ("GET", "/v1/jobs"),
                ("GET", f"/v1/jobs/{job['id']}"),
                ("GET", f"/v1/jobs/{job['id']}/results"),
                ("DELETE", f"/v1/jobs/{job['id']}"),
                ("POST", "/v1/jobs"),
                ("POST", "/v1/enrich"),
            ]:
                r = await anonymous.request(method, path)
                assert r.status_code == 401, path
                assert r.headers["www-authenticate"] == "Bearer"
                wrong = {"Authorization": "Bearer " + TOKEN[:-1] + "X"}
                assert (await anonymous.request(method, path, headers=wrong)).status_code == 401
            for path in ("/docs", "/openapi.json", "/docs/assets/swagger-ui-bundle.js"):
                assert (await anonymous.get(path)).status_code == 200, path  # no data in them
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 200


async def test_openapi_schema_describes_the_routes(tmp_path: Path, sim: Any) -> None:
    async with running(tmp_path, sim) as client:
        schema = (await client.get("/openapi.json")).json()
        paths = schema["paths"]
        assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/results", "/v1/enrich"} <= set(
            paths
        )
        assert "delete" in paths["/v1/jobs/{job_id}"]
        assert "HTTPBearer" in schema["components"]["securitySchemes"]
        assert (await client.get("/docs")).status_code == 200


async def test_unknown_ids_and_finished_jobs(tmp_path: Path, sim: Any) -> None:
    async with running(tmp_path, sim) as client:
        assert (await client.get("/v1/jobs/" + "0" * 32)).status_code == 404
        assert (await client.get("/v1/jobs/..%2F..%2Fetc")).status_code == 404
        job = (await client.post("/v1/jobs", json={"rows": rows(1), "settings": SETTINGS})).json()
        await wait_end(client, job["id"])
        r = await client.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 409 and "already ended" in r.json()["detail"]
        assert (await client.post(f"/v1/jobs/{job['id']}/resume")).status_code == 409


async def test_cancel_keeps_finished_rows_and_resume_finishes_exactly_once(
    tmp_path: Path,
) -> None:
    async with serve(SimConfig(latency_ms=40)) as sim, running(tmp_path, sim) as client:
        settings = {**SETTINGS, "concurrency": 2}
        body = {"rows": rows(40), "settings": settings}
        job = (await client.post("/v1/jobs", json=body)).json()
        with anyio.fail_after(10):  # wait (on events) until a few rows are done
            while True:
                state = (await client.get(f"/v1/jobs/{job['id']}")).json()
                if state["counters"]["ok"] >= 4:
                    break
                manager = client._transport.app.state.jobs  # type: ignore[attr-defined]
                await manager.jobs[job["id"]].changed.wait()
        r = await client.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 202
        final = await wait_end(client, job["id"])
        assert final["status"] == "cancelled" and final["stopped"] == "cancelled by a client"
        done_first = ndjson((await client.get(f"/v1/jobs/{job['id']}/results")).text)
        assert 4 <= len(done_first) < 40
        requests_first = sim.counters()["requests"]
        assert requests_first <= len(done_first) + 2  # at most the rows in flight are lost

        assert (await client.post(f"/v1/jobs/{job['id']}/resume")).status_code == 202
        final = await wait_end(client, job["id"])
        assert final["status"] == "succeeded" and final["runs"] == 2
        assert final["summary"]["resumed_skipped"] == len(done_first)
        results = ndjson((await client.get(f"/v1/jobs/{job['id']}/results")).text)
        assert sorted(r["id"] for r in results) == list(range(40))  # each row exactly once
        assert sim.counters()["requests"] <= 40 + 2


async def test_jobs_beyond_the_limit_wait_and_the_queue_is_bounded(tmp_path: Path) -> None:
    async with serve(SimConfig(latency_ms=30)) as sim:  # noqa: SIM117 - the client needs sim.url
        async with running(tmp_path, sim, max_jobs=1, max_queued=1) as client:
            slow = {"rows": rows(200), "settings": {**SETTINGS, "concurrency": 1}}
            first = (await client.post("/v1/jobs", json=slow)).json()
            second = await client.post("/v1/jobs", json={"rows": rows(2), "settings": SETTINGS})
            assert second.status_code == 202
            third = await client.post("/v1/jobs", json={"rows": rows(2), "settings": SETTINGS})
            assert third.status_code == 429 and "waiting" in third.json()["detail"]
            state = (await client.get(f"/v1/jobs/{second.json()['id']}")).json()
            assert state["status"] == "queued"
            await client.delete(f"/v1/jobs/{first['id']}")
            assert (await wait_end(client, first["id"]))["status"] == "cancelled"
            assert (await wait_end(client, second.json()["id"]))["status"] == "succeeded"


async def test_cancelling_a_queued_job(tmp_path: Path) -> None:
    async with serve(SimConfig(latency_ms=30)) as sim:  # noqa: SIM117 - the client needs sim.url
        async with running(tmp_path, sim, max_jobs=1) as client:
            slow = {"rows": rows(200), "settings": {**SETTINGS, "concurrency": 1}}
            first = (await client.post("/v1/jobs", json=slow)).json()
            queued = (await client.post("/v1/jobs", json=slow)).json()
            assert (await client.delete(f"/v1/jobs/{queued['id']}")).status_code == 202
            final = await wait_end(client, queued["id"])
            assert final["status"] == "cancelled" and final["runs"] == 0
            await client.delete(f"/v1/jobs/{first['id']}")
            await wait_end(client, first["id"])
    assert sim.counters()["requests"] < 200


async def test_enrich_streams_answers_and_errors(tmp_path: Path, sim: Any) -> None:
    async with running(tmp_path, sim, max_enrich_rows=3) as client:
        body = {"rows": [{"name": "a"}, {"x": 1}, {"name": "c"}], "settings": SETTINGS}
        r = await client.post("/v1/enrich", json=body)
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        lines = sorted(ndjson(r.text), key=lambda x: x["index"])
        assert lines[0] == {"index": 0, "row": {"name": "a", "response": "echo: hi a"}}
        assert lines[1]["error"]["type"] == "MissingFieldError"
        assert lines[2]["row"]["response"] == "echo: hi c"
        too_many = {"rows": rows(4), "settings": SETTINGS}
        r = await client.post("/v1/enrich", json=too_many)
        assert r.status_code == 422 and "POST /v1/jobs" in r.json()["detail"]
        r = await client.post("/v1/enrich", json={"rows": rows(1), "settings": {"model": ""}})
        assert r.status_code == 422


async def test_an_unreachable_api_is_a_502_for_enrich(tmp_path: Path, sim: Any) -> None:
    async with running(tmp_path, sim, allowed_base_urls=("http://127.0.0.1:9/v1",)) as client:
        settings = {**SETTINGS, "base_url": "http://127.0.0.1:9/v1"}
        r = await client.post("/v1/enrich", json={"rows": rows(1), "settings": settings})
        assert r.status_code == 502 and "cannot reach" in r.json()["detail"]


async def test_the_provider_key_never_appears_in_responses_or_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    async with serve(SimConfig(require_key="another-key")) as sim:  # noqa: SIM117 - the client needs sim.url
        async with running(tmp_path, sim) as client:
            job = (
                await client.post("/v1/jobs", json={"rows": rows(3), "settings": SETTINGS})
            ).json()
            final = await wait_end(client, job["id"])
            assert final["status"] == "failed" and "rejected the API key" in final["error"]
            for path in ("", "/results", "/failed", "/events"):
                seen.append((await client.get(f"/v1/jobs/{job['id']}{path}")).text)
            r = await client.post("/v1/enrich", json={"rows": rows(2), "settings": SETTINGS})
            seen.append(r.text)
            assert "AuthenticationError" in r.text
    seen += [record.getMessage() for record in caplog.records]
    seen.append((tmp_path / "jobs" / job["id"] / "job.json").read_text())
    assert not [text for text in seen if KEY in text]


async def test_a_server_stopped_mid_job_marks_it_interrupted_and_a_new_one_resumes_it(
    tmp_path: Path,
) -> None:
    async with serve(SimConfig(latency_ms=30)) as sim:
        async with running(tmp_path, sim) as client:
            body = {"rows": rows(30), "settings": {**SETTINGS, "concurrency": 2}}
            job = (await client.post("/v1/jobs", json=body)).json()
            manager = client._transport.app.state.jobs  # type: ignore[attr-defined]
            with anyio.fail_after(10):
                while (manager.jobs[job["id"]].progress or None) is None or (
                    manager.jobs[job["id"]].progress.ok < 3
                ):
                    await manager.jobs[job["id"]].changed.wait()
        # the lifespan ended with the job running: it recorded itself as interrupted
        record = json.loads((tmp_path / "jobs" / job["id"] / "job.json").read_text())
        assert record["status"] == "interrupted"
        assert record["resume_on_start"] is True
        async with running(tmp_path, sim, resume_on_start=False) as client:
            state = (await client.get(f"/v1/jobs/{job['id']}")).json()
            assert state["status"] == "interrupted"
            assert (await client.post(f"/v1/jobs/{job['id']}/resume")).status_code == 202
            final = await wait_end(client, job["id"])
            assert final["status"] == "succeeded"
            results = ndjson((await client.get(f"/v1/jobs/{job['id']}/results")).text)
            assert sorted(r["id"] for r in results) == list(range(30))
            assert sim.counters()["requests"] <= 30 + 2


async def test_a_crash_leaves_running_jobs_that_come_back_interrupted(
    tmp_path: Path, sim: Any
) -> None:
    async with running(tmp_path, sim) as client:
        job = (await client.post("/v1/jobs", json={"rows": rows(3), "settings": SETTINGS})).json()
        await wait_end(client, job["id"])
    path = tmp_path / "jobs" / job["id"] / "job.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "status": "running"}))  # as a SIGKILL leaves it
    async with running(tmp_path, sim) as client:
        state = (await client.get(f"/v1/jobs/{job['id']}")).json()
        assert state["status"] == "interrupted"
        assert "server stopped" in state["stopped"]


async def test_jobs_on_one_api_key_share_its_rate_limit(tmp_path: Path) -> None:
    # the provider allows 600 requests/minute (10/s); the operator set the key's rate to that
    async with (
        serve(SimConfig(rpm=600)) as quota_sim,
        running(tmp_path, quota_sim, max_rpm=600) as client,
    ):
        settings = {**SETTINGS, "rpm": 600}  # a job may name the ceiling for itself
        ids = []
        for _ in range(2):
            r = await client.post("/v1/jobs", json={"rows": rows(15), "settings": settings})
            assert r.status_code == 202
            ids.append(r.json()["id"])
        finals = [await wait_end(client, job_id) for job_id in ids]
        assert [f["status"] for f in finals] == ["succeeded", "succeeded"]
        counters = quota_sim.counters()
        # two separate limiters would send 20/s together and meet 429s; one shared limiter
        # keeps both jobs inside the key's quota
        assert counters["http_429"] == 0
        assert counters["requests"] == 30
