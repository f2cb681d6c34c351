"""Progress display and summary table for file jobs.

On a terminal, :class:`ProgressDisplay` redraws one status line in place (a bar when the total
is known, rows/s, tokens/s, retries, errors, cost and ETA); elsewhere (a log file, CI) it prints
a plain progress line each time it is updated, which the CLI does every few seconds.
:func:`summary_table` formats a :class:`~pipeline.jobs.JobSummary` for people.
"""

from __future__ import annotations

import shutil
import sys
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from pipeline.jobs import JobProgress, JobSummary

_BAR_WIDTH = 24


def _count(n: float) -> str:
    """``1234567`` -> ``1,234,567``; ``12345.6`` -> ``12,346``."""
    return f"{n:,.0f}"


def _rate(n: float) -> str:
    """A per-second rate, compact: ``950``, ``12.3k``, ``1.2M``."""
    if n >= 999_500:
        return f"{n / 1e6:.1f}M"
    if n >= 9_995:
        return f"{n / 1e3:.1f}k"
    if n >= 100:
        return f"{n:.0f}"
    return f"{n:.1f}"


def format_duration(seconds: float | None) -> str:
    """``75.2`` -> ``1:15``; ``3725`` -> ``1:02:05``; ``None`` -> ``?``."""
    if seconds is None:
        return "?"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def _cost(usd: float) -> str:
    return f"${usd:.4f}" if usd < 100 else f"${usd:,.2f}"


def _fraction(progress: JobProgress) -> float | None:
    total = progress.rows_total
    if not total:
        return None
    return min(progress.rows_done / total, 1.0)


