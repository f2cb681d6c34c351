"""Compressed files by extension, unknown extensions refused, CSV separators found."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import anyio
import pytest
import zstandard

from pipeline import ConfigError, Pipeline
from stages.files import count_rows, file_format, open_sink, open_source, sample_fields

pytestmark = pytest.mark.anyio

ROWS = [{"id": i, "name": f"n{i}", "note": 'é, "quoted"\n2nd line'} for i in range(50)]


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _unzip(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        return gzip.decompress(data)
    return zstandard.ZstdDecompressor().stream_reader(data).read()


async def _copy(source: str, sink: str) -> list[Any]:
    out: list[Any] = []
    with anyio.fail_after(20):
        async with Pipeline(open_source(source), open_sink(sink)).open() as results:
            async for row in results:
                out.append(row)
    return out


@pytest.mark.parametrize("ext", [".gz", ".zst"])
async def test_compressed_jsonl_in_and_compressed_csv_and_jsonl_out(
    tmp_path: Path, ext: str
) -> None:
    src = tmp_path / f"in.jsonl{ext}"
    raw = _jsonl(ROWS)
    src.write_bytes(gzip.compress(raw) if ext == ".gz" else zstandard.compress(raw))
    assert count_rows(src) == 50
    assert sample_fields(src) == ROWS[0]
    assert len(await _copy(str(src), str(tmp_path / f"out.jsonl{ext}"))) == 50
    out = _unzip(tmp_path / f"out.jsonl{ext}")
    assert [json.loads(line) for line in out.splitlines()] == ROWS
    await _copy(str(src), str(tmp_path / f"out.csv{ext}"))
    csv_out = tmp_path / f"out.csv{ext}"
    assert _unzip(csv_out).startswith(b"id,name,note\n0,n0,")
    assert count_rows(csv_out) == 50
    # and the compressed CSV reads back as the same rows (as strings)
    back = await _copy(str(csv_out), str(tmp_path / "back.jsonl"))
    assert [r["note"] for r in back] == [r["note"] for r in ROWS]


def test_unknown_extension_is_refused_with_the_known_ones() -> None:
    for path in ("answers.txt", "answers", "data.parquet.gz", "x.xlsx.gz"):
        with pytest.raises(ConfigError, match=r"unknown file extension .*known: \.jsonl.*\.gz"):
            file_format(path)
    with pytest.raises(ConfigError, match=r"unknown file extension '\.txt'"):
        open_sink("answers.txt")
    assert file_format("answers.txt", "csv") == "csv"  # a format given wins
    assert file_format("-") == "jsonl"
    assert file_format("a.TSV.GZ") == "tsv"


def test_parquet_sink_refuses_compression_it_does_internally(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown file extension '\.parquet\.zst'"):
        open_sink(tmp_path / "o.parquet.zst")


@pytest.mark.parametrize("sep", [";", "\t", "|"])
async def test_csv_separator_is_detected_from_the_header(tmp_path: Path, sep: str) -> None:
    src = tmp_path / "in.csv"
    src.write_text(f"name{sep}city\nAda{sep}London, UK\nBo{sep}Paris\n")
    assert sample_fields(src) == ["name", "city"]
    assert count_rows(src) == 2
    rows = await _copy(str(src), str(tmp_path / "o.jsonl"))
    assert rows == [{"name": "Ada", "city": "London, UK"}, {"name": "Bo", "city": "Paris"}]


async def test_a_comma_header_and_a_given_separator_win(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("name,note\nAda,a;b\n")
    assert await _copy(str(src), str(tmp_path / "o.jsonl")) == [{"name": "Ada", "note": "a;b"}]
    src.write_text("a;b\n1;2\n")
    source = open_source(src, delimiter=",")
    out: list[Any] = []
    async with Pipeline(source).open() as results:
        async for row in results:
            out.append(row)
    assert out == [{"a;b": "1;2"}]
