"""The flags of ``llm-pipeline run``: their groups, types and help texts.

Every flag's default is ``SUPPRESS``, so the settings built from a command line hold only the
flags given (a job file's values stay where no flag overrides them).
"""

from __future__ import annotations

import argparse
import json
from argparse import SUPPRESS
from typing import Any

from pipeline._errors import ConfigError
from stages.llm._routing import parse_route

__all__ = ["add_run_arguments"]


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _param(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw  # a bare word is a string: --param user=alice
    return name.strip(), value


def _route(text: str) -> dict[str, Any]:
    try:
        return parse_route(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every flag of ``run`` to ``parser``, in groups (input and output first)."""
    files = parser.add_argument_group("input and output")
    files.add_argument(
        "input",
        nargs="?",
        default=SUPPRESS,
        help="input file: .jsonl .csv .tsv .parquet, JSONL/CSV also .gz or .zst; - for stdin",
    )
    files.add_argument(
        "-o",
        "--output",
        default=SUPPRESS,
        metavar="OUTPUT",
        help="output file, format by extension as for INPUT (not stdin); refused if it exists"
        " (see --overwrite)",
    )
    _request_arguments(parser)
    _limit_arguments(parser)
    _file_arguments(parser)
    _batch_arguments(parser)
    _running_arguments(parser)


def _request_arguments(parser: argparse.ArgumentParser) -> None:
    job = parser.add_argument_group("model and request")
    s = SUPPRESS
    bool_flag = argparse.BooleanOptionalAction
    job.add_argument("--model", default=s, help="model name (Azure: deployment)")
    job.add_argument(
        "--prompt", default=s, metavar="TEMPLATE", help='template over row fields: "Hello {name}"'
    )
    job.add_argument(
        "--null-as-empty",
        action="store_true",
        default=s,
        help="render a null field of the template as empty text (default: the row fails)",
    )
    job.add_argument("--system", default=s, metavar="TEXT", help="system prompt")
    job.add_argument("--base-url", default=s, metavar="URL", help="API root (default: provider's)")
    job.add_argument(
        "--api-key-env", default=s, metavar="NAME", help="environment variable holding the key"
    )
    job.add_argument(
        "--endpoint",
        choices=["chat", "embeddings"],
        default=s,
        help="chat completions (default) or embeddings (the vector is the answer)",
    )
    job.add_argument(
        "--provider",
        choices=["openai", "azure", "anthropic"],
        default=s,
        help="API family: openai (default, any compatible server), azure, anthropic",
    )
    job.add_argument(
        "--param",
        dest="params",
        action="append",
        type=_param,
        default=s,
        metavar="KEY=VALUE",
        help="request body field, JSON value (repeatable): --param temperature=0.2",
    )
    job.add_argument(
        "--header",
        dest="headers",
        action="append",
        type=_header,
        default=s,
        metavar="'NAME: VALUE'",
        help="extra HTTP header (repeatable)",
    )
    job.add_argument("--stream", action=bool_flag, default=s, help="stream answers (SSE)")
    job.add_argument("--json-output", action=bool_flag, default=s, help="parse each answer as JSON")
    job.add_argument(
        "--output-field", default=s, metavar="FIELD", help="field for the answer (response)"
    )
    job.add_argument("--id-field", default=s, metavar="FIELD", help="row key (default: line no.)")
    job.add_argument(
        "--batch-size", type=_int, default=s, metavar="N", help="rows per embeddings request (64)"
    )
    _route_arguments(job)


def _route_arguments(job: Any) -> None:
    """The flags that spread rows over several endpoints (docs/routing.md)."""
    s = SUPPRESS
    job.add_argument(
        "--route",
        dest="endpoints",
        action="append",
        type=_route,
        default=s,
        metavar="KEY=VALUE,...",
        help="an endpoint to spread rows over (repeatable; docs/routing.md):"
        " --route name=east,url=URL,key-env=VAR,model=M,rpm=300",
    )
    job.add_argument(
        "--fallback-model",
        dest="fallbacks",
        action="append",
        default=s,
        metavar="MODEL",
        help="retry a failed row on this model's endpoints (repeatable)",
    )
    job.add_argument(
        "--route-policy",
        choices=["headroom", "cheapest"],
        default=s,
        help="with --route: where a request waits least (headroom), or the cheapest",
    )


def _limit_arguments(parser: argparse.ArgumentParser) -> None:
    limits = parser.add_argument_group("limits and retries")
    s = SUPPRESS
    limits.add_argument(
        "--concurrency", type=_int, default=s, metavar="N", help="fixed (default adaptive)"
    )
    limits.add_argument(
        "--max-concurrency", type=_int, default=s, metavar="N", help="adaptive ceiling"
    )
    limits.add_argument("--rpm", type=_number, default=s, metavar="N", help="requests per minute")
    limits.add_argument("--tpm", type=_number, default=s, metavar="N", help="tokens per minute")
    limits.add_argument(
        "--itpm", type=_number, default=s, metavar="N", help="input tokens per minute (Anthropic)"
    )
    limits.add_argument(
        "--otpm", type=_number, default=s, metavar="N", help="output tokens per minute (Anthropic)"
    )
    limits.add_argument(
        "--burst",
        type=_number,
        default=s,
        metavar="SECONDS",
        help="most of a minute's quota sent at once (default: what the server's headers say)",
    )
    limits.add_argument(
        "--limiter", default=s, metavar="redis://HOST:PORT/DB", help="share limits through Redis"
    )
    limits.add_argument(
        "--max-retries",
        type=_int,
        default=s,
        metavar="N",
        help="retries per row (4)",
    )
    limits.add_argument(
        "--timeout", type=_number, default=s, metavar="SECONDS", help="per attempt (600)"
    )
    limits.add_argument(
        "--deadline", type=_number, default=s, metavar="SECONDS", help="per row, retries included"
    )
    limits.add_argument(
        "--max-retry-after",
        type=_number,
        default=s,
        metavar="SECONDS",
        help="longest Retry-After waited for; past it the row is dead-lettered (600)",
    )
    limits.add_argument(
        "--max-response-mb",
        type=_number,
        default=s,
        metavar="MB",
        help="largest response body read; past it the row is dead-lettered (10)",
    )
    limits.add_argument(
        "--budget", type=_number, default=s, metavar="USD", help="stop reading input at this cost"
    )
    limits.add_argument(
        "--estimate",
        action="store_true",
        default=s,
        help="print what the whole job would cost at most, send nothing, and exit",
    )


def _file_arguments(parser: argparse.ArgumentParser) -> None:
    files = parser.add_argument_group("files and resume")
    s = SUPPRESS
    bool_flag = argparse.BooleanOptionalAction
    files.add_argument(
        "--dead-letter",
        default=s,
        metavar="PATH",
        help="where failed rows go, with their errors (OUTPUT.failed.jsonl)",
    )
    files.add_argument("--resume", action="store_true", default=s, help="continue a stopped job")
    files.add_argument(
        "--overwrite",
        action="store_true",
        default=s,
        help="replace a finished OUTPUT, or discard a stopped job, and start over",
    )
    files.add_argument("--ordered", action=bool_flag, default=s, help="output in input order")
    files.add_argument(
        "--max-line-bytes",
        type=_int,
        default=s,
        metavar="N",
        help="longest JSONL input row (16 MiB); a longer one is a dead letter",
    )
    files.add_argument("--cache", default=s, metavar="DIR", help="response cache directory")
    formats = ["jsonl", "csv", "tsv", "parquet"]
    files.add_argument(
        "--input-format", choices=formats, default=s, help="instead of INPUT's extension"
    )
    files.add_argument(
        "--output-format", choices=formats, default=s, help="instead of OUTPUT's extension"
    )
    files.add_argument(
        "--csv-delimiter",
        default=s,
        metavar="CHAR",
        help="CSV input's separator: , ; tab | (default: detected from the header)",
    )
    files.add_argument(
        "--encoding", default=s, metavar="NAME", help="CSV input's encoding (utf-8; latin-1...)"
    )
    files.add_argument("--summary-json", default=s, metavar="PATH", help="write the summary here")
    files.add_argument("--config", default=s, metavar="job.toml", help="settings from a job file")


def _batch_arguments(parser: argparse.ArgumentParser) -> None:
    batch = parser.add_argument_group("batch API (half price, within 24 hours; docs/batch.md)")
    s = SUPPRESS
    batch.add_argument(
        "--batch-api",
        action=argparse.BooleanOptionalAction,
        default=s,
        help="send the rows through batches",
    )
    batch.add_argument(
        "--batch-max-rows", type=_int, default=s, metavar="N", help="rows per batch at most"
    )
    batch.add_argument(
        "--batch-poll", type=_number, default=s, metavar="SECONDS", help="check every (15)"
    )
    batch.add_argument(
        "--batch-fallback",
        choices=["batch", "online"],
        default=s,
        help="where failed/expired batches' rows go (batch)",
    )
    batch.add_argument(
        "--cancel-batches",
        action="store_true",
        default=s,
        help="cancel the job's running batches on the provider, then stop",
    )


def _running_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("running")
    s = SUPPRESS
    run.add_argument(
        "--engine",
        choices=["local", "ray"],
        default=s,
        help="local (default: this process) or ray (Ray Data actors; docs/scaling.md)",
    )
    run.add_argument(
        "--ray-address", default=s, metavar="ADDR", help="Ray cluster (default: start one here)"
    )
    run.add_argument(
        "--trace",
        choices=["console", "otlp"],
        default=s,
        help="export OpenTelemetry spans to stderr, or to OTEL_EXPORTER_OTLP_ENDPOINT",
    )
    run.add_argument(
        "--grace",
        type=_number,
        default=s,
        metavar="SECONDS",
        help="after Ctrl-C/SIGTERM, how long requests in flight may finish (10)",
    )
    run.add_argument("--quiet", action="store_true", default=s, help="no progress or summary")
    run.add_argument("--debug", action="store_true", default=False, help="tracebacks, debug log")
    run.add_argument(
        "--progress-interval",
        type=_number,
        default=None,
        metavar="SECONDS",
        help="seconds between progress lines when not on a terminal (5)",
    )
    run.add_argument(
        "--metrics-port",
        type=_int,
        default=s,
        metavar="PORT",
        help="serve Prometheus metrics on 127.0.0.1:PORT/metrics while the job runs",
    )
