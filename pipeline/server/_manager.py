"""The job registry: one anyio task group for the life of the app, every job a task in it.

Each job runs :func:`pipeline.jobs.run_job` on the server's event loop, at most ``max_jobs`` at
once (the others wait as ``queued``). A server that stops (``drain``, SIGTERM) stops its jobs
at once and records them ``interrupted`` and ``resume_on_start`` (a crash leaves them
``running`` in ``job.json``); the next start resumes them by itself, once each, with the
journal's exactly-once resume (``resume_on_start=False`` leaves them ``interrupted``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from pipeline._errors import ConfigError
from pipeline.jobs import (
    JobFailedError,
    JobLock,
    JobLockedError,
    JobProgress,
    JobSettings,
    JobSummary,
    run_job,
)
from pipeline.jobs._journal import MANIFEST_SUFFIX
from pipeline.jobs._lock import shown_command
from pipeline.server._bodies import Submission
from pipeline.server._config import RequestError, ServerConfig
from pipeline.server._job import JOB_ID, RESUMABLE, Job, now, public_summary
from pipeline.server._limits import job_limiter
from pipeline.server._observe import Observers
from pipeline.server._settings import OUTPUT, job_settings
from stages.llm._limits import Limiter, RateLimiter

__all__ = ["JobManager"]

log = logging.getLogger("pipeline.server")

_INTERRUPTED = "the server stopped while the job ran"
CHECKPOINT = OUTPUT + MANIFEST_SUFFIX


class JobManager:
    """The job registry: submits, runs, cancels and resumes jobs in one task group.

    Use as an async context manager (the app's lifespan does): entering loads the jobs of the
    data directory, marking unfinished ones ``interrupted``; leaving stops the running ones,
    which then record themselves as ``interrupted``.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.jobs: dict[str, Job] = {}
        self.slots = anyio.Semaphore(config.max_jobs)
        self.enriching = 0
        self._tg: TaskGroup | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.observers = Observers()
        self._limiters: dict[tuple[Any, ...], RateLimiter] = {}

    def limiter_for(self, settings: JobSettings) -> Limiter:
        """Return the rate limiter a job or enrich call with ``settings`` uses.

        Jobs on one key share its quota: one job's 429 pauses the others, and what the server
        teaches through its rate-limit headers serves them all. That shared limiter is keyed by
        provider, base URL, the key's environment variable and model, and configured only by
        the operator (``max_rpm``, ``max_tpm``) and the provider's headers. A job's own
        ``rpm``/``tpm`` put a private limiter in front of it (:func:`job_limiter`): the job
        may go slower, the others do not notice.
        """
        key = (settings.provider, settings.base_url, settings.api_key_env, settings.model)
        own = {n: getattr(settings, n) for n in ("rpm", "tpm", "itpm", "otpm")}
        return job_limiter(self._shared(key), own)

    def endpoint_limiters(self, settings: JobSettings) -> list[Limiter] | None:
        """Return the limiters of a routed job's endpoints, in order (``None`` without).

        Each endpoint's quota is shared by every job and enrich call on it, as
        :meth:`limiter_for` shares one key's (and with single-endpoint jobs on the same
        provider, URL, key variable and model); an endpoint's own ``rpm``/``tpm`` put a private
        limiter in front of it.
        """
        if not settings.endpoints:
            return None
        found = []
        for d in settings.deployments():
            shared = self._shared((d.provider, d.base_url, d.api_key_env, d.model))
            found.append(job_limiter(shared, {"rpm": d.rpm, "tpm": d.tpm, "itpm": d.itpm,
                                              "otpm": d.otpm}))  # fmt: skip
        return found

    def _shared(self, key: tuple[Any, ...]) -> RateLimiter:
        """The limiter of one key's quota (configured only by the operator and the server)."""
        shared = self._limiters.get(key)
        if shared is None:
            shared = self._limiters[key] = RateLimiter(
                rpm=self.config.max_rpm, tpm=self.config.max_tpm
            )
        return shared

    @property
    def jobs_dir(self) -> Path:
        """The directory holding one directory per job."""
        return self.config.data_dir / "jobs"

    async def __aenter__(self) -> JobManager:
        await anyio.to_thread.run_sync(self._load)
        self._loop = asyncio.get_running_loop()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        if self.config.resume_on_start:
            self._resume_interrupted()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        active = self.drain()
        with anyio.move_on_after(self.config.shutdown_grace):
            for job in active:
                await job.done.wait()
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(*exc_info)
        finally:
            self.observers.close()

    @property
    def ready(self) -> bool:
        """Whether the server takes jobs (started, and not stopping)."""
        return self._tg is not None and not self._closing

    def running(self) -> int:
        """Return how many jobs run now."""
        return sum(1 for job in self.jobs.values() if job.status == "running")

    def drain(self) -> list[Job]:
        """Stop taking jobs and stop the running and queued ones; return those still active.

        They record themselves ``interrupted`` and ``resume_on_start``: their journals hold
        every answered row, and the next start resumes them. Safe to call more than once.
        """
        self._closing = True
        active = [job for job in self.jobs.values() if not job.done.is_set()]
        for job in active:
            self._stop(job, "interrupted")
        return active

    def drain_threadsafe(self) -> None:
        """Call :meth:`drain` on the server's event loop (from a signal handler or a thread)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.drain)

    def _resume_interrupted(self) -> None:
        """Start again the jobs a stopped or killed server left, once each.

        A job whose output is published and has no checkpoint finished before the server
        died (it crashed before recording that): it is left as it is, never run again.
        """
        for job in self.jobs.values():
            published = (job.dir / OUTPUT).exists() and not (job.dir / CHECKPOINT).exists()
            if job.record.get("resume_on_start") and job.status in RESUMABLE and not published:
                job.update(status="queued", error=None, stopped=None, resume_on_start=False)
                self._start(job, resume=True)
                log.info("job %s resumed: the server stopped while it ran", job.id)

    def _load(self) -> None:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        for entry in sorted(self.jobs_dir.iterdir()):
            if not JOB_ID.match(entry.name):
                continue
            try:
                record = json.loads((entry / "job.json").read_bytes())
            except (OSError, ValueError) as error:
                log.warning("skipping job %s: unreadable job.json (%s)", entry.name, error)
                continue
            job = Job(entry.name, entry, record)
            if not job.terminal:  # the server stopped without recording the job's end
                job.record.update(status="interrupted", stopped=_INTERRUPTED)
                job.record.update(resume_on_start=True)
                job.save()
            if job.status in RESUMABLE:
                job.count_journal()
            self.jobs[job.id] = job
        if self.jobs:
            log.info("loaded %d job(s) from %s", len(self.jobs), self.jobs_dir)

    # -- lifecycle ------------------------------------------------------------------------

    async def submit(
        self, submission: Submission, given: dict[str, Any], owner: str = "anonymous"
    ) -> Job:
        """Store a new job's input and record, and start it (it may wait as ``queued``).

        Args:
            submission: The job's checked input (its bytes, format and row count).
            given: Its checked settings.
            owner: The fingerprint of the token that submitted it (jobs per token).

        Raises:
            RequestError: 429 when too many jobs wait (in all, or for this token), 503 when
                the server is stopping.
        """
        self._check_capacity(owner)
        job = await anyio.to_thread.run_sync(self._store, submission, given, owner)
        self.jobs[job.id] = job
        self._start(job, resume=False)
        log.info(
            "job %s submitted: %d %s rows, model %s",
            job.id, submission.count, submission.fmt, given.get("model"),
        )  # fmt: skip
        return job

    def _store(self, submission: Submission, given: dict[str, Any], owner: str) -> Job:
        job_id = secrets.token_hex(16)
        directory = self.jobs_dir / job_id
        directory.mkdir(parents=True)
        name = f"input.{submission.fmt}"
        try:
            with open(directory / name, "wb") as f:
                f.write(submission.data)
                f.flush()
                os.fsync(f.fileno())
            record = {
                "id": job_id,
                "status": "queued",
                "created_at": now(),
                "rows": submission.count,
                "input_format": submission.fmt,
                "settings": given,
                "runs": 0,
                "owner": owner,
            }
            job = Job(job_id, directory, record)
            job.save()
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return job

    def resume(self, job: Job) -> None:
        """Continue a job that stopped before its end, exactly once.

        Raises:
            RequestError: 409 when the job is running or finished.
        """
        if job.status not in RESUMABLE:
            raise RequestError(409, f"job {job.id} is {job.status}; only a stopped job resumes")
        self._check_capacity(str(job.record.get("owner", "anonymous")))
        job.update(status="queued", error=None, stopped=None)
        self._start(job, resume=True)

    def cancel(self, job: Job) -> None:
        """Stop a queued or running job; rows in flight stop, finished rows are kept.

        Raises:
            RequestError: 409 when the job already ended.
        """
        if job.terminal:
            raise RequestError(409, f"job {job.id} already ended ({job.status})")
        self._stop(job, "cancelled")
        if job.status == "running":
            job.update(status="cancelling")

    def get(self, job_id: str) -> Job:
        """Return a job by id.

        Raises:
            RequestError: 404 for an unknown (or malformed) id.
        """
        job = self.jobs.get(job_id) if JOB_ID.match(job_id) else None
        if job is None:
            raise RequestError(404, f"no job {job_id!r}")
        return job

    def _check_capacity(self, owner: str) -> None:
        if self._closing or self._tg is None:
            raise RequestError(503, "the server is stopping")
        active = [j for j in self.jobs.values() if not j.terminal]
        if len(active) >= self.config.max_jobs + self.config.max_queued:
            raise RequestError(
                429,
                f"{len(active)} jobs are running or waiting (limit {self.config.max_jobs} "
                f"running, {self.config.max_queued} waiting); try again later",
            )
        mine = sum(1 for j in active if j.record.get("owner", "anonymous") == owner)
        if mine >= self.config.max_jobs_per_token:
            raise RequestError(
                429,
                f"this token has {mine} jobs running or waiting (limit "
                f"{self.config.max_jobs_per_token} per token); wait for one to end",
            )

    def _start(self, job: Job, *, resume: bool) -> None:
        assert self._tg is not None
        job.stop_event = anyio.Event()
        job.stop_why = None
        job.done = anyio.Event()
        job.progress = None
        self._tg.start_soon(self._run, job, resume, name=f"job {job.id}")

    def _stop(self, job: Job, why: str) -> None:
        if job.stop_why is None:
            job.stop_why = why
        if job.stop_event is not None:
            job.stop_event.set()
        job.notify()

    # -- one run --------------------------------------------------------------------------

    async def _run(self, job: Job, resume: bool) -> None:
        try:
            assert job.stop_event is not None
            async with _acquire_or_stop(self.slots, job.stop_event) as acquired:
                if not acquired:  # stopped while it waited for a slot
                    self._finish_stopped(job, None)
                    return
                await self._execute(job, resume)
        finally:
            job.done.set()
            job.notify()

    async def _execute(self, job: Job, resume: bool) -> None:
        command = f"{shown_command(sys.argv)} (job {job.id})"
        lock = JobLock(str(job.dir / OUTPUT), command=command)
        try:
            await anyio.to_thread.run_sync(lock.acquire)
        except JobLockedError as error:  # another server process on this data dir runs it
            text = self.config.scrub(f"another server process runs this job: {error.holder}")
            job.record.update(status="interrupted", stopped=None, error=text)
            job.notify()  # its record on disk is the other process's to write
            log.warning("job %s not started: %s", job.id, text)
            return
        try:
            await self._execute_locked(job, resume, lock)
        finally:
            lock.release()

    async def _execute_locked(self, job: Job, resume: bool, lock: JobLock) -> None:
        assert job.stop_event is not None
        job.update(
            status="running",
            started_at=now(),
            finished_at=None,
            runs=int(job.record.get("runs", 0)) + 1,
        )
        if job.stop_why is not None:  # cancelled between the queue and here
            job.stop_event.set()
        try:
            summary = await self._run_job(job, resume, lock)
        except anyio.get_cancelled_exc_class():
            job.update(
                status="interrupted", finished_at=now(), stopped=_INTERRUPTED, resume_on_start=True
            )
            raise
        except JobFailedError as error:
            self._finish_failed(job, str(error), error.summary)
            return
        except ConfigError as error:
            self._finish_failed(job, str(error), None)
            return
        except Exception as error:
            log.exception("job %s failed on an unexpected error", job.id)
            self._finish_failed(job, f"internal error: {type(error).__name__}: {error}", None)
            return
        if summary.complete:
            self._finish_succeeded(job, summary)
        else:
            self._finish_stopped(job, summary)

    async def _run_job(self, job: Job, resume: bool, lock: JobLock) -> JobSummary:
        def on_progress(progress: JobProgress) -> None:
            job.progress = progress
            job.notify()

        settings = job_settings(
            self.config,
            job.record["settings"],
            job.dir,
            resume=resume,
            input_format=str(job.record.get("input_format", "jsonl")),
        )
        watch = self.observers.watch(job.id, settings, on_progress)  # timeline and metrics
        try:
            summary = await run_job(
                settings,
                on_progress=watch.update,
                stop_event=job.stop_event,
                stop_reason=job.stop_why or "stop requested",
                progress_interval=self.config.progress_interval,
                limiter=self.limiter_for(settings),
                metrics=self.observers.metrics.provider_for(job.id, settings.model),
                endpoint_limiters=self.endpoint_limiters(settings),
                lock=lock,
                input_label=Path(settings.input or "input").name,  # not the server's path
            )
        except JobFailedError as error:
            watch.finish(error.summary, error=self.config.scrub(str(error)))
            raise
        except BaseException as error:
            watch.finish(None, error=self.config.scrub(f"{type(error).__name__}: {error}"))
            raise
        watch.finish(summary)
        return summary

    def _finish_succeeded(self, job: Job, summary: JobSummary) -> None:
        job.update(
            status="succeeded",
            finished_at=now(),
            summary=public_summary(summary),
            stopped=None,
            error=None,
        )
        log.info(
            "job %s succeeded: %d ok, %d failed", job.id, summary.total_ok, summary.total_failed
        )

    def _finish_stopped(self, job: Job, summary: JobSummary | None) -> None:
        why = job.stop_why
        status = why if why in ("cancelled", "interrupted") else "stopped"
        reason = {"cancelled": "cancelled by a client", "interrupted": _INTERRUPTED}.get(
            why or "", summary.stopped if summary is not None else None
        )
        job.update(
            status=status,
            finished_at=now(),
            summary=public_summary(summary) if summary is not None else job.record.get("summary"),
            stopped=reason,
            resume_on_start=status == "interrupted",
        )
        log.info("job %s %s", job.id, status)

    def _finish_failed(self, job: Job, message: str, summary: JobSummary | None) -> None:
        text = self.config.scrub(message)
        job.update(
            status="failed",
            finished_at=now(),
            error=text,
            summary=public_summary(summary) if summary is not None else None,
        )
        log.warning("job %s failed: %s", job.id, text)


@asynccontextmanager
async def _acquire_or_stop(slots: anyio.Semaphore, stop: anyio.Event) -> AsyncIterator[bool]:
    """Take a job slot, unless the job is stopped while it waits; yield whether it got one."""
    got = False
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            await stop.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        await slots.acquire()
        got = True
        tg.cancel_scope.cancel()
    try:
        yield got
    finally:
        if got:
            slots.release()
