"""The local engine: a file job as one pipeline in this process.

::

    source (JSONL/CSV/Parquet, skipping rows a previous run finished)
      -> [Batcher, embeddings only] -> LLMCaller -> output sink (journal)
    dead letters -> dead-letter sink (journal)

on a crash-safe :class:`~pipeline.jobs._journal.Journal`: rows are committed one by one to
journals next to the output, ``resume=True`` continues an interrupted job exactly once, and the
output and dead-letter files are published atomically when every row has an answer or a
dead-letter record. :func:`run_local` runs it; ``docs/jobs.md`` describes the files.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread

from pipeline import Pipeline, Results
from pipeline._envelope import Envelope, Failed
from pipeline._errors import ConfigError, FatalError
from pipeline._report import RunReport
from pipeline.jobs._caller import (
    answer_stages,
    build_caller,
    preflight,
    release_caller,
    setup_failure,
)
from pipeline.jobs._journal import Journal, journal_for, published_counts
from pipeline.jobs._progress import (
    JobFailedError,
    JobProgress,
    JobSummary,
    JobTally,
    RunOptions,
    call_progress,
    cause_of,
    make_progress,
    make_summary,
)
from pipeline.jobs._settings import JobSettings, check_files
from stages.files import DeadLetterSink, FileSource, count_rows, open_sink, open_source
from stages.files._pipes import is_stream
from stages.llm._caller import LLMCaller

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("pipeline.job")


OTLP_TIMEOUT_S = 2.0
"""Seconds an OTLP export may take unless ``OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`` says (the
exporter's own default, 10 s with retries, held a job's exit for about 8 s with no collector)."""


def make_tracer_provider(kind: str) -> TracerProvider:
    """Return an OpenTelemetry tracer provider exporting to the console or over OTLP.

    OTLP needs a collector: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``), the
    standard variables; without one the job is refused before it starts, rather than trying
    ``localhost:4318`` and waiting for it at exit. Exports time out after
    :data:`OTLP_TIMEOUT_S` unless the standard timeout variables say otherwise.

    Raises:
        ConfigError: The OpenTelemetry SDK (or the OTLP exporter) is not installed, or OTLP
            has no endpoint.
    """
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise ConfigError(
            "tracing needs the OpenTelemetry SDK: pip install 'llm-pipeline[otel]'"
        ) from None
    exporter: Any
    if kind == "console":
        exporter = ConsoleSpanExporter(out=sys.stderr)
    else:
        try:
            otlp = importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
        except ImportError:
            raise ConfigError(
                "trace 'otlp' needs the OTLP exporter: pip install 'llm-pipeline[otel]'"
            ) from None
        if not (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        ):
            raise ConfigError(
                "trace 'otlp' needs a collector: set OTEL_EXPORTER_OTLP_ENDPOINT (for example"
                " http://localhost:4318), or use --trace console"
            )
        timeout = None
        if not (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
            or os.environ.get("OTEL_EXPORTER_OTLP_TIMEOUT")
        ):
            timeout = OTLP_TIMEOUT_S
        exporter = otlp.OTLPSpanExporter(timeout=timeout)
    provider = TracerProvider(resource=Resource.create({"service.name": "llm-pipeline"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class _JobDeadLetterSink(DeadLetterSink):
    """The dead-letter sink of a job: each record is first shown to ``on_failed``."""

    def __init__(self, journal: Journal, on_failed: Callable[[Failed], None]) -> None:
        super().__init__(journal.dead_letter, name="dead-letter")
        self.on_failed = on_failed

    def payload(self, env: Envelope[Any]) -> bytes:
        """Show the record to ``on_failed`` (which may raise to stop the job), then encode it."""
        if isinstance(env.value, Failed):
            self.on_failed(env.value)
        return super().payload(env)


def job_error(failure: Exception, summary: JobSummary) -> Exception:
    """Return the error a run raises for ``failure``: fatal errors become JobFailedError."""
    if isinstance(failure, (ConfigError, JobFailedError)):
        return failure
    if isinstance(failure, FatalError):
        return JobFailedError(str(failure), summary)
    if isinstance(failure, OSError):
        where = f" ({failure.filename})" if failure.filename else ""
        return JobFailedError(f"{failure.strerror or failure}{where}", summary)
    return failure


class LocalJob:
    """One run of a job on the local engine (see :func:`run_local`)."""

    def __init__(self, settings: JobSettings, options: RunOptions) -> None:
        self.settings = settings
        self.options = options
        self.started = time.perf_counter()
        self.total: int | None = None
        self.causes: dict[str, int] = {}
        self.results: Results[Any] | None = None
        self.source: FileSource | None = None
        self.caller: LLMCaller | None = None
        self.journal: Journal | None = None
        self.stopped: str | None = None
        self.tracer: TracerProvider | None = None

    async def run(self) -> JobSummary:
        """Run the job; return its summary (see :func:`~pipeline.jobs.run_job`)."""
        settings = self.settings
        await anyio.to_thread.run_sync(check_files, settings)
        journal = journal_for(settings)
        if settings.trace is not None:
            self.tracer = make_tracer_provider(settings.trace)
        caller = await anyio.to_thread.run_sync(
            functools.partial(
                build_caller,
                settings,
                limiter=self.options.limiter,
                endpoint_limiters=self.options.endpoint_limiters,
            )
        )
        self.caller = caller
        try:
            return await self._open_and_run(journal, caller)
        except Exception as error:
            if self.journal is not None:  # a job that finished no row leaves nothing behind
                await anyio.to_thread.run_sync(journal.discard)
            if isinstance(error, FatalError) and not isinstance(error, JobFailedError):
                raise JobFailedError(str(error), self._summary(None)) from error
            raise
        finally:
            await release_caller(caller)
            await self._shutdown_tracer()

    # -- steps -------------------------------------------------------------------------------

    async def _open_and_run(self, journal: Journal, caller: LLMCaller) -> JobSummary:
        await preflight(caller, timeout=min(10.0, self.settings.timeout))
        await anyio.to_thread.run_sync(journal.open)
        self.journal = journal
        if journal.complete:  # a resume finished publishing what an earlier run left
            previous = await anyio.to_thread.run_sync(
                published_counts, journal, self.settings.output_format
            )
            return make_summary(
                JobTally(), self.settings, started=self.started, engine="local",
                previous=previous, complete=True,
            )  # fmt: skip
        return await self._run(journal, caller)

    def _pipeline(self, journal: Journal, caller: LLMCaller) -> Pipeline:
        """Return the job's pipeline: source, [batcher], caller, output sink; dead letters."""
        settings = self.settings
        assert settings.input is not None
        self.source = open_source(
            settings.input,
            fmt=settings.input_format,
            delimiter=settings.csv_delimiter,
            id_field=settings.id_field,
            skip_lines=journal.done,
            max_line_bytes=settings.max_line_bytes,
            encoding=settings.encoding,
        )
        if self.options.input_label is not None:
            self.source.label = self.options.input_label
        return Pipeline(
            self.source,
            *answer_stages(settings, caller),
            open_sink(journal.output, fmt=settings.output_format),
            dead_letter=_JobDeadLetterSink(journal, self._on_failed),
            name="job",
            tracing=self.tracer,
            metrics=self.options.metrics,
        )

    async def _run(self, journal: Journal, caller: LLMCaller) -> JobSummary:
        failure = await self._drive(self._pipeline(journal, caller))
        report = self.results.report if self.results is not None else None
        if failure is not None:
            await anyio.to_thread.run_sync(journal.close)
            error = job_error(failure, self._summary(report))
            if error is failure:
                raise failure
            raise error from failure
        assert report is not None
        return await self._finish(journal, report)

    async def _drive(self, pipe: Pipeline) -> Exception | None:
        """Run the pipeline with its watchers; return the error that ended it, if any."""
        finished = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._count)
                failure = await self._consume(pipe, tg, finished)
                finished.set()
                tg.cancel_scope.cancel()
        finally:
            await self._shutdown_tracer()
        return failure

    async def _consume(
        self, pipe: Pipeline, tg: anyio.abc.TaskGroup, finished: anyio.Event
    ) -> Exception | None:
        """Read the results to the end (or a stop); return the error that ended the run."""
        with anyio.CancelScope() as run_scope:
            try:
                async with pipe.open() as results:
                    self.results = results
                    if self.options.on_progress is not None:
                        tg.start_soon(self._report_every)
                    if self.options.stop_event is not None:
                        tg.start_soon(self._watch_stop, results, run_scope, finished)
                    await results.drain()
            except Exception as error:  # raised by the caller, outside the task group
                return error
        return None

    async def _finish(self, journal: Journal, report: RunReport) -> JobSummary:
        """Publish a finished job, or keep a stopped one resumable."""
        self.stopped = self.stopped or report.stopped
        complete = report.complete and report.stopped is None
        if complete:
            source = self.source
            assert source is not None
            rows = source.emitted + source.rejected + source.skipped
            try:
                await anyio.to_thread.run_sync(journal.commit, rows)
            except OSError as error:
                raise JobFailedError(
                    f"cannot publish {self.settings.output!r}: {error.strerror or error}",
                    self._summary(report),
                ) from error
        else:
            await anyio.to_thread.run_sync(journal.close)
            self.stopped = self.stopped or "cancelled"
            if self.total is None:  # the rows left unsent need the input's count
                await self._count()
        summary = self._summary(report, complete=complete)
        if self.options.on_progress is not None:
            await call_progress(self.options.on_progress, self._progress(final=True))
        return summary

    async def _shutdown_tracer(self) -> None:
        tracer, self.tracer = self.tracer, None
        if tracer is not None:
            await anyio.to_thread.run_sync(tracer.shutdown)

    @property
    def ok(self) -> int:
        """Rows written so far."""
        return 0 if self.results is None else self.results.ok

    # -- watching ----------------------------------------------------------------------------

    def _on_failed(self, failed: Failed) -> None:
        """Count a dead-lettered row; stop the job when the first requests fail as all would."""
        caller = self.caller
        first = not self.ok and caller is not None and failed.stage == caller.name
        if first and not self.answered():
            error = setup_failure(failed)
            if error is not None:
                raise error
        cause = cause_of(failed)
        self.causes[cause] = self.causes.get(cause, 0) + 1

    async def _count(self) -> None:
        """Count the input's rows in a thread, for the progress total."""
        path, fmt = self.settings.input, self.settings.input_format
        assert path is not None
        if is_stream(path):  # stdin, a pipe, a device: counting would read it (or never end)
            return
        try:
            self.total = await anyio.to_thread.run_sync(
                lambda: count_rows(path, fmt=fmt, delimiter=self.settings.csv_delimiter),
                abandon_on_cancel=True,
            )
        except (OSError, ConfigError, ValueError) as error:  # the source reports it properly
            log.debug("cannot count the rows of %s: %s", path, error)

    async def _watch_stop(
        self, results: Results[Any], run_scope: anyio.CancelScope, finished: anyio.Event
    ) -> None:
        """Once the stop event is set: read no new rows, give those in flight a grace time."""
        assert self.options.stop_event is not None
        await self.options.stop_event.wait()
        self.stopped = self.options.stop_reason
        results.stop(self.options.stop_reason)
        with anyio.move_on_after(self.settings.grace):
            await finished.wait()
        if not finished.is_set():
            log.warning(
                "rows in flight did not finish within %gs: cancelling them (they are sent"
                " again on resume)",
                self.settings.grace,
            )
            run_scope.cancel()

    async def _report_every(self) -> None:
        assert self.options.on_progress is not None
        while True:
            await anyio.sleep(self.options.progress_interval)
            await call_progress(self.options.on_progress, self._progress())

    def answered(self) -> bool:
        """Whether the caller has answered any row of this run (on its way to the sink)."""
        if self.results is None or self.caller is None:
            return False
        return any(s.name == self.caller.name and s.emitted for s in self.results.stats)

    # -- reporting ---------------------------------------------------------------------------

    def _tally(self) -> JobTally:
        """What this run did so far, from the live stage counters."""
        tally = JobTally(ok=self.ok, causes=dict(self.causes))
        stats = self.results.stats if self.results is not None else ()
        tally.failed = sum(s.failed for s in stats if s.name != "dead-letter")
        if self.caller is not None:
            tally.add_caller_stats(stats, self.caller.name)
            tally.cache_hits = self.caller.totals.cache_hits
        tally.skipped = self.source.skipped if self.source is not None else 0
        return tally

    def _progress(self, *, final: bool = False) -> JobProgress:
        stopping = self.stopped
        if stopping is None and self.results is not None:
            stopping = self.results.stop_reason
        progress = make_progress(
            self._tally(), started=self.started, total=self.total, stopping=stopping, final=final
        )
        if self.caller is None:
            return progress
        totals = self.caller.totals  # the caller's own figures: the dashboard's and /metrics'
        return dataclasses.replace(
            progress,
            rate_limited=totals.rate_limited,
            limiter_wait_s=totals.limiter_wait_s,
            in_flight=totals.in_flight,
            statuses={str(status): n for status, n in sorted(totals.statuses.items())},
            endpoints=None if self.caller.router is None else self.caller.router.figures(),
            waiting=None if final else totals.waiting(),
        )

    def _summary(self, report: RunReport | None, *, complete: bool = False) -> JobSummary:
        tally = self._tally()
        if report is not None:
            tally.failed = report.failed
        journal = self.journal
        previous = (0, 0) if journal is None else (journal.previous_ok, journal.previous_failed)
        summary = make_summary(
            tally,
            self.settings,
            started=self.started,
            engine="local",
            rows_in=None if report is None else report.rows_in,
            previous=previous,
            stopped=self.stopped,
            complete=complete,
            total=self.total,
        )
        router = None if self.caller is None else self.caller.router
        if router is not None:
            summary.endpoints = router.figures()
        return summary


async def run_local(settings: JobSettings, options: RunOptions) -> JobSummary:
    """Run a job on the local engine (``settings.engine == "local"``)."""
    return await LocalJob(settings, options).run()


__all__ = ["OTLP_TIMEOUT_S", "LocalJob", "job_error", "make_tracer_provider", "run_local"]