def format_bar(progress: JobProgress, width: int = 100) -> str:
    """Return the one-line terminal status, at most ``width`` characters.

    The bar shrinks, then goes, before the figures are cut.
    """
    fraction = _fraction(progress)
    figures = [
        f"{_rate(progress.rows_per_s)} rows/s",
        f"{_rate(progress.tokens_per_s)} tok/s",
        f"retries {_count(progress.retries)}",
        f"errors {_count(progress.failed)}",
        _cost(progress.cost_usd),
    ]
    if progress.batch:
        figures.insert(0, "batches " + batch_text(progress.batch))
    if progress.stopping:
        figures.append("stopping")
    elif progress.waiting:
        figures.append(waiting_text(progress.waiting))
    elif fraction is not None:
        figures.append(f"ETA {format_duration(progress.eta_s)}")
    tail = "  ".join(figures)
    if fraction is None or progress.rows_total is None:
        line = f"{_count(progress.rows_done)} rows  {tail}"
        return line[:width]
    done = f"{_count(progress.rows_done)}/{_count(progress.rows_total)}"
    line = ""
    for bar_width in (_BAR_WIDTH, _BAR_WIDTH // 2, 0):
        filled = int(fraction * bar_width)
        bar = f"[{'#' * filled}{'-' * (bar_width - filled)}] " if bar_width else ""
        line = f"{fraction * 100:5.1f}% {bar}{done}  {tail}"
        if len(line) <= width:
            return line
    return line[:width]


def format_line(progress: JobProgress) -> str:
    """Return the plain progress line printed when the output is not a terminal."""
    fraction = _fraction(progress)
    if fraction is not None and progress.rows_total is not None:
        done = (
            f"{_count(progress.rows_done)}/{_count(progress.rows_total)} rows"
            f" ({fraction * 100:.1f}%)"
        )
    else:
        done = f"{_count(progress.rows_done)} rows"
    text = (
        f"progress: {done}, {_rate(progress.rows_per_s)} rows/s,"
        f" {_rate(progress.tokens_per_s)} tok/s, {_count(progress.retries)} retries,"
        f" {_count(progress.failed)} errors, {_cost(progress.cost_usd)},"
        f" elapsed {format_duration(progress.elapsed_s)}"
    )
    if progress.batch:
        text += f", batches {batch_text(progress.batch)}"
    if progress.waiting:
        text += f", {progress.waiting}"
    if progress.stopping:
        text += f", stopping ({progress.stopping})"
    elif fraction is not None:
        text += f", ETA {format_duration(progress.eta_s)}"
    return text


def waiting_text(waiting: str) -> str:
    """Return the status line's short form of a wait: ``waiting until ... (HTTP 429)``."""
    why, _, until = waiting.rpartition(": ")
    status = why[why.rfind("(") :] if why.endswith(")") else ""
    return f"{until.replace(' UTC', '')} {status}".strip() if until else waiting


def batch_text(batch: dict[str, Any]) -> str:
    """Return the batch engine's figures: batches by state, and the time spent waiting."""
    return (
        f"{batch.get('submitted', 0)} submitted, {batch.get('in_progress', 0)} running,"
        f" {batch.get('completed', 0)} done, {batch.get('failed', 0)} failed"
        f" (waiting {format_duration(batch.get('waiting_s'))})"
    )


class ProgressDisplay:
    """Shows a job's progress on a stream (standard error by default).

    Pass :meth:`update` as ``run_job(..., on_progress=display.update)``; call :meth:`close`
    before printing anything else.

    Args:
        stream: Where to draw.
        tty: Draw a live status line (default: whether ``stream`` is a terminal).
    """

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        self._drawn = False
        self.updates = 0

    def update(self, progress: JobProgress) -> None:
        """Draw a snapshot (the live line on a terminal, a new line elsewhere)."""
        self.updates += 1
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r\x1b[2K" + format_bar(progress, width))
            self._drawn = True
            if progress.final:
                self.close()
        else:
            self.stream.write(format_line(progress) + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """Print a line of text without garbling the live status line."""
        if self._drawn:
            self.stream.write("\r\x1b[2K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the live line so that what follows starts on a fresh line."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def summary_table(summary: JobSummary) -> str:
    """Return the end-of-job summary as an aligned two-column table."""
    rows: list[tuple[str, str]] = []
    rows.append(("rows", _count(summary.rows_in)))
    if summary.resumed_skipped:
        rows.append(("skipped", f"{_count(summary.resumed_skipped)} (done by earlier runs)"))
    rows.append(("ok", _count(summary.ok)))
    rows.append(("failed", _count(summary.failed)))
    for cause, n in summary.failed_by_cause.items():
        rows.append(("", f"  {_count(n)} {cause}"))
    rows.append(("requests", _count(summary.requests)))
    rows.append(("retries", _count(summary.retries)))
    if summary.cache_hits:
        rows.append(("cache hits", _count(summary.cache_hits)))
    rows.append(
        (
            "tokens",
            f"{_count(summary.prompt_tokens)} prompt + {_count(summary.completion_tokens)}"
            " completion",
        )
    )
    rows.append(("cost", _cost(summary.cost_usd)))
    if summary.batch:
        batch = summary.batch
        rows.append(("batches", batch_text(batch)))
        rows.append(("online cost", f"{_cost(batch.get('online_equivalent_usd', 0.0))} (same job)"))
        if batch.get("unmatched"):
            rows.append(("unmatched", f"{batch['unmatched']} result lines matched no row"))
    for endpoint in summary.endpoints or ():
        rows.append((f"endpoint {endpoint['name']}", endpoint_text(endpoint)))
    rows.append(("elapsed", f"{summary.elapsed_s:.2f} s"))
    rows.append(("rows/s", f"{summary.rows_per_s:,.1f}"))
    if summary.complete:
        rows.append(("output", f"{summary.output} ({_count(summary.total_ok)} rows)"))
        if summary.dead_letter:
            rows.append(
                ("dead letter", f"{summary.dead_letter} ({_count(summary.total_failed)} rows)")
            )
    elif summary.stopped:
        rows.append(("stopped", summary.stopped))
        if summary.unsent is not None:
            rows.append(("unsent", f"{_count(summary.unsent)} rows (sent by --resume)"))
    if summary.budget_usd is not None:
        rows.append(("budget", f"{_cost(summary.cost_usd)} spent of {_cost(summary.budget_usd)}"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}".rstrip() for label, value in rows)


def endpoint_text(figures: dict[str, Any]) -> str:
    """Return one endpoint's figures on a line (requests, 429s, errors, latency, cost, state)."""
    text = (
        f"{_count(figures['answered'])}/{_count(figures['requests'])} answered,"
        f" {_count(figures['rate_limited'])} 429s, {_count(figures['errors'])} errors,"
        f" {figures['latency_s'] * 1000:,.0f} ms, {_cost(figures['cost_usd'])}, {figures['state']}"
    )
    if figures.get("reason") and figures["state"] != "up":
        text += f" ({figures['reason'][:80]})"
    return text


__all__ = [
    "ProgressDisplay",
    "batch_text",
    "endpoint_text",
    "format_bar",
    "format_duration",
    "format_line",
    "summary_table",
]
