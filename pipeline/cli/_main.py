"""The command line: ``python -m pipeline run|report|demo|sim|serve`` (``llm-pipeline``).

``run`` reads its settings from a job file (``--config``) and flags (which override it), runs
the job with a progress display and prints a summary. Exit status: 0 every row answered, 3 the
job finished with some rows in the dead letter, 1 a fatal error or a stop before the end (a
budget), 2 a usage error, 130 interrupted (Ctrl-C; the job can be resumed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import anyio

from pipeline._errors import ConfigError
from pipeline._logging import StageFilter
from pipeline.cli._args import add_run_arguments
from pipeline.cli._common import (
    EXIT_FAILED_ROWS,
    EXIT_FATAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    Parser,
    backend_options,
    print_error,
)
from pipeline.cli._help import RUN_EXAMPLES, RUN_USAGE
from pipeline.cli._observe import RunObserver
from pipeline.cli._progress import ProgressDisplay, summary_table
from pipeline.jobs import (
    JobFailedError,
    JobSettings,
    JobSummary,
    read_job_file,
    run_job,
)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the whole command line."""
    parser = Parser(
        prog=PROG,
        description="Push files of rows through LLM APIs: fast, within rate limits, resumable.",
        epilog="start with: llm-pipeline demo (no key needed); then: llm-pipeline run --help",
    )
    try:
        from importlib.metadata import version

        shown = version("llm-pipeline")
    except Exception:  # pragma: no cover - not installed
        shown = "unknown"
    parser.add_argument("--version", action="version", version=f"{PROG} {shown}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run a job: INPUT -> LLM -> OUTPUT",
        description="Send every row of INPUT to an LLM and write OUTPUT; see docs/cli.md.",
        usage=RUN_USAGE,
        epilog=RUN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(run)
    commands.add_parser("report", help="one HTML page about a job: figures, charts, failures")
    commands.add_parser("demo", help="speed demo against a simulated server (no key needed)")
    commands.add_parser("sim", help="serve the simulated LLM API (see sim --help)")
    commands.add_parser("serve", help="HTTP job server (needs the [server] extra)")
    return parser


def _flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def settings_from_args(args: dict[str, Any]) -> tuple[JobSettings, set[str]]:
    """Merge a job file (``--config``) with the flags given; return settings and flag names.

    Raises:
        ConfigError: The job file or a setting is invalid.
    """
    data: dict[str, Any] = {}
    config = args.pop("config", None)
    if config is not None:
        data = {k.replace("-", "_"): v for k, v in read_job_file(config).items()}
    flags = set(args)
    for name, value in args.items():
        if name == "params":
            merged = dict(data.get("params") or {})
            merged.update(dict(value))
            data["params"] = merged
        elif name == "headers":
            merged_headers = dict(data.get("headers") or {})
            merged_headers.update(dict(value))
            data["headers"] = merged_headers
        else:
            data[name] = value
    where = config if config is not None else "settings"
    try:
        settings = JobSettings.from_mapping(data, where=where)
    except ConfigError as error:
        raise ConfigError(_flag_words(str(error), flags)) from None
    return settings, flags


def _flag_words(message: str, flags: set[str]) -> str:
    """Name settings given as flags the way the user typed them (``--max-retries``)."""

    def swap(match: re.Match[str]) -> str:
        name = match.group(1)
        return _flag_name(name) if name in flags else match.group(0)

    return re.sub(r"setting '(\w+)'", swap, message)


@contextlib.contextmanager
def _configured_logging(quiet: bool, debug: bool) -> Iterator[None]:
    """Show the library's records on stderr for one command; restore logging after it.

    ``main`` also runs inside other programs (and tests): the levels it sets must not outlive it.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(StageFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s [%(stage)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    level = logging.DEBUG if debug else logging.ERROR if quiet else logging.WARNING
    loggers = [logging.getLogger("pipeline"), logging.getLogger("stages")]
    previous = [logger.level for logger in loggers]
    root.addHandler(handler)
    for logger in loggers:
        logger.setLevel(level)
    handler.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for logger, old in zip(loggers, previous, strict=True):
            logger.setLevel(old)


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split("\n")[0].split()) if "\n" in text else text


def _exit_status(summary: JobSummary) -> int:
    if summary.complete:
        return EXIT_FAILED_ROWS if summary.total_failed else EXIT_OK
    return EXIT_FATAL


def _nothing_succeeded(summary: JobSummary) -> str:
    """Say that no row got an answer, the main causes, and where the failures are."""
    causes = sorted(summary.failed_by_cause.items(), key=lambda item: -item[1])
    shown = "; ".join(f"{cause}: {count:,}" for cause, count in causes[:3])
    return (
        f"no row succeeded: all {summary.total_failed:,} rows failed"
        + (f" ({shown})" if shown else "")
        + f"; each row's error is in {summary.dead_letter}"
    )


def _write_summary(path: str | None, summary: JobSummary, status: int, error: str | None) -> None:
    if not path:
        return
    data = summary.to_dict()
    data["exit_status"] = status
    data["error"] = error
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    except OSError as exc:
        print_error(f"cannot write the summary to {path!r}: {exc.strerror or exc}")


async def _watch_signals(
    stop: anyio.Event, display: ProgressDisplay | None, exit_now: Callable[[], None]
) -> None:
    """First Ctrl-C (or SIGTERM): no new request, rows in flight get the grace. Second: exit.

    ``exit_now`` runs before the second signal's immediate exit (it writes what it can).
    """
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if not stop.is_set():
                text = (
                    f"{signal.Signals(signum).name}: stopping: no new request is sent; rows in"
                    " flight finish (Ctrl-C again to exit now; the job stays resumable)"
                )
                if display is not None:
                    display.message(text)
                else:
                    sys.stderr.write(text + "\n")
                    sys.stderr.flush()
                stop.set()
            else:
                sys.stderr.write(
                    "\ninterrupted again: exiting now; run the same command with --resume to"
                    " continue\n"
                )
                sys.stderr.flush()
                exit_now()
                os._exit(EXIT_INTERRUPTED)


def _exit_summary(settings: JobSettings, observer: RunObserver) -> None:
    """Write ``--summary-json`` (and end the timeline) on a second Ctrl-C.

    The run exits at once without a summary of its own: the figures are the last progress
    snapshot's (at most one progress interval old).
    """
    progress = observer.last
    message = "interrupted again: exited at once (figures as of the last progress snapshot)"
    summary = JobSummary(stopped="interrupted", output=settings.output, engine=settings.engine)
    if progress is not None:
        summary = dataclasses.replace(
            summary,
            rows_in=progress.ok + progress.failed,
            ok=progress.ok,
            failed=progress.failed,
            requests=progress.requests,
            retries=progress.retries,
            prompt_tokens=progress.prompt_tokens,
            completion_tokens=progress.completion_tokens,
            cost_usd=progress.cost_usd,
            elapsed_s=progress.elapsed_s,
            rows_per_s=progress.rows_per_s,
            resumed_skipped=progress.skipped,
        )
    _write_summary(settings.summary_json, summary, EXIT_INTERRUPTED, message)
    with contextlib.suppress(Exception):  # the exit must not wait on a timeline problem
        observer.finish(summary, exit_status=EXIT_INTERRUPTED, error=message)


async def _run_async(
    settings: JobSettings, display: ProgressDisplay | None, observer: RunObserver
) -> JobSummary:
    stop = anyio.Event()
    failure: Exception | None = None
    summary: JobSummary | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_signals, stop, display, lambda: _exit_summary(settings, observer))
        try:
            summary = await run_job(
                settings,
                on_progress=observer.update,
                stop_event=stop,
                stop_reason="interrupted",
                progress_interval=observer.interval,
            )
        except Exception as error:  # re-raised outside the task group, unwrapped
            failure = error
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    assert summary is not None
    return summary


def _estimate(settings: JobSettings) -> int:
    """Print the job's preflight cost estimate (``--estimate``); send nothing."""
    from pipeline.jobs._estimate import estimate_job  # only --estimate needs it

    try:
        estimate = anyio.run(estimate_job, settings)
    except ConfigError as error:
        print_error(str(error))
        return EXIT_USAGE
    except OSError as error:
        print_error(f"cannot read {settings.input!r}: {error.strerror or error}")
        return EXIT_FATAL
    sys.stdout.write("\n".join(estimate.lines(settings.model)) + "\n")
    sys.stdout.flush()
    return EXIT_OK


def run_command(argv: Sequence[str]) -> int:
    """Run ``llm-pipeline run ...``; return the exit status."""
    parser = Parser(
        prog=f"{PROG} run",
        description="Send every row of INPUT to an LLM and write OUTPUT; see docs/cli.md.",
        usage=RUN_USAGE,
        epilog=RUN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(parser)
    args = vars(parser.parse_args(list(argv)))  # usage errors exit 2 here
    debug = bool(args.pop("debug", False))
    estimate = bool(args.pop("estimate", False))
    interval = args.pop("progress_interval", None)
    metrics_port = args.pop("metrics_port", None)
    try:
        settings, _flags = settings_from_args(args)
        settings.require_paths()
    except ConfigError as error:
        print_error(str(error))
        return EXIT_USAGE
    if estimate:
        return _estimate(settings)
    display = None if settings.quiet else ProgressDisplay()
    if interval is None:
        interval = 0.2 if display is not None and display.tty else 5.0
    if interval <= 0:
        print_error(f"--progress-interval must be > 0, got {interval:g}")
        return EXIT_USAGE
    with _configured_logging(settings.quiet, debug), _metrics_server(metrics_port) as metrics:
        if metrics is None and metrics_port is not None:
            return EXIT_USAGE
        observer = RunObserver(settings, display, interval, metrics)
        status = _run_observed(settings, display, observer, debug)
        if status is not None:
            return status
        summary = observer.summary
        assert summary is not None
    if display is not None:
        display.close()
    status = _exit_status(summary)
    if summary.stopped == "interrupted":
        status = EXIT_INTERRUPTED
    if not settings.quiet:
        sys.stdout.write(summary_table(summary) + "\n")
        sys.stdout.flush()
    message = None
    if summary.complete and summary.total_failed and not summary.total_ok:
        print_error(_nothing_succeeded(summary))
    if not summary.complete:
        left = f"{summary.total_ok + summary.total_failed:,} rows done so far"
        if summary.unsent is not None:
            left += f", {summary.unsent:,} left unsent"
        message = f"stopped before the end ({summary.stopped}): {left}"
        print_error(f"{message}; run the same command with --resume to continue")
    _write_summary(settings.summary_json, summary, status, message)
    observer.finish(summary, exit_status=status, error=message)
    return status


def _run_observed(
    settings: JobSettings, display: ProgressDisplay | None, observer: RunObserver, debug: bool
) -> int | None:
    """Run the job; return an exit status if it did not end with a summary, else ``None``."""
    try:
        observer.summary = anyio.run(
            _run_async,
            settings,
            display,
            observer,
            backend="asyncio",
            backend_options=backend_options(),
        )
        return None
    except ConfigError as error:
        if display is not None:
            display.close()
        print_error(str(error))
        observer.finish(None, exit_status=EXIT_USAGE, error=str(error))
        return EXIT_USAGE
    except JobFailedError as error:
        if display is not None:
            display.close()
        if debug:
            traceback.print_exception(error)
        print_error(_one_line(error))
        _write_summary(settings.summary_json, error.summary, EXIT_FATAL, str(error))
        observer.finish(error.summary, exit_status=EXIT_FATAL, error=str(error))
        return EXIT_FATAL
    except Exception as error:
        if display is not None:
            display.close()
        if debug:
            traceback.print_exception(error)
        text = f"{type(error).__name__}: {_one_line(error)}"
        print_error(text)
        observer.finish(None, exit_status=EXIT_FATAL, error=text)
        return EXIT_FATAL


@contextlib.contextmanager
def _metrics_server(port: int | None) -> Iterator[Any]:
    """Serve Prometheus metrics on 127.0.0.1:PORT for the job's length (``--metrics-port``).

    Yields the :class:`~pipeline.jobs._metrics.JobMetrics` to feed, or ``None`` without a
    port; also ``None`` after reporting why it cannot serve (a missing extra, a busy port).
    """
    if port is None:
        yield None
        return
    try:
        from pipeline.jobs._metrics import JobMetrics
    except ImportError as error:
        print_error(
            f"--metrics-port needs the [server] extra: pip install 'llm-pipeline[server]' ({error})"
        )
        yield None
        return
    metrics = JobMetrics()
    try:
        server = metrics.serve(port)
    except OSError as error:
        print_error(f"--metrics-port: cannot serve on 127.0.0.1:{port}: {error.strerror or error}")
        metrics.shutdown()
        yield None
        return
    try:
        yield metrics
    finally:
        server.shutdown()
        server.server_close()
        metrics.shutdown()


def _report(argv: list[str]) -> int:
    from pipeline.cli._report import main as report_main

    return report_main(argv)


def _demo(argv: list[str]) -> int:
    from pipeline.cli._demo import main as demo_main  # aiohttp and the simulator: only here

    return demo_main(argv)


def _sim(argv: list[str]) -> int:
    from pipeline.testing._sim import main as sim_main

    return sim_main(argv)


def _serve(argv: list[str]) -> int:
    try:
        from pipeline.server import main as serve_main
    except ImportError as exc:
        print_error(
            f"this command needs the [server] extra: pip install 'llm-pipeline[server]' ({exc})"
        )
        return EXIT_FATAL
    return serve_main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "run": run_command,
    "report": _report,
    "demo": _demo,
    "sim": _sim,
    "serve": _serve,
}
"""Each command's function: its arguments after the command name in, the exit status out."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # before the job's own handler is in place
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED


def _main(args: list[str]) -> int:
    command = COMMANDS.get(args[0]) if args else None
    if command is not None:
        return int(command(args[1:]) or 0)
    parser = build_parser()
    if not args:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    parser.parse_args(args)  # --help, --version, or an unknown command (exit 2)
    return EXIT_USAGE  # pragma: no cover - parse_args exits


__all__ = ["COMMANDS", "build_parser", "main", "run_command", "settings_from_args"]
