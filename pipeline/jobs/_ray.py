"""The Ray engine: a file job on Ray Data (``python -m pipeline run ... --engine ray``).

The flow: a Ray datasource reads the input with the local engine's own source
(:class:`~pipeline.jobs._parts.FileRows`, one read task per file, streaming blocks); a pool of
async actors (:mod:`stages._ray`) answers each batch with the caller
:func:`~pipeline.jobs._caller.build_caller` makes from the settings, with many rows in flight;
Ray's Parquet writer writes the answers and dead-letter records to part files in
``OUTPUT.ray-parts/``; then the driver folds the parts into the job's
:class:`~pipeline.jobs._journal.Journal` and publishes the output and dead-letter files
atomically, in the same format as the local engine (the output's format by extension, the dead
letters as JSON Lines, input order with ``ordered``).

Why not Ray's ``read_json``: Arrow's JSON reader turns date-like strings into timestamps,
merges the fields of objects across rows and gives every row every column, so rows would not
come out as the local engine writes them; it stops the whole read at one bad line (the local
engine dead-letters that line); and it numbers no rows, while a job's keys are line numbers
unless ``id_field`` is set. Reading with the local source keeps rows, keys, origins and
bad-row records identical, so the two engines' files are the same and a job started on one
engine resumes on the other.

Limits: ``settings.limiter`` (Redis) is shared by every actor; without it each actor keeps to
``1/actors`` of ``rpm``/``tpm`` (a warning says so). ``concurrency`` and the ``budget`` are
split between the actors the same way.

Resume: part files survive a crash; a resume folds the complete ones into the journal
(deleting a torn one: its rows are sent again), skips every key the journal holds, and nothing
is appended twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import time
import uuid
from typing import Any

import anyio
import anyio.to_thread

from pipeline._channels import Outbox
from pipeline._envelope import Envelope
from pipeline._errors import ConfigError, FatalError, ItemError
from pipeline._stage import ItemStage, Stage
from pipeline.jobs._caller import answer_stages, build_caller, preflight, setup_failure
from pipeline.jobs._journal import Journal, journal_for, published_counts
from pipeline.jobs._lock import JobLock
from pipeline.jobs._parts import (
    ControlDir,
    FileRows,
    JobFormat,
    PartsTally,
    count_parts,
    fold_parts,
    has_parts,
    parts_dir,
)
from pipeline.jobs._progress import (
    JobFailedError,
    JobSummary,
    JobTally,
    ProgressHook,
    RunOptions,
    Waitable,
    call_progress,
    make_progress,
    make_summary,
)
from pipeline.jobs._settings import JobSettings, check_files
from stages._ray import ActorSpec, RayTransform, actor_class, import_ray, warn_limits
from stages.files import DeadLetterSink, FileSink, count_rows, open_sink

log = logging.getLogger("pipeline.ray")


class EncodeRows(ItemStage[Any, bytes]):
    """Encode each answer as the job's output sink would, or dead-letter it as it would."""

    def __init__(self, sink: FileSink) -> None:
        super().__init__(name=sink.name, workers=1, buffer=64)
        self.sink = sink

    async def handle(self, env: Envelope[Any], outbox: Outbox[bytes]) -> None:
        """Send the row's payload (JSON bytes), or dead-letter a row the format cannot hold."""
        try:
            payload = self.sink.payload(env)
        except ItemError as error:
            await outbox.fail(env, error)
            return
        except (TypeError, ValueError) as error:
            await outbox.fail(env, ItemError(f"cannot write the item to {self.sink.path}: {error}"))
            return
        await outbox.send(env.replace(payload))


@dataclasses.dataclass(frozen=True)
class JobStages:
    """The stages a job's actor runs, built in the actor from the job's settings.

    Attributes:
        settings: The actors' settings (their share of concurrency, no budget, no limiter).
        sink: A sink on the final output path, never opened: it encodes rows exactly as the
            local engine's sink does.
    """

    settings: JobSettings
    sink: FileSink

    def __call__(self) -> list[Stage[Any, Any]]:
        """Return the answering stages and the encoder."""
        stages = answer_stages(self.settings, build_caller(self.settings))
        stages.append(EncodeRows(self.sink))
        return stages


