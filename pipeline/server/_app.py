"""The HTTP service: ``python -m pipeline serve`` runs file jobs and small batches over HTTP.

Routes (all JSON unless said; every route needs ``Authorization: Bearer TOKEN`` when the token
variable is set)::

    POST   /v1/jobs                 submit: JSON {"rows": [...], "settings": {...}}, or a
                                    multipart upload (file=@rows.jsonl, settings='{...}');
                                    202 {"id": ..., "status": "queued"} at once
    GET    /v1/jobs                 every job, newest first
    GET    /v1/jobs/{id}            status and live counters
    GET    /v1/jobs/{id}/results    output rows as NDJSON, streamed as they complete
    GET    /v1/jobs/{id}/failed     dead-letter records as NDJSON, likewise
    GET    /v1/jobs/{id}/events     Server-Sent Events: ``progress`` while it runs, then ``end``
    DELETE /v1/jobs/{id}            cancel: rows in flight stop, finished rows are kept
    POST   /v1/jobs/{id}/resume     continue an interrupted, cancelled or failed job
    POST   /v1/enrich               a small batch answered synchronously, streamed as NDJSON
    GET    /healthz                 liveness; /docs and /openapi.json describe the API

How it works. A :class:`JobManager` owns one anyio task group for the life of the app (the
ASGI lifespan); every job is a task in it, running :func:`pipeline.jobs.run_job` on the server's
event loop, at most ``max_jobs`` at once (the others wait as ``queued``). A job lives in its own
directory under ``DATA_DIR/jobs/ID/``: the uploaded ``input.jsonl``, the job's record
``job.json`` (rewritten atomically on every change of state), and the job's crash-safe journal
(``output.jsonl.partial`` while it runs, ``output.jsonl`` once published). Results are streamed
by tailing the journal through an open file descriptor, so a client that connects early gets
rows as they are committed, and the descriptor keeps reading the journal even after the job
publishes and removes it; a client that connects after the end reads the published file.

A server stopped with jobs running marks them ``interrupted`` (a crash leaves them ``running``
in ``job.json``, which the next start turns into ``interrupted``). ``POST .../resume`` continues
such a job with the journal's exactly-once resume: rows already answered are not sent again.

Security: a request's settings are the CLI's, minus everything that names a file or a server
resource (paths, cache, Redis limiter, Ray, tracing); ``api_key_env`` must be a variable the
server allows and ``base_url`` a URL it allows, so a request cannot make the server send its
key elsewhere; credential headers are refused. The provider key is never part of a response or
a log line, and error texts are scrubbed of it. Uploads are bounded in bytes (413) and rows
(422). Without a token the server only binds to a loopback address.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hmac
import io
import json
import logging
import math
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from pipeline._envelope import Failed
from pipeline._errors import ConfigError, FatalError
from pipeline.jobs._job import JobFailedError, JobProgress, JobSettings, JobSummary, run_job
from stages.files._records import atomic_write
from stages.llm._limits import RateLimiter

try:
    from fastapi import FastAPI, Request, Security
    from fastapi.responses import JSONResponse, StreamingResponse
    from fastapi.security import HTTPBearer
except ImportError as exc:  # pragma: no cover - the [server] extra
    raise ImportError("the server needs FastAPI: pip install 'llm-pipeline[server]'") from exc

__all__ = ["JobManager", "ServerConfig", "create_app", "main"]

log = logging.getLogger("pipeline.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "interrupted", "stopped"})
RESUMABLE = frozenset({"failed", "cancelled", "interrupted", "stopped"})
DEFAULT_KEY_ENVS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AZURE_OPENAI_API_KEY")
SERVER_ONLY = frozenset(
    {
        "resume",
        "overwrite",
        "limiter",
        "engine",
        "ray_address",
        "trace",
        "quiet",
        "input_format",
        "output_format",
        "grace",
    }
)
"""Settings a request may not give: the server decides them (or they name its resources)."""

_SENSITIVE_HEADERS = frozenset({"authorization", "api-key", "x-api-key", "proxy-authorization"})
_ID = re.compile(r"^[0-9a-f]{32}$")
_OUTPUT = "output.jsonl"
_FAILED = _OUTPUT + ".failed.jsonl"
_PARTIAL = ".partial"


@dataclasses.dataclass(kw_only=True)
class ServerConfig:
    """How the server runs and what it accepts.

    Attributes:
        data_dir: Where jobs, their inputs and their results are kept.
        token: The bearer token every request must present (``None``: no authentication,
            for a loopback-only server).
        max_jobs: Jobs running at once; more wait as ``queued``.
        max_queued: Jobs waiting at most; past that a submission gets 429.
        max_upload_bytes: Largest request body (413 past it).
        max_rows: Most rows in one job (422 past it).
        max_enrich_rows: Most rows in one ``POST /v1/enrich``.
        base_url: The API root jobs use unless they name one of ``allowed_base_urls``.
        allowed_base_urls: Other API roots a request may name.
        allowed_key_envs: Environment variables a request may name as ``api_key_env``.
        progress_interval: Seconds between progress snapshots (events, live counters).
        shutdown_grace: Seconds a stopping server waits for its jobs to record their state.
    """

    data_dir: Path
    token: str | None = None
    max_jobs: int = 4
    max_queued: int = 64
    max_upload_bytes: int = 64 << 20
    max_rows: int = 1_000_000
    max_enrich_rows: int = 100
    base_url: str | None = None
    allowed_base_urls: tuple[str, ...] = ()
    allowed_key_envs: tuple[str, ...] = DEFAULT_KEY_ENVS
    progress_interval: float = 0.2
    shutdown_grace: float = 10.0

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        for name in ("max_jobs", "max_upload_bytes", "max_rows", "max_enrich_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server setting {name} must be >= 1, got {getattr(self, name)}")
        if self.max_queued < 0:
            raise ConfigError(f"server setting max_queued must be >= 0, got {self.max_queued}")
        if self.token is not None and len(self.token) < 16:
            raise ConfigError("the server token must be at least 16 characters long")

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["token"] = "***" if self.token else None
        return f"ServerConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def secrets(self) -> list[str]:
        """Values that must never appear in a response or a log: the token and the keys."""
        found = [self.token] if self.token else []
        found += [os.environ[n] for n in self.allowed_key_envs if os.environ.get(n)]
        return [s for s in found if len(s) >= 4]


class RequestError(Exception):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- jobs ----------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


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
            return {
                "rows_total": self.record.get("rows"),
                "rows_done": summary.get("total_ok", 0) + summary.get("total_failed", 0),
                "ok": summary.get("ok", 0),
                "failed": summary.get("failed", 0),
                "skipped": summary.get("resumed_skipped", 0),
                "requests": summary.get("requests", 0),
                "retries": summary.get("retries", 0),
                "prompt_tokens": summary.get("prompt_tokens", 0),
                "completion_tokens": summary.get("completion_tokens", 0),
                "cost_usd": summary.get("cost_usd", 0.0),
                "elapsed_s": summary.get("elapsed_s", 0.0),
                "rows_per_s": summary.get("rows_per_s", 0.0),
            }
        return {"rows_total": self.record.get("rows"), "rows_done": 0, "ok": 0, "failed": 0}

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
        self._limiters: dict[tuple[Any, ...], RateLimiter] = {}

    def limiter_for(self, settings: JobSettings) -> RateLimiter:
        """Return the rate limiter shared by every job and enrich call on the same API key.

        Jobs on one key share its quota: one job's 429 pauses the others, and what the server
        teaches through its rate-limit headers serves them all. Keyed by provider, base URL, the
        key's environment variable and model; the first job's ``rpm``/``tpm`` set the limits
        (later jobs may lower them, never raise them).
        """
        key = (settings.provider, settings.base_url, settings.api_key_env, settings.model)
        limiter = self._limiters.get(key)
        if limiter is None:
            limiter = self._limiters[key] = RateLimiter(rpm=settings.rpm, tpm=settings.tpm)
        else:
            limiter.lower(rpm=settings.rpm, tpm=settings.tpm)
        return limiter

    @property
    def jobs_dir(self) -> Path:
        """The directory holding one directory per job."""
        return self.config.data_dir / "jobs"

    async def __aenter__(self) -> JobManager:
        await anyio.to_thread.run_sync(self._load)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        self._closing = True
        active = [job for job in self.jobs.values() if not job.done.is_set()]
        for job in active:
            self._stop(job, "interrupted")
        with anyio.move_on_after(self.config.shutdown_grace):
            for job in active:
                await job.done.wait()
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(*exc_info)

    def _load(self) -> None:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        for entry in sorted(self.jobs_dir.iterdir()):
            if not _ID.match(entry.name):
                continue
            try:
                record = json.loads((entry / "job.json").read_bytes())
            except (OSError, ValueError) as error:
                log.warning("skipping job %s: unreadable job.json (%s)", entry.name, error)
                continue
            job = Job(entry.name, entry, record)
            if not job.terminal:  # the server stopped without recording the job's end
                job.record.update(
                    status="interrupted", stopped="the server stopped while the job ran"
                )
                job.save()
            self.jobs[job.id] = job
        if self.jobs:
            log.info("loaded %d job(s) from %s", len(self.jobs), self.jobs_dir)

    # -- settings -------------------------------------------------------------------------

    def check_settings(self, raw: Any) -> dict[str, Any]:
        """Validate a request's settings; return them normalised (``-`` keys as ``_``).

        Raises:
            RequestError: 422 naming the setting at fault.
        """
        if not isinstance(raw, Mapping):
            raise RequestError(422, "settings must be a JSON object")
        given = {str(k).replace("-", "_"): v for k, v in raw.items()}
        for name in sorted(given):
            if name in SERVER_ONLY:
                raise RequestError(422, f"setting {name!r} is decided by the server")
        env = given.get("api_key_env")
        if env is not None and env not in self.config.allowed_key_envs:
            allowed = ", ".join(self.config.allowed_key_envs) or "none"
            raise RequestError(
                422, f"api_key_env {env!r} is not allowed on this server (allowed: {allowed})"
            )
        url = given.get("base_url")
        if (
            url is not None
            and url != self.config.base_url
            and url not in self.config.allowed_base_urls
        ):
            raise RequestError(
                422,
                "base_url is not allowed on this server: its key is sent only to the API "
                "roots the server was started with (--base-url, --allow-base-url)",
            )
        headers = given.get("headers")
        if isinstance(headers, Mapping):
            for name in headers:
                if str(name).lower() in _SENSITIVE_HEADERS:
                    raise RequestError(
                        422, f"header {name!r} carries a credential; the server uses its own key"
                    )
        try:
            settings = JobSettings.from_mapping(given, allow_paths=False)
        except ConfigError as error:
            raise RequestError(422, str(error)) from None
        if not settings.model:
            raise RequestError(422, "setting 'model' is required")
        return given

    def job_settings(self, given: Mapping[str, Any], job_dir: Path, *, resume: bool) -> JobSettings:
        """Build the settings of one run of a job from its request settings."""
        settings = JobSettings.from_mapping(given, allow_paths=False)
        return settings.replace(
            input=str(job_dir / "input.jsonl"),
            output=str(job_dir / _OUTPUT),
            input_format="jsonl",
            output_format="jsonl",
            base_url=settings.base_url or self.config.base_url,
            quiet=True,
            grace=0.0,
            resume=resume,
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def submit(self, rows: bytes, count: int, given: dict[str, Any]) -> Job:
        """Store a new job's input and record, and start it (it may wait as ``queued``).

        Raises:
            RequestError: 429 when too many jobs wait, 503 when the server is stopping.
        """
        self._check_capacity()
        job = await anyio.to_thread.run_sync(self._store, rows, count, given)
        self.jobs[job.id] = job
        self._start(job, resume=False)
        log.info("job %s submitted: %d rows, model %s", job.id, count, given.get("model"))
        return job

    def _store(self, rows: bytes, count: int, given: dict[str, Any]) -> Job:
        job_id = secrets.token_hex(16)
        directory = self.jobs_dir / job_id
        directory.mkdir(parents=True)
        try:
            with open(directory / "input.jsonl", "wb") as f:
                f.write(rows)
                f.flush()
                os.fsync(f.fileno())
            record = {
                "id": job_id,
                "status": "queued",
                "created_at": _now(),
                "rows": count,
                "settings": given,
                "runs": 0,
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
        self._check_capacity()
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

    def _check_capacity(self) -> None:
        if self._closing or self._tg is None:
            raise RequestError(503, "the server is stopping")
        active = sum(1 for j in self.jobs.values() if not j.terminal)
        if active >= self.config.max_jobs + self.config.max_queued:
            raise RequestError(
                429,
                f"{active} jobs are running or waiting (limit {self.config.max_jobs} running, "
                f"{self.config.max_queued} waiting); try again later",
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

    async def _run(self, job: Job, resume: bool) -> None:
        try:
            await self._run_job(job, resume)
        finally:
            job.done.set()
            job.notify()

    async def _run_job(self, job: Job, resume: bool) -> None:
        assert job.stop_event is not None
        async with _acquire_or_stop(self.slots, job.stop_event) as acquired:
            if not acquired:  # stopped while it waited for a slot
                self._finish_stopped(job, None)
                return
            await self._execute(job, resume)

    async def _execute(self, job: Job, resume: bool) -> None:
        assert job.stop_event is not None
        job.update(
            status="running",
            started_at=_now(),
            finished_at=None,
            runs=int(job.record.get("runs", 0)) + 1,
        )
        if job.stop_why is not None:  # cancelled between the queue and here
            job.stop_event.set()

        def on_progress(progress: JobProgress) -> None:
            job.progress = progress
            job.notify()

        summary: JobSummary | None = None
        try:
            settings = self.job_settings(job.record["settings"], job.dir, resume=resume)
            summary = await run_job(
                settings,
                on_progress=on_progress,
                stop_event=job.stop_event,
                stop_reason=job.stop_why or "stop requested",
                progress_interval=self.config.progress_interval,
                limiter=self.limiter_for(settings),
            )
        except anyio.get_cancelled_exc_class():
            job.update(
                status="interrupted",
                finished_at=_now(),
                stopped="the server stopped while the job ran",
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
            job.update(
                status="succeeded",
                finished_at=_now(),
                summary=_public_summary(summary),
                stopped=None,
                error=None,
            )
            log.info(
                "job %s succeeded: %d ok, %d failed", job.id, summary.total_ok, summary.total_failed
            )
        else:
            self._finish_stopped(job, summary)

    def _finish_stopped(self, job: Job, summary: JobSummary | None) -> None:
        why = job.stop_why
        status = why if why in ("cancelled", "interrupted") else "stopped"
        reason = {
            "cancelled": "cancelled by a client",
            "interrupted": "the server stopped while the job ran",
        }.get(why or "", summary.stopped if summary is not None else None)
        job.update(
            status=status,
            finished_at=_now(),
            summary=_public_summary(summary) if summary is not None else job.record.get("summary"),
            stopped=reason,
        )
        log.info("job %s %s", job.id, status)

    def _finish_failed(self, job: Job, message: str, summary: JobSummary | None) -> None:
        text = self.scrub(message)
        job.update(
            status="failed",
            finished_at=_now(),
            error=text,
            summary=_public_summary(summary) if summary is not None else None,
        )
        log.warning("job %s failed: %s", job.id, text)

    def scrub(self, text: str) -> str:
        """Remove the server's secrets from a text."""
        for secret in self.config.secrets():
            text = text.replace(secret, "***")
        return text

    def get(self, job_id: str) -> Job:
        """Return a job by id.

        Raises:
            RequestError: 404 for an unknown (or malformed) id.
        """
        job = self.jobs.get(job_id) if _ID.match(job_id) else None
        if job is None:
            raise RequestError(404, f"no job {job_id!r}")
        return job


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


