"""What a job reports (live progress, the summary of a run) and how a run is watched.

Both engines keep a :class:`JobTally` of what their run did (the local engine from the live
stage counters, the Ray engine from the part files its actors wrote) and report through the
same two functions: :func:`make_progress` for the snapshots ``on_progress`` receives and
:func:`make_summary` for the :class:`JobSummary` a run returns.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pipeline._channels import StageStats
from pipeline._envelope import Failed
from pipeline._errors import FatalError
from pipeline.jobs._settings import JobSettings
from stages.llm._limits import Limiter

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider


@dataclasses.dataclass(frozen=True, slots=True)
class JobProgress:
    """A snapshot of a running job, given to ``on_progress`` about twice a second.

    Attributes:
        rows_total: Rows in the input (``None`` until counted, or for stdin).
        rows_done: Rows with an answer or a dead-letter record, earlier runs included.
        ok: Rows answered by this run.
        failed: Rows dead-lettered by this run.
        skipped: Rows a previous run had finished (resume).
        requests: HTTP requests sent.
        retries: Retries made.
        prompt_tokens: Prompt tokens reported by the server.
        completion_tokens: Completion tokens reported by the server.
        cost_usd: Cost so far per the price table.
        elapsed_s: Seconds since the run started.
        rows_per_s: Rows finished per second by this run.
        tokens_per_s: Tokens per second by this run.
        eta_s: Seconds left at the current rate, when the total is known.
        stopping: Why the job is stopping early, when it is.
        final: Whether this is the last snapshot of the run.
        batch: Batch engine only: batches submitted, in progress, completed and failed, rows
            per batch, seconds waiting, batch cost and its online equivalent.
        rate_limited: Answers that asked to slow down (429, 503, 529), this run.
        limiter_wait_s: Seconds rows waited for the rate limiter, summed, this run.
        in_flight: HTTP requests on the wire now.
        statuses: Answers by HTTP status (``"200"``, ``"429"``...), this run.
        endpoints: With several endpoints (routing): each one's figures (name, model, state,
            requests, answered, rate_limited, errors, latency_s, cost_usd...), this run.
        waiting: Why the job waits and until when, while a server's long ``Retry-After``
            holds it (``"the server asked to retry after 60s (HTTP 429): waiting until
            12:41:05 UTC (58s)"``), else ``None``.
    """

    rows_total: int | None
    rows_done: int
    ok: int
    failed: int
    skipped: int
    requests: int
    retries: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    elapsed_s: float
    rows_per_s: float
    tokens_per_s: float
    eta_s: float | None
    stopping: str | None = None
    final: bool = False
    batch: dict[str, Any] | None = None
    rate_limited: int = 0
    limiter_wait_s: float = 0.0
    in_flight: int = 0
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)
    endpoints: list[dict[str, Any]] | None = None
    waiting: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the snapshot as JSON-ready data."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(slots=True)
class JobSummary:
    """What a job run did.

    Attributes:
        rows_in: Input rows this run read (rows finished by earlier runs not included).
        ok: Rows answered by this run.
        failed: Rows dead-lettered by this run.
        failed_by_cause: Dead-lettered rows by cause (``"LLMCallError (HTTP 400)"``...).
        requests: HTTP requests sent (retries included).
        retries: Retries made.
        prompt_tokens: Prompt tokens reported by the server.
        completion_tokens: Completion tokens reported by the server.
        cost_usd: Cost per the price table (0 when the model has no price).
        elapsed_s: Wall time of this run.
        rows_per_s: Rows finished per second by this run.
        resumed_skipped: Rows skipped because an earlier run had finished them.
        stopped: Why the run stopped before the end of the input (a budget, Ctrl-C).
        complete: Whether the job finished and its files were published.
        total_ok: Output rows of the whole job so far (earlier runs included).
        total_failed: Dead-letter records of the whole job so far.
        cache_hits: Answers served by the response cache.
        output: The output file.
        dead_letter: The dead-letter file.
        engine: The engine that ran the job.
        batch: Batch engine only: the batches (see :class:`JobProgress`), with the cost at
            batch prices and what the same tokens would have cost online.
        endpoints: With several endpoints: each one's figures (see :class:`JobProgress`).
        unsent: Input rows with neither an answer nor a dead letter after a run that stopped
            early (a budget, Ctrl-C): ``--resume`` sends them; 0 once the job is complete.
            ``None`` when the input's rows could not be counted (standard input).
        budget_usd: The budget of the run, if it had one (``cost_usd`` is what it spent).
    """

    rows_in: int = 0
    ok: int = 0
    failed: int = 0
    failed_by_cause: dict[str, int] = dataclasses.field(default_factory=dict)
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    elapsed_s: float = 0.0
    rows_per_s: float = 0.0
    resumed_skipped: int = 0
    stopped: str | None = None
    complete: bool = False
    total_ok: int = 0
    total_failed: int = 0
    cache_hits: int = 0
    output: str | None = None
    dead_letter: str | None = None
    engine: str = "local"
    batch: dict[str, Any] | None = None
    endpoints: list[dict[str, Any]] | None = None
    unsent: int | None = None
    budget_usd: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as JSON-ready data."""
        data = dataclasses.asdict(self)
        data["cost_usd"] = round(self.cost_usd, 6)
        data["elapsed_s"] = round(self.elapsed_s, 3)
        data["rows_per_s"] = round(self.rows_per_s, 1)
        return data


class JobFailedError(FatalError):
    """A job stopped on a fatal error; the rows it finished stay in its journals (resumable).

    The message is the cause's; ``__cause__`` is the original exception.

    Attributes:
        summary: What the run did before it stopped.
    """

    def __init__(self, message: str, summary: JobSummary) -> None:
        super().__init__(message)
        self.summary = summary


class Waitable(Protocol):
    """An event a job can wait for (anyio's or asyncio's): once set, the job stops."""

    async def wait(self) -> Any:
        """Return once the event is set."""
        ...


ProgressHook = Callable[[JobProgress], Awaitable[None] | None]
"""Called (sync or async) with each :class:`JobProgress` snapshot."""


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run is watched and stopped: what every engine is given besides the settings.

    Attributes:
        on_progress: Called with a :class:`JobProgress` every ``progress_interval`` seconds
            and once at the end.
        stop_event: Once set, no new rows are started; rows in flight finish (the local
            engine gives them ``settings.grace`` seconds); the job stays resumable.
        stop_reason: The summary's ``stopped`` text when ``stop_event`` stops the job.
        progress_interval: Seconds between progress snapshots.
        limiter: A rate limiter shared with other jobs in this process (the HTTP server
            passes one per API key); engines whose callers live in other processes ignore it.
        metrics: An OpenTelemetry meter provider for the run's pipeline instruments (items,
            queue depths, waits, tokens per stage); ``None``: the runtime's default.
        input_label: How dead letters name the input in their ``origin`` (``LABEL:LINE``)
            instead of its path: the HTTP server keeps its data directory to itself.
        endpoint_limiters: With ``[[endpoints]]``: one limiter per endpoint, in order, shared
            with other jobs on the same endpoint (the HTTP server passes them).
    """

    on_progress: ProgressHook | None = None
    stop_event: Waitable | None = None
    stop_reason: str = "stop requested"
    progress_interval: float = 0.5
    limiter: Limiter | None = None
    metrics: MeterProvider | None = None
    input_label: str | None = None
    endpoint_limiters: Sequence[Limiter] | None = None


async def call_progress(hook: ProgressHook, progress: JobProgress) -> None:
    """Give ``progress`` to ``hook``, awaiting it when it is a coroutine function."""
    result = hook(progress)
    if inspect.isawaitable(result):
        await result


def cause_of(failed: Failed) -> str:
    """Return how a summary counts a dead-lettered row: its error type and HTTP status."""
    return cause_text(failed.error_type, failed.status)


def cause_text(error_type: str, status: int | None) -> str:
    """Return ``"LLMCallError (HTTP 400)"``, or the error type alone without a status."""
    return f"{error_type} (HTTP {status})" if status is not None else error_type


COUNTERS = ("requests", "retries", "prompt_tokens", "completion_tokens", "cache_hits")
"""The integer counters of a :class:`JobTally` that stage statistics add to."""


@dataclasses.dataclass(slots=True)
class JobTally:
    """What one run of a job did so far: the counts progress and summary are made from.

    Attributes:
        ok: Rows answered by this run.
        failed: Rows dead-lettered by this run.
        causes: Dead-lettered rows by cause (see :func:`cause_of`).
        requests: HTTP requests sent (retries included).
        retries: Retries made.
        prompt_tokens: Prompt tokens reported by the server.
        completion_tokens: Completion tokens reported by the server.
        cost_usd: Cost per the price table.
        cache_hits: Answers served by the response cache.
        skipped: Rows skipped because an earlier run had finished them.
    """

    ok: int = 0
    failed: int = 0
    causes: dict[str, int] = dataclasses.field(default_factory=dict)
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cache_hits: int = 0
    skipped: int = 0

    def count_cause(self, cause: str, rows: int = 1) -> None:
        """Count ``rows`` dead-lettered rows of ``cause``."""
        self.causes[cause] = self.causes.get(cause, 0) + rows

    def add_counters(self, counters: Mapping[str, Any]) -> None:
        """Add a mapping of counters (:data:`COUNTERS` and ``cost_usd``; others are ignored)."""
        for name in COUNTERS:
            value = counters.get(name)
            if isinstance(value, int):
                setattr(self, name, getattr(self, name) + value)
        self.cost_usd += float(counters.get("cost_usd", 0.0))

    def add_caller_stats(self, stats: Iterable[StageStats], caller_name: str) -> None:
        """Add the requests, retries, tokens and cost of the caller's stage statistics."""
        for s in stats:
            if s.name == caller_name:
                self.requests += s.requests
                self.retries += s.retries
                self.prompt_tokens += s.prompt_tokens
                self.completion_tokens += s.completion_tokens
                self.cost_usd += s.cost_usd

    def counters(self) -> dict[str, Any]:
        """Return the counters :meth:`add_counters` adds (JSON-ready)."""
        found: dict[str, Any] = {name: getattr(self, name) for name in COUNTERS}
        found["cost_usd"] = self.cost_usd
        return found

    def sorted_causes(self) -> dict[str, int]:
        """Return the causes, the most frequent first."""
        return dict(sorted(self.causes.items(), key=lambda kv: (-kv[1], kv[0])))


