"""The routes of the job service, registered on a FastAPI app by :func:`add_routes`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from pipeline.server._bodies import read_enrich, read_submission
from pipeline.server._config import RequestError
from pipeline.server._enrich import enrich_stream, prepared_caller
from pipeline.server._manager import JobManager
from pipeline.server._settings import check_settings, job_settings
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

    @app.post("/v1/jobs", status_code=202, summary="Submit a job")
    async def submit(request: Request) -> dict[str, Any]:
        """Submit rows (a JSON list, or a JSONL multipart upload) and the job's settings."""
        rows, count, raw_settings = await read_submission(request, config)
        given = check_settings(config, raw_settings)
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


def _add_stream_routes(app: FastAPI, manager: JobManager) -> None:
    @app.get("/v1/jobs/{job_id}/results", summary="Output rows as NDJSON, streamed")
    async def results(job_id: str) -> StreamingResponse:
        job = manager.get(job_id)
        return StreamingResponse(tail_rows(job, "results"), media_type=_NDJSON)

    @app.get("/v1/jobs/{job_id}/failed", summary="Dead-letter records as NDJSON, streamed")
    async def failed(job_id: str) -> StreamingResponse:
        job = manager.get(job_id)
        return StreamingResponse(tail_rows(job, "failed"), media_type=_NDJSON)

    @app.get("/v1/jobs/{job_id}/events", summary="Progress as Server-Sent Events")
    async def events(job_id: str) -> StreamingResponse:
        job = manager.get(job_id)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(job_events(job), media_type="text/event-stream", headers=headers)


def _add_enrich_route(app: FastAPI, manager: JobManager) -> None:
    config = manager.config

    @app.post("/v1/enrich", summary="Answer a small batch now, streamed as NDJSON")
    async def enrich(request: Request) -> StreamingResponse:
        """Answer up to ``max_enrich_rows`` rows: NDJSON lines ``{"index", "row" or "error"}``."""
        rows, raw_settings = await read_enrich(request, config)
        given = check_settings(config, raw_settings)
        settings = job_settings(config, given, resume=False)
        if manager.enriching >= config.max_jobs:
            raise RequestError(429, "the server is answering other batches; retry soon")
        caller = await prepared_caller(settings, manager)
        return StreamingResponse(enrich_stream(rows, caller, manager), media_type=_NDJSON)
