"""``python -m pipeline sim``: run the simulator until Ctrl-C, configured by flags."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
import typing
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from pipeline._errors import ConfigError
from pipeline.testing._sim._config import SimConfig, field_hints
from pipeline.testing._sim._server import serve

__all__ = ["main"]


def _flag_parser(hint: Any) -> Callable[[str], Any]:
    args = typing.get_args(hint)
    base = next((a for a in args if a is not type(None)), hint) if args else hint

    def parse(text: str) -> Any:
        if args and type(None) in args and text.lower() in ("none", "null", ""):
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {getattr(base, '__name__', base)}, got {text!r}"
            ) from None

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline sim",
        description="Simulated OpenAI-compatible LLM server with quotas and fault injection.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (8000; 0 = any free port)")
    hints = field_hints()
    for field in dataclasses.fields(SimConfig):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=_flag_parser(hints[field.name]),
            default=None,
            help=f"(default: {field.default})",
        )
    return parser


async def _run(config: SimConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with serve(config, host=host, port=port) as sim:
        print(f"simulated LLM server on {sim.url}  {config!r}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Run the simulator until Ctrl-C (``python -m pipeline sim``); return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(SimConfig)
        if getattr(args, f.name) is not None
    }
    try:
        config = SimConfig(**given)
    except ConfigError as error:
        parser.error(str(error))
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on CPython/Unix
            asyncio.run(_run(config, args.host, args.port))
        else:
            uvloop.run(_run(config, args.host, args.port))
    except KeyboardInterrupt:
        pass
    except OSError as error:
        print(f"cannot serve on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    return 0