def _public_summary(summary: JobSummary) -> dict[str, Any]:
    data = summary.to_dict()
    data.pop("output", None)  # server paths stay on the server
    data.pop("dead_letter", None)
    return data


# -- reading results -----------------------------------------------------------------------


async def tail_rows(job: Job, kind: str, *, poll: float = 1.0) -> AsyncIterator[bytes]:
    """Yield a job's output rows (``kind="results"``) or dead letters (``"failed"``) as NDJSON.

    While the job runs, its journal is read through an open descriptor from the last complete
    record on, waking at every progress snapshot (or every ``poll`` seconds); the descriptor
    still reads the journal after the job publishes and unlinks it. After the job ended the
    published file is read. Each yielded chunk holds whole lines.
    """
    final = job.dir / (_OUTPUT if kind == "results" else _FAILED)
    partial = Path(str(final) + _PARTIAL)
    fd: int | None = None
    try:
        while fd is None:
            ended = job.terminal
            changed = job.changed
            fd = _open_or_none(partial)
            if fd is not None:
                break
            published = _open_or_none(final)
            if published is not None:
                async for chunk in _read_plain(published):
                    yield chunk
                return
            if ended:
                return
            with anyio.move_on_after(poll):
                await changed.wait()
        position = 0
        while True:
            ended = job.terminal
            changed = job.changed
            while True:
                data = await anyio.to_thread.run_sync(os.pread, fd, 1 << 20, position)
                cut = data.rfind(b"\n")
                if cut < 0:
                    break
                position += cut + 1
                out = _payloads(data[: cut + 1])
                if out:
                    yield out
            if ended:
                return
            with anyio.move_on_after(poll):
                await changed.wait()
    finally:
        if fd is not None:
            os.close(fd)


