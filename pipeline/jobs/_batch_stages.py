"""The stages of the batch engine: spool rows into chunks, read them back, resolve answers.

:class:`Spooler` is the last stage of the submitting run (``source | Spooler``): it turns each
row into the request the online caller would send, writes it to the current chunk's request
and rows files, and hands each full chunk to the engine. :class:`RowsSource` reads a chunk's
rows back; :class:`Resolver` turns each into its output row from the batch's results (or a
dead letter), and :class:`JournalSink` appends the outcome to the job's journal in the output
format. Rows that go to another chunk are dropped (counted, not lost).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Awaitable, Callable, Collection, Container, Hashable, Mapping
from typing import Any, BinaryIO, cast

import anyio

from pipeline._envelope import Envelope, Failed
from pipeline._errors import ItemError
from pipeline._json import dumps, loads
from pipeline._stage import Inbox, Outbox, Source, Stage
from pipeline.jobs._batch_log import BatchLog, SpooledRow, read_rows
from stages.files import JournalFile, dead_letter_record, encode_record
from stages.files._rows import line_of
from stages.llm._batch_api import BatchClient, RequestSpool
from stages.llm._batch_wire import BatchResult
from stages.llm._cache import request_key
from stages.llm._caller import LLMCaller, Price
from stages.llm._prompt import chat_messages, embedding_text
from stages.llm._providers import Answer, HTTPFailure
from stages.llm._sse import Usage

ChunkReady = Callable[[int], Awaitable[None]]
Payload = Callable[[Envelope[Any]], bytes]


class BatchRowError(ItemError):
    """A row the provider answered with an error, or that no batch answered in time."""


@dataclasses.dataclass
class Costs:
    """What the rows answered so far cost, in batch and in online prices.

    Attributes:
        prompt_tokens: Prompt tokens reported.
        completion_tokens: Completion tokens reported.
        batch_usd: Their cost at batch prices.
        online_usd: What the same tokens cost online.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_usd: float = 0.0
    online_usd: float = 0.0

    def add(self, answer: Answer, batch: Price | None, online: Price | None) -> float:
        """Count one answer; return its cost at batch prices."""
        usage = answer.usage
        if usage is None:
            return 0.0
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        cost = batch.cost(usage) if batch is not None else 0.0
        self.batch_usd += cost
        self.online_usd += online.cost(usage) if online is not None else 0.0
        return cost


def merged(caller: LLMCaller, record: Any, result: Any) -> Any:
    """Return the output row: the record with the answer in the caller's output field."""
    if isinstance(record, Mapping):
        return {**record, caller.output.field: result}
    return {"value": record, caller.output.field: result}


def answer_value(caller: LLMCaller, answer: Answer) -> Any:
    """Return what goes in the output field: the text, the parsed JSON, or the vector.

    Raises:
        ItemError: The answer is not the JSON the job asks for.
    """
    if caller.endpoint == "embeddings":
        return answer.embeddings[0] if answer.embeddings else None
    validator = caller.output.validator
    if validator is None:
        return answer.text
    try:
        return validator(answer.text)
    except ValueError as error:
        raise ItemError(f"invalid JSON output: {error}") from None


def request_body(caller: LLMCaller, record: Any) -> dict[str, Any]:
    """Return the body ``caller`` sends online for ``record`` (never streaming).

    The same prompt template, system prompt, params and structured-output settings as the
    online caller, through the same provider adapter: a batch request is the online request.

    Raises:
        MissingFieldError: A field the prompt template names is missing from the record.
    """
    provider = caller.provider
    assert provider is not None
    if caller.endpoint == "embeddings":
        text = embedding_text(caller.template, record)
        return provider.embeddings_body(caller.model, [text], caller.params)
    chat = chat_messages(caller.template, record)
    return provider.chat_body(caller.model, chat, caller.system, caller.params, False)


def journal_line(env: Envelope[Any]) -> int:
    """Return the input line of a row (its origin's line, else its position)."""
    line = line_of(env.origin)
    return env.seq + 1 if line is None else line


