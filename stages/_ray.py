"""Scale out on Ray Data: a pipeline's per-row stages inside a pool of async actors.

:func:`ray_transform` turns per-row stages (``LLMCaller``, ``map``, ``filter``...) into a Ray
Data transform for users who already hold a ``ray.data.Dataset`` (extra ``[ray]``; ``ray`` is
imported only when it is used)::

    transform = ray_transform([LLMCaller(model="m", prompt="{text}", rpm=600)], concurrency=4)
    out = transform(ds)                         # ds.map_batches(transform.actor_class, ...)
    answers, failures = transform.split(out)    # failures have an ``error`` column

Each actor runs every batch it is given through ``Pipeline(*stages).open(rows)`` on the actor's
event loop, with many rows in flight (Ray hands an async actor several batches at once; each
gets its own copy of the stages, and ``max_in_flight`` bounds the rows one actor works on
across all of them). Results and failures both come back as rows: a failed row is the row as
the failing stage received it with ``error`` (the message) and ``error_record`` (the
dead-letter record as JSON) filled in; they are ``None`` on answers.

An application that runs its own rows through the actors (the file-job engine) builds an
:class:`ActorSpec` and gives it what is its own: a :class:`BatchFormat`, an
:class:`ActorControl` and a ``first_failure_rule``. This module knows nothing of jobs.

Rate limits: actors are separate processes, so a limit is shared through Redis
(``limiter="redis://host:port/db"``, keyed as for local jobs); without it each of the N actors
keeps to ``1/N`` of ``rpm``/``tpm``, and a warning says so.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import anyio

from pipeline import Pipeline, Results
from pipeline._channels import Inbox, Outbox
from pipeline._envelope import Failed
from pipeline._errors import ConfigError, FatalError
from pipeline._stage import Source, Stage
from stages._ray_batch import (
    ERROR,
    ERROR_RECORD,
    BatchFormat,
    BatchOutcome,
    RayItem,
    RowsFormat,
    rows_table,
)
from stages.llm._caller import LLMCaller
from stages.llm._limits import Limiter, RateLimiter
from stages.llm._redis_limiter import RedisRateLimiter

log = logging.getLogger("pipeline.ray")


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


class StageFactory(Protocol):
    """Makes a fresh copy of the stages an actor runs (one per concurrent batch)."""

    def __call__(self) -> list[Stage[Any, Any]]:
        """Return new stage objects."""
        ...


@dataclasses.dataclass(frozen=True)
class PickledStages:
    """Fresh copies of the user's stages: unpickled once per concurrent batch slot."""

    data: bytes

    def __call__(self) -> list[Stage[Any, Any]]:
        """Return a new copy of the pickled stages."""
        stages: list[Stage[Any, Any]] = pickle.loads(self.data)  # our own bytes (ray_transform)
        return stages


class ActorControl(Protocol):
    """How the driver talks to its actors (an application's channel: files, a queue...).

    With a control, a fatal error in an actor does not fail the Ray task: the actor reports it
    here, every actor takes no new rows, and what was finished is still handed back.
    """

    def stop_reason(self) -> str | None:
        """Return why the actors must take no new rows, once they must (polled often)."""
        ...

    def report_fatal(self, error: BaseException) -> None:
        """Tell the driver about a fatal error (the first report wins)."""
        ...


STOP_POLL_S = 0.1
"""How often a running batch asks whether its actor must stop (the control's own answer may be
a little older: see :class:`ActorControl`)."""

FailureRule = Callable[[Failed], BaseException | None]
"""Judges a caller's failure before the actor's caller answered any row: an exception stops."""


@dataclasses.dataclass(frozen=True)
class ActorSpec:
    """Everything an actor needs, shipped once with its class (see :func:`actor_class`).

    Attributes:
        stages: Makes the stages each batch runs through.
        actors: Actors in the pool (each keeps to its share of limits and budget).
        max_in_flight: Most rows one actor works on at once, over all its batches.
        limiter_url: ``redis://...`` to share each caller's rpm/tpm between the actors.
        ordered: Keep each batch's rows in order.
        budget_share: USD one actor may spend before it takes no new rows.
        format: How batches are read and written.
        control: The driver's channel; without one a fatal error fails the Ray task.
        first_failure_rule: Applied to the caller's failures until the actor's caller
            answered a row; an exception it returns stops the actor like a fatal error.
    """

    stages: StageFactory
    actors: int
    max_in_flight: int
    limiter_url: str | None = None
    ordered: bool = False
    budget_share: float | None = None
    format: BatchFormat = dataclasses.field(default_factory=RowsFormat)
    control: ActorControl | None = None
    first_failure_rule: FailureRule | None = None


