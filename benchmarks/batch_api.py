"""A 100,000-row job through the simulator's Batch API, beside the same job at 10,000 rows.

    python benchmarks/batch_api.py                  # 10,000 and 100,000 rows
    python benchmarks/batch_api.py --rows 20000     # and a quicker large size

Each run is ``python -m pipeline run ... --batch-api`` as a child process against the
simulator (its own process; every batch takes ``--delay`` seconds to end). For each size the
script reports the batches and requests per batch, peak RSS of the job process (``wait4``: the
child's own maximum), the cost at batch prices against what the same tokens cost online (the
job's summary; and, measured in the same run, the online job of the small size), and the time
the job spent on its side: its wall time minus the time it waited for batches to end.

Targets (issue 12): peak RSS flat in the job's size (100,000 rows in 10,000-row batches within
1.1x of 10,000 rows) and bounded by the batch size (100,000 rows in 50,000-row batches within
1.25x); the requests split at the provider's limit (50,000 per OpenAI batch); the cost half the
online cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gpt-4o-mini"


def make_input(path: Path, rows: int) -> None:
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": i, "name": f"person {i}", "city": "Paris"}) + "\n")


def start_server() -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "sim", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    url = line.split()[4]  # "simulated LLM server on http://127.0.0.1:PORT/v1 ..."
    return server, url


def post(url: str, path: str, data: dict[str, Any]) -> dict[str, Any]:
    base = url.rsplit("/v1", 1)[0]
    request = urllib.request.Request(
        base + path,
        data=json.dumps(data).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as resp:
        result: dict[str, Any] = json.loads(resp.read())
    return result


def counters(url: str) -> dict[str, Any]:
    base = url.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(base + "/sim/batches/counters") as resp:
        result: dict[str, Any] = json.loads(resp.read())
    return result


def run_job(
    url: str, inp: Path, out: Path, *, batch: bool, max_rows: int | None = None
) -> dict[str, Any]:
    summary = out.with_suffix(".summary.json")
    argv = [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        str(inp),
        "-o",
        str(out),
        "--model",
        MODEL,
        "--prompt",
        "Say hello to {name} from {city}",
        "--base-url",
        url,
        "--summary-json",
        str(summary),
        "--quiet",
    ]
    if batch:
        argv += ["--batch-api", "--batch-poll", "0.5"]
    if max_rows is not None:
        argv += ["--batch-max-rows", str(max_rows)]
    started = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"the job failed (status {status}): {' '.join(argv)}")
    data: dict[str, Any] = json.loads(summary.read_text())
    data["wall_s"] = wall
    data["peak_rss_mb"] = usage.ru_maxrss / 1024
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="the large size (100,000)")
    parser.add_argument("--small", type=int, default=10_000, help="the small size (10,000)")
    parser.add_argument("--delay", type=float, default=2.0, help="seconds a batch takes (2)")
    args = parser.parse_args()
    server, url = start_server()
    try:
        post(url, "/sim/batches/config", {"delay_s": args.delay})
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            results: dict[str, dict[str, Any]] = {}
            for label, rows, batch, max_rows in (
                ("online", args.small, False, None),
                ("batch-small", args.small, True, None),
                ("batch-large", args.rows, True, None),
                ("batch-large-small-batches", args.rows, True, args.small),
            ):
                inp = folder / f"in-{rows}.jsonl"
                if not inp.exists():
                    make_input(inp, rows)
                before = counters(url)
                out = folder / f"out-{label}.jsonl"
                data = run_job(url, inp, out, batch=batch, max_rows=max_rows)
                after = counters(url)
                data["batches"] = after["batches"] - before["batches"]
                data["batch_requests"] = after["requests"] - before["requests"]
                data["rows"] = rows
                results[label] = data
                assert data["ok"] == rows, f"{label}: {data['ok']} of {rows} rows answered"
    finally:
        server.terminate()
        server.wait(10)
    report(results, args.delay)


def report(results: dict[str, dict[str, Any]], delay: float) -> None:
    online = results["online"]
    print(f"model {MODEL}, every batch takes {delay:g} s in the simulator")
    print(
        f"online, {online['rows']:,} rows: {online['wall_s']:.2f} s,"
        f" cost ${online['cost_usd']:.4f}, peak RSS {online['peak_rss_mb']:.0f} MB"
    )
    for label in ("batch-small", "batch-large", "batch-large-small-batches"):
        data = results[label]
        batch = data["batch"]
        waiting = batch["waiting_s"]
        per_batch = data["batch_requests"] / max(1, data["batches"])
        print(
            f"batch, {data['rows']:,} rows: {data['batches']} batch(es), {per_batch:,.0f}"
            f" requests per batch (largest {batch['rows_per_batch']:,}), peak RSS"
            f" {data['peak_rss_mb']:.0f} MB, wall {data['wall_s']:.2f} s of which waiting"
            f" {waiting:.2f} s: client side {data['wall_s'] - waiting:.2f} s"
            f" ({data['rows'] / max(1e-9, data['wall_s'] - waiting):,.0f} rows/s),"
            f" cost ${data['cost_usd']:.4f} vs ${batch['online_equivalent_usd']:.4f} online"
            f" ({data['cost_usd'] / max(1e-12, batch['online_equivalent_usd']):.2f}x)"
        )
    small, large = results["batch-small"], results["batch-large"]
    same = results["batch-large-small-batches"]
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    same_ratio = same["peak_rss_mb"] / small["peak_rss_mb"]
    print(
        f"peak RSS {same['rows']:,} / {small['rows']:,} rows, both in {small['rows']:,}-row"
        f" batches: {same_ratio:.2f}x ({'PASS' if same_ratio <= 1.1 else 'FAIL'} flat in the"
        " job's size, target <= 1.1x)"
    )
    online_ratio = small["batch"]["online_equivalent_usd"] / max(1e-12, online["cost_usd"])
    print(
        f"peak RSS {large['rows']:,} / {small['rows']:,} rows, batches at the provider's limit:"
        f" {ratio:.2f}x ({'PASS' if ratio <= 1.25 else 'FAIL'} bounded by the batch size,"
        " target <= 1.25x)"
    )
    print(
        f"batch job's online-equivalent cost / the online job's measured cost, {small['rows']:,}"
        f" rows: {online_ratio:.2f} (1.00 = the summary's online figure is right)"
    )


if __name__ == "__main__":
    main()
