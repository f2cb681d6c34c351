"""The benchmark suite runs end to end (tiny scale), checks answers, and writes its page."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks._contenders import Job, Probe, expected_answer, make_row
from benchmarks.scenarios import BY_KEY, GREETING, ideal_seconds, ratio

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ("cpu", "ratelimit", "faults", "memory", "speedtest")


def _job(rows: int) -> Job:
    return Job(
        contender="x", scenario="y", base_url="http://127.0.0.1:1/v1", rows=rows, template=GREETING
    )


def test_probe_counts_right_wrong_duplicate_and_failed_rows() -> None:
    probe = Probe(_job(4))
    probe.row(0, expected_answer(GREETING, make_row(0)))
    probe.row(1, expected_answer(GREETING, make_row(2)))  # another row's answer
    probe.row(0, expected_answer(GREETING, make_row(0)))
    probe.fail(3, "gave up")
    snap = probe.snapshot()
    assert (snap["correct"], snap["wrong"], snap["duplicates"], snap["failed"]) == (1, 1, 1, 1)
    assert snap["answered"] == 2
    assert snap["example_wrong"] is not None and snap["example_wrong"].startswith("row 1:")
    assert snap["first_row_s"] is not None and snap["first_token_s"] is None


def test_ideal_time_is_the_binding_bucket_after_its_burst() -> None:
    scenario = dataclasses.replace(BY_KEY["ratelimit"], sim={"rpm": 600, "latency_ms": 100})
    # 10 requests/s with one second of burst: 30 rows need (30 - 10) / 10 s, plus one latency
    assert ideal_seconds(scenario, {"rows": 30, "template": GREETING}) == pytest.approx(2.1)
    tight = dataclasses.replace(scenario, sim={"rpm": 600, "tpm": 600})
    # about 36 tokens a row at 10 tokens/s: the token bucket binds, far beyond 2 s
    assert ideal_seconds(tight, {"rows": 30, "template": GREETING}) > 50


def test_ratio_is_above_one_when_better_whichever_way_better_points() -> None:
    faster = BY_KEY["cpu"]
    assert ratio(faster, 200.0, 100.0, "requests_per_s") == pytest.approx(2.0)
    smaller = BY_KEY["memory"]
    assert ratio(smaller, 50.0, 100.0, "peak_rss_mb") == pytest.approx(2.0)
    assert ratio(smaller, None, 100.0, "peak_rss_mb") is None


def _run_group(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in its own process group; on a hang, kill the whole group.

    The suite starts a simulator and contender processes of its own: killing only the direct
    child would leave them running after the test.
    """
    child = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
        pytest.fail(f"the quick suite hung for {timeout:.0f} s:\n{out[-3000:]}{err[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # anything it left behind
    return subprocess.CompletedProcess(argv, child.returncode, out, err)


@pytest.mark.timeout(600)  # a hang guard: the suite takes 1-2 minutes, longer under load
def test_quick_suite_runs_every_contender_and_writes_its_page(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    argv = [sys.executable, "-m", "benchmarks", "--quick", "--scale", "0.05"]
    argv += ["--only", ",".join(SMOKE), "--out", str(tmp_path), "--write-docs", "--docs", str(docs)]
    done = _run_group(argv, timeout=560)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    data = json.loads((tmp_path / "quick.json").read_text())
    assert list(data["scenarios"]) == list(SMOKE)
    runs = data["runs"]
    for key in SMOKE:
        ran = {r["contender"] for r in runs if r["scenario"] == key}
        assert ran == set(BY_KEY[key].contenders), key
    by = {(r["scenario"], r["contender"], r["size"]): r for r in runs}
    for run in runs:
        assert run["result"]["error"] is None, run["result"]
        if run["scenario"] == "cpu":  # no faults: every answer exact, one request per row
            figures = run["figures"]
            assert figures["correct"] == figures["rows_run"] == figures["requests"], run
    for contender in ("sequential", "gather", "aiohttp", "pipeline", "cli"):
        faults = by[("faults", contender, None)]
        assert faults["figures"]["correct"] == faults["figures"]["rows_run"], faults["result"]
        assert faults["counters"]["requests"] > faults["figures"]["rows_run"] or (
            faults["counters"]["faults"] == {}
        )
    assert by[("ratelimit", "pipeline", None)]["figures"]["http_429"] == 0
    assert by[("ratelimit", "pipeline", None)]["job"]["rpm"] == 6_000
    memory = [r for r in runs if r["scenario"] == "memory"]
    assert all(r["result"]["peak_rss_mb"] > 10 for r in memory)
    assert by[("memory", "pipeline", 100)]["figures"]["status"] == "complete"
    speed = {
        r["contender"]: r["figures"]["elapsed_s"] for r in runs if r["scenario"] == "speedtest"
    }
    assert speed["pipeline"] < speed["sequential"]

    page = docs.read_text()
    for key in SMOKE:
        assert f"## {BY_KEY[key].number}. {BY_KEY[key].title}" in page
    assert "| llm-pipeline (Python) |" in page and "![benchmark chart](quick.png)" in page
    assert (tmp_path / "quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = tmp_path / "again.md"
    argv = [sys.executable, "-m", "benchmarks", "--docs-from", str(tmp_path / "quick.json")]
    done = subprocess.run([*argv, "--docs", str(again)], cwd=ROOT, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert again.read_text() == page  # the page is a function of the results file alone
