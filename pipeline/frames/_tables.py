"""pandas, Polars and Arrow: reading rows out of each, and adding the answer columns back.

Each kind of input gets a :class:`Table`: its column names, a reader of bounded chunks for the
engine, and :meth:`Table.attach` that adds the answer and error columns to one chunk's batch.
The libraries are imported only when a value of theirs is given, so ``import pipeline`` stays
free of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from typing import Any

from pipeline._errors import ConfigError
from pipeline._json import dumps
from pipeline.frames._engine import Chunk
from pipeline.frames._options import Column, Kind, Plan


def _module_of(value: Any) -> str:
    return type(value).__module__.split(".", 1)[0]


def column_values(column: Column, answers: list[Any], *, typed: bool) -> list[Any]:
    """Return one answer column's values for a chunk's rows (``None`` for failed rows).

    Args:
        column: The column.
        answers: The rows' answers (a schema's object per row when structured).
        typed: Convert to the column's fixed type (Arrow, Polars): nested values become JSON
            text, integral floats of an integer field become ints. pandas keeps Python values.
    """
    if column.field is not None:
        field = column.field
        values = [a.get(field) if isinstance(a, dict) else None for a in answers]
    else:
        values = answers
    if not typed:
        return list(values)
    kind = column.kind
    if kind == "json":
        return [None if v is None else dumps(v).decode() for v in values]
    if kind == "int":
        return [int(v) if isinstance(v, float) and v.is_integer() else v for v in values]
    if kind == "float":
        return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in values]
    return list(values)


def _arrow_type(kind: Kind) -> Any:
    import pyarrow as pa

    types = {
        "text": pa.string(),
        "string": pa.string(),
        "json": pa.string(),
        "int": pa.int64(),
        "float": pa.float64(),
        "bool": pa.bool_(),
        "vector": pa.list_(pa.float64()),
    }
    return types[kind]


def _polars_type(kind: Kind) -> Any:
    import polars as pl

    types = {
        "text": pl.String,
        "string": pl.String,
        "json": pl.String,
        "int": pl.Int64,
        "float": pl.Float64,
        "bool": pl.Boolean,
        "vector": pl.List(pl.Float64),
    }
    return types[kind]


class _SliceReader:
    """Chunks of an in-memory table, by slicing."""

    blocking = False

    def __init__(self, total: int, chunk_rows: int, take: Any) -> None:
        self.total: int | None = total
        self._chunk_rows = chunk_rows
        self._take = take
        self._at = 0

    def read(self) -> tuple[Any, list[dict[str, Any]]] | None:
        if self._at >= (self.total or 0):
            return None
        start, self._at = self._at, min(self._at + self._chunk_rows, self.total or 0)
        chunk: tuple[Any, list[dict[str, Any]]] = self._take(start, self._at)
        return chunk

    def close(self) -> None:
        pass


class _BatchReader:
    """Chunks of a stream of batches (Arrow record batches, Polars frames), split if large."""

    blocking = True

    def __init__(
        self, batches: Iterator[Any], chunk_rows: int, rows_of: Any, total: int | None = None
    ) -> None:
        self.total = total
        self._batches = batches
        self._chunk_rows = chunk_rows
        self._rows_of = rows_of
        self._current: Any = None
        self._at = 0

    def read(self) -> tuple[Any, list[dict[str, Any]]] | None:
        while self._current is None or self._at >= len(self._current):
            batch = next(self._batches, None)
            if batch is None:
                return None
            self._current, self._at = batch, 0
        start, self._at = self._at, self._at + self._chunk_rows
        part = self._current
        if start > 0 or len(part) > self._chunk_rows:
            part = part.slice(start, self._chunk_rows)
        return part, self._rows_of(part)

    def close(self) -> None:
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()


class Table:
    """One kind of input: its columns, a chunk reader, and how answers are attached."""

    kind = "table"
    columns: list[str]

    def reader(self, plan: Plan, *, stream: bool = False) -> Any:
        """Return the engine's reader over the input's rows.

        Args:
            plan: The job's plan.
            stream: Chunks carry their part of the input, for :meth:`attach` (in-memory
                inputs otherwise keep only the answers, for :meth:`collect`).
        """
        raise NotImplementedError

    def attach(self, plan: Plan, chunk: Chunk) -> Any:
        """Return one finished chunk's batch with the answer and error columns added."""
        raise NotImplementedError

    def collect(self, plan: Plan, chunks: list[Chunk]) -> Any:
        """Return the whole input with the answer columns (in-memory inputs)."""
        raise NotImplementedError


