"""Running a job: :func:`run_job` hands it to the engine its settings name.

One process runs a job at a time: :func:`run_job` holds the job's
:class:`~pipeline.jobs._lock.JobLock` (an ``flock`` on ``OUTPUT.lock``) from before the journal
is opened until after the files are published, and refuses a second process at once.

An engine is a coroutine function ``(settings, options) -> JobSummary`` (:data:`ENGINES`): the
local engine (:mod:`pipeline.jobs._local`) and the Ray engine (:mod:`pipeline.jobs._ray`). An
engine builds its caller with :func:`~pipeline.jobs._caller.build_caller`, keeps its state in a
:func:`~pipeline.jobs._journal.journal_for` journal, and reports through
:func:`~pipeline.jobs._progress.make_progress` and
:func:`~pipeline.jobs._progress.make_summary`, so every engine's files, resume and summaries
are the same.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from pipeline.jobs._checks import check_job
from pipeline.jobs._local import run_local
from pipeline.jobs._lock import JobLock, lock_path
from pipeline.jobs._progress import JobSummary, ProgressHook, RunOptions, Waitable
from pipeline.jobs._settings import JobSettings
from stages.llm._limits import Limiter

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

Engine = Callable[[JobSettings, RunOptions], Awaitable[JobSummary]]
"""Runs a job whose settings are checked and whose input and output are set."""


async def run_on_ray(settings: JobSettings, options: RunOptions) -> JobSummary:
    """The Ray engine, imported on first use (a local job never loads its modules)."""
    from pipeline.jobs._ray import run_on_ray as engine

    return await engine(settings, options)


async def run_batch(settings: JobSettings, options: RunOptions) -> JobSummary:
    """The batch engine, imported on first use (a local job never loads its modules)."""
    from pipeline.jobs._batch import run_batch as engine

    return await engine(settings, options)


ENGINES: dict[str, Engine] = {"local": run_local, "ray": run_on_ray, "batch": run_batch}
"""The engines by the name ``JobSettings.engine`` gives (``batch`` when ``batch_api`` is set)."""


async def run_job(
    settings: JobSettings,
    *,
    on_progress: ProgressHook | None = None,
    stop_event: Waitable | None = None,
    stop_reason: str = "stop requested",
    progress_interval: float = 0.5,
    limiter: Limiter | None = None,
    metrics: MeterProvider | None = None,
    lock: JobLock | None = None,
    input_label: str | None = None,
    endpoint_limiters: Sequence[Limiter] | None = None,
) -> JobSummary:
    """Run a file job to the end (or until stopped) and return its summary.

    The engine is ``settings.engine``: ``local`` (one pipeline in this process) or ``ray``
    (Ray Data actors; extra ``[ray]``); with ``settings.batch_api`` it is the batch engine
    (:mod:`pipeline.jobs._batch`: the provider's Batch API, half the price).

    Args:
        settings: The job; its input and output must be set.
        on_progress: Called (sync or async) with a :class:`~pipeline.jobs.JobProgress` every
            ``progress_interval`` seconds and once at the end.
        stop_event: An event (anyio or asyncio): once set, no new request is sent (rows
            read but not sent are left for a resume), the requests in flight get
            ``settings.grace`` seconds to finish, then the run stops. The job stays resumable.
        stop_reason: The summary's ``stopped`` text when ``stop_event`` stops the job.
        progress_interval: Seconds between progress snapshots.
        limiter: A rate limiter shared with other jobs on the same API key (the HTTP server
            passes one per key), instead of one built from the settings (local engine).
        metrics: An OpenTelemetry meter provider for the pipeline's own instruments (the
            HTTP server passes one labelled with the job; local engine).
        lock: The job's :class:`~pipeline.jobs.JobLock`, when the caller holds it already
            (the HTTP server takes it before it marks the job running). By default the run
            takes it itself, before it touches the journal, and releases it after publishing.
        input_label: How dead letters name the input (``origin``) instead of its path
            (local engine).
        endpoint_limiters: With ``[[endpoints]]``: one limiter per endpoint, in order, shared
            with other jobs on the same endpoint (the HTTP server passes them; local engine).

    Returns:
        The summary; ``complete`` is true when the files were published.

    Raises:
        ConfigError: Invalid or contradictory settings, an unreadable input, an unknown file
            extension, a finished output without ``overwrite``, a prompt template naming a
            field the input's first row (or header) lacks, a checkpoint
            that does not match the settings (:class:`~pipeline.jobs._journal.ResumeError`),
            the Ray engine without Ray installed.
        JobLockedError: Another process runs this job (holds the lock on its output); the
            message names it (a :class:`ConfigError`: the CLI exits 2).
        JobFailedError: A fatal error stopped the job (a rejected key, no credit, an
            unreachable server, a full disk); what was done stays resumable.
    """
    settings.require_paths()
    assert settings.output is not None
    await anyio.to_thread.run_sync(check_job, settings)
    options = RunOptions(
        on_progress,
        stop_event,
        stop_reason,
        progress_interval,
        limiter,
        metrics,
        input_label,
        endpoint_limiters,
    )
    engine = "batch" if settings.batch_api else settings.engine
    if lock is not None:
        if not lock.held or lock.path != lock_path(settings.output):
            raise ValueError(f"lock must be held on {lock_path(settings.output)!r}")
        return await ENGINES[engine](settings, options)
    own = JobLock(settings.output)  # after check_job: its plain words come before the lock's
    await anyio.to_thread.run_sync(own.acquire)
    try:
        return await ENGINES[engine](settings, options)
    finally:
        own.release()


__all__ = ["ENGINES", "Engine", "run_job"]
