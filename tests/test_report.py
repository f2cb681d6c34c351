"""The job timeline (one sample a second next to the output) and `python -m pipeline report`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import artifacts_dir, chart_points, chromium, needs_chromium, wait_for
from sim_thread import ThreadSim

from pipeline.cli._main import main
from pipeline.cli._report import latest_failures, render_html, report_data
from pipeline.jobs import JobProgress
from pipeline.jobs._timeline import Sample, TimelineRecorder, read_timeline, timeline_path
from pipeline.testing._sim import SimConfig, Simulator
from stages.files import encode_record

ROWS = 150
BAD = {7, 40}  # lines whose rows lack the prompt's field: dead-lettered


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    # A quota the job runs into (rows take about 2 s) and some 429s, so every chart has data.
    config = SimConfig(rpm=4800, burst_s=0.2, error_429=0.03, retry_after_s=0.2, seed=3)
    with ThreadSim(config) as server:
        yield server


def progress(t: float, done: int, *, final: bool = False, **more: Any) -> JobProgress:
    fields: dict[str, Any] = {
        "rows_total": 10,
        "rows_done": done,
        "ok": done,
        "failed": 0,
        "skipped": 0,
        "requests": done,
        "retries": 0,
        "prompt_tokens": done * 3,
        "completion_tokens": done * 5,
        "cost_usd": done * 0.001,
        "elapsed_s": t,
        "rows_per_s": 1.0,
        "tokens_per_s": 8.0,
        "eta_s": None,
        "final": final,
    }
    fields.update(more)
    return JobProgress(**fields)


# -- the timeline ------------------------------------------------------------------------------


def test_recorder_keeps_one_sample_per_interval_and_the_last(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl.timeline.jsonl"
    recorder = TimelineRecorder(path, {"model": "m", "rpm": 60}, interval=1.0)
    recorder.start()
    for i, t in enumerate([0.2, 0.5, 1.1, 1.4, 2.3, 2.5]):
        recorder.update(progress(t, i))
    recorder.update(progress(2.6, 6, final=True))
    recorder.finish({"ok": 6, "complete": True}, exit_status=0)
    [run] = read_timeline(path)
    assert run.number == 1 and run.job == {"model": "m", "rpm": 60}
    assert [s.t for s in run.samples] == [0.2, 1.1, 2.3, 2.6]
    assert [s.rows_done for s in run.samples] == [0, 2, 4, 6]
    assert run.end is not None
    assert run.end["summary"] == {"ok": 6, "complete": True} and run.end["exit_status"] == 0


def test_resumed_run_is_appended_and_a_killed_one_has_no_end(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    first = TimelineRecorder(path, {"model": "m"})
    first.start()
    first.update(progress(1.0, 3))
    first.close()  # killed: no end record
    second = TimelineRecorder(path, {"model": "m"}, append=True)
    second.start()
    second.update(progress(1.0, 9, final=True))
    second.finish({"ok": 6}, exit_status=0)
    runs = read_timeline(path)
    assert [r.number for r in runs] == [1, 2]
    assert runs[0].end is None and runs[1].end is not None
    fresh = TimelineRecorder(path, {"model": "m"})  # a new job starts the file anew
    fresh.start()
    fresh.close()
    assert [r.number for r in read_timeline(path)] == [1]


def test_a_torn_last_line_is_ignored_and_damage_before_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    recorder = TimelineRecorder(path, {})
    recorder.start()
    recorder.update(progress(1.0, 1))
    recorder.close()
    with open(path, "a") as f:
        f.write('{"type": "sample", "t": 2.0, "rows_d')
    [run] = read_timeline(path)
    assert len(run.samples) == 1
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"t\.jsonl:2: not a timeline record"):
        read_timeline(path)


def test_thinning_keeps_the_last_sample(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    recorder = TimelineRecorder(path, {}, interval=0)
    recorder.start()
    for i in range(1, 101):
        recorder.update(progress(float(i), i))
    recorder.close()
    [run] = read_timeline(path)
    thin = run.to_dict(max_samples=10)["samples"]
    assert len(thin) <= 11 and thin[0]["t"] == 1.0 and thin[-1]["t"] == 100.0


def test_sample_reads_back_what_it_wrote() -> None:
    sample = Sample(t=1.5, rows_done=3, statuses={"200": 3, "429": 1}, in_flight=2)
    assert Sample.from_dict(json.loads(json.dumps(sample.to_dict()))) == sample
    assert Sample.from_dict({"t": 1, "from_a_later_version": 5}) == Sample(t=1)


# -- a CLI job and its report ----------------------------------------------------------------


def run_job(tmp_path: Path, sim: Simulator, *extra: str) -> tuple[Path, dict[str, Any]]:
    source = tmp_path / "in.jsonl"
    rows = [{"id": f"r{i}", "name": f"n{i}"} for i in range(1, ROWS + 1)]
    for line in BAD:
        rows[line - 1] = {"id": f"r{line}", "nme": "typo"}
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "job.toml"
    config.write_text('[prices]\n"sim-1" = [100.0, 200.0]\n')
    output = tmp_path / "out.jsonl"
    summary_json = tmp_path / "summary.json"
    status = main(
        [
            "run", str(source), "-o", str(output), "--config", str(config),
            "--model", "sim-1", "--prompt", "Hi {name}", "--base-url", sim.url,
            "--id-field", "id", "--rpm", "4800", "--quiet", "--summary-json", str(summary_json),
            *extra,
        ]
    )  # fmt: skip
    assert status == 3  # complete, with the two bad rows dead-lettered
    return output, json.loads(summary_json.read_text())


@pytest.fixture(scope="module")
def finished_job(
    sim: Simulator, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    return run_job(tmp_path_factory.mktemp("job"), sim)


def test_cli_records_the_timeline_of_its_run(finished_job: tuple[Path, dict[str, Any]]) -> None:
    output, summary = finished_job
    [run] = read_timeline(timeline_path(output))
    assert run.job["model"] == "sim-1" and run.job["rpm"] == 4800
    assert len(run.samples) >= 2  # the job runs for about two seconds
    last = run.samples[-1]
    assert (last.ok, last.failed, last.requests) == (summary["ok"], 2, summary["requests"])
    assert last.cost_usd == pytest.approx(summary["cost_usd"], abs=1e-6)
    assert run.end is not None and run.end["exit_status"] == 3
    assert run.end["summary"]["total_ok"] == ROWS - len(BAD)


def test_report_data_holds_the_summary_and_the_latest_failures(
    finished_job: tuple[Path, dict[str, Any]],
) -> None:
    output, summary = finished_job
    data = report_data(str(output))
    assert data["summary"] == summary  # the timeline's end record is the summary-json
    assert sorted(f["key"] for f in data["failures"]) == sorted(f"r{line}" for line in BAD)
    assert {f["error"]["type"] for f in data["failures"]} == {"MissingFieldError"}
    assert len(report_data(str(output), failures=1)["failures"]) == 1


def test_report_command_writes_one_self_contained_page(
    finished_job: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    output, _summary = finished_job
    target = output.parent / "report.html"
    assert main(["report", str(output), "-o", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    page = target.read_text()
    assert "LP.renderJob" in page and "report-data" in page
    # nothing is fetched: no external script, style, image or font
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", page)
    assert "<script src" not in page and "<link" not in page
    assert main(["report", str(output)]) == 0  # default: OUTPUT.report.html
    assert Path(str(output) + ".report.html").exists()


def test_report_of_a_job_without_timeline_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path / "nothing.jsonl")]) == 2
    assert "no timeline for" in capsys.readouterr().err


def test_failures_are_read_from_the_journal_of_an_unfinished_job(tmp_path: Path) -> None:
    dead = tmp_path / "out.jsonl.failed.jsonl"
    record = {"key": "r1", "line": 1, "error": {"type": "LLMCallError", "message": "boom"}}
    whole = encode_record(1, "r1", json.dumps(record).encode())
    Path(str(dead) + ".partial").write_bytes(whole + whole.replace(b"boom", b"bOOm"))
    assert latest_failures(str(dead), 5) == [record]
    assert latest_failures(str(tmp_path / "none"), 5) == []


def test_report_html_escapes_what_it_embeds() -> None:
    data = {
        "output": "<b>x</b>",
        "runs": [{"number": 1, "started_at": None, "job": {"model": "</script>"},
                  "samples": [], "end": None}],
        "summary": None,
        "failures": [{"key": "</script><script>alert(1)</script>", "error": {}}],
    }  # fmt: skip
    page = render_html(data)
    assert "</script><script>alert(1)" not in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page


# -- in the browser ----------------------------------------------------------------------


@needs_chromium
def test_report_opens_offline_and_shows_the_summary_figures(
    finished_job: tuple[Path, dict[str, Any]],
) -> None:
    output, summary = finished_job
    target = output.parent / "report.html"
    assert main(["report", str(output), "-o", str(target)]) == 0
    with chromium() as driver:
        driver.set_network_conditions(offline=True, latency=0, throughput=0)
        driver.get(target.as_uri())
        wait_for(
            driver, lambda d: d.execute_script("return document.body.dataset.rendered"), "page"
        )
        cells = driver.execute_script(
            "return Object.fromEntries(Array.from(document.querySelectorAll('#summary tr'))"
            ".map(r => [r.dataset.field, r.cells[1].textContent]));"
        )
        for field in ("rows_in", "ok", "failed", "requests", "retries", "prompt_tokens",
                      "completion_tokens", "cost_usd", "total_ok", "total_failed"):  # fmt: skip
            assert cells[field] == str(summary[field]), field
        tiles = driver.execute_script(
            "return Object.fromEntries(Array.from(document.querySelectorAll('.tile'))"
            ".map(t => [t.dataset.key, t.querySelector('.value').textContent]));"
        )
        assert tiles["done"] == f"{ROWS} / {ROWS} (100%)"
        assert tiles["ok"] == str(summary["ok"]) and tiles["failed"] == str(summary["failed"])
        assert tiles["requests"] == str(summary["requests"])
        assert tiles["cost"] == f"${summary['cost_usd']:.4f}"
        points = chart_points(driver)
        assert all(count > 0 for count in points.values()), points
        failures = driver.execute_script(
            "return Array.from(document.querySelectorAll('#failures tbody tr'))"
            ".map(r => r.cells[0].textContent);"
        )
        assert sorted(failures) == sorted(f"r{line}" for line in BAD)
        driver.save_screenshot(str(artifacts_dir() / "report.png"))
