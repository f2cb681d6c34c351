"""The service's dashboard in real headless Chromium, and operating the service (SIGTERM).

The server runs as ``python -m pipeline serve`` in a child process on a free port with a token,
against simulated APIs in this process; the page is driven in Chromium like a user would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import artifacts_dir, chart_points, chromium, needs_chromium, wait_for
from prometheus_client.parser import text_string_to_metric_families
from sim_thread import ThreadSim

from pipeline.testing._sim import SimConfig, Simulator

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "dashboard-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextmanager
def server_process(data_dir: Path, sim: Simulator, *extra: str) -> Iterator[tuple[str, Any]]:
    """``python -m pipeline serve`` on a free port (read from uvicorn's startup line)."""
    argv = [sys.executable, "-m", "pipeline", "serve", "--port", "0", "--data-dir", str(data_dir)]
    argv += ["--base-url", sim.url, *extra]
    env = {**os.environ, "PIPELINE_SERVER_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log: list[bytes] = []
    found = threading.Event()
    url: list[str] = []

    def read() -> None:  # keep the pipe drained for the process's whole life
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line)
            match = re.search(rb"running on (http://127\.0\.0\.1:\d+)", line)
            if match and not found.is_set():
                url.append(match.group(1).decode())
                found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert found.wait(30), b"".join(log).decode()
        yield url[0], process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        reader.join(10)
        assert process.stderr is not None
        process.stderr.close()
        process.log = b"".join(log).decode()  # type: ignore[attr-defined]


def wait_end(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """Follow the job's events until ``end``; return the final job."""
    event = None
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "end":
                final: dict[str, Any] = json.loads(line.removeprefix("data: "))
                return final
    raise AssertionError("the event stream ended without an end event")


def rows(n: int, prefix: str = "r") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "name": f"n{i}"} for i in range(n)]


