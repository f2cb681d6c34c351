"""What watches a CLI job while it runs: the progress display, the timeline, the metrics.

:class:`RunObserver` is the job's one progress hook. The job calls it every
:attr:`RunObserver.interval` seconds (the shortest of what its parts want); each part takes
what it needs: the display every ``display_interval`` seconds, the timeline
(``OUTPUT.timeline.jsonl``, read by ``python -m pipeline report``) one sample a second, and
the Prometheus metrics of ``--metrics-port`` at every call.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pipeline.jobs._timeline import Sample, TimelineRecorder, job_facts, timeline_path

if TYPE_CHECKING:
    from pipeline.cli._progress import ProgressDisplay
    from pipeline.jobs import JobProgress, JobSettings, JobSummary

TIMELINE_INTERVAL = 1.0


class RunObserver:
    """Feed a job's progress to its display, its timeline and its metrics.

    The timeline file is opened at the first snapshot, once the job holds its files: a job
    refused before it starts (another process runs it, a wrong URL) leaves any earlier
    timeline as it was. A resumed job appends a run to it; a new one starts it anew.

    Args:
        settings: The job.
        display: The progress display, or ``None`` (``--quiet``).
        display_interval: Seconds between two drawings of the display.
        metrics: A :class:`~pipeline.jobs._metrics.JobMetrics` to feed, or ``None``.
    """

    def __init__(
        self,
        settings: JobSettings,
        display: ProgressDisplay | None,
        display_interval: float,
        metrics: Any = None,
    ) -> None:
        assert settings.output is not None
        self.settings = settings
        self.display = display
        self.display_interval = display_interval
        self.metrics = metrics
        self.interval = min(display_interval, TIMELINE_INTERVAL)
        resuming = bool(settings.resume) and os.path.exists(settings.output + ".checkpoint.json")
        self.recorder = TimelineRecorder(
            timeline_path(settings.output),
            job_facts(settings),
            append=resuming,
            interval=TIMELINE_INTERVAL,
        )
        self.summary: JobSummary | None = None
        self.last: JobProgress | None = None
        self._started = False
        self._drawn_at: float | None = None

    def update(self, progress: JobProgress) -> None:
        """Take one progress snapshot (the job's ``on_progress``)."""
        self.last = progress
        if not self._started:
            self._started = True
            self.recorder.start()
        self.recorder.update(progress)
        if self.metrics is not None:
            self.metrics.observe(
                self.job_label, self.settings.model, Sample.from_progress(progress)
            )
        if self.display is not None and (
            progress.final
            or self._drawn_at is None
            or progress.elapsed_s - self._drawn_at >= self.display_interval - 1e-3
        ):
            self._drawn_at = progress.elapsed_s
            self.display.update(progress)

    @property
    def job_label(self) -> str:
        """The ``job`` label of the metrics: the output file's name."""
        return os.path.basename(self.settings.output or "")

    def finish(
        self, summary: JobSummary | None, *, exit_status: int, error: str | None = None
    ) -> None:
        """Record the run's end in the timeline (when it started)."""
        if self._started:
            data = summary.to_dict() if summary is not None else None
            self.recorder.finish(data, exit_status=exit_status, error=error)


__all__ = ["TIMELINE_INTERVAL", "RunObserver"]
