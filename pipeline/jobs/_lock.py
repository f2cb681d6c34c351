"""One writer per job: an exclusive OS lock next to the job's journal.

Two processes writing one job (a second terminal with ``--resume``, a cron retry, a second
service worker) would share one journal and publish rows twice. :class:`JobLock` takes an
exclusive ``flock`` on ``OUTPUT.lock`` before the journal is touched and holds it through the
whole run, publish included. The kernel releases an ``flock`` when its holder exits however it
exits, ``kill -9`` included, so no lock is ever guessed stale: the next run simply gets it. A
clean release removes the file; a killed holder leaves it, and the next run takes it over.

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
    """Another process holds the job's lock: it is running this job now.

    Attributes:
        holder: Who holds it: pid, host, start time and command, as its lock file says.
    """

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


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


def shown_command(argv: list[str]) -> str:
    """Return a command line as a lock file records it: ``--header`` values hidden.

    A header may carry a credential; the lock file and the refusal show only its name.
    """
    shown: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            arg, hide_next = arg.split(":", 1)[0] + ": ***", False
        elif arg == "--header":
            hide_next = True
        elif arg.startswith("--header="):
            arg = arg.split(":", 1)[0] + ": ***"
        shown.append(arg)
    return " ".join(shown)


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
        command: What to record as the holder's command (default: this process's argv,
            ``--header`` values hidden).

    Raises:
        JobLockedError: On enter, when another process holds the lock, naming the holder and
            what to do.
    """

    def __init__(self, output: str, *, command: str | None = None) -> None:
        self.path = lock_path(output)
        self.command = command if command is not None else shown_command(sys.argv)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock without waiting, or raise :class:`JobLockedError`."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this object")
        while self._fd is None:
            self._fd = self._try_lock()
        self._write_holder(self._fd)
        kind = filesystem_of(os.path.dirname(os.path.abspath(self.path)))
        if kind in NETWORK_FILESYSTEMS:
            log.warning(
                "the job lock %s is on a %s file system, where locks may not exclude processes "
                "on other machines; run one job per output path across machines yourself",
                self.path,
                kind,
            )

    def _try_lock(self) -> int | None:
        """Lock the file the path names now; ``None`` when it was replaced meanwhile.

        A holder removes the file on release (no lock file stays next to a finished output),
        so the file opened here may be unlinked before the lock is granted: then the lock is on
        a file nobody else sees, and the caller tries again with the path's new file.
        """
        import fcntl  # POSIX only; imported here so the module imports everywhere

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise ConfigError(f"cannot create the job lock {self.path}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _holder_text(self.path)
            raise JobLockedError(
                f"this job is already running: {self.path} is held by {holder}. Wait for it to "
                "finish (or stop it), then run again with --resume; to run a second job at the "
                "same time, give it another output path",
                holder,
            ) from None
        except OSError as error:
            os.close(fd)
            raise ConfigError(f"cannot lock {self.path}: {error.strerror}") from None
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            named = None
        mine = os.fstat(fd)
        if named is None or (named.st_dev, named.st_ino) != (mine.st_dev, mine.st_ino):
            os.close(fd)
            return None
        return fd

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
        """Release the lock and remove the lock file (a process that opened it retries)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):  # removed while still held: see _try_lock
            os.unlink(self.path)
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