class JournalSink(Stage[Any, Any]):
    """Append each item's payload to a job journal (kept open by the engine), pass it on.

    Args:
        journal: The output or dead-letter journal.
        payload: The item's journal payload (the output sink's, or a dead-letter record).
        on_write: Called with each envelope written (counting).
        name: The stage's name.
    """

    def __init__(
        self,
        journal: JournalFile,
        payload: Payload,
        *,
        on_write: Callable[[Envelope[Any]], None] | None = None,
        name: str = "journal",
    ) -> None:
        super().__init__(name=name, workers=1, buffer=64)
        self.journal = journal
        self.payload = payload
        self.on_write = on_write

    @property
    def is_sink(self) -> bool:
        """A sink: an ordered run restores order before it."""
        return True

    async def run(self, inbox: Inbox[Any], outbox: Outbox[Any]) -> None:
        """Write the items in chunks of what has arrived (one write each), fsync at the end."""
        async for env in inbox:
            chunk = [env]
            while len(chunk) < 512:
                try:
                    chunk.append(inbox.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            records: list[bytes] = []
            written: list[Envelope[Any]] = []
            for item in chunk:
                try:
                    records.append(encode_record(journal_line(item), item.key, self.payload(item)))
                except (ItemError, TypeError, ValueError) as error:
                    await outbox.fail(item, ItemError(f"cannot write the row: {error}"))
                    continue
                written.append(item)
            if records:
                self.journal.append(b"".join(records), len(records))
            for item in written:
                if self.on_write is not None:
                    self.on_write(item)
                await outbox.send(item)
        await anyio.to_thread.run_sync(self.journal.sync)


def dead_letter_payload(env: Envelope[Any]) -> bytes:
    """Return the dead-letter record of a failed row, as every engine writes it."""
    failed = env.value
    if not isinstance(failed, Failed):
        failed = Failed(failed, "?", "Error", "not a Failed record", 1, env.seq, env.key)
    record = dead_letter_record(failed)
    try:
        return dumps(record)
    except (TypeError, ValueError):
        record["row"] = repr(failed.item)
        return dumps(record)


class Spooler(Stage[Any, Any]):
    """Write each row's request to the current chunk; hand full chunks to the engine.

    Args:
        caller: Builds each row's request (prompt template, system prompt, params, schema).
        client: The batch client (request format and per-batch limits).
        log: The batch log (chunk files, ``chunk`` events).
        ready: Called with each chunk's number once it is durable (the engine submits it).
        cached: Called with a row and its answer when the response cache already has it.
        online: Whether its chunks go online (``batch_fallback="online"`` retries).
    """

    def __init__(
        self,
        caller: LLMCaller,
        client: BatchClient,
        log: BatchLog,
        ready: ChunkReady,
        cached: Callable[[Envelope[Any], Answer], Awaitable[None]] | None = None,
        *,
        online: bool = False,
    ) -> None:
        super().__init__(name="spool", workers=1, buffer=16)
        self.caller = caller
        self.client = client
        self.batch_log = log
        self.ready = ready
        self.cached = cached
        self.online = online
        self.retry_of: int | None = None
        self.spooled = 0
        self._number = 0
        self._attempt = 1
        self._spool: RequestSpool | None = None
        self._rows: BinaryIO | None = None

    async def run(self, inbox: Inbox[Any], outbox: Outbox[Any]) -> None:
        """Spool every row; finish the last chunk when the input ends."""
        try:
            async for env in inbox:
                try:
                    await self._one(env, outbox)
                except Exception as error:  # a row's own problem (a missing field)
                    await outbox.handle_error(env, error)
            await self.finish()
        finally:
            self._discard()

    async def _one(self, env: Envelope[Any], outbox: Outbox[Any]) -> None:
        caller = self.caller
        body = request_body(caller, env.value)
        if caller.cache is not None and self.cached is not None:
            raw = await caller.cache.get(request_key(cache_url(caller), body))
            if raw is not None:
                try:
                    answer = Answer.from_bytes(raw)
                except (ValueError, TypeError):
                    answer = None
                if answer is not None:
                    caller.totals.cache_hits += 1
                    await self.cached(env, answer)
                    outbox.drop(env)
                    return
        row = SpooledRow(journal_line(env), _key(env), env.origin, 1, env.value)
        await self.add(row, body)
        outbox.drop(env)

    async def add(self, row: SpooledRow, body: Mapping[str, Any]) -> None:
        """Add one row to the current chunk, starting a new one when it is full."""
        if self._spool is None:
            self._start()
        assert self._spool is not None and self._rows is not None
        if not self._spool.add(row.custom_id, body):
            await self.finish()
            self._start()
            assert self._spool is not None and self._rows is not None
            self._spool.add(row.custom_id, body)
        self._rows.write(row.to_bytes())
        self._attempt = max(self._attempt, row.attempt)
        self.spooled += 1

    def _start(self) -> None:
        self._number = self.batch_log.allocate()
        self._attempt = 1
        self._spool = self.client.spool(self.batch_log.requests_path(self._number))
        self._rows = cast(BinaryIO, open(self.batch_log.rows_path(self._number), "wb"))  # noqa: SIM115

    async def finish(self) -> int | None:
        """Make the current chunk durable, record it, and hand it over; return its number."""
        spool, rows = self._spool, self._rows
        if spool is None or rows is None:
            return None
        self._spool = self._rows = None
        count = spool.count

        def close() -> None:
            spool.close()
            rows.flush()
            os.fsync(rows.fileno())
            rows.close()
            event: dict[str, Any] = {"event": "chunk", "chunk": self._number, "rows": count}
            event.update(attempt=self._attempt, online=self.online, retry_of=self.retry_of)
            self.batch_log.record(event)

        await anyio.to_thread.run_sync(close)
        await self.ready(self._number)
        return self._number

    def _discard(self) -> None:
        """Close the files of a chunk left unfinished (a stop): resume spools its rows again."""
        if self._spool is not None:
            self._spool.close()
        if self._rows is not None:
            self._rows.close()
        self._spool = self._rows = None


async def spool_retries(spooler: Spooler, rows: list[SpooledRow]) -> None:
    """Write ``rows`` (on their next attempt) to new chunks and hand them over."""
    for row in rows:
        await spooler.add(row, request_body(spooler.caller, row.row))
    await spooler.finish()


def _key(env: Envelope[Any]) -> Hashable:
    return env.key if env.key is not None else journal_line(env)


class RowsSource(Source[Any]):
    """Emit the rows of a chunk's rows file under their original keys and origins.

    Args:
        path: The rows file.
        skip: Lines already journaled (a resumed job), not emitted again.
    """

    def __init__(self, path: str, skip: Container[int]) -> None:
        super().__init__(name="chunk-rows")
        self.path = path
        self.skip = skip

    async def run(self, inbox: Inbox[None], outbox: Outbox[Any]) -> None:
        """Emit every row not skipped."""
        for row in read_rows(self.path):
            if row.line in self.skip:
                continue
            await outbox.emit(row, key=row.key, origin=row.origin)


_ANSWERED, _RETRYABLE, _UNRUN = 1, 2, 4


def line_of_id(custom_id: str) -> int | None:
    """Return the input line a ``custom_id`` names (``"r17"`` -> 17), or ``None``."""
    if custom_id[:1] != "r" or not custom_id[1:].isdigit():
        return None
    return int(custom_id[1:])


class ResultStore:
    """A batch's results on disk, found by input line through an index of packed offsets.

    Holding a batch's answers in memory would cost up to 50,000 answers at once; the index
    holds one packed integer per request (offset, length and what the result says), and each
    answer is read back when its row is written.

    Args:
        path: Where the results are written (``chunk-N.results``).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.index: dict[int, int] = {}
        self._file: BinaryIO | None = None
        self._size = 0

    def __enter__(self) -> ResultStore:
        self._file = cast(BinaryIO, open(self.path, "w+b"))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if os.path.exists(self.path):
            os.remove(self.path)

    def add(self, line: int, result: BatchResult) -> None:
        """Store the result of input line ``line`` (a later one replaces it)."""
        assert self._file is not None
        answer, failure = result.answer, result.failure
        data: list[Any] = [result.custom_id, result.outcome, None, None]
        flags = 0
        if answer is not None:
            usage = answer.usage
            data[2] = [
                answer.text,
                answer.finish_reason,
                [usage.prompt_tokens, usage.completion_tokens] if usage is not None else None,
                answer.model,
                answer.embeddings,
            ]
            flags = _ANSWERED
        elif result.outcome in ("expired", "canceled"):
            flags = _UNRUN | _RETRYABLE
        if failure is not None:
            data[3] = [failure.status, failure.code, failure.message, failure.retryable]
            if failure.retryable:
                flags |= _RETRYABLE
        encoded = dumps(data)
        self._file.seek(self._size)
        self._file.write(encoded)
        self.index[line] = (self._size << 34) | (len(encoded) << 3) | flags
        self._size += len(encoded)

    def answered(self, line: int) -> bool:
        """Whether the batch answered the line."""
        return bool(self.index.get(line, 0) & _ANSWERED)

    def unrun(self, line: int) -> bool:
        """Whether the batch did not run the line (expired, cancelled, or no result at all)."""
        packed = self.index.get(line)
        return packed is None or bool(packed & _UNRUN)

    def retryable(self, line: int) -> bool:
        """Whether sending the line again may help (not run, or a retryable error)."""
        packed = self.index.get(line)
        return packed is None or bool(packed & _RETRYABLE)

    def get(self, line: int) -> BatchResult | None:
        """Return the result of input line ``line``, or ``None`` when the batch gave none."""
        packed = self.index.get(line)
        if packed is None or self._file is None:
            return None
        self._file.seek(packed >> 34)
        found, outcome, answer_data, failure_data = loads(
            self._file.read((packed >> 3) & ((1 << 31) - 1))
        )
        answer = None
        if answer_data is not None:
            text, finish, usage, model, embeddings = answer_data
            answer = Answer(text, finish, Usage(*usage) if usage else None, model, embeddings)
        failure = None
        if failure_data is not None:
            status, code, message, retryable = failure_data
            failure = HTTPFailure(status, code, message, retryable)
        return BatchResult(found, outcome, answer, failure)


class Resolver(Stage[Any, Any]):
    """Turn each spooled row into its output row from the batch's results.

    Args:
        caller: The job's caller (output field, structured output, cache).
        results: The batch's results (:class:`ResultStore`).
        moved: ``custom_id`` of the rows sent to another chunk (dropped here).
        costs: Where the answers' usage and cost are added.
        prices: ``(batch, online)`` price of the model.
    """

    def __init__(
        self,
        caller: LLMCaller,
        results: ResultStore,
        moved: Collection[str],
        costs: Costs,
        prices: tuple[Price | None, Price | None],
    ) -> None:
        super().__init__(name="llm", workers=1, buffer=64)
        self.caller = caller
        self.results = results
        self.moved = moved
        self.costs = costs
        self.prices = prices

    async def run(self, inbox: Inbox[Any], outbox: Outbox[Any]) -> None:
        """Resolve every row: send its output row, dead-letter it, or drop it (moved)."""
        caller = self.caller
        async for env in inbox:
            row: SpooledRow = env.value
            plain = env.replace(row.row)
            if row.custom_id in self.moved:
                outbox.drop(env)
                continue
            result = self.results.get(row.line)
            if result is None or result.answer is None:
                await outbox.fail(plain, _row_error(result, row.attempt))
                continue
            try:
                value = answer_value(caller, result.answer)
            except ItemError as error:
                error.attempts = row.attempt
                await outbox.fail(plain, error)
                continue
            self.costs.add(result.answer, *self.prices)
            if caller.cache is not None:
                body = request_body(caller, row.row)
                key = request_key(cache_url(caller), body)
                await caller.cache.put(key, result.answer.to_bytes())
            await outbox.send(plain.replace(merged(caller, row.row, value)))


def cache_url(caller: LLMCaller) -> str:
    """Return the URL the response cache keys a request by (the online one: shared)."""
    assert caller.provider is not None
    return caller.provider.url(caller.endpoint, caller.model)


def _row_error(result: BatchResult | None, attempts: int) -> BatchRowError:
    if result is None:
        message = f"no batch answered the row in {attempts} attempt(s)"
        return BatchRowError(message, attempts=attempts)
    if result.outcome in ("expired", "canceled"):
        return BatchRowError(
            f"the row's batch {result.outcome} before it ran, {attempts} time(s)",
            attempts=attempts,
        )
    failure = result.failure
    status = failure.status if failure is not None and failure.status else None
    text = failure.describe() if failure is not None else "errored"
    return BatchRowError(f"the batch answered {text}", status=status, attempts=attempts)


@dataclasses.dataclass
class BatchCounts:
    """The batches of a run, for progress and the summary.

    Attributes:
        submitted: Batches created on the provider (this run, or re-attached).
        in_progress: Batches the provider is working on.
        completed: Batches whose results are journaled.
        failed: Batches that failed, expired or were cancelled (their rows retried).
        rows_per_batch: Rows of the largest batch.
        waiting_s: Seconds spent waiting for the provider.
        unmatched: Result lines whose custom_id matched no row of their batch.
        online_rows: Rows sent online (``batch_fallback="online"``).
    """

    submitted: int = 0
    in_progress: int = 0
    completed: int = 0
    failed: int = 0
    rows_per_batch: int = 0
    waiting_s: float = 0.0
    unmatched: int = 0
    online_rows: int = 0


class PlainRowsSource(RowsSource):
    """A chunk's rows as plain rows (for the online caller)."""

    async def run(self, inbox: Any, outbox: Any) -> None:
        """Emit every row's value under its key and origin."""
        for row in read_rows(self.path):
            if row.line not in self.skip:
                await outbox.emit(row.row, key=row.key, origin=row.origin)


class KeyUnion:
    """Membership in any of several line sets (done rows, rows claimed by batches)."""

    def __init__(self, *sets: Any) -> None:
        self.sets = sets

    def __contains__(self, key: object) -> bool:
        return any(key in s for s in self.sets)


def key_union(*sets: Container[int]) -> KeyUnion:
    """Return membership in any of ``sets``."""
    return KeyUnion(*sets)
