"""The service under hostile clients (issue 16), each finding against uvicorn on 127.0.0.1.

The server runs as ``serve`` runs it (:func:`pipeline.server._cli.uvicorn_config`: the header
timeout and the connection cap), on a socket bound to 127.0.0.1:0.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn

from pipeline.server import ServerConfig, create_app
from pipeline.server._cli import uvicorn_config
from pipeline.testing._sim import SimConfig, Simulator, serve

pytestmark = pytest.mark.anyio

SETTINGS = {"model": "sim-1", "prompt": "hi {name}"}
TOKEN = "hostile-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "name": f"n{i}"} for i in range(n)]


@asynccontextmanager
async def hardened(config: ServerConfig) -> AsyncIterator[tuple[str, int]]:
    """Serve the app as ``serve`` does on 127.0.0.1:0; yield its base URL and port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn_config(create_app(config), config, log_level="warning", timeout_graceful_shutdown=2)
    )
    with sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            with anyio.fail_after(10):
                while not server.started:  # noqa: ASYNC110 - readiness: bounded polling
                    await anyio.sleep(0.01)
            try:
                yield f"http://127.0.0.1:{port}", port
            finally:
                server.should_exit = True


def make_config(tmp_path: Path, sim: Simulator, **options: Any) -> ServerConfig:
    options.setdefault("token", TOKEN)
    return ServerConfig(
        data_dir=tmp_path / "data", base_url=sim.url, progress_interval=0.05, **options
    )


@asynccontextmanager
async def service(
    tmp_path: Path, sim_config: SimConfig | None = None, **options: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Simulator, int]]:
    async with (
        serve(sim_config or SimConfig()) as sim,
        hardened(make_config(tmp_path, sim, **options)) as (url, port),
        httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as client,
    ):
        yield client, sim, port


async def end_of(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    """Follow the job's events until ``end``; return the final job."""
    event = None
    with anyio.fail_after(30):
        async with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event == "end":
                    final: dict[str, Any] = json.loads(line.removeprefix("data: "))
                    return final
    raise AssertionError("the event stream ended without an end event")


def ndjson(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- 1 and 8: templates are data ----------------------------------------------------------


async def test_a_huge_format_width_is_refused_at_submission(tmp_path: Path) -> None:
    async with service(tmp_path) as (client, sim, _):
        body = {"rows": rows(4), "settings": {**SETTINGS, "prompt": "{name:>1000000000}"}}
        for path in ("/v1/jobs", "/v1/enrich"):
            r = await client.post(path, json=body)
            assert r.status_code == 422, r.text
            assert "width of 1000000000" in r.json()["detail"]
        assert (await client.get("/v1/jobs")).json()["jobs"] == []
        assert sim.counters()["requests"] == 0


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        ("{name.__class__.__mro__}", "attribute or index access"),
        ("{name.__class__.__base__.__subclasses__}", "attribute or index access"),
        ("{name[0]}", "attribute or index access"),
        ("{0}", "positional field"),
        ("{}", "positional field"),
        ("{name!z}", "uses a conversion"),
        ("{name!r}", "conversion"),
        ("{name:{id}}", "nested field"),
        ("{name:d}", "does not fit {name:d}"),  # against the first row: name is text
        ("hi {nmae}", "did you mean {name}?"),
    ],
)
async def test_template_escapes_are_refused_before_anything_runs(
    tmp_path: Path, prompt: str, reason: str
) -> None:
    async with service(tmp_path) as (client, sim, _):
        body = {"rows": rows(3), "settings": {**SETTINGS, "prompt": prompt}}
        for path in ("/v1/jobs", "/v1/enrich"):
            r = await client.post(path, json=body)
            assert r.status_code == 422, (path, r.text)
            assert reason in r.json()["detail"]
        assert (await client.get("/v1/jobs")).json()["jobs"] == []
        assert sim.counters()["requests"] == 0


# -- 2 and 3: operator limits above job limits ----------------------------------------------


async def test_one_job_s_low_rpm_never_slows_the_others(tmp_path: Path) -> None:
    async with service(tmp_path) as (client, _, _):
        slow = {"rows": rows(1), "settings": {**SETTINGS, "rpm": 0.001}}
        r = await client.post("/v1/enrich", json=slow)
        assert r.status_code == 200 and len(ndjson(r.text)) == 1
        body = {"rows": rows(20), "settings": {**SETTINGS, "rpm": 600, "concurrency": 4}}
        job = (await client.post("/v1/jobs", json=body)).json()
        final = await end_of(client, job["id"])  # at 0.001 rpm this would take ~days
        assert final["status"] == "succeeded" and final["counters"]["ok"] == 20


