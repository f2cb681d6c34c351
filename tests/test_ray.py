"""The Ray Data engine and transform, on a local Ray (``ray.init(num_cpus=2)``) and the simulator.

Ray starts once for the module (a few seconds); every test runs real actors against a
simulated server served by the test's event loop while Ray works in a thread.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

ray = pytest.importorskip("ray")

import pipeline  # noqa: E402
from pipeline._errors import ConfigError, FatalError, ItemError  # noqa: E402
from pipeline.jobs import JobFailedError, JobLockedError, JobSettings, run_job  # noqa: E402
from pipeline.jobs._journal import Journal  # noqa: E402
from pipeline.jobs._parts import JobColumns, PartsTally, fold_parts, parts_dir  # noqa: E402
from pipeline.jobs._ray import run_job_on_ray  # noqa: E402
from pipeline.testing._sim import SimConfig, Simulator, serve  # noqa: E402
from stages._ray import ERROR, ERROR_RECORD, ActorSpec, actor_class, ray_transform  # noqa: E402
from stages.files import JsonlSink  # noqa: E402
from stages.llm._caller import HTTP, Limits, LLMCaller, Retry  # noqa: E402
from stages.llm._limits import RateLimiter  # noqa: E402

pytestmark = [
    pytest.mark.anyio,
    # Ray Data's own DataContext sets settings it deprecates: Ray's noise, not ours
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
]

KEY_ENV = "RAY_TEST_API_KEY"
SECRET = "sk-ray-test-0123456789"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    os.environ[KEY_ENV] = SECRET  # Ray's workers inherit the environment it starts with
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        os.environ.pop(KEY_ENV, None)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with serve(SimConfig(latency_ms=5, require_key=SECRET)) as s:
        yield s


def write_rows(path: Path, rows: list[Any]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def read_jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the transform ---------------------------------------------------------------------------


async def test_transform_answers_rows_and_flags_failures(local_ray: Any, sim: Simulator) -> None:
    from redis_server import RedisServer, redis_server_binary

    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")

    def _reject_sevens(row: dict[str, Any]) -> dict[str, Any]:  # pickled by value: a local
        if row["id"] % 20 == 7:
            raise ItemError(f"row {row['id']} is not wanted")
        return row

    # the server enforces 3000/min; two actors share that limit through Redis
    sim.configure(SimConfig(latency_ms=5, require_key=SECRET, rpm=3000, burst_s=1.0))
    caller = LLMCaller(
        model="m",
        prompt="{text}",
        base_url=sim.url,
        rpm=3000,
        http=HTTP(api_key_env=KEY_ENV),
        retry=Retry(max_retries=0),
    )
    with RedisServer() as redis:
        transform = ray_transform(
            [pipeline.map(_reject_sevens), caller],
            concurrency=2,
            max_in_flight=4,
            batch_size=10,
            limiter=redis.url,
        )
        dataset = ray.data.from_items(
            [{"id": i, "text": f"row {i}"} for i in range(60)], override_num_blocks=6
        )
        answers, failures = await anyio.to_thread.run_sync(transform.split, transform(dataset))
        answered = await anyio.to_thread.run_sync(answers.take_all)
        failed = await anyio.to_thread.run_sync(failures.take_all)

    assert sorted(r["id"] for r in answered) == [i for i in range(60) if i % 20 != 7]
    assert all(r["response"] == f"echo: row {r['id']}" for r in answered)
    assert all(ERROR not in r and ERROR_RECORD not in r for r in answered)
    assert sorted(r["id"] for r in failed) == [7, 27, 47]
    for row in failed:
        assert row[ERROR] == f"row {row['id']} is not wanted"
        record = json.loads(row[ERROR_RECORD])
        assert record["stage"].startswith("map(")
        assert record["row"] == {"id": row["id"], "text": f"row {row['id']}"}
        assert record["error"]["type"] == "ItemError"
    counters = sim.counters()
    assert counters["requests"] == 57  # failed rows never reached the caller
    assert counters["http_429"] == 0  # the shared limit held across the two actors
    assert counters["concurrent_max"] <= 2 * 4  # max_in_flight per actor


def test_transform_refuses_what_actors_cannot_run(caplog: pytest.LogCaptureFixture) -> None:
    caller = LLMCaller(model="m", prompt="{text}", rpm=1200, limits=Limits(tpm=90_000))
    with caplog.at_level(logging.WARNING, "pipeline.ray"):
        transform = ray_transform(caller, concurrency=4)
    assert transform.concurrency == 4
    [warning] = [r.getMessage() for r in caplog.records]
    assert "each of the 4 actors keeps to rpm=300 (1/4 of 1200) and tpm=22500" in warning
    assert "limiter='redis://host:port/db'" in warning

    shared = LLMCaller(model="m", prompt="{text}", limits=Limits(limiter=RateLimiter(rpm=60)))
    with pytest.raises(ConfigError, match="carries a limiter object"):
        ray_transform(shared)
    assert shared.limiter is not None  # left as it was
    from stages.files import JsonlSource

    with pytest.raises(ConfigError, match="leave out the source"):
        ray_transform(pipeline.Pipeline(JsonlSource("in.jsonl"), caller))
    with pytest.raises(ConfigError, match="leave out the sink"):
        ray_transform([caller, JsonlSink("out.jsonl")])
    with pytest.raises(ConfigError, match="Pipeline, a stage or a list of stages"):
        ray_transform("llm")


# -- the engine ------------------------------------------------------------------------------


def _job_rows(n: int) -> list[Any]:
    rows: list[Any] = [{"id": i, "text": f"row {i}", "when": "2024-05-01"} for i in range(n)]
    rows[5] = {"id": 5, "other": "no text field"}  # the template cannot be filled
    rows.insert(9, "this line is not JSON")
    rows[20]["nested"] = {"a": [1, 2]}  # Arrow would give every row a "nested" column
    return rows


async def test_engine_writes_exactly_what_the_local_engine_writes(
    local_ray: Any, sim: Simulator, tmp_path: Path
) -> None:
    src = write_rows(tmp_path / "in.jsonl", _job_rows(120))
    base = JobSettings(
        input=str(src), model="m", prompt="{text}", base_url=sim.url, api_key_env=KEY_ENV,
        max_retries=0, ordered=True,
    )  # fmt: skip
    local = await run_job(base.replace(output=str(tmp_path / "local.csv")))
    sim.reset()
    on_ray = await run_job(base.replace(output=str(tmp_path / "ray.csv"), engine="ray"))

    assert on_ray.engine == "ray" and on_ray.complete
    assert (on_ray.ok, on_ray.failed, on_ray.rows_in) == (local.ok, local.failed, local.rows_in)
    assert (on_ray.ok, on_ray.failed) == (119, 2)
    assert on_ray.failed_by_cause == local.failed_by_cause
    assert on_ray.requests == sim.counters()["requests"] == 119
    assert on_ray.prompt_tokens == local.prompt_tokens > 0
    # the same bytes: same rows, same keys, same order, same dead-letter records
    assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()
    dead = (tmp_path / "ray.csv.failed.jsonl").read_text()
    assert dead == (tmp_path / "local.csv.failed.jsonl").read_text().replace("local.csv", "ray.csv")
    records = [json.loads(line) for line in dead.splitlines()]
    assert [(r["line"], r["error"]["type"]) for r in records] == [
        (6, "MissingFieldError"),
        (10, "BadRowError"),
    ]
    # nothing left behind: no part files, journals or checkpoint
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["in.jsonl", "local.csv", "local.csv.failed.jsonl", "ray.csv", "ray.csv.failed.jsonl"]
    )


def _first_fault(seed: int, rate: float, n: int) -> int | None:
    """The first request the simulator fails with this seed and rate (its own draw)."""
    for i in range(n):
        if random.Random(seed * 1_000_003 + i).random() < rate:
            return i
    return None


async def test_fatal_error_mid_job_then_resume_redoes_no_finished_row(
    local_ray: Any, sim: Simulator, tmp_path: Path
) -> None:
    n, rate = 200, 0.01
    seed = next(s for s in range(100) if 80 <= (_first_fault(s, rate, n) or -1) <= 150)
    src = write_rows(tmp_path / "in.jsonl", [{"id": i, "text": f"row {i}"} for i in range(n)])
    out = tmp_path / "out.jsonl"
    settings = JobSettings(
        input=str(src), output=str(out), model="m", prompt="{text}", base_url=sim.url,
        api_key_env=KEY_ENV, id_field="id", engine="ray", concurrency=4,
    )  # fmt: skip
    # The account runs out of credit part-way: the job stops with the provider's reason,
    # keeping every row answered before (the actors finish their batches, Ray writes them).
    sim.configure(SimConfig(latency_ms=5, require_key=SECRET, quota_429=rate, seed=seed))
    with pytest.raises(JobFailedError, match="lack of quota or credit") as caught:
        await run_job_on_ray(settings, batch_size=10)
    first = caught.value.summary
    assert first.engine == "ray" and not first.complete
    assert first.ok > 0 and first.failed == 0
    assert (tmp_path / "out.jsonl.checkpoint.json").exists() and not out.exists()

    sim.configure(SimConfig(latency_ms=5, require_key=SECRET))  # credit added
    sim.reset()
    summary = await run_job(settings.replace(resume=True))
    assert summary.complete and summary.resumed_skipped == first.ok
    assert summary.ok == n - first.ok
    assert sim.counters()["requests"] == n - first.ok  # finished rows were not sent again
    rows = read_jsonl(out)
    assert sorted(r["id"] for r in rows) == list(range(n))  # each row exactly once
    assert not await anyio.Path(parts_dir(str(out))).exists()


async def test_stop_leaves_a_job_the_local_engine_resumes(
    local_ray: Any, sim: Simulator, tmp_path: Path
) -> None:
    n = 200
    src = write_rows(tmp_path / "in.jsonl", [{"id": i, "text": f"row {i}"} for i in range(n)])
    out = tmp_path / "out.jsonl"
    settings = JobSettings(
        input=str(src), output=str(out), model="m", prompt="{text}", base_url=sim.url,
        api_key_env=KEY_ENV, engine="ray", rpm=1200, concurrency=2,
    )  # fmt: skip
    stop = anyio.Event()
    snapshots: list[Any] = []

    def on_progress(progress: Any) -> None:
        snapshots.append(progress)
        if sim.counters()["requests"] >= 20:
            stop.set()  # as Ctrl-C would

    summary = await run_job(settings, on_progress=on_progress, stop_event=stop)
    assert summary.stopped == "stop requested" and not summary.complete
    assert 20 <= summary.ok < n and not out.exists()
    assert snapshots[-1].final and snapshots[-1].ok == summary.ok
    sent = sim.counters()["requests"]
    assert sent == summary.ok  # every request sent before the stop was answered and kept

    sim.reset()  # a job stopped on Ray resumes on the local engine: one journal, one format
    resumed = await run_job(settings.replace(resume=True, rpm=None, engine="local"))
    assert resumed.complete and resumed.resumed_skipped == summary.ok
    assert sim.counters()["requests"] == n - summary.ok
    assert sorted(r["text"] for r in read_jsonl(out)) == sorted(f"row {i}" for i in range(n))


async def test_a_second_run_is_refused_while_a_ray_job_runs_it(
    local_ray: Any, sim: Simulator, tmp_path: Path
) -> None:
    n = 100
    src = write_rows(tmp_path / "in.jsonl", [{"id": i, "text": f"row {i}"} for i in range(n)])
    out = tmp_path / "out.jsonl"
    settings = JobSettings(
        input=str(src), output=str(out), model="m", prompt="{text}", base_url=sim.url,
        api_key_env=KEY_ENV, engine="ray", concurrency=2,
    )  # fmt: skip
    refusals: list[str] = []

    async def on_progress(progress: Any) -> None:
        if not refusals and not progress.final:  # the Ray job runs: a second one tries
            with pytest.raises(JobLockedError) as refused:
                await run_job(settings.replace(resume=True, engine="local"))
            refusals.append(str(refused.value))

    summary = await run_job(settings, on_progress=on_progress, progress_interval=0.05)
    assert refusals and f"pid {os.getpid()}" in refusals[0]
    assert summary.complete and summary.ok == n
    assert sim.counters()["requests"] == n  # the refused run sent nothing
    assert sorted(r["id"] for r in read_jsonl(out)) == list(range(n))  # each row exactly once


async def test_a_row_lost_before_the_journal_is_reported_not_published(
    local_ray: Any, sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final check counts the rows the reader read: a row the engine lost stops the publish."""
    import pyarrow.compute as pc

    from pipeline.jobs import _parts

    fold_table = _parts._fold_table

    def lose_line_3(table: Any, journal: Journal, tally: Any) -> None:  # an engine bug
        line = table.column("line")
        fold_table(
            table.filter(pc.or_kleene(pc.is_null(line), pc.not_equal(line, 3))), journal, tally
        )

    monkeypatch.setattr(_parts, "_fold_table", lose_line_3)
    src = write_rows(tmp_path / "in.jsonl", [{"id": i, "text": f"row {i}"} for i in range(30)])
    out = tmp_path / "out.jsonl"
    settings = JobSettings(
        input=str(src), output=str(out), model="m", prompt="{text}", base_url=sim.url,
        api_key_env=KEY_ENV, engine="ray", concurrency=2,
    )  # fmt: skip
    with pytest.raises(JobFailedError, match="input has 30 rows but the journals account for 29"):
        await run_job(settings)
    assert not out.exists() and (tmp_path / "out.jsonl.partial").exists()  # still resumable


