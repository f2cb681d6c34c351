"""Routing one caller's requests over several endpoints: choose, fail over, fall back.

The caller (:mod:`stages.llm._caller`) makes a :class:`Router` when a run starts if it was
given ``provider=Routing(...)`` (:mod:`stages.llm._routing`). The router holds one
:class:`Lane` per endpoint: an :class:`~stages.llm._exchange.Exchange` of its own (its key,
HTTP session, provider, and an :class:`~stages.llm._admission.Admission` with its own limiter,
configured and learned from its own headers, or the shared limiter it was given), its health
and its figures. Every request of a row goes through :meth:`Router.request`:

1. the response cache, keyed by the *model served* and the request's content, never by the
   endpoint: a row answered once is found again whichever endpoint answered it (and on
   resume, whichever model of the fallback chain did);
2. for each model of the row's chain (the caller's model, then ``fallbacks``): attempts
   under the caller's retry policy, each sent to the endpoint :meth:`Router.pick` chooses;
3. a row whose attempts on a model fail (after the retries, or at once when the request is
   over the model's context window, or when no endpoint of the model is left) goes on to the
   next model of the chain; the answer records the endpoint and the model that answered.

Choosing (:meth:`Router.pick`), among the endpoints of the model that are up:

* ``headroom`` (default): the one where a request waits least: fewest requests pending
  (waiting for its limiter, its slot or an answer) per request per second of its quota
  (configured, else learned from its headers), times its ``weight``. Requests thus spread
  in proportion to the quotas and a job runs near their sum.
* ``cheapest``: the cheapest endpoint that has a free slot and no queue; the next cheapest
  when it has none; the ``headroom`` choice when none is free.

An attempt's next try avoids the endpoints that already failed it, while others are up.

Failing over (:meth:`Lane.failed`):

==================================  ===========================================================
5xx, 529, connection error,         counted; after ``failures`` in a row the endpoint cools down
timeout                             (``cooldown_s``, doubling up to ``max_cooldown_s``), then one
                                    request probes it: an answer brings it back, a failure cools
                                    it down again for twice as long
401, 403, ``insufficient_quota``    the endpoint is out for the rest of the run, said once in
and the other money codes; 404,     the log; its rows in flight go to the others
405 (no such model or path there)   (:meth:`Router.retire`)
every endpoint out                  :class:`NoEndpointLeftError` stops the run, naming why
                                    each went
==================================  ===========================================================

429s stay with the endpoint's limiter (a quota 429 pauses that endpoint only).
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio

from pipeline._envelope import Envelope
from pipeline._errors import ConfigError, FatalError
from pipeline._stage import Outbox
from stages.llm._admission import Admission, Limits
from stages.llm._cache import ResponseCache, request_key
from stages.llm._errors import LLMCallError
from stages.llm._exchange import RESERVED, Exchange, usable_answer
from stages.llm._lane import Lane, falls_back
from stages.llm._output import CallerTotals, Completion, Ledger, Output
from stages.llm._providers import Answer, Endpoint
from stages.llm._retry import Retry
from stages.llm._routing import Deployment, Routing
from stages.llm._transport import HTTP, HTTPTransport, encode_body

log = logging.getLogger("pipeline.routing")

_perf = time.perf_counter

BuildBody = Callable[[Exchange, str], dict[str, Any]]
"""Makes the request body for one endpoint: ``build(exchange, model) -> body``."""


OUT_STATUSES = frozenset({401, 403, 404, 405})
"""Statuses that take an endpoint out for the run: its key rejected, its URL or model wrong."""


class NoEndpointLeftError(FatalError):
    """Every endpoint of a routed caller is out (keys rejected, no money): the run stops."""


class Router:
    """One run's endpoints, and the path of each routed request.

    Args:
        routing: The routing options.
        model: The caller's model (the first of each row's chain).
        endpoint: ``"chat"`` or ``"embeddings"``.
        limits: The caller's limits (concurrency, burst); each endpoint's rates are its own.
        http: The caller's HTTP options (timeouts, extra headers, cache).
        output: The caller's output options.
        retry: The retry policy.
        run: The caller's own exchange for the run: its ledger (tokens, cost, the budget) and
            counters are shared by every endpoint.
        log: The stage's logger.
        scrub: Removes secrets from the text of errors.
        environ: Where the keys are read from.
    """

    def __init__(
        self,
        routing: Routing,
        *,
        model: str,
        endpoint: Endpoint,
        limits: Limits,
        http: HTTP,
        output: Output,
        retry: Retry,
        run: Exchange,
        log: logging.Logger | logging.LoggerAdapter[Any],
        scrub: Callable[[str], str],
        environ: Mapping[str, str],
    ) -> None:
        ledger, totals = run.ledger, run.totals
        completion_default = run.admission.completion_default
        self.routing = routing
        self.chain = routing.chain(model)
        self.endpoint = endpoint
        self.retry = retry
        self.output = output
        self.ledger = ledger
        self.totals = totals
        self.cache: ResponseCache | None = http.cache
        self.log = log
        self.scrub = scrub
        self.fallbacks = 0
        self.changed = anyio.Event()  # set when an endpoint's health changes
        self.lanes: list[Lane] = []
        for deployment in routing.endpoints:
            self.lanes.append(
                self._lane(
                    deployment, limits, http, output, completion_default, environ, ledger, totals
                )
            )

    def _lane(
        self,
        deployment: Deployment,
        limits: Limits,
        http: HTTP,
        output: Output,
        completion_default: int | None,
        environ: Mapping[str, str],
        ledger: Ledger,
        totals: CallerTotals,
    ) -> Lane:
        provider = deployment.make_provider()
        key_env = deployment.key_env()
        key = environ.get(key_env) or None
        if key is None and deployment.api_key_env is not None:
            raise FatalError(
                f"endpoint {deployment.label()!r}: environment variable ${key_env} is not set"
            )
        lane_limits = dataclasses.replace(
            limits,
            rpm=deployment.rpm,
            tpm=deployment.tpm,
            itpm=deployment.itpm,
            otpm=deployment.otpm,
            concurrency=None
            if limits.concurrency is None
            else min(limits.concurrency, deployment.max_concurrency),
            max_concurrency=deployment.max_concurrency,
        )
        admission = Admission(lane_limits, deployment.limiter, totals, completion_default)
        headers = {**provider.base_headers(), **http.headers, **deployment.headers}
        headers.update(provider.auth_headers(key))
        transport = HTTPTransport(
            http,
            headers,
            max_connections=lane_limits.ceiling,
            stream=output.stream,
            scrub=self.scrub,
        )
        exchange = Exchange(
            key=key,
            admission=admission,
            transport=transport,
            ledger=ledger,
            provider=provider,
            endpoint=self.endpoint,
            retry=self.retry,
            output=output,
            cache=None,
            totals=totals,
            log=self.log,
            scrub=self.scrub,
            key_env=key_env,
        )
        lane = Lane(deployment, exchange, self.routing)
        lane.url = provider.url(self.endpoint, deployment.model)
        return lane

    @property
    def keys(self) -> list[str]:
        """Every endpoint's key (for redaction)."""
        return [lane.exchange.key for lane in self.lanes if lane.exchange.key]

    async def aclose(self) -> None:
        """Close every endpoint's HTTP session."""
        for lane in self.lanes:
            transport = lane.exchange.transport
            if transport is not None:
                await transport.aclose()

    def figures(self) -> list[dict[str, Any]]:
        """Return every endpoint's figures (see :class:`EndpointFigures`), as data."""
        now = _perf()
        rows = []
        for lane in self.lanes:
            lane.figures.state = lane.state(now)
            rows.append(lane.figures.to_dict())
        return rows

    # -- choosing ------------------------------------------------------------------------------

    async def pick(self, group: str, tried: set[Lane], *, last: bool = True) -> Lane:
        """Return the endpoint of model ``group`` the next attempt goes to (see the module).

        While every endpoint of the model is cooling down, a row with a fallback model left
        (``last`` false) goes on to it at once; the last model's rows wait for the probe.

        Raises:
            NoEndpointLeftError: Every endpoint of the run is out.
            LLMCallError: No endpoint of ``group`` is left, or none is up and the row has a
                fallback (``code="no_endpoint"``).
        """
        while True:
            lanes = [lane for lane in self.lanes if lane.group == group and not lane.out]
            if not lanes:
                self._none_left(group)
            now = _perf()
            ready = [lane for lane in lanes if lane.ready(now)]
            if ready:
                fresh = [lane for lane in ready if lane not in tried] or ready
                lane = self._choose(fresh)
                if lane.state(now) == "probing":
                    lane.probing = True
                return lane
            if not last:
                raise LLMCallError(
                    f"every endpoint of model {group!r} is cooling down",
                    code="no_endpoint",
                    retryable=False,
                )
            soonest = min(lane.cool_until for lane in lanes)
            changed = self.changed
            with anyio.move_on_after(max(0.0, soonest - now)):
                await changed.wait()

    def _choose(self, lanes: list[Lane]) -> Lane:
        if self.routing.policy == "cheapest":
            by_price = sorted(lanes, key=_price_key)
            for lane in by_price:
                if lane.free():
                    return lane
        return min(lanes, key=Lane.wait_score)

    def _none_left(self, group: str) -> None:
        if all(lane.out for lane in self.lanes):
            reasons = "; ".join(f"{lane.name}: {lane.figures.reason}" for lane in self.lanes)
            raise NoEndpointLeftError(f"no endpoint left to send to ({reasons})")
        raise LLMCallError(
            f"no endpoint left for model {group!r} (all out)", code="no_endpoint", retryable=False
        )

    def retire(self, lane: Lane, error: BaseException) -> None:
        """Take ``lane`` out for the rest of the run (its key rejected, its money gone)."""
        if lane.out:
            return
        lane.out = True
        reason = self.scrub(str(error))[:300]
        lane.figures.state = "out"
        lane.figures.reason = reason
        env = lane.exchange.key_env
        left = [other.name for other in self.lanes if not other.out]
        log.warning(
            "endpoint %r is out for the rest of the job (key from $%s): %s; %s",
            lane.name,
            env,
            reason,
            f"going on with {', '.join(left)}" if left else "no endpoint left",
        )
        for scope in list(lane.scopes):
            scope.cancel()  # its rows waiting or in flight go elsewhere
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    # -- requests ------------------------------------------------------------------------------

    async def chat(
        self,
        env: Envelope[Any],
        outbox: Outbox[Any],
        messages: list[dict[str, Any]],
        system: str | None,
        params: Mapping[str, Any],
        deadline: float | None,
    ) -> tuple[Answer, float, bool]:
        """Return ``(answer, cost, cached)`` for a chat request; each endpoint gets its body."""
        stream = self.output.stream

        def build(run: Exchange, model: str) -> dict[str, Any]:
            assert run.provider is not None
            return run.provider.chat_body(model, messages, system, params, stream)

        content = {"endpoint": "chat", "messages": messages, "system": system, "params": params}
        return await self.request(env, outbox, build, content, 1, deadline)

    async def embed(
        self,
        env: Envelope[Any],
        outbox: Outbox[Any],
        texts: list[str],
        params: Mapping[str, Any],
        deadline: float | None,
    ) -> tuple[Answer, float, bool]:
        """Return ``(answer, cost, cached)`` for an embeddings request of ``texts``."""

        def build(run: Exchange, model: str) -> dict[str, Any]:
            assert run.provider is not None
            return run.provider.embeddings_body(model, texts, params)

        content = {"endpoint": "embeddings", "input": texts, "params": params}
        return await self.request(env, outbox, build, content, len(texts), deadline)

    async def request(
        self,
        env: Envelope[Any],
        outbox: Outbox[Any],
        build: BuildBody,
        content: Mapping[str, Any],
        count: int,
        deadline: float | None,
    ) -> tuple[Answer, float, bool]:
        """Return ``(answer, cost, cached)`` for one row; :data:`ANSWERED_BY` names who answered.

        Args:
            env: The row.
            outbox: The stage's outbox.
            build: Makes the body for an endpoint and the model it is sent.
            content: What defines the answer apart from the model (messages, system, params):
                the cache key.
            count: Inputs in the request (embeddings), else 1.
            deadline: The row's deadline.
        """
        cache = self.cache
        if cache is not None:
            for group in self.chain:
                hit = await self._cached(cache, group, content, count)
                if hit is not None:
                    self.totals.cache_hits += 1
                    ANSWERED_BY.set("cache")
                    return hit, 0.0, True
        last = len(self.chain) - 1
        for index, group in enumerate(self.chain):
            try:
                answer, cost, lane = await self._on_model(
                    env, outbox, group, build, count, deadline, last=index == last
                )
            except LLMCallError as error:
                if index == last or not falls_back(error):
                    raise
                self.fallbacks += 1
                nxt = self.chain[index + 1]
                self.log.info("row falls back from model %r to %r: %s", group, nxt, error)
                continue
            if cache is not None:
                await cache.put(_cache_key(group, content), answer.to_bytes())
            ANSWERED_BY.set(lane.name)
            return answer, cost, False
        raise AssertionError("unreachable")  # pragma: no cover

    async def _cached(
        self, cache: ResponseCache, group: str, content: Mapping[str, Any], count: int
    ) -> Answer | None:
        return usable_answer(await cache.get(_cache_key(group, content)), self.endpoint, count)

    async def _on_model(
        self,
        env: Envelope[Any],
        outbox: Outbox[Any],
        group: str,
        build: BuildBody,
        count: int,
        deadline: float | None,
        *,
        last: bool,
    ) -> tuple[Answer, float, Lane]:
        """Attempts on the endpoints of one model, under the retry policy."""
        tried: set[Lane] = set()

        def attempt() -> Awaitable[tuple[Answer, float, Lane]]:
            return self._send(env, outbox, group, build, count, tried, last)

        retry = self.retry
        env.attempts += 1
        try:
            if deadline is None:
                return await attempt()
            return await retry.within(deadline, attempt, env)
        except LLMCallError as error:
            return await retry.after(
                env, outbox, attempt, deadline, error, log=self.log, scrub=self.scrub
            )

    async def _send(
        self,
        env: Envelope[Any],
        outbox: Outbox[Any],
        group: str,
        build: BuildBody,
        count: int,
        tried: set[Lane],
        last: bool,
    ) -> tuple[Answer, float, Lane]:
        """Make one attempt on the endpoint :meth:`pick` chooses; go elsewhere if it is retired.

        Raises:
            LLMCallError: The attempt failed (the endpoint is counted and avoided next time).
        """
        while True:
            lane = await self.pick(group, tried, last=last)
            exchange = lane.exchange
            payload = encode_body(build(exchange, lane.model))
            estimate = exchange.admission.estimate(len(payload))
            lane.figures.requests += 1
            lane.pending += 1
            epoch, probe = lane.epoch, lane.probing  # pick() set probing if this is the probe
            started = _perf()
            answer: Answer | None = None
            try:
                with anyio.CancelScope() as scope:
                    lane.scopes.add(scope)
                    answer = await exchange.send(env, outbox, lane.url, payload, count, estimate)
            except FatalError as error:  # its key is rejected, its money gone
                lane.figures.errors += 1
                self.retire(lane, error)
                continue
            except LLMCallError as error:
                if error.status in OUT_STATUSES:  # a key rejected, or no such model or path here
                    lane.figures.errors += 1
                    self.retire(lane, error)
                    continue
                was = lane.state(_perf())
                lane.failed(error, epoch)
                tried.add(lane)
                if lane.state(_perf()) != was:
                    self._notify()
                raise
            finally:
                lane.scopes.discard(scope)
                lane.pending -= 1
                if answer is None and probe:  # the probe failed or was cut: not probing now
                    lane.probing = False
            if answer is None:  # cancelled because the endpoint was retired: go elsewhere
                continue
            cost = self._account(outbox, lane, answer, estimate)
            was_level = lane.level
            lane.answered(_perf() - started, answer, cost)
            if was_level:
                self._notify()
            if answer.model is None:
                answer = dataclasses.replace(answer, model=lane.model)
            return answer, cost, lane

    def _account(self, outbox: Outbox[Any], lane: Lane, answer: Answer, estimate: int) -> float:
        """Settle the endpoint's limiter and the run's ledger (at the endpoint's price)."""
        usage = answer.usage
        if usage is not None:
            lane.exchange.admission.settle(estimate, usage.prompt_tokens, usage.completion_tokens)
        reserved = RESERVED.get()
        RESERVED.set(0.0)
        return self.ledger.account(outbox, answer, reserved, price=lane.price)


