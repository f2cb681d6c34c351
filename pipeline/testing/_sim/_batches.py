"""The simulator's Batch APIs: OpenAI files and batches, Anthropic Message Batches.

Routes (added to the simulator by :meth:`BatchSim.register`):

* OpenAI: ``POST /v1/files`` (multipart, ``purpose`` and ``file``), ``GET /v1/files/{id}``,
  ``GET /v1/files/{id}/content``, ``POST /v1/batches``, ``GET /v1/batches`` (newest first,
  ``limit`` and ``after``), ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``.
* Anthropic: ``POST /v1/messages/batches``, ``GET /v1/messages/batches`` (newest first,
  ``limit`` and ``after_id``), ``GET /v1/messages/batches/{id}``,
  ``POST /v1/messages/batches/{id}/cancel``, ``GET /v1/messages/batches/{id}/results``.
* ``GET``/``POST /sim/batches/config`` and ``GET /sim/batches/counters``.

A batch answers each request exactly as the online route would (the simulator's deterministic
echo), after ``delay_s`` seconds: OpenAI batches are ``validating`` for the first tenth of it,
then ``in_progress`` with ``request_counts`` growing in proportion, then ``completed`` (or
``failed``, ``expired``, ``cancelled``); Anthropic batches are ``in_progress``, then ``ended``.
Results are written in a random order (``shuffle``) since providers promise none.

Validation as the providers do it: an OpenAI input file whose lines are not JSON, repeat a
``custom_id``, use another method or URL than the batch's endpoint, or hold more than
``max_requests`` requests makes the batch ``failed`` with ``errors`` naming the lines; a file
over ``max_bytes`` is refused at creation (400). An Anthropic batch over either limit is
refused (400/413); an invalid request in it comes back ``errored``.

Faults (:class:`BatchSimConfig`): ``fail_batches`` makes the next batches fail as a whole
(OpenAI ``failed``; Anthropic, which has no such state, answers all their requests ``errored``
with ``api_error``); ``expire_batches`` makes the next ones expire with only ``expire_done`` of
their requests answered (the rest ``batch_expired``/``expired``); ``row_errors`` answers that
share of requests with a ``row_error_status`` error (500 ``server_error``: worth a retry; 400:
not), chosen by a seeded draw on the batch and ``custom_id`` (a retry draws again);
``unmatched`` adds result lines for ``custom_id`` that no request had.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from aiohttp import BodyPartReader, web

from pipeline._errors import ConfigError
from pipeline.testing._sim._answers import Answer
from pipeline.testing._sim._anthropic import message
from pipeline.testing._sim._batch_objects import (
    InvalidRequest,
    SimBatch,
    SimFile,
    anthropic_errored,
    anthropic_public,
    not_found,
    openai_line,
    openai_lines,
    openai_public,
    origin_of,
    row_error,
)
from pipeline.testing._sim._openai import chat_completion
from pipeline.testing._sim._responses import anthropic_error, dumps, openai_error, read_config

__all__ = ["BatchSim", "BatchSimConfig"]


AnswerFn = Callable[..., Answer]
"""``answer(request_body, default_model, anthropic=bool)``; raises on an invalid request."""
Handler = Callable[[web.Request, int], Awaitable[web.StreamResponse]]
Route = Callable[[str, str, Handler], object]
"""``route(method, path, handler)``: how the simulator adds (and counts) a route."""


@dataclasses.dataclass(kw_only=True)
class BatchSimConfig:
    """How the simulated batch endpoints behave.

    Attributes:
        delay_s: Seconds from a batch's creation to its end.
        fail_batches: The next this many batches created fail as a whole.
        expire_batches: The next this many batches (after the failing ones) expire.
        expire_done: Share of an expiring batch's requests answered before it expires.
        row_errors: Share of requests answered with an error, drawn per batch and ``custom_id``.
        unmatched: Result lines added to each batch's results for ``custom_id`` that no request
            had (a provider bug a client must report, not drop).
        row_error_status: HTTP status of those errors (500 retryable, 400 not).
        shuffle: Write results in a random order rather than the input's.
        seed: Seed of the row-error and order draws.
        max_requests: Requests one batch may hold (default: the provider's limit).
        max_bytes: Bytes one batch's input may hold (default: the provider's limit).
        stall: Hold the next ``stall_next`` requests of one kind for ``stall_s`` seconds:
            ``"upload"`` (before storing the file), ``"create"`` (after creating the batch,
            before answering: the answer is lost if the client dies), ``"poll"`` (a status
            request) or ``"download"`` (after half of the results): to kill a client there.
        stall_after: How many requests of that kind to let through first.
        stall_next: How many requests to hold.
        stall_s: How long each is held.
    """

    delay_s: float = 1.0
    fail_batches: int = 0
    expire_batches: int = 0
    expire_done: float = 0.5
    row_errors: float = 0.0
    row_error_status: int = 500
    unmatched: int = 0
    shuffle: bool = True
    seed: int = 0
    max_requests: int | None = None
    max_bytes: int | None = None
    stall: Literal["upload", "create", "poll", "download"] | None = None
    stall_after: int = 0
    stall_next: int = 1
    stall_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("delay_s", "expire_done", "row_errors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"BatchSimConfig.{name} must be a number >= 0, got {value!r}")
        if self.expire_done > 1 or self.row_errors > 1:
            raise ConfigError("BatchSimConfig.expire_done and row_errors are shares in [0, 1]")
        for name in ("fail_batches", "expire_batches", "unmatched"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"BatchSimConfig.{name} must be an integer >= 0")
        if self.row_error_status < 400:
            raise ConfigError("BatchSimConfig.row_error_status must be an error status (>= 400)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchSimConfig:
        """Build a config from a mapping of field names (unknown names are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown BatchSimConfig field(s) {', '.join(unknown)}")
        return cls(**data)


class BatchSim:
    """The state of the simulated batch endpoints.

    Args:
        answer: The simulator's answer function (``answer(body, model, anthropic=...)``).
        model: Model named in answers when a request names none.
        clock: Monotonic clock in seconds.
        config: The behaviour (default: one second per batch, no faults).
    """

    def __init__(
        self,
        answer: AnswerFn,
        *,
        model: str = "sim-1",
        clock: Callable[[], float] = time.monotonic,
        config: BatchSimConfig | None = None,
    ) -> None:
        self._answer = answer
        self.model = model
        self._clock = clock
        self.config = config or BatchSimConfig()
        self._files: dict[str, SimFile] = {}
        self._batches: dict[str, SimBatch] = {}
        self._ids = itertools.count(1)
        self._created = 0
        self._stalls = self.config.stall_next
        self._passed = 0
        self.on_stall: Callable[[str], None] | None = None
        """Called (in the server's thread) with the kind of each request held by ``stall``."""
        self.stats: dict[str, int] = {
            "stalled": 0,
            "uploads": 0,
            "batches": 0,
            "requests": 0,
            "answered": 0,
            "row_errors": 0,
            "failed": 0,
            "expired": 0,
            "cancelled": 0,
            "downloads": 0,
        }

    def configure(self, config: BatchSimConfig) -> None:
        """Replace the configuration (the fault counts start again from the next batch)."""
        self.config = config
        self._created = 0
        self._stalls = config.stall_next
        self._passed = 0

    async def _stall(self, kind: str) -> None:
        """Hold this request if the configuration says so (see :class:`BatchSimConfig`)."""
        if self.config.stall != kind or self._stalls <= 0:
            return
        if self._passed < self.config.stall_after:
            self._passed += 1
            return
        self._stalls -= 1
        self.stats["stalled"] += 1
        if self.on_stall is not None:
            self.on_stall(kind)
        await asyncio.sleep(self.config.stall_s)

    def counters(self) -> dict[str, Any]:
        """Return the counters: uploads, batches, requests, answered, faults, downloads."""
        return dict(self.stats)

    def batch_ids(self) -> list[str]:
        """Return the ids of every batch created, oldest first."""
        return list(self._batches)

    def register(self, route: Route) -> None:
        """Add the batch routes with ``route(method, path, handler)``."""
        route("POST", "/v1/files", self._upload)
        route("GET", "/v1/files/{file_id}", self._file)
        route("GET", "/v1/files/{file_id}/content", self._file_content)
        route("POST", "/v1/batches", self._openai_create)
        route("GET", "/v1/batches", self._list)
        route("GET", "/v1/batches/{batch_id}", self._retrieve)
        route("POST", "/v1/batches/{batch_id}/cancel", self._cancel)
        route("POST", "/v1/messages/batches", self._anthropic_create)
        route("GET", "/v1/messages/batches", self._list)
        route("GET", "/v1/messages/batches/{batch_id}", self._retrieve)
        route("POST", "/v1/messages/batches/{batch_id}/cancel", self._cancel)
        route("GET", "/v1/messages/batches/{batch_id}/results", self._results)
        route("GET", "/sim/batches/config", self._get_config)
        route("POST", "/sim/batches/config", self._post_config)
        route("GET", "/sim/batches/counters", self._get_counters)

    # ---- files -----------------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):06d}sim"

    async def _upload(self, request: web.Request, n: int) -> web.StreamResponse:
        await self._stall("upload")
        try:
            reader = await request.multipart()
        except (ValueError, AssertionError, KeyError):
            return openai_error(400, "the upload must be multipart/form-data")
        purpose = filename = None
        content = b""
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = (await part.read()).decode()
            elif part.name == "file":
                filename = part.filename or "upload.jsonl"
                content = bytes(await part.read())
        if filename is None:
            return openai_error(400, "missing required parameter: 'file'")
        if purpose not in ("batch", "fine-tune", "assistants", "user_data", "evals", "vision"):
            return openai_error(400, f"invalid purpose {purpose!r}: use 'batch' for batches")
        file = SimFile(self._new_id("file-"), purpose, filename, content, int(time.time()))
        self._files[file.id] = file
        self.stats["uploads"] += 1
        return web.json_response(file.public())

    async def _file(self, request: web.Request, n: int) -> web.StreamResponse:
        file = self._files.get(request.match_info["file_id"])
        if file is None:
            return openai_error(404, "No such File object", code="not_found")
        return web.json_response(file.public())

    async def _file_content(self, request: web.Request, n: int) -> web.StreamResponse:
        file = self._files.get(request.match_info["file_id"])
        if file is None:
            return openai_error(404, "No such File object", code="not_found")
        self.stats["downloads"] += 1
        return await self._send(request, file.content, "application/octet-stream")

    # ---- creating --------------------------------------------------------------------------

    def _fate(self) -> str:
        config = self.config
        number = self._created
        self._created += 1
        if number < config.fail_batches:
            return "fail"
        if number < config.fail_batches + config.expire_batches:
            return "expire"
        return "ok"

    def _limits(self, anthropic: bool) -> tuple[int, int]:
        config = self.config
        requests = 100_000 if anthropic else 50_000
        size = (256 if anthropic else 200) * 1024 * 1024
        return config.max_requests or requests, config.max_bytes or size

    async def _openai_create(self, request: web.Request, n: int) -> web.StreamResponse:
        try:
            req = json.loads(await request.read())
        except ValueError:
            return openai_error(400, "the request body is not JSON")
        if not isinstance(req, dict):
            return openai_error(400, "the request body must be a JSON object")
        file = self._files.get(str(req.get("input_file_id")))
        if file is None:
            return openai_error(400, f"No such File object: {req.get('input_file_id')!r}")
        endpoint = req.get("endpoint")
        if endpoint not in ("/v1/chat/completions", "/v1/embeddings", "/v1/responses"):
            return openai_error(400, f"invalid endpoint {endpoint!r}", param="endpoint")
        if req.get("completion_window") != "24h":
            return openai_error(400, "completion_window must be '24h'", param="completion_window")
        max_requests, max_bytes = self._limits(False)
        if len(file.content) > max_bytes:
            return openai_error(
                400, f"the input file is {len(file.content):,} bytes; the limit is {max_bytes:,}"
            )
        requests, errors = openai_lines(file.content, str(endpoint), max_requests)
        metadata = req.get("metadata")
        batch = SimBatch(
            id=self._new_id("batch_"),
            anthropic=False,
            requests=requests,
            created=self._clock(),
            created_at=int(time.time()),
            fate=self._fate(),
            delay=self.config.delay_s,
            endpoint=str(endpoint),
            input_file_id=file.id,
            metadata={str(k): str(v) for k, v in metadata.items()}
            if isinstance(metadata, dict)
            else None,
            errors=errors or None,
        )
        return web.json_response(await self._add(batch))

    async def _anthropic_create(self, request: web.Request, n: int) -> web.StreamResponse:
        max_requests, max_bytes = self._limits(True)
        raw = bytearray()
        async for chunk in request.content.iter_chunked(1 << 16):
            raw += chunk
            if len(raw) > max_bytes:
                return anthropic_error(
                    413, "request_too_large", f"the request is larger than {max_bytes:,} bytes"
                )
        try:
            req = json.loads(raw)
        except ValueError:
            return anthropic_error(400, "invalid_request_error", "the body is not JSON")
        items = req.get("requests") if isinstance(req, dict) else None
        if not isinstance(items, list) or not items:
            return anthropic_error(400, "invalid_request_error", "requests: must be a list")
        if len(items) > max_requests:
            return anthropic_error(
                400, "invalid_request_error", f"a batch holds at most {max_requests:,} requests"
            )
        requests: list[tuple[str, Any]] = []
        seen: set[str] = set()
        for index, item in enumerate(items):
            custom_id = item.get("custom_id") if isinstance(item, dict) else None
            if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 64:
                return anthropic_error(
                    400, "invalid_request_error", f"requests.{index}.custom_id: invalid"
                )
            if custom_id in seen:
                return anthropic_error(
                    400, "invalid_request_error", f"duplicate custom_id {custom_id!r}"
                )
            seen.add(custom_id)
            requests.append((custom_id, item.get("params")))
        batch = SimBatch(
            id=self._new_id("msgbatch_"),
            anthropic=True,
            requests=requests,
            created=self._clock(),
            created_at=int(time.time()),
            fate=self._fate(),
            delay=self.config.delay_s,
            status="in_progress",
        )
        return web.json_response(await self._add(batch, origin_of(request)))

    async def _add(self, batch: SimBatch, origin: str = "") -> dict[str, Any]:
        self._batches[batch.id] = batch
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch.requests)
        await self._stall("create")
        return self._public(batch, origin)

    # ---- following -------------------------------------------------------------------------

    def _get(self, request: web.Request) -> SimBatch | None:
        batch = self._batches.get(request.match_info["batch_id"])
        anthropic = "/messages/" in request.path
        if batch is None or batch.anthropic != anthropic:
            return None
        self._advance(batch)
        return batch

    async def _retrieve(self, request: web.Request, n: int) -> web.StreamResponse:
        await self._stall("poll")
        batch = self._get(request)
        if batch is None:
            return not_found(request)
        return web.json_response(self._public(batch, origin_of(request)))

    async def _list(self, request: web.Request, n: int) -> web.StreamResponse:
        anthropic = "/messages/" in request.path
        batches = [b for b in reversed(self._batches.values()) if b.anthropic == anthropic]
        after = request.query.get("after_id" if anthropic else "after")
        if after:
            ids = [b.id for b in batches]
            batches = batches[ids.index(after) + 1 :] if after in ids else []
        try:
            limit = max(1, min(100, int(request.query.get("limit", "20"))))
        except ValueError:
            limit = 20
        page = batches[:limit]
        origin = origin_of(request)
        data = []
        for batch in page:
            self._advance(batch)
            data.append(self._public(batch, origin))
        body: dict[str, Any] = {
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(batches) > limit,
        }
        if not anthropic:
            body["object"] = "list"
        return web.json_response(body)

    async def _cancel(self, request: web.Request, n: int) -> web.StreamResponse:
        batch = self._get(request)
        if batch is None:
            return not_found(request)
        if batch.ended is None and batch.cancel_at is None:
            batch.cancel_at = self._clock()
            batch.status = "canceling" if batch.anthropic else "cancelling"
        elif batch.ended is not None and not batch.anthropic:
            return openai_error(
                409, f"Cannot cancel a batch with status '{batch.status}'.", code="conflict"
            )
        return web.json_response(self._public(batch, origin_of(request)))

    async def _results(self, request: web.Request, n: int) -> web.StreamResponse:
        batch = self._get(request)
        if batch is None:
            return not_found(request)
        if batch.results is None:
            return anthropic_error(
                400, "invalid_request_error", f"batch {batch.id} has not ended yet"
            )
        self.stats["downloads"] += 1
        return await self._send(request, batch.results, "application/binary")

    async def _send(
        self, request: web.Request, body: bytes, content_type: str
    ) -> web.StreamResponse:
        """Send a download, held half-way when ``stall`` is ``"download"``."""
        if self.config.stall != "download" or self._stalls <= 0:
            return web.Response(body=body, content_type=content_type)
        response = web.StreamResponse()
        response.content_type = content_type
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        await self._stall("download")
        await response.write(body[len(body) // 2 :])
        return response

    # ---- processing ------------------------------------------------------------------------

    def _advance(self, batch: SimBatch) -> None:
        """Bring the batch's state up to now (the simulator works when asked, not in a loop)."""
        if batch.ended is not None:
            return
        now = self._clock()
        elapsed = now - batch.created
        delay = batch.delay
        if batch.cancel_at is not None:
            done = min(1.0, (batch.cancel_at - batch.created) / delay) if delay else 1.0
            self._finish(batch, "cancelled", done)
        elif not batch.anthropic and batch.errors:
            if elapsed >= delay * 0.1:
                self._finish(batch, "failed", 0.0)
        elif elapsed >= delay:
            if batch.fate == "fail":
                self._finish(batch, "failed", 0.0)
            elif batch.fate == "expire":
                self._finish(batch, "expired", self.config.expire_done)
            else:
                self._finish(batch, "completed", 1.0)
        elif not batch.anthropic:
            batch.status = "validating" if elapsed < delay * 0.1 else "in_progress"
        total = len(batch.requests)
        if batch.ended is None:
            done = int(total * min(1.0, elapsed / delay)) if delay else total
            key = "processing" if batch.anthropic else "total"
            batch.counts = (
                {"processing": total - done, "succeeded": done, "errored": 0}
                if batch.anthropic
                else {key: total, "completed": done, "failed": 0}
            )

    def _finish(self, batch: SimBatch, status: str, done_share: float) -> None:
        """End the batch: answer its first ``done_share`` of requests, the rest not run."""
        batch.ended = self._clock()
        config = self.config
        self.stats[status] = self.stats.get(status, 0) + 1
        total = len(batch.requests)
        done = 0 if status == "failed" else round(total * done_share)
        order = list(range(total))
        if config.shuffle:
            random.Random(config.seed * 7919 + zlib.crc32(batch.id.encode())).shuffle(order)
        if batch.anthropic:
            self._finish_anthropic(batch, status, done, order)
        else:
            self._finish_openai(batch, status, done, order)

    def _finish_openai(self, batch: SimBatch, status: str, done: int, order: list[int]) -> None:
        batch.status = status
        if status == "failed":
            if not batch.errors:
                batch.errors = [{"code": "batch_failed", "message": "the simulator failed it"}]
            batch.counts = {"total": 0, "completed": 0, "failed": 0}
            return
        ok: list[bytes] = []
        bad: list[bytes] = []
        unrun = "batch_expired" if status == "expired" else "batch_cancelled"
        for index in order:
            custom_id, body = batch.requests[index]
            if index >= done:
                line = openai_line(custom_id, None, {"code": unrun, "message": unrun})
                bad.append(line)
                continue
            status_code, answer_body = self._respond(batch, custom_id, body, anthropic=False)
            (ok if status_code == 200 else bad).append(
                openai_line(custom_id, (status_code, answer_body), None)
            )
        batch.counts = {"total": len(order), "completed": len(ok), "failed": len(bad)}
        for extra in range(self.config.unmatched):
            answer = self._respond(batch, f"unknown-{extra}", {"messages": []}, anthropic=False)
            ok.append(openai_line(f"unknown-{extra}", answer, None))
        for lines, kind in ((ok, "output"), (bad, "error")):
            if lines:
                file = SimFile(
                    self._new_id("file-"),
                    "batch_output",
                    f"batch_{batch.id}_{kind}.jsonl",
                    b"\n".join(lines) + b"\n",
                    int(time.time()),
                )
                self._files[file.id] = file
                if kind == "output":
                    batch.output_file_id = file.id
                else:
                    batch.error_file_id = file.id

    def _finish_anthropic(self, batch: SimBatch, status: str, done: int, order: list[int]) -> None:
        batch.status = "ended"
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        lines = []
        unrun = "expired" if status == "expired" else "canceled"
        for index in order:
            custom_id, params = batch.requests[index]
            if status == "failed":
                result: dict[str, Any] = anthropic_errored(500, "the simulator failed the batch")
            elif index >= done:
                result = {"type": unrun}
            else:
                status_code, body = self._respond(batch, custom_id, params, anthropic=True)
                if status_code == 200:
                    result = {"type": "succeeded", "message": body}
                else:
                    result = {"type": "errored", "error": body}
            counts[result["type"]] += 1
            lines.append(dumps({"custom_id": custom_id, "result": result}))
        for extra in range(self.config.unmatched):
            result = {"type": "errored", "error": anthropic_errored(500)["error"]}
            lines.append(dumps({"custom_id": f"unknown-{extra}", "result": result}))
        batch.counts = counts
        batch.results = b"\n".join(lines) + b"\n"

    def _respond(
        self, batch: SimBatch, custom_id: str, body: Any, *, anthropic: bool
    ) -> tuple[int, Any]:
        """Return ``(status, body)`` for one request, as the online route would answer it."""
        config = self.config
        if config.row_errors:
            seed = zlib.crc32(f"{batch.id}/{custom_id}".encode())
            draw = random.Random(config.seed * 1_000_003 + seed)
            if draw.random() < config.row_errors:
                self.stats["row_errors"] += 1
                return row_error(config.row_error_status, anthropic)
        if isinstance(body, InvalidRequest):
            return row_error(400, anthropic, body.message)
        try:
            answer = self._answer(body, self.model, anthropic=anthropic)
        except Exception as error:  # the answer function's BadRequest: a 400 for this row
            return row_error(400, anthropic, str(error))
        self.stats["answered"] += 1
        if anthropic:
            return 200, message(answer, f"msg_{custom_id}")
        return 200, chat_completion(answer, f"chatcmpl-{custom_id}")

    # ---- objects ---------------------------------------------------------------------------

    def _public(self, batch: SimBatch, origin: str) -> dict[str, Any]:
        if batch.anthropic:
            return anthropic_public(batch, origin)
        return openai_public(batch)

    async def _get_config(self, request: web.Request, n: int) -> web.StreamResponse:
        return web.json_response(dataclasses.asdict(self.config))

    async def _post_config(self, request: web.Request, n: int) -> web.StreamResponse:
        config = await read_config(request, BatchSimConfig.from_dict, "batch simulator config")
        if isinstance(config, web.Response):
            return config
        self.configure(config)
        return web.json_response(dataclasses.asdict(config))

    async def _get_counters(self, request: web.Request, n: int) -> web.StreamResponse:
        return web.json_response(self.counters())