# -- folding part files (no Ray needed) ------------------------------------------------------


def test_fold_parts_skips_torn_files_and_rows_already_journaled(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    output = tmp_path / "out.jsonl"
    journal = Journal(output, resume=True)
    journal.open()
    JsonlSink(journal.output)
    directory = Path(parts_dir(str(output)))
    (directory / "run1").mkdir(parents=True)
    part = JobColumns()
    part.add("ok", 1, 1, "in.jsonl:1", b'{"text":"a","response":"A"}')
    part.add("failed", 2, 2, "in.jsonl:2", b'{"key":2,"error":{"type":"ItemError","status":400}}')
    part.add("ok", 1, 1, "in.jsonl:1", b'{"text":"a","response":"A"}')  # written twice
    part.add("stats", None, None, None, b'{"requests":2,"retries":1,"cost_usd":0.5}')
    pq.write_table(part.table(), directory / "run1" / "a.parquet")
    (directory / "run1" / "b.parquet").write_bytes(b"PAR1 then the writer was killed")
    tally = PartsTally()

    fold_parts(str(directory), journal, tally)

    assert (tally.ok, tally.failed, tally.duplicates) == (1, 1, 1)
    assert tally.causes == {"ItemError (HTTP 400)": 1}
    assert (tally.requests, tally.retries, tally.cost_usd) == (2, 1, 0.5)
    assert list((directory / "run1").iterdir()) == []  # folded or torn: both gone
    assert 1 in journal.done and 2 in journal.done
    journal.commit()
    assert read_jsonl(output) == [{"text": "a", "response": "A"}]
    assert json.loads((tmp_path / "out.jsonl.failed.jsonl").read_text())["key"] == 2


async def test_part_files_without_their_job_are_refused(
    local_ray: Any, sim: Simulator, tmp_path: Path
) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    src = write_rows(tmp_path / "in.jsonl", [{"text": "a"}])
    out = tmp_path / "out.jsonl"
    directory = Path(parts_dir(str(out)))
    (directory / "old").mkdir(parents=True)
    part = JobColumns()
    part.add("ok", 1, 1, "in.jsonl:1", b'{"text":"a","response":"from another job"}')
    pq.write_table(part.table(), directory / "old" / "a.parquet")
    settings = JobSettings(
        input=str(src), output=str(out), model="m", prompt="{text}", base_url=sim.url,
        api_key_env=KEY_ENV,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="use --resume to continue it or --overwrite"):
        await run_job_on_ray(settings, actors=1)
    with pytest.raises(ConfigError, match="but no checkpoint"):
        await run_job_on_ray(settings.replace(resume=True), actors=1)
    # nothing was sent, nothing was created, the part file is still there
    assert sim.counters()["requests"] == 0
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl.ray-parts"]
    assert (directory / "old" / "a.parquet").exists()


# -- the adapter's extension points (an actor called directly: no Ray cluster needed) --------


class _Control:
    """An ActorControl the test drives: a stop reason, and the fatal errors reported."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.fatal: list[BaseException] = []

    def stop_reason(self) -> str | None:
        return self.reason

    def report_fatal(self, error: BaseException) -> None:
        self.fatal.append(error)


async def test_actor_hands_back_rows_its_control_stopped_as_not_processed() -> None:
    pa = pytest.importorskip("pyarrow")
    control = _Control()
    spec = ActorSpec(
        stages=lambda: [pipeline.map(lambda row: {**row, "seen": True})],
        actors=1,
        max_in_flight=2,
        control=control,
    )
    actor = actor_class(spec)()
    rows = [{"id": i} for i in range(5)]

    answered = (await actor(pa.Table.from_pylist(rows))).to_pylist()
    assert sorted(r["id"] for r in answered) == list(range(5))
    assert all(r["seen"] and r[ERROR] is None for r in answered)

    control.reason = "stop requested"
    stopped = (await actor(pa.Table.from_pylist(rows))).to_pylist()
    assert sorted(r["id"] for r in stopped) == list(range(5))  # every row comes back
    assert {r[ERROR] for r in stopped} == {"not processed: stop requested"}
    assert json.loads(stopped[0][ERROR_RECORD])["error"]["type"] == "NotProcessed"
    assert control.fatal == []


async def test_actor_sends_no_request_for_rows_it_holds_once_its_control_says_stop(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows already taken into a batch but waiting for the limiter are not sent after a stop."""
    pa = pytest.importorskip("pyarrow")
    monkeypatch.setenv(KEY_ENV, SECRET)
    control = _Control()

    def stop_at_the_first_answer(row: dict[str, Any]) -> dict[str, Any]:
        control.reason = "stop requested"  # as the driver's STOP file would say
        return row

    def stages() -> list[Any]:
        caller = LLMCaller(
            model="m",
            prompt="{text}",
            base_url=sim.url,
            http=HTTP(api_key_env=KEY_ENV),
            limits=Limits(rpm=6),  # one request now, the next one ten seconds later
            retry=Retry(max_retries=0),
        )
        return [caller, pipeline.map(stop_at_the_first_answer)]

    spec = ActorSpec(stages=stages, actors=1, max_in_flight=5, control=control)
    actor = actor_class(spec)()
    rows = [{"text": f"t{i}"} for i in range(5)]
    with anyio.fail_after(8):  # the limiter's next turn is 10 s away: no request waits for it
        out = (await actor(pa.Table.from_pylist(rows))).to_pylist()
    assert control.fatal == [] and sim.counters()["requests"] == 1
    assert sorted(r["text"] for r in out) == [r["text"] for r in rows]  # every row comes back
    assert sorted(str(r[ERROR]) for r in out) == ["None"] + ["not processed: stop requested"] * 4


async def test_actor_applies_the_first_failure_rule_it_is_given(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    pa = pytest.importorskip("pyarrow")
    monkeypatch.setenv(KEY_ENV, SECRET)
    control = _Control()
    judged: list[int | None] = []

    def rule(failed: Any) -> BaseException | None:
        judged.append(failed.status)
        return FatalError("the setup is wrong") if failed.status == 404 else None

    def stages() -> list[Any]:  # a wrong path: every request gets a 404
        return [
            LLMCaller(
                model="m",
                prompt="{text}",
                base_url=sim.url + "/nowhere",
                http=HTTP(api_key_env=KEY_ENV),
                retry=Retry(max_retries=0),
            )
        ]

    spec = ActorSpec(
        stages=stages, actors=1, max_in_flight=1, control=control, first_failure_rule=rule
    )
    actor = actor_class(spec)()
    await actor(pa.Table.from_pylist([{"text": "a"}, {"text": "b"}]))
    assert judged == [404]  # the first failure stopped the actor
    assert [str(e) for e in control.fatal] == ["the setup is wrong"]
    after = (await actor(pa.Table.from_pylist([{"text": "c"}]))).to_pylist()
    assert after[0][ERROR] == "not processed: fatal error: the setup is wrong"
