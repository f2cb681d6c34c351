"""The demo: the speed test beats the source documents' result, and the command runs as shipped."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.cli._demo import NAMES, PUBLISHED, demo, sample_path
from pipeline.cli._progress import ProgressDisplay

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_sample_is_package_data() -> None:
    rows = [json.loads(line) for line in Path(sample_path()).read_text().splitlines()]
    assert len(rows) == 1000 and len({r["id"] for r in rows}) == 1000
    assert {"id", "name", "city", "product", "rating"} <= rows[0].keys()


async def test_demo_speed_up_and_file_job(tmp_path: Path) -> None:
    out = io.StringIO()
    progress = io.StringIO()
    # a tenth of the demo's latency keeps the test short; the ratio is what matters
    figures = await demo(
        latency_ms=50,
        jitter_ms=15,
        output=str(tmp_path / "enriched.jsonl"),
        out=out,
        progress=ProgressDisplay(progress, tty=True),
    )
    text = out.getvalue()
    assert figures["sequential_s"] >= len(NAMES) * 0.035  # one request at a time
    assert figures["pipeline_s"] < 3 * 0.065  # all 20 at once: about one latency
    assert figures["speedup"] > PUBLISHED[0] / PUBLISHED[1]  # beats the published 5.55x
    assert f"speed-up: {figures['speedup']:.2f}x" in text
    assert "source documents: 10.33 s -> 1.86 s, 5.55x" in text
    assert figures["file_rows"] == 1000
    assert figures["server_requests"] == 2 * len(NAMES) + 1000
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
