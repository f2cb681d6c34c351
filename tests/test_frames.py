"""Tables in, tables out: pandas, Polars and Arrow through the frame API against the simulator."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl
import pyarrow as pa
import pydantic
import pytest
from sim_thread import ThreadSim

from pipeline import ConfigError
from pipeline.frames import RowFailedError, aenrich, astream, enrich
from pipeline.jobs import JobProgress, ResumeError
from pipeline.testing import SimConfig, Simulator, embedding_for, serve

ROOT = Path(__file__).resolve().parent.parent
ECHO = {"type": "object", "properties": {"echo": {"type": "string"}}, "required": ["echo"]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the caller's HTTP client (aiohttp) runs on asyncio


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with ThreadSim() as server:
        yield server


def names(n: int) -> list[str]:
    return [f"name{i}" for i in range(n)]


def opts(sim: Simulator, **extra: Any) -> dict[str, Any]:
    return {"model": "sim-1", "base_url": sim.url, "progress": False, **extra}


# -- pandas ----------------------------------------------------------------------------------


def test_pandas_frame_gets_answers_in_row_order_with_its_index(sim: Simulator) -> None:
    index = [f"k{i}" for i in reversed(range(300))]
    df = pd.DataFrame({"name": names(300), "n": range(300)}, index=index)
    out = enrich(df, prompt="Hello {name}", chunk_rows=64, **opts(sim))
    assert list(out.index) == index
    assert list(out.columns) == ["name", "n", "response", "error"]
    assert list(out["response"]) == [f"echo: Hello {n}" for n in names(300)]
    assert out["error"].isna().all()
    assert list(df.columns) == ["name", "n"]  # the input is left alone


@pytest.mark.anyio
async def test_pandas_async_in_the_callers_loop() -> None:
    async with serve() as server:
        df = pd.DataFrame({"name": names(40)})
        out = await aenrich(df, prompt="Hi {name}", chunk_rows=7, **opts(server))
        assert list(out["response"]) == [f"echo: Hi {n}" for n in names(40)]
        assert server.counters()["requests"] == 40


def test_blocking_call_works_inside_a_running_event_loop(sim: Simulator) -> None:
    df = pd.DataFrame({"name": names(20)})

    async def cell() -> Any:  # what a Jupyter cell is: code run while a loop runs
        asyncio.get_running_loop()
        return enrich(df, prompt="Hi {name}", **opts(sim))

    out = asyncio.run(cell())
    assert list(out["response"]) == [f"echo: Hi {n}" for n in names(20)]
    assert "nest_asyncio" not in sys.modules


def test_failed_rows_get_a_null_answer_and_their_error() -> None:
    with ThreadSim(SimConfig(error_5xx=0.3, seed=5)) as server:
        df = pd.DataFrame({"name": names(200)})
        out = enrich(df, prompt="Hi {name}", max_retries=0, **opts(server))
        faults = server.counters()["faults"].get("error_5xx", 0)
    assert len(out) == 200
    failed = out["error"].notna()
    assert failed.sum() == faults > 0  # one request per row: each fault fails its row
    assert out.loc[failed, "response"].isna().all()
    assert out.loc[failed, "error"].str.contains(r"LLMCallError \(HTTP 50[023]\)").all()
    ok = out.loc[~failed]
    assert list(ok["response"]) == [f"echo: Hi {n}" for n in ok["name"]]


def test_on_error_raise_names_the_row() -> None:
    with ThreadSim(SimConfig(error_5xx=1.0)) as server:
        df = pd.DataFrame({"name": names(5)})
        with pytest.raises(RowFailedError, match=r"row \d failed in stage 'llm'") as info:
            enrich(df, prompt="Hi {name}", max_retries=0, on_error="raise", **opts(server))
    assert info.value.status in (500, 502, 503)


def test_structured_output_adds_a_column_per_schema_property(sim: Simulator) -> None:
    df = pd.DataFrame({"name": names(30)})
    out = enrich(df, prompt="Hi {name}", schema=ECHO, field_prefix="ans_", **opts(sim))
    assert list(out.columns) == ["name", "ans_echo", "error"]
    assert list(out["ans_echo"]) == [f"Hi {n}" for n in names(30)]


def test_structured_output_from_a_pydantic_model(sim: Simulator) -> None:
    class Echo(pydantic.BaseModel):
        echo: str

    out = enrich(pd.DataFrame({"name": names(10)}), prompt="Hi {name}", schema=Echo, **opts(sim))
    assert list(out["echo"]) == [f"Hi {n}" for n in names(10)]


def test_messages_template_over_the_columns(sim: Simulator) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Greet {name} from {city}"},
    ]
    df = pd.DataFrame({"name": ["Ada", "Alan"], "city": ["London", "Wilmslow"]})
    out = enrich(df, messages=messages, **opts(sim))
    assert list(out["response"]) == [
        "echo: Greet Ada from London",
        "echo: Greet Alan from Wilmslow",
    ]


def test_bad_options_are_refused_before_any_request(sim: Simulator) -> None:
    df = pd.DataFrame({"name": ["Ada"], "response": ["old"]})
    with pytest.raises(ConfigError, match=r"'nmae', not a column \(did you mean 'name'\?\)"):
        enrich(df[["name"]], prompt="Hi {nmae}", **opts(sim))
    with pytest.raises(ConfigError, match=r"unknown option 'promt' \(did you mean 'prompt'\?\)"):
        enrich(df, promt="Hi", **opts(sim))  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="already has a column 'response'"):
        enrich(df, prompt="Hi {name}", **opts(sim))
    with pytest.raises(ConfigError, match=r"cannot enrich a builtins\.str"):
        enrich("not a table", prompt="Hi", **opts(sim))  # type: ignore[arg-type]


def test_progress_callback_sees_every_row(sim: Simulator) -> None:
    seen: list[JobProgress] = []
    df = pd.DataFrame({"name": names(50)})
    enrich(df, prompt="Hi {name}", **{**opts(sim), "progress": seen.append})
    assert seen and seen[-1].final
    assert (seen[-1].rows_done, seen[-1].ok, seen[-1].rows_total) == (50, 50, 50)
    assert seen[-1].requests == 50


# -- Arrow -----------------------------------------------------------------------------------


def test_arrow_table_becomes_a_streaming_reader(sim: Simulator) -> None:
    table = pa.table({"name": names(100), "x": list(range(100))})
    reader = enrich(table, prompt="Hi {name}", schema=ECHO, chunk_rows=16, **opts(sim))
    assert isinstance(reader, pa.RecordBatchReader)
    assert reader.schema.names == ["name", "x", "echo", "error"]
    batches = list(reader)
    assert max(b.num_rows for b in batches) <= 16
    out = pa.Table.from_batches(batches)
    assert out.column("x").to_pylist() == list(range(100))
    assert out.column("echo").to_pylist() == [f"Hi {n}" for n in names(100)]


@pytest.mark.anyio
async def test_arrow_table_async_and_reader_stream() -> None:
    async with serve() as server:
        table = pa.table({"name": names(30)})
        out = await aenrich(table, prompt="Hi {name}", **opts(server))
        assert out.column("response").to_pylist() == [f"echo: Hi {n}" for n in names(30)]
        seen = []
        async with astream(table.to_reader(max_chunksize=8), prompt="{name}", **opts(server)) as b:
            async for batch in b:
                seen += batch.column("response").to_pylist()
        assert seen == [f"echo: {n}" for n in names(30)]
        with pytest.raises(ConfigError, match="astream"):
            await aenrich(table.to_reader(), prompt="Hi {name}", **opts(server))


def test_batches_are_read_only_a_window_ahead(sim: Simulator) -> None:
    """Memory stays flat: the input is read at most `window` rows ahead of the output."""
    read = [0]

    def batches() -> Iterator[pa.RecordBatch]:
        for start in range(0, 5000, 100):
            read[0] += 100
            yield pa.record_batch({"name": names(5000)[start : start + 100]})

    reader = enrich(batches(), prompt="{name}", chunk_rows=100, window=500, **opts(sim))
    given = 0
    ahead = []
    for batch in reader:
        given += batch.num_rows
        ahead.append(read[0] - given)
    assert given == 5000
    assert max(ahead) <= 500 + 100


def portals() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("asyncio-portal")]


def test_leaving_a_stream_early_cancels_the_job() -> None:
    with ThreadSim(SimConfig(latency_ms=20)) as server:
        table = pa.table({"name": names(5000)})
        reader = enrich(table, prompt="{name}", chunk_rows=50, window=200, **opts(server))
        first = reader.read_next_batch()
        assert first.num_rows == 50
        del reader  # pyarrow closes the iterator it reads from once the reader is dropped
        gc.collect()
        sent = server.counters()["requests"]
        assert sent < 5000
        assert portals() == []  # the job's event loop thread has ended
    assert sent <= 200 + 50 + 64  # at most the window and the requests in flight


def test_budget_stop_leaves_no_row_missing() -> None:
    with ThreadSim() as server:
        df = pd.DataFrame({"name": names(3000)})
        price = {"sim-1": (1000.0, 1000.0)}  # about a cent a row
        out = enrich(df, prompt="Hi {name}", prices=price, budget=0.5, window=300, **opts(server))
        sent = server.counters()["requests"]
    answered = out["response"].notna()
    assert len(out) == 3000 and answered.sum() == sent < 3000
    assert out.loc[~answered, "error"].str.startswith("not sent: the job stopped (budget").all()


def test_embeddings_give_a_vector_column(sim: Simulator) -> None:
    table = pa.table({"text": ["a", "b", "c"]})
    out = enrich(table, model="sim-emb", endpoint="embeddings", base_url=sim.url, progress=False)
    result = out.read_all()
    assert result.schema.field("response").type == pa.list_(pa.float64())
    vectors = result.column("response").to_pylist()
    assert [len(v) for v in vectors] == [8, 8, 8]
    assert vectors[0] == pytest.approx(embedding_for("a", 8))


# -- Polars ----------------------------------------------------------------------------------


def test_polars_frame(sim: Simulator) -> None:
    df = pl.DataFrame({"name": names(50), "n": range(50)})
    out = enrich(df, prompt="Hi {name}", schema=ECHO, **opts(sim))
    assert out.columns == ["name", "n", "echo", "error"]
    assert out.schema["echo"] == pl.String
    assert out["echo"].to_list() == [f"Hi {n}" for n in names(50)]
    assert out["n"].to_list() == list(range(50))


def test_polars_lazy_frame_streams_batches(sim: Simulator, tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pl.DataFrame({"name": names(3000), "n": range(3000)}).write_parquet(path)
    batches = enrich(pl.scan_parquet(path), prompt="Hi {name}", chunk_rows=500, **opts(sim))
    assert not isinstance(batches, pl.DataFrame)
    parts = list(batches)
    assert all(isinstance(p, pl.DataFrame) and p.height <= 500 for p in parts)
    out = pl.concat(parts)
    assert out["n"].to_list() == list(range(3000))
    assert out["response"].to_list() == [f"echo: Hi {n}" for n in names(3000)]


@pytest.mark.anyio
async def test_polars_lazy_frame_async_stream() -> None:
    async with serve() as server:
        lazy = pl.LazyFrame({"name": names(100)}).filter(pl.col("name") != "name3")
        rows = []
        async with astream(lazy, prompt="{name}", chunk_rows=32, **opts(server)) as batches:
            async for batch in batches:
                rows += batch["response"].to_list()
        assert rows == [f"echo: {n}" for n in names(100) if n != "name3"]


# -- checkpoint ------------------------------------------------------------------------------

CRASHING_JOB = """
import sys
import pandas as pd
from pipeline.frames import enrich

