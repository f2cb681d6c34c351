"""Exactly-once resume of real CLI processes killed with SIGKILL or stopped with Ctrl-C.

Each test runs ``python -m pipeline run`` in a child process against the simulated server
(in a thread of the test process, so its counters tell how many requests were sent), kills or
interrupts it at some point, runs the same command with ``--resume`` until the job completes,
then checks the promise: exactly one output row or dead-letter record per input row, no torn
lines, no leftovers, and at most the rows in flight at each crash sent twice.
"""

from __future__ import annotations

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
ROWS = 400
BAD_LINES = (57, 311)  # 1-based lines holding rows that are dead-lettered
CONCURRENCY = 8
WINDOW = 2 * CONCURRENCY  # rows the caller holds at once: the most a crash can re-send

# The child: the real CLI, optionally with a SIGKILL injected at one point of the publish.
CHILD = """
import os, signal, sys
point = os.environ.get("KILL_AT")
if point:
    import pipeline.jobs._journal as journal
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "build":  # converting the journals, before the checkpoint says "publishing"
        journal.build_final = die
    elif point == "publish":  # files built, checkpoint says "publishing", nothing renamed yet
        journal.Journal._finish_publish = die
    elif point == "sort":  # an --ordered publish sorting its journal in a temporary directory
        import functools
        import stages.files._records as records
        journal.build_final = functools.partial(records.build_final, fanin=2)
        records._sorted_runs = die
from pipeline.cli._main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with ThreadSim(SimConfig(latency_ms=20, jitter_ms=10, seed=11)) as server:
        yield server


class Job:
    """One job's files and command line."""

    def __init__(self, tmp_path: Path, sim: Simulator, *extra: str) -> None:
        self.dir = tmp_path
        self.sim = sim
        self.input = tmp_path / "in.jsonl"
        self.output = tmp_path / "out.jsonl"
        self.partial = tmp_path / "out.jsonl.partial"
        self.manifest = tmp_path / "out.jsonl.checkpoint.json"
        with open(self.input, "w") as f:
            for line in range(1, ROWS + 1):
                row = {"other": line} if line in BAD_LINES else {"name": f"n{line}"}
                f.write(json.dumps(row) + "\n")
        self.argv = [
            "run", str(self.input), "-o", str(self.output), "--model", "m",
            "--prompt", "Hi {name}", "--base-url", sim.url, "--concurrency", str(CONCURRENCY),
            "--quiet", *extra,
        ]  # fmt: skip

    def start(self, *more: str, kill_at: str | None = None) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("KILL_AT", None)
        if kill_at is not None:
            env["KILL_AT"] = kill_at
        return subprocess.Popen(
            [sys.executable, "-c", CHILD, *self.argv, *more],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=self.dir,
        )

    def finish(self, *more: str) -> subprocess.CompletedProcess[str]:
        child = self.start(*more)
        out, err = child.communicate(timeout=60)
        return subprocess.CompletedProcess(child.args, child.returncode, out, err)

    def journaled(self) -> int:
        try:
            with open(self.partial, "rb") as f:
                return f.read().count(b"\n")
        except FileNotFoundError:
            return 0

    def requests(self) -> int:
        return int(self.sim.counters()["requests"])

    def check_exactly_once(self, *, ordered: bool = False) -> None:
        text = self.output.read_text()
        assert text.endswith("\n")
        rows = [json.loads(line) for line in text.splitlines()]  # no torn line
        good = [f"n{line}" for line in range(1, ROWS + 1) if line not in BAD_LINES]
        got = [r["name"] for r in rows]
        assert sorted(got) == sorted(good) and len(got) == len(set(got))
        assert all(r["response"] == f"echo: Hi {r['name']}" for r in rows)
        if ordered:
            assert got == good
        dead_text = (self.dir / "out.jsonl.failed.jsonl").read_text()
        dead = [json.loads(line) for line in dead_text.splitlines()]
        assert sorted(d["line"] for d in dead) == list(BAD_LINES)
        assert sorted(os.listdir(self.dir)) == [
            "in.jsonl",
            "out.jsonl",
            "out.jsonl.failed.jsonl",
            "out.jsonl.timeline.jsonl",  # the runs' time series, for `pipeline report`
        ]


