"""Parquet column types: inferred in plain Python as ``pyarrow.array`` infers them.

The sink used to infer each row group's types with ``pyarrow.array`` over the rows as Python
objects and widen them with ``unify_schemas``; it now infers in Python and lets pyarrow's JSON
reader build the arrays (no pandas import). These tests hold the two to the same schema and
the same values over random rows, and pin what changed: columns pyarrow could not write.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from pipeline import Pipeline
from stages.files import JsonlSource, ParquetSink
from stages.files._rows import cell

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytestmark = pytest.mark.anyio


def reference_schema(rows: list[dict[str, Any]], group: int) -> tuple[Any, set[str]]:
    """The former inference: ``pa.array`` per row group, widened with ``unify_schemas``."""
    names: dict[str, None] = {}
    types: dict[str, Any] = {}
    as_json: set[str] = set()
    for start in range(0, len(rows), group):
        chunk = rows[start : start + group]
        for row in chunk:
            names.update(dict.fromkeys(row))
        for name in names:
            if name in as_json:
                continue
            try:
                kind = pa.array([row.get(name) for row in chunk]).type
                known = types.get(name)
                if known is None or pa.types.is_null(known):
                    types[name] = kind
                elif not pa.types.is_null(kind) and kind != known:
                    merged = pa.unify_schemas(
                        [pa.schema([(name, known)]), pa.schema([(name, kind)])],
                        promote_options="permissive",
                    )
                    types[name] = merged.field(name).type
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                as_json.add(name)
    fields = [(n, pa.string() if n in as_json else types.get(n, pa.null())) for n in names]
    return pa.schema(fields), as_json


def shapes(rng: random.Random) -> dict[str, Any]:
    """Value makers by shape: scalars, lists, structs, nested, each sometimes null."""
    num = lambda: rng.choice([rng.randint(-(2**40), 2**40), rng.uniform(-1e6, 1e6)])  # noqa: E731
    text = lambda: rng.choice(["", "x", "café", "2024-01-01", "12"])  # noqa: E731
    some = lambda make: [make() for _ in range(rng.randint(0, 3))]  # noqa: E731
    return {
        "int": lambda: rng.randint(-(2**40), 2**40),
        "num": num,
        "str": text,
        "bool": lambda: rng.random() < 0.5,
        "ints": lambda: some(lambda: rng.randint(0, 9)),
        "nums": lambda: some(num),
        "texts": lambda: some(text),
        "nested": lambda: some(lambda: some(num)),
        "struct": lambda: {k: v() for k, v in (("a", num), ("b", text)) if rng.random() < 0.8},
        "deep": lambda: {"xs": some(lambda: {"x": num()}), "t": rng.random() < 0.5},
    }


def random_rows(seed: int, n: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    makers = shapes(rng)
    names = sorted(makers)
    columns = {  # most columns of one shape; some mix two (written as JSON text, or widened)
        f"c{i}": rng.sample(names, 1 if rng.random() < 0.7 else 2) for i in range(10)
    }
    rows = []
    for _ in range(n):
        row = {}
        for name, allowed in columns.items():
            if rng.random() < 0.85:
                row[name] = None if rng.random() < 0.1 else makers[rng.choice(allowed)]()
        rows.append(row)
    return rows


@pytest.mark.parametrize("seed", range(12))
async def test_types_and_values_match_pyarrow_inference(tmp_path: Path, seed: int) -> None:
    rows = random_rows(seed, 60)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.parquet"
    await Pipeline(JsonlSource(src), ParquetSink(out, row_group_rows=16)).run()
    rows = [json.loads(json.dumps(r)) for r in rows]  # as the journal holds them
    schema, as_json = reference_schema(rows, 16)
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == pq.read_schema(_written(tmp_path, schema))
    expected = [
        {n: (cell(row.get(n)) if n in as_json and row.get(n) is not None else row.get(n))
         for n in schema.names}
        for row in rows
    ]  # fmt: skip
    got = table.to_pylist()
    for want, have in zip(expected, got, strict=True):
        assert have.keys() == want.keys()
        for name in want:
            if name in as_json or want[name] is None:
                assert have[name] == want[name]
            else:
                assert have[name] == pa.array([want[name]], type=schema.field(name).type)[0].as_py()


def _written(tmp_path: Path, schema: Any) -> Path:
    """A file with the reference schema, to read back as Parquet gives it (list names)."""
    path = tmp_path / "reference.parquet"
    pq.write_table(schema.empty_table(), path)
    return path


async def test_columns_pyarrow_could_not_write_are_json_text(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    rows = [{"n": 2**60, "e": {}, "ok": 1}, {"n": 0.5, "e": {}, "ok": 2}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.parquet"
    # a row group each: the former inference widened int64 and double to double, then failed
    # to write 2**60 as a double; and Parquet cannot store a struct without fields
    await Pipeline(JsonlSource(src), ParquetSink(out, row_group_rows=1)).run()
    table = pq.read_table(out)
    assert table.column("n").to_pylist() == [str(2**60), "0.5"]
    assert table.column("e").to_pylist() == ["{}", "{}"]
    assert str(table.schema.field("ok").type) == "int64"