def _open_or_none(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None


async def _read_plain(fd: int) -> AsyncIterator[bytes]:
    """Yield a published file's bytes (NDJSON already), closing ``fd`` at the end."""
    try:
        position = 0
        while True:
            data = await anyio.to_thread.run_sync(os.pread, fd, 1 << 20, position)
            if not data:
                return
            position += len(data)
            yield data
    finally:
        os.close(fd)


def _payloads(records: bytes) -> bytes:
    """Turn complete journal records (line, key, payload; tab-separated) into NDJSON lines."""
    out = io.BytesIO()
    for record in records.splitlines(keepends=True):
        parts = record.split(b"\t", 2)
        if len(parts) == 3 and parts[2].strip():
            payload = parts[2]
            out.write(payload if payload.endswith(b"\n") else payload + b"\n")
    return out.getvalue()


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# -- HTTP plumbing -------------------------------------------------------------------------


class _TooLargeError(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than the limit of {_mb(limit)}")


def _mb(limit: int) -> str:
    return f"{limit / (1 << 20):g} MB" if limit >= 1 << 20 else f"{limit} bytes"


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: Any = ()) -> None:
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})


class _Guard:
    """ASGI middleware: the bearer token on every route, and the request body size limit."""

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app = app
        self.token = config.token.encode() if config.token else None
        self.limit = config.max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        if self.token is not None:
            given = headers.get(b"authorization", b"")
            scheme, _, value = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token):
                await _send_json(
                    send,
                    401,
                    {"detail": "missing or wrong bearer token"},
                    [(b"www-authenticate", b"Bearer")],
                )
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_json(send, 413, {"detail": str(_TooLargeError(self.limit))})
            return
        seen = 0
        limit = self.limit

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLargeError(limit)
            return message

        await self.app(scope, limited, send)