async def test_requests_above_the_operator_s_ceilings_are_refused(tmp_path: Path) -> None:
    async with service(tmp_path, max_rpm=600, max_tpm=10_000, max_concurrency=8) as (
        client,
        _,
        _,
    ):
        asks = [
            ({"concurrency": 100_000}, "ceiling of 8 requests in flight"),
            ({"max_concurrency": 9}, "ceiling of 8 requests in flight"),
            ({"rpm": 601}, "ceiling of 600 per minute (max_rpm)"),
            ({"tpm": 20_000}, "ceiling of 10000 per minute (max_tpm)"),
            (
                {"endpoints": [{"name": "a", "model": "sim-1", "rpm": 6000}]},
                "rpm 6000 is above this server's ceiling of 600",
            ),
        ]
        for ask, reason in asks:
            body = {"rows": rows(2), "settings": {**SETTINGS, **ask}}
            for path in ("/v1/jobs", "/v1/enrich"):
                r = await client.post(path, json=body)
                assert r.status_code == 422 and reason in r.json()["detail"], (ask, r.text)
        ok = {"rows": rows(2), "settings": {**SETTINGS, "concurrency": 8, "rpm": 300}}
        job = (await client.post("/v1/jobs", json=ok)).json()
        assert (await end_of(client, job["id"]))["status"] == "succeeded"


async def test_jobs_per_token_are_bounded(tmp_path: Path) -> None:
    async with service(tmp_path, SimConfig(latency_ms=200), max_jobs_per_token=2) as (
        client,
        _,
        _,
    ):
        body = {"rows": rows(20), "settings": {**SETTINGS, "concurrency": 1}}
        ids = [(await client.post("/v1/jobs", json=body)).json()["id"] for _ in range(2)]
        third = await client.post("/v1/jobs", json=body)
        assert third.status_code == 429
        assert "limit 2 per token" in third.json()["detail"]
        for job_id in ids:
            await client.delete(f"/v1/jobs/{job_id}")


async def test_counters_journal_and_failed_agree(tmp_path: Path) -> None:
    data = [{"id": i, "name": f"n{i}"} if i % 3 else {"id": i, "nom": "x"} for i in range(1, 31)]
    async with service(tmp_path) as (client, _, _):
        body = {"rows": data, "settings": {**SETTINGS, "concurrency": 4}}
        job = (await client.post("/v1/jobs", json=body)).json()
        final = await end_of(client, job["id"])
        failed = ndjson((await client.get(f"/v1/jobs/{job['id']}/failed")).text)
        results = ndjson((await client.get(f"/v1/jobs/{job['id']}/results")).text)
    counters = final["counters"]
    assert (counters["ok"], counters["failed"]) == (20, 10)
    assert len(results) == 20 and len(failed) == 10
    job_dir = tmp_path / "data" / "jobs" / job["id"]
    journal = (job_dir / "output.jsonl.failed.jsonl").read_text().splitlines()
    assert len(journal) == 10
    assert sorted(f["key"] for f in failed) == [i for i in range(1, 31) if i % 3 == 0]


# -- 4: bounded connections ---------------------------------------------------------------


async def closed_by_server(stream: anyio.abc.SocketStream) -> bool:
    """Read until the server closes the connection (EOF); whether it did within 10 s."""
    with anyio.move_on_after(10):
        try:
            while await stream.receive():
                pass
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
            return True
    return False


async def test_idle_and_half_open_connections_are_closed(tmp_path: Path) -> None:
    async with service(tmp_path, header_timeout=0.3) as (client, _, port):
        idle = await anyio.connect_tcp("127.0.0.1", port)
        half = await anyio.connect_tcp("127.0.0.1", port)
        await half.send(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert await closed_by_server(idle)
        assert await closed_by_server(half)
        await idle.aclose()
        await half.aclose()
        assert (await client.get("/healthz")).status_code == 200


async def test_at_the_cap_a_new_client_replaces_the_longest_idle(tmp_path: Path) -> None:
    async with service(tmp_path, max_connections=10, header_timeout=60) as (_, _, port):
        held = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(10)]
        for attempt in range(3):  # fresh clients get answered although 10 connections idle
            async with httpx.AsyncClient(timeout=10, headers=AUTH) as fresh:
                r = await fresh.get(f"http://127.0.0.1:{port}/healthz")
                assert r.status_code == 200, attempt
        assert await closed_by_server(held[0])  # the oldest idle ones made room
        for stream in held:
            await stream.aclose()


