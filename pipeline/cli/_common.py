"""What the command line's commands share: the program name, exit statuses, the event loop."""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import re
import sys
from typing import Any, NoReturn

__all__ = [
    "EXIT_FAILED_ROWS",
    "EXIT_FATAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "PROG",
    "Parser",
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


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors suggest the flag or command the user meant.

    ``--modle gpt-4o`` fails with "unrecognized arguments: --modle gpt-4o (did you mean
    --model?)", and ``rnu`` with "invalid choice: 'rnu' ... (did you mean run?)". Flags are
    never abbreviated: ``--max-retry=3`` is a typo of ``--max-retries``, not a silent
    ``--max-retry-after 3``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print the usage and the error with a did-you-mean, then exit with status 2."""
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}{self.suggestion(message)}\n")

    def suggestion(self, message: str) -> str:
        """Return `` (did you mean --flag?)`` for a mistyped flag or choice, else ``""``."""
        unknown = re.search(r"unrecognized arguments: (.+)$", message)
        if unknown is not None:
            flags = list(self._option_string_actions)
            for word in unknown.group(1).split():
                if word.startswith("-"):
                    close = difflib.get_close_matches(word.split("=", 1)[0], flags, n=1)
                    if close:
                        return f" (did you mean {close[0]}?)"
            return ""
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.+)\)", message)
        if choice is not None:
            options = [c.strip().strip("'") for c in choice.group(2).split(",")]
            close = difflib.get_close_matches(choice.group(1), options, n=1)
            if close:
                return f" (did you mean {close[0]}?)"
        return ""


def print_error(text: str) -> None:
    """Print ``llm-pipeline: error: TEXT`` on standard error."""
    sys.stderr.write(f"{PROG}: error: {text}\n")
    sys.stderr.flush()
