"""One writer per job: the lock refuses a second process and survives its holder's kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.jobs._lock import JobLock, JobLockedError, filesystem_of, lock_path

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
    assert Path(lock_path(output)).read_text() == ""


def test_filesystem_of_finds_the_mount_holding_a_path(tmp_path: Path) -> None:
    kind = filesystem_of(str(tmp_path))
    if not os.path.exists("/proc/self/mounts"):
        assert kind is None
    else:
        assert kind is not None and kind not in ("nfs", "cifs")