def stamp_route(value: Any, output: Output, answer: Answer, endpoint: str | None) -> Any:
    """Record the endpoint and the model that answered in a row's output value.

    A :class:`~stages.llm._output.Completion` gets ``endpoint`` (and ``model``); a merged
    record gets ``<field>_model`` and ``<field>_endpoint`` next to the answer's field.
    """
    if isinstance(value, Completion):
        return dataclasses.replace(value, endpoint=endpoint, model=answer.model or value.model)
    if isinstance(value, dict) and output.form == "merge":
        field = output.field
        return {**value, f"{field}_model": answer.model, f"{field}_endpoint": endpoint}
    return value


def routed_model(
    routing: Routing, model: str, base_url: str | None, rpm: float | None, call: Any
) -> str:
    """Return the model a routed caller's rows go to first; refuse what a Routing replaces.

    Raises:
        ConfigError: ``base_url``, ``rpm`` or ``call`` given with a Routing, or a model no
            endpoint serves.
    """
    if base_url is not None or rpm is not None:
        raise ConfigError("with a Routing, base_url and rpm are each endpoint's own")
    if call is not None:
        raise ConfigError("a Routing sends HTTP requests: it does not combine with call=")
    model = model or routing.endpoints[0].group
    routing.chain(model)
    return model


def _price_key(lane: Lane) -> float:
    price = lane.price
    return math.inf if price is None else price.prompt + price.completion


def _cache_key(group: str, content: Mapping[str, Any]) -> str:
    """The cache key of a routed request: the model served and the content, not the endpoint."""
    return request_key(f"route://{group}/", dict(content))


ANSWERED_BY: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "llm_answered_by", default=None
)
"""The endpoint that answered the calling task's last routed request (``"cache"``: a hit)."""

__all__ = [
    "ANSWERED_BY",
    "OUT_STATUSES",
    "NoEndpointLeftError",
    "Router",
    "routed_model",
    "stamp_route",
]
