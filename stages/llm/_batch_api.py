"""Provider Batch APIs over HTTP: the same requests at half the price, within 24 hours.

:class:`BatchClient` speaks the two batch protocols over one aiohttp session (the formats are in
:mod:`stages.llm._batch_wire`):

- **OpenAI-compatible**: the requests go to a JSONL file (one ``{"custom_id", "method", "url",
  "body"}`` per line), uploaded with ``POST /files`` (``purpose=batch``, multipart); ``POST
  /batches`` (``completion_window`` ``24h``) creates the batch; ``GET /batches/{id}`` polls it
  (``validating``, ``in_progress``, ``finalizing``, ``cancelling`` while it runs; ``completed``,
  ``failed``, ``expired``, ``cancelled`` at the end); the answers are the lines of
  ``output_file_id`` and the per-request errors those of ``error_file_id``
  (``GET /files/{id}/content``), in any order, matched by ``custom_id``.
- **Anthropic**: ``POST /messages/batches`` with ``{"requests": [{"custom_id", "params"}]}``;
  ``GET /messages/batches/{id}`` polls (``processing_status`` ``in_progress``, ``canceling``,
  ``ended``); ``results_url`` is JSONL, each result ``succeeded``, ``errored``, ``canceled`` or
  ``expired``, in any order.

The request bodies are the ones the online caller sends (:meth:`Provider.chat_body`), so prompt
templates and structured output are the same in both modes. A batch's requests are written to a
spool file on disk (:class:`RequestSpool`), never held in memory, and the spool refuses a
request that would take the batch past the provider's limits, so a job of any size is split
into batches with flat memory. Uploads stream from the spool; downloads are read in chunks and
split into lines, whatever their length.

Control-plane requests (upload, create, poll, list, cancel) are retried on connection errors,
408, 409, 429 and 5xx with capped exponential backoff; creating a batch is retried only after
looking for the batch the failed attempt may have created (:meth:`BatchClient.find`), so an
answer lost on the way back never submits the same rows twice. A failed download raises
:class:`BatchAPIError`: the caller reads the results again (they stay available for days).
"""

from __future__ import annotations

import datetime
import json
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import IO, Any, TypeVar

import aiohttp
import anyio

from pipeline._errors import ConfigError
from stages.llm._batch_wire import (
    BatchAPIError,
    BatchLimits,
    BatchRefusedError,
    BatchResult,
    BatchStatus,
    BatchUnsupportedError,
    BatchWire,
    count_anthropic_requests,
    json_line,
    short,
)
from stages.llm._providers import Endpoint, Provider

T = TypeVar("T")

_CHUNK = 1 << 16


class RequestSpool:
    """A batch's requests, written to a file as they come, within the provider's limits.

    Use :meth:`BatchClient.spool`. :meth:`add` returns ``False`` (writing nothing) when the
    request would take the batch past ``max_requests`` or ``max_bytes``: the caller then
    submits this spool and starts another. The file is what gets uploaded, byte for byte.
    """

    def __init__(self, path: str, wire: BatchWire, limits: BatchLimits) -> None:
        self.path = path
        self.wire = wire
        self.limits = limits
        self.count = 0
        self._prefix, self._separator, self._suffix = wire.framing()
        self.size = len(self._prefix) + len(self._suffix)
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._file.write(self._prefix)

    def __enter__(self) -> RequestSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, custom_id: str, body: Mapping[str, Any]) -> bool:
        """Append one request; return ``False`` if it does not fit in this batch.

        Raises:
            BatchRefusedError: The request alone is larger than a whole batch may be.
        """
        line = self.wire.request_line(custom_id, body)
        extra = len(line) + (len(self._separator) if self.count else 0)
        if self.count >= self.limits.max_requests or self.size + extra > self.limits.max_bytes:
            if self.count == 0:
                raise BatchRefusedError(
                    f"request {custom_id!r} is {len(line):,} bytes, more than a whole batch may"
                    f" hold ({self.limits.max_bytes:,} bytes)"
                )
            return False
        if self.count:
            self._file.write(self._separator)
        self._file.write(line)
        self.count += 1
        self.size += extra
        return True

    def close(self) -> None:
        """Finish the file (flushed and fsynced); further :meth:`add` calls are errors."""
        if not self._file.closed:
            self._file.write(self._suffix)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


