"""What the server records of its jobs as they run: timelines and Prometheus metrics.

Each run of a job gets a :class:`~pipeline.jobs._timeline.TimelineRecorder` writing
``DATA_DIR/jobs/ID/output.jsonl.timeline.jsonl`` (one sample a second, the same file the CLI
writes next to its output; the dashboard reads it back) and feeds the server's one
:class:`~pipeline.jobs._metrics.JobMetrics`, labelled with the job's id and model, which
``/metrics`` exposes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.jobs import JobProgress, JobSettings, JobSummary
from pipeline.jobs._metrics import JobMetrics
from pipeline.jobs._timeline import Sample, TimelineRecorder, job_facts, timeline_path

__all__ = ["JobWatch", "Observers"]


class JobWatch:
    """One run of one job: its timeline, and its share of the server's metrics.

    Args:
        job_id: The job.
        settings: The run's settings (the model labels the metrics).
        metrics: The server's metrics.
        on_progress: Called with each snapshot after it is recorded (the job's live state).
    """

    def __init__(
        self,
        job_id: str,
        settings: JobSettings,
        metrics: JobMetrics,
        on_progress: Callable[[JobProgress], None],
    ) -> None:
        assert settings.output is not None
        self.job_id = job_id
        self.model = settings.model
        self.metrics = metrics
        self.on_progress = on_progress
        path = timeline_path(settings.output)
        facts = job_facts(settings)
        # the server's paths are its own business: the dashboard shows the job's id instead
        facts.update(input=None, output=job_id, dead_letter=None)
        self.recorder = TimelineRecorder(path, facts, append=Path(path).exists())
        self.recorder.start()
        metrics.start_run(job_id)

    def update(self, progress: JobProgress) -> None:
        """Record a snapshot (the job's ``on_progress``)."""
        self.recorder.update(progress)
        self.metrics.observe(self.job_id, self.model, Sample.from_progress(progress))
        self.on_progress(progress)

    def finish(self, summary: JobSummary | None, error: str | None = None) -> None:
        """Write the run's end to the timeline."""
        data: dict[str, Any] | None = summary.to_dict() if summary is not None else None
        if data is not None:
            data.pop("output", None)  # server paths stay out of what the dashboard shows
            data.pop("dead_letter", None)
        self.recorder.finish(data, error=error)


class Observers:
    """The server's metrics, and a :class:`JobWatch` for each run it starts."""

    def __init__(self) -> None:
        self.metrics = JobMetrics()

    def watch(
        self, job_id: str, settings: JobSettings, on_progress: Callable[[JobProgress], None]
    ) -> JobWatch:
        """Start recording a run of ``job_id``."""
        return JobWatch(job_id, settings, self.metrics, on_progress)

    def close(self) -> None:
        """Stop the metrics' meter provider."""
        self.metrics.shutdown()
