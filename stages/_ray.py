"""Scale out on Ray Data: per-row stages inside async actors, and file jobs on a Ray cluster.

Two entry points (extra ``[ray]``; ``ray`` is imported only when one of them is used):

* :func:`ray_transform` turns a declared pipeline's per-row stages (``LLMCaller``, ``map``,
  ``filter``...) into a Ray Data transform for users who already hold a ``ray.data.Dataset``::

      transform = ray_transform([LLMCaller(model="m", prompt="{text}", rpm=600)], concurrency=4)
      out = transform(ds)                         # ds.map_batches(transform.actor_class, ...)
      answers, failures = transform.split(out)    # failures have an ``error`` column

  Each actor runs every batch it is given through ``Pipeline(*stages).open(rows)`` on the
  actor's event loop, with many rows in flight (Ray hands an async actor several batches at
  once; each gets its own copy of the stages, and ``max_in_flight`` bounds the rows one actor
  works on across all of them). Results and failures both come back as rows: a failed row
  is the row as the failing stage received it with ``error`` (the message) and
  ``error_record`` (the dead-letter record as JSON) filled in; they are ``None`` on answers.

* :func:`run_job_on_ray` runs a file job (``python -m pipeline run ... --engine ray``): the
  input is read by a Ray datasource, answered by the job's caller
  (:func:`pipeline.jobs._job.build_caller`) inside actors, written by Ray's Parquet writer to part
  files next to the output, and published by the job's journal in exactly the format the
  local engine writes. See :func:`run_job_on_ray` for what that buys (identical rows and
  keys, bad rows dead-lettered, resume across engines).

Rate limits: Ray actors are separate processes, possibly on other machines, so a limit must
be shared through Redis (``limiter="redis://host:port/db"``; the key is the provider, the API
key's fingerprint and the model, as for local jobs, so Ray and local jobs on one key share a
budget). Without Redis each of the N actors keeps to ``1/N`` of ``rpm``/``tpm``, and a warning
says so: the total stays within the limit, but reaches it only while every actor is busy.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import importlib
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio
import anyio.to_thread

from pipeline import Pipeline, Results
from pipeline._envelope import Envelope, Failed
from pipeline._errors import ConfigError, FatalError, ItemError
from pipeline._json import dumps, loads
from pipeline._stage import Inbox, ItemStage, Outbox, Source, Stage
from stages.files import DeadLetterSink, FileSink, dead_letter_record
from stages.files._records import encode_record, key_json
from stages.files._rows import line_of
from stages.llm._caller import LLMCaller
from stages.llm._limits import Limiter, RateLimiter

if TYPE_CHECKING:
    from pipeline.jobs._job import JobProgress, JobSettings, JobSummary

log = logging.getLogger("pipeline.ray")

ERROR = "error"
"""Column holding a failed row's error message (``None`` on answers)."""
ERROR_RECORD = "error_record"
"""Column holding a failed row's dead-letter record as JSON text (``None`` on answers)."""

PARTS_SUFFIX = ".ray-parts"
"""The Ray engine writes part files to ``OUTPUT.ray-parts/`` while a job runs."""

_STOP_FILE = "STOP"  # written by the driver: actors take no new rows
_FATAL_FILE = "FATAL"  # written by the first actor or reader that hits a fatal error
_KIND, _KEY, _LINE, _ORIGIN, _PAYLOAD = "kind", "key", "line", "origin", "payload"


def import_ray() -> Any:
    """Import Ray Data, or raise :class:`ConfigError` naming the extra to install."""
    try:
        ray = importlib.import_module("ray")
        importlib.import_module("ray.data")
    except ImportError as error:
        raise ConfigError(
            f"the Ray engine needs Ray Data ({error}): pip install 'llm-pipeline[ray]'"
        ) from None
    return ray


# -- what an actor runs ----------------------------------------------------------------------


class _StageFactory(Protocol):
    def __call__(self) -> list[Stage[Any, Any]]: ...


@dataclasses.dataclass(frozen=True)
class _Pickled:
    """Fresh copies of the user's stages: unpickled once per concurrent batch slot."""

    data: bytes

    def __call__(self) -> list[Stage[Any, Any]]:
        import pickle

        stages: list[Stage[Any, Any]] = pickle.loads(self.data)  # our own bytes, from ray_transform
        return stages


