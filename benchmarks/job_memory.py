"""Peak memory of a resumed job with string ids, as the input grows (issue 15).

    python benchmarks/job_memory.py                          # 1M and 10M rows, JSONL and Parquet
    python benchmarks/job_memory.py --rows 1000000 3000000 --formats jsonl

For each row count and output format the script writes an input of that many JSONL rows with
string ids (``"id": "row-0000012345-..."``) in a temporary directory, leaves a job **half
done** (``--done 0.99``: nearly done, to reach ten million rows on a slow machine): the
journal of the first rows, written with the library's own journal and the exact settings the
command line stores, so the checkpoint matches. It then runs ``python -m pipeline run ...
--id-field id --resume`` against the simulated server (its own process, zero latency, no rate
limit) and reports the resumed process's peak RSS (``wait4``),
its wall time and the published rows. The resumed run reads every id once (duplicate ids are
looked for over the whole input), skips the done half by line, sends the other half, checks
every row is accounted for once and publishes.

Targets: peak RSS under 150 MB at ten million rows, and under 10 MB of growth from one to ten
million rows (the same job, ten times the rows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline._json import dumps  # noqa: E402
from pipeline.jobs import JobSettings  # noqa: E402
from pipeline.jobs._journal import journal_for  # noqa: E402
from stages.files import encode_record  # noqa: E402


def make_input(path: Path, rows: int) -> None:
    with open(path, "w") as f:
        chunk = []
        for i in range(rows):
            chunk.append(f'{{"id": "row-{i:010d}-{i * 7919 % 100003:05d}", "name": "user {i}"}}\n')
            if len(chunk) == 10_000:
                f.writelines(chunk)
                chunk.clear()
        f.writelines(chunk)


def cli_args(inp: Path, out: Path, url: str, concurrency: int) -> list[str]:
    return [
        "run", str(inp), "-o", str(out), "--model", "m", "--prompt", "Hi {name}",
        "--base-url", url, "--id-field", "id", "--concurrency", str(concurrency),
    ]  # fmt: skip


def leave_half_done(inp: Path, out: Path, url: str, concurrency: int, done: float = 0.5) -> int:
    """Write the journal of the first rows (half of them), as an interrupted run leaves it."""
    settings = JobSettings(
        input=str(inp),
        output=str(out),
        model="m",
        prompt="Hi {name}",
        base_url=url,
        id_field="id",
        concurrency=concurrency,
    )  # fmt: skip  (what cli_args() says: the checkpoint the resumed run finds must match)
    journal = journal_for(settings)
    journal.open()
    journal.output.open()
    half = 0
    with open(inp, "rb") as f:
        lines = sum(1 for _ in f)
    chunk: list[bytes] = []
    with open(inp, "rb") as f:
        for line, raw in enumerate(f, 1):
            if line > int(lines * done):
                break
            row = json.loads(raw)
            row["response"] = f"Hello {row['name']}!"
            chunk.append(encode_record(line, row["id"], dumps(row)))
            half += 1
            if len(chunk) == 10_000:
                journal.output.append(b"".join(chunk), len(chunk))
                chunk.clear()
    journal.output.append(b"".join(chunk), len(chunk))
    journal.close()
    return half


def start_server() -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "sim", "--port", "0", "--latency-ms", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    return server, line.split()[4]  # "simulated LLM server on http://127.0.0.1:PORT/v1 ..."


def resume(inp: Path, out: Path, url: str, concurrency: int) -> dict[str, Any]:
    argv = [sys.executable, "-m", "pipeline", *cli_args(inp, out, url, concurrency)]
    argv += ["--resume", "--quiet", "--summary-json", str(out) + ".summary.json"]
    started = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(child.pid, 0)
    return {
        "wall_s": time.perf_counter() - started,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "status": os.waitstatus_to_exitcode(status),
    }


def count_output(out: Path) -> int:
    if out.suffix == ".parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(out).metadata.num_rows)
    with open(out, "rb") as f:
        return sum(1 for _ in f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--formats", nargs="+", default=["jsonl", "parquet"])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workdir", default=None, help="where the temporary files go")
    parser.add_argument(
        "--done",
        type=float,
        default=0.5,
        help="fraction of the rows the interrupted run finished (0.5: resumed halfway)",
    )
    args = parser.parse_args()
    server, url = start_server()
    results: list[dict[str, Any]] = []
    try:
        for rows in args.rows:
            with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
                inp = Path(tmp) / "in.jsonl"
                make_input(inp, rows)
                for fmt in args.formats:
                    out = Path(tmp) / f"out.{fmt}"
                    half = leave_half_done(inp, out, url, args.concurrency, args.done)
                    result = resume(inp, out, url, args.concurrency)
                    result.update(rows=rows, format=fmt, done_before=half)
                    result["published"] = count_output(out) if result["status"] == 0 else None
                    results.append(result)
                    print(
                        f"{rows:>11,} rows {fmt:<8} resumed at {half:,}: peak RSS"
                        f" {result['peak_rss_mb']:.0f} MB, {result['wall_s']:.0f} s,"
                        f" exit {result['status']}, published {result['published']}",
                        flush=True,
                    )
    finally:
        server.terminate()
        server.wait(10)
    print(f"{'rows':>11} {'output':<8}{'peak RSS MB':>12}{'wall s':>9}{'published':>12}")
    for r in results:
        print(f"{r['rows']:>11,} {r['format']:<8}{r['peak_rss_mb']:>12.0f}{r['wall_s']:>9.0f}"
              f"{r['published'] or 0:>12,}")  # fmt: skip
    for fmt in args.formats:
        mine = sorted((r["rows"], r["peak_rss_mb"]) for r in results if r["format"] == fmt)
        if len(mine) >= 2:
            (small, low), (big, high) = mine[0], mine[-1]
            print(f"{fmt}: growth from {small:,} to {big:,} rows: {high - low:+.1f} MB"
                  " (targets: < 150 MB peak at 10M, < 10 MB growth 1M -> 10M)")  # fmt: skip


if __name__ == "__main__":
    main()
