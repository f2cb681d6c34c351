"""A frame job's checkpoint: the file jobs' journal, keyed by row position.

``checkpoint="answers.ckpt"`` keeps, like a file job's output, ``answers.ckpt.partial`` (one
record per answered row: its position, a digest of its request fields, its answer),
``answers.ckpt.failed.jsonl.partial`` (a dead-letter record per failed row) and the manifest
``answers.ckpt.checkpoint.json`` holding the job's settings. Running the same job again reads
the answers back and sends only the rows without one: rows never answered, rows that failed
(they are tried again), and rows whose request fields changed since (their digest differs).
A torn last record (a crash mid-write) is dropped by the journal; other settings than the
checkpoint's are refused with :class:`~pipeline.jobs.ResumeError`. The checkpoint stays after
the job completes, so running the cell again costs nothing; ``overwrite=True`` starts over.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline._json import dumps, loads
from pipeline.jobs import Journal, ResumeError
from stages.files import encode_record, parse_record

MISSING: Any = object()
"""What :meth:`Checkpoint.take` returns for a row without a usable earlier answer."""


class Checkpoint:
    """The journal of one frame job: previous answers in, this run's answers out.

    Args:
        path: The checkpoint path (files are made next to it with suffixes).
        fingerprint: What defines the job's answers; a checkpoint with other values is refused.
        overwrite: Delete an earlier checkpoint and start over.
    """

    def __init__(self, path: str, fingerprint: Mapping[str, Any], *, overwrite: bool) -> None:
        self.journal = Journal(
            path, settings=fingerprint, resume=not overwrite, overwrite=overwrite
        )
        self.previous: dict[int, tuple[str, Any]] = {}
        self._answers = bytearray()
        self._failures = bytearray()
        self._answer_rows = 0
        self._failure_rows = 0

    def __repr__(self) -> str:
        return f"Checkpoint({self.journal.output_path!r}, previous={len(self.previous)})"

    def open(self) -> None:
        """Open or resume the journal and read the answers it holds (blocking: use a thread).

        Raises:
            ResumeError: The checkpoint was made with other settings (its message says which).
        """
        try:
            self.journal.open()
        except ResumeError as error:
            raise ResumeError(
                str(error).replace("--overwrite", "overwrite=True").replace("--resume", "resume")
            ) from None
        with open(self.journal.output.path, "rb") as f:
            for record in f:
                try:
                    _, key, payload = parse_record(record)
                except ValueError:  # a damaged record: that row is answered again
                    continue
                data = loads(payload)
                if isinstance(key, int):
                    self.previous[key] = (data["h"], data["a"])
        self.journal.output.open()
        self.journal.dead_letter.open()

    def take(self, position: int, digest: str) -> Any:
        """Return the earlier answer of a row whose request is unchanged, else :data:`MISSING`."""
        found = self.previous.pop(position, None)
        if found is None or found[0] != digest:
            return MISSING
        return found[1]

    def answered(self, position: int, digest: str, answer: Any) -> None:
        """Journal a row's answer (buffered until :meth:`flush`)."""
        self._answers += encode_record(position + 1, position, dumps({"h": digest, "a": answer}))
        self._answer_rows += 1

    def failed(self, position: int, record: Mapping[str, Any]) -> None:
        """Journal a row's dead-letter record (buffered until :meth:`flush`)."""
        self._failures += encode_record(position + 1, position, dumps(record))
        self._failure_rows += 1

    @property
    def buffered(self) -> int:
        """Rows journaled since the last flush."""
        return self._answer_rows + self._failure_rows

    def flush(self) -> None:
        """Write the buffered records (they survive the process dying from here on)."""
        if self._answers:
            self.journal.output.append(bytes(self._answers), self._answer_rows)
            self._answers.clear()
            self._answer_rows = 0
        if self._failures:
            self.journal.dead_letter.append(bytes(self._failures), self._failure_rows)
            self._failures.clear()
            self._failure_rows = 0

    def sync(self) -> None:
        """Flush the journals to disk (blocking: use a thread)."""
        self.flush()
        self.journal.output.sync()
        self.journal.dead_letter.sync()

    def close(self) -> None:
        """Write what is buffered, fsync and close the journals (blocking: use a thread)."""
        try:
            self.flush()
        finally:
            self.journal.close()