async def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503(tmp_path: Path) -> None:
    async with service(tmp_path, SimConfig(latency_ms=200), max_connections=2) as (
        client,
        _,
        port,
    ):
        body = {"rows": rows(50), "settings": {**SETTINGS, "concurrency": 1}}
        job = (await client.post("/v1/jobs", json=body)).json()
        url = f"http://127.0.0.1:{port}/v1/jobs/{job['id']}/events"
        async with (
            httpx.AsyncClient(timeout=10, headers=AUTH) as a,
            httpx.AsyncClient(timeout=10, headers=AUTH) as b,
            a.stream("GET", url) as first,
            b.stream("GET", url) as second,
        ):
            assert first.status_code == second.status_code == 200
            stream = await anyio.connect_tcp("127.0.0.1", port)
            answer = b""
            with anyio.fail_after(10):
                try:
                    while chunk := await stream.receive():
                        answer += chunk
                except anyio.EndOfStream:
                    pass
            await stream.aclose()
            assert answer.startswith(b"HTTP/1.1 503") and b"too many connections" in answer
            await client.delete(f"/v1/jobs/{job['id']}")


async def test_event_streams_per_token_are_capped(tmp_path: Path) -> None:
    async with service(tmp_path, SimConfig(latency_ms=200), max_streams_per_token=2) as (
        client,
        _,
        _,
    ):
        body = {"rows": rows(50), "settings": {**SETTINGS, "concurrency": 1}}
        job = (await client.post("/v1/jobs", json=body)).json()
        url = f"/v1/jobs/{job['id']}/events"
        async with client.stream("GET", url) as one, client.stream("GET", url) as two:
            assert one.status_code == two.status_code == 200
            third = await client.get(f"/v1/jobs/{job['id']}/results")
            assert third.status_code == 429
            assert "2 streams open (limit 2)" in third.json()["detail"]
        await client.delete(f"/v1/jobs/{job['id']}")
        # the two closed streams gave their places back
        final = await end_of(client, job["id"])
        assert final["status"] == "cancelled"


# -- 5: one deeply nested row is one dead letter ----------------------------------------------

DEEP = "[" * 200_000 + "]" * 200_000


async def test_a_deeply_nested_row_in_an_upload_is_a_dead_letter(tmp_path: Path) -> None:
    upload = f'{{"id": 1, "name": "a"}}\n{DEEP}\n{{"id": 3, "name": "c"}}\n'.encode()
    async with service(tmp_path) as (client, _, _):
        files = {"file": ("rows.jsonl", upload)}
        r = await client.post("/v1/jobs", files=files, data={"settings": json.dumps(SETTINGS)})
        assert r.status_code == 202, r.text
        final = await end_of(client, r.json()["id"])
        failed = ndjson((await client.get(f"/v1/jobs/{r.json()['id']}/failed")).text)
    assert final["status"] == "succeeded"
    assert (final["counters"]["ok"], final["counters"]["failed"]) == (2, 1)
    assert [f["origin"] for f in failed] == ["input.jsonl:2"]
    assert "nested too deeply" in failed[0]["error"]["message"]


async def test_a_deeply_nested_json_body_is_a_422_with_the_reason(tmp_path: Path) -> None:
    body = '{"rows": [{"name": "a", "x": ' + DEEP + '}], "settings": {"model": "sim-1"}}'
    async with service(tmp_path) as (client, _, _):
        for path in ("/v1/jobs", "/v1/enrich"):
            r = await client.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 422, r.text
            assert "nested too deeply" in r.json()["detail"]


# -- 6: no server paths ----------------------------------------------------------------------


async def test_no_response_or_dead_letter_names_a_server_path(tmp_path: Path) -> None:
    data = [{"id": 1, "name": "a"}, {"id": 2, "nom": "b"}]
    async with service(tmp_path) as (client, _, _):
        job = (await client.post("/v1/jobs", json={"rows": data, "settings": SETTINGS})).json()
        await end_of(client, job["id"])
        texts = [
            (await client.get(path)).text
            for path in (
                f"/v1/jobs/{job['id']}",
                "/v1/jobs",
                f"/v1/jobs/{job['id']}/failed",
                f"/v1/jobs/{job['id']}/results",
                f"/v1/jobs/{job['id']}/events",
            )
        ]
    failed = ndjson(texts[2])
    assert [f["origin"] for f in failed] == ["input.jsonl:2"]
    on_disk = (tmp_path / "data" / "jobs" / job["id"] / "output.jsonl.failed.jsonl").read_text()
    for text in [*texts, on_disk]:
        assert str(tmp_path) not in text and f"jobs/{job['id']}/input" not in text


