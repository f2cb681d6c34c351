"""The command line: every flag, job files, bad input, exit statuses, progress and summary."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer, redis_server_binary
from sim_thread import ThreadSim

from pipeline.cli._main import build_parser, main, settings_from_args
from pipeline.cli._progress import (
    ProgressDisplay,
    format_bar,
    format_duration,
    format_line,
    summary_table,
)
from pipeline.jobs import JobProgress, JobSummary
from pipeline.jobs._journal import FORMAT_VERSION
from pipeline.testing._sim import SimConfig, Simulator

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server() -> Iterator[Simulator]:
    with ThreadSim() as sim:
        yield sim


@pytest.fixture
def sim(server: Simulator) -> Simulator:
    server.configure(SimConfig())
    server.reset()
    return server


def write_rows(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def names(n: int) -> list[dict[str, Any]]:
    return [{"id": f"k{i}", "name": f"n{i}"} for i in range(n)]


def run_cli(tmp_path: Path, sim: Simulator | None, *args: str) -> int:
    base = ["run", "--model", "m"]
    if sim is not None:
        base += ["--base-url", sim.url]
    return main([*base, *args])


# -- flags -----------------------------------------------------------------------------------


FLAGS: list[tuple[list[str], str, Any]] = [
    (["in.jsonl"], "input", "in.jsonl"),
    (["-o", "o.jsonl"], "output", "o.jsonl"),
    (["--output", "o.jsonl"], "output", "o.jsonl"),
    (["--model", "gpt-4o"], "model", "gpt-4o"),
    (["--prompt", "Hi {name}"], "prompt", "Hi {name}"),
    (["--system", "Be brief"], "system", "Be brief"),
    (["--base-url", "http://h/v1"], "base_url", "http://h/v1"),
    (["--api-key-env", "K"], "api_key_env", "K"),
    (["--endpoint", "embeddings"], "endpoint", "embeddings"),
    (["--provider", "anthropic"], "provider", "anthropic"),
    (["--concurrency", "7"], "concurrency", 7),
    (["--max-concurrency", "9"], "max_concurrency", 9),
    (["--rpm", "500"], "rpm", 500.0),
    (["--tpm", "2e5"], "tpm", 200000.0),
    (["--max-retries", "0"], "max_retries", 0),
    (["--timeout", "2.5"], "timeout", 2.5),
    (["--deadline", "30"], "deadline", 30.0),
    (["--stream"], "stream", True),
    (["--no-stream"], "stream", False),
    (["--ordered"], "ordered", True),
    (["--id-field", "id"], "id_field", "id"),
    (["--output-field", "answer"], "output_field", "answer"),
    (["--json-output", "--prompt", "JSON: {q}"], "json_output", True),
    (["--dead-letter", "dl.jsonl"], "dead_letter", "dl.jsonl"),
    (["--resume"], "resume", True),
    (["--overwrite"], "overwrite", True),
    (["--cache", "cache"], "cache", "cache"),
    (["--budget", "2", "--model", "gpt-4o-mini"], "budget", 2.0),
    (["--summary-json", "s.json"], "summary_json", "s.json"),
    (["--trace", "console"], "trace", "console"),
    (["--quiet"], "quiet", True),
    (["--limiter", "redis://h:6379/0"], "limiter", "redis://h:6379/0"),
    (["--engine", "ray"], "engine", "ray"),
    (["--ray-address", "ray://h:10001"], "ray_address", "ray://h:10001"),
    (["--param", "temperature=0.2"], "params", {"temperature": 0.2}),
    (["--param", 'stop=["\\n"]', "--param", "user=ann"], "params", {"stop": ["\n"], "user": "ann"}),
    (["--header", "X-Team: data"], "headers", {"X-Team": "data"}),
    (["--input-format", "csv"], "input_format", "csv"),
    (["--output-format", "parquet"], "output_format", "parquet"),
    (["--batch-size", "16"], "batch_size", 16),
    (["--grace", "3"], "grace", 3.0),
    (["--max-retry-after", "30"], "max_retry_after", 30.0),
    (["--max-response-mb", "2.5"], "max_response_mb", 2.5),
]


@pytest.mark.parametrize(("argv", "field", "value"), FLAGS, ids=[" ".join(f[0]) for f in FLAGS])
def test_every_flag_sets_its_setting(argv: list[str], field: str, value: Any) -> None:
    parser = build_parser()
    args = vars(parser.parse_args(["run", "--model", "m", *argv]))
    args.pop("command")
    args.pop("debug")
    args.pop("progress_interval")
    settings, flags = settings_from_args(args)
    assert getattr(settings, field) == value
    assert field in flags


def test_job_file_with_flags_overriding(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        'input = "in.jsonl"\noutput = "out.jsonl"\nmodel = "a"\nprompt = "P {x}"\n'
        "concurrency = 3\nstream = true\n[params]\ntemperature = 0.5\nseed = 1\n"
        '[headers]\n"X-A" = "1"\n'
    )
    parser = build_parser()
    args = vars(
        parser.parse_args(
            ["run", "--config", str(job), "--model", "b", "--no-stream", "-o", "mine.jsonl",
             "--param", "seed=2", "--header", "X-B: 2"]
        )
    )  # fmt: skip
    for name in ("command", "debug", "progress_interval"):
        args.pop(name)
    settings, _ = settings_from_args(args)
    assert settings.input == str(tmp_path / "in.jsonl")  # relative to the job file
    assert settings.output == "mine.jsonl"  # a flag: relative to the working directory
    assert (settings.model, settings.prompt, settings.concurrency) == ("b", "P {x}", 3)
    assert settings.stream is False
    assert settings.params == {"temperature": 0.5, "seed": 2}
    assert settings.headers == {"X-A": "1", "X-B": "2"}


def test_flags_end_to_end(
    tmp_path: Path,
    sim: Simulator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLI_TEST_KEY", "sk-test")
    src = write_rows(tmp_path / "in.jsonl", [*names(20), {"id": "k3", "name": "dup"}])
    job = tmp_path / "job.toml"
    job.write_text('[prices]\n"m" = [1.0, 2.0]\n')
    status = run_cli(
        tmp_path, sim, str(src), "-o", str(tmp_path / "out.jsonl"),
        "--prompt", "Say hi to {name} in JSON", "--system", "You are terse",
        "--api-key-env", "CLI_TEST_KEY", "--concurrency", "3", "--max-concurrency", "4",
        "--rpm", "60000", "--tpm", "1e7", "--max-retries", "1", "--timeout", "20",
        "--deadline", "30", "--stream", "--ordered", "--id-field", "id",
        "--output-field", "answer", "--json-output", "--param", "temperature=0",
        "--header", "X-Test: yes", "--dead-letter", str(tmp_path / "dl.jsonl"),
        "--cache", str(tmp_path / "cache"), "--budget", "10", "--config", str(job),
        "--summary-json", str(tmp_path / "s.json"), "--grace", "5",
    )  # fmt: skip
    assert status == 3, capsys.readouterr().err
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == [f"k{i}" for i in range(20)]  # --ordered
    assert rows[5]["answer"] == {"echo": "Say hi to n5 in JSON"}  # --json-output, field
    dead = read_jsonl(tmp_path / "dl.jsonl")
    assert dead[0]["line"] == 21 and "duplicate" in dead[0]["error"]["message"]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["ok"] == 20 and summary["failed"] == 1 and summary["exit_status"] == 3
    assert summary["cost_usd"] > 0  # priced by the job file
    assert (tmp_path / "cache" / "responses.sqlite3").exists()
    assert sim.counters()["requests"] == 20


def test_summary_json_has_the_documented_fields(tmp_path: Path, sim: Simulator) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(4))
    out = tmp_path / "o.jsonl"
    assert run_cli(tmp_path, sim, str(src), "-o", str(out), "--prompt", "{name}", "--quiet",
                   "--summary-json", str(tmp_path / "s.json")) == 0  # fmt: skip
    summary = json.loads((tmp_path / "s.json").read_text())
    for key in ("rows_in", "ok", "failed", "requests", "retries", "prompt_tokens",
                "completion_tokens", "cost_usd", "elapsed_s", "failed_by_cause"):  # fmt: skip
        assert key in summary, key
    assert (summary["rows_in"], summary["ok"], summary["requests"]) == (4, 4, 4)
    assert summary["exit_status"] == 0 and summary["error"] is None


# -- exit statuses and messages --------------------------------------------------------------


def test_exit_0_prints_summary_and_progress(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.configure(SimConfig(latency_ms=20))
    src = write_rows(tmp_path / "in.jsonl", names(30))
    status = run_cli(tmp_path, sim, str(src), "-o", str(tmp_path / "o.jsonl"), "--prompt",
                     "{name}", "--concurrency", "2", "--progress-interval", "0.05")  # fmt: skip
    out, err = capsys.readouterr()
    assert status == 0
    assert "progress: " in err and "/30 rows (" in err and "rows/s" in err
    table = dict(line.split(None, 1) for line in out.splitlines() if " " in line.strip())
    assert table["rows"].strip() == "30" and table["ok"].strip() == "30"
    assert table["requests"].strip() == "30" and "o.jsonl (30 rows)" in table["output"]
    for label in ("failed", "retries", "tokens", "cost", "elapsed", "rows/s"):
        assert label in table


def test_quiet_prints_nothing(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(3))
    assert run_cli(tmp_path, sim, str(src), "-o", str(tmp_path / "o.jsonl"), "--prompt",
                   "{name}", "--quiet") == 0  # fmt: skip
    assert capsys.readouterr() == ("", "")


def test_exit_3_when_rows_are_dead_lettered(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_rows(tmp_path / "in.jsonl", [*names(3), "{oops", {"id": "z"}])
    assert run_cli(tmp_path, sim, str(src), "-o", str(tmp_path / "o.jsonl"), "--prompt",
                   "{name}") == 3  # fmt: skip
    out = capsys.readouterr().out
    assert "1 BadRowError" in out and "1 MissingFieldError" in out
    assert "o.jsonl.failed.jsonl (2 rows)" in out


IO = ["{in}", "-o", "{tmp}/o.jsonl"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{in}"], "no output file: give -o OUTPUT"),
        (["-o", "{tmp}/o.jsonl"], "no input file"),
        (["{tmp}/none.jsonl", "-o", "{tmp}/o.jsonl"], "cannot read input '.*none.jsonl': No such"),
        (["{tmp}", "-o", "{tmp}/o.jsonl"], "is a directory, not a file"),
        (["{in}", "-o", "{tmp}/nodir/o.jsonl"], "does not exist"),
        (["{in}", "-o", "-"], "'-' \\(stdout\\) is not supported"),
        (["{in}", "-o", "{in}"], "is the input file"),
        ([*IO, "--concurrency", "0"], "--concurrency must be > 0, got 0"),
        ([*IO, "--prompt", "{x"], "prompt template '{x' is malformed"),
        ([*IO, "--resume", "--overwrite"], "contradict"),
        ([*IO, "--model", "x", "--budget", "1"], "budget needs the price"),
        ([*IO, "--config", "{tmp}/none.toml"], "cannot read job file"),
        ([*IO, "--config", "{tmp}/bad.toml"], "is not valid TOML"),
        ([*IO, "--config", "{tmp}/typo.toml"], "unknown setting 'modle'.*'model'"),
        ([*IO, "--api-key-env", "CLI_UNSET"], r"\$CLI_UNSET is not set"),
    ],
)  # fmt: skip
def test_usage_errors_exit_2_with_a_plain_message(
    tmp_path: Path,
    sim: Simulator,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(2))
    (tmp_path / "bad.toml").write_text("model = [\n")
    (tmp_path / "typo.toml").write_text('modle = "m"\n')
    argv = [a.replace("{in}", str(src)).replace("{tmp}", str(tmp_path)) for a in args]
    if "--prompt" not in argv:
        argv += ["--prompt", "{name}"]
    assert run_cli(tmp_path, sim, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("llm-pipeline: error: ")
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    import re

    assert re.search(message, err), err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--param", "temperature"], "expected KEY=VALUE"),
        (["--header", "X-Team"], "expected 'Name: value'"),
        (["--concurrency", "many"], "expected a whole number"),
        (["--rpm", "lots"], "expected a number"),
        (["--endpoint", "completions"], "invalid choice"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_argument_errors_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["run", "in.jsonl", "-o", "o.jsonl", "--model", "m", *args])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_leftovers_and_changed_settings_are_refused(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(3))
    out = tmp_path / "o.jsonl"
    (tmp_path / "o.jsonl.checkpoint.json").write_text(
        json.dumps(
            {"version": FORMAT_VERSION, "state": "running", "job": {"settings": {"prompt": "old"}}}
        )
    )
    assert run_cli(tmp_path, sim, str(src), "-o", str(out), "--prompt", "{name}") == 2
    assert "use --resume to continue it or --overwrite" in capsys.readouterr().err
    assert run_cli(tmp_path, sim, str(src), "-o", str(out), "--prompt", "{name}", "--resume") == 2
    err = capsys.readouterr().err
    assert "settings differ from the checkpoint's: " in err and 'prompt (was "old"' in err
    assert run_cli(tmp_path, sim, str(src), "-o", str(out), "--prompt", "{name}",
                   "--overwrite", "--quiet") == 0  # fmt: skip
    assert len(read_jsonl(out)) == 3


def test_exit_1_unreachable_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    src = write_rows(tmp_path / "in.jsonl", names(2))
    status = main(["run", str(src), "-o", str(tmp_path / "o.jsonl"), "--model", "m",
                   "--prompt", "{name}", "--base-url", f"http://127.0.0.1:{port}/v1"])  # fmt: skip
    assert status == 1
    err = capsys.readouterr().err
    assert err == f"llm-pipeline: error: cannot reach http://127.0.0.1:{port}: connection refused\n"


def test_exit_1_rejected_key_never_shows_it(
    tmp_path: Path,
    sim: Simulator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim.configure(SimConfig(require_key="sk-good"))
    monkeypatch.setenv("CLI_TEST_KEY", "sk-bad-0123456789")
    src = write_rows(tmp_path / "in.jsonl", names(5))
    status = run_cli(tmp_path, sim, str(src), "-o", str(tmp_path / "o.jsonl"), "--prompt",
                     "{name}", "--api-key-env", "CLI_TEST_KEY", "--debug",
                     "--summary-json", str(tmp_path / "s.json"))  # fmt: skip
    assert status == 1
    out, err = capsys.readouterr()
    assert "rejected the API key from $CLI_TEST_KEY" in err
    assert "Traceback" in err  # --debug
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["exit_status"] == 1 and "rejected the API key" in summary["error"]
    for text in (out, err, *(p.read_text() for p in tmp_path.iterdir())):
        assert "sk-bad-0123456789" not in text


def test_exit_1_when_the_budget_stops_the_job(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(50))
    job = tmp_path / "job.toml"
    job.write_text('[prices]\n"m" = [1000.0, 1000.0]\n[params]\nmax_tokens = 4\n')
    argv = [str(src), "-o", str(tmp_path / "o.jsonl"), "--prompt", "{name}", "--config",
            str(job), "--concurrency", "1"]  # fmt: skip
    # a row costs about $0.005, its worst case (its bytes / 4 and 4 answer tokens) $0.02
    assert run_cli(tmp_path, sim, *argv, "--budget", "0.05") == 1
    err = capsys.readouterr().err
    assert "stopped before the end (budget of $0.05 reached" in err
    assert "--resume" in err
    sent = sim.counters()["requests"]
    assert 0 < sent < 50
    assert run_cli(tmp_path, sim, *argv, "--resume", "--quiet") == 0
    assert len(read_jsonl(tmp_path / "o.jsonl")) == 50
    assert sim.counters()["requests"] == 50  # the rows left unsent, and no row twice


def test_trace_console(tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(1))
    assert run_cli(tmp_path, sim, str(src), "-o", str(tmp_path / "o.jsonl"), "--prompt",
                   "{name}", "--trace", "console", "--quiet") == 0  # fmt: skip
    assert '"name": "llm"' in capsys.readouterr().err


def test_trace_otlp_without_the_exporter_says_which_extra(
    tmp_path: Path,
    sim: Simulator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    src = write_rows(tmp_path / "in.jsonl", names(1))
    assert run_cli(tmp_path, sim, str(src), "-o", str(tmp_path / "o.jsonl"), "--prompt",
                   "{name}", "--trace", "otlp") == 2  # fmt: skip
    assert "needs the OTLP exporter: pip install 'llm-pipeline[otel]'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


@pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed")
def test_limiter_shares_limits_through_redis(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    import redis

    src = write_rows(tmp_path / "in.jsonl", names(5))
    server = RedisServer(password="hunter2").start()
    try:
        status = run_cli(tmp_path, sim, str(src), "-o", str(tmp_path / "o.jsonl"), "--prompt",
                         "{name}", "--rpm", "6000", "--limiter", server.url, "--quiet")  # fmt: skip
        assert status == 0
        client = redis.Redis.from_url(server.url)
        try:
            keys = sorted(k.decode() for k in client.keys("llmpipe:*"))
            ended = client.zcard(keys[-1])
        finally:
            client.close()
        # the shared state, and the 5 requests that ended (none is left open)
        assert len(keys) == 2 and keys[0].startswith("llmpipe:openai:") and keys[0].endswith(":m")
        assert keys[1] == f"{keys[0]}:ended" and ended == 5
        port = server.port
    finally:
        server.stop()
    status = run_cli(tmp_path, sim, str(src), "-o", str(tmp_path / "p.jsonl"), "--prompt",
                     "{name}", "--rpm", "6000", "--limiter",
                     f"redis://:hunter2@127.0.0.1:{port}/0")  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1 and "redis" in err.lower() and "hunter2" not in err


# -- subcommands -----------------------------------------------------------------------------


def test_cache_hits_through_the_cli(tmp_path: Path, sim: Simulator) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(6))
    cache = str(tmp_path / "cache")
    for out in ("a.jsonl", "b.jsonl"):
        assert run_cli(tmp_path, sim, str(src), "-o", str(tmp_path / out), "--prompt", "{name}",
                       "--cache", cache, "--quiet",
                       "--summary-json", str(tmp_path / f"{out}.json")) == 0  # fmt: skip
    first = json.loads((tmp_path / "a.jsonl.json").read_text())
    second = json.loads((tmp_path / "b.jsonl.json").read_text())
    assert (first["cache_hits"], first["requests"]) == (0, 6)
    assert (second["cache_hits"], second["requests"], second["ok"]) == (6, 0, 6)
    assert sim.counters()["requests"] == 6
    assert sorted(read_jsonl(tmp_path / "a.jsonl"), key=str) == sorted(
        read_jsonl(tmp_path / "b.jsonl"), key=str
    )


def test_uvloop_is_used_when_installed() -> None:
    from pipeline.cli._common import backend_options

    pytest.importorskip("uvloop")
    assert backend_options() == {"use_uvloop": True}


def test_sim_and_serve_are_delegated(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["sim", "--help"])
    assert caught.value.code == 0 and "--latency-ms" in capsys.readouterr().out
    with pytest.raises(SystemExit) as caught:
        main(["serve", "--help"])
    assert caught.value.code == 0 and "usage:" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "pipeline.server", None)  # as if the extra were missing
    assert main(["serve"]) == 1
    assert "needs the [server] extra: pip install 'llm-pipeline[server]'" in capsys.readouterr().err


def test_module_entry_point_help_and_version() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline", *args],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip

    assert run().returncode == 2
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("llm-pipeline ")
    helped = run("run", "--help")
    assert helped.returncode == 0
    for flag in ("--prompt", "--resume", "--cache", "--budget", "--summary-json", "--trace",
                 "--config", "--limiter", "--engine", "--param", "--header"):  # fmt: skip
        assert flag in helped.stdout
    unknown = run("frobnicate")
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr


# -- progress display ------------------------------------------------------------------------


def progress(**changes: Any) -> JobProgress:
    base: dict[str, Any] = dict(
        rows_total=1000, rows_done=250, ok=240, failed=10, skipped=0, requests=260, retries=3,
        prompt_tokens=5000, completion_tokens=7000, cost_usd=0.0123, elapsed_s=10.0,
        rows_per_s=25.0, tokens_per_s=12000.0, eta_s=30.0,
    )  # fmt: skip
    base.update(changes)
    return JobProgress(**base)


def test_progress_formats() -> None:
    bar = format_bar(progress(), width=120)
    assert bar.startswith(" 25.0% [######------------------] 250/1,000")
    for part in ("25.0 rows/s", "12.0k tok/s", "retries 3", "errors 10", "$0.0123", "ETA 0:30"):
        assert part in bar
    assert format_bar(progress(rows_total=None)).startswith("250 rows  25.0 rows/s")
    assert "ETA" not in format_bar(progress(rows_total=None))
    assert format_bar(progress(stopping="interrupted")).endswith("stopping")
    assert format_bar(progress(), width=100).startswith(" 25.0% [###---------] 250/1,000")
    assert format_bar(progress(), width=85).startswith(" 25.0% 250/1,000  25.0 rows/s")
    assert len(format_bar(progress(), width=40)) == 40
    line = format_line(progress())
    assert line == (
        "progress: 250/1,000 rows (25.0%), 25.0 rows/s, 12.0k tok/s, 3 retries, 10 errors,"
        " $0.0123, elapsed 0:10, ETA 0:30"
    )
    assert format_duration(3725) == "1:02:05" and format_duration(None) == "?"


def test_progress_display_on_a_terminal_and_off() -> None:
    stream = io.StringIO()
    tty = ProgressDisplay(stream, tty=True)
    tty.update(progress())
    tty.message("hello")
    tty.update(progress(rows_done=1000, final=True))
    text = stream.getvalue()
    assert text.startswith("\r\x1b[2K 25.0% [")
    assert "\r\x1b[2Khello\n" in text and text.endswith("\n")
    assert text.count("\n") == 2  # the status line is redrawn in place, not repeated
    plain = io.StringIO()
    log = ProgressDisplay(plain, tty=False)
    log.update(progress())
    log.update(progress(final=True))
    assert plain.getvalue().count("progress: 250/1,000 rows") == 2 and "\r" not in plain.getvalue()


def test_summary_table() -> None:
    summary = JobSummary(
        rows_in=12, ok=9, failed=3,
        failed_by_cause={"LLMCallError (HTTP 400)": 2, "BadRowError": 1},
        requests=15, retries=4, prompt_tokens=1200, completion_tokens=3400, cost_usd=0.5,
        elapsed_s=2.0, rows_per_s=6.0, resumed_skipped=5, complete=True, total_ok=14,
        total_failed=3, cache_hits=2, output="o.jsonl", dead_letter="o.jsonl.failed.jsonl",
    )  # fmt: skip
    table = summary_table(summary)
    assert table.splitlines() == [
        "rows         12",
        "skipped      5 (done by earlier runs)",
        "ok           9",
        "failed       3",
        "               2 LLMCallError (HTTP 400)",
        "               1 BadRowError",
        "requests     15",
        "retries      4",
        "cache hits   2",
        "tokens       1,200 prompt + 3,400 completion",
        "cost         $0.5000",
        "elapsed      2.00 s",
        "rows/s       6.0",
        "output       o.jsonl (14 rows)",
        "dead letter  o.jsonl.failed.jsonl (3 rows)",
    ]
    stopped = summary_table(JobSummary(rows_in=1, ok=1, stopped="interrupted"))
    assert stopped.splitlines()[-1] == "stopped   interrupted"


def test_demo_sample_and_example_job_file_exist() -> None:
    from pipeline.cli._demo import sample_path
    from pipeline.jobs import JobSettings

    assert os.path.getsize(sample_path()) > 0
    settings = JobSettings.from_toml(ROOT / "examples" / "job.toml")
    assert settings.input is not None and os.path.exists(settings.input)


def test_trace_otlp_exports_spans_to_a_collector(
    tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    received: list[tuple[str, str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers.get("Content-Type", ""), body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    collector = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    port = collector.server_address[1]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{port}/v1/traces")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-otlp-SECRET-4242")
    src = write_rows(tmp_path / "in.jsonl", names(3))
    try:
        assert run_cli(tmp_path, sim, str(src), "-o", str(tmp_path / "o.jsonl"), "--prompt",
                       "{name}", "--trace", "otlp", "--quiet") == 0  # fmt: skip
    finally:
        collector.shutdown()
        collector.server_close()
        thread.join(5)
    assert received, "no spans reached the collector"
    spans = []
    for path, content_type, body in received:
        assert path == "/v1/traces" and content_type == "application/x-protobuf"
        assert b"SECRET-4242" not in body
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                spans.extend(span.name for span in scope.spans)
    assert spans.count("llm") == 3  # one span per row in the caller stage


def test_main_leaves_logging_as_it_found_it(tmp_path: Path, sim: Simulator) -> None:
    import logging

    before = [logging.getLogger(n).level for n in ("pipeline", "stages")]
    handlers = list(logging.getLogger().handlers)
    src = write_rows(tmp_path / "in.jsonl", names(2))
    assert run_cli(tmp_path, sim, str(src), "-o", str(tmp_path / "o.jsonl"), "--prompt",
                   "{name}", "--quiet") == 0  # fmt: skip
    assert [logging.getLogger(n).level for n in ("pipeline", "stages")] == before
    assert logging.getLogger().handlers == handlers
