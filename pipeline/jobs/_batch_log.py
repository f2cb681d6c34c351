r"""The batch engine's durable state: which rows are in which batch, and where each batch is.

A job run with ``batch_api`` keeps, next to its output (besides the usual journals)::

    OUTPUT.batches/              one directory per job
        log.jsonl                the batch log: one event per line, fsynced before moving on
        chunk-000001.requests    the batch's request file, as uploaded
        chunk-000001.rows        the batch's rows: {"line", "key", "origin", "attempt", "row"}

Rows go into *chunks*, one chunk per provider batch. The log starts with the job's id (sent
as batch metadata, to find a batch whose creation answer was lost), then has a chunk's events
in the order it goes through them::

    {"event": "job", "id": "6f1c..."}
    {"event": "chunk", "chunk": 1, "rows": 50000, "attempt": 1, "online": false,
     "retry_of": null}
    {"event": "uploaded", "chunk": 1, "file": "file-abc"}            OpenAI only
    {"event": "creating", "chunk": 1, "at": 1767225600.0}
    {"event": "created", "chunk": 1, "batch": "batch_abc"}
    {"event": "cancel", "chunk": 1}                                  --cancel-batches
    {"event": "ended", "chunk": 1, "status": "completed"}

**The rules that make resume exactly-once.** A chunk's files are complete and fsynced before its
``chunk`` event is written; from then on its rows belong to it (a resumed source skips them)
and are never put in another chunk, except the ones its results send to a retry chunk, which
is recorded (``chunk`` with ``attempt`` + 1) *before* the chunk is marked ``ended``. A chunk is
uploaded at most once per ``uploaded`` event and created after a ``creating`` event: a resume
that finds ``creating`` without ``created`` first looks for the batch on the provider
(:meth:`~stages.llm._batch_api.BatchClient.find`: OpenAI by the metadata it was created with,
Anthropic by its request count and creation time) and creates it only if there is none. A
batch's results are written to the job's journals and fsynced before ``ended``; a resume that
reads them again skips the rows already journaled. A torn last line (kill -9 mid-write) is
dropped: the step it recorded is redone, and each step is safe to redo.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Hashable, Iterator
from typing import Any

from pipeline._errors import ConfigError
from pipeline._json import dumps, loads
from stages.files._records import LineSet, fsync_dir

LOG_NAME = "log.jsonl"
DIR_SUFFIX = ".batches"


@dataclasses.dataclass
class Chunk:
    """One provider batch of the job, as the log tells it.

    Attributes:
        number: The chunk's number (1, 2...).
        rows: How many rows it holds.
        attempt: Which attempt this is for its rows (1 for a first batch, 2 for a retry...).
        online: Whether its rows are sent online (``batch_fallback="online"``) instead.
        file_id: OpenAI: the uploaded request file.
        creating_at: When a create request was first sent (Unix time).
        batch_id: The provider's batch id, once created.
        cancel: Whether ``--cancel-batches`` cancelled it.
        retry_of: The chunk whose unanswered rows it sends again, if it is a retry.
        status: The provider's final status, once ended.
    """

    number: int
    rows: int
    attempt: int = 1
    online: bool = False
    file_id: str | None = None
    creating_at: float | None = None
    batch_id: str | None = None
    cancel: bool = False
    status: str | None = None
    retry_of: int | None = None

    @property
    def ended(self) -> bool:
        """Whether every row of the chunk has its outcome journaled or moved on."""
        return self.status is not None


class BatchLog:
    """The batch log and chunk files of one job (see the module documentation).

    Args:
        output: The job's output path; the state lives in ``OUTPUT.batches/``.
    """

    def __init__(self, output: str) -> None:
        self.directory = output + DIR_SUFFIX
        self.path = os.path.join(self.directory, LOG_NAME)
        self.chunks: dict[int, Chunk] = {}
        self._allocated = 0
        self.job_id = ""
        self._file: Any = None

    def __repr__(self) -> str:
        return f"BatchLog({self.directory!r}, chunks={len(self.chunks)})"

    # -- opening -----------------------------------------------------------------------------

    def open(self, *, fresh: bool) -> None:
        """Start a new log (``fresh``: deleting any old one), or replay the existing one."""
        if fresh and os.path.isdir(self.directory):
            shutil.rmtree(self.directory)
        os.makedirs(self.directory, exist_ok=True)
        self.chunks = {}
        if os.path.exists(self.path):
            self._replay()
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed by close()
        self._drop_orphans()
        fsync_dir(self.directory)
        if not self.job_id:
            self.record({"event": "job", "id": uuid.uuid4().hex})

    def _replay(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        good = data.rfind(b"\n") + 1
        if good < len(data):  # a torn last line: the step it recorded is redone
            with open(self.path, "r+b") as f:
                f.truncate(good)
        for number, raw in enumerate(data[:good].splitlines(), start=1):
            try:
                event = json.loads(raw)
                self._apply(event)
            except (ValueError, KeyError, TypeError) as error:
                raise ConfigError(
                    f"batch log {self.path!r} line {number} is damaged ({error});"
                    " use --overwrite to start over"
                ) from None

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "job":
            self.job_id = str(event["id"])
            return
        number = int(event["chunk"])
        if kind == "chunk":
            self.chunks[number] = Chunk(
                number, int(event["rows"]), int(event.get("attempt", 1)), bool(event["online"])
            )
            retry_of = event.get("retry_of")
            self.chunks[number].retry_of = int(retry_of) if retry_of is not None else None
            return
        chunk = self.chunks[number]
        if kind == "uploaded":
            chunk.file_id = str(event["file"])
        elif kind == "creating":
            chunk.creating_at = chunk.creating_at or float(event["at"])
        elif kind == "created":
            chunk.batch_id = str(event["batch"])
        elif kind == "cancel":
            chunk.cancel = True
        elif kind == "ended":
            chunk.status = str(event["status"])

    def _drop_orphans(self) -> None:
        """Delete chunk files without a ``chunk`` event (a crash while writing them)."""
        for name in os.listdir(self.directory):
            if name.startswith("chunk-"):
                number = int(name.split("-")[1].split(".")[0])
                if number not in self.chunks:
                    os.remove(os.path.join(self.directory, name))

    def close(self) -> None:
        """Close the log (fsynced)."""
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def remove(self) -> None:
        """Delete the whole state (the job is published)."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- writing -----------------------------------------------------------------------------

    def record(self, event: dict[str, Any]) -> None:
        """Append one event and fsync it (the step it records is then durable)."""
        if self._file is None:
            raise RuntimeError("the batch log is not open")
        self._file.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._apply(event)

    def allocate(self) -> int:
        """Return a number for a new chunk (unique among recorded and allocated ones)."""
        self._allocated = max(self._allocated, max(self.chunks, default=0)) + 1
        return self._allocated

    def requests_path(self, number: int) -> str:
        """Return the path of chunk ``number``'s request file."""
        return os.path.join(self.directory, f"chunk-{number:06d}.requests")

    def rows_path(self, number: int) -> str:
        """Return the path of chunk ``number``'s rows file."""
        return os.path.join(self.directory, f"chunk-{number:06d}.rows")

    # -- reading -----------------------------------------------------------------------------

    def retries_of(self, number: int) -> list[int]:
        """Return the chunks recorded to send chunk ``number``'s unanswered rows again."""
        return [c.number for c in self.chunks.values() if c.retry_of == number]

    def rows_of(self, number: int) -> set[str]:
        """Return the ``custom_id`` of chunk ``number``'s rows."""
        return {row.custom_id for row in read_rows(self.rows_path(number))}

    def open_chunks(self) -> list[Chunk]:
        """Return the chunks not ended yet, oldest first."""
        return [c for c in self.chunks.values() if not c.ended]

    def claimed(self) -> LineSet:
        """Return the lines of the rows in chunks not ended (a resumed source skips them)."""
        lines = LineSet()
        for chunk in self.open_chunks():
            for row in read_rows(self.rows_path(chunk.number)):
                lines.add(row.line)
        return lines


@dataclasses.dataclass(slots=True)
class SpooledRow:
    """One row as a chunk holds it.

    Attributes:
        line: Its line in the input.
        key: Its key (id field or line).
        origin: ``"file:line"``.
        attempt: The attempt its chunk makes for it.
        row: The row itself.
    """

    line: int
    key: Hashable
    origin: str | None
    attempt: int
    row: Any

    @property
    def custom_id(self) -> str:
        """The id the row's request carries in the batch (unique in the input)."""
        return f"r{self.line}"

    def to_bytes(self) -> bytes:
        """Return the row as one line of a rows file."""
        key = list(self.key) if isinstance(self.key, tuple) else self.key
        data = {"line": self.line, "key": key, "origin": self.origin, "attempt": self.attempt}
        data["row"] = self.row
        return dumps(data) + b"\n"


def read_rows(path: str) -> Iterator[SpooledRow]:
    """Yield the rows of a chunk's rows file, in the order they were written."""
    with open(path, "rb") as f:
        for raw in f:
            data = loads(raw)
            key = data["key"]
            yield SpooledRow(
                int(data["line"]),
                tuple(key) if isinstance(key, list) else key,
                data.get("origin"),
                int(data.get("attempt", 1)),
                data["row"],
            )
