r"""Exactly-once file jobs: journals, a checkpoint manifest, resume and atomic publish.

A file job reads an input file and writes each row's result to ``OUTPUT`` or, when the row
fails, a record to the dead-letter file ``DEAD`` (by default ``OUTPUT.failed.jsonl``). The
promise: after any number of crashes (``kill -9`` at any instant) and resumes, the published
files hold exactly one output row or one dead-letter record per input key, and a crash costs
at most the requests that were in flight.

Files, while the job runs (nothing is written under the final names until it completes)::

    OUTPUT.partial           journal of finished rows
    DEAD.partial             journal of dead-lettered rows
    OUTPUT.checkpoint.json   manifest: state and job fingerprint

**Journal records.** Each journal line is one finished row::

    <line>\t<key as JSON>\t<payload as JSON>\n

``line`` is the row's 1-based position in the input (used to restore input order), ``key``
its identity (the id field's value, or the line number), ``payload`` the output row or the
dead-letter record. JSON text never contains a raw tab or newline, so a record splits without
parsing its payload, and a record is complete exactly when its line ends in ``\n``. Sinks
append whole chunks of records and flush them to the OS after every chunk, so a killed process
keeps every record it wrote; they ``fsync`` every N rows or T seconds and at the end, which
bounds what a power loss can take. A record is the row's commit point: a row whose record is
in a journal is never sent again; a row without one is sent again on resume (at most the rows
that were in flight).

**Manifest.** ``OUTPUT.checkpoint.json`` holds the format version, the state (``running`` or
``publishing``), the job's settings (prompt, system prompt, model, endpoint, output field, id
field... whatever the caller passes as ``settings``; never put secrets there) and the input's
fingerprint: its absolute path, size, and the SHA-256 of its first and last MiB. Hashing the
ends rather than trusting the modification time means copying or touching the file does not
block a resume, while appending, truncating or rewriting it (the usual ways an input changes)
is caught in O(1) time for any file size; an edit that keeps the size and leaves both ends
untouched is not detected. Standard input cannot be fingerprinted; resuming a job that read
stdin trusts the caller to feed the same data. The manifest is written atomically (temporary
file, fsync, rename, fsync of the directory) *before* the journals are created, so a journal
without a manifest was not made by a job and is never touched without ``overwrite``.

**Resume.** :meth:`Journal.open` with ``resume=True`` compares the stored fingerprint with the
current one and refuses (:class:`ResumeError`, naming every setting that differs) on any
difference. It then repairs each journal: a torn last record (no final newline, or garbage
such as the zeros a power loss can leave) is truncated; a bad record followed by good ones is
corruption and is refused rather than guessed at. The keys of both journals become
:attr:`Journal.done`, which the source receives as ``skip_keys``. Without ``resume`` an
existing manifest or journal is an error that suggests ``--resume`` or ``--overwrite``;
``overwrite=True`` deletes them and starts over. ``resume=True`` with nothing to resume starts
a fresh job.

**Publish.** :meth:`Journal.commit` converts each journal into its final format (JSONL by
byte copy, CSV or Parquet through the sink's writer) in a temporary file next to the final
name, fsyncs it, marks the manifest ``publishing``, renames the files into place with
``os.replace`` (dead letters first, then the output), fsyncs the directories, then deletes the
journals and the manifest. A crash before the manifest says ``publishing`` leaves the journals
intact (the next resume re-publishes); a crash after it is finished by the next
:meth:`Journal.open` with ``resume=True``, which reports :attr:`Journal.complete`. A reader
therefore sees either the previous file or the complete new one under the final name. When
a job has no dead letters and no dead-letter file exists, none is created.

**Order.** Rows reach the journal in completion order. With ``ordered=True`` the commit
restores input order by line number: a single pass finds the ascending runs of the journal
(an ordered run appends one ascending run per resume), merges up to 64 of them directly, and
otherwise sorts chunks of a bounded size into temporary files and merges those, in as many
passes as needed. Memory stays bounded by the chunk size whatever the file size.

**Memory.** The done keys of a resumed job are held in memory: line numbers in a bitmap (one
bit per line, 125 KB per million rows), other keys (id values) in a set, roughly 60-100 bytes
per key. The journal assumes each key produces exactly one output row or one dead-letter
record (1:1 stages), which is what a file job does.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import heapq
import importlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Container, Hashable, Iterable, Iterator, Mapping
from typing import IO, Any, BinaryIO

from ._errors import ConfigError, FatalError

log = logging.getLogger("pipeline.journal")

FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
MANIFEST_SUFFIX = ".checkpoint.json"
PUBLISH_SUFFIX = ".publishing"
DEAD_LETTER_SUFFIX = ".failed.jsonl"
_FINGERPRINT_BYTES = 1 << 20

_orjson: Any
try:
    _orjson = importlib.import_module("orjson")
except ImportError:  # pragma: no cover - orjson is an optional speed-up
    _orjson = None

PathLike = str | os.PathLike[str]
Payloads = Callable[[], Iterator[bytes]]
"""A factory of fresh iterators over a journal's payloads (JSON text, each ending in ``\n``)."""
PayloadWriter = Callable[[Payloads, BinaryIO], None]
"""Writes the payloads in a final format to a binary file (may iterate the payloads twice)."""


