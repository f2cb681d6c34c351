"""A job's time series: one sample a second, appended as JSON lines next to its output.

The CLI (and the HTTP server, for each job) records what a run did over time at low cost: a
:class:`TimelineRecorder` turns the job's progress snapshots into :class:`Sample` lines of
``OUTPUT.timeline.jsonl``, at most one per ``interval`` seconds plus the last one, each a
write of a few hundred bytes flushed to the operating system (no fsync: losing the last
second to a power cut costs a chart point, not a row). The file holds one block per run::

    {"type": "run", "run": 1, "started_at": "2026-12-03T09:30:00Z", "job": {...}}
    {"type": "sample", "t": 1.0, "rows_done": 52, "requests": 55, ...}
    ...
    {"type": "end", "t": 12.3, "summary": {...}, "exit_status": 0, "error": null}

A resumed job appends a new run; a run killed before its end has no ``end`` line.
:func:`read_timeline` reads the file back (a torn last line, from a crash mid-write, is
ignored) for the run report and the dashboard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.jobs._progress import JobProgress
    from pipeline.jobs._settings import JobSettings

TIMELINE_SUFFIX = ".timeline.jsonl"


def timeline_path(output: str | os.PathLike[str]) -> str:
    """Return where the timeline of the job writing ``output`` is kept."""
    return os.fspath(output) + TIMELINE_SUFFIX


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """What a run had done at one moment (counters are this run's, from its start).

    Attributes:
        t: Seconds since the run started.
        rows_total: Rows in the input, when counted.
        rows_done: Rows with an answer or a dead-letter record, earlier runs included.
        ok: Rows answered by this run.
        failed: Rows dead-lettered by this run.
        skipped: Rows an earlier run had finished.
        requests: HTTP requests sent (retries included).
        retries: Retries made.
        rate_limited: Answers that asked to slow down (429, 503, 529).
        prompt_tokens: Prompt tokens reported by the server.
        completion_tokens: Completion tokens reported by the server.
        cost_usd: Cost per the price table.
        limiter_wait_s: Seconds rows waited for the rate limiter, summed over rows.
        in_flight: Requests on the wire now.
        statuses: Answers by HTTP status (``"200"``, ``"429"``...).
    """

    t: float
    rows_total: int | None = None
    rows_done: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    limiter_wait_s: float = 0.0
    in_flight: int = 0
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_progress(cls, progress: JobProgress) -> Sample:
        """Build a sample from a job's progress snapshot."""
        return cls(
            t=progress.elapsed_s,
            rows_total=progress.rows_total,
            rows_done=progress.rows_done,
            ok=progress.ok,
            failed=progress.failed,
            skipped=progress.skipped,
            requests=progress.requests,
            retries=progress.retries,
            prompt_tokens=progress.prompt_tokens,
            completion_tokens=progress.completion_tokens,
            cost_usd=progress.cost_usd,
            rate_limited=progress.rate_limited,
            limiter_wait_s=progress.limiter_wait_s,
            in_flight=progress.in_flight,
            statuses=dict(progress.statuses),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sample:
        """Read a sample from its JSON form (unknown fields are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """Return the sample as JSON-ready data."""
        data = dataclasses.asdict(self)
        data["t"] = round(self.t, 3)
        data["cost_usd"] = round(self.cost_usd, 8)
        data["limiter_wait_s"] = round(self.limiter_wait_s, 3)
        return data


def job_facts(settings: JobSettings) -> dict[str, Any]:
    """Return what a report shows about a job's settings (no secrets, no base URL)."""
    return {
        "input": settings.input,
        "output": settings.output,
        "dead_letter": settings.dead_letter_path(),
        "model": settings.model,
        "provider": settings.provider,
        "endpoint": settings.endpoint,
        "rpm": settings.rpm,
        "tpm": settings.tpm,
        "concurrency": settings.concurrency,
        "budget": settings.budget,
    }


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class TimelineRecorder:
    """Append one job's samples to its timeline file, at most one per ``interval`` seconds.

    Use ``start()`` before the run, ``update(progress)`` as the progress hook (or inside it),
    and ``finish(...)`` after it. Writing errors are not the job's: a recorder that cannot
    write stops recording and keeps the first error in ``error``.

    Args:
        path: The timeline file (see :func:`timeline_path`).
        facts: What the run header records about the job (see :func:`job_facts`).
        append: Add a run to an existing file (a resumed job) instead of starting it anew.
        interval: Seconds between samples.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        facts: Mapping[str, Any],
        *,
        append: bool = False,
        interval: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.facts = dict(facts)
        self.append = append
        self.interval = interval
        self.error: OSError | None = None
        self.samples = 0
        self._file: IO[str] | None = None
        self._last_t: float | None = None
        self._last: Sample | None = None

    def start(self) -> None:
        """Open the file and write the run's header."""
        run = 1
        if self.append and self.path.exists():
            run = 1 + sum(1 for r in read_timeline(self.path))
        try:
            self._file = open(self.path, "a" if self.append else "w", encoding="utf-8")  # noqa: SIM115
        except OSError as error:
            self.error = error
            return
        header = {"type": "run", "run": run, "started_at": _utc_now(), "job": self.facts}
        self._write(header)

    def update(self, progress: JobProgress) -> None:
        """Record ``progress`` if ``interval`` has (about) passed since the last sample, or final.

        A tick that comes a little early (timer jitter) still counts: 0.9 of the interval.
        """
        t = progress.elapsed_s
        if (
            self._last_t is not None
            and t - self._last_t < self.interval * 0.9
            and not progress.final
        ):
            return
        sample = Sample.from_progress(progress)
        if sample == self._last:
            return
        self._last_t, self._last = t, sample
        self.samples += 1
        self._write({"type": "sample", **sample.to_dict()})

    def finish(
        self,
        summary: Mapping[str, Any] | None,
        *,
        exit_status: int | None = None,
        error: str | None = None,
    ) -> None:
        """Write the run's end (its summary, exit status and error) and close the file."""
        end: dict[str, Any] = {"type": "end", "finished_at": _utc_now()}
        if self._last is not None:
            end["t"] = round(self._last.t, 3)
        end.update(summary=dict(summary) if summary is not None else None)
        end.update(exit_status=exit_status, error=error)
        self._write(end)
        self.close()

    def close(self) -> None:
        """Close the file (a run closed without ``finish`` reads as killed)."""
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as error:
                self.error = self.error or error

    def _write(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._file.flush()
        except OSError as error:
            self.error = error
            self.close()


@dataclasses.dataclass(slots=True)
class Run:
    """One run of a job as its timeline recorded it.

    Attributes:
        number: 1 for the first run, then one more per resume.
        started_at: UTC time the run started (ISO 8601).
        job: The job's facts (model, limits, files).
        samples: The run's samples, oldest first.
        end: The run's end record (summary, exit status, error), or ``None`` for a run that
            was killed or is still running.
    """

    number: int
    started_at: str | None
    job: dict[str, Any]
    samples: list[Sample] = dataclasses.field(default_factory=list)
    end: dict[str, Any] | None = None

    def to_dict(self, max_samples: int | None = None) -> dict[str, Any]:
        """Return the run as JSON-ready data, thinned to at most ``max_samples`` samples."""
        samples = self.samples
        if max_samples is not None and len(samples) > max_samples:
            step = -(-len(samples) // max_samples)
            samples = [*samples[:-1:step], samples[-1]]
        return {
            "number": self.number,
            "started_at": self.started_at,
            "job": self.job,
            "samples": [s.to_dict() for s in samples],
            "end": self.end,
        }


def read_timeline(path: str | os.PathLike[str]) -> list[Run]:
    """Read a timeline file: its runs, oldest first.

    A line that does not parse is skipped when it is the last one (a write cut by a crash);
    anywhere else it is an error.

    Raises:
        OSError: The file cannot be read.
        ValueError: A line before the last is not a timeline record (names the line).
    """
    runs: list[Run] = []
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind = record["type"]
        except (ValueError, TypeError, KeyError):
            if number == len(lines):
                break
            raise ValueError(f"{os.fspath(path)}:{number}: not a timeline record") from None
        if kind == "run" or not runs:
            job = record.get("job") if kind == "run" else None
            runs.append(
                Run(
                    number=int(record.get("run", len(runs) + 1)),
                    started_at=record.get("started_at"),
                    job=dict(job) if isinstance(job, dict) else {},
                )
            )
            if kind == "run":
                continue
        run = runs[-1]
        if kind == "sample":
            run.samples.append(Sample.from_dict(record))
        elif kind == "end":
            run.end = record
    return runs


__all__ = [
    "TIMELINE_SUFFIX",
    "Run",
    "Sample",
    "TimelineRecorder",
    "job_facts",
    "read_timeline",
    "timeline_path",
]