# -- 7: enrich with an unset key variable ------------------------------------------------------


async def test_enrich_with_an_unset_key_variable_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HOSTILE_UNSET_KEY", raising=False)
    async with service(tmp_path, allowed_key_envs=("HOSTILE_UNSET_KEY",)) as (client, sim, _):
        settings = {**SETTINGS, "api_key_env": "HOSTILE_UNSET_KEY"}
        r = await client.post("/v1/enrich", json={"rows": rows(2), "settings": settings})
        assert r.status_code == 422, r.text
        assert "HOSTILE_UNSET_KEY" in r.json()["detail"]
        job = (await client.post("/v1/jobs", json={"rows": rows(2), "settings": settings})).json()
        final = await end_of(client, job["id"])
        assert final["status"] == "failed" and "HOSTILE_UNSET_KEY" in final["error"]
        assert sim.counters()["requests"] == 0


# -- 9: the minor ones -----------------------------------------------------------------------


async def test_a_credential_header_with_a_trailing_space_is_refused(tmp_path: Path) -> None:
    async with service(tmp_path) as (client, _, _):
        for name in ("Authorization ", " x-api-key", "API-KEY\t"):
            settings = {**SETTINGS, "headers": {name: "Bearer stolen"}}
            r = await client.post("/v1/jobs", json={"rows": rows(1), "settings": settings})
            assert r.status_code == 422 and "carries a credential" in r.json()["detail"], name


def test_a_blank_token_is_refused_at_start(tmp_path: Path) -> None:
    for token in (" " * 16, " " + "t" * 20, "t" * 20 + "\n"):
        with pytest.raises(Exception, match="whitespace"):
            ServerConfig(data_dir=tmp_path, token=token)


async def test_an_interrupted_job_counts_its_journaled_rows(tmp_path: Path) -> None:
    async with serve(SimConfig(latency_ms=30)) as sim:
        config = make_config(tmp_path, sim, resume_on_start=False)
        async with (
            hardened(config) as (url, _),
            httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as client,
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
        async with (
            hardened(config) as (url, _),
            httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as client,
        ):
            state = (await client.get(f"/v1/jobs/{job['id']}")).json()
            results = ndjson((await client.get(f"/v1/jobs/{job['id']}/results")).text)
    assert state["status"] == "interrupted"
    assert state["counters"]["rows_done"] == len(results) >= 10
    assert state["counters"]["ok"] == len(results)


# -- issue 17, item 12: every input format the CLI reads ----------------------------------------


def parquet_bytes(data: list[dict[str, Any]]) -> bytes:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(data), out)
    return out.getvalue()


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("rows.csv", b"id,name\n1,ada\n2,bob\n3,cy\n"),
        ("rows.tsv", b"id\tname\n1\tada\n2\tbob\n3\tcy\n"),
        ("rows.csv", b"\xef\xbb\xbfid,name\r\n1,ada\r\n2,bob\r\n3,cy\r\n"),  # BOM, CRLF
        ("rows.parquet", None),
        ("rows.pq", None),  # every extension a job's input may have
    ],
)
async def test_csv_tsv_and_parquet_uploads_run(
    tmp_path: Path, name: str, content: bytes | None
) -> None:
    if content is None:
        named = ((1, "ada"), (2, "bob"), (3, "cy"))
        content = parquet_bytes([{"id": i, "name": n} for i, n in named])
    async with service(tmp_path) as (client, _, _):
        files = {"file": (name, content)}
        settings = {**SETTINGS, "id_field": "id"}
        r = await client.post("/v1/jobs", files=files, data={"settings": json.dumps(settings)})
        assert r.status_code == 202, r.text
        assert r.json()["rows"] == 3
        final = await end_of(client, r.json()["id"])
        results = ndjson((await client.get(f"/v1/jobs/{r.json()['id']}/results")).text)
    assert final["status"] == "succeeded" and final["counters"]["ok"] == 3
    assert sorted(row["name"] for row in results) == ["ada", "bob", "cy"]
    assert all("ada" in row["response"] or row["name"] != "ada" for row in results)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        (
            "rows.xlsx",
            b"id,name\n1,a\n",
            "name it .jsonl, .ndjson, .json, .csv, .tsv, .parquet, .pq",
        ),
        ("rows.csv", b"id,nmae\n1,a\n", "did you mean {nmae}? (available fields: id, nmae)"),
        ("rows.csv", "id,name\n1,Zoë\n".encode("latin-1"), "not UTF-8"),
        ("rows.csv", b"id,id\n1,a\n", "header repeats ['id']"),
        ("rows.csv", b"id,name\n", "has no rows"),
        ("rows.parquet", b"PAR1 not really", "not readable Parquet"),
    ],
)
async def test_a_bad_upload_is_refused_when_it_arrives(
    tmp_path: Path, name: str, content: bytes, reason: str
) -> None:
    async with service(tmp_path) as (client, _, _):
        files = {"file": (name, content)}
        r = await client.post("/v1/jobs", files=files, data={"settings": json.dumps(SETTINGS)})
        assert r.status_code == 422, r.text
        assert reason in r.json()["detail"]
        assert str(tmp_path) not in r.text
        assert (await client.get("/v1/jobs")).json()["jobs"] == []


