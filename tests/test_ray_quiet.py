"""``--engine ray --quiet`` is quiet: no Ray start-up logs, no Ray Data progress, no summary;
without ``--quiet`` progress comes only from the job's own display."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sim_thread import ThreadSim

from pipeline.testing._sim import Simulator

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parent.parent
RAY_CHATTER = re.compile(
    r"^\S+ \S+\s+(INFO|WARNING)\b|logging_progress|Running Dataset|Progress bars", re.MULTILINE
)
"""Ray's log lines (``2026-01-01 12:00:00,000 INFO worker.py:...``) and Ray Data's progress."""


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with ThreadSim() as server:
        yield server


def _run(tmp_path: Path, sim: Simulator, *flags: str) -> subprocess.CompletedProcess[str]:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"name": f"n{i}"}) + "\n" for i in range(20)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    args = ["run", str(src), "-o", str(tmp_path / "out.jsonl"), "--model", "m"]
    args += ["--base-url", sim.url, "--prompt", "{name}", "--engine", "ray", "--rpm", "6000"]
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args, *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_quiet_ray_job_prints_no_ray_logs_and_no_progress(tmp_path: Path, sim: Simulator) -> None:
    done = _run(tmp_path, sim, "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert not RAY_CHATTER.search(done.stderr), done.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 20


def test_ray_progress_is_the_jobs_own_display(tmp_path: Path, sim: Simulator) -> None:
    # an interval longer than the test may run: a slow machine's job is not a noisy one
    done = _run(tmp_path, sim, "--progress-interval", "600")
    assert done.returncode == 0, done.stderr
    assert not RAY_CHATTER.search(done.stderr), done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("progress:")]
    # at --progress-interval: the first snapshot and the final one, not Ray Data's every second
    assert 1 <= len(progress) <= 2 and progress[-1].startswith("progress: 20/20 rows")
    assert "ok        20" in done.stdout
