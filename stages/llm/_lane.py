"""One endpoint of a routed caller during a run: its health, its figures, its failures.

The router (:mod:`stages.llm._router`) keeps a :class:`Lane` per endpoint. A lane counts what
its endpoint did (:class:`EndpointFigures`, the summary's per-endpoint rows) and decides when
the endpoint is unwell: after ``failures`` faults in a row (5xx, 529, no connection, a
timeout) it is out for a cool-down that doubles after each failed probe; an answer brings it
back. Only attempts sent since the endpoint's last change of health (its *epoch*: a cool-down
or a recovery) move it: a request sent before a cool-down that fails during it, or one sent
before the endpoint recovered that fails after, says nothing new and is only counted.
:func:`falls_back` says which failures of a row send it on to a fallback model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from typing import Any

import anyio

from stages.llm._errors import DeadlineExceededError, LLMCallError
from stages.llm._exchange import Exchange
from stages.llm._providers import RETRY_STATUSES, Answer
from stages.llm._routing import Deployment, Routing

log = logging.getLogger("pipeline.routing")

_perf = time.perf_counter

CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})
"""Error codes that say a request is longer than the model's context window."""
_CONTEXT_TEXT = re.compile(
    r"context (length|window)|maximum context|prompt is too long|too many tokens", re.IGNORECASE
)


