"""Journal records are checked, rows are identified by line, ids are checked in bounded memory."""

from __future__ import annotations

import json
import random
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest

from pipeline import Pipeline
from pipeline.jobs._journal import Journal
from stages.files import JsonlSource, encode_record
from stages.files._ids import DuplicateIds
from stages.files._records import JournalCorruptError, JournalFile


def append(journal: JournalFile, records: list[tuple[int, Hashable, Any]]) -> None:
    journal.open()
    data = b"".join(encode_record(line, key, json.dumps(p).encode()) for line, key, p in records)
    journal.append(data, len(records))
    journal.close()


def published(path: Path) -> list[Any]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# -- duplicate ids in bounded memory -----------------------------------------------------------


@pytest.mark.parametrize("memory_rows", [1, 7, 1 << 17], ids=["spill-each", "spill", "memory"])
def test_duplicate_ids_match_a_plain_dict(tmp_path: Path, memory_rows: int) -> None:
    rng = random.Random(memory_rows)
    ids = [f"id-{rng.randrange(300)}" for _ in range(1000)]
    expected: dict[int, int] = {}
    first: dict[str, int] = {}
    for line, key in enumerate(ids, 1):
        if key in first:
            expected[line] = first[key]
        else:
            first[key] = line
    with DuplicateIds(directory=str(tmp_path), memory_rows=memory_rows) as finder:
        for line, key in enumerate(ids, 1):
            finder.add(key.encode(), line)
        assert finder.repeats() == expected
    assert list(tmp_path.iterdir()) == []  # the bucket files are gone


@pytest.mark.anyio
async def test_duplicates_are_found_before_any_row_is_emitted(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    rows = [{"id": f"r{i % 500}", "n": i} for i in range(700)]  # lines 501-700 repeat ids
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = JsonlSource(path, id_field="id")
    report = await Pipeline(source).run()
    assert report.ok == 500 and report.failed == 200
    assert source.emitted == 500 and source.rejected == 200  # counters of the second read only
    messages = {f.key: f.message for f in report.failures}
    assert messages[501] == "duplicate id 'r0' in field 'id' (first on line 1)"
    assert messages[700] == "duplicate id 'r199' in field 'id' (first on line 200)"


# -- records: appended twice, damaged, garbage ---------------------------------------------------


def test_a_record_appended_twice_is_published_once(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    journal = Journal(out)
    journal.open()
    records: list[tuple[int, Hashable, Any]] = [(1, 1, {"a": 1}), (2, 2, {"a": 2})]
    append(journal.output, records)
    append(journal.output, records[1:])  # the same record again (a retried write, two writers)
    resumed = Journal(out, resume=True)
    resumed.open()
    assert (resumed.previous_ok, resumed.previous_failed) == (2, 0)
    resumed.commit(2)
    assert published(out) == [{"a": 1}, {"a": 2}]


def test_a_damaged_record_is_not_done_is_sent_again_and_never_published(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.jsonl"
    journal = Journal(out)
    journal.open()
    whole = [encode_record(line, f"k{line}", b'{"a": %d}' % line) for line in (1, 2, 3)]
    cut = whole[1][: whole[1].index(b"}")] + whole[1][-10:]  # good key, cut-off JSON
    Path(journal.output.path).write_bytes(whole[0] + cut + whole[2])
    resumed = Journal(out, resume=True)
    resumed.open()
    assert 2 not in resumed.done and {1, 3} <= set(x for x in (1, 2, 3) if x in resumed.done)
    append(resumed.output, [(2, "k2", {"a": 2, "again": True})])  # the row sent again
    resumed.commit(3)
    assert published(out) == [{"a": 1}, {"a": 3}, {"a": 2, "again": True}]


def test_a_damaged_record_at_commit_fails_the_count_and_publishes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    journal = Journal(out)
    journal.open()
    whole = [encode_record(line, line, b'{"a": %d}' % line) for line in (1, 2, 3)]
    Path(journal.output.path).write_bytes(whole[0] + whole[1].replace(b'"a"', b'"b"') + whole[2])
    with pytest.raises(JournalCorruptError, match="3 rows but the journals account for 2"):
        journal.commit(3)
    assert not out.exists()


# -- the final check: every row once, distinct ids -------------------------------------------------


def test_two_writers_on_one_journal_publish_every_row_once(tmp_path: Path) -> None:
    """What two concurrent runs of one job leave: every row journaled by both."""
    out = tmp_path / "out.jsonl"
    journal = Journal(out, ordered=True)
    journal.open()
    first = [(line, f"id{line}", {"n": line, "by": "first"}) for line in range(1, 101)]
    second = [(line, f"id{line}", {"n": line, "by": "second"}) for line in range(100, 0, -1)]
    for a, b in zip(first, second, strict=True):
        append(journal.output, [a])
        append(journal.output, [b])
    append(journal.dead_letter, [(7, "id7", {"error": "second writer failed it"})])
    journal.commit(100)
    rows = published(out)
    assert [r["n"] for r in rows] == list(range(1, 101))  # each row once, in input order
    assert not (tmp_path / "out.jsonl.failed.jsonl").exists()  # line 7 has an answer


def test_rows_missing_from_the_journals_are_not_published(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    journal = Journal(out)
    journal.open()
    append(journal.output, [(line, line, {"n": line}) for line in range(1, 10)])
    with pytest.raises(JournalCorruptError, match="10 rows but the journals account for 9"):
        journal.commit(10)
    assert not out.exists() and Path(journal.output.path).exists()  # still resumable


def test_two_rows_with_one_id_are_not_published(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    journal = Journal(out)
    journal.open()
    append(journal.output, [(1, "a", {"n": 1}), (2, "b", {"n": 2}), (3, "a", {"n": 3})])
    with pytest.raises(JournalCorruptError, match="line 3 has the id of line 1"):
        journal.commit(3)
    assert not out.exists()
