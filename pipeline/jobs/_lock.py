"""One writer per job: an exclusive OS lock next to the job's journal.

Two processes writing one job (a second terminal with ``--resume``, a cron retry, a second
service worker) would share one journal and publish rows twice. :class:`JobLock` takes an
exclusive ``flock`` on ``OUTPUT.lock`` before the journal is touched and holds it through the
whole run, publish included. The kernel releases an ``flock`` when its holder exits however it
exits, ``kill -9`` included, so no lock is ever guessed stale: the next run simply gets it.

The lock file also says who holds it (pid, host, start time, command) so the refusal can name
the holder. Network file systems may not honour ``flock`` between machines (NFS without a lock
manager, some SMB and FUSE mounts): :func:`filesystem_of` recognises the common ones and the
lock warns once that it only protects against processes on this machine.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
from types import TracebackType

from pipeline._errors import ConfigError

log = logging.getLogger("pipeline.jobs")

LOCK_SUFFIX = ".lock"

NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "afs",
        "ceph",
        "glusterfs",
        "lustre",
        "fuse.sshfs",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.rclone",
        "davfs",
    }
)
"""File system types where ``flock`` may not exclude a process on another machine."""


class JobLockedError(ConfigError):
    """Another process holds the job's lock: it is running this job now."""


def lock_path(output: str) -> str:
    """Return the lock file's path for a job writing ``output``."""
    return os.fspath(output) + LOCK_SUFFIX


def filesystem_of(path: str) -> str | None:
    """Return the file system type holding ``path`` (from ``/proc/self/mounts``), if known."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    target = os.path.realpath(path)
    best, kind = "", None
    for fields in mounts:
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def _holder_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return "another process (it has not written its details yet)"
    if not isinstance(holder, dict):
        return "another process"
    command = str(holder.get("command", "?"))
    if len(command) > 200:
        command = command[:197] + "..."
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
        f"started {holder.get('started', '?')}: {command}"
    )


class JobLock:
    """An exclusive, kill-safe lock on one job (one output path).

    Use as a context manager around everything that touches the job's journal and output::

        with JobLock(settings.output):
            ...  # run, checkpoint, publish

    Args:
        output: The job's output path; the lock file is ``output + ".lock"``.
        command: What to record as the holder's command (default: this process's argv).

    Raises:
        JobLockedError: On enter, when another process holds the lock, naming the holder and
            what to do.
    """

    def __init__(self, output: str, *, command: str | None = None) -> None:
        self.path = lock_path(output)
        self.command = command if command is not None else " ".join(sys.argv)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock without waiting, or raise :class:`JobLockedError`."""
        import fcntl  # POSIX only; imported here so the module imports everywhere

        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this object")
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise ConfigError(f"cannot create the job lock {self.path}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JobLockedError(
                f"this job is already running: {self.path} is held by {_holder_text(self.path)}. "
                "Wait for it to finish (or stop it), then run again with --resume; to run a "
                "second job at the same time, give it another output path"
            ) from None
        except OSError as error:
            os.close(fd)
            raise ConfigError(f"cannot lock {self.path}: {error.strerror}") from None
        self._fd = fd
        self._write_holder(fd)
        kind = filesystem_of(directory)
        if kind in NETWORK_FILESYSTEMS:
            log.warning(
                "the job lock %s is on a %s file system, where locks may not exclude processes "
                "on other machines; run one job per output path across machines yourself",
                self.path,
                kind,
            )

    def _write_holder(self, fd: int) -> None:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": self.command,
        }
        data = json.dumps(holder).encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def release(self) -> None:
        """Release the lock (the lock file stays: removing it would race a waiting process)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):  # the holder details are only informative
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
