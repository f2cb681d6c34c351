"""File sources and sinks: keys, bad rows, skipping, chunked atomic writes, formats."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest

import pipeline as pl
from pipeline import ConfigError, Envelope, Failed, FatalError, Pipeline
from pipeline.jobs._journal import JournalFile
from stages.files import (
    CsvSink,
    CsvSource,
    DeadLetterSink,
    JsonlSink,
    JsonlSource,
    ParquetSink,
    ParquetSource,
    count_rows,
    encode_record,
    open_sink,
    open_source,
)
from stages.files._formats import file_format
from stages.files._rows import line_of

pytestmark = pytest.mark.anyio


async def collect(p: Pipeline) -> tuple[list[Envelope[Any]], pl.RunReport]:
    """Run a pipeline, returning its result envelopes and report."""
    out: list[Envelope[Any]] = []
    with anyio.fail_after(10):
        async with p.open() as results:
            async for env in results.envelopes():
                out.append(env)
    assert results.report is not None
    assert results.report.balanced
    return out, results.report


def by_message(failures: list[Failed]) -> dict[Any, str]:
    return {f.key: f.message for f in failures}


# -- JSONL source --------------------------------------------------------------------------


async def test_jsonl_rows_keys_origins_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\n   \n{"a": 2}\n{"a": 3}')  # BOM, CRLF, no final \n
    envs, report = await collect(Pipeline(JsonlSource(path)))
    assert [e.value for e in envs] == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert [e.key for e in envs] == [1, 4, 5]
    assert [e.origin for e in envs] == [f"{path}:1", f"{path}:4", f"{path}:5"]
    assert report.rows_in == 3 and report.failed == 0


async def test_empty_file_is_an_empty_successful_job(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_bytes(b"")
    out = tmp_path / "out.jsonl"
    envs, report = await collect(Pipeline(JsonlSource(tmp_path / "in.jsonl"), JsonlSink(out)))
    assert envs == [] and report.rows_in == 0 and report.complete
    assert out.read_bytes() == b""


async def test_every_kind_of_bad_jsonl_row_is_dead_lettered_with_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b'{"ok": 1}\n'
        b"{not json}\n"
        b"[1, 2]\n"
        b'"text"\n'
        b'{"s": "caf\xe9"}\n'  # latin-1, not UTF-8
        b"42\n"
        b'{"ok": 2}\n'
    )
    source = JsonlSource(path)
    envs, report = await collect(Pipeline(source))
    assert [e.value for e in envs] == [{"ok": 1}, {"ok": 2}]
    messages = by_message(report.failures)
    assert messages[2].startswith("invalid JSON: Expecting property name")
    assert messages[3] == "line is an array, not a JSON object"
    assert messages[4] == "line is a string, not a JSON object"
    assert messages[5] == "invalid UTF-8 encoding at byte 10"
    assert messages[6] == "line is a number, not a JSON object"
    failed = {f.key: f for f in report.failures}
    assert failed[2].item == "{not json}"  # the raw text is kept, nothing is lost
    assert failed[5].item == '{"s": "caf\ufffd"}'
    assert failed[2].origin == f"{path}:2" and failed[2].error_type == "BadRowError"
    assert (source.emitted, source.rejected, report.rows_in) == (2, 5, 7)


async def test_id_field_keys_missing_unusable_and_duplicate_ids(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    rows = [
        {"id": "a", "v": 1},
        {"v": 2},
        {"id": 7, "v": 3},
        {"id": "a", "v": 4},
        {"id": None, "v": 5},
        {"id": [1], "v": 6},
        {"id": "7", "v": 7},
        {"id": "", "v": 8},
        {"id": "b", "v": 9},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    envs, report = await collect(Pipeline(JsonlSource(path, id_field="id")))
    assert [(e.key, e.value["v"]) for e in envs] == [("a", 1), ("7", 3), ("b", 9)]
    messages = by_message(report.failures)
    # rows without a usable id, and repeats, are keyed by their line number (an int)
    assert messages == {
        2: "missing id field 'id'",
        4: "duplicate id 'a' in field 'id' (first on line 1)",
        5: "id field 'id' is null, not a string or number",
        6: "id field 'id' must be a string or number, got list",
        7: "duplicate id '7' in field 'id' (first on line 3)",
        8: "id field 'id' is empty",
    }
    assert {f.key: f.item for f in report.failures}[4] == {"id": "a", "v": 4}


async def test_skip_lines_skips_done_rows_and_done_rejects(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"n": 1}\n{"n": 2}\nbad\n{"n": 4}\nbad\n')
    source = JsonlSource(path, skip_lines={1, 3, 4})
    envs, report = await collect(Pipeline(source))
    assert [e.key for e in envs] == [2]
    assert [f.key for f in report.failures] == [5]
    assert source.skipped == 3 and report.rows_in == 2  # skipped rows are not input of this run


async def test_skip_lines_with_an_id_field_still_detects_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "x"}\n{"id": "y"}\n{"id": "x"}\n{"id": "x"}\n')
    # run 1 finished "x" (line 1) and dead-lettered the duplicate on line 3
    source = JsonlSource(path, id_field="id", skip_lines={1, 3})
    envs, report = await collect(Pipeline(source))
    assert [e.key for e in envs] == ["y"]
    assert [(f.key, f.message) for f in report.failures] == [
        (4, "duplicate id 'x' in field 'id' (first on line 1)")
    ]
    assert source.skipped == 2


async def test_jsonl_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"".join(b'{"i": %d}\n' % i for i in range(5000))

    class FakeStdin:
        buffer = io.BufferedReader(io.BytesIO(data))  # type: ignore[arg-type]

    monkeypatch.setattr(sys, "stdin", FakeStdin())
    envs, _ = await collect(Pipeline(JsonlSource("-")))
    assert [e.value["i"] for e in envs] == list(range(5000))
    assert envs[3].origin == "<stdin>:4"


async def test_long_file_spanning_many_read_blocks(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    pad = "x" * 300
    with path.open("w") as f:
        for i in range(12000):  # ~3.8 MB: several 1 MiB blocks with lines cut at block edges
            f.write(json.dumps({"i": i, "pad": pad}) + "\n")
    envs, _ = await collect(Pipeline(JsonlSource(path)))
    assert [e.value["i"] for e in envs] == list(range(12000))
    assert [e.key for e in envs] == list(range(1, 12001))
    assert count_rows(path) == 12000


async def test_missing_input_file_is_fatal_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FatalError, match=r"nope\.jsonl"):
        await Pipeline(JsonlSource(tmp_path / "nope.jsonl")).run()


# -- CSV source ----------------------------------------------------------------------------


async def test_csv_rows_line_numbers_and_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(
        b"id,text\n"  # line 1
        b"a,hello\n"  # line 2
        b'b,"two\nlines"\n'  # lines 3-4
        b"\n"  # line 5, blank
        b"c,too,many\n"  # line 6
        b"d,caf\xe9\n"  # line 7, not UTF-8
        b"e,end"  # line 8, no final newline
    )
    envs, report = await collect(Pipeline(CsvSource(path)))
    assert [(e.key, e.value) for e in envs] == [
        (2, {"id": "a", "text": "hello"}),
        (3, {"id": "b", "text": "two\nlines"}),
        (8, {"id": "e", "text": "end"}),
    ]
    assert by_message(report.failures) == {
        6: "row has 3 fields, the header has 2",
        7: "invalid UTF-8 on line 7 (if the file is not in that encoding, give its encoding:"
        " --encoding latin-1, cp1252...)",
    }
    assert {f.key: f.item for f in report.failures}[6] == "c,too,many"
    assert count_rows(path) == 5


async def test_csv_id_field_and_tsv(tmp_path: Path) -> None:
    path = tmp_path / "in.tsv"
    path.write_text("name\tid\nada\t1\nbob\t1\n")
    source = open_source(path, id_field="id")
    assert isinstance(source, CsvSource) and source.delimiter == "\t"
    envs, report = await collect(Pipeline(source))
    assert [(e.key, e.value["name"]) for e in envs] == [("1", "ada")]
    assert [f.key for f in report.failures] == [3]


async def test_csv_bad_header_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("a,a\n1,2\n")
    with pytest.raises(ConfigError, match="header names column 'a' twice"):
        await Pipeline(CsvSource(path)).run()
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="id field 'id' is not a column"):
        await Pipeline(CsvSource(path, id_field="id")).run()
    path.write_bytes(b"n\xe4me,city\nJos\xe9,M\xfcnchen\n")  # Latin-1
    with pytest.raises(ConfigError, match=r"invalid UTF-8 on line 1.*--encoding latin-1"):
        await Pipeline(CsvSource(path)).run()
    envs, _ = await collect(Pipeline(CsvSource(path, encoding="latin-1")))
    assert [e.value for e in envs] == [{"näme": "José", "city": "München"}]


async def test_csv_unterminated_quote_is_a_bad_row_naming_its_line(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text('id,text\n1,fine\n2,"open\n3,swallowed\n4,too\n')
    envs, report = await collect(Pipeline(CsvSource(path)))
    assert [e.key for e in envs] == [2]
    [failed] = report.failures
    assert failed.key == 3 and "the quote opened on line 3 is never closed" in failed.message
    assert "4,too" in failed.item  # the rest of the file is in the record, not lost


async def test_big_integers_and_unicode_survive_a_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        b'{"big": 1180591620717411303424, "neg": -92233720368547758090,'
        b' "u": "\\u2028 caf\xc3\xa9 \\ud83d\\ude00"}\n'
    )
    out = tmp_path / "out.jsonl"
    await Pipeline(JsonlSource(src), JsonlSink(out)).run()
    # U+2028 stays raw in JSON text: JSON Lines split on "\n" only (not str.splitlines)
    (row,) = [json.loads(x) for x in out.read_text(encoding="utf-8").split("\n") if x]
    assert row == {"big": 2**70, "neg": -92233720368547758090, "u": "\u2028 caf\u00e9 \U0001f600"}
    await Pipeline(JsonlSource(out), ParquetSink(tmp_path / "out.parquet")).run()
    envs, _ = await collect(Pipeline(ParquetSource(tmp_path / "out.parquet")))
    assert envs[0].value["big"] == str(2**70)  # too big for any Parquet integer: kept as text


async def test_missing_pyarrow_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.files._rows as files

    def no_pyarrow(name: str) -> Any:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(files.importlib, "import_module", no_pyarrow)
    with pytest.raises(pl.ConfigError, match=r"pip install 'llm-pipeline\[parquet\]'"):
        ParquetSource("in.parquet")
    with pytest.raises(pl.ConfigError, match=r"\[parquet\]"):
        ParquetSink("out.parquet")


async def test_csv_empty_and_header_only_files(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("")
    assert (await Pipeline(CsvSource(path)).run()).rows_in == 0
    path.write_text("a,b\n")
    assert (await Pipeline(CsvSource(path)).run()).rows_in == 0
    assert count_rows(path) == 0
    out = tmp_path / "out.csv"
    await Pipeline([], CsvSink(out)).run()
    assert out.read_text() == ""


# -- Parquet -------------------------------------------------------------------------------


async def test_parquet_round_trip_with_types_and_ids(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    rows = [{"id": i, "name": f"n{i}", "score": i / 2, "tags": ["a"] * (i % 3)} for i in range(10)]
    rows[3]["extra"] = "only here"
    rows[5]["score"] = 5  # an int among floats: the column stays double
    rows[6]["name"] = 6  # a number among strings: the column is written as text
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.parquet"
    await Pipeline(JsonlSource(src), ParquetSink(out, row_group_rows=4)).run()
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert table.num_rows == 10
    assert pq.ParquetFile(out).metadata.num_row_groups == 3
    assert str(table.schema.field("score").type) == "double"
    assert table.column("name").to_pylist()[5:7] == ["n5", "6"]
    assert table.column("extra").to_pylist()[3] == "only here"
    assert table.column("extra").null_count == 9
    assert count_rows(out) == 10
    envs, _ = await collect(Pipeline(ParquetSource(out, id_field="id", batch_rows=3)))
    assert [e.key for e in envs] == [str(i) for i in range(10)]
    assert envs[4].origin == f"{out}:5" and envs[4].value["tags"] == ["a"]


async def test_parquet_from_stdin_and_from_a_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": range(3000), "text": [f"t{i}" for i in range(3000)]}), path)
    data = path.read_bytes()

    class FakeStdin:
        buffer = io.BufferedReader(io.BytesIO(data))  # type: ignore[arg-type]

    monkeypatch.setattr(sys, "stdin", FakeStdin())
    envs, _ = await collect(Pipeline(ParquetSource("-", id_field="id")))
    assert [e.value["id"] for e in envs] == list(range(3000))
    assert envs[3].origin == "<stdin>:4"
    fifo = tmp_path / "pipe.parquet"
    os.mkfifo(fifo)

    def feed() -> None:
        with contextlib.suppress(BrokenPipeError), open(fifo, "wb") as f:
            f.write(data)  # the open blocks until a reader opens the pipe

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, feed)
        try:
            envs, _ = await collect(Pipeline(ParquetSource(fifo)))
        finally:  # a source that failed before opening the pipe must not leave feed() blocked
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
    assert [e.value["id"] for e in envs] == list(range(3000))


async def test_parquet_rejects_stdout_and_non_parquet_input(tmp_path: Path) -> None:
    with pytest.raises(pl.ConfigError, match="needs a file path"):
        ParquetSink("-")
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(FatalError, match="not a readable Parquet file"):
        await Pipeline(ParquetSource(bad)).run()


# -- sinks ---------------------------------------------------------------------------------


async def test_sink_writes_forwards_and_publishes_atomically(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("old complete file\n")
    seen = []
    gate = anyio.Event()

    async def hold(row: dict[str, int]) -> dict[str, int]:
        if row["i"] == 5:
            await gate.wait()
        return row

    p = Pipeline(({"i": i} for i in range(10)), pl.map(hold), JsonlSink(out))
    with anyio.fail_after(10):
        async with p.open() as results:
            async for row in results:
                seen.append(row)
                if len(seen) == 5:
                    # rows 0-4 are written to the journal, but the old file is still whole
                    assert out.read_text() == "old complete file\n"
                    partials = [p for p in os.listdir(tmp_path) if p.endswith(".partial")]
                    assert len(partials) == 1
                    gate.set()
    assert seen == [{"i": i} for i in range(10)]
    assert [json.loads(line) for line in out.read_text().splitlines()] == seen
    assert os.listdir(tmp_path) == ["out.jsonl"]


async def test_sink_leaves_nothing_when_the_run_fails(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"

    def boom(x: int) -> int:
        if x == 50:
            raise FatalError("stop")
        return x

    with pytest.raises(FatalError):
        await Pipeline(range(100), pl.map(boom), JsonlSink(out)).run()
    assert os.listdir(tmp_path) == []


async def test_write_errors_are_fatal_and_name_the_path(tmp_path: Path) -> None:
    out = tmp_path / "missing-dir" / "out.jsonl"
    with pytest.raises(FatalError, match="missing-dir"):
        await Pipeline(range(3), JsonlSink(out)).run()


async def test_unencodable_item_is_dead_lettered_by_the_sink(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    loop: dict[str, Any] = {}
    loop["self"] = loop
    report = await Pipeline([{"a": 1}, loop, {"a": 2}], JsonlSink(out)).run()
    assert report.ok == 2 and report.failed == 1
    assert "cannot write the item" in report.failures[0].message
    assert out.read_text().splitlines() == ['{"a":1}', '{"a":2}']


async def test_csv_sink_union_header_and_cells(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    rows = [
        {"a": "x,y", "b": 1},
        {"b": True, "c": None},
        {"a": "line\nbreak", "d": {"k": [1, 2]}},
        "not a row",
    ]
    report = await Pipeline(rows, CsvSink(out)).run()
    assert report.ok == 3 and "mapping" in report.failures[0].message
    assert out.read_text() == ('a,b,c,d\n"x,y",1,,\n,true,,\n"line\nbreak",,,"{""k"":[1,2]}"\n')
    envs, _ = await collect(Pipeline(CsvSource(out)))
    assert envs[2].value["a"] == "line\nbreak"


async def test_jsonl_and_csv_to_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeStdout:
        buffer = io.BytesIO()

    fake = FakeStdout()
    monkeypatch.setattr(sys, "stdout", fake)
    await Pipeline([{"a": 1}, {"a": 2}], JsonlSink("-")).run()
    assert fake.buffer.getvalue() == b'{"a":1}\n{"a":2}\n'
    fake.buffer = io.BytesIO()
    report = await Pipeline([{"a": 1, "b": 2}, {"a": 3, "z": 9}, {"b": 4}], CsvSink("-")).run()
    assert fake.buffer.getvalue() == b"a,b\n1,2\n,4\n"
    assert (
        report.failed == 1 and "'z' not among the CSV columns (a, b)" in report.failures[0].message
    )


async def test_dead_letter_sink_records(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"n": 1}\nbroken\n{"n": 3}\n')
    dead = tmp_path / "failed.jsonl"

    def check(row: dict[str, int]) -> dict[str, int]:
        if row["n"] == 3:
            raise pl.ItemError("server said no", status=400, attempts=2)
        return row

    report = await Pipeline(
        JsonlSource(src), pl.map(check, name="check"), dead_letter=DeadLetterSink(dead)
    ).run()
    assert report.ok == 1 and report.failed == 2
    records = sorted(
        (json.loads(x) for x in dead.read_text().splitlines()), key=lambda r: r["line"]
    )
    assert records == [
        {
            "key": 2,
            "line": 2,
            "origin": f"{src}:2",
            "stage": "jsonl",
            "row": "broken",
            "error": {
                "type": "BadRowError",
                "message": "invalid JSON: Expecting value at column 1",
                "status": None,
                "attempts": 1,
            },
        },
        {
            "key": 3,
            "line": 3,
            "origin": f"{src}:3",
            "stage": "check",
            "row": {"n": 3},
            "error": {
                "type": "ItemError",
                "message": "server said no",
                "status": 400,
                "attempts": 2,
            },
        },
    ]


async def test_sink_on_a_journal_file_appends_and_does_not_publish(tmp_path: Path) -> None:
    final = tmp_path / "out.jsonl"
    journal = JournalFile(str(final) + ".partial", final)
    await Pipeline(jsonl_source_of(tmp_path, 3), JsonlSink(journal)).run()
    assert not final.exists()
    records = (tmp_path / "out.jsonl.partial").read_bytes()
    assert records == b"".join(encode_record(i + 1, i + 1, b'{"i":%d}' % i) for i in range(3))
    journal.publish()
    assert final.read_text() == '{"i":0}\n{"i":1}\n{"i":2}\n'


def jsonl_source_of(tmp_path: Path, n: int) -> JsonlSource:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(n)))
    return JsonlSource(path)


async def test_sink_fsyncs_on_a_quiet_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "out.jsonl"
    journal = JournalFile(str(final) + ".partial", final)
    synced = anyio.Event()
    real_sync = journal.sync

    def sync() -> None:  # runs in a worker thread
        real_sync()
        anyio.from_thread.run_sync(synced.set)

    monkeypatch.setattr(journal, "sync", sync)
    release = anyio.Event()

    async def items() -> Any:
        yield {"i": 1}
        await release.wait()  # the stream goes quiet: the sink must fsync by itself
        yield {"i": 2}

    async def watch() -> None:
        await synced.wait()
        release.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await Pipeline(items(), JsonlSink(journal, fsync_interval=0.01)).run()
    assert synced.is_set()
    assert len((tmp_path / "out.jsonl.partial").read_bytes().splitlines()) == 2


def test_formats_by_extension() -> None:
    assert file_format("a.JSONL") == "jsonl" and file_format("-") == "jsonl"
    assert file_format("a.csv") == "csv" and file_format("a.tsv") == "tsv"
    assert file_format("a.parquet") == "parquet" and file_format("a.txt", "csv") == "csv"
    assert isinstance(open_sink("x.csv"), CsvSink) and isinstance(open_sink("x.pq"), ParquetSink)
    assert isinstance(open_sink("x.jsonl"), JsonlSink)
    assert isinstance(open_source("x.parquet"), ParquetSource)
    with pytest.raises(pl.ConfigError, match="unknown file format"):
        file_format("a", "xml")
    assert line_of("data/in.jsonl:17") == 17 and line_of("weird") is None and line_of(None) is None
    assert count_rows("-") is None
