"""What the caller does with an answer: stream it, check it, price it, and emit it.

:class:`Output` holds the options (``Output(schema=Ticket, reask=2, prices={...})``); the common
``output="completion"`` is a shortcut for ``Output(form="completion")``. For each row:

- a streamed answer (``stream=True``) is passed delta by delta to ``on_delta``;
- with ``json_output`` or ``schema`` the text is parsed as JSON (a Markdown code fence is
  tolerated) and validated (:class:`Validator`: a JSON schema via ``jsonschema``, or a pydantic
  model); an invalid answer is sent back with the error up to ``reask`` times
  (:func:`reask_messages`), then the row fails with :class:`InvalidOutputError`;
- tokens and cost are counted (:class:`Ledger`, prices in USD per million tokens looked up by
  model name or its longest priced prefix); reaching ``budget_usd`` stops reading input;
- the value sent on is the record with the answer merged in (``form="merge"``) or a
  :class:`Completion` (:meth:`Output.emit`).

A user ``call=`` may return a string, an :class:`Answer`, a :class:`Completion`, an OpenAI SDK
object or a LangChain message: :func:`answer_of` reads any of them.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import anyio

from pipeline._envelope import Envelope
from pipeline._errors import ConfigError
from pipeline._stage import Outbox
from pipeline._tracing import recording_span
from stages.llm._budget import Budget, BudgetReachedError
from stages.llm._errors import InvalidOutputError
from stages.llm._providers import Answer
from stages.llm._sse import Usage

OutputForm = Literal["merge", "completion"]
DeltaHook = Callable[[Envelope[Any], str], Awaitable[None] | None]

_FENCE = re.compile(r"^```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?```$", re.DOTALL)


@dataclasses.dataclass(frozen=True, slots=True)
class Price:
    """What a model costs, in US dollars per million tokens.

    Attributes:
        prompt: USD per 1M prompt (input) tokens.
        completion: USD per 1M completion (output) tokens.
    """

    prompt: float
    completion: float

    def cost(self, usage: Usage) -> float:
        """Return the cost of ``usage`` in USD."""
        return (usage.prompt_tokens * self.prompt + usage.completion_tokens * self.completion) / 1e6


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    """The full answer for one row (``output="completion"``).

    Attributes:
        text: The generated text (chat), ``None`` for embeddings.
        parsed: The validated JSON object (or pydantic model) with structured output.
        usage: Tokens the server reported for this row, ``None`` when unknown.
        model: The model that answered, as the server names it.
        finish_reason: Why generation stopped (``"stop"``, ``"length"``, ``"end_turn"``...).
        attempts: HTTP attempts made for the row (retries and re-asks included).
        latency_s: Seconds from the first attempt to the answer, waits included.
        embedding: The vector (embeddings).
        cost_usd: What the row cost per the price table (0.0 when unknown or cached).
        cached: Whether the answer came from the response cache.
        endpoint: With routing: the endpoint that answered (``"cache"`` for a cached answer).
    """

    text: str | None
    parsed: Any = None
    usage: Usage | None = None
    model: str | None = None
    finish_reason: str | None = None
    attempts: int = 1
    latency_s: float = 0.0
    embedding: list[float] | None = None
    cost_usd: float = 0.0
    cached: bool = False
    endpoint: str | None = None


@dataclasses.dataclass(slots=True)
class CallerTotals:
    """What the caller did in its last run, beyond the stage counters.

    Attributes:
        limiter_wait_s: Seconds rows spent waiting for the rate limiter, summed.
        slot_wait_s: Seconds rows spent waiting for a concurrency slot, summed.
        slot_waits: Requests that found no free concurrency slot and queued for one.
        cache_hits: Answers served from the response cache.
        reasks: Follow-up requests made because an answer failed validation.
        rate_limited: Responses that asked us to slow down (429, 503, 529).
        isolated_429s: Of those, 429s while the server reported plenty remaining: only their
            row backed off.
        unsent: Rows read but left unsent because the run stopped first (the budget, Ctrl-C,
            SIGTERM, a cancel): neither answered nor dead-lettered, a resumed job sends them.
        unknown_usage: Answers whose token usage the server did not report.
        in_flight: HTTP attempts on the wire now.
        statuses: Responses by HTTP status (an attempt that got no response is not counted).
        waiting_until: Wall-clock time (``time.time()``) the longest wait a server asked for
            ends (a Retry-After of :data:`LONG_WAIT_S` or more), ``None`` before any.
        waiting_why: What asked for that wait (``"the server asked to retry after 60s (HTTP
            429)"``).
    """

    limiter_wait_s: float = 0.0
    slot_wait_s: float = 0.0
    slot_waits: int = 0
    cache_hits: int = 0
    reasks: int = 0
    rate_limited: int = 0
    isolated_429s: int = 0
    unsent: int = 0
    unknown_usage: int = 0
    in_flight: int = 0
    statuses: dict[int, int] = dataclasses.field(default_factory=dict)
    waiting_until: float | None = None
    waiting_why: str | None = None

    def wait_for(self, seconds: float, why: str) -> None:
        """Note that a server asked for a wait of ``seconds`` (kept if long, and the latest)."""
        if seconds < LONG_WAIT_S:
            return
        until = time.time() + seconds
        if self.waiting_until is None or until > self.waiting_until:
            self.waiting_until = until
            self.waiting_why = why

    def waiting(self, now: float | None = None) -> str | None:
        """Return why the run waits and until when (UTC), or ``None`` when it does not wait."""
        until = self.waiting_until
        now = time.time() if now is None else now
        if until is None or until <= now:
            return None
        clock = time.strftime("%H:%M:%S", time.gmtime(until))
        return f"{self.waiting_why}: waiting until {clock} UTC ({until - now:.0f}s)"


LONG_WAIT_S = 10.0
"""A wait a server asks for that the job's progress line reports (why, and until when)."""


