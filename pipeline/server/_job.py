"""One job of the server: its directory, its record ``job.json`` and its live progress.

A job lives in its own directory under ``DATA_DIR/jobs/ID/``: the uploaded ``input.jsonl``, the
job's record ``job.json`` (rewritten atomically on every change of state), and the job's
crash-safe journal (``output.jsonl.partial`` while it runs, ``output.jsonl`` once published).
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any

import anyio

from pipeline.jobs import JobProgress, JobSummary
from pipeline.server._settings import OUTPUT
from stages.files._records import atomic_write

__all__ = [
    "FAILED",
    "JOB_ID",
    "PARTIAL",
    "RESUMABLE",
    "TERMINAL",
    "Job",
    "now",
    "public_summary",
]

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "interrupted", "stopped"})
"""States in which no task works on a job."""
RESUMABLE = frozenset({"failed", "cancelled", "interrupted", "stopped"})
"""States from which ``POST .../resume`` continues a job."""
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
"""What a job id looks like (anything else is an unknown job)."""
FAILED = OUTPUT + ".failed.jsonl"
"""The name of a job's dead-letter file in its directory."""
PARTIAL = ".partial"
"""The suffix of a journal file while its job runs."""

_SUMMARY_COUNTERS = (
    ("ok", "ok", 0),
    ("failed", "failed", 0),
    ("skipped", "resumed_skipped", 0),
    ("requests", "requests", 0),
    ("retries", "retries", 0),
    ("prompt_tokens", "prompt_tokens", 0),
    ("completion_tokens", "completion_tokens", 0),
    ("cost_usd", "cost_usd", 0.0),
    ("elapsed_s", "elapsed_s", 0.0),
    ("rows_per_s", "rows_per_s", 0.0),
    ("endpoints", "endpoints", None),
)
"""The counters a finished job shows: (counter, summary field, default)."""


def now() -> str:
    """Return the time now as an ISO 8601 UTC timestamp with milliseconds."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def public_summary(summary: JobSummary) -> dict[str, Any]:
    """Return a run's summary as a response shows it (no server paths)."""
    data = summary.to_dict()
    data.pop("output", None)  # server paths stay on the server
    data.pop("dead_letter", None)
    return data


def _records(final: Path) -> int:
    """Count the complete records of a journal file (or lines of its published file)."""
    try:  # a journal record is "line<TAB>key<TAB>payload\n"; a torn last one does not count
        with open(str(final) + PARTIAL, "rb") as f:
            return sum(1 for r in f if r.endswith(b"\n") and r.count(b"\t") >= 2 and r.strip())
    except FileNotFoundError:
        pass
    try:
        with open(final, "rb") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


class Job:
    """One job: its record on disk, its live progress, and the handles to stop it."""

    def __init__(self, job_id: str, directory: Path, record: dict[str, Any]) -> None:
        self.id = job_id
        self.dir = directory
        self.record = record
        self.progress: JobProgress | None = None
        self.stop_event: anyio.Event | None = None
        self.stop_why: str | None = None
        self.changed = anyio.Event()
        self.done = anyio.Event()
        self.done.set()  # no task running
        self.journaled: tuple[int, int] | None = None

    @property
    def status(self) -> str:
        """The job's state: queued, running, cancelling, or a terminal state."""
        return str(self.record["status"])

    @property
    def terminal(self) -> bool:
        """Whether no task works on the job (finished, failed, cancelled, interrupted)."""
        return self.status in TERMINAL

    def notify(self) -> None:
        """Wake every reader waiting for news of this job."""
        event, self.changed = self.changed, anyio.Event()
        event.set()

    def update(self, **fields: Any) -> None:
        """Change the record, save it atomically, and wake readers."""
        self.record.update(fields)
        self.save()
        self.notify()

    def save(self) -> None:
        """Write ``job.json`` atomically."""
        data = json.dumps(self.record, indent=1, sort_keys=True).encode()
        atomic_write(self.dir / "job.json", data)

    def counters(self) -> dict[str, Any]:
        """Live counters while running, else the last run's summary figures."""
        summary = self.record.get("summary")
        progress = self.progress
        if progress is not None and (summary is None or not progress.final):
            data = progress.to_dict()
            data.pop("final", None)
            return data
        if isinstance(summary, dict):
            done = summary.get("total_ok", 0) + summary.get("total_failed", 0)
            figures = {name: summary.get(field, zero) for name, field, zero in _SUMMARY_COUNTERS}
            return {"rows_total": self.record.get("rows"), "rows_done": done, **figures}
        ok, failed = self.journaled or (0, 0)
        return {
            "rows_total": self.record.get("rows"),
            "rows_done": ok + failed,
            "ok": ok,
            "failed": failed,
        }

    def count_journal(self) -> None:
        """Count the rows the journal holds (blocking: a thread), for :meth:`counters`.

        A job loaded from disk that stopped before recording a summary (the server was
        killed) shows what its journal holds rather than nothing.
        """
        self.journaled = (_records(self.dir / OUTPUT), _records(self.dir / FAILED))

    def public(self) -> dict[str, Any]:
        """The job as a response shows it (no server paths, no secrets)."""
        record = self.record
        base = f"/v1/jobs/{self.id}"
        return {
            "id": self.id,
            "status": self.status,
            "created_at": record.get("created_at"),
            "started_at": record.get("started_at"),
            "finished_at": record.get("finished_at"),
            "runs": record.get("runs", 0),
            "rows": record.get("rows"),
            "settings": record.get("settings"),
            "counters": self.counters(),
            "summary": record.get("summary"),
            "stopped": record.get("stopped"),
            "error": record.get("error"),
            "links": {
                "self": base,
                "results": base + "/results",
                "failed": base + "/failed",
                "events": base + "/events",
            },
        }
