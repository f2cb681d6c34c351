"""The Ray engine's files: the rows its actors exchange, the part files, the control files.

A Ray job's rows travel as Arrow tables of five columns (:class:`JobColumns`): ``kind``
(``row`` to answer, ``ok`` an answer, ``failed`` a dead-letter record, ``stats`` a batch's
counters), ``key`` (JSON), ``line``, ``origin`` and ``payload`` (JSON bytes, exactly what the
local engine journals). :class:`FileRows` reads the input into such tables with the local
engine's own source; :class:`JobFormat` is how an actor reads and writes them; Ray's Parquet
writer stores the actors' output as part files in ``OUTPUT.ray-parts/``, which
:func:`fold_parts` moves into the job's journal. :class:`ControlDir` is the driver's channel
to the actors: a ``STOP`` file (take no new rows) and a ``FATAL`` file (the first fatal error,
written by an actor or the reader, read by the driver).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import importlib
import logging
import os
import time
from collections.abc import Hashable, Iterator, Mapping
from typing import Any

from pipeline import Pipeline, Results
from pipeline._envelope import Envelope, Failed
from pipeline._errors import ConfigError, FatalError
from pipeline._json import dumps, loads
from pipeline.jobs._journal import Journal
from pipeline.jobs._progress import JobTally, cause_text
from stages._ray import import_ray
from stages._ray_batch import BatchOutcome, RayItem
from stages.files import DeadLetterSink, open_source
from stages.files._records import encode_record, key_json
from stages.files._rows import line_of

log = logging.getLogger("pipeline.ray")

PARTS_SUFFIX = ".ray-parts"
"""The Ray engine writes part files to ``OUTPUT.ray-parts/`` while a job runs."""

STOP_FILE = "STOP"
FATAL_FILE = "FATAL"
KIND, KEY, LINE, ORIGIN, PAYLOAD = "kind", "key", "line", "origin", "payload"
COLUMNS = (KIND, KEY, LINE, ORIGIN, PAYLOAD)


def parts_dir(output: str) -> str:
    """Return the directory where the Ray engine writes the part files of ``output``."""
    return output + PARTS_SUFFIX


def key_of(value: Any) -> Hashable:
    """A row key read back from JSON (keys that were tuples come back as lists)."""
    if isinstance(value, list):
        return tuple(key_of(v) for v in value)
    key: Hashable = value
    return key


class JobColumns:
    """Rows of a Ray job's tables: ``kind``, ``key`` (JSON), line, origin, payload."""

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {n: [] for n in COLUMNS}

    def add(
        self, kind: str, key: Hashable | None, line: int | None, origin: str | None, payload: bytes
    ) -> None:
        """Add one row."""
        c = self.columns
        c[KIND].append(kind)
        c[KEY].append(None if key is None else key_json(key).decode())
        c[LINE].append(line)
        c[ORIGIN].append(origin)
        c[PAYLOAD].append(payload)

    def add_failed(self, failed: Failed) -> None:
        """Add a dead-letter record, as the local dead-letter file holds it."""
        line = line_of(failed.origin)
        line = failed.seq + 1 if line is None else line
        self.add("failed", failed.key, line, failed.origin, dead_letter_payload(failed))

    def table(self) -> Any:
        """Return the rows as an Arrow table."""
        pa = importlib.import_module("pyarrow")
        types = (pa.string(), pa.string(), pa.int64(), pa.string(), pa.binary())
        return pa.table(
            {
                name: pa.array(self.columns[name], type=kind)
                for name, kind in zip(COLUMNS, types, strict=True)
            }
        )


_DEAD_LETTER: DeadLetterSink | None = None


def dead_letter_payload(failed: Failed) -> bytes:
    """Return the dead-letter record of ``failed`` exactly as the local engine journals it."""
    global _DEAD_LETTER
    if _DEAD_LETTER is None:
        _DEAD_LETTER = DeadLetterSink("-")
    return _DEAD_LETTER.payload(Envelope(failed, failed.seq))


# -- the actors' side ------------------------------------------------------------------------