def short(text: str, limit: int = 300) -> str:
    """Return ``text`` cut to ``limit`` characters (``...`` marks a cut)."""
    return text if len(text) <= limit else text[:limit] + "..."


def parse_json_text(text: str) -> Any:
    """Parse a JSON answer, tolerating surrounding whitespace and a Markdown code fence."""
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    return json.loads(stripped)


def json_schema_of(schema: Mapping[str, Any] | type | None) -> Mapping[str, Any] | None:
    """Return the JSON schema of ``schema`` (a dict as is, a pydantic model's, else ``None``)."""
    if isinstance(schema, Mapping):
        return schema
    dump = getattr(schema, "model_json_schema", None)
    if callable(dump):
        found = dump()
        return found if isinstance(found, Mapping) else None
    return None


class Validator:
    """Validates parsed JSON against a JSON schema dict or a pydantic model class.

    Raises:
        ConfigError: ``schema`` is neither, or not a valid JSON schema.
    """

    def __init__(self, schema: Mapping[str, Any] | type | None) -> None:
        self.schema = schema
        self._check: Callable[[Any], Any]
        if schema is None:
            self._check = lambda value: value
        elif isinstance(schema, Mapping):
            self._check = _schema_check(schema)
        elif hasattr(schema, "model_validate"):
            model: Any = schema

            def check_model(value: Any) -> Any:
                try:
                    return model.model_validate(value)
                except Exception as exc:  # pydantic.ValidationError
                    raise ValueError(short(str(exc), 800)) from None

            self._check = check_model
        else:
            raise ConfigError(
                f"schema must be a JSON schema dict or a pydantic model, not {schema!r}"
            )

    def __call__(self, text: str | None) -> Any:
        """Return the parsed, validated answer; raise ``ValueError`` saying what is wrong."""
        if text is None:
            raise ValueError("the answer has no text")
        try:
            value = parse_json_text(text)
        except ValueError as exc:
            raise ValueError(f"not valid JSON ({exc})") from None
        return self._check(value)


