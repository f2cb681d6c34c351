"""Names that moved between the Python versions this library supports."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import builtins

    BaseExceptionGroup = builtins.BaseExceptionGroup
    import tomllib as tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib
    from exceptiongroup import BaseExceptionGroup

__all__ = ["BaseExceptionGroup", "tomllib"]
