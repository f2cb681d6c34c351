"""Huge input lines: read in linear time and bounded memory, dead-lettered past the maximum."""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import pytest

from pipeline import Pipeline
from pipeline.jobs._settings import JobSettings
from stages.files import JsonlSource, count_rows
from stages.files._rows import BLOCK, LineSplitter, LongLine


class Trickle(io.RawIOBase):
    """A file that hands out at most ``step`` bytes per read (lines span many reads)."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data = data
        self.step = step
        self.at = 0

    def readable(self) -> bool:
        return True

    def read1(self, size: int = -1) -> bytes:
        chunk = self.data[self.at : self.at + min(self.step, size if size > 0 else self.step)]
        self.at += len(chunk)
        return chunk


def split_all(splitter: LineSplitter) -> list[bytes | LongLine]:
    found: list[bytes | LongLine] = []
    while (lines := splitter.lines()) is not None:
        found.extend(lines)
    return found


@pytest.mark.parametrize("step", [1, 3, 64, 1 << 20])
def test_lines_that_span_reads_come_back_whole(step: int) -> None:
    data = b'\xef\xbb\xbf{"a": 1}\n\n' + b"x" * 200 + b"\nlast"
    lines = split_all(LineSplitter(Trickle(data, step), max_bytes=None))  # type: ignore[arg-type]
    assert lines == [b'{"a": 1}', b"", b"x" * 200, b"last"]


@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_a_line_over_the_maximum_is_reported_not_kept(step: int) -> None:
    data = b"short\n" + b"y" * 500 + b"\nafter\n"
    splitter = LineSplitter(Trickle(data, step), max_bytes=100)  # type: ignore[arg-type]
    lines = split_all(splitter)
    assert lines[0] == b"short" and lines[2] == b"after" and len(lines) == 3
    long = lines[1]
    assert isinstance(long, LongLine) and long.size == 500 and long.preview == b"y" * 500
    assert not splitter.unterminated


def test_a_huge_line_is_read_past_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as f:
        f.write(b'{"text": "')
        for _ in range(24):
            f.write(b"z" * BLOCK)  # 24 MiB on one line
        f.write(b'"}\n{"n": 2}\n')
    tracemalloc.start()
    try:
        with path.open("rb") as f:
            lines = split_all(LineSplitter(f, max_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(lines[0], LongLine) and lines[0].size == 24 * BLOCK + 12
    assert lines[1] == b'{"n": 2}'
    assert peak < 6 * BLOCK  # a few blocks, never the line


@pytest.mark.anyio
async def test_a_line_over_the_maximum_is_a_dead_letter_by_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    big = json.dumps({"id": "big", "text": "w" * 5000})
    path.write_text(f'{{"id": "a"}}\n{big}\n{{"id": "b"}}\n')
    source = JsonlSource(path, id_field="id", max_line_bytes=1000)
    report = await Pipeline(source).run()
    assert report.ok == 2 and report.failed == 1
    failure = report.failures[0]
    assert failure.key == 2 and failure.origin == f"{path}:2"
    assert failure.message == (
        f"line is {len(big):,} bytes, over the maximum of 1,000 (max_line_bytes, --max-line-bytes)"
    )
    assert str(failure.item).startswith('{"id": "big"') and str(failure.item).endswith("bytes)")


def test_count_rows_counts_lines_that_span_blocks(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"a" * (3 * BLOCK) + b"\n \n" + b"b" * BLOCK + b"\n\nc")
    assert count_rows(path) == 3
    path.write_bytes(b"\n" * BLOCK + b" " * BLOCK)
    assert count_rows(path) == 0


def test_the_maximum_is_a_job_setting() -> None:
    assert JobSettings().max_line_bytes == 16 << 20
    with pytest.raises(Exception, match="max_line_bytes"):
        JobSettings(max_line_bytes=0)