@dataclasses.dataclass(slots=True)
class EndpointFigures:
    """What one endpoint did in a run (the summary's and the dashboard's per-endpoint rows).

    Attributes:
        name: The endpoint's name.
        model: The model name sent to it.
        serves: The model it answers for.
        state: ``up``, ``cooling`` (out for a cool-down), ``probing`` or ``out`` (for the run).
        requests: Attempts sent to it.
        answered: Attempts it answered.
        rate_limited: 429s it returned.
        errors: Other failed attempts (5xx, connection errors, timeouts, refusals).
        latency_s: Seconds per answered attempt, on average (limiter wait included).
        cost_usd: Cost of its answers.
        prompt_tokens: Prompt tokens of its answers.
        completion_tokens: Completion tokens of its answers.
        cooldowns: Times it was taken out for a cool-down.
        reason: Why it is out or cooling, if it is.
    """

    name: str
    model: str
    serves: str
    state: str = "up"
    requests: int = 0
    answered: int = 0
    rate_limited: int = 0
    errors: int = 0
    latency_s: float = 0.0
    cost_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cooldowns: int = 0
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the figures as JSON-ready data."""
        data = dataclasses.asdict(self)
        data["latency_s"] = round(self.latency_s, 4)
        data["cost_usd"] = round(self.cost_usd, 6)
        return data


class Lane:
    """One endpoint during a run: its exchange, its health and its figures.

    Args:
        deployment: The endpoint's options.
        exchange: Its own exchange (key, session, provider, limiter, slots).
        routing: The routing options (cool-down rules).
    """

    def __init__(self, deployment: Deployment, exchange: Exchange, routing: Routing) -> None:
        self.deployment = deployment
        self.exchange = exchange
        self.routing = routing
        self.name = deployment.label()
        self.group = deployment.group
        self.model = deployment.model
        self.price = deployment.unit_price()
        self.url = ""
        self.pending = 0  # attempts picked and not yet over (limiter, slot or on the wire)
        self.streak = 0  # failures in a row
        self.level = 0  # cool-downs in a row (each twice as long)
        self.cool_until = -math.inf
        self.probing = False
        self.out = False
        self.epoch = 0  # changes of health so far (cool-downs and recoveries)
        self.scopes: set[anyio.CancelScope] = set()
        self.figures = EndpointFigures(name=self.name, model=self.model, serves=self.group)
        self._latency_total = 0.0

    def __repr__(self) -> str:
        return f"Lane({self.name!r}, state={self.state(_perf())!r}, pending={self.pending})"

    def state(self, now: float) -> str:
        """``up``, ``cooling``, ``probing`` or ``out``."""
        if self.out:
            return "out"
        if now < self.cool_until:
            return "cooling"
        return "probing" if self.level else "up"

    def ready(self, now: float) -> bool:
        """Whether a request may be sent here now (a probing endpoint takes one at a time)."""
        state = self.state(now)
        return state == "up" or (state == "probing" and not self.probing)

    def rate_per_s(self) -> float | None:
        """Requests per second of this endpoint's quota, configured or learned, if known."""
        stats = getattr(self.exchange.admission.limiter, "statistics", None)
        rpm = stats().rpm if stats is not None else None
        rpm = rpm or self.deployment.rpm
        return None if rpm is None else rpm / 60.0

    def wait_score(self) -> float:
        """How long a new request would wait here, in relative terms (lower is better)."""
        rate = self.rate_per_s()
        if rate is None:  # no known quota: bound by its slots
            rate = float(self.exchange.admission.concurrency.limit) * 100.0
        return (self.pending + 1) / (rate * self.deployment.weight)

    def free(self) -> bool:
        """Whether a request would find a slot here with nobody queued before it."""
        return self.pending < self.exchange.admission.concurrency.limit

    # -- outcomes ------------------------------------------------------------------------------

    def answered(self, latency: float, answer: Answer, cost: float) -> None:
        """An attempt succeeded: the endpoint is healthy again."""
        figures = self.figures
        figures.answered += 1
        self._latency_total += latency
        figures.latency_s = self._latency_total / figures.answered
        figures.cost_usd += cost
        if answer.usage is not None:
            figures.prompt_tokens += answer.usage.prompt_tokens
            figures.completion_tokens += answer.usage.completion_tokens
        self.streak = 0
        if self.level:
            self.epoch += 1  # earlier attempts' failures no longer count against it
            if not self.out:
                log.info("endpoint %r answers again: back in", self.name)
        self.level = 0
        self.probing = False
        figures.state = "out" if self.out else "up"
        figures.reason = figures.reason if self.out else None

    def failed(self, error: LLMCallError, epoch: int) -> None:
        """An attempt failed: count it; cool the endpoint down if it fails repeatedly.

        Args:
            error: Why it failed.
            epoch: The lane's :attr:`epoch` when the attempt was sent. An attempt sent before
                the latest cool-down or recovery is counted but moves nothing.
        """
        figures = self.figures
        current = epoch == self.epoch
        if error.status == 429:
            figures.rate_limited += 1
            return
        figures.errors += 1
        if not current:
            return
        if not _endpoint_fault(error):
            return
        self.streak += 1
        if self.probing or self.streak >= self.routing.failures:
            self._cool(error)

    def _cool(self, error: LLMCallError) -> None:
        routing = self.routing
        seconds = min(routing.max_cooldown_s, routing.cooldown_s * 2**self.level)
        self.level += 1
        self.epoch += 1
        self.streak = 0
        self.probing = False
        self.cool_until = _perf() + seconds
        figures = self.figures
        figures.cooldowns += 1
        figures.state = "cooling"
        figures.reason = str(error)[:200]
        log.warning(
            "endpoint %r failing (%s): out for %.3gs, then probed",
            self.name,
            figures.reason,
            seconds,
        )


def _endpoint_fault(error: LLMCallError) -> bool:
    """Whether a failure says the endpoint is unwell (5xx, 529, no connection, timeout)."""
    status = error.status
    return status is None or status >= 500


def context_exceeded(error: LLMCallError) -> bool:
    """Whether ``error`` says the request is longer than the model's context window."""
    if error.status not in (400, 413, 422):
        return False
    return error.code in CONTEXT_CODES or bool(_CONTEXT_TEXT.search(str(error)))


def falls_back(error: LLMCallError) -> bool:
    """Whether a row that failed with ``error`` on a model may be retried on the next one.

    Yes after its retries on the model ran out, when the request exceeds the model's context
    window, or when no endpoint of the model is left; not for a deadline, nor for a request
    that no model could answer (a malformed body, a missing field).
    """
    if isinstance(error, DeadlineExceededError):
        return False
    if error.code == "no_endpoint" or context_exceeded(error):
        return True
    status = error.status
    return status is None or status in RETRY_STATUSES or status >= 500


__all__ = ["CONTEXT_CODES", "EndpointFigures", "Lane", "context_exceeded", "falls_back"]
