"""The exactly-once job journal: resume, torn tails, fingerprints, atomic publish, SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline as pl
from pipeline import ConfigError, FatalError, Pipeline
from pipeline.jobs._journal import Journal, ResumeError
from stages.files import CsvSink, DeadLetterSink, JsonlSink, JsonlSource
from stages.files._records import (
    JournalCorruptError,
    JournalFile,
    LineSet,
    build_final,
    encode_record,
    parse_record,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[1]


def write_input(path: Path, n: int, *, bad_every: int = 0) -> list[Hashable]:
    """Write ``n`` rows (plus bad lines); return every key the job must account for."""
    keys: list[Hashable] = []
    with path.open("w") as f:
        line = 0
        for i in range(n):
            if bad_every and i % bad_every == bad_every - 1:
                line += 1
                f.write("{broken\n")
                keys.append(line)
            line += 1
            f.write(json.dumps({"id": f"r{i}", "n": line}) + "\n")
            keys.append(f"r{i}")
    return keys


def append_records(journal: JournalFile, records: list[tuple[int, Hashable, Any]]) -> None:
    journal.open()
    data = b"".join(encode_record(line, key, json.dumps(p).encode()) for line, key, p in records)
    journal.append(data, len(records))
    journal.close()


def read_job(out: Path) -> tuple[list[Any], list[Any]]:
    """The published output rows and dead-letter records of a job."""
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    dead = [json.loads(x) for x in Path(f"{out}.failed.jsonl").read_text().splitlines()]
    return rows, dead


def files_in(path: Path) -> list[str]:
    return sorted(os.listdir(path))


# -- records and key sets ------------------------------------------------------------------


def test_records_round_trip() -> None:
    record = encode_record(17, "id\twith tab", b'{"a":"x\\ty"}')
    assert record.count(b"\t") == 3 and record.endswith(b"\n")
    assert parse_record(record) == (17, "id\twith tab", b'{"a":"x\\ty"}\n')
    assert parse_record(encode_record(3, ("a", 1), b"{}"))[1] == ("a", 1)
    with pytest.raises(ValueError):
        parse_record(b'1\t"k"\t{"torn"')


def test_a_record_whose_bytes_changed_fails_its_checksum() -> None:
    record = encode_record(5, "k", b'{"answer": "yes"}')
    assert parse_record(record)[0] == 5
    for damaged in (
        record.replace(b"yes", b"yeS"),  # a flipped byte
        record.replace(b'"yes"}', b'"y'),  # cut off, the checksum kept
        record[:12] + record[-10:],  # cut off in the middle
    ):
        with pytest.raises(ValueError, match="damaged"):
            parse_record(damaged)


def test_line_set() -> None:
    lines = LineSet([1, 2, 1_000_000, 0])
    assert len(lines) == 4
    for line in (0, 1, 2, 1_000_000):
        assert line in lines
    for other in (3, 999_999, 1 << 41, -1, "1", None, 2.5):
        assert other not in lines
    assert lines.add(1) is False and lines.add(3) is True
    assert len(lines) == 5
    with pytest.raises(ValueError):
        lines.add(-5)
    copied = lines.copy()  # the final check keeps the answered lines this way
    assert lines.add(7) and 7 not in copied and len(copied) == 5 and 1_000_000 in copied


# -- open: fresh, refusals, overwrite ------------------------------------------------------


def test_fresh_job_creates_manifest_then_commit_publishes(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    write_input(inp, 3)
    out = tmp_path / "out.jsonl"
    journal = Journal(out, settings={"prompt": "p", "model": "m"}, input=inp)
    journal.open()
    assert files_in(tmp_path) == [
        "in.jsonl",
        "out.jsonl.checkpoint.json",
        "out.jsonl.failed.jsonl.partial",
        "out.jsonl.partial",
    ]
    manifest = json.loads((tmp_path / "out.jsonl.checkpoint.json").read_text())
    assert manifest["job"]["settings"] == {"prompt": "p", "model": "m"}
    assert manifest["job"]["input"]["size"] == inp.stat().st_size
    assert manifest["state"] == "running"
    append_records(journal.output, [(1, "r0", {"a": 1}), (2, "r1", {"a": 2})])
    append_records(journal.dead_letter, [(3, "r2", {"error": "x"})])
    journal.commit()
    assert files_in(tmp_path) == ["in.jsonl", "out.jsonl", "out.jsonl.failed.jsonl"]
    assert out.read_text() == '{"a": 1}\n{"a": 2}\n'
    assert (tmp_path / "out.jsonl.failed.jsonl").read_text() == '{"error": "x"}\n'
    assert journal.complete


def test_discard_removes_a_job_that_finished_no_row(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    journal = Journal(out, input=None)
    journal.open()
    assert files_in(tmp_path) == [
        "out.jsonl.checkpoint.json", "out.jsonl.failed.jsonl.partial", "out.jsonl.partial"
    ]  # fmt: skip
    assert journal.discard()
    assert files_in(tmp_path) == []
    started = Journal(out)
    started.open()
    append_records(started.dead_letter, [(1, 1, {"dead": 1})])
    assert not started.discard()  # a row is finished: the job stays resumable
    resumed = Journal(out, resume=True)
    resumed.open()
    assert not resumed.discard() and 1 in resumed.done
    assert "out.jsonl.checkpoint.json" in files_in(tmp_path)


def test_leftovers_without_resume_are_refused_with_a_hint(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    Journal(out).open()
    with pytest.raises(ResumeError, match="use --resume to continue it or --overwrite"):
        Journal(out).open()
    os.unlink(tmp_path / "out.jsonl.checkpoint.json")
    with pytest.raises(ResumeError, match=r"no checkpoint .* use --overwrite"):
        Journal(out, resume=True).open()
    journal = Journal(out, overwrite=True)
    journal.open()
    assert not journal.resumed and len(journal.done) == 0


def test_resume_without_a_checkpoint_starts_fresh(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "out.jsonl", resume=True)
    journal.open()
    assert not journal.resumed and not journal.complete
    assert (tmp_path / "out.jsonl.checkpoint.json").exists()


def test_bad_configurations(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not stdout"):
        Journal("-")
    with pytest.raises(ConfigError, match="contradict"):
        Journal(tmp_path / "o", resume=True, overwrite=True)
    inp = tmp_path / "in.jsonl"
    inp.write_text("{}\n")
    with pytest.raises(ConfigError, match="is the input file"):
        Journal(inp, input=inp)
    with pytest.raises(ConfigError, match="cannot be the output"):
        Journal(tmp_path / "o", dead_letter=tmp_path / "o")


def test_fingerprint_mismatches_name_what_differs(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    write_input(inp, 50)
    out = tmp_path / "out.jsonl"
    base = {"prompt": "Say hello to {name}", "model": "gpt-a", "output_field": "answer"}
    Journal(out, settings=base, input=inp).open()

    def refusal(settings: dict[str, Any], input: Path = inp) -> str:
        with pytest.raises(ResumeError) as info:
            Journal(out, settings=settings, input=input, resume=True).open()
        return str(info.value)

    message = refusal({**base, "prompt": "Say hi to {name}"})
    assert 'prompt (was "Say hello to {name}", now "Say hi to {name}")' in message
    assert "model" not in message and "--overwrite" in message
    message = refusal({**base, "model": "gpt-b", "system": "be brief"})
    assert 'model (was "gpt-a", now "gpt-b")' in message
    assert 'system (was null, now "be brief")' in message
    other = tmp_path / "other.jsonl"
    other.write_bytes(inp.read_bytes())
    assert "input file (was" in refusal(base, other)
    original = inp.read_bytes()
    inp.write_bytes(original + b'{"id": "extra"}\n')
    assert f"input file contents (size was {len(original)}" in refusal(base)
    inp.write_bytes(original.replace(b'"r0"', b'"R0"'))  # same size, first MiB differs
    assert "first or last MiB changed" in refusal(base)
    inp.write_bytes(original)
    os.utime(inp, (0, 0))  # touching (or copying) the input does not block a resume
    journal = Journal(out, settings=base, input=inp, resume=True)
    journal.open()
    assert journal.resumed


# -- torn tails and corruption -------------------------------------------------------------


def test_torn_tail_is_truncated_and_done_keys_recovered(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    journal = Journal(out)
    journal.open()
    append_records(journal.output, [(1, 1, {"a": 1}), (2, "b", {"a": 2})])
    append_records(journal.dead_letter, [(3, 3, {"e": 3})])
    with open(journal.output.path, "ab") as f:
        f.write(b'4\t4\t{"a": 4, "tor')  # a crash in the middle of a write
    with open(journal.dead_letter.path, "ab") as f:
        f.write(b"\x00" * 64)  # what a power loss can leave behind
    resumed = Journal(out, resume=True)
    resumed.open()
    assert (resumed.previous_ok, resumed.previous_failed) == (2, 1)
    assert len(resumed.done) == 3
    assert all(line in resumed.done for line in (1, 2, 3)) and 4 not in resumed.done
    assert Path(resumed.output.path).read_bytes() == encode_record(
        1, 1, b'{"a": 1}'
    ) + encode_record(2, "b", b'{"a": 2}')
    assert Path(resumed.dead_letter.path).read_bytes() == encode_record(3, 3, b'{"e": 3}')


def test_damage_before_good_records_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    journal = Journal(out)
    journal.open()
    good = encode_record(1, 1, b"{}"), encode_record(3, 3, b"{}")
    Path(journal.output.path).write_bytes(good[0] + b"garbage\n" + good[1])
    with pytest.raises(ResumeError, match="record 2 is damaged") as info:
        Journal(out, resume=True).open()  # a ResumeError, as an unreadable checkpoint: exit 2
    assert isinstance(info.value.__cause__, JournalCorruptError)


# -- publish ---------------------------------------------------------------------------------


def test_ordered_commit_restores_input_order_across_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    journal = Journal(out, ordered=True)
    journal.open()
    append_records(journal.output, [(1, 1, 1), (4, 4, 4), (9, 9, 9)])  # run 1 (ordered)
    append_records(journal.output, [(2, 2, 2), (3, 3, 3), (10, 10, 10)])  # run 2
    append_records(journal.output, [(5, 5, 5), (6, 6, 6), (7, 7, 7), (8, 8, 8)])  # run 3
    journal.commit()
    assert [int(x) for x in out.read_text().split()] == list(range(1, 11))


@settings(max_examples=30, deadline=None)
@given(
    lines=st.lists(st.integers(1, 500), min_size=0, max_size=300),
    chunk_bytes=st.integers(1, 400),
    fanin=st.integers(2, 5),
)
def test_ordered_build_sorts_in_bounded_chunks(
    lines: list[int], chunk_bytes: int, fanin: int
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        journal = os.path.join(directory, "j.partial")
        with open(journal, "wb") as f:
            for i, line in enumerate(lines):
                f.write(encode_record(line, i, json.dumps([line, i]).encode()))
        dest = os.path.join(directory, "out")
        build_final(journal, dest, write_jsonl, ordered=True, chunk_bytes=chunk_bytes, fanin=fanin)
        with open(dest) as f:
            got = [json.loads(x) for x in f]
        # sorted by line; of the records of one line only the first in journal order
        first: dict[int, int] = {}
        for i, line in enumerate(lines):
            first.setdefault(line, i)
        assert got == [[line, first[line]] for line in sorted(first)]
        assert sorted(os.listdir(directory)) == ["j.partial", "out"]  # temporary runs are gone


def test_commit_converts_to_the_sinks_format(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    journal = Journal(out)
    journal.open()
    CsvSink(journal.output)  # the sink tells the journal its format
    append_records(journal.output, [(1, 1, {"a": 1}), (2, 2, {"b": "x"})])
    journal.commit()
    assert out.read_text() == "a,b\n1,\n,x\n"
    assert not (tmp_path / "out.csv.failed.jsonl").exists()  # no failures: no empty file


def test_stale_dead_letter_file_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.failed.jsonl").write_text("stale\n")
    journal = Journal(out)
    journal.open()
    journal.commit()
    assert (tmp_path / "out.jsonl.failed.jsonl").read_text() == ""
    assert out.read_text() == ""


def test_crash_during_publish_is_finished_by_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("previous version\n")
    journal = Journal(out)
    journal.open()
    append_records(journal.output, [(1, 1, {"new": 1})])
    append_records(journal.dead_letter, [(2, 2, {"dead": 2})])
    real_replace = os.replace

    def crash_on_output(src: Any, dst: Any) -> None:
        if os.fspath(dst) == str(out):
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_output)
    with pytest.raises(OSError, match="simulated"):
        journal.commit()
    monkeypatch.setattr(os, "replace", real_replace)
    assert out.read_text() == "previous version\n"  # readers still see a whole file
    with pytest.raises(ResumeError, match="--resume"):
        Journal(out).open()
    resumed = Journal(out, resume=True)
    resumed.open()
    assert resumed.complete
    assert out.read_text() == '{"new": 1}\n'
    assert files_in(tmp_path) == ["out.jsonl", "out.jsonl.failed.jsonl"]


def test_crash_while_building_keeps_the_journals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out.jsonl"
    journal = Journal(out)
    journal.open()
    append_records(journal.output, [(1, 1, {"a": 1})])

    def broken_writer(payloads: Any, dest: Any) -> None:
        dest.write(b'{"half')
        raise OSError("disk full")

    journal.output.writer = broken_writer
    with pytest.raises(OSError, match="disk full"):
        journal.commit()
    assert not out.exists()
    resumed = Journal(out, resume=True)
    resumed.open()
    assert not resumed.complete and 1 in resumed.done
    resumed.commit(1)
    assert out.read_text() == '{"a": 1}\n'


# -- whole jobs ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_failed_run_resumes_exactly_once(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    keys = write_input(inp, 300, bad_every=37)
    out = tmp_path / "out.jsonl"
    calls: list[str] = []
    crash_at = {"r150"}

    def work(row: dict[str, Any]) -> dict[str, Any]:
        if row["id"] in crash_at:
            raise FatalError("the process dies here")
        calls.append(row["id"])
        if row["n"] % 10 == 0:
            raise pl.ItemError("no answer for this one")
        return {**row, "answer": row["id"].upper()}

    async def run(resume: bool) -> tuple[Journal, JsonlSource, pl.RunReport]:
        journal = Journal(out, settings={"prompt": "p"}, input=inp, resume=resume, ordered=True)
        await anyio.to_thread.run_sync(journal.open)
        source = JsonlSource(inp, id_field="id", skip_lines=journal.done)
        p = Pipeline(
            source,
            pl.map(work),
            JsonlSink(journal.output),
            dead_letter=DeadLetterSink(journal.dead_letter),
            ordered=resume,  # run 1 completes out of order: the commit restores input order
        )
        report = await p.run()
        rows = source.emitted + source.rejected + source.skipped
        await anyio.to_thread.run_sync(journal.commit, rows)
        return journal, source, report

    with pytest.raises(FatalError):
        await run(False)
    first_calls = len(calls)
    crash_at.clear()
    journal, source, report = await run(True)
    assert journal.resumed and source.skipped == len(journal.done) > 0
    assert report.rows_in + source.skipped == len(keys)
    # nothing finished in run 1 was sent again
    assert len(calls) - first_calls == report.rows_in - source.rejected
    rows, dead = read_job(out)
    assert [r["n"] for r in rows] == sorted(r["n"] for r in rows)  # ordered across both runs
    done = [r["id"] for r in rows] + [d["key"] for d in dead]
    assert sorted(map(str, done)) == sorted(map(str, keys)) and len(done) == len(keys)


CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    import anyio
    import pipeline as pl
    import pipeline.jobs._journal as journal_module
    import stages.files._sinks as files_module
    from pipeline.jobs._journal import Journal
    from stages.files import DeadLetterSink, JsonlSink, JsonlSource

    inp, out, mode, arg, log = sys.argv[1:6]
    arg = int(arg)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "publish":  # die between moving the dead letters and the output into place
        real_replace = os.replace
        def replace(src, dst):
            if os.fspath(dst) == out:
                die()
            real_replace(src, dst)
        journal_module.os.replace = replace
    if mode == "build":  # die half-way through writing the final file
        def write_jsonl(payloads, dest):
            for i, payload in enumerate(payloads()):
                dest.write(payload)
                if i == 50:
                    dest.flush()
                    die()
        files_module.write_jsonl = write_jsonl

    async def main():
        journal = Journal(out, settings={"prompt": "p"}, input=inp, resume=True, ordered=True)
        await anyio.to_thread.run_sync(journal.open)
        if journal.complete:
            print("complete", flush=True)
            return
        logf = open(log, "a")

        async def work(row):
            logf.write(row["id"] + "\\n")
            logf.flush()
            await anyio.sleep(0)
            if row["n"] % 7 == 0:
                raise pl.ItemError("seven")
            return {**row, "answer": row["id"].upper()}

        written = 0

        async def after_sink(row):
            nonlocal written
            written += 1
            if mode == "rows" and written == arg:
                print("ready", flush=True)
                await anyio.sleep_forever()
            return row

        source = JsonlSource(inp, id_field="id", skip_lines=journal.done)
        p = pl.Pipeline(
            source,
            pl.map(work, workers=4),
            JsonlSink(journal.output),
            pl.map(after_sink),
            dead_letter=DeadLetterSink(journal.dead_letter),
            ordered=True,
        )
        report = await p.run()
        rows = source.emitted + source.rejected + source.skipped
        await anyio.to_thread.run_sync(journal.commit, rows)
        print("committed", report.rows_in, flush=True)

    anyio.run(main)
    """
)


