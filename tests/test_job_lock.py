"""One writer per job: the lock refuses a second process and survives its holder's kill -9."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sim_thread import ThreadSim

from pipeline.jobs._lock import (
    JobLock,
    JobLockedError,
    filesystem_of,
    lock_path,
    shown_command,
)
from pipeline.testing._sim import SimConfig, Simulator

HOLD = """
import sys, time
from pipeline.jobs._lock import JobLock
lock = JobLock(sys.argv[1], command="holder-process --resume")
lock.acquire()
print("held", flush=True)
sys.stdin.read()  # hold until told (stdin closes) or killed
"""


def start_holder(output: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(output)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    holder = start_holder(output)
    try:
        with pytest.raises(JobLockedError) as info:
            JobLock(str(output)).acquire()
        message = str(info.value)
        assert f"pid {holder.pid}" in message
        assert "holder-process --resume" in message
        assert "--resume" in message and "another output path" in message
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
        assert holder.stdout is not None
        holder.stdout.close()
    with JobLock(str(output)) as lock:  # released on a clean exit
        assert lock.held


def test_a_kill_9_holder_releases_the_lock_by_itself(tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    holder = start_holder(output)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.close()
    holder.stdout.close()
    lock = JobLock(str(output))
    lock.acquire()
    assert lock.held
    lock.release()
    assert not lock.held


def test_one_process_cannot_take_its_own_lock_twice(tmp_path: Path) -> None:
    output = str(tmp_path / "out.jsonl")
    with JobLock(output), pytest.raises(JobLockedError):
        JobLock(output).acquire()  # a second descriptor: flock excludes it too


def test_lock_file_sits_next_to_the_output_and_says_who_holds_it(tmp_path: Path) -> None:
    output = str(tmp_path / "out.jsonl")
    with JobLock(output, command="pipeline run x"):
        text = Path(lock_path(output)).read_text()
        assert f'"pid": {os.getpid()}' in text and "pipeline run x" in text
    assert not Path(lock_path(output)).exists()  # a clean release leaves no file behind


def test_filesystem_of_finds_the_mount_holding_a_path(tmp_path: Path) -> None:
    kind = filesystem_of(str(tmp_path))
    if not os.path.exists("/proc/self/mounts"):
        assert kind is None
    else:
        assert kind is not None and kind not in ("nfs", "cifs")


# -- the lock wired into every way of running a job -----------------------------------------

ROOT = Path(__file__).resolve().parent.parent
ROWS = 200
# The child: the real CLI; with HOLD_PUBLISH set it stops before publishing (lock held, every
# row journaled) until its stdin closes, so a second run can try while the first still runs.
CHILD = """
import os, sys
if os.environ.get("HOLD_PUBLISH"):
    import pipeline.jobs._journal as journal
    commit = journal.Journal.commit
    def held_commit(self, *args):
        print("publishing", flush=True)
        sys.stdin.read()
        return commit(self, *args)
    journal.Journal.commit = held_commit
from pipeline.cli._main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with ThreadSim(SimConfig(latency_ms=2)) as server:
        yield server


def write_input(path: Path, n: int = ROWS) -> None:
    path.write_text("".join(json.dumps({"id": i, "name": f"n{i}"}) + "\n" for i in range(n)))


def cli(tmp_path: Path, sim: Simulator, *extra: str) -> list[str]:
    return [
        sys.executable, "-c", CHILD, "run", str(tmp_path / "in.jsonl"), "-o",
        str(tmp_path / "out.jsonl"), "--model", "m", "--prompt", "Hi {name}", "--base-url",
        sim.url, "--quiet", *extra,
    ]  # fmt: skip


