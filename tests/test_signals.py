"""Ctrl-C and SIGTERM on real CLI processes: no request after the stop, a bounded grace for the
requests in flight, exit 130, a resumable journal, and no wait on an idle input.

Each test runs ``python -m pipeline run`` in a child process against the simulator (in a thread
of the test process, so its counters say what was sent) and polls the child's files or output
for the moment to signal it (never a fixed sleep). Timeouts on ``communicate`` only guard
against a hang.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sim_thread import ThreadSim

from pipeline.testing._sim import SimConfig, Simulator

ROOT = Path(__file__).resolve().parent.parent
ROWS = 300


CHILDREN: list[subprocess.Popen[str]] = []


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with ThreadSim(SimConfig(latency_ms=20, jitter_ms=10, seed=3)) as server:
        try:
            yield server
        finally:  # a child a failed test left running (a job that ignored its signal) ends here
            for child in CHILDREN:
                if child.poll() is None:
                    child.kill()
                    child.wait()
            CHILDREN.clear()


def write_rows(path: Path, n: int = ROWS) -> None:
    path.write_text("".join(json.dumps({"id": i, "name": f"n{i}"}) + "\n" for i in range(n)))


def start(tmp_path: Path, sim: Simulator, *extra: str, source: str | None = None,
          stdin: int | None = None) -> subprocess.Popen[str]:  # fmt: skip
    argv = [
        sys.executable, "-m", "pipeline", "run", source or str(tmp_path / "in.jsonl"),
        "-o", str(tmp_path / "out.jsonl"), "--model", "m", "--prompt", "Hi {name}",
        "--base-url", sim.url, *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    CHILDREN.append(child)
    return child


@contextlib.contextmanager
def supervised(child: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """Use the child; kill it if the block fails while it still runs (never leave it behind)."""
    with child:
        try:
            yield child
        finally:
            if child.poll() is None:
                child.kill()


def journaled(tmp_path: Path) -> int:
    try:
        return (tmp_path / "out.jsonl.partial").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_until(condition: Callable[[], bool], child: subprocess.Popen[str], what: str) -> None:
    """Poll a condition (never a fixed sleep), failing after 60 s or if the child ended."""
    deadline = time.monotonic() + 60
    while not condition():
        if child.poll() is not None:
            raise AssertionError(f"the job ended ({child.returncode}) before {what}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def test_sigterm_mid_job_then_resume_gives_every_row_exactly_once(
    tmp_path: Path, sim: Simulator
) -> None:
    write_rows(tmp_path / "in.jsonl")
    summary_path = tmp_path / "s.json"
    child = start(tmp_path, sim, "--quiet", "--concurrency", "8", "--summary-json",
                  str(summary_path))  # fmt: skip
    with supervised(child):
        wait_until(lambda: journaled(tmp_path) >= 40, child, "40 journaled rows")
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "SIGTERM: stopping: no new request is sent" in err and "Traceback" not in err
    summary = json.loads(summary_path.read_text())
    assert summary["stopped"] == "interrupted" and summary["exit_status"] == 130
    assert sim.counters()["requests"] == journaled(tmp_path)  # in flight finished, none after
    resumed = start(tmp_path, sim, "--quiet", "--resume")
    _, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, err
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == list(range(ROWS))  # every row exactly once
    assert sim.counters()["requests"] == ROWS  # nothing sent twice


def test_no_request_is_sent_after_ctrl_c_for_rows_waiting_for_the_limiter(
    tmp_path: Path, sim: Simulator
) -> None:
    # 2 requests a second: the job's other rows wait for the rate limiter, not for the server
    write_rows(tmp_path / "in.jsonl")
    child = start(tmp_path, sim, "--quiet", "--concurrency", "8", "--rpm", "120")
    with supervised(child):
        wait_until(lambda: journaled(tmp_path) >= 3, child, "3 journaled rows")
        before = sim.counters()["requests"]
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    after = sim.counters()["requests"]
    # the docs' promise: after the stop, no request starts; only those in flight finish (one
    # may have left between reading the counter and the child taking the signal)
    assert after - before <= 1, (before, after)
    assert after == journaled(tmp_path)  # each request sent was answered and journaled


def test_a_second_ctrl_c_exits_at_once_and_still_writes_the_summary(
    tmp_path: Path, sim: Simulator
) -> None:
    write_rows(tmp_path / "in.jsonl")
    summary_path = tmp_path / "s.json"
    child = start(tmp_path, sim, "--quiet", "--concurrency", "4", "--summary-json",
                  str(summary_path), "--progress-interval", "0.05")  # fmt: skip
    with supervised(child):
        wait_until(lambda: journaled(tmp_path) >= 20, child, "20 journaled rows")
        sim.configure(SimConfig(latency_ms=600_000))  # rows in flight now never finish
        wait_until(lambda: sim.counters()["concurrent"] >= 4, child, "slow requests")
        child.send_signal(signal.SIGINT)
        assert child.stderr is not None
        assert "stopping" in child.stderr.readline()  # the handler took the first one
        child.send_signal(signal.SIGINT)
        _, rest = child.communicate(timeout=60)
    assert child.returncode == 130
    assert "interrupted again: exiting now" in rest and "Traceback" not in rest
    summary = json.loads(summary_path.read_text())
    assert summary["exit_status"] == 130 and summary["stopped"] == "interrupted"
    assert summary["complete"] is False and "interrupted again" in summary["error"]
    assert 0 < summary["ok"] <= journaled(tmp_path)  # as of the last progress snapshot


def test_ctrl_c_ends_a_job_reading_an_idle_pipe(tmp_path: Path, sim: Simulator) -> None:
    child = start(tmp_path, sim, "--quiet", source="-", stdin=subprocess.PIPE)
    with supervised(child):
        assert child.stdin is not None
        for i in range(5):  # five rows, then the writer stays silent with the pipe open
            child.stdin.write(json.dumps({"id": i, "name": f"n{i}"}) + "\n")
        child.stdin.flush()
        wait_until(lambda: journaled(tmp_path) >= 5, child, "the rows written so far")
        child.send_signal(signal.SIGINT)
        child.wait(timeout=60)  # stdin stays open (communicate would close it)
        assert child.stderr is not None
        err = child.stderr.read()
    assert child.returncode == 130, err
    assert "Traceback" not in err
    assert sim.counters()["requests"] == 5


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_a_job_reading_an_endless_device(
    tmp_path: Path, sim: Simulator, sig: signal.Signals
) -> None:
    child = start(tmp_path, sim, "--progress-interval", "0.05", "--input-format", "jsonl",
                  source="/dev/zero")  # fmt: skip
    with supervised(child):
        assert child.stderr is not None
        while not child.stderr.readline().startswith("progress"):
            pass  # the first progress line: the job runs, reading its input
        child.send_signal(sig)
        _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "Traceback" not in err
    assert sim.counters()["requests"] == 0


def test_sigterm_ends_a_parquet_job_spooling_an_idle_pipe(tmp_path: Path, sim: Simulator) -> None:
    pytest.importorskip("pyarrow")
    child = start(tmp_path, sim, "--progress-interval", "0.05", "--input-format", "parquet",
                  source="-", stdin=subprocess.PIPE)  # fmt: skip
    with supervised(child):
        assert child.stdin is not None and child.stderr is not None
        child.stdin.write("PAR1")  # the start of a Parquet file, then the writer stays silent
        child.stdin.flush()
        while not child.stderr.readline().startswith("progress"):
            pass  # the first progress line: the job runs, spooling its input
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=60)  # stdin stays open (communicate would close it)
        err = child.stderr.read()
    assert child.returncode == 130, err
    assert "Traceback" not in err
    assert sim.counters()["requests"] == 0