url, checkpoint, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
df = pd.DataFrame({"name": [f"name{i}" for i in range(rows)]})
enrich(df, model="sim-1", base_url=url, prompt="Hi {name}", checkpoint=checkpoint,
       concurrency=4, progress=False)
"""


def _journaled(path: Path) -> int:
    """Complete records in a journal (a torn last line does not count)."""
    if not path.exists():
        return 0
    return path.read_bytes().count(b"\n")


def test_checkpoint_resumes_after_a_crash_sending_only_unanswered_rows(tmp_path: Path) -> None:
    rows = 400
    checkpoint = tmp_path / "answers.ckpt"
    journal = tmp_path / "answers.ckpt.partial"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with ThreadSim(SimConfig(latency_ms=20)) as server:
        job = subprocess.Popen(
            [sys.executable, "-c", CRASHING_JOB, server.url, str(checkpoint), str(rows)], env=env
        )
        try:
            deadline = time.monotonic() + 60
            while _journaled(journal) < 40 and job.poll() is None:
                assert time.monotonic() < deadline, "the job journaled nothing"
                time.sleep(0.05)
            job.kill()  # a crash: no cleanup, whatever was in flight is lost
        finally:
            job.wait(30)
    assert job.returncode == -signal.SIGKILL
    done = _journaled(journal)
    assert 40 <= done < rows
    df = pd.DataFrame({"name": names(rows)})
    with ThreadSim() as server:
        out = enrich(df, prompt="Hi {name}", checkpoint=checkpoint, **opts(server))
        assert server.counters()["requests"] == rows - done
    assert list(out["response"]) == [f"echo: Hi {n}" for n in names(rows)]
    with ThreadSim() as server:  # a finished checkpoint answers a re-run by itself
        again = enrich(df, prompt="Hi {name}", checkpoint=checkpoint, **opts(server))
        assert server.counters()["requests"] == 0
    assert again.equals(out)


def test_checkpoint_resends_failed_and_changed_rows(sim: Simulator, tmp_path: Path) -> None:
    checkpoint = tmp_path / "c"
    df = pd.DataFrame({"name": names(60)})
    with ThreadSim(SimConfig(error_5xx=0.3, seed=2)) as flaky:
        first = enrich(df, prompt="{name}", checkpoint=checkpoint, max_retries=0, **opts(flaky))
    failed = int(first["error"].notna().sum())
    assert failed > 0
    changed = df.copy()
    changed.loc[0, "name"] = "someone else"
    with ThreadSim() as server:
        out = enrich(changed, prompt="{name}", checkpoint=checkpoint, **opts(server))
        expected = failed + (0 if pd.notna(first.loc[0, "error"]) else 1)
        assert server.counters()["requests"] == expected
    assert out["error"].isna().all()
    assert out.loc[0, "response"] == "echo: someone else"


def test_checkpoint_of_another_job_is_refused(sim: Simulator, tmp_path: Path) -> None:
    checkpoint = tmp_path / "c"
    df = pd.DataFrame({"name": names(5)})
    enrich(df, prompt="Hi {name}", checkpoint=checkpoint, **opts(sim))
    with pytest.raises(ResumeError, match=r"prompt .*overwrite=True"):
        enrich(df, prompt="Bye {name}", checkpoint=checkpoint, **opts(sim))
    out = enrich(df, prompt="Bye {name}", checkpoint=checkpoint, overwrite=True, **opts(sim))
    assert out.loc[4, "response"] == "echo: Bye name4"


def test_dead_letter_file_gets_the_failed_rows(tmp_path: Path) -> None:
    dead = tmp_path / "dead.jsonl"
    with ThreadSim(SimConfig(error_5xx=0.5, seed=1)) as server:
        df = pd.DataFrame({"name": names(40)})
        out = enrich(df, prompt="{name}", max_retries=0, dead_letter=dead, **opts(server))
    records = [json.loads(line) for line in dead.read_text().splitlines()]
    failed = out[out["error"].notna()]
    assert sorted(r["key"] for r in records) == list(failed.index)
    assert {r["row"]["name"] for r in records} == set(failed["name"])


# -- interrupts, imports and accessors --------------------------------------------------------

INTERRUPTED_JOB = """
import sys
sys.path.insert(0, sys.argv[2])
import pandas as pd
from sim_thread import ThreadSim
from pipeline.frames import enrich
from pipeline.testing import SimConfig