class PandasTable(Table):
    """A pandas DataFrame: the same frame (index and order kept) with the columns added."""

    kind = "pandas"

    def __init__(self, frame: Any) -> None:
        self.frame = frame
        self.columns = [str(c) for c in frame.columns]
        self._labels = {str(c): c for c in frame.columns}

    def reader(self, plan: Plan, *, stream: bool = False) -> Any:
        labels = [self._labels[name] for name in plan.inputs]
        frame = self.frame

        def take(start: int, end: int) -> tuple[Any, list[dict[str, Any]]]:
            part = frame.iloc[start:end]
            rows = part[labels].to_dict("records") if labels else [{} for _ in range(len(part))]
            return (part if stream else None), rows

        return _SliceReader(len(frame), plan.chunk_rows, take)

    def _columns(self, plan: Plan, answers: list[Any], errors: list[Any], index: Any) -> Any:
        import pandas as pd

        data = {c.name: column_values(c, answers, typed=False) for c in plan.answers}
        data[plan.error_column] = errors
        return {
            name: pd.Series(values, index=index, dtype=_pandas_dtype(values))
            for name, values in data.items()
        }

    def attach(self, plan: Plan, chunk: Chunk) -> Any:
        part = chunk.payload
        return part.assign(**self._columns(plan, chunk.answers, chunk.errors, part.index))

    def collect(self, plan: Plan, chunks: list[Chunk]) -> Any:
        answers = [a for c in chunks for a in c.answers]
        errors = [e for c in chunks for e in c.errors]
        return self.frame.assign(**self._columns(plan, answers, errors, self.frame.index))


def _pandas_dtype(values: list[Any]) -> Any:
    """``object`` for columns of None only or of Python objects; pandas infers the rest."""
    if all(v is None for v in values):
        return object
    return None


class PolarsTable(Table):
    """A Polars DataFrame: the same frame with typed answer columns added."""

    kind = "polars"

    def __init__(self, frame: Any) -> None:
        self.frame = frame
        self.columns = list(frame.columns)

    def reader(self, plan: Plan, *, stream: bool = False) -> Any:
        frame = self.frame
        inputs = plan.inputs

        def take(start: int, end: int) -> tuple[Any, list[dict[str, Any]]]:
            part = frame.slice(start, end - start)
            rows = part.select(inputs).to_dicts() if inputs else [{} for _ in range(len(part))]
            return (part if stream else None), rows

        return _SliceReader(frame.height, plan.chunk_rows, take)

    def series(self, plan: Plan, answers: list[Any], errors: list[Any]) -> list[Any]:
        """Return the answer and error columns as typed Polars series."""
        import polars as pl

        found = [
            pl.Series(c.name, column_values(c, answers, typed=True), dtype=_polars_type(c.kind))
            for c in plan.answers
        ]
        found.append(pl.Series(plan.error_column, errors, dtype=pl.String))
        return found

    def attach(self, plan: Plan, chunk: Chunk) -> Any:
        return chunk.payload.with_columns(self.series(plan, chunk.answers, chunk.errors))

    def collect(self, plan: Plan, chunks: list[Chunk]) -> Any:
        answers = [a for c in chunks for a in c.answers]
        errors = [e for c in chunks for e in c.errors]
        return self.frame.with_columns(self.series(plan, answers, errors))


