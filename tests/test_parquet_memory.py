"""Parquet output: row groups bounded by bytes, so publishing holds one group's rows at most."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from pipeline import Pipeline
from stages.files import JsonlSource, ParquetSink

pq = pytest.importorskip("pyarrow.parquet")
pytestmark = pytest.mark.anyio


def write_rows(path: Path, rows: int, width: int) -> int:
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"i": i, "text": f"{i:08d}" + "x" * width}) + "\n")
    return path.stat().st_size


async def test_row_groups_are_cut_by_bytes(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    size = write_rows(src, 400, 1000)  # about 400 KB of JSON
    out = tmp_path / "out.parquet"
    await Pipeline(JsonlSource(src), ParquetSink(out, row_group_bytes=100_000)).run()
    meta = pq.ParquetFile(out).metadata
    assert meta.num_rows == 400
    assert meta.num_row_groups == pytest.approx((size + 400 * 512) / 100_000, abs=1)
    got = pq.read_table(out).column("i").to_pylist()
    assert sorted(got) == list(range(400))


async def peak_of_a_run(tmp_path: Path, rows: int) -> int:
    src = tmp_path / f"in{rows}.jsonl"
    write_rows(src, rows, 10_000)  # 10 KB rows: far under 65,536 rows per group
    sink = ParquetSink(tmp_path / f"out{rows}.parquet", row_group_bytes=1 << 20)
    tracemalloc.start()
    try:
        await Pipeline(JsonlSource(src), sink).run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert pq.ParquetFile(tmp_path / f"out{rows}.parquet").metadata.num_rows == rows
    return peak


async def test_publishing_wide_rows_holds_one_row_group(tmp_path: Path) -> None:
    await peak_of_a_run(tmp_path, 50)  # pyarrow's own lazy imports happen here
    small = await peak_of_a_run(tmp_path, 1000)  # 10 MB of JSON
    large = await peak_of_a_run(tmp_path, 3000)  # 30 MB of JSON
    assert large - small < 5 << 20, (small, large)  # flat: one group, not every row
