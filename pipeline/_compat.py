"""Names that moved between the Python versions this library supports."""

from __future__ import annotations

import sys
from typing import Any, BinaryIO

if sys.version_info >= (3, 11):
    import builtins

    BaseExceptionGroup = builtins.BaseExceptionGroup
else:  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup


def load_toml(f: BinaryIO) -> dict[str, Any]:
    """Parse a TOML file opened in binary mode (``tomllib``, or ``tomli`` before 3.11).

    The parser is imported here, at the first job file read, not with the runtime: most runs
    read none.

    Raises:
        ValueError: The text is not valid TOML (``TOMLDecodeError`` is a ``ValueError``).
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    return tomllib.load(f)


__all__ = ["BaseExceptionGroup", "load_toml"]