@dataclasses.dataclass(frozen=True)
class _JobStages:
    """The stages of a file job, built in the actor from the job's settings."""

    settings: JobSettings

    def __call__(self) -> list[Stage[Any, Any]]:
        from pipeline.jobs._job import build_caller
        from stages._batch import Batcher

        stages: list[Stage[Any, Any]] = []
        if self.settings.endpoint == "embeddings":
            stages.append(Batcher(max_items=self.settings.batch_size, max_wait=0.02))
        stages.append(build_caller(self.settings))
        return stages


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything an actor needs, shipped once with its class."""

    stages: _StageFactory
    actors: int
    max_in_flight: int
    limiter_url: str | None = None
    ordered: bool = False
    mode: Literal["rows", "job"] = "rows"
    sink: FileSink | None = None  # job mode: checks and encodes output rows like the local sink
    budget_share: float | None = None  # USD one actor may spend
    control_dir: str | None = None  # job mode: where the STOP and FATAL files live


class _Item:
    __slots__ = ("key", "origin", "value")

    def __init__(self, value: Any, key: Hashable | None, origin: str | None) -> None:
        self.value = value
        self.key = key
        self.origin = origin


class _BatchRun:
    """The outcome of one batch: answers, failures, what was left undone, the counters."""

    def __init__(self) -> None:
        self.outputs: list[Envelope[Any]] = []
        self.failures: list[Failed] = []
        self.undone: list[_Item] = []
        self.stats: dict[str, Any] = {}
        self.results: Results[Any] | None = None


class _BatchSource(Source[Any]):
    """Emits one batch's rows, keeping to the actor's rows in flight, budget and stop."""

    def __init__(self, runtime: _ActorRuntime, items: Sequence[_Item], batch: _BatchRun) -> None:
        super().__init__(name="ray-batch")
        self.runtime = runtime
        self.items = items
        self.batch = batch
        self.holding: set[int] = set()

    async def run(self, inbox: Inbox[None], outbox: Outbox[Any]) -> None:
        """Emit the rows; leave the rest undone once the actor must stop."""
        runtime = self.runtime
        slots = runtime.slots()
        for index, item in enumerate(self.items):
            await slots.acquire()
            if runtime.must_stop() is not None:
                slots.release()
                self.batch.undone.extend(self.items[index:])
                return
            # The only source of this run numbers its rows 0, 1, 2...: hold the slot under
            # that number before the row can finish.
            self.holding.add(index)
            await outbox.emit(item.value, key=item.key, origin=item.origin)

    def release(self, seq: int) -> None:
        """The row ``seq`` has an answer or a failure: its slot is free."""
        if seq in self.holding:
            self.holding.discard(seq)
            self.runtime.slots().release()

    def release_all(self) -> None:
        for _ in range(len(self.holding)):
            self.runtime.slots().release()
        self.holding.clear()


def _report_fatal(control_dir: str | None, error: BaseException) -> None:
    """Leave a fatal error's message for the driver (Ray only passes on a traceback's text)."""
    if control_dir is None:
        return
    record = {
        "type": type(error).__name__,
        "message": str(error),
        "config": isinstance(error, ConfigError),
    }
    try:
        with open(os.path.join(control_dir, _FATAL_FILE), "x", encoding="utf-8") as f:
            f.write(dumps(record).decode())
    except FileExistsError:  # another actor said it first
        pass
    except OSError as problem:
        log.warning("cannot record the fatal error for the driver: %s", problem)


def _read_fatal(control_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(control_dir, _FATAL_FILE), encoding="utf-8") as f:
            found = loads(f.read())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


class _Encode(ItemStage[Any, bytes]):
    """Job mode: encode each answer as the output sink would, or dead-letter it as it would."""

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


class _ActorRuntime:
    """The state one actor keeps across batches: stage copies, limiters, the budget."""

    def __init__(self, spec: _Spec) -> None:
        self.spec = spec
        self._free: list[list[Stage[Any, Any]]] = []
        self._limiters: dict[int, Limiter] = {}
        self._slots: anyio.Semaphore | None = None
        self._running: set[_BatchRun] = set()
        self._spent = 0.0  # USD spent by finished batches
        self._stopped: str | None = None
        self._stop_checked = 0.0
        self.succeeded = 0  # rows answered by this actor (the first-requests rule)

    def slots(self) -> anyio.Semaphore:
        if self._slots is None:
            self._slots = anyio.Semaphore(self.spec.max_in_flight)
        return self._slots

    # -- stopping ----------------------------------------------------------------------------

    def spent(self) -> float:
        """USD spent by this actor, the running batches included."""
        live = 0.0
        for batch in self._running:
            if batch.results is not None:
                live += sum(s.cost_usd for s in batch.results.stats)
        return self._spent + live

    def must_stop(self) -> str | None:
        """Why this actor takes no new rows (budget share spent, a stop, a fatal error)."""
        if self._stopped is not None:
            return self._stopped
        share = self.spec.budget_share
        if share is not None and self.spent() >= share:
            self._stopped = f"budget reached (this actor's share: ${share:g})"
            return self._stopped
        control = self.spec.control_dir
        if control is not None:
            now = time.monotonic()
            if now - self._stop_checked >= 0.2:
                self._stop_checked = now
                if os.path.exists(os.path.join(control, _FATAL_FILE)):
                    self._stopped = "a fatal error stopped the job"
                elif os.path.exists(os.path.join(control, _STOP_FILE)):
                    try:
                        with open(os.path.join(control, _STOP_FILE), encoding="utf-8") as f:
                            self._stopped = f.read().strip() or "stop requested"
                    except OSError:
                        self._stopped = "stop requested"
        return self._stopped

    # -- stages and limiters -----------------------------------------------------------------

    def _take_stages(self) -> list[Stage[Any, Any]]:
        if self._free:
            return self._free.pop()
        stages = self.spec.stages()
        for index, stage in enumerate(stages):
            if isinstance(stage, LLMCaller):
                limiter = self._limiters.get(index)
                if limiter is None:
                    limiter = self._limiters[index] = self._make_limiter(stage)
                stage.limiter = limiter
                # the actor's source keeps to the budget share
                stage.output = dataclasses.replace(stage.output, budget_usd=None)
        return stages

    def _make_limiter(self, caller: LLMCaller) -> Limiter:
        """One limiter per caller and actor: shared through Redis, or this actor's share."""
        spec = self.spec
        if spec.limiter_url is not None:
            from stages.llm._redis_limiter import RedisRateLimiter

            key_env = caller.key_env()
            return RedisRateLimiter.from_url(
                spec.limiter_url,
                rpm=caller.limits.rpm,
                tpm=caller.limits.tpm,
                provider=caller.provider_name,
                api_key=os.environ.get(key_env) if key_env else None,
                model=caller.model,
            )
        actors = spec.actors
        return RateLimiter(
            rpm=None if caller.limits.rpm is None else caller.limits.rpm / actors,
            tpm=None if caller.limits.tpm is None else caller.limits.tpm / actors,
        )

    # -- one batch ---------------------------------------------------------------------------

    async def run(self, items: Sequence[_Item]) -> _BatchRun:
        """Run ``items`` through a copy of the stages; return what came out.

        In job mode a fatal error (a rejected key, no credit, Redis lost) does not fail the
        Ray task: it is recorded for the driver (the FATAL file), this actor and the others
        take no new rows, and what this batch finished is returned and written like any
        answer. The dataset then ends normally and nothing answered is lost; the driver
        raises the error once everything is journaled.
        """
        batch = _BatchRun()
        if self.must_stop() is not None:
            batch.undone = list(items)
            batch.stats = {"stopped": self._stopped}
            return batch
        stages: list[Stage[Any, Any]] | None = None
        try:
            stages = self._take_stages()
            await self._run(stages, items, batch)
        except (FatalError, ConfigError) as error:
            if self.spec.mode != "job":
                raise
            _report_fatal(self.spec.control_dir, error)
            self._stopped = f"fatal error: {error}"
            batch.stats["stopped"] = self._stopped
        finally:
            if stages is not None:
                self._free.append(stages)
        return batch

    async def _run(
        self, stages: list[Stage[Any, Any]], items: Sequence[_Item], batch: _BatchRun
    ) -> None:
        source = _BatchSource(self, items, batch)
        chain: list[Stage[Any, Any]] = [source, *stages]
        if self.spec.mode == "job":
            assert self.spec.sink is not None
            chain.append(_Encode(self.spec.sink))
        caller = next((s for s in stages if isinstance(s, LLMCaller)), None)

        def dead_letter(failed: Failed) -> None:
            source.release(failed.seq)
            if self.spec.mode == "job":
                self._first_requests_rule(failed, caller, batch)
            batch.failures.append(failed)

        pipe = Pipeline(*chain, ordered=self.spec.ordered, dead_letter=dead_letter, name="ray")
        self._running.add(batch)
        try:
            async with pipe.open() as results:
                batch.results = results
                async for env in results.envelopes():
                    source.release(env.seq)
                    batch.outputs.append(env)
        finally:
            self._running.discard(batch)
            source.release_all()
            self.succeeded += len(batch.outputs)
            report = results.report if batch.results is not None else None
            if report is not None:
                self._spent += sum(s.cost_usd for s in report.stages)
                batch.stats = self._counters(report, caller)
            if batch.undone:
                batch.stats["stopped"] = self._stopped

    @staticmethod
    def _counters(report: Any, caller: LLMCaller | None) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "requests": 0,
            "retries": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cost_usd": 0.0,
            "dropped": report.dropped,
        }
        for s in report.stages:
            if caller is not None and s.name == caller.name:
                stats["requests"] += s.requests
                stats["retries"] += s.retries
                stats["prompt_tokens"] += s.prompt_tokens
                stats["completion_tokens"] += s.completion_tokens
                stats["cost_usd"] += s.cost_usd
        if caller is not None:
            stats["cache_hits"] = caller.totals.cache_hits
        return stats

    def _first_requests_rule(
        self, failed: Failed, caller: LLMCaller | None, batch: _BatchRun
    ) -> None:
        """Stop the job when this actor's first requests fail as every row would.

        The local engine's rule (:func:`pipeline.jobs._job.setup_failure`), per actor: it applies
        until this actor's caller answered a row.
        """
        from pipeline.jobs._job import setup_failure

        if caller is None or failed.stage != caller.name or self._answered(caller, batch):
            return
        error = setup_failure(failed)
        if error is not None:
            raise error

    def _answered(self, caller: LLMCaller, batch: _BatchRun) -> bool:
        if self.succeeded or batch.outputs:
            return True
        for running in self._running:
            if running.results is not None and any(
                s.name == caller.name and s.emitted for s in running.results.stats
            ):
                return True
        return False


