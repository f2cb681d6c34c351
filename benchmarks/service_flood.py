"""Flood a running job service with idle, half-open and event-stream connections.

Starts the simulator and ``python -m pipeline serve`` (with a bearer token and a descriptor
limit of ``--nofile``) as their own processes on 127.0.0.1, submits a job, and while it runs
opens, all bounded in count and time:

- ``--idle`` TCP connections that never send a byte (no token needed),
- ``--half-open`` connections that send part of a request's headers and stop,
- ``--streams`` authenticated ``/events`` streams held open.

Meanwhile it probes ``/healthz`` on fresh connections, and at the end reports the server's
descriptors in use against its limit, the health probes' latency and failures, and whether
the job's results hold every row exactly once::

    python -m benchmarks.service_flood --rows 2000 --idle 3000 --half-open 1000 --streams 500
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def descriptors(pid: int) -> tuple[int, int]:
    """Return (descriptors open, soft limit) of process ``pid``."""
    used = len(os.listdir(f"/proc/{pid}/fd"))
    limit = -1
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            limit = int(line.split()[3])
    return used, limit


def wait_ready(url: str, headers: dict[str, str], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the process exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, headers=headers, timeout=1).status_code == 200:
                return
        time.sleep(0.1)  # readiness polling of a process we started, bounded by the deadline
    raise SystemExit(f"{url} did not answer within 30 s")


def limit_nofile(n: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, resource.getrlimit(7)[1])))


async def hold_idle(n: int, port: int, held: list[asyncio.StreamWriter]) -> int:
    opened = 0
    for _ in range(n):
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 2)
        except (OSError, asyncio.TimeoutError):
            continue
        held.append(writer)
        opened += 1
    return opened


async def hold_half_open(n: int, port: int, held: list[asyncio.StreamWriter]) -> int:
    opened = 0
    for _ in range(n):
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 2)
        except (OSError, asyncio.TimeoutError):
            continue
        writer.write(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        with contextlib.suppress(OSError):
            await writer.drain()
        held.append(writer)
        opened += 1
    return opened


async def hold_streams(
    n: int, port: int, job: str, token: str, tasks: list[Any], statuses: list[bytes]
) -> int:
    async def one() -> None:
        request = (
            f"GET /v1/jobs/{job}/events HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            return
        try:
            writer.write(request)
            await writer.drain()
            status = (await reader.readline()).split(b" ")
            statuses.append(status[1] if len(status) > 1 else b"closed")
            while await reader.read(65536):  # keep reading so the server never blocks on us
                pass
        except OSError:
            pass
        finally:
            writer.close()

    for _ in range(n):
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.sleep(0)
    return n


async def probe_health(
    port: int, token: str, until: asyncio.Event, out: list[float | None]
) -> None:
    while not until.is_set():
        start = time.perf_counter()
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.get(
                    f"http://{HOST}:{port}/healthz", headers={"Authorization": f"Bearer {token}"}
                )
            out.append(time.perf_counter() - start if response.status_code == 200 else None)
        except httpx.HTTPError:
            out.append(None)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(until.wait(), 0.25)


async def flood(args: argparse.Namespace, port: int, token: str, job: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    held: list[asyncio.StreamWriter] = []
    tasks: list[Any] = []
    done = asyncio.Event()
    health: list[float | None] = []
    prober = asyncio.ensure_future(probe_health(port, token, done, health))
    idle = await hold_idle(args.idle, port, held)
    half = await hold_half_open(args.half_open, port, held)
    statuses: list[bytes] = []
    await hold_streams(args.streams, port, job, token, tasks, statuses)
    peak = (0, 0)
    status: dict[str, Any] = {}
    deadline = time.monotonic() + args.timeout
    async with httpx.AsyncClient(timeout=10, headers=headers) as client:
        while time.monotonic() < deadline:
            peak = max(peak, descriptors(args.server_pid))
            with contextlib.suppress(httpx.HTTPError):
                status = (await client.get(f"http://{HOST}:{port}/v1/jobs/{job}")).json()
                if status.get("status") in ("succeeded", "failed", "cancelled"):
                    break
            await asyncio.sleep(0.5)
    done.set()
    await prober
    for writer in held:
        writer.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    answered = [h for h in health if h is not None]
    return {
        "idle_opened": idle,
        "half_open_opened": half,
        "streams": args.streams,
        "streams_answered": {
            code.decode(): statuses.count(code) for code in sorted(set(statuses))
        },  # 200 while under the cap per token, 429 past it
        "descriptors_peak": peak[0],
        "descriptor_limit": peak[1],
        "health_probes": len(health),
        "health_failed": len(health) - len(answered),
        "health_p50_s": round(statistics.median(answered), 4) if answered else None,
        "health_max_s": round(max(answered), 4) if answered else None,
        "job_status": status.get("status"),
    }


def check_rows(port: int, token: str, job: str, rows: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.stream(
        "GET", f"http://{HOST}:{port}/v1/jobs/{job}/results", headers=headers, timeout=60
    ) as response:
        ids = [json.loads(line)["id"] for line in response.iter_lines() if line.strip()]
    return {
        "rows_out": len(ids),
        "rows_distinct": len(set(ids)),
        "exactly_once": sorted(ids) == list(range(rows)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--idle", type=int, default=3000)
    parser.add_argument("--half-open", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--nofile", type=int, default=4096, help="the server's descriptor limit")
    parser.add_argument("--timeout", type=float, default=120, help="bound on the flood (s)")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra serve flag")
    args = parser.parse_args(argv)
    limit_nofile(max(args.idle + args.half_open + args.streams + 512, 1024))
    token = secrets.token_urlsafe(24)
    sim_port, port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PIPELINE_SERVER_TOKEN": token, "OPENAI_API_KEY": "sk-flood"}
        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline",
                "sim",
                "--port",
                str(sim_port),
                "--latency-ms",
                "20",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        serve_cmd = [
            sys.executable, "-m", "pipeline", "serve", "--port", str(port),
            "--data-dir", f"{tmp}/data", "--base-url", f"http://{HOST}:{sim_port}/v1",
            "--token-env", "PIPELINE_SERVER_TOKEN", *args.serve_arg,
        ]  # fmt: skip
        server = subprocess.Popen(
            serve_cmd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(f"{tmp}/serve.log", "wb"),  # noqa: SIM115 - closed with the process
            # soft and hard: the server raises its soft limit to the hard one at start
            preexec_fn=lambda: resource.setrlimit(
                resource.RLIMIT_NOFILE, (args.nofile, args.nofile)
            ),
        )
        try:
            wait_ready(f"http://{HOST}:{sim_port}/v1/models", {}, sim)
            headers = {"Authorization": f"Bearer {token}"}
            wait_ready(f"http://{HOST}:{port}/healthz", headers, server)
            rows = [{"id": i, "name": f"user {i}"} for i in range(args.rows)]
            body = {"rows": rows, "settings": {"model": "sim-1", "prompt": "Greet {name}"}}
            response = httpx.post(f"http://{HOST}:{port}/v1/jobs", json=body, headers=headers)
            response.raise_for_status()
            job = response.json()["id"]
            args.server_pid = server.pid
            report = asyncio.run(flood(args, port, token, job))
            report.update(check_rows(port, token, job, args.rows))
        finally:
            for proc in (server, sim):
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=15)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    print(json.dumps(report, indent=2))
    fine = report["exactly_once"] and report["health_failed"] == 0
    print("PASS" if fine else "FAIL", "- rows exactly once and /healthz answered throughout")
    return 0 if fine else 1


if __name__ == "__main__":
    raise SystemExit(main())
