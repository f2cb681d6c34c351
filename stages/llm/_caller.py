"""The LLM caller: one stage that sends each row to a chat or embeddings API, and never loses it.

:class:`LLMCaller` turns a record into a request (a template over its fields),
sends it over one pooled aiohttp session per run, and emits the answer merged into the record
(or as a :class:`~stages.llm._output.Completion`). Around every request it applies, in order:

1. the response cache (a hit sends nothing);
2. the rate limiter (``acquire(estimated tokens)``, reconciled with the real usage after);
3. a concurrency slot, held only for the HTTP attempt itself: a row waiting for its retry
   backoff or for the rate limiter holds no slot;
4. the retry policy (tenacity): exponential backoff with full jitter and a cap, ``1 +
   max_retries`` attempts, the row's overall deadline, ``Retry-After`` and ``x-should-retry``.

What each kind of failure means (retried, dead-lettered, or the run stopped) is the table
"Retries and faults" in ``docs/caller.md``; :mod:`stages.llm._retry` decides it.

The API key is read from the environment when the run starts, sent only in the provider's
auth header, returned by :meth:`LLMCaller.secrets` so the runtime redacts it everywhere, and
scrubbed from every message this module builds.

Design: the caller is given its parts, each an object in its own module, and only wires them
(the table of parts is in ``docs/architecture.md``, step 5).

The options are frozen keyword-only dataclasses, validated when built; the objects that live
for one run (the session, the limiter's state, the seats, the cost ledger) are made in
:meth:`LLMCaller.lifespan` and dropped after it, so one caller can run again.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import anyio

from pipeline._envelope import Envelope
from pipeline._errors import ConfigError, FatalError, MissingFieldError, NotStartedError
from pipeline._errors import QuotaExhaustedError as QuotaExhaustedError
from pipeline._stage import Inbox, ItemStage, Outbox
from stages._batch import split_batch
from stages.llm._admission import CURRENT_SEAT, Admission, Limits, Seat
from stages.llm._budget import BudgetReachedError, answer_reserve
from stages.llm._cache import ResponseCache
from stages.llm._errors import (
    AuthenticationError,
    DeadlineExceededError,
    InvalidOutputError,
    LLMCallError,
)
from stages.llm._exchange import Exchange, key_problem
from stages.llm._limits import Limiter
from stages.llm._output import (
    CallerTotals,
    Completion,
    Ledger,
    Output,
    OutputForm,
    Price,
    answer_of,
    reask_messages,
    short,
)
from stages.llm._prompt import (
    chat_messages,
    chat_parts,
    embedding_text,
    one_message_payload,
    prompt_text,
    structured_params,
)
from stages.llm._providers import (
    SENSITIVE_HEADERS,
    Answer,
    Endpoint,
    Provider,
    ProviderName,
    provider_for,
)
from stages.llm._retry import Retry
from stages.llm._router import ANSWERED_BY, Router, routed_model, stamp_route
from stages.llm._routing import Routing
from stages.llm._template import PromptTemplate
from stages.llm._transport import HTTP, HTTPTransport

CallHook: TypeAlias = Callable[[Any], Awaitable[Any]]

_perf = time.perf_counter
_REDACTED = "***"


class LLMCaller(ItemStage[Any, Any]):
    """Send each row to an LLM API (chat or embeddings) with limits, retries and accounting.

    All arguments are keyword-only. The most used::

        LLMCaller(model="gpt-4o-mini", prompt="Say hello to {name}", rpm=500)

    and the rarer ones are grouped by the part they configure: ``limits=Limits(tpm=...)``,
    ``retry=Retry(deadline_s=...)``, ``output=Output(schema=...)``, ``http=HTTP(timeout=...)``.

    Args:
        model: Model name (Azure: the deployment name unless the provider names one).
        prompt: A :class:`~stages.llm._template.PromptTemplate` (or its text) over the record's
            fields, ``"Hello {name}"``; checked against a run's first record before anything is
            sent; a later record lacking a field or null in one is dead-lettered. Without one a
            record is the prompt (a string), or a mapping with ``"messages"`` or ``"prompt"``.
        system: System prompt (literal text, not a template).
        params: Extra body fields (``temperature``, ``max_tokens``, ``response_format``...).
        endpoint: ``"chat"`` or ``"embeddings"`` (embeddings take batches from a Batcher).
        provider: ``"openai"`` (any OpenAI-compatible server), ``"azure"`` or ``"anthropic"``,
            or a :class:`~stages.llm._providers.Provider` object (e.g. an
            ``AzureProvider(url, deployment=..., api_version=...)``), or a
            :class:`~stages.llm._routing.Routing` over several endpoints (keys, deployments,
            models), each with its own provider, URL, key and limits, with failover and
            fallback models (see :mod:`stages.llm._router`); ``model`` then names the
            endpoints' model (default: the first endpoint's).
        base_url: API root for a provider given by name; default ``$OPENAI_BASE_URL``
            (``$ANTHROPIC_BASE_URL``, ``$AZURE_OPENAI_ENDPOINT``) else the provider's public
            URL. LightOn Paradigm: ``https://paradigm.lighton.ai/api/v2``.
        rpm: Requests per minute allowed: a shortcut for ``limits=Limits(rpm=...)``.
        limits: Rate and concurrency limits (:class:`~stages.llm._admission.Limits`).
        retry: The retry policy (:class:`~stages.llm._retry.Retry`).
        output: ``"merge"`` emits ``{**record, "response": answer}``; ``"completion"`` emits a
            :class:`~stages.llm._output.Completion`; an :class:`~stages.llm._output.Output`
            also sets streaming, JSON checks, re-asks, prices and budget.
        http: How requests travel (:class:`~stages.llm._transport.HTTP`: key variable,
            headers, timeouts, response cache).
        call: Escape hatch: ``async def call(record) -> result`` replaces the HTTP request and
            gets the same limiter, concurrency, retries, deadline and accounting. A returned
            string is the answer text; an object with ``usage`` is counted.
        name: Stage name (default ``"llm"``).

    Raises:
        ConfigError: The options do not make a valid caller (the message says which).
    """

    def __init__(
        self,
        *,
        model: str = "",
        prompt: str | PromptTemplate | None = None,
        system: str | None = None,
        params: Mapping[str, Any] | None = None,
        endpoint: Endpoint = "chat",
        provider: ProviderName | Provider | Routing = "openai",
        base_url: str | None = None,
        rpm: float | None = None,
        limits: Limits | None = None,
        retry: Retry | None = None,
        output: OutputForm | Output = "merge",
        http: HTTP | None = None,
        call: CallHook | None = None,
        name: str | None = None,
    ) -> None:
        routing: Routing | None = None
        if isinstance(provider, Routing):
            routing, provider = provider, "openai"  # each endpoint has its own provider
            model = routed_model(routing, model, base_url, rpm, call)
        if call is None and not model:
            raise ConfigError("LLMCaller needs model= (or call= for a custom caller)")
        if endpoint not in ("chat", "embeddings"):
            raise ConfigError(f"endpoint must be 'chat' or 'embeddings', not {endpoint!r}")
        limits = limits or Limits()
        if rpm is not None:
            if limits.rpm is not None:
                raise ConfigError("rpm= is given twice: as a keyword and in limits=")
            limits = dataclasses.replace(limits, rpm=rpm)
        self.output = Output.of(output)
        self.provider = None if call is not None else provider_for(provider, base_url)
        if self.provider is not None and endpoint == "embeddings":
            if not self.provider.supports_embeddings:
                raise ConfigError(f"provider {self.provider.name!r} has no embeddings endpoint")
            if self.output.stream:
                raise ConfigError("stream=True applies to chat, not embeddings")
        ceiling = limits.ceiling
        retry = retry or Retry()
        super().__init__(
            name=name or "llm",
            workers=limits.workers or 2 * ceiling,
            buffer=max(16, ceiling) if limits.buffer is None else limits.buffer,
            on_error=retry.on_error,
        )
        self.model = model
        self.template = PromptTemplate(prompt) if isinstance(prompt, str) else prompt
        self._first_checked = False
        self._traced = True  # whether the run records a span per row (set as it starts)
        self._one_message = False  # whether rows may go as one unchecked message (ditto)
        self.system = system
        self.params = dict(params or {})
        if self.provider is not None and endpoint == "chat" and routing is None:
            self.params = structured_params(
                self.provider, self.output, self.template, system, self.params
            )
        self.endpoint: Endpoint = endpoint
        self.provider_name: ProviderName = provider if isinstance(provider, str) else provider.name
        # The limiter object moves out of the options: it is the caller's part from now on,
        # which engines replace per run or per actor (options stay plain, picklable values).
        self.limiter: Limiter | None = limits.limiter
        self.limits = dataclasses.replace(limits, limiter=None)
        self.retry = retry
        self.http = http or HTTP()
        self.call = call
        self.routing = routing
        self.router: Router | None = None
        self.totals = CallerTotals()
        self._run: Exchange | None = None

    @property
    def cache(self) -> ResponseCache | None:
        """The response cache (``http.cache``), or ``None``."""
        return self.http.cache

    def __repr__(self) -> str:
        parts = [f"name={self.name!r}"]
        if self.call is not None:
            parts.append(f"call={getattr(self.call, '__qualname__', self.call)!s}")
        else:
            routes = self.routing
            names = f"Routing({[d.label() for d in routes.endpoints]})" if routes else None
            parts += [f"model={self.model!r}", f"provider={names or repr(self.provider_name)}"]
            parts.append(f"endpoint={self.endpoint!r}")
            if self.provider is not None and routes is None:
                parts.append(f"base_url={self.provider.base_url!r}")
        if self.template is not None:
            parts.append(f"prompt={short(self.template.text, 60)!r}")
        shown = (
            ("stream", self.output.stream), ("concurrency", self.limits.concurrency),
            ("rpm", self.limits.rpm), ("tpm", self.limits.tpm),
            ("deadline_s", self.retry.deadline_s), ("budget_usd", self.output.budget_usd),
        )  # fmt: skip
        parts += [f"{label}={value!r}" for label, value in shown if value not in (None, False)]
        if self.http.headers:
            parts.append(f"headers=[{', '.join(sorted(self.http.headers))}]")  # names only
        parts.append(f"max_retries={self.retry.max_retries}")
        parts.append(f"workers={self.workers}")
        return f"LLMCaller({', '.join(parts)})"

    # -- secrets -------------------------------------------------------------------------------

    def key_env(self) -> str | None:
        """Return the environment variable the API key is read from, if any."""
        if self.http.api_key_env is not None:
            return self.http.api_key_env
        return None if self.provider is None else self.provider.key_env

    def check_key(self) -> None:
        """Raise :class:`ConfigError` without an API key where one is needed (``key_problem``)."""
        if self.call is None and self.provider is not None and self.routing is None:
            problem = key_problem(self.provider, self.http, self.key_env())
            if problem is not None:
                raise ConfigError(f"stage {self.name!r}: {problem}")

    def secrets(self) -> list[str]:
        """Return the values the runtime must redact from messages, logs and records."""
        found: list[str] = []
        if self._run is not None and self._run.key:
            found.append(self._run.key)
        if self.router is not None:
            found += self.router.keys
        env = self.key_env()
        if env and os.environ.get(env):
            found.append(os.environ[env])
        headers = self.http.headers
        found += [v for k, v in headers.items() if k.lower() in SENSITIVE_HEADERS and v]
        # "Bearer <key>" headers: the key alone too
        found += [v.split(None, 1)[1] for v in list(found) if v.lower().startswith("bearer ")]
        return [s for s in dict.fromkeys(found) if s]

    def _scrub(self, text: str) -> str:
        for secret in self.secrets():
            if len(secret) >= 4 and secret in text:
                text = text.replace(secret, _REDACTED)
        return text

    # -- lifespan ------------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Read the key, open the HTTP session and the limits for this run; close them after."""
        if self._run is not None:
            raise ConfigError(f"stage {self.name!r} is already running in another pipeline")
        self.check_key()
        key: str | None = None
        env = self.key_env()
        if self.call is None and env and self.routing is None:
            key = os.environ.get(env) or None
        self.totals = totals = CallerTotals()
        self._first_checked = False
        admission = Admission(self.limits, self.limiter, totals, answer_reserve(self))
        transport: HTTPTransport | None = None
        provider = self.provider
        if provider is not None:
            headers = {**provider.base_headers(), **self.http.headers}
            headers.update(provider.auth_headers(key))
            transport = HTTPTransport(
                self.http,
                headers,
                max_connections=self.limits.ceiling,
                stream=self.output.stream,
                scrub=self._scrub,
            )
        run = Exchange(
            key=key,
            admission=admission,
            transport=transport,
            ledger=Ledger(self.output, self.model, self.name, self.log, totals),
            provider=provider,
            endpoint=self.endpoint,
            retry=self.retry,
            output=self.output,
            cache=self.http.cache,
            totals=totals,
            log=self.log,
            scrub=self._scrub,
            key_env=env,
        )
        if provider is not None:
            run.chat_url = provider.url("chat", self.model)
            run.chat_parts = self._chat_parts()
        router = self._open_router(run) if self.routing is not None else None
        self._run = run
        try:
            yield
        finally:
            self._run = None
            if transport is not None:
                await transport.aclose()
            if router is not None:
                await router.aclose()

    def _open_router(self, run: Exchange) -> Router:
        """Make the run's router: one exchange per endpoint, sharing the ledger and totals."""
        assert self.routing is not None
        self.router = Router(
            self.routing, model=self.model, endpoint=self.endpoint, limits=self.limits,
            http=self.http, output=self.output, retry=self.retry, run=run,
            log=self.log, scrub=self._scrub, environ=os.environ,
        )  # fmt: skip
        run.chat_parts = None  # each endpoint gets its own body (its model, its provider)
        return self.router

    def _chat_parts(self) -> tuple[str, str] | None:
        """The pre-encoded body parts of a one-message chat request (see ``_prompt``).

        ``None`` for embeddings, a custom ``call``, or with a cache (its key needs the body).
        """
        if self.provider is None or self.endpoint != "chat" or self.http.cache is not None:
            return None
        return chat_parts(self.provider, self.model, self.system, self.params, self.output.stream)

    def check_first(self, record: Any) -> None:
        """Check the template against the run's first record (a field it lacks fails all rows).

        Raises:
            FatalError: The first record lacks a field the template names.
        """
        self._first_checked = True
        if self.template is not None and self.call is None:
            try:
                self.template.check(record if isinstance(record, Mapping) else {"value": record})
            except ConfigError as error:
                raise FatalError(f"stage {self.name!r}: {error} (on the first row)") from None

    @property
    def run_state(self) -> Exchange:
        """The state of the current run (only valid inside the stage's lifespan)."""
        if self._run is None:
            raise ConfigError(f"stage {self.name!r} is not running (use it in a Pipeline)")
        return self._run

    # -- handling rows -------------------------------------------------------------------------

    async def run(self, inbox: Inbox[Any], outbox: Outbox[Any]) -> None:
        """Handle rows one at a time, like :meth:`ItemStage.run`, taking a seat first.

        A worker takes a new row only with a seat; there are as many seats as the concurrency
        limit (:class:`~stages.llm._admission.Seats`): spare workers wait for one without
        touching the inbox, and get one while a row waits to be retried or when the adaptive
        limit grows. So each row finds a request slot free instead of queueing for one.
        """
        seats = self.run_state.admission.seats
        concurrency = seats.concurrency
        seat = Seat(seats)
        token = CURRENT_SEAT.set(seat)
        stats = outbox.stats
        handle, answer_row = self.handle, self._answer_row
        traced = self._traced = outbox.tracing_enabled
        one_message = self.router is None and self.output.validator is None
        self._one_message = one_message and self.run_state.chat_parts is not None
        plain = type(self).handle is LLMCaller.handle  # else a subclass handles rows its way
        try:
            while True:
                taken, limit = seats.taken, concurrency.limit
                if seat.held and (taken > limit or (taken < limit and seats.waiting)):
                    seats.rebalance(seat)  # the adaptive limit moved since the last row
                if not seat.held:
                    await seat.take()
                try:
                    env = await inbox.receive()
                except anyio.EndOfStream:
                    return
                started = _perf()
                try:
                    if traced:
                        with outbox.span(env):
                            await handle(env, outbox)
                    elif plain and env.members is None:  # handle(), one call less per row
                        try:
                            value = await answer_row(env, outbox)
                        except FatalError as error:
                            await self._fatal(error)
                            raise
                        await outbox.send(env.replace(value))
                    else:
                        await handle(env, outbox)
                except (BudgetReachedError, NotStartedError):
                    self.run_state.ledger.leave_unsent(env, outbox)
                except Exception as error:  # cancellation is BaseException: never caught here
                    await outbox.handle_error(env, error)
                stats.busy_s += _perf() - started
        finally:
            seat.give_up()
            CURRENT_SEAT.reset(token)

    async def handle(self, env: Envelope[Any], outbox: Outbox[Any]) -> None:
        """Answer one row, or every member of a batch envelope."""
        try:
            if env.members is None:
                value = await self._answer_row(env, outbox)
                await outbox.send(env.replace(value))
            elif self.endpoint == "embeddings" and self.call is None:
                await self._embed_batch(env, outbox)
            else:
                await self._each_member(env, outbox)
        except FatalError as error:
            await self._fatal(error)
            raise

    async def _fatal(self, error: FatalError) -> None:
        """Record the error stopping the run (the caller re-raises it), unless one already is."""
        run = self._run
        if run is not None:
            admission = run.admission
            if admission.fatal is not None and admission.fatal is not error:
                # Another worker already stopped the job for the same reason (requests in
                # flight together all see the rejected key or the empty account): one error
                # is enough. The run's task group is cancelling this worker.
                await anyio.sleep_forever()
            admission.fatal = error

    async def _each_member(self, env: Envelope[Any], outbox: Outbox[Any]) -> None:
        """Answer the members of a batch concurrently, each failing on its own."""
        fatal: list[BaseException] = []

        async def one(member: Envelope[Any]) -> None:
            try:
                value = await self._answer_row(member, outbox)
            except (BudgetReachedError, NotStartedError):
                self.run_state.ledger.leave_unsent(member, outbox)
                return
            except Exception as error:
                if self.should_dead_letter(error):
                    await outbox.handle_error(member, error)
                else:
                    fatal.append(error)
                    tg.cancel_scope.cancel()
                return
            await outbox.send(member.replace(value))

        assert env.members is not None
        async with anyio.create_task_group() as tg:
            for member in env.members:
                tg.start_soon(one, member)
        if fatal:
            raise fatal[0]

    async def _answer_row(self, env: Envelope[Any], outbox: Outbox[Any]) -> Any:
        """Return the output value for one row (merge or Completion)."""
        started = _perf()
        deadline_s = self.retry.deadline_s  # what Retry.deadline() returns, one call less
        deadline = None if deadline_s is None else started + deadline_s
        checked = self.output.validator is not None
        if not self._first_checked:
            self.check_first(env.value)
        if self.call is not None:
            answer, parsed, cost, raw = await self._via_call(env, outbox, deadline)
            result = parsed if checked else raw
            return self.value_of(env, answer, result, started=started, cost=cost, parsed=parsed)
        if self.endpoint == "embeddings":
            text = embedding_text(self.template, env.value)
            answer, cost, cached = await self._embed(env, outbox, [text], deadline)
            vector = answer.embeddings[0] if answer.embeddings else None
            return self.value_of(
                env, answer, vector, started=started, cost=cost, cached=cached, vector=vector
            )
        one = prompt_text(self.template, env.value) if self._one_message else None
        if one is not None:  # what _chat() does for one message, unchecked: one call less
            run = self.run_state
            assert run.chat_parts is not None
            payload = one_message_payload(run.chat_parts, one)
            answer, cost, cached = await run.request(
                env, outbox, run.chat_url, None, 1, deadline, payload
            )
            parsed = None
        else:
            answer, parsed, cost, cached = await self._chat(env, outbox, deadline)
        result = parsed if checked else answer.text
        return self.value_of(
            env, answer, result, started=started, cost=cost, cached=cached, parsed=parsed
        )

    def value_of(
        self,
        env: Envelope[Any],
        answer: Answer,
        result: Any,
        *,
        started: float,
        cost: float = 0.0,
        cached: bool = False,
        vector: list[float] | None = None,
        parsed: Any = None,
    ) -> Any:
        """Return what is sent on for a row (see :meth:`~stages.llm._output.Output.emit`).

        Subclasses reshape it here (a LangChain stage can emit the runnable's result alone).
        With routing, the endpoint and the model that answered are recorded in it.
        """
        value = self.output.emit(
            env,
            answer,
            result,
            started=started,
            now=_perf(),
            cost=cost,
            cached=cached,
            vector=vector,
            parsed=parsed,
            traced=self._traced,
        )
        if self.routing is None:
            return value
        return stamp_route(value, self.output, answer, ANSWERED_BY.get())

    # -- chat ----------------------------------------------------------------------------------

    async def _chat(
        self, env: Envelope[Any], outbox: Outbox[Any], deadline: float | None
    ) -> tuple[Answer, Any, float, bool]:
        """Return ``(answer, parsed, cost, cached)`` for a chat row, re-asking invalid JSON."""
        run = self.run_state
        provider = self.provider
        assert provider is not None
        validator = self.output.validator
        reask = self.output.reask
        messages: list[dict[str, Any]] | None = None
        parts = run.chat_parts
        text = prompt_text(self.template, env.value) if parts is not None else None
        if text is None:
            messages = chat_messages(self.template, env.value)
        total_cost = 0.0
        any_cached = False
        for round_ in range(reask + 1):
            if self.router is not None:
                assert messages is not None
                answer, cost, cached = await self.router.chat(
                    env, outbox, messages, self.system, self.params, deadline
                )
            elif messages is None:
                assert text is not None and parts is not None
                payload = one_message_payload(parts, text)
                answer, cost, cached = await run.request(
                    env, outbox, run.chat_url, None, 1, deadline, payload
                )
            else:
                body = provider.chat_body(
                    self.model, messages, self.system, self.params, self.output.stream
                )
                answer, cost, cached = await run.request(
                    env, outbox, run.chat_url, body, 1, deadline
                )
            total_cost += cost
            any_cached = any_cached or cached
            if validator is None:
                return answer, None, total_cost, any_cached
            try:
                return answer, validator(answer.text), total_cost, any_cached
            except ValueError as exc:
                problem = str(exc)
            if round_ == reask:
                raise InvalidOutputError(
                    self._scrub(f"invalid JSON output after {reask} re-ask(s): {problem}"),
                    attempts=env.attempts,
                )
            self.totals.reasks += 1
            if messages is None:
                messages = [{"role": "user", "content": text}]
            messages = reask_messages(messages, answer.text, problem)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- embeddings ----------------------------------------------------------------------------

    async def _embed(
        self, env: Envelope[Any], outbox: Outbox[Any], texts: list[str], deadline: float | None
    ) -> tuple[Answer, float, bool]:
        if self.router is not None:
            return await self.router.embed(env, outbox, texts, self.params, deadline)
        assert self.provider is not None
        url = self.provider.url("embeddings", self.model)
        body = self.provider.embeddings_body(self.model, texts, self.params)
        return await self.run_state.request(env, outbox, url, body, len(texts), deadline)

    async def _embed_batch(self, env: Envelope[Any], outbox: Outbox[Any]) -> None:
        """One request for a whole batch; vectors go back to the members in order."""
        assert env.members is not None
        started = _perf()
        deadline = self.retry.deadline(started)
        good: list[Envelope[Any]] = []
        texts: list[str] = []
        if not self._first_checked and env.members:
            self.check_first(env.members[0].value)
        for member in env.members:
            try:
                texts.append(embedding_text(self.template, member.value))
            except MissingFieldError as error:
                await outbox.fail(member, error)
                continue
            good.append(member)
        if not good:
            return
        batch = Envelope(
            [m.value for m in good],
            env.seq,
            env.key,
            env.origin,
            env.context,
            env.attempts,
            good,
            env.meta,
        )
        try:
            answer, cost, cached = await self._embed(batch, outbox, texts, deadline)
        except Exception as error:
            await outbox.handle_error(batch, error)
            return
        vectors = answer.embeddings or []
        share = cost / len(good)
        values = []
        for member, vector in zip(good, vectors, strict=True):
            member.attempts = batch.attempts
            single = dataclasses.replace(answer, usage=None, embeddings=[vector])
            values.append(
                self.value_of(
                    member,
                    single,
                    vector,
                    started=started,
                    cost=share,
                    cached=cached,
                    vector=vector,
                )
            )
        for out in split_batch(batch, values):
            await outbox.send(out)

    # -- the escape hatch ----------------------------------------------------------------------

    async def _via_call(
        self, env: Envelope[Any], outbox: Outbox[Any], deadline: float | None
    ) -> tuple[Answer, Any, float, Any]:
        """Return ``(answer, parsed, cost, raw result)`` from the user's ``call``."""
        assert self.call is not None
        run = self.run_state
        raw, estimate = await run.call(env, outbox, self.call, deadline)
        answer = answer_of(raw)
        cost = run.account(outbox, answer, estimate)
        parsed = None
        if self.output.validator is not None:
            parsed = self.output.check(answer, env.attempts, self._scrub)
        return answer, parsed, cost, raw


__all__ = [
    "HTTP",
    "AuthenticationError",
    "CallerTotals",
    "Completion",
    "DeadlineExceededError",
    "InvalidOutputError",
    "LLMCallError",
    "LLMCaller",
    "Limits",
    "Output",
    "Price",
    "Retry",
]
