"""Dead letters: the record of a failed row, and :class:`DeadLetterSink` that writes them.

Dead-letter records are JSON objects::

    {"key": 17, "line": 17, "origin": "in.jsonl:17", "stage": "llm", "row": {...},
     "error": {"type": "ItemError", "message": "...", "status": 400, "attempts": 1}}
"""

from __future__ import annotations

from typing import Any

from pipeline._envelope import Envelope, Failed
from pipeline._json import dumps
from stages.files._rows import line_of
from stages.files._sinks import Encoded, FileSink

__all__ = ["DeadLetterSink", "dead_letter_record"]


def dead_letter_record(failed: Failed) -> dict[str, Any]:
    """Return the dead-letter record of one failed row, as every engine writes it."""
    return {
        "key": failed.key,
        "line": line_of(failed.origin),
        "origin": failed.origin,
        "stage": failed.stage,
        "row": failed.item,
        "error": {
            "type": failed.error_type,
            "message": failed.message,
            "status": failed.status,
            "attempts": failed.attempts,
        },
    }


class DeadLetterSink(FileSink):
    """Write dead-letter records (:class:`~pipeline._envelope.Failed`) as JSON Lines.

    Use it as ``Pipeline(..., dead_letter=DeadLetterSink("failed.jsonl"))``. Each record
    holds the row's key, line and origin, the failing stage, the row as that stage received it
    and the error's type, message, HTTP status and attempts.

    Args:
        path: The dead-letter file, ``-`` for stdout, or a job's ``journal.dead_letter``.
        fsync_every: Fsync after this many records...
        fsync_interval: ...or this many seconds, whichever comes first (and at the end).
        name: The stage's name.
        buffer: Capacity of the sink's inbox.
    """

    format = "dead-letter"

    def payload(self, env: Envelope[Any]) -> bytes:
        """Return the dead-letter record of one failed item as JSON (never fails)."""
        failed = env.value
        if not isinstance(failed, Failed):
            failed = Failed(failed, "?", "Error", "not a Failed record", 1, env.seq, env.key)
        record = dead_letter_record(failed)
        try:
            return dumps(record)
        except (TypeError, ValueError):  # an unencodable item: keep its repr
            record["row"] = repr(failed.item)
            return dumps(record)

    def _encode(self, chunk: list[Envelope[Any]]) -> Encoded:
        return chunk, [self.payload(env) for env in chunk], []
