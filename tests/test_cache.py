"""The response cache: hits and misses, canonical keys, persistence, two processes at once."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anyio
import pytest

from pipeline import ConfigError, FatalError
from stages.llm._cache import ResponseCache, _set_up, request_key

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
URL = "https://api.openai.com/v1/chat/completions"
BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello to Ada"}],
    "temperature": 0.2,
}


async def test_miss_then_hit_and_counters(tmp_path: Path) -> None:
    async with ResponseCache(tmp_path / "cache") as cache:
        key = cache.request_key(URL, BODY)
        assert await cache.get(key) is None
        await cache.put(key, b'{"answer": "Hello, Ada"}')
        assert await cache.get(key) == b'{"answer": "Hello, Ada"}'
        await cache.put(key, b"newer")  # the last answer stored wins
        assert await cache.get(key) == b"newer"
        assert (cache.hits, cache.misses, cache.writes) == (2, 1, 2)
        assert len(cache) == 1


async def test_entries_persist_across_instances(tmp_path: Path) -> None:
    async with ResponseCache(tmp_path) as first:
        for i in range(20):
            await first.put(request_key(URL, {**BODY, "seed": i}), b"%d" % i)
    async with ResponseCache(tmp_path) as second:
        assert await second.get(request_key(URL, {**BODY, "seed": 7})) == b"7"
        assert len(second) == 20


def test_key_ignores_key_order_and_credentials() -> None:
    key = request_key(URL, BODY)
    reordered = {"temperature": 0.2, "messages": BODY["messages"], "model": "gpt-4o-mini"}
    assert request_key(URL, reordered) == key
    assert len(key) == 64 and int(key, 16) >= 0
    # host case, default port spelled out or not, user-info and credential query parameters
    assert request_key("https://API.openai.com/v1/chat/completions", BODY) == key
    assert request_key("https://user:sk-secret@api.openai.com/v1/chat/completions", BODY) == key
    gemini = "https://generativelanguage.googleapis.com/v1beta/models/g:generateContent"
    assert request_key(gemini + "?key=AIza-one", BODY) == request_key(
        gemini + "?key=AIza-two", BODY
    )
    assert request_key(URL + "?api-version=2024-06-01&api_key=x", BODY) == request_key(
        URL + "?api-version=2024-06-01", BODY
    )


def test_key_changes_with_anything_that_changes_the_answer() -> None:
    key = request_key(URL, BODY)
    different = [
        request_key(URL, {**BODY, "model": "gpt-4o"}),
        request_key(URL, {**BODY, "temperature": 0.3}),
        request_key(URL, {**BODY, "max_tokens": 10}),
        request_key(URL, {**BODY, "messages": [{"role": "user", "content": "Say hello to Bob"}]}),
        request_key("https://other.example/v1/chat/completions", BODY),
        request_key("https://api.openai.com/v2/chat/completions", BODY),
        request_key("http://api.openai.com/v1/chat/completions", BODY),
        request_key("https://api.openai.com:8443/v1/chat/completions", BODY),
        request_key(URL + "?api-version=2024-06-01", BODY),
        request_key(URL, BODY, method="PUT"),
        request_key(URL, None),
    ]
    assert key not in different
    assert len(set(different)) == len(different)


WRITER = textwrap.dedent(
    """
    import sys
    import anyio
    from stages.llm._cache import ResponseCache, _set_up, request_key

    directory, start, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    async def main():
        async with ResponseCache(directory) as cache:
            print("open", flush=True)
            sys.stdin.readline()  # wait until the other process is ready too
            async with anyio.create_task_group() as tg:
                for i in range(start, start + count):
                    tg.start_soon(cache.put, request_key("https://h/x", {"i": i}), b"%d" % i)
            for i in range(0, 2 * count):
                await cache.get(request_key("https://h/x", {"i": i}))
        print("done", cache.hits, flush=True)

    anyio.run(main)
    """
)


def test_two_processes_share_a_cache_directory(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    directory = tmp_path / "cache"
    count = 200
    outputs = []
    with contextlib.ExitStack() as stack:  # a failed assertion still reaps both children
        children = []
        for start in (0, count):
            child = subprocess.Popen(
                [sys.executable, str(script), str(directory), str(start), str(count)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
            stack.enter_context(child)
            stack.callback(_kill_if_running, child)
            children.append(child)
        for child in children:
            assert child.stdout is not None and child.stdout.readline() == b"open\n"
        for child in children:  # both are open: let them write at the same time
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            child.stdin.close()
        for child in children:
            assert child.stdout is not None
            outputs.append(child.stdout.read())
            assert child.wait(timeout=60) == 0
    assert all(out.startswith(b"done ") for out in outputs)
    cache = ResponseCache(directory)
    try:
        assert len(cache) == 2 * count
        for i in range(2 * count):
            assert cache.get_sync(request_key("https://h/x", {"i": i})) == b"%d" % i
    finally:
        cache.close()


def _kill_if_running(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.kill()


def _open_together(directory: Path, openers: int) -> list[BaseException]:
    """Open ``openers`` caches on ``directory`` from as many threads released at once."""
    barrier = threading.Barrier(openers)
    caches: list[ResponseCache] = []
    errors: list[BaseException] = []

    def open_cache() -> None:
        barrier.wait()
        try:
            caches.append(ResponseCache(directory))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=open_cache) for _ in range(openers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for cache in caches:
        cache.close()
    return errors


def test_many_openers_of_a_new_directory_at_once_all_get_the_cache(tmp_path: Path) -> None:
    # Two connections that both want the exclusive lock WAL mode needs get "database is
    # locked" at once, not after the busy timeout: before the set-up retried, about one
    # trial in 20 here had an opener fail.
    for trial in range(100):
        assert _open_together(tmp_path / str(trial), openers=6) == [], f"trial {trial}"


class _Connection:
    """Stands in for a sqlite3 connection whose first statements find the database busy."""

    def __init__(self, failures: list[sqlite3.OperationalError]) -> None:
        self.failures = failures
        self.statements: list[str] = []

    def execute(self, statement: str) -> None:
        self.statements.append(statement.split()[0])
        if self.failures:
            raise self.failures.pop(0)


def test_set_up_waits_out_a_busy_database_but_not_other_errors() -> None:
    locked = sqlite3.OperationalError("database is locked")
    conn = _Connection([locked, locked])
    _set_up(conn, time.monotonic() + 10)  # type: ignore[arg-type]
    assert conn.statements == ["PRAGMA", "PRAGMA", "PRAGMA", "PRAGMA", "CREATE"]

    other = sqlite3.OperationalError("disk I/O error")
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        _set_up(_Connection([other]), time.monotonic() + 10)  # type: ignore[arg-type]

    forever = _Connection([locked] * 1000)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _set_up(forever, time.monotonic() + 0.2)  # type: ignore[arg-type]
    assert 1 < len(forever.statements) < 1000


async def test_unusable_directory_and_broken_database(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot open the response cache"):
        ResponseCache(blocker)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / ResponseCache.FILENAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="cannot open the response cache"):
        ResponseCache(broken)


async def test_closed_cache_refuses(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path)
    await cache.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await cache.get("k")
    with anyio.fail_after(5):
        await cache.aclose()  # twice is fine


async def test_database_errors_while_running_are_fatal_and_name_the_file(tmp_path: Path) -> None:
    async with ResponseCache(tmp_path) as cache:
        await cache.put("k", b"v")
        import sqlite3

        other = sqlite3.connect(cache.path)
        other.execute("DROP TABLE responses")
        other.execute("CREATE TABLE responses (key TEXT)")  # a foreign schema
        other.commit()
        other.close()
        with pytest.raises(FatalError, match=r"responses\.sqlite3.* cannot be read"):
            await cache.get("k")
        with pytest.raises(FatalError, match="cannot be written"):
            await cache.put("k", b"v")
