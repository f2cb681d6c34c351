"""The service's web page, its data routes, ``/metrics`` and ``/readyz``.

``GET /`` serves the dashboard (``static/index.html`` with its script and styles, packaged with
the library: no CDN, it works offline). The page and its assets are the only routes open
without the token: they hold no data, and every API call the page makes carries the token the
user types in. The page reads the routes below and the existing job routes.

    GET /                           the dashboard
    GET /static/NAME                its assets
    GET /v1/jobs/{id}/timeline      the job's recorded samples, by run (JSON)
    GET /v1/jobs/{id}/failures      its latest dead-letter records (JSON, ``?limit=20``)
    GET /metrics                    Prometheus metrics of every job (text format)
    GET /readyz                     200 while the server takes jobs, 503 once it is stopping
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import anyio
from fastapi import FastAPI, Query, Response
from fastapi.responses import HTMLResponse, JSONResponse

from pipeline.cli._report import latest_failures
from pipeline.jobs._metrics import CONTENT_TYPE
from pipeline.jobs._timeline import read_timeline, timeline_path
from pipeline.server._config import RequestError
from pipeline.server._job import FAILED
from pipeline.server._manager import JobManager
from pipeline.server._settings import OUTPUT

__all__ = ["PUBLIC_PATHS", "STATIC", "add_dashboard_routes"]

STATIC = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
"""The page's assets and their media types (nothing else is served from the package)."""

PUBLIC_PATHS = frozenset({"/", *(f"/static/{name}" for name in STATIC)})
"""Paths served without the token: the page and its assets, which hold no data."""

MAX_SAMPLES = 2000


def _asset(name: str) -> bytes:
    return resources.files("pipeline").joinpath("server", "static", name).read_bytes()


def add_dashboard_routes(app: FastAPI, manager: JobManager) -> None:
    """Add the page, its data routes, ``/metrics`` and ``/readyz`` to ``app``."""
    page = _asset("index.html")
    assets = {name: _asset(name) for name in STATIC}
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in assets:
            raise RequestError(404, f"no asset {name!r}")
        return Response(assets[name], media_type=STATIC[name], headers=headers)

    @app.get("/v1/jobs/{job_id}/timeline", summary="The job's samples over time, by run")
    async def timeline(job_id: str) -> dict[str, Any]:
        job = manager.get(job_id)
        path = timeline_path(job.dir / OUTPUT)

        def read() -> list[dict[str, Any]]:
            try:
                return [run.to_dict(MAX_SAMPLES) for run in read_timeline(path)]
            except FileNotFoundError:
                return []  # queued: nothing recorded yet

        return {"runs": await anyio.to_thread.run_sync(read)}

    @app.get("/v1/jobs/{job_id}/failures", summary="The job's latest dead-letter records")
    async def failures(job_id: str, limit: int = Query(20, ge=1, le=1000)) -> dict[str, Any]:
        job = manager.get(job_id)
        found = await anyio.to_thread.run_sync(latest_failures, str(job.dir / FAILED), limit)
        return {"failures": found}

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)")
    async def metrics() -> Response:
        return Response(manager.observers.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/readyz", summary="Readiness: 503 while starting or stopping")
    async def readyz() -> JSONResponse:
        ready = manager.ready
        body = {"status": "ready" if ready else "stopping", "jobs_running": manager.running()}
        return JSONResponse(body, status_code=200 if ready else 503)
