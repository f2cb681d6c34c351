"""The batch engine: a file job sent through the provider's Batch API, at half the price.

``run_job(JobSettings(..., batch_api=True))`` (``python -m pipeline run ... --batch-api``) runs
the same job as the local engine (prompt template, structured output, cache, id field, output
file, dead letter, progress, summary, budget, resume, ordering) but sends the requests through
OpenAI's or Anthropic's batch endpoints::

    source -> Spooler: each row's request into the current chunk's files (flat memory)
        -> chunk full: recorded in the batch log, uploaded, created as a provider batch
    poller: every --batch-poll seconds (backing off while nothing changes)
        -> a batch ended: its results read as a stream, matched to rows by custom_id
        -> answered rows to the output journal, final errors to the dead letter, the rest
           (expired, cancelled, failed, retryable errors) to a new chunk (or online)

Results are journaled as each batch ends, so the job's output fills in batch by batch; the
journals and the batch log (:mod:`pipeline.jobs._batch_log`) make a resume after ``kill -9``
re-attach to the batches already submitted: no row is submitted twice and none is lost.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any

import anyio
import anyio.to_thread

from pipeline._compat import BaseExceptionGroup
from pipeline._envelope import Envelope, Failed
from pipeline._errors import ConfigError, FatalError
from pipeline._runner import unwrap_group
from pipeline.jobs._batch_log import BatchLog, Chunk, read_rows
from pipeline.jobs._batch_stages import (
    BatchCounts,
    Costs,
    JournalSink,
    PlainRowsSource,
    Resolver,
    ResultStore,
    RowsSource,
    Spooler,
    answer_value,
    dead_letter_payload,
    journal_line,
    key_union,
    line_of_id,
    merged,
    spool_retries,
)
from pipeline.jobs._caller import build_caller, preflight, release_caller
from pipeline.jobs._journal import Journal
from pipeline.jobs._progress import (
    JobFailedError,
    JobProgress,
    JobSummary,
    ProgressHook,
    RunOptions,
    call_progress,
)
from pipeline.jobs._settings import JobSettings
from stages.files import encode_record
from stages.files._records import LineSet
from stages.llm._batch_api import BatchClient
from stages.llm._batch_wire import BatchLimits, BatchResult, BatchStatus
from stages.llm._caller import LLMCaller, Price
from stages.llm._providers import Answer

log = logging.getLogger("pipeline.job")

_MAX_POLL_S = 300.0


class BatchJob:
    """One run of a job on the batch engine (see the module documentation)."""

    def __init__(
        self,
        settings: JobSettings,
        on_progress: ProgressHook | None = None,
        stop_event: Any = None,
        stop_reason: str = "stop requested",
        progress_interval: float = 0.5,
    ) -> None:
        self.settings = settings
        self.on_progress = on_progress
        self.stop_event = stop_event
        self.stop_reason = stop_reason
        self.progress_interval = progress_interval
        self.started = time.perf_counter()
        self.counts = BatchCounts()
        self.costs = Costs()
        self.ok = 0
        self.failed = 0
        self.rows_in = 0
        self.causes: dict[str, int] = {}
        self.stopped: str | None = None
        self.caller: LLMCaller | None = None
        self.journal: Journal | None = None
        self.log: BatchLog | None = None
        self.client: BatchClient | None = None
        self.online_requests = 0
        self._active: dict[int, str] = {}
        self._wake = anyio.Event()
        self._spooling_done = False
        self._budget_hit: str | None = None
        self._read_all = False
        self._input_rows: int | None = None
        self.total: int | None = None
        self._spool_results: Any = None
        self._output_payload: Any = None

    # -- running -------------------------------------------------------------------------

    async def run(self) -> JobSummary:
        """Run the job to the end, or until stopped; return its summary."""
        settings = self.settings
        assert settings.input is not None and settings.output is not None
        journal = Journal(
            settings.output,
            dead_letter=settings.dead_letter,
            settings={**settings.fingerprint(), "batch_api": True},
            input=settings.input,
            resume=settings.resume or settings.cancel_batches,
            overwrite=settings.overwrite,
            ordered=settings.ordered,
        )
        caller = await anyio.to_thread.run_sync(functools.partial(build_caller, settings))
        self.caller = caller
        try:
            client = self._client(caller)
            await preflight(caller, timeout=min(10.0, settings.timeout))
            await anyio.to_thread.run_sync(journal.open)
            self.journal = journal
            if journal.complete:
                return self._summary(complete=True)
            batch_log = BatchLog(settings.output)
            await anyio.to_thread.run_sync(
                functools.partial(batch_log.open, fresh=not journal.resumed)
            )
            self.log = batch_log
            async with client:
                self.client = client
                if settings.cancel_batches:
                    return await self._cancel_all(journal, batch_log)
                return await self._run(journal, batch_log, caller, client)
        except Exception as error:
            if self.journal is not None and not settings.cancel_batches:
                discarded = await anyio.to_thread.run_sync(journal.discard)
                if discarded and self.log is not None:
                    self.log.remove()
            if isinstance(error, FatalError) and not isinstance(error, JobFailedError):
                raise JobFailedError(str(error), self._summary()) from error
            raise
        finally:
            if self.log is not None:
                self.log.close()
            await release_caller(caller)

    def _client(self, caller: LLMCaller) -> BatchClient:
        settings = self.settings
        assert caller.provider is not None
        key_env = settings.api_key_env or caller.provider.key_env
        key = os.environ.get(key_env)
        if settings.api_key_env and not key:
            raise ConfigError(f"environment variable {key_env} (api_key_env) is not set")
        client = BatchClient(
            caller.provider,
            api_key=key,
            endpoint=settings.endpoint,
            headers=settings.headers,
            timeout=settings.timeout,
        )
        if settings.batch_max_rows is not None:
            limits = client.limits
            client.limits = BatchLimits(
                min(limits.max_requests, settings.batch_max_rows), limits.max_bytes
            )
        return client

    async def _run(
        self, journal: Journal, batch_log: BatchLog, caller: LLMCaller, client: BatchClient
    ) -> JobSummary:
        from stages.files import open_sink

        settings = self.settings
        output_sink = open_sink(journal.output, fmt=settings.output_format)
        self._output_payload = output_sink.payload
        journal.output.open()
        journal.dead_letter.open()
        submit_send, submit_recv = anyio.create_memory_object_stream[int](1)
        skip = key_union(journal.done, batch_log.claimed())
        pending = batch_log.open_chunks()
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._submitter, submit_recv)
                if self.on_progress is not None:
                    tg.start_soon(self._count)
                    tg.start_soon(self._progress_task)
                if self.stop_event is not None:
                    tg.start_soon(self._stop_task)
                async with submit_send:
                    for chunk in pending:
                        if chunk.batch_id is not None:
                            self._active[chunk.number] = chunk.batch_id
                            self.counts.submitted += 1
                        else:
                            await submit_send.send(chunk.number)
                    tg.start_soon(self._spool_all, skip, submit_send.clone())
                    await self._poller(submit_send)
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            error = unwrap_group(group)
            if not isinstance(error, Exception):
                raise error from None
            failure = error
        except Exception as error:
            failure = error
        if failure is not None:
            await anyio.to_thread.run_sync(journal.close)
            if isinstance(failure, FatalError) and not isinstance(failure, JobFailedError):
                raise JobFailedError(str(failure), self._summary()) from failure
            raise failure
        if not self._read_all:  # the budget stopped the input before its end
            self.stopped = self.stopped or self._budget_hit
        complete = self.stopped is None and not batch_log.open_chunks()
        if complete:  # every input row read must have its record: commit checks the count
            await anyio.to_thread.run_sync(journal.commit, self._input_rows)
            batch_log.remove()
        else:
            await anyio.to_thread.run_sync(journal.close)
        summary = self._summary(complete=complete)
        if self.on_progress is not None:
            await call_progress(self.on_progress, self._progress(final=True))
        return summary

    # -- submitting ----------------------------------------------------------------------

    async def _spool_all(self, skip: Any, submit: Any) -> None:
        """Read the input (rows not done nor claimed) into chunks, handing each to submit."""
        from pipeline._stage import Pipeline
        from stages.files import open_source

        settings = self.settings
        assert settings.input is not None and self.caller and self.client and self.log
        journal = self.journal
        assert journal is not None

        async def ready(number: int) -> None:
            await submit.send(number)

        spooler = Spooler(self.caller, self.client, self.log, ready, self._cached)
        source = open_source(
            settings.input,
            fmt=settings.input_format,
            id_field=settings.id_field,
            skip_lines=skip,
            delimiter=settings.csv_delimiter,
            encoding=settings.encoding,
        )
        pipe = Pipeline(source, spooler, dead_letter=self._dead_letter_sink(), name="batch-spool")
        async with submit:
            async with pipe.open() as results:
                self._spool_results = results
                async for _ in results:
                    pass
            report = results.report
            self.rows_in += report.rows_in if report else 0
            self._read_all = report is not None and report.complete and report.stopped is None
            if self._read_all:  # every row of the input, the done and claimed ones included
                self._input_rows = source.emitted + source.rejected + source.skipped
            self._spooling_done = True
            self._wake.set()

    async def _cached(self, env: Envelope[Any], answer: Answer) -> None:
        """Write a row the response cache answered (no batch needed)."""
        assert self.caller is not None and self.journal is not None
        value = answer_value(self.caller, answer)
        out = env.replace(merged(self.caller, env.value, value))
        data = encode_record(journal_line(env), env.key, self._output_payload(out))
        self.journal.output.append(data, 1)
        self.ok += 1

    async def _submitter(self, submit_recv: Any) -> None:
        """Upload and create a batch for each chunk handed over (in order)."""
        async with submit_recv:
            async for number in submit_recv:
                assert self.log is not None
                chunk = self.log.chunks[number]
                if chunk.online:
                    self._active[number] = ""
                else:
                    self._active[number] = await self._create(chunk)
                    self.counts.submitted += 1
                    self.counts.rows_per_batch = max(self.counts.rows_per_batch, chunk.rows)
                self._wake.set()

    async def _create(self, chunk: Chunk) -> str:
        """Upload and create chunk's batch (or find the one a crash left); return its id."""
        client, batch_log = self.client, self.log
        assert client is not None and batch_log is not None

        async def record(event: dict[str, Any]) -> None:
            await anyio.to_thread.run_sync(functools.partial(batch_log.record, event))

        number = chunk.number
        metadata = {"llm_pipeline_job": batch_log.job_id, "chunk": str(number)}
        source = batch_log.requests_path(number)
        if client.kind == "openai":
            if chunk.file_id is None:
                file_id = await client.upload(source)
                await record({"event": "uploaded", "chunk": number, "file": file_id})
            assert chunk.file_id is not None
            source = chunk.file_id
        found: BatchStatus | None = None
        if chunk.creating_at is not None:  # a crash during an earlier create: find it
            found = await client.find(
                metadata=metadata, count=chunk.rows, created_after=chunk.creating_at - 60
            )
        if found is None:
            await record({"event": "creating", "chunk": number, "at": time.time()})
            found = await client.create(source, metadata=metadata)
        await record({"event": "created", "chunk": number, "batch": found.id})
        log.info("chunk %d: batch %s created (%d rows)", number, found.id, chunk.rows)
        return found.id

    # -- collecting ----------------------------------------------------------------------

    async def _poller(self, submit: Any) -> None:
        """Poll the active batches until every chunk has ended (or the run stops)."""
        batch_log, client = self.log, self.client
        assert batch_log is not None and client is not None
        retry = Spooler(self.caller, client, batch_log, submit.send)  # type: ignore[arg-type]
        online = Spooler(self.caller, client, batch_log, submit.send, online=True)  # type: ignore[arg-type]
        interval = self.settings.batch_poll
        while True:
            if self.stopped is not None:
                return
            if self._spooling_done and not batch_log.open_chunks():
                return
            changed = False
            for number, batch_id in list(self._active.items()):
                chunk = batch_log.chunks[number]
                if chunk.online:
                    await self._run_online(chunk)
                    changed = True
                    continue
                status = await client.retrieve(batch_id)
                if status.ended:
                    await self._collect(chunk, status, retry, online)
                    changed = True
            self.counts.in_progress = sum(1 for n in self._active if not batch_log.chunks[n].online)
            if changed:
                self._check_budget()
                interval = self.settings.batch_poll
                continue
            waited = time.perf_counter()
            self._wake = anyio.Event()
            with anyio.move_on_after(interval):
                await self._wake.wait()
            self.counts.waiting_s += time.perf_counter() - waited
            cap = max(self.settings.batch_poll, min(_MAX_POLL_S, self.settings.batch_poll * 20))
            interval = min(cap, interval * 1.5)

    async def _collect(
        self, chunk: Chunk, status: BatchStatus, retry: Spooler, online: Spooler
    ) -> None:
        """Journal an ended batch's results; move its unanswered rows on; mark it ended."""
        client, batch_log, journal = self.client, self.log, self.journal
        assert client is not None and batch_log is not None and journal is not None
        rows_path = batch_log.rows_path(chunk.number)
        pending = LineSet(r.line for r in read_rows(rows_path) if r.line not in journal.done)
        outcomes: set[str] = set()
        with ResultStore(rows_path.replace(".rows", ".results")) as results:
            async for result in client.results(status):
                line = line_of_id(result.custom_id)
                if line is None or line not in pending:
                    self._unmatched(status, result)
                    continue
                results.add(line, result)
                outcomes.add(result.outcome)
            to_batch, to_online = self._moves(rows_path, chunk.attempt, results, status)
            already: set[str] = set()  # sent again by retry chunks a crash left recorded
            for number in batch_log.retries_of(chunk.number):
                already |= batch_log.rows_of(number)
            for ids, spooler in ((to_batch - already, retry), (to_online - already, online)):
                if not ids:
                    continue
                again = [
                    dataclasses.replace(row, attempt=row.attempt + 1)
                    for row in read_rows(rows_path)
                    if row.custom_id in ids
                ]
                if again:
                    spooler.retry_of = chunk.number
                    await spool_retries(spooler, again)
            moved = to_batch | to_online | already
            await self._resolve(rows_path, results, moved)
        bad = (
            status.status in ("failed", "expired", "cancelled")
            or bool(outcomes & {"expired", "canceled"})
            or "succeeded" not in outcomes
        )
        self.counts.failed += 1 if bad else 0
        self.counts.completed += 0 if bad else 1
        ended = {"event": "ended", "chunk": chunk.number, "status": status.status}
        await anyio.to_thread.run_sync(functools.partial(batch_log.record, ended))
        del self._active[chunk.number]

    def _unmatched(self, status: BatchStatus, result: BatchResult) -> None:
        self.counts.unmatched += 1
        log.error(
            "batch %s: a result for custom_id %r matches no row of the batch (kept out of the"
            " output)",
            status.id,
            result.custom_id,
        )

    def _moves(
        self, rows_path: str, attempt: int, results: ResultStore, status: BatchStatus
    ) -> tuple[set[str], set[str]]:
        """Return the ``custom_id`` of the rows to send again: in a batch, and online."""
        to_batch: set[str] = set()
        to_online: set[str] = set()
        if attempt < self.settings.max_retries + 1:
            fallback = self.settings.batch_fallback == "online"
            done = self.journal.done if self.journal is not None else ()
            for row in read_rows(rows_path):
                line = row.line
                if line in done or results.answered(line) or not results.retryable(line):
                    continue
                unrun = results.unrun(line)
                (to_online if unrun and fallback else to_batch).add(row.custom_id)
        if status.failure:
            log.warning("batch %s failed: %s (its rows are sent again)", status.id, status.failure)
        return to_batch, to_online

    async def _resolve(self, rows_path: str, results: ResultStore, moved: set[str]) -> None:
        """Write the outcome of every row of a chunk that is not moved on."""
        from pipeline._stage import Pipeline

        assert self.caller is not None and self.journal is not None
        prices = (self._price(batch=True), self._price(batch=False))
        resolver = Resolver(self.caller, results, moved, self.costs, prices)
        pipe = Pipeline(
            RowsSource(rows_path, self.journal.done),
            resolver,
            self._output_sink(),
            dead_letter=self._dead_letter_sink(),
            name="batch-results",
        )
        await pipe.run()

    async def _run_online(self, chunk: Chunk) -> None:
        """Send an online chunk's rows through the caller, like the local engine."""
        from pipeline._stage import Pipeline

        assert self.caller is not None and self.journal is not None and self.log is not None
        pipe = Pipeline(
            PlainRowsSource(self.log.rows_path(chunk.number), self.journal.done),
            self.caller,
            self._output_sink(),
            dead_letter=self._dead_letter_sink(),
            name="batch-online",
        )
        report = await pipe.run()
        self.counts.online_rows += report.rows_in
        for stats in report.stages:
            if stats.name == self.caller.name:
                self.online_requests += stats.requests
                self.costs.batch_usd += stats.cost_usd
                self.costs.online_usd += stats.cost_usd
                self.costs.prompt_tokens += stats.prompt_tokens
                self.costs.completion_tokens += stats.completion_tokens
        ended = {"event": "ended", "chunk": chunk.number, "status": "online"}
        await anyio.to_thread.run_sync(functools.partial(self.log.record, ended))
        del self._active[chunk.number]

    # -- sinks and prices ----------------------------------------------------------------

    def _output_sink(self) -> JournalSink:
        assert self.journal is not None

        def wrote(env: Envelope[Any]) -> None:
            self.ok += 1

        return JournalSink(self.journal.output, self._output_payload, on_write=wrote, name="output")

    def _dead_letter_sink(self) -> JournalSink:
        assert self.journal is not None

        def wrote(env: Envelope[Any]) -> None:
            self.failed += 1
            failed = env.value
            if isinstance(failed, Failed):
                cause = failed.error_type
                if failed.status is not None:
                    cause += f" (HTTP {failed.status})"
                self.causes[cause] = self.causes.get(cause, 0) + 1

        return JournalSink(
            self.journal.dead_letter, dead_letter_payload, on_write=wrote, name="dead-letter"
        )

    def _price(self, *, batch: bool) -> Price | None:
        settings = self.settings
        online = settings.price()
        if not batch:
            return Price(*online) if online is not None else None
        configured = settings.batch_price()
        if configured is not None:
            return Price(*configured)
        return Price(online[0] / 2, online[1] / 2) if online is not None else None

    # -- cancelling, stopping, progress ----------------------------------------------------

    async def _cancel_all(self, journal: Journal, batch_log: BatchLog) -> JobSummary:
        """Cancel every batch of the job still running on the provider, and record it."""
        client = self.client
        assert client is not None
        cancelled = 0
        for chunk in batch_log.open_chunks():
            if chunk.batch_id is None or chunk.cancel:
                continue
            status = await client.cancel(chunk.batch_id)
            event = {"event": "cancel", "chunk": chunk.number}
            await anyio.to_thread.run_sync(functools.partial(batch_log.record, event))
            cancelled += 1
            log.info("batch %s: cancel requested (%s)", chunk.batch_id, status.status)
        await anyio.to_thread.run_sync(journal.close)
        self.stopped = (
            f"cancelled {cancelled} batch(es) on the provider; --resume collects what they"
            " answered and sends the rest again"
        )
        return self._summary()

    async def _stop_task(self) -> None:
        await self.stop_event.wait()
        self._stop(self.stop_reason)

    def _check_budget(self) -> None:
        """Stop reading input once the answers cost the budget (batches submitted still end)."""
        budget = self.settings.budget
        if budget is None or self.costs.batch_usd < budget or self._budget_hit is not None:
            return
        self._budget_hit = f"budget of ${budget:g} reached"
        log.warning("%s: no new batches; the ones submitted are collected", self._budget_hit)
        if self._spool_results is not None:
            self._spool_results.stop(self._budget_hit)

    def _stop(self, reason: str) -> None:
        """Stop reading input and waiting for batches; the job stays resumable."""
        if self.stopped is None:
            self.stopped = reason
        if self._spool_results is not None:
            self._spool_results.stop(reason)
        self._wake.set()

    async def _count(self) -> None:
        """Count the input's rows in a thread, for the progress total."""
        from stages.files import count_rows

        path, fmt = self.settings.input, self.settings.input_format
        assert path is not None
        try:
            self.total = await anyio.to_thread.run_sync(
                lambda: count_rows(path, fmt=fmt, delimiter=self.settings.csv_delimiter),
                abandon_on_cancel=True,
            )
        except (OSError, ConfigError, ValueError) as error:
            log.debug("cannot count the rows of %s: %s", path, error)

    async def _progress_task(self) -> None:
        assert self.on_progress is not None
        while True:
            await anyio.sleep(self.progress_interval)
            await call_progress(self.on_progress, self._progress())

    def _progress(self, *, final: bool = False) -> JobProgress:
        elapsed = time.perf_counter() - self.started
        done = self.ok + self.failed
        journal = self.journal
        before = journal.previous_ok + journal.previous_failed if journal is not None else 0
        tokens = self.costs.prompt_tokens + self.costs.completion_tokens
        return JobProgress(
            rows_total=self.total,
            rows_done=done + before,
            ok=self.ok,
            failed=self.failed,
            skipped=before,
            requests=self._requests(),
            retries=0,
            prompt_tokens=self.costs.prompt_tokens,
            completion_tokens=self.costs.completion_tokens,
            cost_usd=self.costs.batch_usd,
            elapsed_s=elapsed,
            rows_per_s=done / elapsed if elapsed > 0 else 0.0,
            tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
            eta_s=None,
            stopping=self.stopped or self._budget_hit,
            final=final,
            batch=self._batch_info(),
        )

    def _requests(self) -> int:
        sent = self.client.requests_sent if self.client is not None else 0
        return sent + self.online_requests

    def _batch_info(self) -> dict[str, Any]:
        counts = dataclasses.asdict(self.counts)
        counts["waiting_s"] = round(self.counts.waiting_s, 3)
        counts["cost_usd"] = round(self.costs.batch_usd, 6)
        counts["online_equivalent_usd"] = round(self.costs.online_usd, 6)
        return counts

    def _summary(self, *, complete: bool = False) -> JobSummary:
        elapsed = time.perf_counter() - self.started
        journal = self.journal
        previous_ok = journal.previous_ok if journal is not None else 0
        previous_failed = journal.previous_failed if journal is not None else 0
        caller = self.caller
        dead_letter = self.settings.dead_letter_path()
        if dead_letter is not None and complete and not os.path.exists(dead_letter):
            dead_letter = None
        return JobSummary(
            rows_in=self.rows_in,
            ok=self.ok,
            failed=self.failed,
            failed_by_cause=dict(sorted(self.causes.items(), key=lambda kv: (-kv[1], kv[0]))),
            requests=self._requests(),
            retries=0,
            prompt_tokens=self.costs.prompt_tokens,
            completion_tokens=self.costs.completion_tokens,
            cost_usd=self.costs.batch_usd,
            elapsed_s=elapsed,
            rows_per_s=(self.ok + self.failed) / elapsed if elapsed > 0 else 0.0,
            resumed_skipped=previous_ok + previous_failed,
            stopped=None if complete else self.stopped,
            complete=complete or (journal is not None and journal.complete),
            total_ok=previous_ok + self.ok,
            total_failed=previous_failed + self.failed,
            cache_hits=caller.totals.cache_hits if caller is not None else 0,
            output=self.settings.output,
            dead_letter=dead_letter,
            engine="batch",
            batch=self._batch_info(),
        )


async def run_batch(settings: JobSettings, options: RunOptions) -> JobSummary:
    """Run a job on the batch engine (``run_job`` with ``batch_api=True``)."""
    job = BatchJob(
        settings,
        options.on_progress,
        options.stop_event,
        options.stop_reason,
        options.progress_interval,
    )
    return await job.run()