def start_held_run(tmp_path: Path, sim: Simulator) -> subprocess.Popen[str]:
    """A CLI run stopped just before it publishes: it holds the lock, every row journaled."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOLD_PUBLISH": "1"}
    first = subprocess.Popen(
        cli(tmp_path, sim),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert first.stdout is not None
    assert first.stdout.readline().strip() == "publishing"
    return first


def finish_held_run(first: subprocess.Popen[str]) -> None:
    try:
        _, err = first.communicate(input="", timeout=60)  # stdin closes: the run publishes
    except subprocess.TimeoutExpired:
        first.kill()  # never leave it behind
        first.communicate()
        raise
    assert first.returncode == 0, err


def check_exactly_once(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == list(range(ROWS))
    assert all(r["response"] == f"echo: Hi {r['name']}" for r in rows)
    assert not Path(lock_path(str(tmp_path / "out.jsonl"))).exists()  # removed on release


@pytest.mark.parametrize("extra", [("--resume",), ("--engine", "ray", "--resume"), ()])
def test_a_second_cli_run_is_refused_while_the_first_publishes_every_row_once(
    tmp_path: Path, sim: Simulator, extra: tuple[str, ...]
) -> None:
    write_input(tmp_path / "in.jsonl")
    first = start_held_run(tmp_path, sim)
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        second = subprocess.run(
            cli(tmp_path, sim, *extra), capture_output=True, text=True, env=env, timeout=60
        )
        assert second.returncode == 2, second.stderr
        assert "this job is already running" in second.stderr
        assert f"pid {first.pid}" in second.stderr and "Hi {name}" in second.stderr
        assert "then run again with --resume" in second.stderr
        assert sim.counters()["requests"] == ROWS  # the second run sent nothing
    finally:
        finish_held_run(first)
    check_exactly_once(tmp_path)


def test_a_run_takes_over_the_lock_of_a_run_killed_with_sigkill(
    tmp_path: Path, sim: Simulator
) -> None:
    write_input(tmp_path / "in.jsonl")
    first = start_held_run(tmp_path, sim)
    first.kill()
    first.communicate(timeout=30)
    lock_file = Path(lock_path(str(tmp_path / "out.jsonl")))
    assert f'"pid": {first.pid}' in lock_file.read_text()  # the dead holder's file stays
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    resumed = subprocess.run(
        cli(tmp_path, sim, "--resume"), capture_output=True, text=True, env=env, timeout=60
    )
    assert resumed.returncode == 0, resumed.stderr
    assert sim.counters()["requests"] == ROWS  # every row was journaled before the kill
    check_exactly_once(tmp_path)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_batch_api_job_is_refused_while_another_process_runs_it(tmp_path: Path) -> None:
    from pipeline.jobs import JobSettings, run_job

    write_input(tmp_path / "in.jsonl", 3)
    output = tmp_path / "out.jsonl"
    settings = JobSettings(
        input=str(tmp_path / "in.jsonl"), output=str(output), model="m", prompt="{name}",
        batch_api=True, base_url="http://127.0.0.1:9/v1",
    )  # fmt: skip
    holder = start_holder(output)
    try:
        with pytest.raises(JobLockedError, match=f"pid {holder.pid}"):
            await run_job(settings.replace(resume=True))
    finally:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl.lock"]  # nothing touched


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_run_job_on_ray_is_refused_before_it_starts_ray(tmp_path: Path) -> None:
    from pipeline.jobs import JobSettings, run_job_on_ray

    write_input(tmp_path / "in.jsonl", 3)
    output = tmp_path / "out.jsonl"
    settings = JobSettings(
        input=str(tmp_path / "in.jsonl"), output=str(output), model="m", prompt="{name}",
        engine="ray",
    )  # fmt: skip
    holder = start_holder(output)
    try:
        with pytest.raises(JobLockedError, match=f"pid {holder.pid}"):
            await run_job_on_ray(settings)
    finally:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    assert not (tmp_path / "out.jsonl.checkpoint.json").exists()  # the journal untouched


def test_a_lock_on_a_network_file_system_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import pipeline.jobs._lock as lock_module

    monkeypatch.setattr(lock_module, "filesystem_of", lambda path: "nfs4")
    with (
        caplog.at_level(logging.WARNING, logger="pipeline.jobs"),
        JobLock(str(tmp_path / "out.jsonl")),
    ):
        pass
    assert "on a nfs4 file system" in caplog.text


def test_filesystem_of_reads_the_mount_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\n"
        "server:/export /mnt/shared nfs4 rw 0 0\n"
        "//nas/share /mnt/my\\040share cifs rw 0 0\n"
    )
    real_open = open

    def fake_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        return real_open(mounts if path == "/proc/self/mounts" else path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    from pipeline.jobs._lock import filesystem_of as of

    assert of("/mnt/shared/jobs/out.jsonl") == "nfs4"
    assert of("/mnt/my share/out.jsonl") == "cifs"
    assert of("/mnt/sharedness/out.jsonl") == "ext4"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_second_service_on_the_data_dir_does_not_run_a_running_job(
    tmp_path: Path,
) -> None:
    import anyio
    import httpx

    from pipeline.server import ServerConfig, create_app
    from pipeline.testing._sim import serve

    @contextlib.asynccontextmanager
    async def service(sim: Simulator) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
        config = ServerConfig(data_dir=tmp_path, base_url=sim.url, progress_interval=0.05)
        app = create_app(config)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                yield client, app.state.jobs

    async with serve(SimConfig(latency_ms=20)) as sim, service(sim) as (first, manager):
        body = {"rows": [{"id": i, "name": f"n{i}"} for i in range(60)],
                "settings": {"model": "m", "prompt": "hi {name}", "concurrency": 2}}  # fmt: skip
        job_id = (await first.post("/v1/jobs", json=body)).json()["id"]
        job = manager.jobs[job_id]
        with anyio.fail_after(20):
            while job.progress is None or job.progress.ok < 3:
                await job.changed.wait()
        # a second server process on the same data directory (a second worker) starts: it
        # finds the job unfinished and tries to resume it, while the first one runs it
        async with service(sim) as (second, other):
            with anyio.fail_after(20):
                await other.jobs[job_id].done.wait()
            state = (await second.get(f"/v1/jobs/{job_id}")).json()
            assert state["status"] == "interrupted"
            assert f"another server process runs this job: pid {os.getpid()}" in state["error"]
            assert str(tmp_path) not in state["error"]  # no server path
        with anyio.fail_after(30):
            await job.done.wait()
        state = (await first.get(f"/v1/jobs/{job_id}")).json()
        assert state["status"] == "succeeded" and state["runs"] == 1
        results = (await first.get(f"/v1/jobs/{job_id}/results")).text.splitlines()
        assert sorted(json.loads(line)["id"] for line in results) == list(range(60))
        assert sim.counters()["requests"] == 60  # the second server sent nothing
    record = json.loads((tmp_path / "jobs" / job_id / "job.json").read_text())
    assert record["status"] == "succeeded"


def test_the_recorded_command_hides_header_values() -> None:
    argv = ["pipeline", "run", "in", "--header", "X-Api-Key: sk-secret", "--header=A: b"]
    shown = shown_command(argv)
    assert "sk-secret" not in shown and " b" not in shown.split("A:")[1]
    assert shown == "pipeline run in --header X-Api-Key: *** --header=A: ***"