class ResumeError(ConfigError):
    """A job cannot start or resume as asked (settings differ, leftovers from another run)."""


class JournalCorruptError(FatalError):
    """A journal holds a damaged record that is not a torn tail; resuming would guess."""


# -- JSON ----------------------------------------------------------------------------------


def _default(obj: Any) -> Any:
    """Encode the non-JSON values that file inputs produce (Parquet dates, decimals, bytes)."""
    if isinstance(obj, (datetime.datetime, datetime.date, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).decode("utf-8", "replace")
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


def dumps(value: Any) -> bytes:
    """Return ``value`` as compact UTF-8 JSON on one line (orjson when installed).

    Dates become ISO strings, decimals and other objects their ``str()``.

    Raises:
        TypeError: The value cannot be written as JSON (a circular or unencodable structure).
        ValueError: The value contains a circular reference.
    """
    if _orjson is not None:
        try:
            data: bytes = _orjson.dumps(value, default=_default, option=_orjson.OPT_NON_STR_KEYS)
            return data
        except TypeError:  # big ints, lone surrogates, odd keys: the stdlib copes
            pass
    text = json.dumps(value, default=_default, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: escape them so the file stays valid UTF-8
        return json.dumps(value, default=_default, separators=(",", ":")).encode("ascii")


_LONG_DIGITS = re.compile(rb"\d{19}")
_LONG_DIGITS_STR = re.compile(r"\d{19}")


def loads(data: bytes | str) -> Any:
    """Parse JSON text exactly (orjson when installed, the stdlib for what orjson refuses).

    orjson reads integers beyond 64 bits as floats; text with a run of 19 or more digits
    goes to the stdlib so big integers keep every digit.
    """
    if _orjson is not None:
        long = (
            _LONG_DIGITS.search(data) if isinstance(data, bytes) else _LONG_DIGITS_STR.search(data)
        )
        if long is None:
            try:
                return _orjson.loads(data)
            except ValueError:
                pass
    return json.loads(data)


# -- keys ----------------------------------------------------------------------------------


class KeySet(Container[Hashable]):
    """A set of row keys: small non-negative ints in a bitmap, anything else in a set."""

    _BITMAP_LIMIT = 1 << 34

    def __init__(self, keys: Iterable[Hashable] = ()) -> None:
        self._bits = bytearray()
        self._ints = 0
        self._other: set[Hashable] = set()
        for key in keys:
            self.add(key)

    def add(self, key: Hashable) -> None:
        """Add ``key``."""
        if type(key) is int and 0 <= key < self._BITMAP_LIMIT:
            index, bit = key >> 3, 1 << (key & 7)
            bits = self._bits
            if index >= len(bits):
                bits.extend(bytes(max(index + 1 - len(bits), len(bits))))
            if not bits[index] & bit:
                bits[index] |= bit
                self._ints += 1
        else:
            self._other.add(key)

    def __contains__(self, key: object) -> bool:
        if type(key) is int and 0 <= key < self._BITMAP_LIMIT:
            index = key >> 3
            return index < len(self._bits) and bool(self._bits[index] & (1 << (key & 7)))
        try:
            return key in self._other
        except TypeError:  # unhashable
            return False

    def __len__(self) -> int:
        return self._ints + len(self._other)


def key_json(key: Hashable) -> bytes:
    """Encode a row key for a journal record (str, int, float or tuples of them)."""
    return dumps(key)


def _key_from_json(value: Any) -> Hashable:
    if isinstance(value, list):
        return tuple(_key_from_json(v) for v in value)
    result: Hashable = value
    return result


def encode_record(line: int, key: Hashable, payload: bytes) -> bytes:
    """Return one journal record: ``line TAB key TAB payload NEWLINE``."""
    return b"%d\t%b\t%b\n" % (line, key_json(key), payload)


def parse_record(record: bytes) -> tuple[int, Hashable, bytes]:
    """Split a complete journal record into ``(line, key, payload)``.

    Raises:
        ValueError: The record is malformed.
    """
    first = record.index(b"\t")
    second = record.index(b"\t", first + 1)
    if not record.endswith(b"\n"):
        raise ValueError("record does not end with a newline")
    return (
        int(record[:first]),
        _key_from_json(loads(record[first + 1 : second])),
        record[second + 1 :],
    )


def _line_of(record: bytes) -> int:
    return int(record[: record.index(b"\t")])


def _payload_of(record: bytes) -> bytes:
    return record[record.index(b"\t", record.index(b"\t") + 1) + 1 :]


# -- durable file operations ---------------------------------------------------------------


def fsync_dir(path: PathLike) -> None:
    """Flush a directory entry change (rename, create, delete) to disk; no-op where unsupported."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse
        pass
    finally:
        os.close(fd)


def _dir_of(path: PathLike) -> str:
    return os.path.dirname(os.path.abspath(os.fspath(path)))


def atomic_write(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp, fsync, rename, dir fsync)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(_dir_of(path))


def _remove(path: PathLike) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


# -- journal files -------------------------------------------------------------------------


def write_jsonl(payloads: Payloads, dest: BinaryIO) -> None:
    """Write payloads as JSON Lines (a byte copy: each payload is one JSON text and newline)."""
    batch: list[bytes] = []
    for payload in payloads():
        batch.append(payload)
        if len(batch) >= 4096:
            dest.writelines(batch)
            batch.clear()
    dest.writelines(batch)


class JournalFile:
    """An append-only journal of finished rows, and how to publish it.

    Sinks open it, :meth:`append` chunks of records made by :func:`encode_record`,
    :meth:`sync` now and then and :meth:`close` it at the end. :attr:`writer` turns the
    payloads into the final format at publish; a sink sets it to its own format.

    Args:
        path: The journal's path (``FINAL.partial`` for a job).
        final: The published file's path.
        writer: The final format (JSON Lines by default).
    """

    def __init__(
        self, path: PathLike, final: PathLike, writer: PayloadWriter = write_jsonl
    ) -> None:
        self.path = os.fspath(path)
        self.final = os.fspath(final)
        self.writer = writer
        self.rows = 0
        self._file: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"JournalFile({self.path!r} -> {self.final!r})"

    def open(self) -> None:
        """Open the journal for appending (creating it if needed)."""
        if self._file is None:
            try:
                self._file = open(self.path, "ab")  # noqa: SIM115 - held across calls
            except OSError as error:
                raise FatalError(f"cannot open {self.path!r} for writing: {error}") from error

    def append(self, data: bytes, rows: int) -> None:
        """Append whole records and flush them to the OS (they survive the process dying)."""
        f = self._file
        if f is None:
            raise RuntimeError(f"journal {self.path!r} is not open")
        try:
            f.write(data)
            f.flush()
        except OSError as error:
            raise FatalError(f"cannot write to {self.path!r}: {error}") from error
        self.rows += rows

    def sync(self) -> None:
        """Flush the journal to disk (survives a power loss)."""
        f = self._file
        if f is not None:
            try:
                os.fsync(f.fileno())
            except OSError as error:
                raise FatalError(f"cannot fsync {self.path!r}: {error}") from error

    def close(self) -> None:
        """Fsync and close the journal; safe to call twice."""
        f, self._file = self._file, None
        if f is not None:
            try:
                f.flush()
                os.fsync(f.fileno())
            finally:
                f.close()

    @property
    def is_open(self) -> bool:
        """Whether the journal is open for appending."""
        return self._file is not None

    def publish(self, *, ordered: bool = False, chunk_bytes: int = 64 << 20) -> None:
        """Write the final file from the journal atomically, then delete the journal.

        Used by sinks that run without a :class:`Journal` (no resume): the job's
        :meth:`Journal.commit` does the same in crash-safe steps.
        """
        self.close()
        tmp = self.final + PUBLISH_SUFFIX
        build_final(self.path, tmp, self.writer, ordered=ordered, chunk_bytes=chunk_bytes)
        os.replace(tmp, self.final)
        fsync_dir(_dir_of(self.final))
        _remove(self.path)

    def discard(self) -> None:
        """Close and delete the journal (a run without resume that failed)."""
        f, self._file = self._file, None
        if f is not None:
            f.close()
        _remove(self.path)


def scan_journal(path: PathLike, on_record: Callable[[int, Hashable], None] | None = None) -> int:
    """Validate a journal, truncate a torn tail, and report each record's line and key.

    Returns:
        How many complete records the journal holds.

    Raises:
        JournalCorruptError: A damaged record is followed by good ones.
    """
    path = os.fspath(path)
    good_end = 0
    offset = 0
    count = 0
    bad_at: tuple[int, int] | None = None  # (offset, record number) of the first bad record
    with open(path, "rb") as f:
        for number, record in enumerate(f, 1):
            try:
                line, key, _ = parse_record(record)
            except (ValueError, UnicodeDecodeError):
                if bad_at is None:
                    bad_at = (offset, number)
            else:
                if bad_at is not None:
                    raise JournalCorruptError(
                        f"{path}: record {bad_at[1]} is damaged but later records are intact;"
                        " refusing to resume from a corrupt journal (start over with --overwrite)"
                    )
                count += 1
                if on_record is not None:
                    on_record(line, key)
                good_end = offset + len(record)
            offset += len(record)
    if offset > good_end:
        log.warning("%s: removing a torn tail of %d bytes left by a crash", path, offset - good_end)
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return count


# -- publishing, with input order restored -------------------------------------------------


def _read_range(path: str, start: int, end: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        position = start
        while position < end:
            record = f.readline()
            if not record:
                return
            position += len(record)
            yield record


def _ascending_runs(path: str) -> list[tuple[int, int]]:
    """Return the byte ranges of the journal's maximal runs of ascending line numbers."""
    runs: list[tuple[int, int]] = []
    start = offset = 0
    previous = -1
    with open(path, "rb") as f:
        for record in f:
            line = _line_of(record)
            if line < previous:
                runs.append((start, offset))
                start = offset
            previous = line
            offset += len(record)
    if offset > start:
        runs.append((start, offset))
    return runs


def _merge(sources: list[Iterator[bytes]]) -> Iterator[bytes]:
    if len(sources) == 1:
        return sources[0]
    return heapq.merge(*sources, key=_line_of)


def _sorted_runs(path: str, workdir: str, chunk_bytes: int, fanin: int) -> list[str]:
    """Sort the journal into run files of at most ``chunk_bytes``, merged down to ``fanin``."""
    runs: list[str] = []

    def spill(records: list[bytes]) -> None:
        records.sort(key=_line_of)
        name = os.path.join(workdir, f"run{len(runs)}")
        with open(name, "wb") as out:
            out.writelines(records)
        runs.append(name)

    chunk: list[bytes] = []
    size = 0
    with open(path, "rb") as f:
        for record in f:
            chunk.append(record)
            size += len(record)
            if size >= chunk_bytes:
                spill(chunk)
                chunk, size = [], 0
    if chunk:
        spill(chunk)
    level = 0
    while len(runs) > fanin:
        level += 1
        merged: list[str] = []
        for i in range(0, len(runs), fanin):
            group = runs[i : i + fanin]
            name = os.path.join(workdir, f"merge{level}.{i}")
            with open(name, "wb") as out:
                out.writelines(_merge([_read_range(p, 0, os.path.getsize(p)) for p in group]))
            for p in group:
                os.unlink(p)
            merged.append(name)
        runs = merged
    return runs


def build_final(
    journal: PathLike,
    dest: PathLike,
    writer: PayloadWriter,
    *,
    ordered: bool = False,
    chunk_bytes: int = 64 << 20,
    fanin: int = 64,
) -> None:
    """Write the payloads of ``journal`` to ``dest`` (fsynced) in ``writer``'s format.

    With ``ordered``, payloads come in input (line) order, in bounded memory.
    """
    path = os.fspath(journal)
    dest = os.fspath(dest)
    with contextlib.ExitStack() as stack:
        if ordered:
            runs = _ascending_runs(path)
            if len(runs) <= fanin:
                ranges = [(path, start, end) for start, end in runs]
            else:
                workdir = stack.enter_context(
                    tempfile.TemporaryDirectory(prefix=".sort-", dir=_dir_of(dest))
                )
                files = _sorted_runs(path, workdir, chunk_bytes, fanin)
                ranges = [(p, 0, os.path.getsize(p)) for p in files]

            def payloads() -> Iterator[bytes]:
                sources = [_read_range(p, start, end) for p, start, end in ranges]
                return map(_payload_of, _merge(sources))

        else:

            def payloads() -> Iterator[bytes]:
                with open(path, "rb") as f:
                    yield from map(_payload_of, f)

        try:
            with open(dest, "wb") as out:
                writer(payloads, out)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            _remove(dest)
            raise


# -- the job -------------------------------------------------------------------------------


def input_fingerprint(path: PathLike) -> dict[str, Any]:
    """Return an input's identity: absolute path, size, SHA-256 of its first and last MiB."""
    text = os.fspath(path)
    if text == "-":
        return {"path": "-"}
    with open(text, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = hashlib.sha256(f.read(_FINGERPRINT_BYTES)).hexdigest()
        f.seek(max(size - _FINGERPRINT_BYTES, 0))
        tail = hashlib.sha256(f.read(_FINGERPRINT_BYTES)).hexdigest()
    return {"path": os.path.abspath(text), "size": size, "head_sha256": head, "tail_sha256": tail}


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    found = []
    settings_then = stored.get("settings", {})
    settings_now = current.get("settings", {})
    for name in sorted(set(settings_then) | set(settings_now), key=str):
        then, now = settings_then.get(name), settings_now.get(name)
        if then != now:
            found.append(f"{name} (was {_short(then)}, now {_short(now)})")
    input_then, input_now = stored.get("input"), current.get("input")
    if input_then != input_now:
        if not input_then or not input_now or input_then.get("path") != input_now.get("path"):
            found.append(
                f"input file (was {_short((input_then or {}).get('path'))},"
                f" now {_short((input_now or {}).get('path'))})"
            )
        elif input_then.get("size") != input_now.get("size"):
            found.append(
                f"input file contents (size was {input_then.get('size')},"
                f" now {input_now.get('size')})"
            )
        else:
            found.append("input file contents (its first or last MiB changed)")
    return found


class Journal:
    """The crash-safe state of one file job; see the module documentation for the design.

    Typical use (what the CLI does)::

        journal = Journal("out.jsonl", settings={"model": m, "prompt": p}, input="in.jsonl",
                          resume=args.resume)
        await anyio.to_thread.run_sync(journal.open)
        if not journal.complete:
            source = JsonlSource("in.jsonl", skip_keys=journal.done)
            sinks = JsonlSink(journal.output), DeadLetterSink(journal.dead_letter)
            report = await Pipeline(source, ..., sinks[0], dead_letter=sinks[1]).run()
            if report.complete and report.stopped is None:
                await anyio.to_thread.run_sync(journal.commit)

    Args:
        output: The final output path (not ``-``).
        dead_letter: The final dead-letter path (default ``OUTPUT.failed.jsonl``).
        settings: What defines the job (prompt, model, endpoint...): a resume with different
            values is refused. JSON-ready values; never secrets.
        input: The input path, fingerprinted so a changed input refuses to resume.
        resume: Continue an interrupted job (a fresh start when there is none).
        overwrite: Delete an interrupted job's files and start over.
        ordered: Publish the output in input order.
        chunk_bytes: Memory bound of the ordered publish's sort.
    """

    def __init__(
        self,
        output: PathLike,
        *,
        dead_letter: PathLike | None = None,
        settings: Mapping[str, Any] | None = None,
        input: PathLike | None = None,
        resume: bool = False,
        overwrite: bool = False,
        ordered: bool = False,
        chunk_bytes: int = 64 << 20,
    ) -> None:
        out = os.fspath(output)
        if out == "-":
            raise ConfigError("a resumable job needs an output file, not stdout ('-')")
        if resume and overwrite:
            raise ConfigError("resume and overwrite contradict each other: choose one")
        self.output_path = out
        self.dead_letter_path = os.fspath(dead_letter) if dead_letter else out + DEAD_LETTER_SUFFIX
        if os.path.abspath(self.dead_letter_path) == os.path.abspath(out):
            raise ConfigError(f"the dead-letter file cannot be the output file ({out!r})")
        self.manifest_path = out + MANIFEST_SUFFIX
        self.input_path = None if input is None else os.fspath(input)
        for final in (out, self.dead_letter_path):
            if (
                self.input_path not in (None, "-")
                and os.path.exists(final)
                and os.path.samefile(final, self.input_path)
            ):
                raise ConfigError(f"{final!r} is the input file; it would be overwritten")
        self.settings: dict[str, Any] = json.loads(json.dumps(dict(settings or {}), default=str))
        self.resume = resume
        self.overwrite = overwrite
        self.ordered = ordered
        self.chunk_bytes = chunk_bytes
        self.output = JournalFile(out + PARTIAL_SUFFIX, out)
        self.dead_letter = JournalFile(
            self.dead_letter_path + PARTIAL_SUFFIX, self.dead_letter_path
        )
        self.done = KeySet()
        self.resumed = False
        self.complete = False
        self.previous_ok = 0
        self.previous_failed = 0
        self._manifest: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"Journal({self.output_path!r}, resumed={self.resumed}, done={len(self.done)})"

    # -- open -----------------------------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        """Return the job's identity: its settings and its input's fingerprint."""
        found: dict[str, Any] = {"settings": self.settings}
        if self.input_path is not None:
            try:
                found["input"] = input_fingerprint(self.input_path)
            except OSError as error:
                raise ConfigError(f"cannot read input {self.input_path!r}: {error}") from error
        return found

    def _leftovers(self) -> list[str]:
        paths = [
            self.output.path,
            self.dead_letter.path,
            self.output.final + PUBLISH_SUFFIX,
            self.dead_letter.final + PUBLISH_SUFFIX,
        ]
        return [p for p in paths if os.path.exists(p)]

    def open(self) -> None:
        """Start the job fresh, or resume it; sets :attr:`done` and :attr:`complete`.

        Raises:
            ResumeError: Leftovers of another run without ``resume``/``overwrite``, or a
                fingerprint that differs from the checkpoint's.
            JournalCorruptError: A journal is damaged beyond a torn tail.
        """
        has_manifest = os.path.exists(self.manifest_path)
        leftovers = self._leftovers()
        if self.overwrite:
            for path in [*leftovers, self.manifest_path]:
                _remove(path)
            self._start_fresh()
            return
        if not has_manifest:
            if leftovers:
                raise ResumeError(
                    f"found {', '.join(map(repr, leftovers))} but no checkpoint"
                    f" {self.manifest_path!r}: not left by a job that can be resumed;"
                    " use --overwrite to delete and start over"
                )
            if self.resume:
                log.info("no checkpoint for %s: starting from the beginning", self.output_path)
            self._start_fresh()
            return
        manifest = self._read_manifest()
        if not self.resume:
            raise ResumeError(
                f"an interrupted job left a checkpoint for {self.output_path!r}"
                f" ({self.manifest_path}): use --resume to continue it or --overwrite to start"
                " over"
            )
        if manifest.get("version") != FORMAT_VERSION:
            raise ResumeError(
                f"checkpoint {self.manifest_path!r} has format version"
                f" {manifest.get('version')!r}, this version writes {FORMAT_VERSION};"
                " use --overwrite to start over"
            )
        differences = _differences(manifest.get("job", {}), self.fingerprint())
        if differences:
            raise ResumeError(
                f"cannot resume {self.output_path!r}: the job's settings differ from the"
                f" checkpoint's: {'; '.join(differences)}. Run with the original settings, or"
                " use --overwrite to start over"
            )
        self._manifest = manifest
        self.resumed = True
        if manifest.get("state") == "publishing":
            self._finish_publish()
            self.complete = True
            return
        for path in (self.output.final + PUBLISH_SUFFIX, self.dead_letter.final + PUBLISH_SUFFIX):
            _remove(path)
        done = self.done

        def add(line: int, key: Hashable) -> None:
            done.add(key)

        for journal in (self.output, self.dead_letter):
            if not os.path.exists(journal.path):
                open(journal.path, "ab").close()
        self.previous_ok = scan_journal(self.output.path, add)
        self.previous_failed = scan_journal(self.dead_letter.path, add)
        manifest["runs"] = int(manifest.get("runs", 1)) + 1
        atomic_write(self.manifest_path, _manifest_bytes(manifest))
        log.info(
            "resuming %s: %d rows done, %d dead-lettered",
            self.output_path,
            self.previous_ok,
            self.previous_failed,
        )

    def _read_manifest(self) -> dict[str, Any]:
        try:
            with open(self.manifest_path, "rb") as f:
                manifest = json.loads(f.read())
        except (OSError, ValueError) as error:
            raise ResumeError(
                f"checkpoint {self.manifest_path!r} is unreadable ({error});"
                " use --overwrite to start over"
            ) from error
        if not isinstance(manifest, dict):
            raise ResumeError(f"checkpoint {self.manifest_path!r} is not a job checkpoint")
        return manifest

    def _start_fresh(self) -> None:
        self._manifest = {
            "version": FORMAT_VERSION,
            "state": "running",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "output": os.path.abspath(self.output_path),
            "dead_letter": os.path.abspath(self.dead_letter_path),
            "runs": 1,
            "job": self.fingerprint(),
        }
        atomic_write(self.manifest_path, _manifest_bytes(self._manifest))
        for journal in (self.output, self.dead_letter):
            open(journal.path, "wb").close()
        for directory in {_dir_of(self.output.path), _dir_of(self.dead_letter.path)}:
            fsync_dir(directory)

    # -- commit ---------------------------------------------------------------------------

    def commit(self) -> None:
        """Publish the finished job atomically and remove the journals and the manifest.

        Call once the run completed (every input row has a record). Safe to interrupt: a
        resume finishes or redoes it.
        """
        if not self._manifest:
            raise RuntimeError("commit() before open()")
        self.output.close()
        self.dead_letter.close()
        for journal in (self.output, self.dead_letter):
            if journal is self.dead_letter and not self._publish_dead_letter():
                continue
            build_final(
                journal.path,
                journal.final + PUBLISH_SUFFIX,
                journal.writer,
                ordered=self.ordered,
                chunk_bytes=self.chunk_bytes,
            )
        self._manifest["state"] = "publishing"
        atomic_write(self.manifest_path, _manifest_bytes(self._manifest))
        self._finish_publish()
        self.complete = True

    def _publish_dead_letter(self) -> bool:
        """Whether to publish the dead letters: there are some, or a stale file must go."""
        has_records = os.path.getsize(self.dead_letter.path) > 0
        return has_records or os.path.exists(self.dead_letter.final)

    def _finish_publish(self) -> None:
        """Move published files into place, then drop journals and manifest (idempotent)."""
        directories = set()
        for journal in (self.dead_letter, self.output):
            tmp = journal.final + PUBLISH_SUFFIX
            if os.path.exists(tmp):
                os.replace(tmp, journal.final)
                directories.add(_dir_of(journal.final))
        for directory in directories:
            fsync_dir(directory)
        for journal in (self.output, self.dead_letter):
            _remove(journal.path)
        _remove(self.manifest_path)
        for directory in {_dir_of(self.manifest_path), _dir_of(self.dead_letter.path)}:
            fsync_dir(directory)

    def close(self) -> None:
        """Close the journals without publishing (the run stopped or failed; resume later)."""
        self.output.close()
        self.dead_letter.close()

    def discard(self) -> bool:
        """Delete a fresh job's files when it finished no row; return whether it did.

        A job that stops on its first requests (a wrong URL, a rejected key) then leaves
        nothing behind, and running it again needs neither ``--resume`` nor ``--overwrite``.
        A resumed job, or one that journaled any row, is kept.
        """
        self.close()
        if self.resumed or not self._manifest:
            return False
        for journal in (self.output, self.dead_letter):
            try:
                if os.path.getsize(journal.path) > 0:
                    return False
            except FileNotFoundError:
                pass
        for path in (self.output.path, self.dead_letter.path, self.manifest_path):
            _remove(path)
        fsync_dir(_dir_of(self.manifest_path))
        self._manifest = {}
        return True


def _manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, ensure_ascii=False, default=str).encode("utf-8") + b"\n"