# -- issue 17, item 14: the server says where it is, and is not its own API -----------------------


def test_serve_refuses_its_own_address_as_the_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.server import main

    argv = ["--port", "8000", "--base-url", "http://localhost:8000/v1", "--data-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "is this server's own address" in capsys.readouterr().err


async def test_serve_prints_its_address_auth_and_data_dir(tmp_path: Path) -> None:
    code = "import sys; from pipeline.server import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "--port", "0", "--data-dir", str(tmp_path / "d")]
    env = {**os.environ, "PIPELINE_SERVER_TOKEN": TOKEN}
    process = await anyio.open_process(argv, env=env)
    try:
        assert process.stderr is not None
        said = b""
        with anyio.fail_after(20):
            while b"descriptors)\n" not in said:
                said += await process.stderr.receive()
    finally:
        process.kill()
        with anyio.CancelScope(shield=True):
            await process.wait()
            await process.aclose()
    line = next(x for x in said.decode().splitlines() if x.startswith("serving on"))
    pattern = r"serving on http://127\.0\.0\.1:\d+ \(auth: token from \$PIPELINE_SERVER_TOKEN;"
    assert re.match(pattern, line)
    assert f"data dir: {tmp_path / 'd'};" in line and TOKEN not in said.decode()


# -- issue 17, item 13: /docs works offline, with the token set ----------------------------------


async def test_docs_load_offline_without_the_token_while_the_api_needs_it(
    tmp_path: Path,
) -> None:
    async with (
        service(tmp_path) as (_, _, port),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as anon,
    ):
        page = await anon.get("/docs")
        assert page.status_code == 200
        assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
        assert assets and all(a.startswith("/docs/assets/") for a in assets), assets
        for asset in assets:  # every asset from this server, none from a CDN
            r = await anon.get(asset)
            assert r.status_code == 200 and len(r.content) > 100, asset
        schema = (await anon.get("/openapi.json")).json()
        assert (await anon.get("/v1/jobs")).status_code == 401
        assert (await anon.get("/docs/assets/index.html")).status_code == 401  # not an asset
    assert "cdn" not in page.text.lower()
    for path, method in (("/v1/jobs", "post"), ("/v1/enrich", "post")):
        content = schema["paths"][path][method]["requestBody"]["content"]
        assert "rows" in content["application/json"]["schema"]["properties"], path
    upload = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert upload["schema"]["properties"]["file"]["format"] == "binary"
    bodies = [
        (path, method)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if method in ("post", "put", "patch") and "requestBody" not in operation
    ]
    assert bodies == [("/v1/jobs/{job_id}/resume", "post")]  # the one route with no body


def test_the_connection_cap_fits_under_the_descriptor_limit() -> None:
    from pipeline.server._cli import reserved_descriptors
    from pipeline.server._connections import BACKLOG, connection_cap

    config = ServerConfig(data_dir=Path("unused"))
    reserved = reserved_descriptors(config)  # the jobs' files and provider connections
    assert connection_cap(1000, 1 << 20, reserved) == 1000
    assert connection_cap(1000, 2048, reserved) == min(1000, 2048 - reserved - BACKLOG)
    assert connection_cap(1000, 1024, reserved) == 1024 - reserved - BACKLOG < 1000
