"""A plain JSONL job imports none of the heavy optional packages (fast start)."""

from __future__ import annotations

import json
from pathlib import Path

from cli_probe import probe_cli
from sim_thread import ThreadSim

HEAVY = (
    "pyarrow",
    "opentelemetry.sdk",
    "fastapi",
    "uvicorn",
    "starlette",
    "ray",
    "langchain",
    "langchain_core",
    "pandas",
    "polars",
    "numpy",
    "redis",
)
"""Packages a plain JSONL job must not import (each belongs to an extra it does not use)."""

DEFERRED = (
    "tenacity",  # the retry loop: imported at the first retry (it may import tornado too)
    "tornado",
    "sqlite3",  # the response cache (--cache)
    "tomllib",  # job files (--config)
    "csv",  # CSV and TSV files
    "stages.files._csv",
    "stages.files._parquet",
    "stages.llm._redis_limiter",  # --limiter
    "stages._langchain",
    "stages._ray",
    "stages._ray_batch",
    "pipeline.jobs._estimate",  # --estimate
    "pipeline.jobs._metrics",  # --metrics-port
    "opentelemetry",  # the API too: nothing can be traced until a provider is installed
)
"""Modules a plain JSONL job does not use and imports only when it does (each costs start-up)."""


def test_a_plain_jsonl_job_imports_no_heavy_optional_package(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"name": f"n{i}"}) + "\n" for i in range(20)))
    out = tmp_path / "out.jsonl"
    with ThreadSim() as sim:
        found = probe_cli(
            ["run", str(inp), "-o", str(out), "--model", "m", "--prompt", "Hi {name}",
             "--base-url", sim.url, "--quiet"]
        )  # fmt: skip
    assert found["code"] == 0 and len(out.read_text().splitlines()) == 20
    loaded = [m for m in found["modules"] if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert loaded == []
    # the engines a local job does not use stay unloaded too
    assert "pipeline.jobs._ray" not in found["modules"]
    assert "pipeline.jobs._batch" not in found["modules"]
    deferred = [
        m for m in found["modules"] if any(m == d or m.startswith(d + ".") for d in DEFERRED)
    ]
    assert deferred == []
