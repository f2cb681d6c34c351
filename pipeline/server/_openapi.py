"""The API's description: ``/docs`` (Swagger UI served from this server) and the bodies.

Swagger UI's JavaScript and CSS come from the ``swagger-ui-bundle`` wheel (in the ``server``
extra) rather than a CDN, so the page works offline and behind a firewall. The page, its
assets and ``/openapi.json`` hold no data and need no token; every route of the API still
does (the page's *Authorize* button takes the bearer token for *Try it out*).

The routes that read their body themselves (a JSON object or a multipart upload) declare it
here, so every request body appears in the schema.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

__all__ = ["DOCS_PATHS", "ENRICH_BODY", "JOB_BODY", "add_docs_routes"]

log = logging.getLogger("pipeline.server")

_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
DOCS_PATHS = frozenset({"/docs", "/openapi.json", *(f"/docs/assets/{name}" for name in _ASSETS)})
"""Paths served without the token: the docs page, its assets and the schema (no data)."""

_SETTINGS = {
    "type": "object",
    "description": (
        "The settings of `python -m pipeline run` (model, prompt, system, concurrency, rpm, "
        "tpm, max_retries, timeout, id_field, output_field, json_output, params, headers...), "
        "minus those naming the server's files or resources; below the operator's ceilings."
    ),
    "properties": {
        "model": {"type": "string", "example": "gpt-4o-mini"},
        "prompt": {
            "type": "string",
            "description": "Template over each row's fields: {field} or {field:spec}",
            "example": "Greet {name}",
        },
        "system": {"type": "string"},
        "concurrency": {"type": "integer", "minimum": 1},
        "rpm": {"type": "number", "exclusiveMinimum": 0},
        "tpm": {"type": "number", "exclusiveMinimum": 0},
    },
    "required": ["model"],
    "additionalProperties": True,
}
_ROWS = {
    "type": "array",
    "minItems": 1,
    "items": {"type": "object", "additionalProperties": True},
    "example": [{"name": "Ada"}, {"name": "Grace"}],
}
_JSON_BODY = {
    "type": "object",
    "properties": {"rows": _ROWS, "settings": _SETTINGS},
    "required": ["rows"],
    "additionalProperties": False,
}
JOB_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _JSON_BODY},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "The rows: .jsonl, .ndjson, .json, .csv, .tsv or "
                            ".parquet (the format is told by the file name)",
                        },
                        "settings": {"type": "string", "description": "The settings, JSON text"},
                    },
                    "required": ["file"],
                }
            },
        },
    }
}
"""``POST /v1/jobs``'s body: rows and settings as JSON, or an uploaded file and settings."""
ENRICH_BODY: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": _JSON_BODY}}}
}
"""``POST /v1/enrich``'s body: a few rows and their settings."""


def _assets_dir() -> Path | None:
    try:
        bundle = importlib.import_module("swagger_ui_bundle")
    except ImportError:
        return None
    return Path(bundle.swagger_ui_path)


def add_docs_routes(app: FastAPI) -> None:
    """Serve ``/docs`` with Swagger UI from the packaged assets (the app has ``docs_url=None``)."""
    assets = _assets_dir()
    loaded: dict[str, bytes] = {}
    if assets is None:
        log.warning("swagger-ui-bundle is not installed: /docs loads Swagger UI from a CDN")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if assets is None:
            return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if assets is None or name not in _ASSETS:
            return Response(status_code=404)
        if name not in loaded:
            loaded[name] = (assets / name).read_bytes()
        data = loaded[name]
        headers = {"Cache-Control": "public, max-age=86400"}
        return Response(data, media_type=_ASSETS[name], headers=headers)
