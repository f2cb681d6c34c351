"""A spending limit enforced before requests are sent, not counted after they come back.

A :class:`Budget` holds reservations. Before a request goes out, its worst-case cost (its
prompt tokens counted, ``max_tokens`` for the answer) is reserved; a reservation that would
take spent plus reserved past the limit is refused. When the answer arrives the reservation
is settled at the real cost (usually less); a request that failed without being billed
releases it. What a caller does with a refusal is its own policy: the LLM caller stops
reading input and leaves every row it has not sent yet unsent (:class:`BudgetReachedError`),
neither answered nor dead-lettered, so that a resumed job sends them (see
:class:`~stages.llm._output.Output`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from pipeline._errors import ConfigError

DEFAULT_ANSWER_TOKENS = 256
"""Tokens reserved for a chat answer when ``max_tokens`` is not set."""


def answer_reserve(caller: Any) -> int | None:
    """Return the tokens a caller reserves for each answer (``None`` for embeddings).

    Its ``max_tokens`` (or ``max_completion_tokens``), else :data:`DEFAULT_ANSWER_TOKENS`. The
    worst case the budget reserves, the ``otpm`` limit's reservation and the job's preflight
    estimate all use it.
    """
    if caller.endpoint != "chat":
        return None
    params = caller.params
    reserved = params.get("max_tokens") or params.get("max_completion_tokens")
    return int(reserved) if isinstance(reserved, int) else DEFAULT_ANSWER_TOKENS


class BudgetReachedError(Exception):
    """A request was not sent: its worst-case cost would take spending past the budget.

    Not a failure of the row: the caller leaves the row unsent (no answer, no dead letter),
    and a job's journal does not record it, so ``--resume`` with a higher budget sends it.
    """


class BudgetStatistics(NamedTuple):
    """A snapshot of a :class:`Budget`.

    Attributes:
        limit_usd: The spending limit.
        spent_usd: Settled cost of the requests answered so far.
        reserved_usd: Worst-case cost of the requests in flight.
        refused: Reservations refused because they would cross the limit.
    """

    limit_usd: float
    spent_usd: float
    reserved_usd: float
    refused: int


class Budget:
    """A spending limit in US dollars with reservations for requests in flight.

    Args:
        limit_usd: The most a run may spend.
    """

    def __init__(self, limit_usd: float) -> None:
        if not (limit_usd >= 0 and math.isfinite(limit_usd)):
            raise ConfigError(f"budget must be a finite number of USD >= 0, got {limit_usd!r}")
        self.limit_usd = float(limit_usd)
        self._spent = 0.0
        self._reserved = 0.0
        self._refused = 0

    def __repr__(self) -> str:
        return (
            f"Budget(limit_usd={self.limit_usd:g}, spent_usd={self._spent:.6f}, "
            f"reserved_usd={self._reserved:.6f})"
        )

    @property
    def spent_usd(self) -> float:
        """Settled cost so far."""
        return self._spent

    @property
    def available_usd(self) -> float:
        """What may still be reserved: the limit less spent and reserved."""
        return max(self.limit_usd - self._spent - self._reserved, 0.0)

    def reserve(self, usd: float) -> bool:
        """Reserve ``usd`` for one request; return ``False`` (and reserve nothing) past the limit.

        Raises:
            ValueError: ``usd`` is negative or not finite.
        """
        if not (usd >= 0 and math.isfinite(usd)):
            raise ValueError(f"a reservation must be a finite number of USD >= 0, got {usd!r}")
        if self._spent + self._reserved + usd > self.limit_usd + 1e-12:
            self._refused += 1
            return False
        self._reserved += usd
        return True

    def settle(self, reserved_usd: float, actual_usd: float) -> None:
        """Replace a reservation of ``reserved_usd`` by the request's real cost."""
        self._reserved = max(self._reserved - reserved_usd, 0.0)
        self._spent += max(actual_usd, 0.0)

    def release(self, reserved_usd: float) -> None:
        """Give back a reservation whose request cost nothing (not sent, or refused)."""
        self._reserved = max(self._reserved - reserved_usd, 0.0)

    def statistics(self) -> BudgetStatistics:
        """Return the limit, spending, reservations and refusals so far."""
        return BudgetStatistics(self.limit_usd, self._spent, self._reserved, self._refused)