class ControlDir:
    """The driver's channel to a job's actors and reader: files in the parts directory.

    Implements :class:`~stages._ray.ActorControl`. Actors poll :meth:`stop_reason` at most
    every 0.2 s; the first fatal error wins the ``FATAL`` file.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._checked = 0.0
        self._reason: str | None = None

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def clear(self) -> None:
        """Remove a previous run's STOP and FATAL files (the driver, before a run)."""
        for name in (STOP_FILE, FATAL_FILE):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._path(name))

    def request_stop(self, reason: str) -> None:
        """Tell the actors to take no new rows (the driver)."""
        with open(self._path(STOP_FILE), "w", encoding="utf-8") as f:
            f.write(reason)

    def stop_reason(self) -> str | None:
        """Return why the actors must stop, once a STOP or FATAL file says so."""
        now = time.monotonic()
        if self._reason is not None or now - self._checked < 0.2:
            return self._reason
        self._checked = now
        if os.path.exists(self._path(FATAL_FILE)):
            self._reason = "a fatal error stopped the job"
        elif os.path.exists(self._path(STOP_FILE)):
            try:
                with open(self._path(STOP_FILE), encoding="utf-8") as f:
                    self._reason = f.read().strip() or "stop requested"
            except OSError:
                self._reason = "stop requested"
        return self._reason

    def report_fatal(self, error: BaseException) -> None:
        """Leave a fatal error's message for the driver (Ray passes on only a traceback)."""
        record = {
            "type": type(error).__name__,
            "message": str(error),
            "config": isinstance(error, ConfigError),
        }
        try:
            with open(self._path(FATAL_FILE), "x", encoding="utf-8") as f:
                f.write(dumps(record).decode())
        except FileExistsError:  # another actor said it first
            pass
        except OSError as problem:
            log.warning("cannot record the fatal error for the driver: %s", problem)

    def read_fatal(self) -> dict[str, Any] | None:
        """Return the fatal error an actor or the reader reported, if any (the driver)."""
        try:
            with open(self._path(FATAL_FILE), encoding="utf-8") as f:
                found = loads(f.read())
        except (OSError, ValueError):
            return None
        return found if isinstance(found, dict) else None


class JobFormat:
    """How a job's actors read and write batches (a :class:`~stages._ray_batch.BatchFormat`).

    Rows of kind ``row`` are run; bad rows and the reader's counters pass through as they
    are. Answers are already encoded by the job's sink stage (:class:`EncodeRows`); failures
    become dead-letter records; a ``stats`` row carries the batch's counters.
    """

    def __init__(self) -> None:
        self._cache_hits: dict[int, int] = {}  # per caller copy: hits already counted

    def decode(self, batch: Any) -> tuple[list[RayItem], JobColumns]:
        """Return the rows to answer, and the rows to pass on as they are."""
        passed = JobColumns()
        items: list[RayItem] = []
        columns = (batch.column(name).to_pylist() for name in COLUMNS)
        for kind, key, line, origin, payload in zip(*columns, strict=True):
            if kind == "row":
                items.append(RayItem(loads(payload), key_of(loads(key)), origin))
            else:
                passed.add(kind, None if key is None else key_of(loads(key)), line, origin, payload)
        return items, passed

    def encode(self, outcome: BatchOutcome, carried: JobColumns) -> Any:
        """Return the passed rows, the answers, the failures and the batch's counters."""
        out = carried
        for env in outcome.outputs:
            line = line_of(env.origin)
            out.add("ok", env.key, env.seq + 1 if line is None else line, env.origin, env.value)
        for failed in outcome.failures:
            out.add_failed(failed)
        out.add("stats", None, None, None, dumps(self._counters(outcome)))
        return out.table()

    def _counters(self, outcome: BatchOutcome) -> dict[str, Any]:
        tally = JobTally()
        caller = outcome.caller
        if outcome.report is not None and caller is not None:
            tally.add_caller_stats(outcome.report.stages, caller.name)
        if caller is not None:  # the copy's totals grow over the batches it runs
            hits = caller.totals.cache_hits
            tally.cache_hits = hits - self._cache_hits.get(id(caller), 0)
            self._cache_hits[id(caller)] = hits
        counters = tally.counters()
        counters["stopped"] = outcome.stopped
        return counters