with ThreadSim(SimConfig(latency_ms=100)) as server:
    df = pd.DataFrame({"name": [f"n{i}" for i in range(5000)]})
    print("started", flush=True)
    try:
        enrich(df, model="sim-1", base_url=server.url, prompt="{name}", concurrency=2,
               checkpoint=sys.argv[1], progress=False)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


def test_ctrl_c_stops_the_blocking_call_cleanly(tmp_path: Path) -> None:
    checkpoint = tmp_path / "c"
    job = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED_JOB, str(checkpoint), str(ROOT / "tests")],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert job.stdout is not None
    assert job.stdout.readline() == "started\n"
    deadline = time.monotonic() + 60
    while _journaled(tmp_path / "c.partial") < 4:
        assert time.monotonic() < deadline, "the job answered nothing"
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    out, _ = job.communicate(timeout=30)
    assert job.returncode == 0
    assert out == "interrupted\n"
    manifest = json.loads((tmp_path / "c.checkpoint.json").read_text())
    assert manifest["state"] == "running"  # resumable, journals closed


def test_import_pipeline_loads_no_dataframe_library() -> None:
    code = (
        "import sys, pipeline, pipeline.frames, pipeline.jobs\n"
        "loaded = {'pandas', 'polars', 'pyarrow'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_accessors_exist_only_once_imported() -> None:
    code = (
        "import pandas as pd, polars as pl, pipeline.frames\n"
        "assert not hasattr(pd.DataFrame, 'llm') and not hasattr(pl.DataFrame, 'llm')\n"
        "import pipeline.frames.accessors as a\n"
        "assert a.REGISTERED == ['pandas', 'polars'], a.REGISTERED\n"
        "assert hasattr(pd.DataFrame({'a': [1]}), 'llm') and hasattr(pl.LazyFrame(), 'llm')\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr


def test_accessors_are_the_same_function(sim: Simulator) -> None:
    import pipeline.frames.accessors  # noqa: F401

    pdf = pd.DataFrame({"name": names(5)})
    out = pdf.llm.enrich(prompt="Hi {name}", **opts(sim))
    assert list(out["response"]) == [f"echo: Hi {n}" for n in names(5)]
    lazy = pl.LazyFrame({"name": names(5)})
    parts = list(lazy.llm.enrich(prompt="Hi {name}", **opts(sim)))
    assert pl.concat(parts)["response"].to_list() == list(out["response"])


# -- notebooks -------------------------------------------------------------------------------

NOTEBOOK_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JUPYTER_PLATFORM_DIRS": "1"}

RUN_NOTEBOOK = """
import sys
import nbclient, nbformat
nb = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
print("\\n".join(o.get("text", "") for o in outputs if o.get("name") == "stdout"))
"""


def test_example_notebook_runs_headless() -> None:
    done = subprocess.run(
        [sys.executable, "-c", RUN_NOTEBOOK, str(ROOT / "examples" / "dataframes.ipynb")],
        capture_output=True,
        text=True,
        env=NOTEBOOK_ENV,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "first run: 20 requests, second run: 0 requests" in done.stdout


INTERRUPT_KERNEL = """
import sys, time
from pathlib import Path
from jupyter_client.manager import start_new_kernel

checkpoint, tests = sys.argv[1], sys.argv[2]
km, kc = start_new_kernel(kernel_name="python3")
try:
    setup = f'''
import sys; sys.path.insert(0, {tests!r})
import pandas as pd
from sim_thread import ThreadSim
from pipeline.frames import enrich
from pipeline.testing import SimConfig
server = ThreadSim(SimConfig(latency_ms=100)).__enter__()
df = pd.DataFrame({{"name": [f"n{{i}}" for i in range(5000)]}})
'''
    assert kc.execute_interactive(setup, timeout=60)["content"]["status"] == "ok"
    cell = ('enrich(df, model="sim-1", base_url=server.url, prompt="{name}", concurrency=2,'
            f' checkpoint={checkpoint!r}, progress=False)')
    msg_id = kc.execute(cell)
    journal = Path(checkpoint + ".partial")
    deadline = time.monotonic() + 60
    while not journal.exists() or journal.read_bytes().count(b"\\n") < 4:
        assert time.monotonic() < deadline, "the cell answered nothing"
        time.sleep(0.05)
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg_id
    print(reply["content"]["status"], reply["content"].get("ename"))
    # A request that reaches the kernel while it still clears the interrupted cell's queue is
    # "aborted" (ipykernel's stop_on_error), not run: the kernel is alive if a later one runs.
    for _ in range(5):
        again = kc.execute_interactive("print(len(df))", timeout=30)
        if again["content"]["status"] != "aborted":
            break
    print("kernel alive:", again["content"]["status"])
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=True)
"""


def test_interrupt_kernel_stops_the_cell_and_keeps_the_kernel(tmp_path: Path) -> None:
    checkpoint = tmp_path / "c"
    done = subprocess.run(
        [sys.executable, "-c", INTERRUPT_KERNEL, str(checkpoint), str(ROOT / "tests")],
        capture_output=True,
        text=True,
        env=NOTEBOOK_ENV,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["error KeyboardInterrupt", "5000", "kernel alive: ok"]
    manifest = json.loads((tmp_path / "c.checkpoint.json").read_text())
    assert manifest["state"] == "running"
