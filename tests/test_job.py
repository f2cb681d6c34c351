"""The job API: settings validation, the caller they build, and run_job end to end."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from pipeline._errors import ConfigError
from pipeline.jobs import (
    JobFailedError,
    JobLock,
    JobLockedError,
    JobProgress,
    JobSettings,
    JobSummary,
    build_caller,
    read_job_file,
    release_caller,
    run_job,
)
from pipeline.jobs._journal import ResumeError
from pipeline.jobs._settings import BUILTIN_PRICES, PATH_FIELDS, price_for
from pipeline.testing._sim import SimConfig, serve

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def write_rows(path: Path, rows: list[Any]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def read_jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def names(n: int) -> list[dict[str, Any]]:
    return [{"name": f"n{i}"} for i in range(n)]


# -- settings --------------------------------------------------------------------------------


def test_defaults_and_fingerprint() -> None:
    s = JobSettings(model="m", prompt="Hi {name}")
    assert s.endpoint == "chat" and s.output_field == "response" and s.concurrency is None
    assert s.fingerprint() == {
        "model": "m",
        "prompt": "Hi {name}",
        "system": None,
        "endpoint": "chat",
        "provider": "openai",
        "params": {},
        "json_output": False,
        "output_field": "response",
        "id_field": None,
        "input_format": None,
        "output_format": None,
    }
    assert "concurrency" not in s.fingerprint()  # tuning, not the answers


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"concurrency": "4"}, "setting 'concurrency' must be an integer, got str"),
        ({"concurrency": True}, "setting 'concurrency' must be an integer"),
        ({"concurrency": 0}, "setting 'concurrency' must be > 0, got 0"),
        ({"max_retries": -1}, "setting 'max_retries' must be >= 0"),
        ({"rpm": "fast"}, "setting 'rpm' must be a number"),
        ({"timeout": math.inf}, "setting 'timeout' must be a finite number"),
        ({"stream": "yes"}, "setting 'stream' must be true or false"),
        ({"endpoint": "completions"}, "setting 'endpoint' must be one of 'chat', 'embeddings'"),
        ({"provider": "gemini"}, "setting 'provider' must be one of"),
        ({"trace": "jaeger"}, "setting 'trace' must be one of 'console', 'otlp'"),
        ({"model": None}, "setting 'model' cannot be null"),
        ({"output_field": " "}, "setting 'output_field' must not be empty"),
        ({"prompt": "Hi {name"}, "prompt template 'Hi {name' is malformed"),
        ({"endpoint": "embeddings", "stream": True}, "stream applies to chat"),
        ({"endpoint": "embeddings", "json_output": True}, "json_output applies to chat"),
        ({"endpoint": "embeddings", "provider": "anthropic"}, "no embeddings endpoint"),
        ({"limiter": "http://localhost:6379"}, "limiter must be a redis:// URL"),
        ({"limiter": "mysql://u:hunter2@h/db"}, "mysql://u:***@h/db"),
        ({"resume": True, "overwrite": True}, "resume and overwrite contradict"),
        ({"output": "-"}, "'-' (stdout) is not supported"),
        ({"input": "a.jsonl", "output": "./a.jsonl"}, "is the input file"),
        ({"budget": 1.0, "model": "my-own-model"}, "budget needs the price of model"),
        ({"headers": {"X-A": 1}}, "header 'X-A' must be a string"),
        ({"params": ["temperature"]}, "setting 'params' must be a table"),
        ({"prices": {"m": [1]}}, "price of 'm' must be [usd_per_1M_prompt"),
        ({"prices": {"m": [1, -2]}}, "price of 'm' must be"),
        ({"json_output": True, "prompt": "Describe {x}"}, "requires the word 'JSON'"),
    ],
)
def test_invalid_settings_say_what_is_wrong(given: dict[str, Any], message: str) -> None:
    data = {"model": "gpt-4o-mini", **given}
    with pytest.raises(ConfigError) as caught:
        JobSettings.from_mapping(data)
    assert message in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_unknown_setting_suggests_the_right_name() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown setting 'max-retry' \(did you mean 'max_retries'"
    ):
        JobSettings.from_mapping({"model": "m", "max-retry": 2})
    with pytest.raises(ConfigError, match="given twice"):
        JobSettings.from_mapping({"model": "m", "max-retries": 2, "max_retries": 3})
    with pytest.raises(ConfigError, match="expected a table of settings"):
        JobSettings.from_mapping(["model"])  # type: ignore[arg-type]


def test_settings_without_paths_for_a_server() -> None:
    for field in PATH_FIELDS:
        with pytest.raises(ConfigError, match=f"setting '{field}' names a file path"):
            JobSettings.from_mapping({"model": "m", field: "/etc/passwd"}, allow_paths=False)
    settings = JobSettings.from_mapping({"model": "m", "prompt": "{q}"}, allow_paths=False)
    with pytest.raises(ConfigError, match="no input file"):
        settings.require_paths()
    filled = settings.replace(input="in.jsonl", output="out.jsonl")
    filled.require_paths()
    assert filled.dead_letter_path() == "out.jsonl.failed.jsonl"
    with pytest.raises(ConfigError, match="must be > 0"):
        settings.replace(concurrency=0)  # replace checks again


def test_json_output_and_prices() -> None:
    JobSettings(model="m", prompt="Answer in JSON: {q}", json_output=True)
    JobSettings(model="m", prompt="{q}", system="Reply with json", json_output=True)
    JobSettings(model="m", prompt="{q}", json_output=True, params={"response_format": {}})
    JobSettings(model="claude-3-5-haiku", provider="anthropic", prompt="{q}", json_output=True)
    assert price_for("gpt-4o-mini-2024-07-18", BUILTIN_PRICES) == (0.15, 0.60)
    assert price_for("gpt-4o-2024-08-06", BUILTIN_PRICES) == (2.50, 10.00)
    assert price_for("llama", BUILTIN_PRICES) is None
    priced = JobSettings(model="llama", budget=2.0, prices={"llama": [0.1, 0.2]})
    assert priced.price() == (0.1, 0.2)
    assert JobSettings(model="gpt-4o-mini", prices={"gpt-4o-mini": (1, 2)}).price() == (1.0, 2.0)


def test_to_dict_masks_credentials_in_headers() -> None:
    s = JobSettings(model="m", headers={"Authorization": "Bearer sk-secret", "X-Team": "a"})
    data = s.to_dict()
    assert data["headers"] == {"Authorization": "***", "X-Team": "a"}
    assert "sk-secret" not in json.dumps(data)


def test_job_file(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    job = tmp_path / "jobs" / "job.toml"
    job.write_text(
        'input = "data/in.jsonl"\noutput = "/abs/out.jsonl"\nmodel = "gpt-4o-mini"\n'
        'prompt = "Hi {name}"\nmax-retries = 2\nrpm = 500\n'
        '[params]\ntemperature = 0.2\n[headers]\n"X-Team" = "a"\n'
        '[prices]\n"gpt-4o-mini" = [0.2, 0.8]\n'
    )
    settings = JobSettings.from_toml(job)
    assert settings.input == str(tmp_path / "jobs" / "data" / "in.jsonl")  # relative to the file
    assert settings.output == "/abs/out.jsonl"
    assert settings.max_retries == 2 and settings.rpm == 500.0
    assert settings.params == {"temperature": 0.2} and settings.headers == {"X-Team": "a"}
    assert settings.price() == (0.2, 0.8)
    job.write_text('model = "m"\nconcurrency = "many"\n')
    with pytest.raises(ConfigError, match=r"job\.toml: setting 'concurrency' must be an integer"):
        JobSettings.from_toml(job)
    job.write_text("model = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        read_job_file(job)
    with pytest.raises(ConfigError, match=r"cannot read job file .*missing\.toml"):
        read_job_file(tmp_path / "missing.toml")


def test_build_caller_maps_every_setting(tmp_path: Path) -> None:
    settings = JobSettings(
        model="gpt-4o-mini",
        prompt="Answer in JSON: {q}",
        system="sys",
        base_url="http://127.0.0.1:1/v1",
        api_key_env="MY_KEY",
        concurrency=3,
        rpm=60,
        tpm=1000,
        max_retries=1,
        timeout=5,
        deadline=9,
        stream=True,
        json_output=True,
        output_field="out",
        params={"temperature": 0},
        headers={"X-A": "b"},
        budget=1.0,
        cache=str(tmp_path / "cache"),
    )
    caller = build_caller(settings)
    try:
        assert caller.model == "gpt-4o-mini" and caller.system == "sys"
        assert caller.provider is not None and caller.provider.base_url == "http://127.0.0.1:1/v1"
        assert caller.http.api_key_env == "MY_KEY" and caller.limits.concurrency == 3
        assert (caller.limits.rpm, caller.limits.tpm, caller.retry.max_retries) == (60, 1000, 1)
        assert (caller.http.timeout, caller.retry.deadline_s, caller.output.stream) == (5, 9, True)
        assert caller.output.field == "out" and caller.output.validator is not None
        assert caller.params == {"temperature": 0, "response_format": {"type": "json_object"}}
        assert caller.http.headers == {"X-A": "b"} and caller.output.budget_usd == 1.0
        assert caller.output.prices is not None
        assert caller.output.prices["gpt-4o-mini"].prompt == 0.15  # type: ignore[union-attr]
        assert caller.cache is not None and (tmp_path / "cache").is_dir()
    finally:
        anyio.run(release_caller, caller)


# -- running ---------------------------------------------------------------------------------


async def test_run_job_writes_rows_and_dead_letters(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "in.jsonl", [*names(30), "{broken", {"other": 1}])
    out = tmp_path / "out.jsonl"
    progress: list[JobProgress] = []
    async with serve(SimConfig(latency_ms=2)) as sim:
        settings = JobSettings(
            input=str(src), output=str(out), model="gpt-4o-mini", prompt="Hi {name}",
            base_url=sim.url,
        )  # fmt: skip
        summary = await run_job(settings, on_progress=progress.append, progress_interval=0.01)
        assert sim.counters()["requests"] == 30
    rows = read_jsonl(out)
    assert sorted(r["name"] for r in rows) == sorted(f"n{i}" for i in range(30))
    assert all(r["response"] == f"echo: Hi {r['name']}" for r in rows)
    dead = read_jsonl(tmp_path / "out.jsonl.failed.jsonl")
    assert [(d["line"], d["error"]["type"]) for d in sorted(dead, key=lambda d: d["line"])] == [
        (31, "BadRowError"),
        (32, "MissingFieldError"),
    ]
    assert dead[0]["error"].keys() == {"type", "message", "status", "attempts"}
    assert summary.complete and summary.stopped is None
    assert (summary.rows_in, summary.ok, summary.failed) == (32, 30, 2)
    assert summary.failed_by_cause == {"BadRowError": 1, "MissingFieldError": 1}
    assert summary.requests == 30 and summary.retries == 0
    assert summary.prompt_tokens > 0 and summary.completion_tokens > 0
    assert summary.cost_usd == pytest.approx(
        (summary.prompt_tokens * 0.15 + summary.completion_tokens * 0.60) / 1e6
    )
    assert (summary.total_ok, summary.total_failed) == (30, 2)
    assert summary.dead_letter == str(tmp_path / "out.jsonl.failed.jsonl")
    data = summary.to_dict()
    for key in ("rows_in", "ok", "failed", "requests", "retries", "prompt_tokens",
                "completion_tokens", "cost_usd", "elapsed_s"):  # fmt: skip
        assert key in data
    assert progress and progress[-1].final and progress[-1].rows_done == 32
    assert progress[-1].rows_total == 32 and progress[-1].eta_s == 0.0
    assert listing(tmp_path) == ["in.jsonl", "out.jsonl",
                                                          "out.jsonl.failed.jsonl"]  # fmt: skip


async def test_no_dead_letter_file_when_nothing_failed(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(5))
    async with serve() as sim:
        settings = JobSettings(
            input=str(src), output=str(tmp_path / "o.jsonl"), model="m", prompt="{name}",
            base_url=sim.url,
        )  # fmt: skip
        summary = await run_job(settings)
    assert summary.dead_letter is None and summary.total_failed == 0
    assert not (tmp_path / "o.jsonl.failed.jsonl").exists()


async def test_unreachable_server_stops_before_any_row(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(3))
    async with serve() as sim:
        dead_url = sim.url  # the port is free again once the server stops
    settings = JobSettings(
        input=str(src), output=str(tmp_path / "o.jsonl"), model="m", prompt="{name}",
        base_url=dead_url,
    )  # fmt: skip
    with pytest.raises(JobFailedError) as caught:
        await run_job(settings)
    port = dead_url.split(":")[2].split("/")[0]
    assert str(caught.value) == f"cannot reach http://127.0.0.1:{port}: connection refused"
    assert listing(tmp_path) == ["in.jsonl"]  # nothing dead-lettered


async def test_rejected_key_is_fatal_and_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(20))
    monkeypatch.setenv("JOB_TEST_KEY", "sk-wrong-key-123456")
    async with serve(SimConfig(require_key="sk-right")) as sim:
        settings = JobSettings(
            input=str(src), output=str(tmp_path / "o.jsonl"), model="m", prompt="{name}",
            base_url=sim.url, api_key_env="JOB_TEST_KEY",
        )  # fmt: skip
        with pytest.raises(JobFailedError, match=r"rejected the API key from \$JOB_TEST_KEY"):
            await run_job(settings)
    # no row was finished: nothing is left to resume, a plain re-run starts cleanly
    assert listing(tmp_path) == ["in.jsonl"]


async def test_a_wrong_url_path_stops_instead_of_failing_every_row(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(50))
    async with serve() as sim:
        settings = JobSettings(
            input=str(src), output=str(tmp_path / "o.jsonl"), model="m", prompt="{name}",
            base_url=sim.base_url + "/wrong/v1",
        )  # fmt: skip
        with pytest.raises(JobFailedError) as caught:
            await run_job(settings)
        assert sim.counters()["requests"] < 50
    assert "the first requests fail with HTTP 404 before any succeeded" in str(caught.value)
    assert "check the base URL and the model name" in str(caught.value)
    assert caught.value.summary.ok == 0
    assert listing(tmp_path) == ["in.jsonl"]


async def test_a_fatal_error_after_some_rows_keeps_the_job_resumable(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(60))
    out = tmp_path / "o.jsonl"
    async with serve() as sim:
        settings = JobSettings(
            input=str(src), output=str(out), model="m", prompt="{name}", base_url=sim.url,
            concurrency=1,
        )  # fmt: skip
        # the account runs out of credit after the first rows: a fatal error, not 60 dead letters
        sim.configure(SimConfig(quota_429=0.2, seed=5))
        with pytest.raises(JobFailedError, match="lack of quota or credit") as caught:
            await run_job(settings)
        done_before = caught.value.summary.ok
        assert done_before > 0 and (tmp_path / "o.jsonl.checkpoint.json").exists()
        sim.configure(SimConfig())
        summary = await run_job(settings.replace(resume=True))
    assert summary.complete and summary.resumed_skipped == done_before
    assert sorted(r["name"] for r in read_jsonl(out)) == sorted(f"n{i}" for i in range(60))


async def test_missing_key_variable_is_a_config_error(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(2))
    async with serve() as sim:
        settings = JobSettings(
            input=str(src), output=str(tmp_path / "o.jsonl"), model="m", prompt="{name}",
            base_url=sim.url, api_key_env="JOB_TEST_UNSET_VARIABLE",
        )  # fmt: skip
        with pytest.raises(ConfigError, match=r"\$JOB_TEST_UNSET_VARIABLE is not set"):
            await run_job(settings)


async def test_bad_files_are_refused_plainly(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(1))
    base = JobSettings(input=str(src), output=str(tmp_path / "o.jsonl"), model="m", prompt="x")
    cases = [
        (base.replace(input=str(tmp_path / "none.jsonl")), "cannot read input .*none.jsonl"),
        (base.replace(input=str(tmp_path)), "is a directory, not a file"),
        (base.replace(output=str(tmp_path / "no" / "o.jsonl")), "directory .* does not exist"),
        (base.replace(output=str(tmp_path)), "is a directory, not a file"),
        (base.replace(model=""), "no model"),
    ]
    for settings, message in cases:
        with pytest.raises(ConfigError, match=message):
            await run_job(settings)


async def test_stop_then_resume_is_exactly_once(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "in.jsonl", [*names(200), "not json"])
    out = tmp_path / "out.jsonl"
    async with serve(SimConfig(latency_ms=5)) as sim:
        settings = JobSettings(
            input=str(src), output=str(out), model="m", prompt="Hi {name}", base_url=sim.url,
            concurrency=4,
        )  # fmt: skip
        stop = anyio.Event()

        def on_progress(p: JobProgress) -> None:
            if p.ok >= 40:
                stop.set()

        with anyio.fail_after(10):
            first = await run_job(
                settings, on_progress=on_progress, stop_event=stop, stop_reason="test stop",
                progress_interval=0.005,
            )  # fmt: skip
        assert not first.complete and first.stopped == "test stop"
        assert 40 <= first.ok < 200 and not out.exists()
        sent_first = sim.counters()["requests"]
        assert sent_first == first.ok  # a graceful stop lets every row in flight finish
        with pytest.raises(ResumeError, match="--resume"):
            await run_job(settings)
        changed = settings.replace(prompt="Bye {name}", resume=True)
        with pytest.raises(ResumeError, match="prompt"):
            await run_job(changed)
        second = await run_job(settings.replace(resume=True))
        assert sim.counters()["requests"] == 200  # nothing sent twice
    assert second.complete and second.resumed_skipped == first.ok + first.failed
    assert second.total_ok == 200 and second.total_failed == 1
    rows = read_jsonl(out)
    assert sorted(r["name"] for r in rows) == sorted(f"n{i}" for i in range(200))
    assert len(read_jsonl(tmp_path / "out.jsonl.failed.jsonl")) == 1


async def test_stop_cancels_rows_that_outlast_the_grace(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(10))
    out = tmp_path / "out.jsonl"
    async with serve(SimConfig(latency_ms=60_000)) as sim:
        settings = JobSettings(
            input=str(src), output=str(out), model="m", prompt="{name}", base_url=sim.url,
            concurrency=2, grace=0.05,
        )  # fmt: skip
        stop = anyio.Event()

        def on_progress(p: JobProgress) -> None:
            if p.requests >= 2:
                stop.set()

        with anyio.fail_after(10):
            summary = await run_job(
                settings, on_progress=on_progress, stop_event=stop, progress_interval=0.01
            )
        assert summary.stopped == "stop requested" and summary.ok == 0 and not summary.complete
        sim.configure(SimConfig())
        done = await run_job(settings.replace(resume=True))
    assert done.complete and done.total_ok == 10
    assert len(read_jsonl(out)) == 10


async def test_cache_hits_cost_nothing(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(12))
    async with serve() as sim:
        settings = JobSettings(
            input=str(src), output=str(tmp_path / "a.jsonl"), model="m", prompt="{name}",
            base_url=sim.url, cache=str(tmp_path / "cache"),
        )  # fmt: skip
        first = await run_job(settings)
        second = await run_job(settings.replace(output=str(tmp_path / "b.jsonl")))
        assert sim.counters()["requests"] == 12
    assert first.cache_hits == 0 and second.cache_hits == 12 and second.requests == 0
    answers = [sorted(read_jsonl(tmp_path / f), key=str) for f in ("a.jsonl", "b.jsonl")]
    assert answers[0] == answers[1] and len(answers[0]) == 12


async def test_budget_stops_reading_and_resume_finishes(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(100))
    async with serve(SimConfig(latency_ms=1)) as sim:
        settings = JobSettings(
            input=str(src), output=str(tmp_path / "o.jsonl"), model="priced", prompt="{name}",
            base_url=sim.url, concurrency=1, prices={"priced": [1000.0, 1000.0]}, budget=0.1,
            params={"max_tokens": 4},
        )  # fmt: skip
        stopped = await run_job(settings)
        assert stopped.stopped is not None and "budget of $0.1 reached" in stopped.stopped
        assert not stopped.complete and 0 < stopped.ok < 100 and stopped.failed == 0
        # never past the budget: rows already read when it stopped are left unsent
        assert 0.07 < stopped.cost_usd <= 0.1 == stopped.budget_usd
        assert stopped.unsent == 100 - stopped.ok
        done = await run_job(settings.replace(resume=True, budget=None))
        assert sim.counters()["requests"] == 100
    assert done.complete and done.total_ok == 100 and done.unsent == 0


async def test_ordered_id_field_and_formats(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("id,name\n" + "".join(f"k{i},n{i}\n" for i in range(40)) + "k3,dup\n")
    out = tmp_path / "out.csv"
    async with serve(SimConfig(latency_ms=5, jitter_ms=5, seed=3)) as sim:
        settings = JobSettings(
            input=str(src), output=str(out), model="m", prompt="{name}", base_url=sim.url,
            id_field="id", ordered=True, output_field="answer",
        )  # fmt: skip
        summary = await run_job(settings)
    lines = out.read_text().splitlines()
    assert lines[0] == "id,name,answer"
    assert lines[1:] == [f"k{i},n{i},echo: n{i}" for i in range(40)]  # input order
    dead = read_jsonl(tmp_path / "out.csv.failed.jsonl")
    assert dead[0]["line"] == 42 and "duplicate" in dead[0]["error"]["message"]
    assert summary.failed_by_cause == {"BadRowError": 1}


async def test_embeddings_are_batched(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "in.jsonl", [{"text": f"t{i}"} for i in range(25)])
    out = tmp_path / "out.jsonl"
    async with serve(SimConfig(embedding_dim=4)) as sim:
        settings = JobSettings(
            input=str(src), output=str(out), model="text-embedding-3-small",
            endpoint="embeddings", base_url=sim.url, batch_size=10, output_field="vector",
        )  # fmt: skip
        summary = await run_job(settings)
        assert sim.counters()["requests"] == 3
    rows = read_jsonl(out)
    assert len(rows) == 25 and all(len(r["vector"]) == 4 for r in rows)
    assert summary.ok == 25 and summary.requests == 3


async def test_json_output_and_stream(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(6))
    async with serve() as sim:
        settings = JobSettings(
            input=str(src), output=str(tmp_path / "j.jsonl"), model="m",
            prompt="Reply in JSON to {name}", base_url=sim.url, json_output=True, stream=True,
        )  # fmt: skip
        await run_job(settings)
    rows = read_jsonl(tmp_path / "j.jsonl")
    assert sorted(r["response"]["echo"] for r in rows) == sorted(
        f"Reply in JSON to n{i}" for i in range(6)
    )


async def test_console_trace_exports_spans(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_rows(tmp_path / "in.jsonl", names(2))
    async with serve() as sim:
        settings = JobSettings(
            input=str(src), output=str(tmp_path / "o.jsonl"), model="m", prompt="{name}",
            base_url=sim.url, trace="console",
        )  # fmt: skip
        await run_job(settings)
    err = capsys.readouterr().err
    assert '"name": "llm"' in err and '"name": "pipeline job"' in err


async def test_run_job_hands_the_job_to_the_engine_its_settings_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pipeline.jobs._run import ENGINES

    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text('{"name": "Ada"}\n')

    seen: list[Any] = []

    async def engine(settings: JobSettings, options: Any) -> JobSummary:
        seen.append((settings, options))
        assert settings.output is not None
        with pytest.raises(JobLockedError):  # the engine runs with the job's lock held
            JobLock(settings.output).acquire()
        return JobSummary(ok=7, complete=True, engine="ray")

    monkeypatch.setitem(ENGINES, "ray", engine)
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    settings = JobSettings(
        input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "o.jsonl"), model="m", engine="ray"
    )
    stop = anyio.Event()
    summary = await run_job(settings, on_progress=print, stop_event=stop, stop_reason="bye")
    assert summary.engine == "ray" and summary.ok == 7
    [(given, options)] = seen
    assert given is settings
    assert (options.on_progress, options.stop_event, options.stop_reason) == (print, stop, "bye")
    with pytest.raises(ConfigError, match="no output file"):  # checked before any engine
        await run_job(settings.replace(output=None))
    assert len(seen) == 1
