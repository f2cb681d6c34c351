"""A Ray batch as the actors see it: its rows, what became of them, and how rows travel.

:class:`RayItem` is one row an actor runs and :class:`BatchOutcome` what its batch became; a
:class:`BatchFormat` reads a Ray batch into items and writes an outcome back. :class:`RowsFormat`
is the one :func:`~stages._ray.ray_transform` uses: rows in, answers and failures out as rows of
one Arrow table, failures with the ``error`` and ``error_record`` columns.
"""

from __future__ import annotations

import importlib
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pipeline import Results
from pipeline._envelope import Envelope, Failed
from pipeline._json import dumps
from pipeline._report import RunReport
from stages.files import dead_letter_record

if TYPE_CHECKING:
    from stages.llm._caller import LLMCaller

ERROR = "error"
"""Column holding a failed row's error message (``None`` on answers)."""
ERROR_RECORD = "error_record"
"""Column holding a failed row's dead-letter record as JSON text (``None`` on answers)."""


class RayItem:
    """One row an actor runs: the value, its key and origin (when the rows carry them)."""

    __slots__ = ("key", "origin", "value")

    def __init__(self, value: Any, key: Hashable | None = None, origin: str | None = None) -> None:
        self.value = value
        self.key = key
        self.origin = origin


class BatchOutcome:
    """What one batch became: answers, failures, rows left undone, and the run behind them.

    Attributes:
        outputs: The answers, with their envelopes (key, origin, sequence number).
        failures: The dead-letter records of the rows that failed.
        undone: Rows the actor did not start because it had to stop (never lost: the batch
            format reports them).
        stopped: Why the actor stopped taking rows, when it did.
        report: The batch run's report (its stage counters), once the run ended.
        caller: The batch's ``LLMCaller`` copy, if its stages hold one.
        results: The batch run's live results, while it runs.
    """

    def __init__(self) -> None:
        self.outputs: list[Envelope[Any]] = []
        self.failures: list[Failed] = []
        self.undone: list[RayItem] = []
        self.stopped: str | None = None
        self.report: RunReport | None = None
        self.caller: LLMCaller | None = None
        self.results: Results[Any] | None = None


class BatchFormat(Protocol):
    """How an actor reads a Ray batch into rows, and writes what became of them back."""

    def decode(self, batch: Any) -> tuple[list[RayItem], Any]:
        """Return the rows to run and anything to carry over to :meth:`encode`."""
        ...

    def encode(self, outcome: BatchOutcome, carried: Any) -> Any:
        """Return the batch to hand back to Ray."""
        ...


def _as_row(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    return {"value": value}


def _column(pa: Any, values: list[Any]) -> Any:
    """An Arrow column for ``values``; values that share no type become JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array(
            [None if v is None else v if isinstance(v, str) else dumps(v).decode() for v in values],
            type=pa.string(),
        )


def rows_table(rows: Sequence[Mapping[str, Any]], extra: Mapping[str, Any] | None = None) -> Any:
    """Return ``rows`` as an Arrow table: the union of their fields, ``None`` where missing.

    Args:
        rows: The rows.
        extra: Columns to add, by name, as ``(values, arrow type)`` pairs.
    """
    pa = importlib.import_module("pyarrow")
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    for name in extra or {}:
        names.pop(name, None)
    arrays = [_column(pa, [row.get(name) for row in rows]) for name in names]
    fields = list(names)
    for name, (values, kind) in (extra or {}).items():
        arrays.append(pa.array(values, type=kind))
        fields.append(name)
    return pa.Table.from_arrays(arrays, names=fields)


class RowsFormat:
    """The user transform's format: rows in; answers and failures out, as rows.

    A failed row has ``error`` (the message) and ``error_record`` (the dead-letter record as
    JSON); a row the actor did not start (it had to stop) is flagged ``not processed``.
    """

    def decode(self, batch: Any) -> tuple[list[RayItem], Any]:
        """Return the batch's rows (a pyarrow table) as items."""
        return [RayItem(row) for row in batch.to_pylist()], None

    def encode(self, outcome: BatchOutcome, carried: Any) -> Any:
        """Return answers and failures as one table with the two error columns."""
        pa = importlib.import_module("pyarrow")
        rows: list[dict[str, Any]] = []
        errors: list[str | None] = []
        records: list[str | None] = []
        for env in outcome.outputs:
            rows.append(_as_row(env.value))
            errors.append(None)
            records.append(None)
        failures = list(outcome.failures)
        message = f"not processed: {outcome.stopped or 'the actor stopped'}"
        for item in outcome.undone:  # never silently lost: flagged as not processed
            failures.append(
                Failed(item.value, "ray", "NotProcessed", message, 0, -1, item.key, item.origin)
            )
        for failed in failures:
            rows.append(_as_row(failed.item))
            errors.append(failed.message)
            records.append(dumps(dead_letter_record(failed)).decode())
        extra = {ERROR: (errors, pa.string()), ERROR_RECORD: (records, pa.string())}
        return rows_table(rows, extra)


__all__ = [
    "ERROR",
    "ERROR_RECORD",
    "BatchFormat",
    "BatchOutcome",
    "RayItem",
    "RowsFormat",
    "rows_table",
]