def write_rows(path: Path, data: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


# -- the page ----------------------------------------------------------------------------------


def set_field(driver: Any, element_id: str, value: str) -> None:
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(value)


def submit_job(driver: Any, source: Path, settings: dict[str, str], extra: str = "") -> str:
    driver.find_element("id", "f-file").send_keys(str(source))
    for field, value in settings.items():
        set_field(driver, f"f-{field}", value)
    set_field(driver, "f-extra", extra)
    before = driver.execute_script("return document.getElementById('job-id').textContent")
    driver.find_element("id", "f-submit").click()
    job_id: str = wait_for(
        driver,
        lambda d: (
            (t := d.execute_script("return document.getElementById('job-id').textContent"))
            != before
            and t
        ),
        "the submitted job to show",
    )
    return job_id


def status_is(driver: Any, *wanted: str) -> bool:
    status = driver.find_element("id", "job-view").get_attribute("data-status")
    return status in wanted


def tile(driver: Any, key: str) -> str:
    return str(driver.execute_script(
        "return document.querySelector(`.tile[data-key='${arguments[0]}'] .value`).textContent",
        key,
    ))  # fmt: skip


@needs_chromium
@pytest.mark.timeout(300)  # about 45 s alone; room for a loaded machine
def test_the_dashboard_runs_watches_downloads_cancels_and_resumes(tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    given_rows = rows(240)
    bad = {"r17": {"id": "r17", "nme": "typo"}, "r200": {"id": "r200", "nme": "typo"}}
    source = write_rows(tmp_path / "people.jsonl", [bad.get(r["id"], r) for r in given_rows])
    slow_source = write_rows(tmp_path / "slow.jsonl", rows(40, "s"))  # 8 s, one at a time
    quota = SimConfig(rpm=4800, burst_s=0.2, error_429=0.02, retry_after_s=0.2, seed=7)
    with (
        ThreadSim(quota) as sim,
        ThreadSim(SimConfig(latency_ms=200)) as slow,
        server_process(tmp_path / "data", sim, "--allow-base-url", slow.url) as (url, _),
        chromium(downloads) as driver,
        httpx.Client(base_url=url, headers=AUTH, timeout=30) as client,
    ):
        driver.get(url + "/")  # the page loads without the token ...
        wait_for(driver, lambda d: "wants a token" in d.find_element("id", "conn").text, "401")
        set_field(driver, "token", TOKEN)  # ... and its API calls carry the one typed in
        driver.find_element("id", "save-token").click()
        wait_for(driver, lambda d: d.find_element("id", "conn").text == "", "the token accepted")
        assert driver.execute_script("return sessionStorage.getItem('llm-pipeline-token')") == TOKEN

        settings = {"model": "sim-1", "prompt": "Hi {name}", "rpm": "4800"}
        extra = json.dumps({"id_field": "id", "prices": {"sim-1": [100.0, 200.0]}})
        job_id = submit_job(driver, source, settings, extra)
        wait_for(driver, lambda d: status_is(d, "running", "succeeded"), "the job to run")
        under_way = "#job-view[data-status='running'] .tile[data-key='done'] .value"
        wait_for(
            driver,
            lambda d: (
                status_is(d, "succeeded")
                or int(d.find_element("css selector", under_way).text.split()[0]) >= 60
            ),
            "a quarter of the rows",
        )
        driver.save_screenshot(str(artifacts_dir() / "dashboard-running.png"))
        wait_for(driver, lambda d: status_is(d, "succeeded"), "the job to succeed")
        wait_for(driver, lambda d: tile(d, "done") == "240 / 240 (100%)", "progress at 100%")
        row = f"#jobs tr[data-job-id='{job_id}'] .pct"
        wait_for(driver, lambda d: d.find_element("css selector", row).text == "100%", "list")
        points = chart_points(driver)
        assert min(points.values()) > 0, points  # every chart holds data points
        assert points["chart-progress"] >= 2
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert tile(driver, "requests") == f"{job['summary']['requests']:,}"
        driver.save_screenshot(str(artifacts_dir() / "dashboard.png"))

        driver.find_element("id", "btn-results").click()
        results = downloads / f"{job_id}-results.jsonl"
        wait_for(driver, lambda d: results.exists() and results.stat().st_size > 0, "download")
        got = {r["id"]: r for r in map(json.loads, results.read_text().splitlines())}
        assert len(got) == 240 - len(bad)
        for given in given_rows:  # row by row: the input's fields, plus the answer
            if given["id"] in bad:
                assert given["id"] not in got
                continue
            answer = got[given["id"]]
            assert {k: answer[k] for k in given} == given
            assert answer["response"] == f"echo: Hi {given['name']}"
        driver.find_element("id", "btn-failed").click()
        dead = downloads / f"{job_id}-failed.jsonl"
        wait_for(driver, lambda d: dead.exists() and dead.stat().st_size > 0, "dead letters")
        records = [json.loads(line) for line in dead.read_text().splitlines()]
        assert {r["key"]: r["row"] for r in records} == bad
        shown = driver.execute_script(
            "return Array.from(document.querySelectorAll('#failures tbody tr'))"
            ".map(r => [r.cells[0].textContent, r.cells[2].textContent]);"
        )
        assert sorted(shown) == [["r17", "MissingFieldError"], ["r200", "MissingFieldError"]]
        assert tile(driver, "failed") == "2"

        slow_settings = {"model": "sim-1", "prompt": "Hi {name}", "concurrency": "1"}
        extra = json.dumps({"base_url": slow.url, "id_field": "id"})
        slow_id = submit_job(driver, slow_source, slow_settings, extra)
        wait_for(driver, lambda d: status_is(d, "running"), "the second job to run")
        done = "#job-view[data-status='running'] .tile[data-key='done'] .value"
        wait_for(
            driver,
            lambda d: int(d.find_element("css selector", done).text.split()[0]) >= 3,
            "some rows of the second job",
        )
        driver.find_element("id", "btn-cancel").click()
        wait_for(driver, lambda d: status_is(d, "cancelled"), "the job to be cancelled")
        cancelled = client.get(f"/v1/jobs/{slow_id}").json()
        assert 0 < cancelled["summary"]["total_ok"] < 40
        driver.find_element("id", "btn-resume").click()
        wait_for(driver, lambda d: status_is(d, "succeeded"), "the resumed job to finish", 90)
        lines = client.get(f"/v1/jobs/{slow_id}/results").text.splitlines()
        assert sorted(json.loads(line)["id"] for line in lines) == sorted(
            r["id"] for r in rows(40, "s")
        )
        runs = client.get(f"/v1/jobs/{slow_id}/timeline").json()["runs"]
        assert [run["number"] for run in runs] == [1, 2]
        assert slow.counters()["requests"] <= 40 + 1  # at most the row in flight, again


def test_page_assets_are_open_and_everything_else_needs_the_token(tmp_path: Path) -> None:
    with (
        ThreadSim() as sim,
        server_process(tmp_path, sim) as (url, _),
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        page = client.get("/")
        assert page.status_code == 200 and "llm-pipeline" in page.text
        for asset, kind in (("dashboard.js", "javascript"), ("charts.js", "javascript"),
                            ("dashboard.css", "css")):  # fmt: skip
            response = client.get(f"/static/{asset}")
            assert response.status_code == 200 and kind in response.headers["content-type"]
        assert client.get("/static/../_app.py").status_code in (401, 404)
        for path in ("/v1/jobs", "/metrics", "/readyz", "/static/nothing.js"):
            assert client.get(path).status_code == 401, path
        assert client.get("/readyz", headers=AUTH).json()["status"] == "ready"


# -- metrics and stopping ----------------------------------------------------------------------


def metric(text: str, name: str, job: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            wanted = {"job": job, **labels}
            if sample.name == name and all(sample.labels.get(k) == v for k, v in wanted.items()):
                total += sample.value
    return total


def test_metrics_agree_with_the_job_summary(tmp_path: Path) -> None:
    data = [*rows(80), {"id": "bad", "nme": "typo"}]
    config = SimConfig(error_5xx=0.1, error_429=0.05, retry_after_s=0.05, seed=11)
    with (
        ThreadSim(config) as sim,
        server_process(tmp_path, sim) as (url, _),
        httpx.Client(base_url=url, headers=AUTH, timeout=30) as client,
    ):
        body = {"rows": data, "settings": {"model": "sim-1", "prompt": "Hi {name}",
                                           "prices": {"sim-1": [1.0, 2.0]}}}  # fmt: skip
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        summary = wait_end(client, job_id)["summary"]
        response = client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text
    assert summary["failed"] == 1 and summary["retries"] > 0
    assert metric(text, "pipeline_job_rows_total", job_id, outcome="ok") == summary["ok"]
    assert metric(text, "pipeline_job_rows_total", job_id, outcome="failed") == 1
    assert metric(text, "pipeline_job_requests_total", job_id, model="sim-1") == summary["requests"]
    assert metric(text, "pipeline_job_retries_total", job_id) == summary["retries"]
    assert metric(text, "pipeline_job_responses_total", job_id) == summary["requests"]
    assert metric(text, "pipeline_job_rate_limited_total", job_id) > 0
    # the runtime's own instruments, labelled with the job too
    assert metric(text, "pipeline_items_total", job_id, outcome="failed") == 1
    assert "pipeline_queue_depth{" in text and f'job="{job_id}"' in text
    for kind in ("prompt", "completion"):
        assert (
            metric(text, "pipeline_job_tokens_total", job_id, kind=kind)
            == (summary[f"{kind}_tokens"])
        )
    assert metric(text, "pipeline_job_cost_usd_total", job_id) == pytest.approx(
        summary["cost_usd"], abs=1e-6
    )


def test_sigterm_mid_job_then_restart_completes_every_row_once(tmp_path: Path) -> None:
    with ThreadSim(SimConfig(latency_ms=40)) as sim:
        with (
            server_process(tmp_path, sim) as (url, process),
            httpx.Client(base_url=url, headers=AUTH, timeout=30) as client,
        ):
            body = {"rows": rows(120), "settings": {"model": "sim-1", "prompt": "Hi {name}",
                                                   "concurrency": 2, "id_field": "id"}}  # fmt: skip
            job_id = client.post("/v1/jobs", json=body).json()["id"]
            seen = 0
            with client.stream("GET", f"/v1/jobs/{job_id}/results") as response:
                for _ in response.iter_lines():
                    seen += 1
                    if seen == 10:
                        break
            process.send_signal(signal.SIGTERM)
            # drained and stopped within its bound (uvicorn ends by re-raising the signal)
            assert process.wait(30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in process.log
        record = json.loads((tmp_path / "jobs" / job_id / "job.json").read_text())
        assert record["status"] == "interrupted" and record["resume_on_start"] is True
        with (
            server_process(tmp_path, sim) as (url, process),
            httpx.Client(base_url=url, headers=AUTH, timeout=30) as client,
        ):
            final = wait_end(client, job_id)  # resumed on start, without being asked
            assert final["status"] == "succeeded" and final["runs"] == 2
            lines = client.get(f"/v1/jobs/{job_id}/results").text.splitlines()
            ids = [json.loads(line)["id"] for line in lines]
            assert sorted(ids) == sorted(r["id"] for r in rows(120))  # every row, once
            assert len(ids) == len(set(ids))
        record = json.loads((tmp_path / "jobs" / job_id / "job.json").read_text())
        assert not record.get("resume_on_start")
        assert sim.counters()["requests"] <= 120 + 2  # at most the rows in flight again