def _schema_check(schema: Mapping[str, Any]) -> Callable[[Any], Any]:
    try:
        from jsonschema import (  # type: ignore[import-untyped,unused-ignore]
            exceptions,
            validators,
        )
    except ImportError as exc:  # pragma: no cover - the [schema] extra
        raise ConfigError("schema= needs jsonschema: pip install llm-pipeline[schema]") from exc
    cls = validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except exceptions.SchemaError as exc:
        raise ConfigError(f"schema is not a valid JSON schema: {exc.message}") from None
    validator = cls(schema)

    def check(value: Any) -> Any:
        error = exceptions.best_match(validator.iter_errors(value))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise ValueError(f"at {where}: {error.message}")
        return value

    return check


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Output:
    """How answers come back and what the caller sends on.

    Args:
        form: ``"merge"`` emits ``{**record, field: answer}``; ``"completion"`` emits a
            :class:`Completion`.
        field: Field name of the answer with ``form="merge"``.
        json_output: Parse the answer as JSON (``parsed``); implied by ``schema``.
        schema: JSON schema dict (jsonschema) or pydantic model the answer must satisfy.
        reask: How many times an invalid answer is sent back with the error to fix it.
        stream: Stream chat answers (SSE); deltas go to ``on_delta``.
        on_delta: Called with ``(envelope, text)`` for each streamed delta (sync or async);
            ``envelope.attempts`` tells which attempt a delta belongs to, since a retried
            stream starts again from the beginning.
        prices: USD per 1M prompt/completion tokens by model: ``{"gpt-4o": (2.5, 10.0)}``.
        budget_usd: The most the run may spend (needs ``prices``): each request reserves its
            worst-case cost (its prompt, ``max_tokens`` of answer, 256 when not set) before it
            is sent and settles at the real cost. When the next request's worst case would
            cross the budget (once the requests in flight have settled), the run stops
            reading input and sends nothing more: the requests in flight finish, the rows
            already read are left unsent (counted in ``CallerTotals.unsent``, neither
            answered nor dead-lettered), so a resumed job sends them with a higher budget.

    Raises:
        ConfigError: An unknown form, a negative ``reask``, a bad schema, or a budget
            without prices.
    """

    form: OutputForm = "merge"
    field: str = "response"
    json_output: bool = False
    schema: Mapping[str, Any] | type | None = None
    reask: int = 1
    stream: bool = False
    on_delta: DeltaHook | None = None
    prices: Mapping[str, Price | tuple[float, float]] | None = None
    budget_usd: float | None = None
    validator: Validator | None = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.form not in ("merge", "completion"):
            raise ConfigError(f"output must be 'merge' or 'completion', not {self.form!r}")
        if self.reask < 0:
            raise ConfigError(f"reask must be >= 0, got {self.reask}")
        if self.budget_usd is not None and not self.prices:
            raise ConfigError("budget_usd needs prices= to know what requests cost")
        prices = {
            m: p if isinstance(p, Price) else Price(float(p[0]), float(p[1]))
            for m, p in (self.prices or {}).items()
        }
        checked = self.json_output or self.schema is not None
        object.__setattr__(self, "prices", prices)
        object.__setattr__(self, "validator", Validator(self.schema) if checked else None)

    @classmethod
    def of(cls, value: Output | OutputForm) -> Output:
        """Return ``value`` as an :class:`Output` (a form name is ``Output(form=...)``)."""
        return value if isinstance(value, Output) else cls(form=value)

    def emit(
        self,
        env: Envelope[Any],
        answer: Answer,
        result: Any,
        *,
        started: float,
        now: float,
        cost: float = 0.0,
        cached: bool = False,
        vector: list[float] | None = None,
        parsed: Any = None,
        traced: bool = True,
    ) -> Any:
        """Return what is sent on for ``env``: the record with ``result`` merged, or a Completion.

        Tokens, cost and attempts are noted on the row's span (``traced=False``: the run
        records no spans, so none is looked for).
        """
        span = recording_span() if traced else None
        if span is not None:
            span.set_attribute("llm.attempts", env.attempts)
            span.set_attribute("llm.cached", cached)
            if answer.usage is not None:
                span.set_attribute("llm.prompt_tokens", answer.usage.prompt_tokens)
                span.set_attribute("llm.completion_tokens", answer.usage.completion_tokens)
            if cost:
                span.set_attribute("llm.cost_usd", cost)
        record = env.value
        if self.form == "merge":
            if type(record) is dict or isinstance(record, Mapping):
                return {**record, self.field: result}
            return {"value": record, self.field: result}
        return Completion(
            text=answer.text,
            parsed=parsed,
            usage=answer.usage,
            model=answer.model,
            finish_reason=answer.finish_reason,
            attempts=env.attempts,
            latency_s=now - started,
            embedding=vector,
            cost_usd=cost,
            cached=cached,
        )

    def check(self, answer: Answer, attempts: int, scrub: Callable[[str], str]) -> Any:
        """Return the validated answer of a ``call=`` (no re-ask: the call owns its request).

        Raises:
            InvalidOutputError: The answer is not valid.
        """
        assert self.validator is not None
        try:
            return self.validator(answer.text)
        except ValueError as exc:
            raise InvalidOutputError(
                scrub(f"invalid JSON output: {exc}"), attempts=attempts
            ) from None


