"""A persistent response cache for LLM requests (``--cache DIR``), shared safely by processes.

Entries live in one SQLite database (stdlib :mod:`sqlite3`) in write-ahead-log mode, so
readers never block the writer and two jobs may share a directory: SQLite's file locks order
their writes and a busy timeout makes each wait its turn instead of failing (two openers of a
new directory, whom SQLite refuses rather than makes wait, try again until that timeout).
Every call runs in a worker thread with its own connection, so the event loop never waits on
the disk.

The key of a request is the SHA-256 of its method, scheme and host (the base URL), path,
query (minus anything that looks like a credential) and body as canonical JSON (sorted keys,
no whitespace): two requests share an entry exactly when they ask the same endpoint the same
thing with the same model and parameters, whatever the order of their keys. The API key is
never part of it: it travels in headers, and credential-like query parameters and URL
user-info are dropped before hashing, so a cache can be shared between keys.

:mod:`sqlite3` is imported when a cache is opened: the request key is computed for any job, a
job without a cache never loads SQLite.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import anyio
import anyio.to_thread

from pipeline._errors import ConfigError, FatalError

if TYPE_CHECKING:
    import sqlite3

_SECRET_PARAMS = frozenset(
    {
        "key",
        "api_key",
        "api-key",
        "apikey",
        "access_token",
        "token",
        "auth",
        "authorization",
        "sig",
        "signature",
        "code",
        "secret",
        "client_secret",
        "password",
    }
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    created REAL NOT NULL
)
"""


def _is_busy(error: sqlite3.OperationalError) -> bool:
    """Tell whether ``error`` means another connection holds the lock (worth waiting out)."""
    code = getattr(error, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED and their extended codes
    return "locked" in str(error) or "busy" in str(error)


def _set_up(conn: sqlite3.Connection, deadline: float) -> None:
    """Put a new connection in WAL mode and make sure the table exists, waiting out others.

    Switching a database to WAL needs an exclusive lock, and when two connections both hold
    a shared lock and want it, SQLite answers one of them "database is locked" at once rather
    than calling its busy handler (waiting could deadlock). Two processes opening a new cache
    directory together meet exactly that, so the set-up (idempotent) is tried again, with a
    growing pause, until ``deadline`` (the cache's busy timeout).
    """
    import sqlite3

    pause = 0.001
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
            return
        except sqlite3.OperationalError as error:
            if not _is_busy(error) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)  # a retry's back-off (the opening thread's), not synchronisation
        pause = min(pause * 2, 0.05)


def request_key(url: str, body: Mapping[str, Any] | None, method: str = "POST") -> str:
    """Return the cache key of a request: a SHA-256 hex digest of what defines its answer.

    Args:
        url: The full request URL (base URL and path; a query string is included minus
            credential-like parameters).
        body: The JSON body (any key order); ``None`` for a request without one.
        method: The HTTP method.
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    query = sorted(
        (name, value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
        if name.lower() not in _SECRET_PARAMS
    )
    canonical = json.dumps(
        {
            "method": method.upper(),
            "scheme": parts.scheme.lower(),
            "host": host,
            "path": parts.path or "/",
            "query": urlencode(query),
            "body": body,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


class ResponseCache:
    """Answers of earlier requests, on disk; ``get`` before sending, ``put`` after.

    Use one instance per process (``async with ResponseCache(dir) as cache``, or call
    :meth:`aclose`); any number of processes may share the directory.

    Args:
        directory: Where the database lives (created if missing).
        timeout: Seconds a call waits for another process's write to finish.

    Attributes:
        hits: Lookups that found an answer.
        misses: Lookups that found none.
        writes: Answers stored.
    """

    FILENAME = "responses.sqlite3"
    request_key = staticmethod(request_key)

    def __init__(self, directory: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        import sqlite3

        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, self.FILENAME)
        self.timeout = timeout
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._limiter = anyio.CapacityLimiter(4)
        self._closed = False
        try:
            os.makedirs(self.directory, exist_ok=True)
            self._connect()  # fail early, in the caller's thread, with a clear message
        except (OSError, sqlite3.Error) as error:
            raise ConfigError(
                f"cannot open the response cache in {self.directory!r}: {error}"
            ) from error

    def __repr__(self) -> str:
        return f"ResponseCache({self.directory!r}, hits={self.hits}, misses={self.misses})"

    async def __aenter__(self) -> ResponseCache:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _connect(self) -> sqlite3.Connection:
        import sqlite3

        if self._closed:
            raise RuntimeError(f"the response cache {self.path!r} is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        conn = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        try:
            _set_up(conn, time.monotonic() + self.timeout)
        except BaseException:
            conn.close()
            raise
        self._local.conn = conn
        with self._lock:
            self._connections.append(conn)
        return conn

    def get_sync(self, key: str) -> bytes | None:
        """Return the stored answer for ``key``, or ``None`` (blocking; prefer :meth:`get`)."""
        row = (
            self._connect().execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        )
        with self._lock:
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
        return bytes(row[0])

    def put_sync(self, key: str, value: bytes) -> None:
        """Store ``value`` as the answer for ``key`` (blocking; prefer :meth:`put`)."""
        self._connect().execute(
            "INSERT OR REPLACE INTO responses (key, value, created) VALUES (?, ?, ?)",
            (key, bytes(value), time.time()),
        )
        with self._lock:
            self.writes += 1

    async def get(self, key: str) -> bytes | None:
        """Return the stored answer for ``key``, or ``None``.

        Raises:
            FatalError: The database cannot be read (a broken or foreign file).
        """
        import sqlite3

        try:
            return await anyio.to_thread.run_sync(self.get_sync, key, limiter=self._limiter)
        except sqlite3.Error as error:
            raise FatalError(f"response cache {self.path!r} cannot be read: {error}") from error

    async def put(self, key: str, value: bytes) -> None:
        """Store ``value`` as the answer for ``key``.

        Raises:
            FatalError: The database cannot be written (disk full, read-only directory).
        """
        import sqlite3

        try:
            await anyio.to_thread.run_sync(self.put_sync, key, value, limiter=self._limiter)
        except sqlite3.Error as error:
            raise FatalError(f"response cache {self.path!r} cannot be written: {error}") from error

    def __len__(self) -> int:
        row = self._connect().execute("SELECT COUNT(*) FROM responses").fetchone()
        return int(row[0])

    def close(self) -> None:
        """Close every connection (blocking); the cache cannot be used afterwards."""
        import sqlite3

        self._closed = True
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    async def aclose(self) -> None:
        """Close every connection."""
        await anyio.to_thread.run_sync(self.close, limiter=self._limiter)
