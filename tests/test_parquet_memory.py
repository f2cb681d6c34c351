"""Parquet output: row groups bounded by bytes, so publishing holds one group's rows at most,
and a Parquet publish never imports pandas (pyarrow would, converting Python objects)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from cli_probe import probe_cli
from sim_thread import ThreadSim

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


def test_a_parquet_job_publishes_without_importing_pandas(tmp_path: Path) -> None:
    pytest.importorskip("pandas")  # installed: pyarrow's Python conversions would import it
    inp = tmp_path / "in.jsonl"
    rows = [{"id": f"r{i}", "n": i, "meta": {"k": [i, 1.5]}, "mixed": i if i % 2 else "x"}
            for i in range(50)]  # fmt: skip
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.parquet"
    with ThreadSim() as sim:
        found = probe_cli(
            ["run", str(inp), "-o", str(out), "--model", "m", "--prompt", "Hi {id}",
             "--base-url", sim.url, "--id-field", "id", "--quiet"]
        )  # fmt: skip
    assert found["code"] == 0
    assert "pyarrow.parquet" in found["modules"]  # it did write Parquet
    assert [m for m in found["modules"] if m == "pandas" or m.startswith("pandas.")] == []
    table = pq.read_table(out)
    assert table.num_rows == 50
    assert str(table.schema.field("meta").type) == "struct<k: list<element: double>>"
    assert sorted(table.column("mixed").to_pylist())[:2] == ["1", "11"]  # text: mixed types
