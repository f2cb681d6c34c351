"""What the command line's commands share: the program name, exit statuses, the event loop."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

__all__ = [
    "EXIT_FAILED_ROWS",
    "EXIT_FATAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "PROG",
    "backend_options",
    "print_error",
]

PROG = "llm-pipeline"

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_FAILED_ROWS = 3
EXIT_INTERRUPTED = 130


def backend_options() -> dict[str, Any]:
    """Return anyio's asyncio options: uvloop when it is installed."""
    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


def print_error(text: str) -> None:
    """Print ``llm-pipeline: error: TEXT`` on standard error."""
    sys.stderr.write(f"{PROG}: error: {text}\n")
    sys.stderr.flush()
