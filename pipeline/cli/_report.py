"""``python -m pipeline report OUTPUT``: one self-contained HTML page about a CLI job.

The page shows what the dashboard shows for a server job: the figures, the charts over time
(rows and requests per second against the quota, tokens per minute, 429s and retries, rows
waiting for the quota, cost) and the tables (the summary, failures by cause, the latest
failures). It reads the job's timeline (``OUTPUT.timeline.jsonl``, written by ``run``), its
summary (the timeline's end record, or ``--summary-json``) and its dead letters (the published
file, or the journal of a job that did not finish). Styles, scripts and data are embedded: the
file opens anywhere, offline, and can be attached to a ticket.
"""

from __future__ import annotations

import argparse
import collections
import html
import json
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline.jobs._timeline import Run, read_timeline, timeline_path
from stages.files._records import record_payload

PROG = "llm-pipeline report"
MAX_SAMPLES = 2000  # per run: enough for any screen, small enough for a big job's report
PARTIAL_SUFFIX = ".partial"


class ReportError(Exception):
    """The report cannot be made (no timeline, an unreadable file); the message says why."""


def static_text(name: str) -> str:
    """Return one of the packaged web assets (``pipeline/server/static/NAME``)."""
    return resources.files("pipeline").joinpath("server", "static", name).read_text("utf-8")


def latest_failures(path: str | None, limit: int) -> list[dict[str, Any]]:
    """Return the last ``limit`` dead-letter records of a job, newest last.

    Reads the published dead-letter file, or its journal (``DEAD.partial``) when the job has
    not published; a line that does not parse is skipped.
    """
    if not path or limit <= 0:
        return []
    for candidate, journal in ((path, False), (path + PARTIAL_SUFFIX, True)):
        try:
            with open(candidate, "rb") as f:
                tail = collections.deque(f, maxlen=limit)
        except FileNotFoundError:
            continue
        except OSError as error:
            raise ReportError(f"cannot read {candidate!r}: {error.strerror or error}") from None
        records = []
        for line in tail:
            payload = record_payload(line) if journal else line
            if payload is None:  # a damaged journal record
                continue
            try:
                record = json.loads(payload)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records
    return []


def _summary(runs: list[Run], summary_json: str | None) -> dict[str, Any] | None:
    if summary_json is not None:
        try:
            data = json.loads(Path(summary_json).read_text("utf-8"))
        except (OSError, ValueError) as error:
            raise ReportError(f"cannot read the summary {summary_json!r}: {error}") from None
        return data if isinstance(data, dict) else None
    end = runs[-1].end if runs else None
    if end is None or not isinstance(end.get("summary"), dict):
        return None
    summary = dict(end["summary"])
    summary.setdefault("exit_status", end.get("exit_status"))
    summary.setdefault("error", end.get("error"))
    return summary


def report_data(
    output: str,
    *,
    summary_json: str | None = None,
    dead_letter: str | None = None,
    failures: int = 20,
) -> dict[str, Any]:
    """Collect what the report of the job writing ``output`` shows, as JSON-ready data.

    Raises:
        ReportError: The job has no timeline, or a file cannot be read.
    """
    path = timeline_path(output)
    try:
        runs = read_timeline(path)
    except FileNotFoundError:
        raise ReportError(
            f"no timeline for {output!r} (looked for {path!r}): run the job with"
            " `python -m pipeline run`, which records one"
        ) from None
    except (OSError, ValueError) as error:
        raise ReportError(f"cannot read {path!r}: {error}") from None
    if not runs:
        raise ReportError(f"{path!r} holds no run")
    facts = runs[-1].job
    dead = dead_letter or facts.get("dead_letter") or output + ".failed.jsonl"
    return {
        "output": output,
        "runs": [run.to_dict(MAX_SAMPLES) for run in runs],
        "summary": _summary(runs, summary_json),
        "failures": latest_failures(dead, failures),
    }


def _state(data: dict[str, Any]) -> str:
    runs = data["runs"]
    last = runs[-1]
    summary = data["summary"] or {}
    if last["end"] is None:
        return "the last run has no end record: it was killed, or it is still running"
    if summary.get("complete"):
        return "complete"
    return f"stopped: {summary.get('stopped') or summary.get('error') or 'before the end'}"


def render_html(data: dict[str, Any]) -> str:
    """Return the report page: styles, scripts and data inline."""
    payload = (
        json.dumps(data, separators=(",", ":"))
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
    )
    facts = data["runs"][-1]["job"]
    shown = [
        ("model", facts.get("model")),
        ("provider", facts.get("provider")),
        ("rpm", facts.get("rpm")),
        ("tpm", facts.get("tpm")),
        ("input", facts.get("input")),
        ("runs", len(data["runs"])),
        ("first run", data["runs"][0].get("started_at")),
    ]
    fact_html = "".join(
        f"<span>{html.escape(k)}: <b>{html.escape(str(v))}</b></span>"
        for k, v in shown
        if v is not None
    )
    title = html.escape(f"Run report: {data['output']}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="llm-pipeline report">
<title>{title}</title>
<style>{static_text("dashboard.css")}</style>
</head><body>
<header><h1>{title}</h1></header>
<main><section>
<div class="facts">{fact_html}</div>
<p id="state" class="muted">{html.escape(_state(data))}</p>
<div id="job"></div>
</section></main>
<script type="application/json" id="report-data">{payload}</script>
<script>{static_text("charts.js")}</script>
<script>
LP.renderJob(document.getElementById("job"),
             JSON.parse(document.getElementById("report-data").textContent));
document.body.setAttribute("data-rendered", "1");
</script>
</body></html>
"""


def build_parser() -> argparse.ArgumentParser:
    """Return the ``report`` command's argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write one self-contained HTML page about a job run with `run` (see"
        " docs/cli.md): its figures, charts over time and failures.",
    )
    parser.add_argument("output", help="the job's OUTPUT file (as given to run -o)")
    parser.add_argument(
        "-o", "--html", default=None, metavar="PATH", help="the page to write (OUTPUT.report.html)"
    )
    parser.add_argument(
        "--summary-json", default=None, metavar="PATH", help="the summary run wrote (optional)"
    )
    parser.add_argument(
        "--dead-letter", default=None, metavar="PATH", help="the dead-letter file, if moved"
    )
    parser.add_argument(
        "--failures", type=int, default=20, metavar="N", help="latest failures shown (20)"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    """Run ``report``; return the exit status (0, or 2 when the report cannot be made)."""
    args = build_parser().parse_args(list(argv))
    target = args.html or args.output + ".report.html"
    try:
        data = report_data(
            args.output,
            summary_json=args.summary_json,
            dead_letter=args.dead_letter,
            failures=args.failures,
        )
        page = render_html(data)
    except ReportError as error:
        sys.stderr.write(f"llm-pipeline: error: {error}\n")
        return 2
    try:
        Path(target).write_text(page, encoding="utf-8")
    except OSError as error:
        sys.stderr.write(
            f"llm-pipeline: error: cannot write {target!r}: {error.strerror or error}\n"
        )
        return 2
    sys.stdout.write(f"{os.fspath(target)}\n")
    return 0


__all__ = ["ReportError", "build_parser", "latest_failures", "main", "render_html", "report_data"]