def make_progress(
    tally: JobTally,
    *,
    started: float,
    total: int | None,
    stopping: str | None = None,
    final: bool = False,
) -> JobProgress:
    """Return the progress snapshot of a run.

    Args:
        tally: What the run did so far.
        started: When the run started (``time.perf_counter()``).
        total: Rows in the input, when counted.
        stopping: Why the run is stopping early, when it is.
        final: Whether this is the run's last snapshot.
    """
    elapsed = time.perf_counter() - started
    done = tally.ok + tally.failed
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = None
    if total is not None and rate > 0:
        eta = max(total - tally.skipped - done, 0) / rate
    tokens = tally.prompt_tokens + tally.completion_tokens
    return JobProgress(
        rows_total=total,
        rows_done=done + tally.skipped,
        ok=tally.ok,
        failed=tally.failed,
        skipped=tally.skipped,
        requests=tally.requests,
        retries=tally.retries,
        prompt_tokens=tally.prompt_tokens,
        completion_tokens=tally.completion_tokens,
        cost_usd=tally.cost_usd,
        elapsed_s=elapsed,
        rows_per_s=rate,
        tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
        eta_s=eta,
        stopping=stopping,
        final=final,
    )


def make_summary(
    tally: JobTally,
    settings: JobSettings,
    *,
    started: float,
    engine: str,
    rows_in: int | None = None,
    previous: tuple[int, int] = (0, 0),
    stopped: str | None = None,
    complete: bool = False,
    total: int | None = None,
) -> JobSummary:
    """Return the summary of a run.

    Args:
        tally: What the run did.
        settings: The job's settings (for the file names).
        started: When the run started (``time.perf_counter()``).
        engine: The engine that ran it.
        rows_in: Input rows the run read (default: the rows it answered or dead-lettered).
        previous: Output rows and dead-letter records of earlier runs of the job.
        stopped: Why the run stopped before the end of the input.
        complete: Whether the job's files are published.
        total: Rows of the whole input, when counted (for the rows left unsent).
    """
    elapsed = time.perf_counter() - started
    done = previous[0] + previous[1] + tally.ok + tally.failed
    unsent = 0 if complete else (None if total is None else max(total - done, 0))
    dead_letter = settings.dead_letter_path()
    if dead_letter is not None and complete and not os.path.exists(dead_letter):
        dead_letter = None  # published without failures: there is no dead-letter file
    return JobSummary(
        rows_in=tally.ok + tally.failed if rows_in is None else rows_in,
        ok=tally.ok,
        failed=tally.failed,
        failed_by_cause=tally.sorted_causes(),
        requests=tally.requests,
        retries=tally.retries,
        prompt_tokens=tally.prompt_tokens,
        completion_tokens=tally.completion_tokens,
        cost_usd=tally.cost_usd,
        elapsed_s=elapsed,
        rows_per_s=(tally.ok + tally.failed) / elapsed if elapsed > 0 else 0.0,
        resumed_skipped=tally.skipped,
        stopped=None if complete else stopped,
        complete=complete,
        total_ok=previous[0] + tally.ok,
        total_failed=previous[1] + tally.failed,
        cache_hits=tally.cache_hits,
        output=settings.output,
        dead_letter=dead_letter,
        engine=engine,
        unsent=unsent,
        budget_usd=settings.budget,
    )


__all__ = [
    "COUNTERS",
    "JobFailedError",
    "JobProgress",
    "JobSummary",
    "JobTally",
    "ProgressHook",
    "RunOptions",
    "Waitable",
    "call_progress",
    "cause_of",
    "cause_text",
    "make_progress",
    "make_summary",
]
