"""The routes of the job service, registered on a FastAPI app by :func:`add_routes`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from pipeline.server._bodies import read_enrich, read_submission
from pipeline.server._config import RequestError
from pipeline.server._enrich import enrich_stream, prepared_caller
from pipeline.server._limits import TokenQuota, owner
from pipeline.server._manager import JobManager
from pipeline.server._openapi import ENRICH_BODY, JOB_BODY
from pipeline.server._settings import check_settings, check_template, job_settings
from pipeline.server._streams import job_events, tail_rows

__all__ = ["add_routes"]

_NDJSON = "application/x-ndjson"


def add_routes(app: FastAPI, manager: JobManager) -> None:
    """Add every route: health, jobs, their streams, and enrich."""
    _add_job_routes(app, manager)
    _add_stream_routes(app, manager)
    _add_enrich_route(app, manager)


def _add_job_routes(app: FastAPI, manager: JobManager) -> None:
    config = manager.config

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, Any]:
        running = sum(1 for j in manager.jobs.values() if j.status == "running")
        return {"status": "ok", "jobs_running": running}

    @app.post("/v1/jobs", status_code=202, summary="Submit a job", openapi_extra=JOB_BODY)
    async def submit(request: Request) -> dict[str, Any]:
        """Submit rows (a JSON list, or an uploaded JSONL, CSV, TSV or Parquet file)."""
        submission = await read_submission(request, config)
        given = check_settings(config, submission.settings)
        check_template(given, submission.first)
        job = await manager.submit(submission, given, owner(request.headers.get("authorization")))
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


class _HeldStream(StreamingResponse):
    """A streamed response holding one of its token's stream slots until it ends."""

    def __init__(self, body: AsyncIterator[bytes], quota: TokenQuota, key: str, **kw: Any):
        quota.take(key)
        super().__init__(body, **kw)
        self.quota = quota
        self.key = key

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Stream the body; give the slot back however the stream ends."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.quota.give_back(self.key)


def _add_stream_routes(app: FastAPI, manager: JobManager) -> None:
    quota = TokenQuota(manager.config.max_streams_per_token, "streams")

    def held(request: Request, body: AsyncIterator[bytes], **kw: Any) -> StreamingResponse:
        key = owner(request.headers.get("authorization"))
        return _HeldStream(body, quota, key, **kw)

    @app.get("/v1/jobs/{job_id}/results", summary="Output rows as NDJSON, streamed")
    async def results(job_id: str, request: Request) -> StreamingResponse:
        job = manager.get(job_id)
        return held(request, tail_rows(job, "results"), media_type=_NDJSON)

    @app.get("/v1/jobs/{job_id}/failed", summary="Dead-letter records as NDJSON, streamed")
    async def failed(job_id: str, request: Request) -> StreamingResponse:
        job = manager.get(job_id)
        return held(request, tail_rows(job, "failed"), media_type=_NDJSON)

    @app.get("/v1/jobs/{job_id}/events", summary="Progress as Server-Sent Events")
    async def events(job_id: str, request: Request) -> StreamingResponse:
        job = manager.get(job_id)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return held(request, job_events(job), media_type="text/event-stream", headers=headers)


def _add_enrich_route(app: FastAPI, manager: JobManager) -> None:
    config = manager.config

    @app.post(
        "/v1/enrich",
        summary="Answer a small batch now, streamed as NDJSON",
        openapi_extra=ENRICH_BODY,
    )
    async def enrich(request: Request) -> StreamingResponse:
        """Answer up to ``max_enrich_rows`` rows: NDJSON lines ``{"index", "row" or "error"}``."""
        rows, raw_settings = await read_enrich(request, config)
        given = check_settings(config, raw_settings)
        check_template(given, rows[0] if isinstance(rows[0], dict) else None)
        settings = job_settings(config, given, resume=False)
        if manager.enriching >= config.max_jobs:
            raise RequestError(429, "the server is answering other batches; retry soon")
        caller = await prepared_caller(settings, manager)
        return StreamingResponse(enrich_stream(rows, caller, manager), media_type=_NDJSON)
