"""The HTTP service over real sockets: uvicorn in-process and ``main`` as a process (kill -9)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from anyio.abc import Process

from pipeline.server import ServerConfig, create_app, main
from pipeline.testing._sim import SimConfig, Simulator, serve

pytestmark = pytest.mark.anyio

SETTINGS = {"model": "sim-1", "prompt": "hi {name}"}
TOKEN = "uvicorn-test-token-0123456789"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "name": f"n{i}"} for i in range(n)]


@asynccontextmanager
async def uvicorn_server(config: ServerConfig) -> AsyncIterator[str]:
    """Serve the app with uvicorn on a socket bound to 127.0.0.1:0; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config), lifespan="on", log_level="warning", timeout_graceful_shutdown=2
        )
    )
    with sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            with anyio.fail_after(10):
                while not server.started:  # noqa: ASYNC110 - readiness: bounded polling
                    await anyio.sleep(0.01)
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                server.should_exit = True


def config(tmp_path: Path, sim: Simulator, **options: Any) -> ServerConfig:
    return ServerConfig(data_dir=tmp_path, base_url=sim.url, progress_interval=0.05, **options)


async def end_of(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    """Follow the job's Server-Sent Events until ``end``; return the final job."""
    event = None
    with anyio.fail_after(20):
        async with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event == "end":
                    final: dict[str, Any] = json.loads(line.removeprefix("data: "))
                    return final
    raise AssertionError("the event stream ended without an end event")


async def test_results_stream_while_the_job_runs(tmp_path: Path) -> None:
    async with (
        serve(SimConfig(latency_ms=50)) as sim,
        uvicorn_server(config(tmp_path, sim)) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        body = {"rows": rows(40), "settings": {**SETTINGS, "concurrency": 1}}
        job = (await client.post("/v1/jobs", json=body)).json()
        got: list[dict[str, Any]] = []
        statuses: set[str] = set()
        with anyio.fail_after(20):
            async with client.stream("GET", f"/v1/jobs/{job['id']}/results") as r:
                assert r.headers["content-type"] == "application/x-ndjson"
                async for line in r.aiter_lines():
                    got.append(json.loads(line))
                    if len(got) in (1, 5):
                        state = (await client.get(f"/v1/jobs/{job['id']}")).json()
                        statuses.add(state["status"])
                        assert state["counters"]["rows_done"] < 40
        assert statuses == {"running"}  # rows arrived while the job still ran
        assert sorted(row["id"] for row in got) == list(range(40))
        assert (await client.get(f"/v1/jobs/{job['id']}")).json()["status"] == "succeeded"
        late = await client.get(f"/v1/jobs/{job['id']}/results")  # after the end: everything
        assert sorted(json.loads(x)["id"] for x in late.text.splitlines()) == list(range(40))


async def test_progress_events_then_end(tmp_path: Path) -> None:
    async with (
        serve(SimConfig(latency_ms=20)) as sim,
        uvicorn_server(config(tmp_path, sim)) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        body = {"rows": rows(30), "settings": {**SETTINGS, "concurrency": 2}}
        job = (await client.post("/v1/jobs", json=body)).json()
        progress: list[dict[str, Any]] = []
        event = None
        with anyio.fail_after(20):
            async with client.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        event = line.removeprefix("event: ")
                    elif line.startswith("data: ") and event == "progress":
                        progress.append(json.loads(line.removeprefix("data: ")))
                    elif line.startswith("data: ") and event == "end":
                        final = json.loads(line.removeprefix("data: "))
        assert final["status"] == "succeeded" and final["counters"]["ok"] == 30
        running = [p for p in progress if p["status"] == "running"]
        assert running and any(0 < p["counters"]["rows_done"] < 30 for p in running)
        done = [p["counters"]["rows_done"] for p in running]
        assert done == sorted(done)  # counters only grow


async def test_cancel_stops_the_stream_and_keeps_what_finished(tmp_path: Path) -> None:
    async with (
        serve(SimConfig(latency_ms=40)) as sim,
        uvicorn_server(config(tmp_path, sim)) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        body = {"rows": rows(100), "settings": {**SETTINGS, "concurrency": 2}}
        job = (await client.post("/v1/jobs", json=body)).json()
        got = []
        with anyio.fail_after(20):
            async with client.stream("GET", f"/v1/jobs/{job['id']}/results") as r:
                async for line in r.aiter_lines():
                    got.append(json.loads(line))
                    if len(got) == 3:
                        assert (await client.delete(f"/v1/jobs/{job['id']}")).status_code == 202
        final = await end_of(client, job["id"])
        assert final["status"] == "cancelled"
        assert 3 <= len(got) < 100
        assert len({row["id"] for row in got}) == len(got)
        assert sim.counters()["requests"] <= len(got) + 2


async def test_restart_mid_job_then_resume_gives_every_row_once(tmp_path: Path) -> None:
    async with serve(SimConfig(latency_ms=30)) as sim:
        async with (
            uvicorn_server(config(tmp_path, sim)) as url,
            httpx.AsyncClient(base_url=url, timeout=10) as client,
        ):
            body = {"rows": rows(60), "settings": {**SETTINGS, "concurrency": 2}}
            job = (await client.post("/v1/jobs", json=body)).json()
            seen = 0
            with anyio.fail_after(20):
                async with client.stream("GET", f"/v1/jobs/{job['id']}/results") as r:
                    async for _ in r.aiter_lines():
                        seen += 1
                        if seen == 10:
                            break
        # server one is gone; server two on the same data directory (resuming is asked for)
        async with (
            uvicorn_server(config(tmp_path, sim, resume_on_start=False)) as url,
            httpx.AsyncClient(base_url=url, timeout=10) as client,
        ):
            state = (await client.get(f"/v1/jobs/{job['id']}")).json()
            assert state["status"] == "interrupted"
            assert (await client.post(f"/v1/jobs/{job['id']}/resume")).status_code == 202
            ids: list[int] = []
            with anyio.fail_after(20):
                async with client.stream("GET", f"/v1/jobs/{job['id']}/results") as r:
                    async for line in r.aiter_lines():
                        ids.append(json.loads(line)["id"])
            final = (await client.get(f"/v1/jobs/{job['id']}")).json()
            assert final["status"] == "succeeded" and final["runs"] == 2
            assert final["summary"]["resumed_skipped"] >= 10
        assert sorted(ids) == list(range(60))  # every row exactly once across both servers
        assert sim.counters()["requests"] <= 60 + 2  # at most the rows in flight sent twice


async def test_the_bearer_token_over_a_real_socket(tmp_path: Path) -> None:
    async with (
        serve(SimConfig()) as sim,
        uvicorn_server(config(tmp_path, sim, token=TOKEN)) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        assert (await client.get("/v1/jobs")).status_code == 401
        headers = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client.get("/v1/jobs", headers=headers)).status_code == 200


def test_main_refuses_a_public_address_without_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PIPELINE_SERVER_TOKEN", raising=False)
    assert main(["--host", "0.0.0.0", "--data-dir", str(tmp_path)]) == 2
    assert "refusing to listen on 0.0.0.0 without a token" in capsys.readouterr().err
    monkeypatch.setenv("SHORT_TOKEN", "abc")
    assert main(["--token-env", "SHORT_TOKEN", "--data-dir", str(tmp_path)]) == 2
    assert "at least 16 characters" in capsys.readouterr().err


@asynccontextmanager
async def server_process(data_dir: Path, sim: Simulator) -> AsyncIterator[tuple[str, Process]]:
    """``main`` in a child process on a free port (read from uvicorn's startup line)."""
    code = "import sys; from pipeline.server import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "--port", "0", "--data-dir", str(data_dir)]
    argv += ["--base-url", sim.url]
    env = {**os.environ, "PIPELINE_SERVER_TOKEN": TOKEN}
    process = await anyio.open_process(argv, env=env)
    try:
        assert process.stderr is not None
        seen = b""
        with anyio.fail_after(20):
            while (found := re.search(rb"running on (http://127\.0\.0\.1:\d+)", seen)) is None:
                seen += await process.stderr.receive()
        yield found.group(1).decode(), process
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.wait()
            await process.aclose()


async def test_a_killed_server_process_loses_nothing(tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with serve(SimConfig(latency_ms=30)) as sim:
        async with (
            server_process(tmp_path, sim) as (url, process),
            httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client,
        ):
            body = {"rows": rows(60), "settings": {**SETTINGS, "concurrency": 2}}
            job = (await client.post("/v1/jobs", json=body)).json()
            seen = 0
            with anyio.fail_after(20):
                async with client.stream("GET", f"/v1/jobs/{job['id']}/results") as r:
                    async for _ in r.aiter_lines():
                        seen += 1
                        if seen == 10:
                            process.send_signal(signal.SIGKILL)
                            break
        async with (
            server_process(tmp_path, sim) as (url, process),
            httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client,
        ):
            # the job was running when the server died: the new server resumes it by itself
            final = await end_of(client, job["id"])
            assert final["status"] == "succeeded" and final["runs"] == 2
            results = await client.get(f"/v1/jobs/{job['id']}/results")
            ids = sorted(json.loads(line)["id"] for line in results.text.splitlines())
            assert ids == list(range(60))
            process.send_signal(signal.SIGTERM)
            assert process.stderr is not None
            said = b""
            with anyio.fail_after(15):
                await process.wait()
                with contextlib.suppress(anyio.EndOfStream):
                    while True:
                        said += await process.stderr.receive()
            assert b"Application shutdown complete" in said  # SIGTERM stops it cleanly
        assert sim.counters()["requests"] <= 60 + 2


@pytest.mark.skipif(
    not (shutil.which("curl") and shutil.which("jq")), reason="the example needs curl and jq"
)
def test_the_service_example_runs() -> None:
    script = Path(__file__).resolve().parent.parent / "examples" / "service.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "without the token: HTTP 401" in out
    assert '{"status":"succeeded","counters":{"ok":20,"failed":0,"requests":20' in out
    assert '{"status":"succeeded","rows":20,"ok":20}' in out
    assert '"error":{"type":"MissingFieldError"' in out
    assert '{"status":"cancelled"' in out
    assert '"status":"succeeded","runs":2' in out
    assert "rows: 60 unique of 60" in out