class _BatchSource(Source[Any]):
    """Emits one batch's rows, keeping to the actor's rows in flight, budget and stop."""

    def __init__(
        self, runtime: _ActorRuntime, items: Sequence[RayItem], batch: BatchOutcome
    ) -> None:
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
        """Free the slots of rows that never finished (the run ended or was cancelled)."""
        for _ in range(len(self.holding)):
            self.runtime.slots().release()
        self.holding.clear()


class _ActorRuntime:
    """The state one actor keeps across batches: stage copies, limiters, the budget."""

    def __init__(self, spec: ActorSpec) -> None:
        self.spec = spec
        self._free: list[list[Stage[Any, Any]]] = []
        self._limiters: dict[int, Limiter] = {}
        self._slots: anyio.Semaphore | None = None
        self._running: set[BatchOutcome] = set()
        self._spent = 0.0  # USD spent by finished batches
        self._stopped: str | None = None
        self.succeeded = 0  # rows answered by this actor (the first-failure rule)

    def slots(self) -> anyio.Semaphore:
        """Return the semaphore bounding this actor's rows in flight."""
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
        elif self.spec.control is not None:
            self._stopped = self.spec.control.stop_reason()
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

    async def run(self, items: Sequence[RayItem]) -> BatchOutcome:
        """Run ``items`` through a copy of the stages; return what came out.

        With an :class:`ActorControl`, a fatal error (a rejected key, no credit, Redis lost)
        does not fail the Ray task: it is reported to the driver, this actor and the others
        take no new rows, and what this batch finished is returned like any answer. The
        dataset then ends normally and nothing answered is lost.
        """
        batch = BatchOutcome()
        if self.must_stop() is not None:
            batch.undone = list(items)
            batch.stopped = self._stopped
            return batch
        stages: list[Stage[Any, Any]] | None = None
        try:
            stages = self._take_stages()
            await self._run(stages, items, batch)
        except (FatalError, ConfigError) as error:
            if self.spec.control is None:
                raise
            self.spec.control.report_fatal(error)
            self._stopped = f"fatal error: {error}"
            batch.stopped = self._stopped
        finally:
            if stages is not None:
                self._free.append(stages)
        return batch

    async def _run(
        self, stages: list[Stage[Any, Any]], items: Sequence[RayItem], batch: BatchOutcome
    ) -> None:
        source = _BatchSource(self, items, batch)
        batch.caller = next((s for s in stages if isinstance(s, LLMCaller)), None)

        def dead_letter(failed: Failed) -> None:
            source.release(failed.seq)
            self._first_failure_rule(failed, batch)
            batch.failures.append(failed)

        pipe = Pipeline(
            source, *stages, ordered=self.spec.ordered, dead_letter=dead_letter, name="ray"
        )
        self._running.add(batch)
        try:
            async with pipe.open() as results, anyio.create_task_group() as tg:
                batch.results = results
                if self.spec.control is not None or self.spec.budget_share is not None:
                    tg.start_soon(self._stop_when_told, results)
                async for env in results.envelopes():
                    source.release(env.seq)
                    batch.outputs.append(env)
                tg.cancel_scope.cancel()
            # rows whose requests the run's stop (a budget) came before: not processed
            batch.undone.extend(items[env.seq] for env in results.not_started)
        finally:
            self._running.discard(batch)
            source.release_all()
            self.succeeded += len(batch.outputs)
            if batch.results is not None and batch.results.report is not None:
                batch.report = batch.results.report
                self._spent += sum(s.cost_usd for s in batch.report.stages)
            if batch.undone:
                batch.stopped = self._stopped

    async def _stop_when_told(self, results: Results[Any]) -> None:
        """Stop the batch's run once the actor must stop: rows not yet sent are not sent.

        The source asks :meth:`must_stop` before each row it emits; rows it already emitted may
        still wait for the limiter or a request slot, and a stopped run sends none of them
        (they come back as not processed, like the rows the source never emitted).
        """
        # the stop comes from another process (a file the driver writes, a budget spent by
        # this actor's other batches): nothing here can be awaited for it, so it is asked
        while (reason := self.must_stop()) is None:  # noqa: ASYNC110
            await anyio.sleep(STOP_POLL_S)
        results.stop(reason)

    def _first_failure_rule(self, failed: Failed, batch: BatchOutcome) -> None:
        """Apply the spec's rule to the caller's failures until this actor answered a row."""
        rule, caller = self.spec.first_failure_rule, batch.caller
        if rule is None or caller is None or failed.stage != caller.name:
            return
        if self._answered(caller, batch):
            return
        error = rule(failed)
        if error is not None:
            raise error

    def _answered(self, caller: LLMCaller, batch: BatchOutcome) -> bool:
        if self.succeeded or batch.outputs:
            return True
        for running in self._running:
            if running.results is not None and any(
                s.name == caller.name and s.emitted for s in running.results.stats
            ):
                return True
        return False


