"""LangChain both ways: any ``Runnable`` as a pipeline stage, and a pipeline as a ``Runnable``.

:class:`RunnableStage` runs a LangChain runnable (a chat model, or a whole chain such as
``prompt | model | parser``) on every row under the pipeline's rate limiter, concurrency slots,
retries, deadline, token and cost accounting, budget and tracing. It is an
:class:`~stages.llm._caller.LLMCaller` whose request is the runnable (the caller's ``call=`` escape
hatch), so it behaves exactly as the HTTP caller does:

* tokens are counted from the chat models' own reports, collected by a callback attached to each
  call (so a chain ending in ``StrOutputParser`` is counted too); prices and ``budget_usd``
  apply to them;
* an error carrying an HTTP status (the ``openai`` SDK's, ``httpx``'s) is retried on 408, 409,
  429 and 5xx and dead-lettered otherwise; connection errors and timeouts are retried; a 429
  whose code means money (``insufficient_quota``...) stops the job, and so does a 401 before
  any row succeeded; anything else is dead-lettered at once;
* the API key of any model inside the runnable (its pydantic ``SecretStr`` fields) is redacted
  from messages and dead letters, like the caller's own key.

Give the wrapped model ``max_retries=0`` (``ChatOpenAI(..., max_retries=0)``): the SDK underneath
retries by itself otherwise, and retries multiply.

:class:`PipelineRunnable` goes the other way: it exposes a pipeline (its stages after the source)
as a LangChain ``Runnable`` with ``ainvoke``, ``abatch`` (one run for the whole batch, results in
input order) and ``astream`` (outputs as they complete), so it drops into an existing chain. An
item the pipeline dead-letters is raised as :class:`ItemFailedError` (or returned, with
``return_exceptions=True``).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar

import anyio
from anyio.lowlevel import RunVar

from pipeline import Pipeline
from pipeline._envelope import Envelope, Failed
from pipeline._errors import ConfigError, ItemError, MissingFieldError, QuotaExhaustedError
from pipeline._stage import Inbox, OnError, Outbox, Source
from stages.llm import HTTP, Limits, Output, Retry
from stages.llm._caller import AuthenticationError, LLMCaller, LLMCallError, Price
from stages.llm._limits import Limiter
from stages.llm._providers import QUOTA_CODES, Answer
from stages.llm._sse import Usage

try:
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.outputs import LLMResult
    from langchain_core.runnables import Runnable, RunnableConfig
    from langchain_core.runnables.config import merge_configs
    from pydantic import BaseModel, SecretStr
except ImportError as exc:  # pragma: no cover - the [langchain] extra
    raise ImportError(
        "LangChain support needs langchain-core: pip install 'llm-pipeline[langchain]'"
    ) from exc

__all__ = ["ItemFailedError", "PipelineRunnable", "RunnableStage"]

T = TypeVar("T")
RunnableOutput = Literal["merge", "value"]
DeltaHook = Callable[[Envelope[Any], str], Awaitable[None] | None]

_CURRENT_ENV: contextvars.ContextVar[Envelope[Any] | None] = contextvars.ContextVar(
    "pipeline_runnable_env", default=None
)


# ------------------------------------------------------------------------------ RunnableStage


class _UsageCollector(BaseCallbackHandler):
    """Adds up the token usage every chat model inside one runnable call reports."""

    run_inline = True  # plain counters: no need for the executor a sync handler gets otherwise
    # only the end of each model call matters: every other event skips this handler
    ignore_chain = ignore_agent = ignore_retriever = ignore_retry = ignore_chat_model = True
    ignore_custom_event = True

    def __init__(self) -> None:
        super().__init__()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.reported = False
        self.model: str | None = None

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        """Count the usage of one model call (per generation, else the model's totals)."""
        counted = False
        for generations in response.generations:
            for generation in generations:
                message = getattr(generation, "message", None)
                usage = getattr(message, "usage_metadata", None)
                if isinstance(usage, Mapping):
                    self._add(usage.get("input_tokens"), usage.get("output_tokens"))
                    counted = True
                metadata = getattr(message, "response_metadata", None)
                if isinstance(metadata, Mapping):
                    self._model(metadata.get("model_name") or metadata.get("model"))
        extra = response.llm_output if isinstance(response.llm_output, Mapping) else {}
        self._model(extra.get("model_name") or extra.get("model"))
        if not counted:
            totals = extra.get("token_usage") or extra.get("usage")
            if isinstance(totals, Mapping):
                prompt = totals.get("prompt_tokens", totals.get("input_tokens"))
                completion = totals.get("completion_tokens", totals.get("output_tokens"))
                self._add(prompt, completion)

    def _add(self, prompt: Any, completion: Any) -> None:
        if isinstance(prompt, int) and isinstance(completion, int):
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.reported = True

    def _model(self, name: Any) -> None:
        if isinstance(name, str) and name and self.model is None:
            self.model = name

    def usage(self) -> Usage | None:
        """Return the tokens counted, or ``None`` when no model reported any."""
        if not self.reported:
            return None
        return Usage(self.prompt_tokens, self.completion_tokens)


@dataclasses.dataclass(slots=True)
class _Outcome(Answer):
    """An answer for the caller's accounting that also carries the runnable's own output."""

    output: Any = None


def _text_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    content = getattr(value, "content", None)
    return content if isinstance(content, str) else None


def _find_secrets(value: Any, found: list[str], seen: set[int], depth: int = 0) -> None:
    """Collect the values of pydantic ``SecretStr`` fields anywhere inside a runnable."""
    if depth > 12 or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        if secret:
            found.append(secret)
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            _find_secrets(getattr(value, name, None), found, seen, depth + 1)
    elif isinstance(value, Mapping):
        for item in value.values():
            _find_secrets(item, found, seen, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _find_secrets(item, found, seen, depth + 1)


def _error_code(exc: Exception) -> str | None:
    """Return a provider error code from an SDK exception (``code``, or inside its body)."""
    code = getattr(exc, "code", None)
    if isinstance(code, str):
        return code
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        error = body.get("error")
        inner: Mapping[str, Any] = error if isinstance(error, Mapping) else body
        for field in ("code", "type"):
            value = inner.get(field)
            if isinstance(value, str):
                return value
    return None


class RunnableStage(LLMCaller):
    """Run a LangChain ``Runnable`` on every row, with the pipeline's limits and retries.

    All arguments but the runnable are keyword-only::

        chain = prompt | ChatOpenAI(model="gpt-4o-mini", max_retries=0) | StrOutputParser()
        stage = RunnableStage(chain, rpm=500, max_retries=4, output_field="summary")

    Args:
        runnable: Any LangChain runnable (chat model, chain, ``RunnableLambda``...).
        input: What the runnable receives: the whole record (``None``, the default), the
            record's field of that name, or a function of the record. A missing field
            dead-letters the row with :class:`~pipeline._errors.MissingFieldError`.
        output: ``"merge"`` emits ``{**record, output_field: result}`` (a non-mapping record
            becomes ``{"value": record, ...}``); ``"value"`` emits the runnable's result alone.
        output_field: Field of the result with ``output="merge"``.
        config: A LangChain ``RunnableConfig`` (tags, metadata, callbacks) for every call.
        stream: Use ``astream`` and assemble the chunks (adding them, as LangChain does);
            text deltas go to ``on_delta`` as they arrive.
        on_delta: Called with ``(envelope, text)`` for each streamed text chunk (sync or
            async); ``envelope.attempts`` tells which attempt a chunk belongs to, since a
            retried stream starts again from the beginning.
        model: Model name used to look up ``prices`` when the model does not report its own.
        api_key_env: An environment variable whose value is redacted too (keys inside the
            runnable's ``SecretStr`` fields are found by themselves).
        concurrency: Fixed calls in flight, or ``None`` to adapt (AIMD) up to
            ``max_concurrency``.
        max_concurrency: Ceiling of the adaptive concurrency.
        rpm: Calls per minute allowed.
        tpm: Tokens per minute allowed (estimated before each call, reconciled after).
        limiter: A shared limiter (e.g. Redis-backed) instead of ``rpm``/``tpm``.
        max_retries: Retries after the first attempt.
        backoff_base: First backoff ceiling in seconds (doubles per retry, full jitter).
        backoff_cap: Largest backoff ceiling in seconds.
        deadline_s: Overall time a row may take, waits and retries included.
        timeout: Seconds one attempt may take before it is abandoned and retried.
        prices: USD per 1M prompt/completion tokens by model: ``{"gpt-4o": (2.5, 10.0)}``.
        budget_usd: Stop reading input once the run has cost this much (needs ``prices``).
        name: Stage name (default ``"runnable"``).
        workers: Rows in flight (default twice the concurrency ceiling).
        buffer: Inbox capacity.
        on_error: What to do with unexpected exceptions (see :data:`pipeline._stage.OnError`).
    """

    def __init__(
        self,
        runnable: Runnable[Any, Any],
        *,
        input: str | Callable[[Any], Any] | None = None,
        output: RunnableOutput = "merge",
        output_field: str = "response",
        config: RunnableConfig | None = None,
        stream: bool = False,
        on_delta: DeltaHook | None = None,
        model: str = "",
        api_key_env: str | None = None,
        concurrency: int | None = None,
        max_concurrency: int = 64,
        rpm: float | None = None,
        tpm: float | None = None,
        limiter: Limiter | None = None,
        max_retries: int = 4,
        backoff_base: float = 0.5,
        backoff_cap: float = 8.0,
        deadline_s: float | None = None,
        timeout: float = 600.0,
        prices: Mapping[str, Price | tuple[float, float]] | None = None,
        budget_usd: float | None = None,
        name: str | None = None,
        workers: int | None = None,
        buffer: int = 16,
        on_error: OnError = "dead_letter",
    ) -> None:
        if not isinstance(runnable, Runnable):
            raise ConfigError(f"RunnableStage needs a LangChain Runnable, not {runnable!r}")
        if output not in ("merge", "value"):
            raise ConfigError(f"output must be 'merge' or 'value', not {output!r}")
        if input is not None and not (isinstance(input, str) or callable(input)):
            raise ConfigError(f"input must be a field name or a function, not {input!r}")
        super().__init__(
            model=model,
            limits=Limits(
                rpm=rpm,
                tpm=tpm,
                limiter=limiter,
                concurrency=concurrency,
                max_concurrency=max_concurrency,
                workers=workers,
                buffer=buffer,
            ),
            retry=Retry(
                max_retries=max_retries,
                backoff_base=backoff_base,
                backoff_cap=backoff_cap,
                deadline_s=deadline_s,
                on_error=on_error,
            ),
            output=Output(field=output_field, prices=prices, budget_usd=budget_usd),
            http=HTTP(api_key_env=api_key_env, timeout=timeout),
            call=self._call,
            name=name or "runnable",
        )
        self.runnable = runnable
        self.input = input
        self.runnable_output: RunnableOutput = output
        self.config: RunnableConfig = config or {}
        self.streaming = stream
        self.delta_hook = on_delta
        found: list[str] = []
        _find_secrets(runnable, found, set())
        self._runnable_secrets = [s for s in dict.fromkeys(found) if len(s) >= 4]

    def __repr__(self) -> str:
        kind = type(self.runnable).__name__
        parts = [f"name={self.name!r}", f"runnable={kind}", f"output={self.runnable_output!r}"]
        shown = (
            ("rpm", self.limits.rpm),
            ("tpm", self.limits.tpm),
            ("concurrency", self.limits.concurrency),
            ("deadline_s", self.retry.deadline_s),
            ("budget_usd", self.output.budget_usd),
        )
        parts += [f"{label}={value!r}" for label, value in shown if value is not None]
        if self.streaming:
            parts.append("stream=True")
        parts += [f"max_retries={self.retry.max_retries}", f"workers={self.workers}"]
        return f"RunnableStage({', '.join(parts)})"

    def secrets(self) -> list[str]:
        """Return the values to redact: the caller's, plus any key inside the runnable."""
        return list(dict.fromkeys([*super().secrets(), *self._runnable_secrets]))

    async def handle(self, env: Envelope[Any], outbox: Outbox[Any]) -> None:
        """Answer one row (remembering its envelope for ``on_delta``)."""
        token = _CURRENT_ENV.set(env)
        try:
            await super().handle(env, outbox)
        finally:
            _CURRENT_ENV.reset(token)

    def _input_of(self, record: Any) -> Any:
        chosen = self.input
        if chosen is None:
            return record
        if isinstance(chosen, str):
            if isinstance(record, Mapping) and chosen in record:
                return record[chosen]
            names = list(record) if isinstance(record, Mapping) else ["value"]
            raise MissingFieldError(chosen, names)
        return chosen(record)

    async def _call(self, record: Any) -> _Outcome:
        """One attempt: the runnable on one row, with its usage collected (the ``call=`` hook)."""
        value = self._input_of(record)
        collector = _UsageCollector()
        config = merge_configs(self.config, {"callbacks": [collector]})
        done = False
        output: Any = None
        try:
            with anyio.move_on_after(self.http.timeout):
                if self.streaming:
                    output = await self._stream(value, config)
                else:
                    output = await self.runnable.ainvoke(value, config)
                done = True
        except Exception as exc:
            refused = self._refusal_of(exc)
            if refused is not None:
                raise refused from exc
            raise
        if not done:
            raise LLMCallError(
                f"the runnable did not answer within {self.http.timeout:g}s", retryable=True
            )
        return _Outcome(
            text=_text_of(output), usage=collector.usage(), model=collector.model, output=output
        )

    async def _stream(self, value: Any, config: RunnableConfig) -> Any:
        env = _CURRENT_ENV.get()
        hook = self.delta_hook
        total: Any = None
        started = False
        async for chunk in self.runnable.astream(value, config):
            text = _text_of(chunk)
            if hook is not None and text and env is not None:
                result = hook(env, text)
                if inspect.isawaitable(result):
                    await result
            if not started:
                total, started = chunk, True
                continue
            try:
                total = total + chunk
            except TypeError:  # chunks that are whole values so far (a JSON parser's)
                total = chunk
        if not started:
            raise LLMCallError("the runnable's stream ended without any output", retryable=True)
        return total

    def _refusal_of(self, exc: Exception) -> Exception | None:
        """Return the job-stopping error an SDK exception means (no quota, rejected key)."""
        status = getattr(exc, "status_code", None)
        code = _error_code(exc)
        if code in QUOTA_CODES:
            return QuotaExhaustedError(
                self._scrub(
                    f"the provider refused for lack of quota or credit ({type(exc).__name__}: "
                    f"{exc}); retrying cannot help: add credit, then resume the job"
                ),
                status=status if isinstance(status, int) else None,
                code=code,
            )
        if status == 401 and not self.run_state.succeeded:
            return AuthenticationError(
                self._scrub(
                    f"the provider rejected the API key on the first requests "
                    f"({type(exc).__name__}: {exc}); stopping rather than failing every row"
                )
            )
        return None

    def value_of(self, env: Envelope[Any], answer: Answer, result: Any, **details: Any) -> Any:
        """Return the runnable's result alone (``output="value"``) or merged into the record."""
        value = result.output if isinstance(result, _Outcome) else result
        merged = super().value_of(env, answer, value, **details)
        return value if self.runnable_output == "value" else merged


# --------------------------------------------------------------------------- PipelineRunnable


class ItemFailedError(ItemError):
    """An input of a :class:`PipelineRunnable` was dead-lettered by the pipeline.

    Attributes:
        failed: The dead-letter record (stage, error type and message, attempts, status).
    """

    def __init__(self, failed: Failed) -> None:
        super().__init__(
            f"input {failed.key} failed in stage {failed.stage!r} after {failed.attempts} "
            f"attempt(s): {failed.error_type}: {failed.message}",
            status=failed.status,
            attempts=failed.attempts,
        )
        self.failed = failed


class _Inputs(Source[Any]):
    """Emits a list of inputs, each keyed by its position."""

    def __init__(self, items: Sequence[Any]) -> None:
        super().__init__(name="langchain-input")
        self.items = items

    def total(self) -> int:
        """Return the number of inputs."""
        return len(self.items)

    async def run(self, inbox: Inbox[None], outbox: Outbox[Any]) -> None:
        """Emit every input with its index as key."""
        for index, item in enumerate(self.items):
            await outbox.emit(item, key=index, origin=f"input[{index}]")


OnOutput = Callable[[int, Any], Awaitable[None]]


class PipelineRunnable(Runnable[Any, Any]):
    """A pipeline as a LangChain ``Runnable``: ``ainvoke``, ``abatch``, ``astream``.

    ::

        enrich = PipelineRunnable(Pipeline(LLMCaller(model="m", prompt="{text}"), tidy))
        chain = prepare | enrich
        rows = await chain.abatch(inputs)  # one pipeline run, results in input order

    The pipeline must not declare a source: inputs come from LangChain. Its dead-letter setting
    is not used: a failed input is raised as :class:`ItemFailedError` (``abatch`` with
    ``return_exceptions=True`` returns it in place). ``max_concurrency`` in the LangChain
    config is not used either: the pipeline's own limits govern.

    Stages such as :class:`~stages.llm._caller.LLMCaller` serve one run at a time, so concurrent
    calls on the same pipeline take turns; pass a factory (``lambda: Pipeline(...)``, sharing
    a limiter if the calls should share a rate limit) to let concurrent calls run at once,
    or send them together through ``abatch``.

    Args:
        pipeline: The pipeline, or a function returning a new one for each call.
        many: Return every output of an input as a list (for 1:n pipelines). Otherwise an input
            gives its one output, ``None`` when a filter dropped it, and more than one output is
            an error.
        name: The runnable's name in LangChain traces.
    """

    def __init__(
        self,
        pipeline: Pipeline | Callable[[], Pipeline],
        *,
        many: bool = False,
        name: str | None = None,
    ) -> None:
        if isinstance(pipeline, Pipeline):
            _check_no_source(pipeline)
            self._pipeline: Pipeline | None = pipeline
            self._factory: Callable[[], Pipeline] | None = None
        elif callable(pipeline):
            self._pipeline, self._factory = None, pipeline
        else:
            raise ConfigError(f"PipelineRunnable needs a Pipeline or a factory, not {pipeline!r}")
        self.many = many
        self.name = name or (pipeline.name if isinstance(pipeline, Pipeline) else "pipeline")
        self._turns: RunVar[anyio.Lock] = RunVar(f"pipeline-runnable-{id(self)}")

    def __repr__(self) -> str:
        shown = repr(self._pipeline) if self._pipeline is not None else repr(self._factory)
        return f"PipelineRunnable({shown}, many={self.many})"

    # -- running ------------------------------------------------------------------------------

    def _make(self) -> Pipeline:
        if self._pipeline is not None:
            return self._pipeline
        assert self._factory is not None
        made = self._factory()
        if not isinstance(made, Pipeline):
            raise ConfigError(f"the pipeline factory returned {made!r}, not a Pipeline")
        _check_no_source(made)
        return made

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        if self._pipeline is None:  # a fresh pipeline per call: no need to take turns
            yield
            return
        lock = self._turns.get(None)
        if lock is None:
            lock = anyio.Lock()
            self._turns.set(lock)
        async with lock:
            yield

    async def _run(
        self, inputs: Sequence[Any], on_output: OnOutput | None = None
    ) -> tuple[list[list[Any]], dict[int, Failed]]:
        """Run the inputs through the pipeline; return outputs and failures by input index."""
        outputs: list[list[Any]] = [[] for _ in inputs]
        async with self._turn():
            declared = self._make()
            run = Pipeline(
                _Inputs(inputs),
                *declared.stages,
                ordered=declared.ordered,
                window=declared.window,
                name=declared.name,
                tracing=declared.tracing,
                metrics=declared.metrics,
                metrics_interval=declared.metrics_interval,
            )
            async with run.open() as results:
                async for env in results.envelopes():
                    index = _index_of(env.key, len(inputs))
                    outputs[index].append(env.value)
                    if on_output is not None:
                        await on_output(index, env.value)
        failures = {_index_of(f.key, len(inputs)): f for f in results.failures}
        return outputs, failures

    def _result(self, index: int, outputs: list[list[Any]], failures: dict[int, Failed]) -> Any:
        failed = failures.get(index)
        if failed is not None:
            raise ItemFailedError(failed)
        got = outputs[index]
        if self.many:
            return got
        if len(got) > 1:
            raise ConfigError(
                f"input {index} gave {len(got)} outputs; use PipelineRunnable(..., many=True) "
                "for a pipeline that turns one input into several"
            )
        return got[0] if got else None

    # -- the Runnable interface ---------------------------------------------------------------

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Run one input from synchronous code (outside any event loop)."""
        return _run_sync(self.ainvoke(input, config, **kwargs))

    def batch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any | None,
    ) -> list[Any]:
        """Run a batch from synchronous code: one pipeline run for all inputs."""
        return _run_sync(self.abatch(inputs, config, return_exceptions=return_exceptions, **kwargs))

    async def ainvoke(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run one input through the pipeline and return its output."""

        async def one(value: Any) -> Any:
            outputs, failures = await self._run([value])
            return self._result(0, outputs, failures)

        return await self._acall_with_config(one, input, config)

    async def abatch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any | None,
    ) -> list[Any]:
        """Run all inputs through one pipeline run; outputs come back in input order."""
        if not inputs:
            return []

        async def many(values: list[Any]) -> list[Any]:
            outputs, failures = await self._run(values)
            answers: list[Any] = []
            for index in range(len(values)):
                try:
                    answers.append(self._result(index, outputs, failures))
                except (ItemFailedError, ConfigError) as error:
                    answers.append(error)
            return answers

        return await self._abatch_with_config(
            many, list(inputs), config, return_exceptions=return_exceptions
        )

    async def astream(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        **kwargs: Any | None,
    ) -> AsyncIterator[Any]:
        """Yield the outputs of one input as the pipeline produces them."""

        async def once() -> AsyncIterator[Any]:
            yield input

        async for value in self._atransform_stream_with_config(once(), self._transform, config):
            yield value

    async def _transform(self, chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
        value: Any = None
        first = True
        async for chunk in chunks:
            if first:
                value, first = chunk, False
                continue
            try:
                value = value + chunk
            except TypeError:
                value = chunk
        # LangChain may resume this generator from a different task at each step, so the run
        # (and its task group) lives in one task of its own, joined before this one ends.
        send, recv = anyio.create_memory_object_stream[Any](16)

        async def produce() -> None:
            async def forward(index: int, output: Any) -> None:
                await send.send(output)

            with send:
                outputs, failures = await self._run([value], forward)
                self._result(0, outputs, failures)  # raises for a failed input

        task = asyncio.ensure_future(produce())
        try:
            with recv:
                async for output in recv:
                    yield output
            await task
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait([task])
            if not task.cancelled():
                task.exception()  # retrieved: an early exit does not log a lost error


def _check_no_source(pipeline: Pipeline) -> None:
    if pipeline.stages and pipeline.stages[0].is_source:
        raise ConfigError(
            f"pipeline {pipeline.name!r} declares a source ({pipeline.stages[0].name!r}); "
            "a PipelineRunnable takes its inputs from LangChain"
        )


def _index_of(key: Any, count: int) -> int:
    if isinstance(key, int) and 0 <= key < count:
        return key
    raise ConfigError(f"a stage changed an item's key to {key!r}; cannot match it to its input")


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise ConfigError(
        "the synchronous invoke()/batch() was called inside a running event loop; "
        "use `await ainvoke()` / `await abatch()`"
    )