def journal_keys(path: Path) -> set[Hashable]:
    """Keys of the whole records of a journal, as a resume will see them."""
    if not path.exists():
        return set()
    keys = set()
    for record in path.read_bytes().split(b"\n")[:-1]:
        with contextlib.suppress(ValueError):
            keys.add(parse_record(record + b"\n")[1])
    return keys


@pytest.mark.parametrize(
    "steps",
    [
        [("rows", 1), ("rows", 300), ("rows", 300), ("build", 0), ("none", 0)],
        [("rows", 500), ("publish", 0), ("none", 0)],
    ],
    ids=["rows-rows-rows-build", "rows-publish"],
)
def test_sigkill_at_any_point_then_resume_is_exactly_once(
    tmp_path: Path, steps: list[tuple[str, int]]
) -> None:
    inp = tmp_path / "in.jsonl"
    keys = write_input(inp, 2000, bad_every=97)
    out = tmp_path / "out.jsonl"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    partials = (Path(f"{out}.partial"), Path(f"{out}.failed.jsonl.partial"))
    processed: list[set[str]] = []
    for run, (mode, arg) in enumerate(steps):
        done_before = journal_keys(partials[0]) | journal_keys(partials[1])
        log = tmp_path / f"processed.{run}"
        child = subprocess.Popen(
            [sys.executable, str(script), str(inp), str(out), mode, str(arg), str(log)],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert child.stdout is not None
        with child:
            first = child.stdout.readline()
            if mode == "rows":
                assert first == b"ready\n", f"run {run} never reached row {arg}"
                child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
        if mode == "none":
            assert child.returncode == 0 and first.split()[0] in (b"committed", b"complete")
        else:
            assert child.returncode == -signal.SIGKILL
        sent = set(log.read_text().split()) if log.exists() else set()
        # a row whose record reached a journal is never sent again ...
        assert not sent & done_before
        # ... so a crash costs at most the rows in flight (channel buffers and the window)
        for earlier in processed:
            assert len(sent & earlier) <= 1200
        processed.append(sent)
    rows, dead = read_job(out)
    assert [r["n"] for r in rows] == sorted(r["n"] for r in rows)  # input order, across runs
    assert all(r["answer"] == r["id"].upper() for r in rows)
    done = [r["id"] for r in rows] + [d["key"] for d in dead]
    assert len(done) == len(keys) and set(done) == set(keys)  # exactly one record per key
    assert files_in(tmp_path) == sorted(
        ["in.jsonl", "out.jsonl", "out.jsonl.failed.jsonl", "child.py"]
        + [f"processed.{i}" for i in range(len(steps)) if (tmp_path / f"processed.{i}").exists()]
    )


def test_random_kill_points(tmp_path: Path) -> None:
    """A few kills at random row counts (seeded), each followed by a resume."""
    rng = random.Random(7)
    steps = [("rows", rng.randint(1, 400)) for _ in range(2)] + [("none", 0)]
    test_sigkill_at_any_point_then_resume_is_exactly_once(tmp_path, steps)
