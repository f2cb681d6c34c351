"""What can go wrong for one row of the LLM caller, and what stops a whole run.

::

    ItemError (pipeline._errors: the row is dead-lettered, the run goes on)
    ├── LLMCallError            a request failed; ``retryable`` says whether to try again
    │   └── DeadlineExceededError   the row's ``deadline_s`` passed first
    └── InvalidOutputError      the answer is not valid JSON for the schema, re-asks included
    FatalError (pipeline._errors: the run stops)
    ├── AuthenticationError     the key was rejected before any request succeeded
    └── QuotaExhaustedError     no money or quota left (defined in the runtime)

The retry policy (:mod:`stages.llm._retry`) decides from these alone: it retries an
:class:`LLMCallError` whose ``retryable`` is true and gives up on anything else.
"""

from __future__ import annotations

from pipeline._errors import FatalError, ItemError


class LLMCallError(ItemError):
    """A request for one row failed; dead-lettered once retries cannot help.

    Args:
        message: What failed, with the provider's message (API key redacted).
        status: The HTTP status, when there was a response.
        code: The provider's error code or type.
        retryable: Whether another attempt may succeed.
        retry_after: Seconds the server asked us to wait, if it said.
        attempts: Attempts made so far.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message, status=status, attempts=attempts)
        self.code = code
        self.retryable = retryable
        self.retry_after = retry_after


class DeadlineExceededError(LLMCallError):
    """The row's overall deadline (``deadline_s``) passed before it got an answer."""


class InvalidOutputError(ItemError):
    """The answer is not valid JSON for the schema, even after the re-asks."""


class AuthenticationError(FatalError):
    """The server rejected the API key before any request of the run succeeded."""

    def __init__(self, message: str, *, status: int | None = 401) -> None:
        super().__init__(message)
        self.status = status


def is_retryable(error: BaseException) -> bool:
    """Return whether ``error`` is a failed request worth another attempt."""
    return isinstance(error, LLMCallError) and error.retryable


__all__ = [
    "AuthenticationError",
    "DeadlineExceededError",
    "InvalidOutputError",
    "LLMCallError",
    "is_retryable",
]