def _parse_rows(raw: Any, where: str, limit: int) -> tuple[bytes, int]:
    """Return rows as JSONL bytes and their count, from a JSON list."""
    if not isinstance(raw, list):
        raise RequestError(422, f"{where} must be a JSON list of rows")
    if not raw:
        raise RequestError(422, f"{where} is empty: a job needs at least one row")
    if len(raw) > limit:
        raise RequestError(422, f"{len(raw)} rows is more than this server's limit of {limit}")
    lines = [json.dumps(row, ensure_ascii=False, separators=(",", ":")) for row in raw]
    return ("\n".join(lines) + "\n").encode(), len(lines)


def _count_jsonl(data: bytes, limit: int) -> tuple[bytes, int]:
    """Check an uploaded JSONL file's size in rows; return it (ending in a newline) and count."""
    count = sum(1 for line in data.splitlines() if line.strip())
    if count == 0:
        raise RequestError(422, "the uploaded file has no rows")
    if count > limit:
        raise RequestError(422, f"{count} rows is more than this server's limit of {limit}")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(422, f"the uploaded file is not UTF-8 text ({error})") from None
    return (data if data.endswith(b"\n") else data + b"\n"), count


async def _read_submission(request: Request, config: ServerConfig) -> tuple[bytes, int, Any]:
    """Return (rows as JSONL, row count, raw settings) from a JSON body or a multipart upload."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=8)
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise RequestError(422, "the multipart form needs a 'file' part with the rows")
            data = await upload.read()
            settings_text = form.get("settings") or "{}"
            if not isinstance(settings_text, str):
                raise RequestError(422, "the 'settings' part must be JSON text")
            try:
                settings = json.loads(settings_text)
            except ValueError as error:
                raise RequestError(422, f"the 'settings' part is not valid JSON: {error}") from None
        finally:
            await form.close()
        rows, count = _count_jsonl(data, config.max_rows)
        return rows, count, settings
    body = await request.body()
    if kind in ("application/x-ndjson", "application/jsonl", "application/x-jsonlines"):
        raise RequestError(
            415, "send JSONL as a multipart upload (file=@rows.jsonl) with a 'settings' part"
        )
    try:
        data = json.loads(body)
    except ValueError as error:
        raise RequestError(422, f"the body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise RequestError(422, 'the body must be a JSON object: {"rows": [...], "settings": {}}')
    unknown = sorted(set(data) - {"rows", "settings"})
    if unknown:
        raise RequestError(422, f"unknown field(s) {', '.join(map(repr, unknown))} in the body")
    rows, count = _parse_rows(data.get("rows"), "rows", config.max_rows)
    return rows, count, data.get("settings", {})


# -- the app -------------------------------------------------------------------------------


def create_app(config: ServerConfig) -> FastAPI:
    """Build the FastAPI app serving jobs from ``config.data_dir``.

    The job manager lives in the app's lifespan (``app.state.jobs`` while it runs).
    """
    manager = JobManager(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with manager:
            app.state.jobs = manager
            yield

    bearer = HTTPBearer(auto_error=False, description="the server's token, when it has one")
    app = FastAPI(
        title="llm-pipeline",
        summary="Run LLM enrichment jobs over HTTP: limits, retries and exactly-once resume.",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=[Security(bearer)],  # documents the scheme; _Guard enforces it
    )
    app.state.jobs = manager
    app.add_middleware(_Guard, config=config)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"detail": manager.scrub(str(error))}, status_code=error.status)

    @app.exception_handler(_TooLargeError)
    async def too_large(request: Request, error: _TooLargeError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=413)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, Any]:
        running = sum(1 for j in manager.jobs.values() if j.status == "running")
        return {"status": "ok", "jobs_running": running}

    @app.post("/v1/jobs", status_code=202, summary="Submit a job")
    async def submit(request: Request) -> dict[str, Any]:
        """Submit rows (a JSON list, or a JSONL multipart upload) and the job's settings."""
        rows, count, raw_settings = await _read_submission(request, config)
        given = manager.check_settings(raw_settings)
        job = await manager.submit(rows, count, given)
        return job.public()

    @app.get("/v1/jobs", summary="List jobs")
    async def list_jobs() -> dict[str, Any]:
        jobs = sorted(manager.jobs.values(), key=lambda j: j.record.get("created_at", ""))
        return {"jobs": [j.public() for j in reversed(jobs)]}

    @app.get("/v1/jobs/{job_id}", summary="Status and live counters")
    async def get_job(job_id: str) -> dict[str, Any]:
        return manager.get(job_id).public()

    @app.delete("/v1/jobs/{job_id}", status_code=202, summary="Cancel a job")
    async def cancel_job(job_id: str) -> dict[str, Any]:
        job = manager.get(job_id)
        manager.cancel(job)
        return job.public()

    @app.post("/v1/jobs/{job_id}/resume", status_code=202, summary="Resume a stopped job")
    async def resume_job(job_id: str) -> dict[str, Any]:
        job = manager.get(job_id)
        manager.resume(job)
        return job.public()

    @app.get("/v1/jobs/{job_id}/results", summary="Output rows as NDJSON, streamed")
    async def results(job_id: str) -> StreamingResponse:
        job = manager.get(job_id)
        return StreamingResponse(tail_rows(job, "results"), media_type="application/x-ndjson")

    @app.get("/v1/jobs/{job_id}/failed", summary="Dead-letter records as NDJSON, streamed")
    async def failed(job_id: str) -> StreamingResponse:
        job = manager.get(job_id)
        return StreamingResponse(tail_rows(job, "failed"), media_type="application/x-ndjson")

    @app.get("/v1/jobs/{job_id}/events", summary="Progress as Server-Sent Events")
    async def events(job_id: str) -> StreamingResponse:
        job = manager.get(job_id)

        async def stream() -> AsyncIterator[bytes]:
            last: Any = None
            while True:
                ended = job.terminal and job.done.is_set()
                changed = job.changed
                snapshot = {"status": job.status, "counters": job.counters()}
                if snapshot != last:
                    yield _sse("progress", snapshot)
                    last = snapshot
                if ended:
                    yield _sse("end", job.public())
                    return
                with anyio.move_on_after(15):
                    await changed.wait()
                if not changed.is_set():
                    yield b": keep-alive\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/enrich", summary="Answer a small batch now, streamed as NDJSON")
    async def enrich(request: Request) -> StreamingResponse:
        """Answer up to ``max_enrich_rows`` rows: NDJSON lines ``{"index", "row" or "error"}``."""
        try:
            data = json.loads(await request.body())
        except ValueError as error:
            raise RequestError(422, f"the body is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise RequestError(
                422, 'the body must be a JSON object: {"rows": [...], "settings": {}}'
            )
        rows = data.get("rows")
        if not isinstance(rows, list) or not rows:
            raise RequestError(422, "rows must be a non-empty JSON list")
        if len(rows) > config.max_enrich_rows:
            raise RequestError(
                422,
                f"{len(rows)} rows is more than the enrich limit of {config.max_enrich_rows}; "
                "submit a job (POST /v1/jobs) for larger batches",
            )
        given = manager.check_settings(data.get("settings", {}))
        settings = JobSettings.from_mapping(given, allow_paths=False)
        settings = settings.replace(base_url=settings.base_url or config.base_url)
        if manager.enriching >= config.max_jobs:
            raise RequestError(429, "the server is answering other batches; retry soon")
        caller = await _prepared_caller(settings, manager)
        return StreamingResponse(
            _enrich_stream(rows, caller, manager), media_type="application/x-ndjson"
        )

    return app