# -- reading the input -----------------------------------------------------------------------


class FileRows:
    """A Ray datasource reading a job's input with the local engine's own source.

    One read task per input file streams blocks of ``rows_per_block`` rows: each row is its
    key, line, origin and the record as JSON (so Arrow infers no types), bad rows are already
    dead-letter records, and rows a previous run finished are skipped.
    """

    def __init__(
        self,
        path: str,
        *,
        fmt: str | None,
        id_field: str | None,
        delimiter: str | None = None,
        skip: Any,
        rows_per_block: int,
        control: ControlDir | None = None,
        encoding: str = "utf-8",
    ) -> None:
        self.path = path
        self.fmt = fmt
        self.delimiter = delimiter
        self.encoding = encoding
        self.id_field = id_field
        self.skip = skip
        self.rows_per_block = rows_per_block
        self.control = control

    def datasource(self) -> Any:
        """Return the ``ray.data.Datasource`` (built here: Ray is imported lazily)."""
        import_ray()
        from ray.data.block import BlockMetadata
        from ray.data.datasource import Datasource, ReadTask

        reader = self

        class FileRowsDatasource(Datasource):
            def estimate_inmemory_data_size(self) -> int | None:
                try:
                    return os.path.getsize(reader.path)
                except OSError:
                    return None

            def get_read_tasks(
                self,
                parallelism: int,
                per_task_row_limit: int | None = None,
                data_context: Any = None,
            ) -> list[Any]:
                metadata = BlockMetadata(
                    num_rows=None,
                    size_bytes=self.estimate_inmemory_data_size(),
                    exec_stats=None,
                    input_files=(reader.path,),
                )
                return [ReadTask(reader.blocks, metadata)]

            @property
            def name(self) -> str:
                return "LLMJobInput"

        make: Any = FileRowsDatasource  # Ray's constructor is untyped
        return make()

    def blocks(self) -> Iterator[Any]:
        """Yield the file's rows as blocks (runs in a Ray read task)."""
        try:
            yield from self._blocks()
        except (FatalError, ConfigError) as error:  # an unreadable file or CSV header
            if self.control is not None:
                self.control.report_fatal(error)
            raise

    def _blocks(self) -> Iterator[Any]:
        from anyio.from_thread import start_blocking_portal

        failures: collections.deque[Failed] = collections.deque()
        source = open_source(
            self.path,
            fmt=self.fmt,
            id_field=self.id_field,
            skip_lines=self.skip,
            delimiter=self.delimiter,
            encoding=self.encoding,
        )
        pipe = Pipeline(source, dead_letter=failures.append, name="ray-read")
        size = self.rows_per_block

        async def take(results: Results[Any]) -> list[Envelope[Any]]:
            taken: list[Envelope[Any]] = []
            async for env in results.envelopes():
                taken.append(env)
                if len(taken) >= size:
                    break
            return taken

        def block(envs: list[Envelope[Any]], last: bool) -> Any:
            out = JobColumns()
            for env in envs:
                out.add("row", env.key, line_of(env.origin), env.origin, dumps(env.value))
            while failures:
                out.add_failed(failures.popleft())
            if last:  # the rows read, done ones included: what the final check expects
                rows = source.emitted + source.rejected + source.skipped
                stats = {"skipped": source.skipped, "rows": rows}
                out.add("stats", None, None, None, dumps(stats))
            return out.table()

        with (
            start_blocking_portal() as portal,
            portal.wrap_async_context_manager(pipe.open()) as results,
        ):
            while envs := portal.call(take, results):
                yield block(envs, last=False)
        yield block([], last=True)  # the bad rows left, and how many rows were skipped