class PipelineActor:
    """A Ray Data actor running per-row stages over each batch (made by :func:`actor_class`).

    Ray calls it with pyarrow batches (``batch_format="pyarrow"``) and may run several calls
    at once on the actor's event loop. The class :func:`actor_class` returns carries its
    :class:`ActorSpec`, so it is used as ``ds.map_batches(actor_class, ...)`` with no arguments.
    """

    spec: ActorSpec | None = None

    def __init__(self) -> None:
        spec = type(self).spec
        if spec is None:
            raise ConfigError("use the class returned by ray_transform(), not PipelineActor")
        self.runtime = _ActorRuntime(spec)

    async def __call__(self, batch: Any) -> Any:
        """Run the batch's rows through the stages; return what the spec's format writes."""
        fmt = self.runtime.spec.format
        items, carried = fmt.decode(batch)
        outcome = await self.runtime.run(items)
        return fmt.encode(outcome, carried)


def actor_class(spec: ActorSpec) -> type[PipelineActor]:
    """Return the actor class that runs ``spec`` (give it to ``Dataset.map_batches``)."""
    return type("PipelineActorWithStages", (PipelineActor,), {"spec": spec, "__module__": __name__})


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


def warn_limits(callers: Sequence[LLMCaller], actors: int, limiter_url: str | None) -> None:
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


def _pickle_stages(stages: list[Stage[Any, Any]], callers: list[LLMCaller]) -> bytes:
    """Pickle the stages for the actors, without the callers' limiters (made per actor)."""
    cloudpickle = importlib.import_module("ray.cloudpickle")  # vendored by Ray
    saved = [(c, c.limiter) for c in callers]
    try:
        for caller in callers:
            caller.limiter = None  # replaced in every actor
        data: bytes = cloudpickle.dumps(stages)
    except Exception as error:
        raise ConfigError(
            f"the stages cannot be sent to Ray actors: {type(error).__name__}: {error}"
        ) from None
    finally:
        for caller, kept in saved:
            caller.limiter = kept
    return data


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
        pipeline_or_stages: A :class:`~pipeline.Pipeline` without source or sink, a
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
    data = _pickle_stages(stages, callers)
    budget = [c.output.budget_usd for c in callers if c.output.budget_usd is not None]
    warn_limits(callers, concurrency, limiter)
    spec = ActorSpec(
        stages=PickledStages(data),
        actors=concurrency,
        max_in_flight=max_in_flight,
        limiter_url=limiter,
        ordered=isinstance(pipeline_or_stages, Pipeline) and pipeline_or_stages.ordered,
        budget_share=min(budget) / concurrency if budget else None,
    )
    return RayTransform(actor_class(spec), concurrency, batch_size, num_cpus)


__all__ = [
    "ERROR",
    "ERROR_RECORD",
    "ActorControl",
    "ActorSpec",
    "BatchFormat",
    "BatchOutcome",
    "FailureRule",
    "PickledStages",
    "PipelineActor",
    "RayItem",
    "RayTransform",
    "RowsFormat",
    "StageFactory",
    "actor_class",
    "import_ray",
    "ray_transform",
    "rows_table",
    "warn_limits",
]
