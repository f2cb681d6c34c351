"""``POST /v1/enrich``: a small batch answered now, streamed as NDJSON lines.

Each line is ``{"index": i, "row": ...}`` or ``{"index": i, "error": {...}}`` in completion
order; a fatal error (a bad key, an unreachable provider) ends the stream with
``{"index": null, "error": ...}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import anyio

from pipeline import ConfigError, Failed, FatalError, Inbox, Outbox, Pipeline, Source
from pipeline.jobs import JobSettings, build_caller, preflight, release_caller
from pipeline.server._config import RequestError
from pipeline.server._manager import JobManager

__all__ = ["enrich_stream", "prepared_caller"]


async def prepared_caller(settings: JobSettings, manager: JobManager) -> Any:
    """Build the caller ``settings`` describe and check it reaches its provider.

    Raises:
        RequestError: 422 for settings the caller refuses, 502 when the provider refuses
            (a bad key, an unknown model) or cannot be reached.
    """
    try:
        caller = build_caller(
            settings,
            limiter=manager.limiter_for(settings),
            endpoint_limiters=manager.endpoint_limiters(settings),
        )
    except ConfigError as error:
        raise RequestError(422, str(error)) from None
    env = caller.key_env()
    if settings.api_key_env is not None and env and not os.environ.get(env):
        await release_caller(caller)
        raise RequestError(
            422,
            f"api_key_env names ${env}, which is not set on this server: no key to send "
            "(a job with these settings fails the same way); ask the operator to set it",
        )
    try:
        await preflight(caller, timeout=min(10.0, settings.timeout))
    except FatalError as error:
        await release_caller(caller)
        raise RequestError(502, str(error)) from None
    except ConfigError as error:
        await release_caller(caller)
        raise RequestError(422, str(error)) from None
    return caller


class _Indexed(Source[Any]):
    """Emit the batch's rows keyed by their index."""

    def __init__(self, rows: list[Any]) -> None:
        super().__init__(name="rows")
        self.rows = rows

    async def run(self, inbox: Inbox[None], outbox: Outbox[Any]) -> None:
        """Send each row, keyed by its index."""
        for index, row in enumerate(self.rows):
            await outbox.emit(row, key=index, origin=f"rows[{index}]")


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _failure_lines(failures: list[Failed]) -> bytes:
    """Return (and forget) the dead letters so far, one error line each."""
    out = b"".join(
        _line({"index": f.key, "error": {**f.to_dict()["error"], "stage": f.stage}})
        for f in failures
    )
    failures.clear()
    return out


async def enrich_stream(rows: list[Any], caller: Any, manager: JobManager) -> AsyncIterator[bytes]:
    """Run ``rows`` through ``caller``; yield an NDJSON line per row as it completes.

    The caller is released at the end, even when the client leaves early.
    """
    failures: list[Failed] = []
    manager.enriching += 1
    try:
        try:
            pipe = Pipeline(_Indexed(rows), caller, dead_letter=failures.append, name="enrich")
            async with pipe.open() as results:
                async for env in results.envelopes():
                    yield _failure_lines(failures) + _line({"index": env.key, "row": env.value})
            rest = _failure_lines(failures)
            if rest:
                yield rest
        except FatalError as error:
            rest = _failure_lines(failures)
            fatal = {"type": type(error).__name__, "message": manager.config.scrub(str(error))}
            yield rest + _line({"index": None, "error": fatal})
    finally:
        manager.enriching -= 1
        with anyio.CancelScope(shield=True):
            await release_caller(caller)