class LazyPolarsTable(PolarsTable):
    """A Polars LazyFrame, scanned in streaming batches; yields enriched DataFrames."""

    kind = "polars-lazy"

    def __init__(self, frame: Any) -> None:
        self.lazy = frame
        self.columns = list(frame.collect_schema().names())

    def reader(self, plan: Plan, *, stream: bool = True) -> Any:
        batches = self.lazy.collect_batches(chunk_size=plan.chunk_rows, lazy=True)
        inputs = plan.inputs

        def rows_of(part: Any) -> list[dict[str, Any]]:
            result: list[dict[str, Any]] = part.select(inputs).to_dicts()
            return result if inputs else [{} for _ in range(len(part))]

        return _BatchReader(_stoppable(batches), plan.chunk_rows, rows_of)


def _stoppable(batches: Any) -> Iterator[Any]:
    """Iterate Polars' batch collector, stopping its query when abandoned."""
    try:
        yield from batches
    finally:
        stop = getattr(batches, "stop", None)
        if stop is not None:
            stop()


class ArrowTable(Table):
    """A ``pyarrow.Table``, ``RecordBatchReader`` or iterable of record batches."""

    kind = "arrow"

    def __init__(self, data: Any) -> None:
        import pyarrow as pa

        self.total: int | None = None
        if isinstance(data, pa.Table):
            self.total = data.num_rows
            self.schema = data.schema
            self.batches: Iterator[Any] = iter(data.to_batches())
        elif isinstance(data, pa.RecordBatchReader):
            self.schema = data.schema
            self.batches = iter(data)
        elif isinstance(data, pa.RecordBatch):
            self.total = data.num_rows
            self.schema = data.schema
            self.batches = iter([data])
        else:
            batches = iter(data)
            first = next(batches, None)
            if first is None:
                raise ConfigError(
                    "the iterable of record batches is empty: its schema is unknown"
                    " (pass a pyarrow.Table or RecordBatchReader)"
                )
            if not isinstance(first, pa.RecordBatch):
                raise ConfigError(f"expected pyarrow RecordBatch items, got {type(first).__name__}")
            self.schema = first.schema
            self.batches = _prepend(first, batches)
        self.columns = list(self.schema.names)

    def output_schema(self, plan: Plan) -> Any:
        """Return the schema of the enriched batches."""
        import pyarrow as pa

        fields = list(self.schema)
        fields += [pa.field(c.name, _arrow_type(c.kind)) for c in plan.answers]
        fields.append(pa.field(plan.error_column, pa.string()))
        return pa.schema(fields, metadata=self.schema.metadata)

    def reader(self, plan: Plan, *, stream: bool = True) -> Any:
        inputs = plan.inputs

        def rows_of(part: Any) -> list[dict[str, Any]]:
            if not inputs:
                return [{} for _ in range(part.num_rows)]
            result: list[dict[str, Any]] = part.select(inputs).to_pylist()
            return result

        return _BatchReader(self.batches, plan.chunk_rows, rows_of, self.total)

    def attach(self, plan: Plan, chunk: Chunk) -> Any:
        import pyarrow as pa

        schema = self.output_schema(plan)
        arrays = list(chunk.payload.columns)
        for column in plan.answers:
            values = column_values(column, chunk.answers, typed=True)
            arrays.append(pa.array(values, type=_arrow_type(column.kind)))
        arrays.append(pa.array(chunk.errors, type=pa.string()))
        return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _prepend(first: Any, rest: Iterable[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def table_of(data: Any) -> Table:
    """Return the :class:`Table` for an input, or say plainly which inputs are accepted.

    Raises:
        ConfigError: Not a pandas or Polars frame nor Arrow data.
    """
    module = _module_of(data)
    if module == "pandas" and type(data).__name__ == "DataFrame":
        return PandasTable(data)
    if module == "polars":
        name = type(data).__name__
        if name == "DataFrame":
            return PolarsTable(data)
        if name == "LazyFrame":
            return LazyPolarsTable(data)
    if module == "pyarrow":
        return ArrowTable(data)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict)):
        try:
            importlib.import_module("pyarrow")
        except ImportError:
            pass
        else:
            return ArrowTable(data)
    raise ConfigError(
        f"cannot enrich a {type(data).__module__}.{type(data).__name__}: give a pandas or Polars"
        " DataFrame, a Polars LazyFrame, a pyarrow Table or RecordBatchReader, or an iterable of"
        " pyarrow RecordBatches"
    )