# -- converting batches ----------------------------------------------------------------------


def _key_of(value: Any) -> Hashable:
    """A row key read back from JSON (keys that were tuples come back as lists)."""
    if isinstance(value, list):
        return tuple(_key_of(v) for v in value)
    key: Hashable = value
    return key


def _pa() -> Any:
    return importlib.import_module("pyarrow")


def _record(failed: Failed) -> dict[str, Any]:
    """The dead-letter record of ``failed``, exactly as the local dead-letter file holds it."""
    return dead_letter_record(failed)


def _as_row(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    return {"value": value}


def _column(pa: Any, values: list[Any]) -> Any:
    """An Arrow column for ``values``; values that share no type become JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array(
            [None if v is None else v if isinstance(v, str) else dumps(v).decode() for v in values],
            type=pa.string(),
        )


def rows_table(rows: Sequence[Mapping[str, Any]], extra: Mapping[str, Any] | None = None) -> Any:
    """Return ``rows`` as an Arrow table: the union of their fields, ``None`` where missing.

    Args:
        rows: The rows.
        extra: Columns to add, by name, as ``(values, arrow type)`` pairs.
    """
    pa = _pa()
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    for name in extra or {}:
        names.pop(name, None)
    arrays = [_column(pa, [row.get(name) for row in rows]) for name in names]
    fields = list(names)
    for name, (values, kind) in (extra or {}).items():
        arrays.append(pa.array(values, type=kind))
        fields.append(name)
    return pa.Table.from_arrays(arrays, names=fields)


def _rows_output(batch: _BatchRun, stopped_message: str | None) -> Any:
    """User mode: answers and failures as rows with ``error`` and ``error_record``."""
    pa = _pa()
    rows: list[dict[str, Any]] = []
    errors: list[str | None] = []
    records: list[str | None] = []
    for env in batch.outputs:
        rows.append(_as_row(env.value))
        errors.append(None)
        records.append(None)
    for failed in batch.failures:
        rows.append(_as_row(failed.item))
        errors.append(failed.message)
        records.append(dumps(_record(failed)).decode())
    for item in batch.undone:  # never silently lost: flagged as not processed
        message = f"not processed: {stopped_message or 'the actor stopped'}"
        rows.append(_as_row(item.value))
        errors.append(message)
        failed = Failed(item.value, "ray", "NotProcessed", message, 0, -1, item.key, item.origin)
        records.append(dumps(_record(failed)).decode())
    return rows_table(rows, {ERROR: (errors, pa.string()), ERROR_RECORD: (records, pa.string())})


def _job_table(columns: Mapping[str, list[Any]]) -> Any:
    pa = _pa()
    return pa.table(
        {
            _KIND: pa.array(columns[_KIND], type=pa.string()),
            _KEY: pa.array(columns[_KEY], type=pa.string()),
            _LINE: pa.array(columns[_LINE], type=pa.int64()),
            _ORIGIN: pa.array(columns[_ORIGIN], type=pa.string()),
            _PAYLOAD: pa.array(columns[_PAYLOAD], type=pa.binary()),
        }
    )


class _JobColumns:
    """Job mode rows: ``kind`` (row, ok, failed, stats), ``key`` (JSON), line, origin, payload."""

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {
            n: [] for n in (_KIND, _KEY, _LINE, _ORIGIN, _PAYLOAD)
        }

    def add(
        self, kind: str, key: Hashable | None, line: int | None, origin: str | None, payload: bytes
    ) -> None:
        c = self.columns
        c[_KIND].append(kind)
        c[_KEY].append(None if key is None else key_json(key).decode())
        c[_LINE].append(line)
        c[_ORIGIN].append(origin)
        c[_PAYLOAD].append(payload)

    def table(self) -> Any:
        return _job_table(self.columns)


_DEAD_LETTER: DeadLetterSink | None = None


def _dead_letter_payload(failed: Failed) -> bytes:
    global _DEAD_LETTER
    if _DEAD_LETTER is None:
        _DEAD_LETTER = DeadLetterSink("-")
    return _DEAD_LETTER.payload(Envelope(failed, failed.seq))


def _line(env: Envelope[Any]) -> int:
    line = line_of(env.origin)
    return env.seq + 1 if line is None else line


def _job_output(batch: _BatchRun, passed: _JobColumns) -> Any:
    out = passed
    for env in batch.outputs:
        out.add("ok", env.key, _line(env), env.origin, env.value)
    for failed in batch.failures:
        line = line_of(failed.origin)
        out.add(
            "failed",
            failed.key,
            failed.seq + 1 if line is None else line,
            failed.origin,
            _dead_letter_payload(failed),
        )
    out.add("stats", None, None, None, dumps(batch.stats))
    return out.table()


class PipelineActor:
    """A Ray Data actor running per-row stages over each batch (made by :func:`ray_transform`).

    Ray calls it with pyarrow batches (``batch_format="pyarrow"``) and may run several calls
    at once on the actor's event loop. The class :func:`ray_transform` returns carries its
    configuration, so it is used as ``ds.map_batches(actor_class, ...)`` with no arguments.
    """

    spec: _Spec | None = None

    def __init__(self) -> None:
        spec = type(self).spec
        if spec is None:
            raise ConfigError("use the class returned by ray_transform(), not PipelineActor")
        self.runtime = _ActorRuntime(spec)

    async def __call__(self, batch: Any) -> Any:
        """Run the batch's rows through the stages; return answers and failures as rows."""
        runtime = self.runtime
        spec = runtime.spec
        if spec.mode == "rows":
            rows = batch.to_pylist()
            result = await runtime.run([_Item(row, None, None) for row in rows])
            return _rows_output(result, runtime.must_stop())
        passed = _JobColumns()
        items: list[_Item] = []
        for kind, key, line, origin, payload in zip(
            *(batch.column(name).to_pylist() for name in (_KIND, _KEY, _LINE, _ORIGIN, _PAYLOAD)),
            strict=True,
        ):
            if kind == "row":
                items.append(_Item(loads(payload), _key_of(loads(key)), origin))
            else:  # a bad row or the reader's counters: passed on as they are
                passed.add(
                    kind, None if key is None else _key_of(loads(key)), line, origin, payload
                )
        result = await runtime.run(items)
        return _job_output(result, passed)


# -- the user API ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RayTransform:
    """A pipeline's per-row stages as a Ray Data transform (see :func:`ray_transform`).

    Attributes:
        actor_class: The callable class to give ``Dataset.map_batches``; it carries the
            stages and settings, so it takes no constructor arguments.
        concurrency: Actors in the pool.
        batch_size: Rows per batch handed to an actor.
        num_cpus: CPUs each actor reserves (it mostly waits on the network).
    """

    actor_class: type[PipelineActor]
    concurrency: int
    batch_size: int
    num_cpus: float

    def map_batches_kwargs(self) -> dict[str, Any]:
        """Return the keyword arguments of ``ds.map_batches(self.actor_class, **kwargs)``."""
        ray = import_ray()
        return {
            "compute": ray.data.ActorPoolStrategy(size=self.concurrency),
            "batch_size": self.batch_size,
            "batch_format": "pyarrow",
            "num_cpus": self.num_cpus,
            "zero_copy_batch": True,
        }

    def __call__(self, dataset: Any) -> Any:
        """Return ``dataset`` transformed (lazily, like every Ray Data transform)."""
        return dataset.map_batches(self.actor_class, **self.map_batches_kwargs())

    @staticmethod
    def split(dataset: Any) -> tuple[Any, Any]:
        """Materialize a transformed dataset and split it into answers and failures.

        The dataset is computed once (``materialize``) so the rows are not sent twice. The
        answers lose the two error columns; the failures keep them.

        Returns:
            ``(answers, failures)``, two datasets.
        """
        from ray.data.expressions import col

        done = dataset.materialize()
        answers = done.filter(expr=col(ERROR).is_null()).drop_columns([ERROR, ERROR_RECORD])
        failures = done.filter(expr=col(ERROR).is_not_null())
        return answers, failures


def _stages_of(pipeline_or_stages: Any) -> list[Stage[Any, Any]]:
    if isinstance(pipeline_or_stages, Pipeline):
        stages = list(pipeline_or_stages.stages)
    elif isinstance(pipeline_or_stages, Stage):
        stages = [pipeline_or_stages]
    elif isinstance(pipeline_or_stages, Sequence) and not isinstance(pipeline_or_stages, str):
        stages = list(pipeline_or_stages)
    else:
        raise ConfigError(
            "ray_transform takes a Pipeline, a stage or a list of stages, "
            f"not {type(pipeline_or_stages).__name__}"
        )
    if not stages:
        raise ConfigError("ray_transform needs at least one stage")
    for stage in stages:
        if not isinstance(stage, Stage):
            raise ConfigError(f"ray_transform: {stage!r} is not a stage")
        if stage.is_source:
            raise ConfigError(
                f"ray_transform takes per-row stages: leave out the source {stage.name!r}"
                " (the dataset is the input)"
            )
        if stage.is_sink:
            raise ConfigError(
                f"ray_transform takes per-row stages: leave out the sink {stage.name!r}"
                " (write the transformed dataset with Ray's writers)"
            )
    return stages


def _warn_limits(callers: Sequence[LLMCaller], actors: int, limiter_url: str | None) -> None:
    """Say what rate limit the actors keep to when no Redis limiter shares it."""
    if limiter_url is not None:
        return
    for caller in callers:
        if caller.limits.rpm is None and caller.limits.tpm is None:
            log.warning(
                "stage %r has no rpm/tpm and no shared limiter: each of the %d actors learns"
                " the server's limits on its own, so together they may exceed them (and get"
                " 429s); set rpm/tpm, or share them through Redis (limiter='redis://host:port/db')",
                caller.name,
                actors,
            )
            continue
        parts = []
        for label, value in (("rpm", caller.limits.rpm), ("tpm", caller.limits.tpm)):
            if value is not None:
                parts.append(f"{label}={value / actors:g} (1/{actors} of {value:g})")
        log.warning(
            "stage %r: no shared limiter, so each of the %d actors keeps to %s; the effective"
            " limit is the full one only while all %d actors have rows to send; share it"
            " through Redis instead (limiter='redis://host:port/db', --limiter)",
            caller.name,
            actors,
            " and ".join(parts),
            actors,
        )


def _actor_class(spec: _Spec) -> type[PipelineActor]:
    return type("PipelineActorWithStages", (PipelineActor,), {"spec": spec, "__module__": __name__})


def ray_transform(
    pipeline_or_stages: Any,
    *,
    concurrency: int = 2,
    max_in_flight: int = 256,
    batch_size: int = 256,
    limiter: str | None = None,
    num_cpus: float = 0.25,
) -> RayTransform:
    """Turn per-row stages into a Ray Data transform run by a pool of async actors.

    Args:
        pipeline_or_stages: A :class:`~pipeline._runner.Pipeline` without source or sink, a
            stage, or a list of stages (``LLMCaller``, ``pipeline.map``...). They are
            pickled (cloudpickle) into every actor; each concurrent batch gets its own copy.
        concurrency: Actors in the pool.
        max_in_flight: Most rows one actor works on at once, over all its batches.
        batch_size: Rows per batch given to an actor.
        limiter: ``redis://host:port/db`` to share each ``LLMCaller``'s ``rpm``/``tpm``
            between the actors (and any other process on the same key); without it each
            actor keeps to ``1/concurrency`` of them, with a warning saying so.
        num_cpus: CPUs each actor reserves.

    Returns:
        The transform: ``transform(ds)`` or ``ds.map_batches(transform.actor_class,
        **transform.map_batches_kwargs())``.

    Raises:
        ConfigError: Ray is not installed, a stage is a source or sink, a caller carries a
            limiter object (which cannot be shared by processes), or a stage cannot be
            pickled.
    """
    import_ray()
    cloudpickle = importlib.import_module("ray.cloudpickle")  # vendored by Ray

    if concurrency < 1 or max_in_flight < 1 or batch_size < 1:
        raise ConfigError("concurrency, max_in_flight and batch_size must be >= 1")
    if not num_cpus >= 0:
        raise ConfigError(f"num_cpus must be >= 0, got {num_cpus!r}")
    stages = _stages_of(pipeline_or_stages)
    callers = [s for s in stages if isinstance(s, LLMCaller)]
    for caller in callers:
        if caller.limiter is not None and limiter is None:
            raise ConfigError(
                f"stage {caller.name!r} carries a limiter object, which Ray actors cannot"
                " share (each would get its own copy): give the caller rpm=/tpm= and pass"
                " limiter='redis://host:port/db' to ray_transform"
            )
    ordered = isinstance(pipeline_or_stages, Pipeline) and pipeline_or_stages.ordered
    saved = [(c, c.limiter) for c in callers]
    try:
        for caller in callers:
            caller.limiter = None  # replaced in every actor
        data = cloudpickle.dumps(stages)
    except Exception as error:
        raise ConfigError(
            f"the stages cannot be sent to Ray actors: {type(error).__name__}: {error}"
        ) from None
    finally:
        for caller, kept in saved:
            caller.limiter = kept
    budget = [c.output.budget_usd for c in callers if c.output.budget_usd is not None]
    _warn_limits(callers, concurrency, limiter)
    spec = _Spec(
        stages=_Pickled(data),
        actors=concurrency,
        max_in_flight=max_in_flight,
        limiter_url=limiter,
        ordered=ordered,
        budget_share=min(budget) / concurrency if budget else None,
    )
    return RayTransform(_actor_class(spec), concurrency, batch_size, num_cpus)


# -- the file job engine ---------------------------------------------------------------------


class _FileRows:
    """A Ray datasource reading a job's input with the local engine's own source.

    One read task per input file streams blocks of ``rows_per_block`` rows: each row is its
    key, line, origin and the record as JSON (so Arrow infers no types), bad rows are already
    dead-letter records, and rows a previous run finished are skipped.
    """

    def __init__(
        self,
        path: str,
        *,
        fmt: str | None,
        id_field: str | None,
        skip: Any,
        rows_per_block: int,
        control_dir: str | None = None,
    ) -> None:
        self.path = path
        self.fmt = fmt
        self.id_field = id_field
        self.skip = skip
        self.rows_per_block = rows_per_block
        self.control_dir = control_dir

    def datasource(self) -> Any:
        """Return the ``ray.data.Datasource`` (built here: Ray is imported lazily)."""
        import_ray()
        from ray.data.block import BlockMetadata
        from ray.data.datasource import Datasource, ReadTask

        reader = self

        class FileRowsDatasource(Datasource):
            def estimate_inmemory_data_size(self) -> int | None:
                try:
                    return os.path.getsize(reader.path)
                except OSError:
                    return None

            def get_read_tasks(
                self,
                parallelism: int,
                per_task_row_limit: int | None = None,
                data_context: Any = None,
            ) -> list[Any]:
                metadata = BlockMetadata(
                    num_rows=None,
                    size_bytes=self.estimate_inmemory_data_size(),
                    exec_stats=None,
                    input_files=(reader.path,),
                )
                return [ReadTask(reader.blocks, metadata)]

            @property
            def name(self) -> str:
                return "LLMJobInput"

        make: Any = FileRowsDatasource  # Ray's constructor is untyped
        return make()

    def blocks(self) -> Iterator[Any]:
        """Yield the file's rows as blocks (runs in a Ray read task)."""
        try:
            yield from self._blocks()
        except (FatalError, ConfigError) as error:  # an unreadable file or CSV header
            _report_fatal(self.control_dir, error)
            raise

    def _blocks(self) -> Iterator[Any]:
        from anyio.from_thread import start_blocking_portal

        from stages.files import open_source

        failures: collections.deque[Failed] = collections.deque()
        source = open_source(self.path, fmt=self.fmt, id_field=self.id_field, skip_keys=self.skip)
        pipe = Pipeline(source, dead_letter=failures.append, name="ray-read")
        size = self.rows_per_block

        async def take(results: Results[Any]) -> list[Envelope[Any]]:
            taken: list[Envelope[Any]] = []
            async for env in results.envelopes():
                taken.append(env)
                if len(taken) >= size:
                    break
            return taken

        def block(envs: list[Envelope[Any]], last: bool) -> Any:
            out = _JobColumns()
            for env in envs:
                out.add("row", env.key, line_of(env.origin), env.origin, dumps(env.value))
            while failures:
                failed = failures.popleft()
                out.add(
                    "failed",
                    failed.key,
                    line_of(failed.origin),
                    failed.origin,
                    _dead_letter_payload(failed),
                )
            if last:
                skipped = getattr(source, "skipped", 0)
                out.add("stats", None, None, None, dumps({"skipped": skipped}))
            return out.table()

        with (
            start_blocking_portal() as portal,
            portal.wrap_async_context_manager(pipe.open()) as results,
        ):
            while envs := portal.call(take, results):
                yield block(envs, last=False)
        yield block([], last=True)  # the bad rows left, and how many rows were skipped


def parts_dir(output: str) -> str:
    """Return the directory where the Ray engine writes the part files of ``output``."""
    return output + PARTS_SUFFIX


class _Tally:
    """What folding part files found: rows per kind, causes of failures, counters."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.causes: dict[str, int] = {}
        self.stats: collections.Counter[str] = collections.Counter()
        self.cost = 0.0
        self.stopped: str | None = None
        self.duplicates = 0


def _cause(payload: bytes) -> str:
    error = loads(payload).get("error") or {}
    status = error.get("status")
    kind = error.get("type") or "Error"
    return f"{kind} (HTTP {status})" if status is not None else str(kind)


def _fold_parts(directory: str, journal: Any, tally: _Tally | None) -> None:
    """Move every complete part file's rows into the job's journals, then delete the file.

    A part file that cannot be read (a writer killed mid-file) is deleted: its rows have no
    record anywhere, so they are sent again. A key already in the journal (a part folded
    before a crash deleted it) is not appended twice.
    """
    pq = importlib.import_module("pyarrow.parquet")
    done = journal.done
    journal.output.open()
    journal.dead_letter.open()
    paths = sorted(glob.glob(os.path.join(directory, "**", "*.parquet"), recursive=True))
    for path in paths:
        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises ArrowInvalid for a torn file
            log.warning("part file %s is incomplete (%s): its rows are sent again", path, error)
            os.remove(path)
            continue
        ok: list[bytes] = []
        dead: list[bytes] = []
        columns = [table.column(n).to_pylist() for n in (_KIND, _KEY, _LINE, _PAYLOAD)]
        for kind, key_text, line, payload in zip(*columns, strict=True):
            if kind == "stats":
                if tally is not None:
                    stats = loads(payload)
                    tally.stopped = tally.stopped or stats.pop("stopped", None)
                    tally.cost += float(stats.pop("cost_usd", 0.0))
                    tally.stats.update({k: v for k, v in stats.items() if isinstance(v, int)})
                continue
            key = _key_of(loads(key_text))
            if key in done:
                if tally is not None:
                    tally.duplicates += 1
                continue
            done.add(key)
            record = encode_record(int(line), key, payload)
            if kind == "ok":
                ok.append(record)
                if tally is not None:
                    tally.ok += 1
            else:
                dead.append(record)
                if tally is not None:
                    tally.failed += 1
                    cause = _cause(payload)
                    tally.causes[cause] = tally.causes.get(cause, 0) + 1
        if ok:
            journal.output.append(b"".join(ok), len(ok))
        if dead:
            journal.dead_letter.append(b"".join(dead), len(dead))
        journal.output.sync()
        journal.dead_letter.sync()
        os.remove(path)


def _has_parts(directory: str) -> bool:
    """Whether ``directory`` holds part files (an interrupted Ray run's answers)."""
    return bool(glob.glob(os.path.join(directory, "**", "*.parquet"), recursive=True))


def _count_parts(directory: str, seen: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """Count answered and failed rows in the part files written so far (for progress)."""
    pq = importlib.import_module("pyarrow.parquet")
    for path in glob.glob(os.path.join(directory, "**", "*.parquet"), recursive=True):
        if path in seen:
            continue
        try:
            kinds = pq.read_table(path, columns=[_KIND]).column(_KIND).to_pylist()
        except Exception:  # still being written
            continue
        seen[path] = (kinds.count("ok"), kinds.count("failed"))
    return sum(v[0] for v in seen.values()), sum(v[1] for v in seen.values())


def default_actors(ray: Any) -> int:
    """Return how many actors a job uses by default: the cluster's CPUs, from 1 to 16."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(16, cpus))


async def run_job_on_ray(
    settings: JobSettings,
    *,
    actors: int | None = None,
    batch_size: int = 64,
    max_in_flight: int | None = None,
    on_progress: Callable[[JobProgress], Any] | None = None,
    stop_event: Any = None,
    progress_interval: float = 0.5,
) -> JobSummary:
    """Run a file job on Ray Data (``python -m pipeline run ... --engine ray``).

    The flow: a Ray datasource reads the input with the local engine's own source (one read
    task per file, streaming blocks); a pool of ``actors`` async actors answers each batch
    with the caller :func:`~pipeline.jobs._job.build_caller` makes from ``settings``, with many
    rows in flight; Ray's Parquet writer writes the answers and dead-letter records to part
    files in ``OUTPUT.ray-parts/``; then the driver folds the parts into the job's
    :class:`~pipeline.jobs._journal.Journal` and publishes the output and dead-letter files
    atomically, in the same format as the local engine (the output's format by extension,
    the dead letters as JSON Lines, input order with ``ordered``).

    Why not Ray's ``read_json``: Arrow's JSON reader turns date-like strings into timestamps,
    merges the fields of objects across rows and gives every row every column, so rows would
    not come out as the local engine writes them; it stops the whole read at one bad line
    (the local engine dead-letters that line); and it numbers no rows, while a job's keys
    are line numbers unless ``id_field`` is set. Reading with the local source keeps rows,
    keys, origins and bad-row records identical, so the two engines' files are the same and
    a job started on one engine resumes on the other.

    Limits: ``settings.limiter`` (Redis) is shared by every actor; without it each actor
    keeps to ``1/actors`` of ``rpm``/``tpm`` (a warning says so). ``concurrency`` and the
    ``budget`` are split between the actors the same way.

    Resume: part files survive a crash; a resume folds the complete ones into the journal
    (deleting a torn one: its rows are sent again), skips every key the journal holds, and
    nothing is appended twice.

    Args:
        settings: The job (input, output and model required).
        actors: Actors in the pool (default: the cluster's CPUs, 1 to 16).
        batch_size: Rows per batch given to an actor (and per block read): a fatal error
            loses at most the batches in flight, which are sent again on resume.
        max_in_flight: Most rows one actor works on at once (default: twice its share of
            the concurrency ceiling).
        on_progress: Called (sync or async) with a :class:`~pipeline.jobs._job.JobProgress`
            every ``progress_interval`` seconds and once at the end.
        stop_event: Once set, actors take no new rows; rows in flight finish; the job stays
            resumable.
        progress_interval: Seconds between progress snapshots.

    Returns:
        The job's summary (``engine="ray"``).

    Raises:
        ConfigError: Ray is missing, invalid settings, an unreadable input, a checkpoint that
            does not match.
        JobFailedError: A fatal error stopped the job (a rejected key, no credit, Redis
            lost); what was done stays resumable.
    """
    from pipeline.jobs._job import _check_files

    ray = import_ray()
    settings.require_paths()
    assert settings.input is not None and settings.output is not None
    if settings.input == "-":
        raise ConfigError("the Ray engine reads a file, not standard input ('-')")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if settings.trace is not None:
        log.warning("trace=%r is ignored on the Ray engine: actors export no spans", settings.trace)
    await anyio.to_thread.run_sync(_check_files, settings)
    started = time.perf_counter()

    started_ray = not ray.is_initialized()
    if started_ray:
        await anyio.to_thread.run_sync(
            lambda: ray.init(address=settings.ray_address, include_dashboard=False)
        )
    try:
        return await _run_on_ray(
            ray,
            settings,
            actors,
            batch_size,
            max_in_flight,
            on_progress,
            stop_event,
            progress_interval,
            started,
        )
    finally:
        if started_ray:
            await anyio.to_thread.run_sync(ray.shutdown)


async def _run_on_ray(
    ray: Any,
    settings: JobSettings,
    actors: int | None,
    batch_size: int,
    max_in_flight: int | None,
    on_progress: Callable[[JobProgress], Any] | None,
    stop_event: Any,
    progress_interval: float,
    started: float,
) -> JobSummary:
    from pipeline.jobs._job import JobFailedError, JobSummary, preflight
    from pipeline.jobs._journal import Journal
    from stages.files import count_rows, open_sink

    assert settings.input is not None and settings.output is not None
    n = actors or default_actors(ray)
    if n < 1:
        raise ConfigError(f"actors must be >= 1, got {n}")
    ceiling = settings.concurrency or settings.max_concurrency
    per_actor = max(1, math.ceil(ceiling / n))
    actor_settings = settings.replace(
        limiter=None,
        concurrency=None if settings.concurrency is None else per_actor,
        max_concurrency=max(1, math.ceil(settings.max_concurrency / n)),
        budget=None,
    )
    # the caller the actors will build, built here to check it and reach its server first
    probe = await anyio.to_thread.run_sync(
        lambda: importlib.import_module("pipeline.jobs._job").build_caller(
            actor_settings, open_resources=False
        )
    )
    await preflight(probe, timeout=min(10.0, settings.timeout))
    _warn_limits([probe], n, settings.limiter)

    journal = Journal(
        settings.output,
        dead_letter=settings.dead_letter,
        settings=settings.fingerprint(),
        input=settings.input,
        resume=settings.resume,
        overwrite=settings.overwrite,
        ordered=settings.ordered,
    )
    directory = parts_dir(settings.output)

    def remove_parts() -> None:
        shutil.rmtree(directory, ignore_errors=True)

    if settings.overwrite or not await anyio.to_thread.run_sync(_has_parts, directory):
        await anyio.to_thread.run_sync(remove_parts)  # nothing of value (or not wanted)
    elif not settings.resume:
        raise ConfigError(
            f"an interrupted Ray job left part files in {directory!r}: use --resume to"
            " continue it or --overwrite to start over"
        )
    await anyio.to_thread.run_sync(journal.open)
    # the sinks set the journals' writers: publishing writes the local engine's formats
    open_sink(journal.output, fmt=settings.output_format)
    DeadLetterSink(journal.dead_letter)
    if journal.complete:  # an earlier run's publish, finished now
        await anyio.to_thread.run_sync(remove_parts)
        return JobSummary(
            complete=True,
            output=settings.output,
            dead_letter=settings.dead_letter_path(),
            engine="ray",
            elapsed_s=time.perf_counter() - started,
        )
    leftover = _Tally()
    if await anyio.to_thread.run_sync(_has_parts, directory):  # a crashed run's answers
        if not journal.resumed:  # no checkpoint says which job they belong to
            await anyio.to_thread.run_sync(journal.discard)
            raise ConfigError(
                f"found part files in {directory!r} but no checkpoint"
                f" ({settings.output}.checkpoint.json): not left by a job that can be resumed;"
                " use --overwrite to delete them and start over"
            )
        await anyio.to_thread.run_sync(_fold_parts, directory, journal, leftover)
    resumed_skipped = len(journal.done)
    await anyio.Path(directory).mkdir(exist_ok=True)
    stop_path = os.path.join(directory, _STOP_FILE)
    for stale in (stop_path, os.path.join(directory, _FATAL_FILE)):
        await anyio.Path(stale).unlink(missing_ok=True)

    spec = _Spec(
        stages=_JobStages(actor_settings),
        actors=n,
        max_in_flight=max_in_flight or 2 * per_actor,
        limiter_url=settings.limiter,
        ordered=False,
        mode="job",
        # a sink on the final path, never opened: encodes rows exactly as the job's sink does
        sink=open_sink(settings.output, fmt=settings.output_format),
        budget_share=None if settings.budget is None else settings.budget / n,
        control_dir=directory,
    )
    reader = _FileRows(
        settings.input,
        fmt=settings.input_format,
        id_field=settings.id_field,
        skip=journal.done,
        rows_per_block=batch_size,
        control_dir=directory,
    )
    transform = RayTransform(_actor_class(spec), n, batch_size, 0.25)
    write_dir = os.path.join(directory, uuid.uuid4().hex[:12])

    def execute() -> None:
        dataset = ray.data.read_datasource(reader.datasource(), num_cpus=0.25)
        # Writers reserve little CPU, so they keep up with the actors: a part file is a
        # batch's commit point, and what a failure loses is what was not written yet.
        transform(dataset).write_parquet(write_dir, ray_remote_args={"num_cpus": 0.1})

    total: int | None = None
    failure: BaseException | None = None
    tally = _Tally()
    seen: dict[str, tuple[int, int]] = {}

    async def progress(final: bool = False) -> None:
        if on_progress is None:
            return
        from pipeline.jobs._job import JobProgress, _call_progress

        ok, failed = await anyio.to_thread.run_sync(_count_parts, write_dir, seen)
        if final:
            ok, failed = tally.ok, tally.failed
        elapsed = time.perf_counter() - started
        rate = (ok + failed) / elapsed if elapsed > 0 else 0.0
        eta = None
        if total is not None and rate > 0:
            eta = max(total - resumed_skipped - ok - failed, 0) / rate
        await _call_progress(
            on_progress,
            JobProgress(
                rows_total=total,
                rows_done=ok + failed + resumed_skipped,
                ok=ok,
                failed=failed,
                skipped=resumed_skipped,
                requests=int(tally.stats.get("requests", 0)),
                retries=int(tally.stats.get("retries", 0)),
                prompt_tokens=int(tally.stats.get("prompt_tokens", 0)),
                completion_tokens=int(tally.stats.get("completion_tokens", 0)),
                cost_usd=tally.cost,
                elapsed_s=elapsed,
                rows_per_s=rate,
                tokens_per_s=0.0,
                eta_s=eta,
                stopping=stopped_by,
                final=final,
            ),
        )

    stopped_by: str | None = None

    async def watch_stop() -> None:
        nonlocal stopped_by
        assert stop_event is not None
        await stop_event.wait()
        stopped_by = "stop requested"
        await anyio.Path(stop_path).write_text(stopped_by, encoding="utf-8")

    try:
        async with anyio.create_task_group() as tg:
            if stop_event is not None:
                tg.start_soon(watch_stop)
            if on_progress is not None:

                async def count() -> None:
                    nonlocal total
                    with contextlib.suppress(OSError, ConfigError, ValueError):
                        total = await anyio.to_thread.run_sync(
                            lambda: count_rows(settings.input or "", fmt=settings.input_format),
                            abandon_on_cancel=True,
                        )

                async def report() -> None:
                    while True:
                        await anyio.sleep(progress_interval)
                        await progress()

                tg.start_soon(count)
                tg.start_soon(report)
            try:
                await anyio.to_thread.run_sync(execute, abandon_on_cancel=False)
            except Exception as error:
                failure = error
            tg.cancel_scope.cancel()
        await anyio.to_thread.run_sync(_fold_parts, directory, journal, tally)
    except BaseException:
        await anyio.to_thread.run_sync(journal.close)
        raise

    stopped = stopped_by or tally.stopped
    summary = JobSummary(
        rows_in=tally.ok + tally.failed,
        ok=tally.ok,
        failed=tally.failed,
        failed_by_cause=dict(sorted(tally.causes.items(), key=lambda kv: (-kv[1], kv[0]))),
        requests=int(tally.stats.get("requests", 0)),
        retries=int(tally.stats.get("retries", 0)),
        prompt_tokens=int(tally.stats.get("prompt_tokens", 0)),
        completion_tokens=int(tally.stats.get("completion_tokens", 0)),
        cost_usd=tally.cost,
        elapsed_s=time.perf_counter() - started,
        resumed_skipped=int(tally.stats.get("skipped", resumed_skipped)),
        stopped=stopped,
        total_ok=journal.previous_ok + leftover.ok + tally.ok,
        total_failed=journal.previous_failed + leftover.failed + tally.failed,
        cache_hits=int(tally.stats.get("cache_hits", 0)),
        output=settings.output,
        dead_letter=settings.dead_letter_path(),
        engine="ray",
    )
    summary.rows_per_s = summary.rows_in / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
    fatal = await anyio.to_thread.run_sync(_read_fatal, directory)
    if failure is not None or fatal is not None:
        if await anyio.to_thread.run_sync(journal.discard):  # nothing done: leave nothing
            await anyio.to_thread.run_sync(remove_parts)
        summary.stopped = None
        if fatal is not None and fatal.get("config"):
            raise ConfigError(str(fatal.get("message"))) from failure
        if fatal is not None:
            message = str(fatal.get("message"))
        else:
            assert failure is not None
            first = str(failure).strip().splitlines()
            message = f"the Ray job failed: {type(failure).__name__}: {first[0] if first else ''}"
        raise JobFailedError(message, summary) from failure
    if stopped is None:
        await anyio.to_thread.run_sync(journal.commit)
        await anyio.to_thread.run_sync(remove_parts)
        summary.complete = True
    else:
        await anyio.to_thread.run_sync(journal.close)
    if summary.dead_letter is not None and not await anyio.Path(summary.dead_letter).exists():
        summary.dead_letter = None
    await progress(final=True)
    return summary
