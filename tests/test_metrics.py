"""Prometheus metrics of jobs: OpenTelemetry instruments read back with Prometheus's parser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sim_thread import ThreadSim

import pipeline as pl
from pipeline.jobs import JobProgress, JobSettings, run_job
from pipeline.jobs._metrics import JobMetrics
from pipeline.jobs._timeline import Sample
from pipeline.testing import SimConfig, serve
from stages import LLMCaller, Retry

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def values(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text page, by name and labels (scope labels left out)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset(sample.labels.items())
            found[(sample.name, labels)] = sample.value
    return found


def job_value(text: str, name: str, job: str, **labels: str) -> float:
    wanted = {"job": job, **labels}
    total = 0.0
    for (found, got), value in values(text).items():
        got_labels = dict(got)
        if found == name and all(got_labels.get(k) == v for k, v in wanted.items()):
            total += value
    return total


def test_counters_grow_by_what_each_sample_adds() -> None:
    metrics = JobMetrics()
    first = Sample(t=1, rows_total=10, rows_done=3, ok=2, failed=1, requests=4, retries=1,
                   rate_limited=1, prompt_tokens=10, completion_tokens=5, cost_usd=0.25,
                   limiter_wait_s=0.5, in_flight=3, statuses={"200": 3, "429": 1})  # fmt: skip
    second = Sample(t=2, rows_total=10, rows_done=6, ok=5, failed=1, requests=7, retries=1,
                    rate_limited=1, prompt_tokens=25, completion_tokens=12, cost_usd=0.5,
                    limiter_wait_s=0.75, in_flight=1, statuses={"200": 6, "429": 1})  # fmt: skip
    metrics.observe("j1", "m", first)
    metrics.observe("j1", "m", second)
    text = metrics.render().decode()
    assert job_value(text, "pipeline_job_rows_total", "j1", outcome="ok") == 5
    assert job_value(text, "pipeline_job_rows_total", "j1", outcome="failed") == 1
    assert job_value(text, "pipeline_job_requests_total", "j1", model="m") == 7
    assert job_value(text, "pipeline_job_responses_total", "j1", status="200") == 6
    assert job_value(text, "pipeline_job_responses_total", "j1", status="429") == 1
    assert job_value(text, "pipeline_job_rate_limited_total", "j1") == 1
    assert job_value(text, "pipeline_job_retries_total", "j1") == 1
    assert job_value(text, "pipeline_job_tokens_total", "j1", kind="prompt") == 25
    assert job_value(text, "pipeline_job_tokens_total", "j1", kind="completion") == 12
    assert job_value(text, "pipeline_job_cost_usd_total", "j1") == pytest.approx(0.5)
    assert job_value(text, "pipeline_job_limiter_wait_seconds_total", "j1") == 0.75
    assert job_value(text, "pipeline_job_in_flight", "j1") == 1
    assert job_value(text, "pipeline_job_rows_remaining", "j1") == 4
    metrics.shutdown()


def test_a_new_run_counts_from_zero_and_jobs_and_servers_stay_apart() -> None:
    metrics, other = JobMetrics(), JobMetrics()
    metrics.observe("j1", "m", Sample(t=5, ok=5, requests=5))
    metrics.start_run("j1")  # resumed: the run's counters start again
    metrics.observe("j1", "m", Sample(t=1, ok=2, requests=2))
    metrics.observe("j1", "m", Sample(t=0.5, ok=1, requests=1))  # a run nobody announced
    metrics.observe("j2", "m2", Sample(t=1, ok=7, requests=9))
    other.observe("j1", "m", Sample(t=1, ok=100))
    text = metrics.render().decode()
    assert job_value(text, "pipeline_job_rows_total", "j1", outcome="ok") == 8
    assert job_value(text, "pipeline_job_requests_total", "j2", model="m2") == 9
    assert job_value(other.render().decode(), "pipeline_job_rows_total", "j1") == 100
    metrics.shutdown()
    other.shutdown()


async def test_counters_agree_with_the_job_summary(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    rows = [{"name": f"n{i}"} for i in range(60)] + [{"nme": "typo"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = JobMetrics()

    def on_progress(progress: JobProgress) -> None:
        metrics.observe("job-1", "sim-1", Sample.from_progress(progress))

    config = SimConfig(error_5xx=0.1, error_429=0.05, retry_after_s=0.05, seed=5)
    async with serve(config) as sim:
        settings = JobSettings(
            input=str(source),
            output=str(tmp_path / "out.jsonl"),
            model="sim-1",
            prompt="Hi {name}",
            base_url=sim.url,
            prices={"sim-1": (1.0, 2.0)},
        )
        summary = await run_job(settings, on_progress=on_progress, progress_interval=0.05)
        counted = sim.counters()
    text = metrics.render().decode()
    assert job_value(text, "pipeline_job_responses_total", "job-1") == summary.requests
    assert job_value(text, "pipeline_job_responses_total", "job-1", status="200") == summary.ok
    assert job_value(text, "pipeline_job_rate_limited_total", "job-1") >= counted["http_429"] > 0
    assert job_value(text, "pipeline_job_in_flight", "job-1") == 0
    assert summary.complete and summary.failed == 1 and summary.retries > 0
    assert job_value(text, "pipeline_job_rows_total", "job-1", outcome="ok") == summary.ok
    assert job_value(text, "pipeline_job_rows_total", "job-1", outcome="failed") == 1
    assert job_value(text, "pipeline_job_requests_total", "job-1") == summary.requests
    assert job_value(text, "pipeline_job_retries_total", "job-1") == summary.retries
    assert job_value(text, "pipeline_job_tokens_total", "job-1", kind="prompt") == (
        summary.prompt_tokens
    )
    assert job_value(text, "pipeline_job_tokens_total", "job-1", kind="completion") == (
        summary.completion_tokens
    )
    assert job_value(text, "pipeline_job_cost_usd_total", "job-1") == pytest.approx(
        summary.cost_usd
    )
    assert job_value(text, "pipeline_job_rows_remaining", "job-1") == 0
    metrics.shutdown()


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def test_cli_serves_metrics_while_the_job_runs(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    # about 5 s of work at two rows in flight, so that several snapshots are served
    source.write_text("".join(json.dumps({"name": f"n{i}"}) + "\n" for i in range(100)))
    port = free_port()
    with ThreadSim(SimConfig(latency_ms=100)) as sim:
        argv = ["run", str(source), "-o", str(tmp_path / "out.jsonl"), "--model", "sim-1",
                "--prompt", "Hi {name}", "--base-url", sim.url, "--quiet", "--concurrency", "2",
                "--metrics-port", str(port)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with subprocess.Popen([sys.executable, "-m", "pipeline", *argv], env=env) as child:
            text = wait_for_metric(f"http://127.0.0.1:{port}/metrics", child)
            assert child.wait(60) == 0
    assert job_value(text, "pipeline_job_requests_total", "out.jsonl", model="sim-1") > 0
    assert job_value(text, "pipeline_job_rows_remaining", "out.jsonl") < 100


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_metric(url: str, child: subprocess.Popen[bytes]) -> str:
    """Scrape until the job's counters show up, for as long as the job runs.

    Each try waits for the server's answer; the test's timeout guards against a hang.
    """
    while child.poll() is None:
        try:
            text = scrape(url)
        except OSError:
            threading.Event().wait(0.01)  # the process is starting: its port is not open yet
            continue
        if "pipeline_job_requests_total{" in text:
            return text
    raise AssertionError("the job's metrics never appeared on --metrics-port")


async def test_the_caller_counts_responses_by_status_and_requests_in_flight() -> None:
    config = SimConfig(error_429=0.1, retry_after_s=0.05, seed=2)
    async with serve(config) as sim:
        caller = LLMCaller(
            model="sim-1", prompt="Hi {name}", base_url=sim.url, retry=Retry(max_retries=8)
        )
        rows = [{"name": f"n{i}"} for i in range(40)]
        async with pl.Pipeline(caller).open(rows) as results:
            answered = [row async for row in results]
        counted = sim.counters()
    totals = caller.totals
    assert len(answered) == 40 and totals.in_flight == 0
    assert totals.statuses[200] == 40
    assert totals.statuses.get(429, 0) == counted["http_429"] > 0
    assert sum(totals.statuses.values()) == counted["requests"] == results.report.requests