def default_actors(ray: Any) -> int:
    """Return how many actors a job uses by default: the cluster's CPUs, from 1 to 16."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(16, cpus))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How the job is spread over the actors."""

    actors: int
    per_actor: int  # the concurrency ceiling of one actor
    settings: JobSettings  # what each actor builds its caller from


def _plan(settings: JobSettings, actors: int) -> _Plan:
    if actors < 1:
        raise ConfigError(f"actors must be >= 1, got {actors}")
    ceiling = settings.concurrency or settings.max_concurrency
    per_actor = max(1, math.ceil(ceiling / actors))
    actor_settings = settings.replace(
        limiter=None,  # the actor runtime makes one limiter per actor (Redis, or a share)
        concurrency=None if settings.concurrency is None else per_actor,
        max_concurrency=max(1, math.ceil(settings.max_concurrency / actors)),
        budget=None,  # each actor keeps to its share of the budget
    )
    return _Plan(actors, per_actor, actor_settings)


class _RayJob:
    """One run of a job on Ray: plan, open the journal, run the dataset, fold, publish."""

    def __init__(
        self,
        ray: Any,
        settings: JobSettings,
        options: RunOptions,
        *,
        actors: int,
        batch_size: int,
        max_in_flight: int | None,
        started: float,
    ) -> None:
        assert settings.input is not None and settings.output is not None
        self.ray = ray
        self.settings = settings
        self.options = options
        self.plan = _plan(settings, actors)
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight or 2 * self.plan.per_actor
        self.started = started
        self.directory = parts_dir(settings.output)
        self.write_dir = os.path.join(self.directory, uuid.uuid4().hex[:12])
        self.control = ControlDir(self.directory)
        self.tally = PartsTally()  # this run's rows
        self.leftover = PartsTally()  # a crashed run's rows, folded on resume
        self.resumed_skipped = 0
        self.total: int | None = None
        self.stopped_by: str | None = None
        self.seen: dict[str, tuple[int, int]] = {}

    async def run(self) -> JobSummary:
        """Run the job; return its summary (see :func:`run_job_on_ray`)."""
        await self._probe()
        journal = journal_for(self.settings)
        await self._open(journal)
        if journal.complete:  # an earlier run's publish, finished now
            await anyio.to_thread.run_sync(self._remove_parts)
            previous = await anyio.to_thread.run_sync(
                published_counts, journal, self.settings.output_format
            )
            return self._summary(JobTally(), previous=previous, complete=True)
        await self._fold_leftovers(journal)
        try:
            failure = await self._execute(journal)
            await anyio.to_thread.run_sync(fold_parts, self.directory, journal, self.tally)
        except BaseException:
            await anyio.to_thread.run_sync(journal.close)
            raise
        return await self._finish(journal, failure)

    # -- steps -------------------------------------------------------------------------------

    async def _probe(self) -> None:
        """Build the caller the actors will build, to check it and reach its server first."""
        settings = self.plan.settings
        probe = await anyio.to_thread.run_sync(lambda: build_caller(settings, open_resources=False))
        await preflight(probe, timeout=min(10.0, settings.timeout))
        warn_limits([probe], self.plan.actors, self.settings.limiter)

    def _remove_parts(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    async def _open(self, journal: Journal) -> None:
        """Open the journal, refusing part files a resume is not asked to continue."""
        settings = self.settings
        if settings.overwrite or not await anyio.to_thread.run_sync(has_parts, self.directory):
            await anyio.to_thread.run_sync(self._remove_parts)  # nothing of value (or unwanted)
        elif not settings.resume:
            raise ConfigError(
                f"an interrupted Ray job left part files in {self.directory!r}: use --resume to"
                " continue it or --overwrite to start over"
            )
        await anyio.to_thread.run_sync(journal.open)
        # the sinks set the journals' writers: publishing writes the local engine's formats
        open_sink(journal.output, fmt=settings.output_format)
        DeadLetterSink(journal.dead_letter)

    async def _fold_leftovers(self, journal: Journal) -> None:
        """Fold a crashed run's part files into the journal; prepare the parts directory."""
        if await anyio.to_thread.run_sync(has_parts, self.directory):
            if not journal.resumed:  # no checkpoint says which job they belong to
                await anyio.to_thread.run_sync(journal.discard)
                raise ConfigError(
                    f"found part files in {self.directory!r} but no checkpoint"
                    f" ({self.settings.output}.checkpoint.json): not left by a job that can be"
                    " resumed; use --overwrite to delete them and start over"
                )
            await anyio.to_thread.run_sync(fold_parts, self.directory, journal, self.leftover)
        self.resumed_skipped = len(journal.done)
        await anyio.Path(self.directory).mkdir(exist_ok=True)
        await anyio.to_thread.run_sync(self.control.clear)

    def _transform(self) -> RayTransform:
        settings = self.settings
        assert settings.output is not None
        # a sink on the final path, never opened: encodes rows exactly as the job's sink does
        sink = open_sink(settings.output, fmt=settings.output_format)
        spec = ActorSpec(
            stages=JobStages(self.plan.settings, sink),
            actors=self.plan.actors,
            max_in_flight=self.max_in_flight,
            limiter_url=settings.limiter,
            budget_share=None if settings.budget is None else settings.budget / self.plan.actors,
            format=JobFormat(),
            control=self.control,
            first_failure_rule=setup_failure,
        )
        return RayTransform(actor_class(spec), self.plan.actors, self.batch_size, 0.25)

    async def _execute(self, journal: Journal) -> BaseException | None:
        """Run the dataset to its end, watching for a stop; return what failed it, if it did."""
        settings = self.settings
        assert settings.input is not None
        reader = FileRows(
            settings.input,
            fmt=settings.input_format,
            delimiter=settings.csv_delimiter,
            id_field=settings.id_field,
            skip=journal.done,
            rows_per_block=self.batch_size,
            control=self.control,
            encoding=settings.encoding,
        )
        transform = self._transform()

        def execute() -> None:
            dataset = self.ray.data.read_datasource(reader.datasource(), num_cpus=0.25)
            # Writers reserve little CPU, so they keep up with the actors: a part file is a
            # batch's commit point, and what a failure loses is what was not written yet.
            transform(dataset).write_parquet(self.write_dir, ray_remote_args={"num_cpus": 0.1})

        failure: BaseException | None = None
        async with anyio.create_task_group() as tg:
            self._start_watchers(tg)
            try:
                await anyio.to_thread.run_sync(execute, abandon_on_cancel=False)
            except Exception as error:
                failure = error
            tg.cancel_scope.cancel()
        return failure

    async def _finish(self, journal: Journal, failure: BaseException | None) -> JobSummary:
        """Publish a finished job, keep a stopped one, or raise the error that stopped it."""
        fatal = await anyio.to_thread.run_sync(self.control.read_fatal)
        if failure is not None or fatal is not None:
            if await anyio.to_thread.run_sync(journal.discard):  # nothing done: leave nothing
                await anyio.to_thread.run_sync(self._remove_parts)
            summary = self._summary(self.tally, previous=self._previous(journal))
            if fatal is not None and fatal.get("config"):
                raise ConfigError(str(fatal.get("message"))) from failure
            raise JobFailedError(_fatal_message(fatal, failure), summary) from failure
        stopped = self.stopped_by or self.tally.stopped
        if stopped is None:
            await self._publish(journal)
            await anyio.to_thread.run_sync(self._remove_parts)
        else:
            await anyio.to_thread.run_sync(journal.close)
        summary = self._summary(
            self.tally, previous=self._previous(journal), stopped=stopped, complete=stopped is None
        )
        await self._report(final=True)
        return summary

    async def _publish(self, journal: Journal) -> None:
        """Check that every row the reader read has its record once, then publish.

        Raises:
            JobFailedError: The reader did not say how many rows it read, or the journals do
                not account for them (the journal stays: ``--resume`` sends what is missing).
        """
        expected = self.tally.reader_rows
        try:
            if expected is None:  # the reader never said it read to the end
                raise FatalError(
                    f"{self.settings.output!r} was not published: the input reader did not"
                    " report how many rows it read; run again with --resume"
                )
            await anyio.to_thread.run_sync(journal.commit, expected)
        except FatalError as error:
            await anyio.to_thread.run_sync(journal.close)
            summary = self._summary(self.tally, previous=self._previous(journal))
            raise JobFailedError(str(error), summary) from error

    # -- watching ----------------------------------------------------------------------------

    def _start_watchers(self, tg: anyio.abc.TaskGroup) -> None:
        if self.options.stop_event is not None:
            tg.start_soon(self._watch_stop, self.options.stop_event)
        if self.options.on_progress is not None:
            tg.start_soon(self._count)
            tg.start_soon(self._report_every)

    async def _watch_stop(self, stop_event: Waitable) -> None:
        await stop_event.wait()
        self.stopped_by = self.options.stop_reason
        await anyio.to_thread.run_sync(self.control.request_stop, self.stopped_by)

    async def _count(self) -> None:
        """Count the input's rows in a thread, for the progress total."""
        path, fmt = self.settings.input or "", self.settings.input_format
        with contextlib.suppress(OSError, ConfigError, ValueError):
            self.total = await anyio.to_thread.run_sync(
                lambda: count_rows(path, fmt=fmt, delimiter=self.settings.csv_delimiter),
                abandon_on_cancel=True,
            )

    async def _report_every(self) -> None:
        while True:
            await anyio.sleep(self.options.progress_interval)
            await self._report()

    async def _report(self, *, final: bool = False) -> None:
        hook: ProgressHook | None = self.options.on_progress
        if hook is None:
            return
        tally = dataclasses.replace(self.tally, skipped=self.resumed_skipped)
        if not final:  # the rows in the part files written so far
            tally.ok, tally.failed = await anyio.to_thread.run_sync(
                count_parts, self.write_dir, self.seen
            )
        progress = make_progress(
            tally, started=self.started, total=self.total, stopping=self.stopped_by, final=final
        )
        await call_progress(hook, progress)

    # -- reporting ---------------------------------------------------------------------------

    def _previous(self, journal: Journal) -> tuple[int, int]:
        return (
            journal.previous_ok + self.leftover.ok,
            journal.previous_failed + self.leftover.failed,
        )

    def _summary(
        self,
        tally: JobTally,
        *,
        previous: tuple[int, int],
        stopped: str | None = None,
        complete: bool = False,
    ) -> JobSummary:
        reader_skipped = self.tally.reader_skipped
        tally.skipped = self.resumed_skipped if reader_skipped is None else reader_skipped
        return make_summary(
            tally,
            self.settings,
            started=self.started,
            engine="ray",
            previous=previous,
            stopped=stopped,
            complete=complete,
        )


def _fatal_message(fatal: dict[str, Any] | None, failure: BaseException | None) -> str:
    """The message of the error that stopped the job: an actor's report, or Ray's failure."""
    if fatal is not None:
        return str(fatal.get("message"))
    assert failure is not None
    first = str(failure).strip().splitlines()
    return f"the Ray job failed: {type(failure).__name__}: {first[0] if first else ''}"


async def run_job_on_ray(
    settings: JobSettings,
    *,
    actors: int | None = None,
    batch_size: int = 64,
    max_in_flight: int | None = None,
    on_progress: ProgressHook | None = None,
    stop_event: Waitable | None = None,
    stop_reason: str = "stop requested",
    progress_interval: float = 0.5,
) -> JobSummary:
    """Run a file job on Ray Data; see the module documentation for how.

    Args:
        settings: The job (input, output and model required).
        actors: Actors in the pool (default: the cluster's CPUs, 1 to 16).
        batch_size: Rows per batch given to an actor (and per block read): a fatal error
            loses at most the batches in flight, which are sent again on resume.
        max_in_flight: Most rows one actor works on at once (default: twice its share of
            the concurrency ceiling).
        on_progress: Called (sync or async) with a :class:`~pipeline.jobs.JobProgress`
            every ``progress_interval`` seconds and once at the end.
        stop_event: Once set, actors take no new rows; rows in flight finish; the job stays
            resumable.
        stop_reason: The summary's ``stopped`` text when ``stop_event`` stops the job.
        progress_interval: Seconds between progress snapshots.

    Returns:
        The job's summary (``engine="ray"``).

    Raises:
        ConfigError: Ray is missing, invalid settings, an unreadable input, a checkpoint that
            does not match.
        JobFailedError: A fatal error stopped the job (a rejected key, no credit, Redis
            lost); what was done stays resumable.
        JobLockedError: Another process runs this job (holds the lock on its output).
    """
    settings.require_paths()
    assert settings.output is not None
    options = RunOptions(on_progress, stop_event, stop_reason, progress_interval)
    await anyio.to_thread.run_sync(check_files, settings)
    lock = JobLock(settings.output)
    await anyio.to_thread.run_sync(lock.acquire)
    try:
        return await _run_locked(settings, options, actors, batch_size, max_in_flight)
    finally:
        lock.release()


async def _run_locked(
    settings: JobSettings,
    options: RunOptions,
    actors: int | None,
    batch_size: int,
    max_in_flight: int | None,
) -> JobSummary:
    """Run a job on Ray, its lock held by the caller (see :func:`run_job_on_ray`)."""
    ray = import_ray()
    if settings.input == "-":
        raise ConfigError("the Ray engine reads a file, not standard input ('-')")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if settings.trace is not None:
        log.warning("trace=%r is ignored on the Ray engine: actors export no spans", settings.trace)
    started = time.perf_counter()
    started_ray = not ray.is_initialized()
    level = silence_ray(ray)
    if started_ray:
        await anyio.to_thread.run_sync(
            lambda: ray.init(
                address=settings.ray_address,
                include_dashboard=False,
                logging_level=level,
                log_to_driver=not settings.quiet,
            )
        )
    try:
        job = _RayJob(
            ray,
            settings,
            options,
            actors=actors or default_actors(ray),
            batch_size=batch_size,
            max_in_flight=max_in_flight,
            started=started,
        )
        return await job.run()
    finally:
        if started_ray:
            await anyio.to_thread.run_sync(ray.shutdown)


def silence_ray(ray: Any) -> int:
    """Keep Ray's own chatter off the job's screen; return the level for ``ray.init``.

    Ray logs its start-up at INFO and Ray Data prints its own progress at its own pace; the
    job shows one progress display (the CLI's, at ``--progress-interval``) and, with
    ``quiet``, nothing but errors (actors' output is not forwarded then). Ray Data's progress
    bars are turned off, and Ray's and Ray Data's loggers show errors only: their warnings are
    about Ray's set-up, not the job, whose own warnings come from the ``pipeline`` loggers.
    Ray's C++ core still writes its own error lines to stderr.
    """
    level = logging.ERROR
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(level)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    if hasattr(context, "enable_operator_progress_bars"):
        context.enable_operator_progress_bars = False
    return level


async def run_on_ray(settings: JobSettings, options: RunOptions) -> JobSummary:
    """The Ray engine as :func:`~pipeline.jobs.run_job` calls it, holding the job's lock."""
    return await _run_locked(settings, options, None, 64, None)


__all__ = [
    "EncodeRows",
    "JobStages",
    "default_actors",
    "run_job_on_ray",
    "run_on_ray",
    "silence_ray",
]
