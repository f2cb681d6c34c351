"""The envelope an item travels in, and the record of an item that failed."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")


@dataclasses.dataclass(slots=True)
class Envelope(Generic[T]):
    """One item in flight, with what the runtime needs to account for it.

    Attributes:
        value: The item itself.
        seq: Position of the item's origin in the input (0-based), assigned by the source.
        key: The row's identity for resume and dead letters (an id field or the line number).
        origin: Where the item came from, for error messages (``"data.jsonl:17"``).
        context: The item's OpenTelemetry context (``None`` when tracing is off).
        attempts: Attempts made on the item by the stage that handles it last.
        members: For a batch, the envelopes of the items it groups (``value`` is their values).
        meta: Free-form per-item data for stages (usage, timings); ``None`` until used.
    """

    value: T
    seq: int
    key: Hashable | None = None
    origin: str | None = None
    context: Any = None
    attempts: int = 0
    members: Sequence[Envelope[Any]] | None = None
    meta: dict[str, Any] | None = None

    def replace(self, value: U) -> Envelope[U]:
        """Return a copy carrying ``value`` and the same identity, context, members and metadata.

        A batch stays a batch: a 1:1 stage over a batch envelope keeps its members, so the
        batch still counts as (and can be split back into) its items.
        """
        return Envelope(
            value,
            self.seq,
            self.key,
            self.origin,
            self.context,
            self.attempts,
            self.members,
            self.meta,
        )

    def child(self, value: U) -> Envelope[U]:
        """Return a new single item made from this one (``flat_map``): same identity, no members."""
        return Envelope(
            value, self.seq, self.key, self.origin, self.context, self.attempts, None, self.meta
        )

    @property
    def count(self) -> int:
        """How many input items this envelope stands for (a batch counts its members)."""
        return 1 if self.members is None else len(self.members)


@dataclasses.dataclass(frozen=True, slots=True)
class Failed:
    """An item that could not be processed, as sent to the dead-letter sink.

    Attributes:
        item: The item as the failing stage received it.
        stage: Name of the stage that gave up on it.
        error_type: The exception's class name.
        message: The exception's message (secrets redacted).
        attempts: Attempts made before giving up.
        seq: Position of the item's origin in the input.
        key: The row's identity (id field or line number).
        origin: Where the item came from (``"file:line"``), when known.
        status: HTTP status of the last attempt, when the failure came from a server.
    """

    item: Any
    stage: str
    error_type: str
    message: str
    attempts: int
    seq: int
    key: Hashable | None = None
    origin: str | None = None
    status: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the record as plain JSON-ready data."""
        return {
            "item": self.item,
            "key": self.key,
            "origin": self.origin,
            "stage": self.stage,
            "error": {
                "type": self.error_type,
                "message": self.message,
                "status": self.status,
                "attempts": self.attempts,
            },
        }