class BatchClient:
    """The batch endpoints of one provider, over one HTTP session.

    Use it as ``async with BatchClient(provider, api_key=key) as client:``.

    Args:
        provider: The provider (its base URL, headers, body building and answer parsing).
        api_key: The API key (sent only in the provider's auth header).
        endpoint: ``"chat"`` or ``"embeddings"`` (embeddings: OpenAI-compatible only).
        limits: Per-batch limits (default: the provider's published ones).
        headers: Extra headers for every request.
        timeout: Seconds one control-plane request may take (uploads and downloads included).
        max_retries: Retries of a control-plane request after a transient failure.
        backoff_cap: Largest backoff between those retries, in seconds.

    Raises:
        BatchUnsupportedError: The provider has no batch endpoint in this library (Azure).
    """

    def __init__(
        self,
        provider: Provider,
        *,
        api_key: str | None = None,
        endpoint: Endpoint = "chat",
        limits: BatchLimits | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 600.0,
        max_retries: int = 5,
        backoff_cap: float = 30.0,
    ) -> None:
        self.wire = BatchWire(provider, endpoint)
        self.kind = self.wire.kind
        self.provider = provider
        self.endpoint: Endpoint = endpoint
        self.limits = limits or self.wire.limits
        self._api_key = api_key
        self._headers = dict(headers or {})
        self._timeout = timeout
        self.max_retries = max_retries
        self.backoff_cap = backoff_cap
        self._session: aiohttp.ClientSession | None = None
        self.requests_sent = 0

    def __repr__(self) -> str:
        return f"BatchClient({self.provider!r}, kind={self.kind!r}, limits={self.limits!r})"

    async def __aenter__(self) -> BatchClient:
        headers = {**self._headers, **self.provider.auth_headers(self._api_key)}
        if self.kind == "anthropic":
            headers["anthropic-version"] = self.provider.base_headers()["anthropic-version"]
        self._session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=self._timeout)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            with anyio.CancelScope(shield=True):
                await self._session.close()
            self._session = None

    # -- the request file ----------------------------------------------------------------

    def spool(self, path: str) -> RequestSpool:
        """Start a batch's request file at ``path`` (see :class:`RequestSpool`)."""
        return RequestSpool(path, self.wire, self.limits)

    async def upload(self, path: str) -> str:
        """Upload a request file (OpenAI); return its file id.

        Raises:
            BatchUnsupportedError: The server has no files endpoint.
            BatchRefusedError: The upload was refused.
        """
        if self.kind != "openai":
            raise ConfigError("only OpenAI-compatible batches upload a file first")

        async def attempt() -> Any:
            f = await _open(path)
            try:
                form = aiohttp.FormData()
                form.add_field("purpose", "batch")
                form.add_field(
                    "file", f, filename=os.path.basename(path), content_type="application/jsonl"
                )
                return await self._json("POST", self._url("/files"), "upload the requests", form)
            finally:
                f.close()

        data = await self._retrying(attempt)
        file_id = data.get("id") if isinstance(data, dict) else None
        if not isinstance(file_id, str):
            raise BatchAPIError(f"the upload's answer has no file id: {short(data)}")
        return file_id

    async def create(
        self, source: str, *, metadata: Mapping[str, str] | None = None
    ) -> BatchStatus:
        """Create a batch: OpenAI from an uploaded file id, Anthropic from a request file path.

        A transient failure is retried only when :meth:`find` shows the attempt created no
        batch (OpenAI by ``metadata``; Anthropic by request count and creation time).

        Raises:
            BatchUnsupportedError: The server has no batch endpoint.
            BatchRefusedError: The provider refused the batch.
        """
        count = None
        if self.kind == "anthropic":
            count = count_anthropic_requests(source)
        started = datetime.datetime.now(datetime.timezone.utc).timestamp()
        tries = 0
        while True:
            try:
                return await self._create_once(source, metadata)
            except _Transient as failure:
                tries += 1
                found = await self.find(metadata=metadata, count=count, created_after=started - 5)
                if found is not None:
                    return found
                if tries > self.max_retries:
                    raise failure.error from None
                await anyio.sleep(self._backoff(tries, failure.retry_after))

    async def _create_once(self, source: str, metadata: Mapping[str, str] | None) -> BatchStatus:
        if self.kind == "anthropic":
            f = await _open(source)
            try:
                data = await self._json(
                    "POST",
                    self._url("/messages/batches"),
                    "create the batch",
                    f,
                    {"Content-Type": "application/json"},
                )
            finally:
                f.close()
        else:
            body: dict[str, Any] = {
                "input_file_id": source,
                "endpoint": self.wire.endpoint_path,
                "completion_window": "24h",
            }
            if metadata:
                body["metadata"] = dict(metadata)
            data = await self._json("POST", self._url("/batches"), "create the batch", body)
        return self.wire.status(data)

    async def find(
        self,
        *,
        metadata: Mapping[str, str] | None = None,
        count: int | None = None,
        created_after: float | None = None,
    ) -> BatchStatus | None:
        """Return the batch a create request may have made though its answer was lost.

        OpenAI batches are matched by ``metadata`` (all its pairs); Anthropic batches, which
        carry no metadata, by request count and a creation time after ``created_after``, and
        only when exactly one batch matches. Only the newest page of batches is searched.
        """
        if self.kind == "openai" and not metadata:
            return None
        if self.kind == "anthropic" and (count is None or created_after is None):
            return None
        path = "/messages/batches" if self.kind == "anthropic" else "/batches"
        data = await self._retrying(
            lambda: self._json("GET", self._url(path) + "?limit=100", "list batches")
        )
        items = data.get("data") if isinstance(data, dict) else None
        matches = []
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            status = self.wire.status(item)
            if self.kind == "openai":
                assert metadata is not None
                found = status.metadata or {}
                if all(found.get(k) == v for k, v in metadata.items()):
                    matches.append(status)
            elif (
                status.total == count
                and status.created_at is not None
                and created_after is not None
                and status.created_at >= created_after
            ):
                matches.append(status)
        return matches[0] if len(matches) == 1 else None

    # -- following -----------------------------------------------------------------------

    async def retrieve(self, batch_id: str) -> BatchStatus:
        """Return the batch's current status."""
        data = await self._retrying(
            lambda: self._json("GET", self._batch_url(batch_id), f"poll batch {batch_id}")
        )
        return self.wire.status(data)

    async def cancel(self, batch_id: str) -> BatchStatus:
        """Ask the provider to cancel the batch; return its status (``cancelling``...)."""
        data = await self._retrying(
            lambda: self._json(
                "POST", self._batch_url(batch_id) + "/cancel", f"cancel batch {batch_id}"
            )
        )
        return self.wire.status(data)

    async def results(self, status: BatchStatus) -> AsyncIterator[BatchResult]:
        """Yield every result of an ended batch, read as a stream (answers, then errors).

        Raises:
            BatchAPIError: A results line is not JSON or lacks a ``custom_id``.
        """
        if self.kind == "anthropic":
            if status.results_url:
                async for item in self._lines(self._absolute(status.results_url), status.id):
                    yield self.wire.result(item, status.id)
            return
        for file_id in (status.output_file_id, status.error_file_id):
            if file_id:
                url = self._url(f"/files/{file_id}/content")
                async for item in self._lines(url, status.id):
                    yield self.wire.result(item, status.id)

    # -- reading answers -----------------------------------------------------------------

    def _url(self, path: str) -> str:
        return self.provider.base_url + path

    def _absolute(self, url: str) -> str:
        """Resolve a results URL the provider gave relative to its own host."""
        if url.startswith(("http://", "https://")):
            return url
        scheme, _, rest = self.provider.base_url.partition("://")
        return f"{scheme}://{rest.split('/', 1)[0]}{url if url.startswith('/') else '/' + url}"

    def _batch_url(self, batch_id: str) -> str:
        path = "/messages/batches/" if self.kind == "anthropic" else "/batches/"
        return self._url(path + batch_id)

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP session (only inside ``async with``)."""
        if self._session is None:
            raise ConfigError("use the BatchClient in `async with` before calling it")
        return self._session

    async def _json(
        self,
        method: str,
        url: str,
        what: str,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Send one request and return its JSON answer; errors say which step failed."""
        kwargs: dict[str, Any] = {"headers": headers}
        if isinstance(data, dict):
            kwargs["json"] = data
        elif data is not None:
            kwargs["data"] = data
        self.requests_sent += 1
        try:
            async with self.session.request(method, url, **kwargs) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise self._failure(resp.status, resp.headers, raw, what, url)
        except (aiohttp.ClientError, TimeoutError) as exc:
            message = f"could not {what} ({method} {_safe(url)}): {type(exc).__name__}: {exc}"
            raise _Transient(BatchAPIError(message), None) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise BatchAPIError(
                f"could not {what}: {method} {_safe(url)} answered something that is not JSON:"
                f" {short(raw.decode('utf-8', 'replace'))}"
            ) from None

    def _failure(
        self, status: int, headers: Mapping[str, str], raw: bytes, what: str, url: str
    ) -> Exception:
        failure = self.provider.classify(status, headers, raw)
        where = f"could not {what}: {_safe(url)} answered {failure.describe()}"
        path = _safe(url).rstrip("/")
        if status in (404, 405) and path.endswith(("/files", "/batches")):
            return BatchUnsupportedError(
                f"{where}. The server at {self.provider.base_url} has no batch endpoint: drop"
                " --batch-api (batch_api=False) to send the rows online",
                status=status,
            )
        if failure.quota:
            return BatchAPIError(f"{where} (the account is out of quota or credit)", status=status)
        if failure.retryable:
            retry_after = _retry_after(headers)
            return _Transient(BatchAPIError(where, status=status), retry_after)
        if status in (400, 413, 415, 422):
            return BatchRefusedError(where, status=status)
        return BatchAPIError(where, status=status)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run a control-plane request, retrying transient failures with capped backoff."""
        tries = 0
        while True:
            try:
                return await attempt()
            except _Transient as failure:
                tries += 1
                if tries > self.max_retries:
                    raise failure.error from None
                await anyio.sleep(self._backoff(tries, failure.retry_after))

    def _backoff(self, tries: int, retry_after: float | None) -> float:
        if retry_after is not None and 0 < retry_after <= self.backoff_cap * 4:
            return retry_after
        return random.uniform(0, min(self.backoff_cap, 0.5 * 2**tries))

    async def _lines(self, url: str, batch_id: str) -> AsyncIterator[Any]:
        """Yield the JSON objects of a JSONL download, read in chunks (any line length)."""
        what = f"download the results of batch {batch_id}"
        self.requests_sent += 1
        try:
            async with self.session.get(url) as resp:
                if resp.status >= 400:
                    raw = await resp.read()
                    failure = self._failure(resp.status, resp.headers, raw, what, url)
                    raise failure.error if isinstance(failure, _Transient) else failure
                pending = b""
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    pending += chunk
                    if b"\n" not in chunk:
                        continue
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield json_line(line, batch_id)
                if pending.strip():
                    yield json_line(pending, batch_id)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BatchAPIError(f"could not {what}: {type(exc).__name__}: {exc}") from None


class _Transient(Exception):
    """A control-plane failure worth retrying (carries the error to raise when out of tries)."""

    def __init__(self, error: BatchAPIError, retry_after: float | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _safe(url: str) -> str:
    return url.split("?", 1)[0]


async def _open(path: str) -> IO[bytes]:
    """Open a request file for reading without blocking the event loop."""
    return await anyio.to_thread.run_sync(lambda: open(path, "rb"))
