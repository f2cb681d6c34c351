"""kill -9 of a batch job at each stage, then --resume: exactly one batch, every row once.

The job runs as a real ``python -m pipeline run --batch-api`` subprocess against the simulator
(in this process, on its own thread). The simulator holds one request of the stage under test
(an upload, the create whose answer is then lost, a poll after creation, a download half-way)
and tells the test, which kills the job there with SIGKILL; the resumed job must answer every
row with its own answer through the one batch already created (or the one it then creates).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from sim_thread import ThreadSim

from pipeline.testing import BatchSimConfig, Simulator

ROWS = 1000


def command(sim: Simulator, tmp_path: Path, provider: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        str(tmp_path / "in.jsonl"),
        "-o",
        str(tmp_path / "out.jsonl"),
        "--model",
        "sim-1",
        "--prompt",
        "hello {name}",
        "--base-url",
        sim.url,
        "--provider",
        provider,
        "--batch-api",
        "--batch-poll",
        "0.05",
        "--quiet",
        *extra,
    ]


def env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def kill_at(sim: Simulator, tmp_path: Path, provider: str, stage: str) -> None:
    """Start the job, wait for the simulator to hold a request of ``stage``, kill -9 it."""
    held = threading.Event()
    sim.batches.on_stall = lambda kind: held.set()
    sim.batches.configure(BatchSimConfig(delay_s=0.2, stall=stage))  # type: ignore[arg-type]
    proc = subprocess.Popen(
        command(sim, tmp_path, provider),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        if not held.wait(60):
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"the job never reached {stage}: {err.decode()[-2000:]}")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def resume(sim: Simulator, tmp_path: Path, provider: str) -> subprocess.CompletedProcess[str]:
    sim.batches.configure(BatchSimConfig(delay_s=0.05))
    return subprocess.run(
        command(sim, tmp_path, provider, "--resume"),
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def check_output(tmp_path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == list(range(ROWS))
    assert all(r["response"] == f"echo: hello {r['name']}" for r in rows)
    assert not (tmp_path / "out.jsonl.batches").exists()
    assert not (tmp_path / "out.jsonl.failed.jsonl").exists()
    return rows


def online_calls(sim: Simulator) -> int:
    by_route = sim.counters()["by_route"]
    online = ("/v1/chat/completions", "/v1/messages")
    return sum(sum(v.values()) for k, v in by_route.items() if k in online)


@pytest.mark.parametrize(
    ("provider", "stage"),
    [
        ("openai", "upload"),
        ("openai", "create"),
        ("anthropic", "create"),
        ("openai", "poll"),
        ("anthropic", "poll"),
        ("openai", "download"),
        ("anthropic", "download"),
    ],
)
def test_kill_9_then_resume_submits_each_row_once(
    tmp_path: Path, provider: str, stage: str
) -> None:
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": i, "name": f"n{i}"}) + "\n" for i in range(ROWS))
    )
    with ThreadSim() as sim:
        kill_at(sim, tmp_path, provider, stage)
        assert not (tmp_path / "out.jsonl").exists()
        done = resume(sim, tmp_path, provider)
        assert done.returncode == 0, done.stderr[-3000:]
        check_output(tmp_path)
        counters = sim.batches.counters()
        assert counters["batches"] == 1, counters
        assert counters["requests"] == ROWS
        assert online_calls(sim) == 0