async def _prepared_caller(settings: JobSettings, manager: JobManager) -> Any:
    from pipeline.jobs._job import build_caller, preflight, release_caller

    try:
        caller = build_caller(settings, limiter=manager.limiter_for(settings))
    except ConfigError as error:
        raise RequestError(422, str(error)) from None
    try:
        await preflight(caller, timeout=min(10.0, settings.timeout))
    except FatalError as error:
        await release_caller(caller)
        raise RequestError(502, str(error)) from None
    except ConfigError as error:
        await release_caller(caller)
        raise RequestError(422, str(error)) from None
    return caller


async def _enrich_stream(rows: list[Any], caller: Any, manager: JobManager) -> AsyncIterator[bytes]:
    from pipeline._runner import Pipeline
    from pipeline._stage import Inbox, Outbox, Source
    from pipeline.jobs._job import release_caller

    class Indexed(Source[Any]):
        async def run(self, inbox: Inbox[None], outbox: Outbox[Any]) -> None:
            for index, row in enumerate(rows):
                await outbox.emit(row, key=index, origin=f"rows[{index}]")

    failures: list[Failed] = []

    def line(data: dict[str, Any]) -> bytes:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    def drain() -> bytes:
        out = b"".join(
            line({"index": f.key, "error": {**f.to_dict()["error"], "stage": f.stage}})
            for f in failures
        )
        failures.clear()
        return out

    manager.enriching += 1
    try:
        try:
            pipe = Pipeline(
                Indexed(name="rows"), caller, dead_letter=failures.append, name="enrich"
            )
            async with pipe.open() as results:
                async for env in results.envelopes():
                    yield drain() + line({"index": env.key, "row": env.value})
            rest = drain()
            if rest:
                yield rest
        except FatalError as error:
            rest = drain()
            fatal = {"type": type(error).__name__, "message": manager.scrub(str(error))}
            yield rest + line({"index": None, "error": fatal})
    finally:
        manager.enriching -= 1
        with anyio.CancelScope(shield=True):
            await release_caller(caller)