# -- part files ------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class PartsTally(JobTally):
    """What folding part files found: the run's tally, plus why actors stopped, duplicates.

    Attributes:
        stopped: Why an actor stopped taking rows (a budget share, a stop, a fatal error).
        duplicates: Rows already in the journal (a part folded before a crash deleted it).
        reader_skipped: Rows the reader skipped as done by an earlier run, once it said so.
        reader_rows: The input's rows (done, bad and skipped ones included), once the reader
            read to the end and said so: the number the journal's final check expects.
    """

    stopped: str | None = None
    duplicates: int = 0
    reader_skipped: int | None = None
    reader_rows: int | None = None

    def add_stats(self, stats: Mapping[str, Any]) -> None:
        """Add one ``stats`` row (a batch's counters, or the reader's)."""
        self.stopped = self.stopped or stats.get("stopped")
        if "skipped" in stats:
            self.reader_skipped = (self.reader_skipped or 0) + int(stats["skipped"])
        if "rows" in stats:  # every whole read counts the same rows (a retried read too)
            self.reader_rows = max(self.reader_rows or 0, int(stats["rows"]))
        self.add_counters(stats)


def _part_files(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "**", "*.parquet"), recursive=True))


def has_parts(directory: str) -> bool:
    """Whether ``directory`` holds part files (an interrupted Ray run's answers)."""
    return bool(_part_files(directory))


def _payload_cause(payload: bytes) -> str:
    error = loads(payload).get("error") or {}
    return cause_text(str(error.get("type") or "Error"), error.get("status"))


def _fold_table(table: Any, journal: Journal, tally: PartsTally | None) -> None:
    """Append one part file's new rows to the journals; count them."""
    ok: list[bytes] = []
    dead: list[bytes] = []
    tally = tally if tally is not None else PartsTally()
    columns = [table.column(n).to_pylist() for n in (KIND, KEY, LINE, PAYLOAD)]
    for kind, key_text, line, payload in zip(*columns, strict=True):
        if kind == "stats":
            tally.add_stats(loads(payload))
            continue
        key = key_of(loads(key_text))
        if not journal.done.add(int(line)):
            tally.duplicates += 1
            continue
        record = encode_record(int(line), key, payload)
        if kind == "ok":
            ok.append(record)
            tally.ok += 1
        else:
            dead.append(record)
            tally.failed += 1
            tally.count_cause(_payload_cause(payload))
    if ok:
        journal.output.append(b"".join(ok), len(ok))
    if dead:
        journal.dead_letter.append(b"".join(dead), len(dead))
    journal.output.sync()
    journal.dead_letter.sync()


def fold_parts(directory: str, journal: Journal, tally: PartsTally | None = None) -> None:
    """Move every complete part file's rows into the job's journals, then delete the file.

    A part file that cannot be read (a writer killed mid-file) is deleted: its rows have no
    record anywhere, so they are sent again. A key already in the journal (a part folded
    before a crash deleted it) is not appended twice.
    """
    pq = importlib.import_module("pyarrow.parquet")
    journal.output.open()
    journal.dead_letter.open()
    for path in _part_files(directory):
        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises ArrowInvalid for a torn file
            log.warning("part file %s is incomplete (%s): its rows are sent again", path, error)
            os.remove(path)
            continue
        _fold_table(table, journal, tally)
        os.remove(path)


def count_parts(directory: str, seen: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """Count answered and failed rows in the part files written so far (for progress)."""
    pq = importlib.import_module("pyarrow.parquet")
    for path in _part_files(directory):
        if path in seen:
            continue
        try:
            kinds = pq.read_table(path, columns=[KIND]).column(KIND).to_pylist()
        except Exception:  # still being written
            continue
        seen[path] = (kinds.count("ok"), kinds.count("failed"))
    return sum(v[0] for v in seen.values()), sum(v[1] for v in seen.values())


__all__ = [
    "PARTS_SUFFIX",
    "ControlDir",
    "FileRows",
    "JobColumns",
    "JobFormat",
    "PartsTally",
    "count_parts",
    "dead_letter_payload",
    "fold_parts",
    "has_parts",
    "key_of",
    "parts_dir",
]
