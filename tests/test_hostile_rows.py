"""Rows the JSON parser cannot take are that row's dead letter, never the whole job's end."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sim_thread import ThreadSim

from pipeline._json import NestingError, dumps, loads
from pipeline.cli import main
from pipeline.testing import Simulator


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with ThreadSim() as server:
        yield server


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [1_500, 200_000])
def test_loads_refuses_deep_nesting_as_a_value_error(depth: int) -> None:
    with pytest.raises(NestingError, match="nested too deeply"):
        loads(nested(depth))
    with pytest.raises(ValueError):
        loads(nested(depth).encode())


def test_dumps_refuses_deep_nesting_as_a_value_error() -> None:
    value: list[object] = []
    for _ in range(5_000):
        value = [value]
    with pytest.raises(ValueError, match="nested too deeply"):
        dumps(value)


@pytest.mark.parametrize("depth", [1_500, 200_000])
def test_a_deeply_nested_row_is_a_dead_letter_by_line_and_the_job_finishes(
    tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch, depth: int
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    source = tmp_path / "in.jsonl"
    source.write_text(
        json.dumps({"id": 0, "name": "a"})
        + "\n"
        + '{"id": 1, "name": '
        + nested(depth)
        + "}\n"
        + json.dumps({"id": 2, "name": "b"})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    argv = ["run", str(source), "-o", str(out), "--model", "m", "--base-url", sim.url]
    status = main([*argv, "--prompt", "hi {name}", "--quiet"])
    assert status == 3  # finished, with dead-lettered rows
    answered = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(row["id"] for row in answered) == [0, 2]
    failed = [
        json.loads(line) for line in (tmp_path / "out.jsonl.failed.jsonl").read_text().splitlines()
    ]
    assert len(failed) == 1
    record = failed[0]
    assert record["origin"].endswith(":2")
    assert "nested too deeply" in record["error"]["message"]
