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
    GET    /healthz                 liveness; /docs and /openapi.json describe the API (no
                                    token needed for those: they hold no data)
    GET    /readyz                  readiness: 503 once the server is stopping
    GET    /metrics                 Prometheus metrics of every job
    GET    /v1/jobs/{id}/timeline   the job's samples over time; .../failures its latest failures
    GET    /                        the dashboard (the page and its assets need no token)

How it works. A job manager owns one anyio task group for the life of the app (the ASGI
lifespan); every job is a task in it, running :func:`pipeline.jobs.run_job` on the server's
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

Modules: ``_config`` (:class:`ServerConfig`), ``_settings`` (what a request may set),
``_job`` and ``_manager`` (a job's record; the registry that runs them), ``_bodies`` (reading
uploads), ``_streams`` (results, dead letters and events), ``_enrich``, ``_guard`` (token and
size limit), ``_limits`` (operator limits above job limits), ``_connections`` (header timeout
and connection cap), ``_openapi`` (``/docs`` and the request bodies), ``_routes`` and ``_app``
(the FastAPI app) and ``_cli`` (the command).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer

from pipeline.server._config import RequestError, ServerConfig
from pipeline.server._dashboard import PUBLIC_PATHS, add_dashboard_routes
from pipeline.server._guard import Guard, TooLargeError
from pipeline.server._manager import JobManager
from pipeline.server._openapi import DOCS_PATHS, add_docs_routes
from pipeline.server._routes import add_routes

__all__ = ["create_app"]


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
        dependencies=[Security(bearer)],  # documents the scheme; Guard enforces it
        docs_url=None,  # served by add_docs_routes, from the packaged Swagger UI
        redoc_url=None,
    )
    app.state.jobs = manager
    app.add_middleware(Guard, config=config, public=PUBLIC_PATHS | DOCS_PATHS)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"detail": config.scrub(str(error))}, status_code=error.status)

    @app.exception_handler(TooLargeError)
    async def too_large(request: Request, error: TooLargeError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=413)

    add_routes(app, manager)
    add_dashboard_routes(app, manager)
    add_docs_routes(app)
    return app