def wait_until(condition: Callable[[], bool], child: subprocess.Popen[str], what: str) -> None:
    """Poll a condition on the child's files (never a fixed sleep), failing after 30 s."""
    deadline = time.monotonic() + 30
    while not condition():
        if child.poll() is not None:
            raise AssertionError(f"the job ended ({child.returncode}) before {what}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def kill_when(job: Job, condition: Callable[[], bool], what: str) -> None:
    child = job.start()
    with child:
        wait_until(condition, child, what)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert child.returncode == -signal.SIGKILL


def test_sigkill_at_several_points_then_resume(tmp_path: Path, sim: Simulator) -> None:
    job = Job(tmp_path, sim, "--ordered")
    kills = 0
    # 1. early: the checkpoint exists, rows may be in flight, none journaled yet (usually)
    kill_when(job, job.manifest.exists, "the checkpoint")
    kills += 1
    # 2. and 3. mid-job, at two points of the file
    for lines in (120, 300):
        before = job.journaled()
        child = job.start("--resume")
        with child:
            wait_until(lambda n=lines: job.journaled() >= n, child, f"{lines} journaled rows")
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        assert child.returncode == -signal.SIGKILL
        assert job.journaled() > before
        kills += 1
    done = job.finish("--resume")
    assert done.returncode == 3, done.stderr  # complete, with the two bad rows dead-lettered
    job.check_exactly_once(ordered=True)
    good = ROWS - len(BAD_LINES)
    resent = job.requests() - good
    assert 0 <= resent <= kills * WINDOW, f"{resent} requests sent twice over {kills} kills"


@pytest.mark.parametrize("point", ["build", "publish"])
def test_sigkill_during_publish_then_resume(tmp_path: Path, sim: Simulator, point: str) -> None:
    job = Job(tmp_path, sim, "--id-field", "name")
    (tmp_path / "out.jsonl").write_text('{"stale": "previous version"}\n')
    child = job.start("--overwrite", kill_at=point)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    # a reader still sees the previous file, whole, under the final name
    assert (tmp_path / "out.jsonl").read_text() == '{"stale": "previous version"}\n'
    requests = job.requests()
    assert requests == ROWS - len(BAD_LINES)  # every row was answered before the crash
    plain = job.finish()
    assert plain.returncode == 2 and "--resume" in plain.stderr  # leftovers are not ignored
    done = job.finish("--resume", "--summary-json", str(tmp_path.parent / f"{point}.json"))
    assert done.returncode == 3, done.stderr
    assert job.requests() == requests  # nothing sent again: every row was journaled
    job.check_exactly_once()
    summary = json.loads((tmp_path.parent / f"{point}.json").read_text())
    assert summary["complete"] and summary["total_failed"] == len(BAD_LINES)
    assert summary["total_ok"] == ROWS - len(BAD_LINES)


def test_sigkill_while_sorting_an_ordered_publish_leaves_no_sort_directory(
    tmp_path: Path, sim: Simulator
) -> None:
    job = Job(tmp_path, sim, "--ordered")
    child = job.start(kill_at="sort")
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert any(".sort-" in name for name in os.listdir(tmp_path))  # the killed sort's directory
    done = job.finish("--resume")
    assert done.returncode == 3, done.stderr
    job.check_exactly_once(ordered=True)  # no leftover at all, the stale directory included


def test_resume_refuses_a_different_job(tmp_path: Path, sim: Simulator) -> None:
    job = Job(tmp_path, sim)
    kill_when(job, lambda: job.journaled() >= 10, "10 journaled rows")
    for more, what in (
        (["--prompt", "Bye {name}"], 'prompt (was "Hi {name}", now "Bye {name}")'),
        (["--model", "other"], 'model (was "m", now "other")'),
    ):
        refused = job.finish("--resume", *more)
        assert refused.returncode == 2
        assert "cannot resume" in refused.stderr and what in refused.stderr
    with open(job.input, "a") as f:
        f.write(json.dumps({"name": "extra"}) + "\n")
    refused = job.finish("--resume")
    assert refused.returncode == 2 and "input file contents (size was" in refused.stderr


def test_ctrl_c_finishes_rows_in_flight_and_resumes_exactly_once(
    tmp_path: Path, sim: Simulator
) -> None:
    job = Job(tmp_path, sim, "--summary-json", str(tmp_path.parent / "s.json"))
    child = job.start()
    with child:
        wait_until(lambda: job.journaled() >= 50, child, "50 journaled rows")
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=30)
    assert child.returncode == 130, err
    assert "SIGINT: stopping: no new request is sent" in err
    assert "run the same command with --resume" in err
    summary = json.loads((tmp_path.parent / "s.json").read_text())
    assert summary["stopped"] == "interrupted" and summary["exit_status"] == 130
    assert job.requests() == summary["requests"] == job.journaled()  # in-flight rows finished
    assert not job.output.exists()  # not published: the job is not complete
    done = job.finish("--resume")
    assert done.returncode == 3, done.stderr
    job.check_exactly_once()
    assert job.requests() == ROWS - len(BAD_LINES)  # a graceful stop sends nothing twice


def test_second_ctrl_c_exits_at_once_and_stays_resumable(tmp_path: Path, sim: Simulator) -> None:
    job = Job(tmp_path, sim)
    child = job.start()
    with child:
        wait_until(lambda: job.journaled() >= 30, child, "30 journaled rows")
        sim.configure(SimConfig(latency_ms=30_000))  # rows in flight now never finish
        wait_until(lambda: sim.counters()["concurrent"] >= CONCURRENCY, child, "slow requests")
        child.send_signal(signal.SIGINT)
        assert child.stderr is not None
        first = child.stderr.readline()  # the stop notice: the handler is in place
        assert "stopping" in first
        child.send_signal(signal.SIGINT)
        child.wait(20)  # a hang guard below the 30 s answers it must not wait for
        rest = child.stderr.read()
    assert child.returncode == 130
    assert "interrupted again: exiting now" in rest
    sim.configure(SimConfig())
    done = job.finish("--resume")
    assert done.returncode == 3, done.stderr
    job.check_exactly_once()
    resent = job.requests() - (ROWS - len(BAD_LINES))
    assert 0 <= resent <= WINDOW
