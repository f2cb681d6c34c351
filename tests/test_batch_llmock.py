"""The batch client against a simulator someone else wrote: llmock (PyPI), on 127.0.0.1.

llmock implements OpenAI's files and batches and Anthropic's Message Batches with answers that
echo each prompt, so a row answered with another row's answer would show. Its batches take
three seconds to finish.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from stages.llm._batch_api import BatchClient
from stages.llm._providers import AnthropicProvider, Provider

pytest.importorskip("llmock")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def llmock() -> Iterator[str]:
    port = free_port()
    code = "from llmock.cli import app; app()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--port", str(port), "--response-style", "echo"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(base + "/_llmock/requests", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("llmock did not start") from None
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def served(base: str) -> list[str]:
    with urllib.request.urlopen(base + "/_llmock/requests", timeout=5) as resp:
        data = json.loads(resp.read())
    items = data if isinstance(data, list) else data.get("requests", data.get("data", []))
    return [str(item.get("path", "")) for item in items if isinstance(item, dict)]


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_thousand_rows_in_one_batch_each_with_its_own_answer(
    llmock: str, tmp_path: Path, kind: str
) -> None:
    provider: Provider = Provider(f"{llmock}/v1")
    if kind == "anthropic":
        provider = AnthropicProvider(f"{llmock}/anthropic/v1")

    async def main() -> list[tuple[str, str | None]]:
        async with BatchClient(provider, api_key="sk-test") as client:
            path = str(tmp_path / "requests")
            with client.spool(path) as spool:
                for i in range(1000):
                    messages = [{"role": "user", "content": f"row {i}"}]
                    request = provider.chat_body("gpt-4o", messages, None, {}, False)
                    assert spool.add(f"r{i}", request)
            if kind == "openai":
                status = await client.create(await client.upload(path))
            else:
                status = await client.create(path)
            with anyio.fail_after(60):
                while not status.ended:
                    await anyio.sleep(0.25)
                    status = await client.retrieve(status.id)
            return [
                (r.custom_id, r.answer.text if r.answer else None)
                async for r in client.results(status)
            ]

    before = served(llmock)
    results = anyio.run(main)
    assert len(results) == 1000
    for custom_id, text in results:
        assert text is not None and text.endswith(f"row {custom_id[1:]}"), (custom_id, text)
    paths = served(llmock)[len(before) :]
    assert not [p for p in paths if p.endswith(("/chat/completions", "/messages"))]
    creates = [p for p in paths if p.endswith(("/batches", "/messages/batches"))]
    assert len(creates) == 1


# -- the job engine against llmock ------------------------------------------------------------


def job_command(base: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        str(tmp_path / "in.jsonl"),
        "-o",
        str(tmp_path / "out.jsonl"),
        "--model",
        "gpt-4o",
        "--prompt",
        "row {id}",
        "--base-url",
        base + "/v1",
        "--batch-api",
        "--batch-poll",
        "0.25",
        "--quiet",
        *extra,
    ]


def job_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def check_job_output(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == list(range(1000))
    for row in rows:
        assert row["response"].endswith(f"row {row['id']}"), row


def test_a_1000_row_job_in_one_batch_and_again_after_kill_9_and_resume(
    llmock: str, tmp_path: Path
) -> None:
    rows = "".join(json.dumps({"id": i}) + "\n" for i in range(1000))
    for name in ("plain", "killed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "in.jsonl").write_text(rows)

    before = served(llmock)
    done = subprocess.run(
        job_command(llmock, tmp_path / "plain"), env=job_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    check_job_output(tmp_path / "plain")
    paths = served(llmock)[len(before) :]
    assert not [p for p in paths if p.endswith("/chat/completions")]
    assert len([p for p in paths if p.endswith("/batches")]) == 1

    folder = tmp_path / "killed"
    before = served(llmock)
    proc = subprocess.Popen(
        job_command(llmock, folder),
        env=job_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    log_path = folder / "out.jsonl.batches" / "log.jsonl"
    deadline = time.monotonic() + 60
    while not (log_path.exists() and b'"created"' in log_path.read_bytes()):
        assert proc.poll() is None and time.monotonic() < deadline, "no batch was created"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    if proc.stderr is not None:
        proc.stderr.close()
    done = subprocess.run(
        job_command(llmock, folder, "--resume"), env=job_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    check_job_output(folder)
    paths = served(llmock)[len(before) :]
    assert not [p for p in paths if p.endswith("/chat/completions")]
    assert len([p for p in paths if p.endswith("/batches")]) == 1
