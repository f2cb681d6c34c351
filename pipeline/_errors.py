"""Exceptions raised by the runtime and by stages.

The hierarchy::

    PipelineError                 base of everything the library raises on purpose
    ├── ItemError                 a problem with one item: always sent to the dead letter
    │   └── MissingFieldError     a prompt template names a field the record lacks
    ├── NotStartedError           the run stopped before the item's work began: it is dropped
    ├── FatalError                stop the whole pipeline (never dead-lettered)
    │   └── QuotaExhaustedError   the provider says the account is out of money/quota
    ├── LedgerError               the runtime lost or duplicated an item (a bug, never expected)
    └── ConfigError               a pipeline or stage was declared wrongly

A stage decides for any other exception whether it is data (dead-letter) or fatal through its
``on_error`` setting. Cancellation is never caught: it is not an :class:`Exception`.
"""

from __future__ import annotations

from typing import Any


class PipelineError(Exception):
    """Base class of the library's own errors."""


class ItemError(PipelineError):
    """One item cannot be processed; the item goes to the dead letter, the run goes on.

    Args:
        message: What went wrong, naming the field or value at fault.
        status: An HTTP status when the error came from a server.
        attempts: How many attempts were made before giving up.
    """

    def __init__(self, message: str, *, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts


class MissingFieldError(ItemError, KeyError):
    """A template names a field that the record does not have."""

    def __init__(self, field: str, available: Any = ()) -> None:
        names = ", ".join(sorted(map(str, available))) or "none"
        ItemError.__init__(self, f"missing field {field!r} (record has: {names})")
        self.field = field

    def __str__(self) -> str:
        return str(self.args[0])


class NotStartedError(PipelineError):
    """The run was asked to stop before this item's work began (no request was sent for it).

    The item is dropped, not dead-lettered: it has no answer and no failure, so a resumed job
    reads it again. Raised by :meth:`~pipeline.Outbox.unless_stopped` for a wait that a stop
    ends (a rate limiter, a retry's back-off) and by stages that check
    :attr:`~pipeline.Outbox.stopping` before starting an item's work.
    """


class FatalError(PipelineError):
    """Stop the whole pipeline: retrying or skipping the item cannot help."""


class QuotaExhaustedError(FatalError):
    """The provider refused for lack of quota or credit (e.g. ``insufficient_quota``)."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class LedgerError(PipelineError):
    """The runtime's accounting does not balance: an item was lost or duplicated."""


class ConfigError(PipelineError, ValueError):
    """A pipeline or stage was declared with invalid settings."""