def reask_messages(
    messages: list[dict[str, Any]], answer: str | None, problem: str
) -> list[dict[str, Any]]:
    """Return ``messages`` followed by the invalid answer and a request to correct it."""
    return [
        *messages,
        {"role": "assistant", "content": answer or ""},
        {
            "role": "user",
            "content": (
                f"Your answer is not valid: {problem}. Reply again with only the corrected JSON."
            ),
        },
    ]


class Ledger:
    """One run's token and cost accounting, and the budget that stops it.

    Args:
        output: The caller's output options (prices, budget).
        model: The model asked for (its price is looked up first).
        stage: The stage name, for the budget message.
        log: Where a missing price and the budget stop are reported.
        totals: Where answers without usage are counted.
    """

    __slots__ = (
        "budget",
        "budget_usd",
        "freed",
        "log",
        "model",
        "prices",
        "reason",
        "stage",
        "stopping",
        "totals",
        "warned",
    )

    def __init__(
        self,
        output: Output,
        model: str,
        stage: str,
        log: logging.Logger | logging.LoggerAdapter[Any],
        totals: CallerTotals,
    ) -> None:
        self.prices: Mapping[str, Price] = output.prices or {}  # type: ignore[assignment]
        self.budget_usd = output.budget_usd
        self.budget = None if output.budget_usd is None else Budget(output.budget_usd)
        self.freed = anyio.Event()  # set when a reservation is settled or released
        self.model = model
        self.stage = stage
        self.log = log
        self.totals = totals
        self.stopping = False
        self.reason: str | None = None
        self.warned: set[str] = set()

    async def reserve(self, outbox: Outbox[Any], prompt_tokens: int, answer_tokens: int) -> float:
        """Reserve the worst-case cost of one request before it is sent; return it.

        While other reservations are outstanding, a request that does not fit waits for them
        to settle (answers usually cost less than their worst case). When none is left and it
        still does not fit, the run stops reading input and no request is sent from then on:
        spending never passes the budget (as long as the worst case holds: the prompt's
        request bytes / 4 tokens, and ``max_tokens``).

        Raises:
            BudgetReachedError: The request is not sent (its row is left unsent).
        """
        budget = self.budget
        price = self.price(None) if budget is not None else None
        if budget is None or price is None:
            return 0.0
        worst = (prompt_tokens * price.prompt + answer_tokens * price.completion) / 1e6
        while self.stopping or not budget.reserve(worst):
            stats = budget.statistics()
            if self.stopping or stats.reserved_usd <= 1e-12:
                self._stop(outbox, f"${stats.spent_usd:.4f} spent, the next request's worst case "
                           f"${worst:.6f}")  # fmt: skip
                raise BudgetReachedError(self.reason or "budget reached")
            if self.freed.is_set():
                self.freed = anyio.Event()
            await self.freed.wait()
        return worst

    def leave_unsent(self, env: Envelope[Any], outbox: Outbox[Any]) -> None:
        """Leave a row the run stopped before sending: no answer, no dead letter.

        The budget or a stop (Ctrl-C, SIGTERM, a cancel) came before its request; it is listed
        as not started, and a resumed job sends it.
        """
        self.totals.unsent += env.count
        outbox.drop_not_started(env)

    def release(self, reserved: float) -> None:
        """Give back the reservation of a request that was not billed (it failed)."""
        if self.budget is not None and reserved:
            self.budget.release(reserved)
            self.freed.set()

    def account(
        self,
        outbox: Outbox[Any],
        answer: Answer,
        reserved: float = 0.0,
        *,
        price: Price | None = None,
    ) -> float:
        """Count tokens and cost of an answer, settle its reservation; stop at the budget.

        ``price`` overrides the price table (an endpoint's own price, with routing).
        """
        usage = answer.usage
        if usage is None:
            self.totals.unknown_usage += 1
            if self.budget is not None and reserved:
                self.budget.settle(reserved, reserved)  # unknown: count the worst case spent
                self.freed.set()
            return 0.0
        stats = outbox.stats
        stats.prompt_tokens += usage.prompt_tokens
        stats.completion_tokens += usage.completion_tokens
        if price is None and self.prices:
            price = self.price(answer.model)
        if price is None:
            self.release(reserved)
            return 0.0
        cost = price.cost(usage)
        stats.cost_usd += cost
        if self.budget is not None:
            self.budget.settle(reserved, cost)
            self.freed.set()
        budget = self.budget_usd
        if budget is not None and stats.cost_usd >= budget:
            self._stop(outbox, f"${stats.cost_usd:.4f}")
        return cost

    def _stop(self, outbox: Outbox[Any], spent: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        reason = f"budget of ${self.budget_usd:g} reached by stage {self.stage!r} ({spent})"
        self.reason = reason
        self.log.warning(
            "%s; no new request is sent: requests in flight finish, the rows not sent are left"
            " for a resume",
            reason,
        )
        outbox.request_stop(reason)

    def price(self, answered: str | None) -> Price | None:
        """Return the price of the model that answered (exact name, else longest prefix)."""
        prices = self.prices
        if not prices:
            return None
        for name in (self.model, answered):
            if name and name in prices:
                return prices[name]
        if answered:  # "gpt-4o-2024-08-06" priced as "gpt-4o": the longest matching prefix
            matches = [m for m in prices if answered.startswith(m)]
            if matches:
                return prices[max(matches, key=len)]
        if self.model not in self.warned:
            self.warned.add(self.model)
            self.log.warning("no price for model %r: its cost counts as 0", answered or self.model)
        return None


async def call_hook(hook: DeltaHook, env: Envelope[Any], text: str) -> None:
    """Call ``on_delta`` (sync or async) with one piece of text."""
    result = hook(env, text)
    if inspect.isawaitable(result):
        await result


def usage_of(usage: Any) -> Usage | None:
    """Read token usage from a mapping or object (OpenAI or Anthropic field names)."""
    if usage is None:
        return None
    if isinstance(usage, Usage):
        return usage
    get = usage.get if isinstance(usage, Mapping) else lambda k, d=None: getattr(usage, k, d)
    prompt = get("prompt_tokens", None)
    if prompt is None:
        prompt = get("input_tokens", None)
    completion = get("completion_tokens", None)
    if completion is None:
        completion = get("output_tokens", 0)
    if not isinstance(prompt, int):
        return None
    return Usage(prompt, completion if isinstance(completion, int) else 0)


def answer_of(result: Any) -> Answer:
    """Read what a user ``call`` returned: a string, an Answer, a Completion, an SDK object."""
    if isinstance(result, Answer):
        return result
    if isinstance(result, str):
        return Answer(text=result)
    if isinstance(result, Completion):
        return Answer(result.text, result.finish_reason, result.usage, result.model)
    usage = result.get("usage") if isinstance(result, Mapping) else getattr(result, "usage", None)
    text = None
    choices = getattr(result, "choices", None)
    if choices:  # an OpenAI SDK ChatCompletion
        message = getattr(choices[0], "message", None)
        text = getattr(message, "content", None)
    elif isinstance(getattr(result, "content", None), str):  # a LangChain message
        text = result.content
    return Answer(text=text, usage=usage_of(usage), model=getattr(result, "model", None))


__all__ = [
    "LONG_WAIT_S",
    "CallerTotals",
    "Completion",
    "DeltaHook",
    "Ledger",
    "Output",
    "OutputForm",
    "Price",
    "Validator",
    "answer_of",
    "call_hook",
    "json_schema_of",
    "parse_json_text",
    "reask_messages",
    "short",
    "usage_of",
]
