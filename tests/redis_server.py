"""Test helpers: a real ``redis-server`` on 127.0.0.1, and a worker process for shared limits.

``RedisServer`` starts the binary on a free port in a temporary directory, waits for its
"Ready to accept connections" line (no polling) and kills it on ``stop()``.

Run as a script, this module is one worker process of the multi-process test::

    python tests/redis_server.py URL RPM SECONDS

It prints ``ready``, waits for a line on stdin, then acquires turns from a shared
``RedisRateLimiter`` for SECONDS, printing the monotonic time of each turn, then ``done``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO

READY = "Ready to accept connections"


def redis_server_binary() -> str | None:
    """Return the path of ``redis-server``, or ``None`` when it is not installed."""
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _drain(stream: IO[str]) -> None:
    for _ in stream:
        pass


class RedisServer:
    """A throw-away ``redis-server`` bound to 127.0.0.1."""

    def __init__(self, *, password: str | None = None) -> None:
        self.password = password
        self.port = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[str] | None = None
        self._drain: threading.Thread | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self._dir = tempfile.TemporaryDirectory(prefix="llmpipe-redis-")
        last_output = ""
        for _ in range(5):  # another process may grab the free port first
            self.port = _free_port()
            command = [
                binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", self._dir.name,
                "--save", "",
                "--appendonly", "no",
                "--logfile", "",
            ]  # fmt: skip
            if self.password:
                command += ["--requirepass", self.password]
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            assert process.stdout is not None
            lines = []
            for line in process.stdout:  # blocks until redis says something or exits
                lines.append(line)
                if READY in line:
                    self._process = process
                    # keep reading so a full pipe never blocks the server's logging
                    self._drain = threading.Thread(
                        target=_drain, args=(process.stdout,), daemon=True
                    )
                    self._drain.start()
                    return self
            process.wait()
            process.stdout.close()
            last_output = "".join(lines)
        self._dir.cleanup()
        raise RuntimeError(f"redis-server did not start:\n{last_output}")

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            if self._drain is not None:
                self._drain.join(timeout=5)
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None

    def stop(self) -> None:
        self.kill()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


async def _worker(url: str, rpm: float, seconds: float) -> None:
    import time

    import anyio

    from stages.llm._redis_limiter import RedisRateLimiter

    limiter = RedisRateLimiter.from_url(
        url, rpm=rpm, provider="test", api_key="sk-test-shared", model="m"
    )
    async with limiter:
        await limiter._client.ping()  # connect before the start signal
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await limiter.acquire()
            print(f"{time.monotonic():.6f}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import anyio

    anyio.run(_worker, sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))
