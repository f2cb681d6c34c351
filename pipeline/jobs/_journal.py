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

    <line>\t<key as JSON>\t<payload as JSON>\t<CRC-32, 8 hex digits>\n

``line`` is the row's 1-based position in the input: its identity in the job (what a resume
skips) and what restores input order. ``key`` is the id field's value (or the line number),
``payload`` the output row or the dead-letter record, and the CRC-32 covers everything before
it. JSON text never contains a raw tab or newline, so a record splits without parsing its
payload, and a record is whole exactly when it ends in ``\n`` and its checksum matches. Sinks
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
difference. It then checks each journal record by record: a torn last record (no final
newline, a bad checksum, the zeros a power loss can leave) is truncated; a damaged record that
still names its line (a cut-off payload) is not done, and that row is sent again; anything that
is not a record followed by whole ones is corruption and is refused rather than guessed at.
The lines of both journals' whole records become :attr:`Journal.done` (a bitmap), which the
source receives as ``skip_lines``; a line recorded twice counts once. Without ``resume`` an
existing manifest or journal is an error that suggests ``--resume`` or ``--overwrite``;
``overwrite=True`` deletes them and starts over. ``resume=True`` with nothing to resume starts
a fresh job.

**Publish.** :meth:`Journal.commit` first checks that every row is accounted for once: it
reads both journals, keeps each line's first whole record (a record appended twice is
published once, a damaged one never, a line with an answer has no dead letter), and refuses
to publish (:class:`~stages.files._records.JournalCorruptError`) when two kept records share
an id or when the distinct lines differ from the number of input rows the run saw (its
``expected`` argument). It then converts each journal into its final format (JSONL by
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

**Memory.** A job holds one bit per input line (125 KB per million rows) whatever its ids
look like: the done rows of a resume, and the lines kept at publish. Ids are checked without
being held: the commit's check and the source's duplicate-id search keep 16-byte digests in
temporary bucket files (:class:`~stages.files._ids.DuplicateIds`), a few MB in memory at ten
million rows. The journal assumes each input row produces exactly one output row or one
dead-letter record (1:1 stages), which is what a file job does.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from pipeline._errors import ConfigError
from pipeline.jobs._settings import JobSettings
from stages.files import count_rows
from stages.files._ids import DuplicateIds
from stages.files._pipes import is_stream
from stages.files._records import (
    PUBLISH_SUFFIX,
    JournalCorruptError,
    JournalFile,
    LineSet,
    PathLike,
    atomic_write,
    build_final,
    dir_of,
    fsync_dir,
    remove_file,
    scan_journal,
)

log = logging.getLogger("pipeline.journal")

FORMAT_VERSION = 2
PARTIAL_SUFFIX = ".partial"
MANIFEST_SUFFIX = ".checkpoint.json"
DEAD_LETTER_SUFFIX = ".failed.jsonl"
_FINGERPRINT_BYTES = 1 << 20


class ResumeError(ConfigError):
    """A job cannot start or resume as asked (settings differ, leftovers from another run)."""


def input_fingerprint(path: PathLike) -> dict[str, Any]:
    """Return an input's identity: absolute path, size, SHA-256 of its first and last MiB.

    Standard input, a pipe or a device is known by its path alone (resume trusts the user).
    """
    text = os.fspath(path)
    if text == "-":
        return {"path": "-"}
    if is_stream(text):  # a pipe or a device: reading it here would take the job's rows
        return {"path": os.path.abspath(text)}
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
            source = JsonlSource("in.jsonl", skip_lines=journal.done)
            sinks = JsonlSink(journal.output), DeadLetterSink(journal.dead_letter)
            report = await Pipeline(source, ..., sinks[0], dead_letter=sinks[1]).run()
            if report.complete and report.stopped is None:
                rows = source.emitted + source.rejected + source.skipped
                await anyio.to_thread.run_sync(journal.commit, rows)

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
        self.done = LineSet()
        self.resumed = False
        self.complete = False
        self.previous_ok = 0
        self.previous_failed = 0
        self._counts = (0, 0)
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
            ResumeError: A journal is damaged beyond a torn tail (as an unreadable
                checkpoint is: the CLI exits 2 for both).
        """
        has_manifest = os.path.exists(self.manifest_path)
        leftovers = self._leftovers()
        if self.overwrite:
            for path in [*leftovers, self.manifest_path]:
                remove_file(path)
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
            remove_file(path)
        for journal in (self.output, self.dead_letter):
            if not os.path.exists(journal.path):
                open(journal.path, "ab").close()
        try:
            self.done, _ = self._scan()
        except JournalCorruptError as error:  # like an unreadable checkpoint: the user decides
            raise ResumeError(str(error)) from error
        self.previous_ok, self.previous_failed = self._counts
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
        for directory in {dir_of(self.output.path), dir_of(self.dead_letter.path)}:
            fsync_dir(directory)

    # -- commit ---------------------------------------------------------------------------

    def _scan(self, ids: DuplicateIds | None = None) -> tuple[LineSet, LineSet]:
        """Read both journals' whole records; return their lines and the answered ones.

        The first record of a line wins, so a dead letter for an answered line is not
        published. Sets ``_counts`` to the distinct lines answered and dead-lettered, and feeds
        each kept record's id (keys that are not line numbers) to ``ids``.
        """
        lines = LineSet()

        def keep(line: int, key: bytes) -> None:
            if lines.add(line) and ids is not None and not key.isdigit():
                ids.add(key, line)

        scan_journal(self.output.path, keep)
        answered = lines.copy()  # the output is read first: its lines are the answered ones
        scan_journal(self.dead_letter.path, keep)
        self._counts = (len(answered), len(lines) - len(answered))
        return lines, answered

    def check(self, expected: int | None = None) -> LineSet:
        """Check that the journals account for every row once; return the answered lines.

        Raises:
            JournalCorruptError: Two kept records share an id, ``expected`` (the input rows
                the run saw, skipped ones included) differs from the distinct lines, or a
                journal holds garbage before whole records.
        """
        with DuplicateIds(directory=dir_of(self.output.path)) as ids:
            _, answered = self._scan(ids)
            repeats = ids.repeats()
        if repeats:
            line, first = min(repeats.items())
            raise JournalCorruptError(
                f"{self.output_path!r} was not published: {len(repeats)} journal record(s)"
                f" repeat another row's id (line {line} has the id of line {first}); was the"
                " input changed between runs? Start over with --overwrite"
            )
        found = sum(self._counts)
        if expected is not None and found != expected:
            raise JournalCorruptError(
                f"{self.output_path!r} was not published: the input has {expected} rows but the"
                f" journals account for {found} distinct rows; run again with --resume to send"
                " the missing rows, or --overwrite to start over"
            )
        return answered

    def commit(self, expected: int | None = None) -> None:
        """Check, then publish the finished job atomically; remove the journals and manifest.

        Call once the run completed (every input row has a record); ``expected`` is how many
        input rows the run saw, skipped ones included (see :meth:`check`). Safe to interrupt:
        a resume finishes or redoes it.

        Raises:
            JournalCorruptError: The check failed; nothing was published.
        """
        if not self._manifest:
            raise RuntimeError("commit() before open()")
        self.output.close()
        self.dead_letter.close()
        answered = self.check(expected)
        for journal in (self.output, self.dead_letter):
            if journal is self.dead_letter and not self._publish_dead_letter():
                continue
            build_final(
                journal.path,
                journal.final + PUBLISH_SUFFIX,
                journal.writer,
                ordered=self.ordered,
                chunk_bytes=self.chunk_bytes,
                exclude=answered if journal is self.dead_letter else (),
            )
        self._manifest["state"] = "publishing"
        atomic_write(self.manifest_path, _manifest_bytes(self._manifest))
        self._finish_publish()
        self.complete = True

    def _publish_dead_letter(self) -> bool:
        """Whether to publish the dead letters: there are some, or a stale file must go."""
        return self._counts[1] > 0 or os.path.exists(self.dead_letter.final)

    def _finish_publish(self) -> None:
        """Move published files into place, then drop journals and manifest (idempotent)."""
        directories = set()
        for journal in (self.dead_letter, self.output):
            tmp = journal.final + PUBLISH_SUFFIX
            if os.path.exists(tmp):
                os.replace(tmp, journal.final)
                directories.add(dir_of(journal.final))
        for directory in directories:
            fsync_dir(directory)
        for journal in (self.output, self.dead_letter):
            remove_file(journal.path)
        remove_file(self.manifest_path)
        for directory in {dir_of(self.manifest_path), dir_of(self.dead_letter.path)}:
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
            remove_file(path)
        fsync_dir(dir_of(self.manifest_path))
        self._manifest = {}
        return True


def _manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, ensure_ascii=False, default=str).encode("utf-8") + b"\n"


def journal_for(settings: JobSettings) -> Journal:
    """Return the (unopened) journal of the job ``settings`` describe; every engine uses it.

    The checkpoint stores :meth:`~pipeline.jobs._settings.JobSettings.fingerprint`, so a
    resume with different answers-defining settings is refused whatever the engine.
    """
    assert settings.output is not None, "require_paths() first"
    return Journal(
        settings.output,
        dead_letter=settings.dead_letter,
        settings=settings.fingerprint(),
        input=settings.input,
        resume=settings.resume,
        overwrite=settings.overwrite,
        ordered=settings.ordered,
    )


def published_counts(journal: Journal, output_format: str | None) -> tuple[int, int]:
    """Count the rows of a job's published files (a resume that only finished publishing).

    Returns:
        ``(output rows, dead-letter records)``; a file that cannot be counted counts 0.
    """
    counts = []
    for path, fmt in ((journal.output_path, output_format), (journal.dead_letter_path, "jsonl")):
        try:
            counts.append(count_rows(path, fmt=fmt) or 0)
        except (OSError, ConfigError, ValueError):
            counts.append(0)
    return counts[0], counts[1]