# -- the command ---------------------------------------------------------------------------


def _loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m pipeline serve``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline serve",
        description="Serve LLM pipeline jobs over HTTP (FastAPI): submit, stream, cancel, resume.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (8000; 0 = any free port)")
    parser.add_argument("--data-dir", default="pipeline-data", help="where jobs are kept")
    parser.add_argument(
        "--token-env",
        default="PIPELINE_SERVER_TOKEN",
        help="environment variable holding the bearer token clients must send",
    )
    parser.add_argument("--max-jobs", type=int, default=4, help="jobs running at once (4)")
    parser.add_argument("--max-queued", type=int, default=64, help="jobs waiting at most (64)")
    parser.add_argument("--max-upload-mb", type=float, default=64.0, help="largest upload (64)")
    parser.add_argument("--max-rows", type=int, default=1_000_000, help="rows per job (1e6)")
    parser.add_argument("--max-enrich-rows", type=int, default=100, help="rows per /v1/enrich")
    parser.add_argument("--base-url", help="API root of jobs (default: the provider's)")
    parser.add_argument(
        "--allow-base-url", action="append", default=[], help="another API root jobs may name"
    )
    parser.add_argument(
        "--allow-key-env",
        action="append",
        default=None,
        help=f"a variable jobs may name as api_key_env (default: {', '.join(DEFAULT_KEY_ENVS)})",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level (info)")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Turn parsed arguments into a :class:`ServerConfig` (reading the token variable).

    Raises:
        ConfigError: A bad value, or a non-loopback host without a token.
    """
    token = os.environ.get(args.token_env) or None
    if token is None and not _loopback(args.host):
        raise ConfigError(
            f"refusing to listen on {args.host} without a token: set ${args.token_env} "
            "(clients then send 'Authorization: Bearer <token>'), or bind to 127.0.0.1"
        )
    if not math.isfinite(args.max_upload_mb) or args.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    return ServerConfig(
        data_dir=Path(args.data_dir),
        token=token,
        max_jobs=args.max_jobs,
        max_queued=args.max_queued,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        max_rows=args.max_rows,
        max_enrich_rows=args.max_enrich_rows,
        base_url=args.base_url,
        allowed_base_urls=tuple(args.allow_base_url),
        allowed_key_envs=tuple(args.allow_key_env or DEFAULT_KEY_ENVS),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the server until Ctrl-C (``python -m pipeline serve``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot use data dir {args.data_dir!r}: {error}", file=sys.stderr)
        return 2
    import uvicorn

    app = create_app(config)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            lifespan="on",
            timeout_graceful_shutdown=5,  # open result streams must not hold the jobs hostage
        )
    except OSError as error:
        print(f"error: cannot serve on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    log.debug("served for %.1f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
