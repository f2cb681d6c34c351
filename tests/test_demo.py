"""The demo: its speed test overlaps requests, its file job is right, the command runs as shipped.

How much faster the pipeline is than one request at a time is measured, not asserted here: it is
the ``demo`` part of ``benchmarks/runtime.py``, printed against the source documents' 5.55x.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.cli._demo import KEY_ENV, NAMES, demo, pipelined, sample_path, sequential
from pipeline.cli._progress import ProgressDisplay
from pipeline.testing import SimConfig, serve

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_sample_is_package_data() -> None:
    rows = [json.loads(line) for line in Path(sample_path()).read_text().splitlines()]
    assert len(rows) == 1000 and len({r["id"] for r in rows}) == 1000
    assert {"id", "name", "city", "product", "rating"} <= rows[0].keys()


async def test_speed_test_overlaps_requests_and_greets_each_name_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, "demo-key-not-secret")
    config = SimConfig(latency_ms=100, seed=7)  # answers take long enough to overlap
    async with serve(config) as sim:
        _, one_at_a_time = await sequential(sim.url, NAMES)
        sequential_seen = sim.counters()
    async with serve(config) as sim:
        _, answers = await pipelined(sim.url, NAMES)
        pipeline_seen = sim.counters()
    assert sequential_seen["requests"] == pipeline_seen["requests"] == len(NAMES)  # no retries
    assert sequential_seen["concurrent_max"] == 1
    assert pipeline_seen["concurrent_max"] > 1  # the pipeline had requests in flight together
    assert answers == one_at_a_time  # the same answers, in input order
    assert len(set(answers)) == len(NAMES)
    assert all(name in answer for name, answer in zip(NAMES, answers, strict=True))


async def test_demo_reports_its_figures_and_enriches_the_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a terminal wide enough for the whole bar: on a narrow one the bar (rightly) goes first,
    # and how narrow is too narrow depends on how many digits the measured rates have
    monkeypatch.setenv("COLUMNS", "160")
    out = io.StringIO()
    progress = io.StringIO()
    figures = await demo(
        latency_ms=5,
        jitter_ms=2,
        output=str(tmp_path / "enriched.jsonl"),
        out=out,
        progress=ProgressDisplay(progress, tty=True),
    )
    text = out.getvalue()
    assert f"speed-up: {figures['speedup']:.2f}x" in text
    assert f"({figures['sequential_s']:.2f} s -> {figures['pipeline_s']:.2f} s)" in text
    assert "source documents: 10.33 s -> 1.86 s, 5.55x" in text
    assert figures["file_rows"] == 1000
    assert figures["server_requests"] == 2 * len(NAMES) + 1000  # every request exactly once
    rows = [json.loads(line) for line in (tmp_path / "enriched.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"c{i:04d}" for i in range(1, 1001)]  # input order
    assert rows[0]["note"].startswith(f"echo: Write a one-line thank-you note to {rows[0]['name']}")
    assert json.dumps(rows[0], ensure_ascii=False) in text  # shown under "First rows"
    assert "100.0% [" in progress.getvalue()  # the live bar reached the end


def test_python_m_pipeline_demo_runs() -> None:
    with tempfile.TemporaryDirectory() as cwd:  # not the source tree: package data is found
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "demo", "--latency-ms", "5", "--jitter-ms", "2"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert done.returncode == 0, done.stderr
        assert os.listdir(cwd) == []  # the output went to a temporary directory, removed
    for part in ("sequential:", "pipeline:", "speed-up:", "First rows of the output:", "1,000"):
        assert part in done.stdout
    assert "progress: 1,000/1,000 rows (100.0%)" in done.stderr
